"""A small synchronous client (psycopg 3) for processes that only start and watch
workflows: locust users, scripts, web handlers without an event loop.

It runs the same SQL text as the async engine (``sql/queries.sql``, ``$n`` placeholders
through psycopg's RawCursor) and routes by the same shard map, so a workflow started here
is indistinguishable from one started by ``Engine.start``. Workers still run in an
``Engine``; this client starts workflows by name and never runs them.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from . import clusterfile
from .config import EngineConfig
from .driver import Q
from .engine import TERMINAL, _validate_id
from .errors import RoutingError, WorkflowCancelled, WorkflowFailed, WorkflowNotFound
from .migrate import read_shard_map
from .routing import ShardMap, validate_tenant
from .serde import dump_args


class SyncClient:
    """``SyncClient()`` reads the cluster file; ``SyncClient(dsns=[...])`` takes nodes."""

    def __init__(self, *, dsns: list[str] | None = None,
                 cluster_file: Path | str | None = None,
                 config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        if dsns is None:
            spec = clusterfile.load(Path(cluster_file) if cluster_file else None)
            dsns = [n.dsn for n in spec.nodes if n.role in ("primary", "coordinator")]
        self._conns: dict[str, psycopg.Connection[Any]] = {}
        maps: list[ShardMap] = []
        for dsn in dsns:
            conn = psycopg.connect(dsn, autocommit=True, cursor_factory=psycopg.RawCursor)
            row = conn.execute("SELECT node_name FROM shardflow.node_info").fetchone()
            if row is None:
                raise RoutingError(f"{dsn.split('@')[-1]} is not an initialised shardflow node")
            self._conns[str(row[0])] = conn
            maps.append(read_shard_map(conn))
        self.shard_map = max(maps, key=lambda m: m.epoch)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _conn(self, tenant: str) -> tuple[int, psycopg.Connection[Any]]:
        shard, node = self.shard_map.route(validate_tenant(tenant))
        return shard, self._conns[node]

    def start(self, name: str, *args: Any, tenant: str, workflow_id: str | None = None,
              queue: str = "default", priority: int = 0, **kwargs: Any) -> str:
        """Start workflow ``name`` (registered by the workers' engine); durable on return.
        Returns the workflow id; an existing (tenant, id) is returned as is."""
        _validate_id(name, "name")
        wf_id = _validate_id(workflow_id, "workflow_id") if workflow_id else str(uuid.uuid4())
        inputs = dump_args(args, kwargs, workflow=name, max_bytes=self.config.max_payload_bytes)
        shard, conn = self._conn(tenant)
        conn.execute(Q["insert_workflow"], (
            tenant, shard, wf_id, name, queue, priority, inputs, None,
            self.config.max_attempts, None, 0.0, self.config.notify))
        return wf_id

    def status(self, tenant: str, workflow_id: str) -> str:
        shard, conn = self._conn(tenant)
        row = conn.execute(Q["get_status"], (tenant, shard, workflow_id)).fetchone()
        if row is None:
            raise WorkflowNotFound(tenant, workflow_id)
        return str(row[0])

    def result(self, tenant: str, workflow_id: str, timeout: float = 60.0) -> Any:
        """Poll until the workflow ends; its result, or WorkflowFailed/WorkflowCancelled."""
        shard, conn = self._conn(tenant)
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            row = conn.execute(Q["get_status"], (tenant, shard, workflow_id)).fetchone()
            if row is None:
                raise WorkflowNotFound(tenant, workflow_id)
            status, output, error = row
            if status in TERMINAL:
                err = json.loads(error) if isinstance(error, str) else error
                if status == "succeeded":
                    return json.loads(output) if isinstance(output, str) else output
                if status == "cancelled":
                    raise WorkflowCancelled(tenant, workflow_id, status, err)
                raise WorkflowFailed(tenant, workflow_id, status, err)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"workflow {workflow_id!r} of tenant {tenant!r} did not "
                                   f"finish within {timeout}s (status {status})")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
