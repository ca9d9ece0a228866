"""The public engine: register workflows and steps, start them, watch them.

An :class:`Engine` is an object you create, open and close (``async with engine``): no
global state. It reads the cluster file (or takes DSNs), connects to every node,
migrates them, reads the shard map the nodes store, and runs this process's workers
unless ``run_workers=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import psycopg

from . import checks, clusterfile, context
from .batcher import GroupCommit, StartBatcher, TxBatcher, insert_rows
from .clusterfile import ClusterSpec, NodeSpec, redact
from .config import EngineConfig
from .cron import Cron
from .driver import BACKGROUND, Driver, Node, Q
from .errors import (
    ConfigError,
    DatabaseError,
    InvalidArgument,
    RoutingError,
    ShardflowError,
    UnknownWorkflowName,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowNotFound,
)
from .metrics import EngineMetrics
from .migrate import distribute, has_citus, init_node, migrate, read_shard_map
from .routing import ShardMap, validate_tenant
from .serde import dump_args, dumps, loads

P = ParamSpec("P")
W = TypeVar("W")
R = TypeVar("R")

# 'purged': a finished workflow that retention purged, kept as a tombstone of its id
# for the idempotency window (migration 0018)
TERMINAL = ("succeeded", "failed", "cancelled", "dead", "purged")
STATUSES = ("pending", "running", *TERMINAL)
MAX_ID_LEN = checks.MAX_ID_LEN
_validate_id = checks.text


@dataclass(frozen=True, kw_only=True, slots=True)
class Queue:
    """A named queue. Limits are cluster-wide; each node enforces its share."""

    name: str
    priority: int = 0
    concurrency: int | None = None
    tenant_concurrency: int | None = None
    rate_per_sec: float | None = None

    def __post_init__(self) -> None:
        _validate_id(self.name, "queue name")
        checks.int32(self.priority, f"queue {self.name!r}: priority")
        for field_name in ("concurrency", "tenant_concurrency"):
            v = getattr(self, field_name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                                  or not 0 < v <= checks.INT32_MAX):
                raise InvalidArgument(f"queue {self.name!r}: {field_name} must be > 0 "
                                      f"(an int up to {checks.INT32_MAX}) or None, got {v!r}")
        if self.rate_per_sec is not None:
            checks.positive(self.rate_per_sec, f"queue {self.name!r}: rate_per_sec")


@dataclass(frozen=True, kw_only=True, slots=True)
class Start:
    """One workflow of :meth:`Engine.start_many`."""

    tenant: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    workflow_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Registered:
    name: str
    fn: Callable[..., Awaitable[Any]]
    queue: str
    max_attempts: int | None


class WorkflowHandle:
    """A started workflow, by tenant and id."""

    def __init__(self, engine: Engine, tenant: str, workflow_id: str) -> None:
        self.engine = engine
        self.tenant = tenant
        self.workflow_id = workflow_id

    def __repr__(self) -> str:
        return f"WorkflowHandle(tenant={self.tenant!r}, workflow_id={self.workflow_id!r})"

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the workflow to end; return its result or raise WorkflowFailed.

        Inside a workflow this is durable: the child's outcome is checkpointed.
        """
        ctx = context.current()
        if ctx is not None and ctx.engine is self.engine:
            return await ctx.child_result(self.tenant, self.workflow_id, timeout)
        outcome = await self.engine.wait_terminal(self.tenant, self.workflow_id, timeout)
        return self.engine.outcome_value(self.tenant, self.workflow_id, outcome)

    async def status(self) -> str:
        return str((await self.engine.get_info(self.tenant, self.workflow_id))["status"])

    async def info(self) -> dict[str, Any]:
        return await self.engine.get_info(self.tenant, self.workflow_id)

    async def cancel(self) -> list[str]:
        return await self.engine.cancel(self.tenant, self.workflow_id)


class Engine:
    """Durable workflows over a sharded Postgres cluster.

    ``Engine()`` uses the cluster file (``.shardflow/cluster.json`` or
    ``$SHARDFLOW_CLUSTER``); ``Engine(dsns=[...])`` takes explicit nodes and, if they
    are new, places ``shard_count`` shards on them.
    """

    def __init__(
        self,
        *,
        dsns: Sequence[str] | None = None,
        cluster_file: Path | str | None = None,
        config: EngineConfig | None = None,
        run_workers: bool = True,
        shard_count: int = 256,
        citus: str | None = None,
        tenant: str | None = None,
    ) -> None:
        if sum(x is not None for x in (dsns, cluster_file, citus)) > 1:
            raise InvalidArgument("give one of dsns, cluster_file or citus")
        if citus is not None:
            # a Citus cluster: every call goes through the coordinator, and Citus routes
            # it to the worker holding the tenant's shard group
            dsns = [citus]
            shard_count = 1
        self._citus = citus is not None
        # A tenant-bound client (connecting as a tenant role: see `shardflow tenants
        # grant`): every call is for this tenant. Postgres enforces it with row-level
        # security; the check here only makes the error clear and early.
        self.tenant = validate_tenant(tenant) if tenant is not None else None
        if self.tenant is not None and run_workers:
            raise InvalidArgument("a tenant-bound Engine(tenant=...) is a client: give "
                                  "run_workers=False (workers serve every tenant)")
        if dsns is not None and (isinstance(dsns, str) or not dsns):
            raise InvalidArgument("dsns must be a non-empty list of connection strings")
        if config is not None and not isinstance(config, EngineConfig):
            raise InvalidArgument(f"config must be a shardflow.EngineConfig, got "
                                  f"{type(config).__name__} (EngineConfig(**{{...}}) "
                                  "makes one from a dict)")
        self.config = config or EngineConfig()
        # this engine's connections carry it as application_name ('shardflow worker
        # <tag>' when it runs workers): recovery ends the sessions a frozen worker left
        # in a transaction (see end_frozen_sessions in sql/queries.sql). Made again at
        # open(): processes forked from one Engine object must not share it.
        self.instance_tag = uuid.uuid4().hex[:12]
        self.run_workers = run_workers
        self._dsns = list(dsns) if dsns is not None else None
        self._cluster_file = Path(cluster_file) if cluster_file is not None else None
        self._shard_count = shard_count
        self._workflows: dict[str, _Registered] = {}
        self._queues: dict[str, Queue] = {"default": Queue(name="default")}
        self._known_queues: set[str] = {"default"}
        self.driver: Driver = cast(Driver, None)
        self.shard_map: ShardMap = cast(ShardMap, None)
        self._worker: Any = None
        self._group: dict[str, GroupCommit] = {}
        self._starts: dict[str, StartBatcher] = {}
        self._tx: dict[str, TxBatcher] = {}
        self._opened = False
        self._waiters: dict[tuple[str, str], set[context.WorkflowContext]] = {}
        self._done_events: dict[tuple[str, str], asyncio.Event] = {}
        self.metrics: Counter[str] = Counter()
        self.prom = EngineMetrics(self)
        self._tracer: Any = None
        if self.config.tracing:
            try:
                from opentelemetry import trace
            except ImportError:
                raise ConfigError("EngineConfig.tracing needs OpenTelemetry: pip install "
                                  "'shardflow[otel]' (opentelemetry-api)") from None
            from . import __version__

            self._tracer = trace.get_tracer("shardflow", __version__)

    @property
    def citus(self) -> bool:
        """True on a Citus cluster (``citus=`` given, or the node has the extension)."""
        return self._citus

    # -- registration ----------------------------------------------------------------

    def workflow(self, *, name: str | None = None, queue: str = "default",
                 max_attempts: int | None = None) -> Callable[[Callable[P, Awaitable[R]]],
                                                               Callable[P, Awaitable[R]]]:
        """Register an async function as a workflow (by ``name``, default its qualname)."""

        if max_attempts is not None:
            checks.int32(max_attempts, "max_attempts", minimum=1)
        _validate_id(queue, "queue")

        def deco(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
            if not asyncio.iscoroutinefunction(fn):
                raise InvalidArgument(f"workflow {fn!r} must be an async function")
            wf_name = _validate_id(name or fn.__qualname__, "workflow name")
            if wf_name in self._workflows and self._workflows[wf_name].fn is not fn:
                raise InvalidArgument(f"workflow name {wf_name!r} is registered twice")
            self._workflows[wf_name] = _Registered(wf_name, fn, queue, max_attempts)
            fn.__shardflow_name__ = wf_name  # type: ignore[attr-defined]
            return fn

        return deco

    def step(self, *, name: str | None = None, retries: int = 0
             ) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
        """A checkpointed step with an external side effect: at least once, each run
        recorded. Outside a workflow the function just runs."""
        checks.int32(retries, "retries", minimum=0)

        def deco(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
            step_name = _validate_id(name or fn.__qualname__, "step name")

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                ctx = context.current()
                if ctx is None:
                    return await fn(*args, **kwargs)
                return cast(R, await ctx.run_step(fn, step_name, retries, args, kwargs))

            return wrapper

        return deco

    def transaction(self, *, name: str | None = None, retries: int = 0
                    ) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
        """A step that runs in the checkpoint's transaction on the tenant's node: its
        writes and its checkpoint commit together, so it takes effect exactly once.
        The function receives the asyncpg connection first; callers omit it."""
        checks.int32(retries, "retries", minimum=0)

        def deco(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
            step_name = _validate_id(name or fn.__qualname__, "transaction name")

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> R:
                ctx = context.require(f"transaction step {step_name!r}")
                return cast(R, await ctx.run_transaction(fn, step_name, retries, args, kwargs))

            return wrapper

        return deco

    def queue(self, name: str, *, priority: int = 0, concurrency: int | None = None,
              tenant_concurrency: int | None = None,
              rate_per_sec: float | None = None) -> Queue:
        """Define a named queue (written to every node when the engine opens).

        Queues are claimed from in priority order; ``concurrency`` and ``rate_per_sec``
        are cluster-wide limits (each node enforces its share of them),
        ``tenant_concurrency`` caps one tenant's running workflows of the queue."""
        q = Queue(name=name, priority=priority, concurrency=concurrency,
                  tenant_concurrency=tenant_concurrency, rate_per_sec=rate_per_sec)
        self._queues[name] = q
        self._known_queues.add(name)
        return q

    async def set_queue_paused(self, name: str, paused: bool) -> None:
        """Pause (no new claims) or resume a queue on every node."""
        self._require_open()
        found = False
        for node in self.driver.nodes.values():
            found |= await self.driver.fetchrow(node, "set_queue_paused", name, paused) is not None
        if not found:
            raise InvalidArgument(f"unknown queue {name!r}")

    async def list_queues(self) -> list[dict[str, Any]]:
        self._require_open()
        node = next(iter(self.driver.nodes.values()))
        return [dict(r) for r in await self.driver.fetch(node, "list_queues")]

    @property
    def workflow_names(self) -> list[str]:
        return sorted(self._workflows)

    def registered(self, name: str) -> _Registered | None:
        return self._workflows.get(name)

    def max_attempts_of(self, name: str) -> int:
        """The lost runs workflow ``name`` may have: its ``@workflow(max_attempts=)``,
        else the config's (also when this engine does not register it: it cannot know)."""
        reg = self._workflows.get(name)
        return (reg.max_attempts if reg is not None else None) or self.config.max_attempts

    def group_commit(self, node: Node) -> GroupCommit | None:
        """The checkpoint writer of ``node`` (see shardflow/batcher.py), or None when
        every write goes on its own (``EngineConfig.group_commit`` off, or Citus)."""
        return self._writer(self._group, node, lambda: GroupCommit(
            self.driver, node, max_batch=self.config.group_commit_max))

    def tx_batcher(self, node: Node) -> TxBatcher | None:
        """Transaction steps on ``node`` run in groups (see TxBatcher), unless group
        commit is off or on Citus."""
        return self._writer(self._tx, node, lambda: TxBatcher(
            self.driver, node, max_batch=self.config.tx_group_max))

    def _start_queue(self, reg: _Registered, queue: str | None, priority: int) -> str:
        """The queue a start of ``reg`` goes to, checked with its priority."""
        checks.int32(priority, "priority")
        q = queue or reg.queue
        if q not in self._known_queues:
            raise InvalidArgument(f"unknown queue {q!r} for workflow {reg.name!r}: define it "
                                  f"with engine.queue({q!r}) (known: {sorted(self._known_queues)})")
        return q

    def _start_batcher(self, node: Node) -> StartBatcher | None:
        """Concurrent starts on ``node`` go in one statement (group commit), unless it
        is off or on Citus."""
        return self._writer(self._starts, node, lambda: StartBatcher(
            self.driver, node, max_batch=self.config.group_commit_max,
            notify=self.config.notify))

    def _writer(self, cache: dict[str, W], node: Node, make: Callable[[], W]) -> W | None:
        """``node``'s writer in ``cache``, made on first use; None when group commit is
        off or on Citus (each write then goes on its own)."""
        if not self.config.group_commit or self.citus:
            return None
        w = cache.get(node.name)
        if w is None:
            w = cache[node.name] = make()
        return w

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if self._opened:
            return
        self.instance_tag = uuid.uuid4().hex[:12]
        nodes, shard_map = await asyncio.to_thread(self._discover)
        self.shard_map = shard_map
        self.driver = Driver(nodes, shard_map, pool_size=self.config.pool_size,
                             connect_timeout=self.config.connect_timeout,
                             reconnect_timeout=self.config.reconnect_timeout,
                             application_name=(f"shardflow worker {self.instance_tag}"
                                               if self.run_workers else
                                               f"shardflow client {self.instance_tag}"))
        await self.driver.open()
        for q in self._queues.values():
            if (q.name == "default" and q == Queue(name="default")) or self.tenant:
                continue  # queues are defined by the service, not by a tenant role
            for node in self.driver.nodes.values():
                await self.driver.execute(node, "upsert_queue", q.name, q.priority,
                                          q.concurrency, q.tenant_concurrency, q.rate_per_sec)
        first = next(iter(self.driver.nodes.values()))
        self._known_queues |= {r["name"] for r in await self.driver.fetch(first, "list_queues")}
        self._opened = True
        if self.run_workers:
            from .executor import Worker

            self._worker = Worker(self)
            await self._worker.start()

    async def close(self) -> None:
        if not self._opened:
            return
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
        # the writers last: the worker's runs may still be waiting on them above; what
        # is still queued then fails with an error (nobody is left waiting forever)
        writers: list[GroupCommit | StartBatcher | TxBatcher] = [
            *self._group.values(), *self._starts.values(), *self._tx.values()]
        self._group.clear()
        self._starts.clear()
        self._tx.clear()
        for w in writers:
            await w.close()
        await self.driver.close()
        self._opened = False

    # -- schedules -----------------------------------------------------------------

    async def schedule(self, workflow: Callable[..., Any] | str, *args: Any, cron: str,
                       tenant: str | None = None, schedule_id: str | None = None,
                       catch_up: str = "skip", queue: str | None = None,
                       **kwargs: Any) -> str:
        """Start ``workflow(*args, **kwargs)`` for ``tenant`` on every tick of ``cron``
        (5 fields, or 6 with seconds first; UTC), exactly once per tick whatever the
        number of workers. ``catch_up``: after downtime, ``"skip"`` fires only the
        latest missed tick, ``"backfill"`` every one. The same ``schedule_id`` replaces
        the schedule. Returns the schedule id (default: the workflow's name). Tick
        workflows are named ``<schedule_id>@<tick, UTC>``."""
        self._require_open()
        reg = self._resolve(workflow)
        tenant_id = validate_tenant(tenant if tenant is not None else self.tenant)
        shard = self._route(tenant_id)
        sid = schedule_id or reg.name
        _validate_id(sid, "schedule_id")
        parsed = Cron.parse(cron)
        if catch_up not in ("skip", "backfill"):
            raise InvalidArgument(f"catch_up must be 'skip' or 'backfill', got {catch_up!r}")
        q = queue or reg.queue
        if q not in self._known_queues:
            raise InvalidArgument(f"unknown queue {q!r} for schedule {sid!r}")
        inputs = dump_args(args, kwargs, workflow=reg.name,
                           max_bytes=self.config.max_payload_bytes)
        first = parsed.next_after(dt.datetime.now(dt.UTC))
        await self.driver.on_shard(shard, "upsert_schedule", tenant_id, shard, sid, cron,
                                   reg.name, inputs, q, catch_up, first.timestamp())
        return sid

    async def schedules(self, *, tenant: str | None = None) -> list[dict[str, Any]]:
        """Schedules on every node (or the tenant's)."""
        self._require_open()
        tenant = tenant if tenant is not None else self.tenant
        nodes = ([self.driver.node_for_shard(self._route(tenant))] if tenant is not None
                 else list(self.driver.nodes.values()))
        out = []
        for n in nodes:
            out += [dict(r) for r in await self.driver.fetch(
                n, "list_schedules", tenant, self.shard_map.shards_of(n.name))]
        return out

    async def pause_schedule(self, tenant: str, schedule_id: str, paused: bool = True
                             ) -> None:
        """Pause (or resume: it fires again from its next tick after now)."""
        self._require_open()
        shard = self._route(tenant)
        rows = [r for r in await self.schedules(tenant=tenant)
                if r["schedule_id"] == schedule_id]
        if not rows:
            raise InvalidArgument(f"no schedule {schedule_id!r} for tenant {tenant!r}")
        nxt = Cron.parse(rows[0]["cron"]).next_after(dt.datetime.now(dt.UTC))
        await self.driver.on_shard(shard, "pause_schedule", tenant, shard, schedule_id,
                                   paused, nxt.timestamp())

    async def set_retention(self, seconds: float | None, *, tenant: str | None = None,
                            idempotency_window: float | None = None) -> None:
        """Delete finished workflows (with their steps, messages, events) ``seconds``
        after they finished: for ``tenant``, or by default for every tenant without a
        retention of its own. ``None`` removes it (keep forever). Workers apply it in
        small batches per shard every ``retention_interval``.

        A purged workflow leaves a tombstone of its id (status ``purged``, no inputs or
        outputs) for ``idempotency_window`` seconds more (default: the ``'*'``
        default's, else one day), so that a start retried with the same (tenant, id)
        after the purge does not run it again; 0 deletes the row at once."""
        self._require_open()
        key = "*" if tenant is None else validate_tenant(tenant)
        if seconds is not None:
            # inf would be stored, then fail every purge forever (an interval of inf)
            seconds = checks.seconds(seconds, "retention seconds",
                                      maximum=checks.MAX_RETENTION_SECONDS)
        window = None
        if idempotency_window is not None:
            if seconds is None:
                raise InvalidArgument("idempotency_window needs a retention (seconds)")
            window = checks.seconds(idempotency_window, "idempotency_window")
        for node in self.driver.nodes.values():
            if seconds is None:
                await self.driver.execute(node, "clear_retention", key)
            else:
                await self.driver.execute(node, "set_retention", key, float(seconds))
                if window is not None:
                    await self.driver.execute(node, "set_idempotency_window", key, window)

    async def retention(self) -> list[dict[str, Any]]:
        """The retention settings ('*' is the default), as stored on the first node."""
        self._require_open()
        first = next(iter(self.driver.nodes.values()))
        return [dict(r) for r in await self.driver.fetch(first, "list_retention")]

    def span(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        """An OpenTelemetry span when ``EngineConfig.tracing`` is on, else nothing."""
        if self._tracer is None:
            return contextlib.nullcontext()
        return self._tracer.start_as_current_span(  # type: ignore[no-any-return]
            name, attributes={k: v for k, v in attributes.items() if v is not None})

    def serve_metrics(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serve Prometheus metrics on http://host:port/metrics (0: a free port);
        returns the port. See :mod:`shardflow.metrics`."""
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise InvalidArgument(f"metrics port must be 0..65535, got {port!r}")
        try:
            return self.prom.serve(port, host)
        except OSError as exc:
            raise InvalidArgument(f"cannot serve metrics on {host}:{port}: "
                                  f"{exc.strerror}") from exc

    async def run_worker(self, stop: asyncio.Event | None = None) -> None:
        """Open the engine, run workers until ``stop`` is set (or forever), close."""
        self.run_workers = True
        async with self:
            await (stop or asyncio.Event()).wait()

    def _connect_retrying(self, dsn: str, what: str) -> psycopg.Connection[Any]:
        deadline = time.monotonic() + self.config.connect_timeout
        delay = 0.1
        while True:
            try:
                return psycopg.connect(dsn, autocommit=True, connect_timeout=5)
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RoutingError(f"cannot connect to {what}: {exc}".strip()) from exc
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _discover(self) -> tuple[list[NodeSpec], ShardMap]:
        """Connect to every node (waiting for nodes briefly down), migrate, and read the
        shard map the nodes store; initialise brand-new nodes."""
        spec: ClusterSpec | None = None
        if self._dsns is None:
            spec = clusterfile.load(self._cluster_file)
            # on Citus only the coordinator is a shardflow node; its workers are Citus's
            targets: list[tuple[str | None, str]] = [
                (n.name, n.dsn) for n in spec.nodes if n.role in ("primary", "coordinator")]
        else:
            targets = [(None, d) for d in self._dsns]
        found: list[tuple[str | None, str, str | None, ShardMap | None]] = []
        for name, dsn in targets:
            what = f"node {name}" if name else f"node #{len(found)}"
            with self._connect_retrying(dsn, what) as conn:
                if self.config.migrate and self.tenant is None:
                    # a tenant role may not change the schema: the service migrates
                    migrate(conn)
                if self._citus and not has_citus(conn):
                    raise RoutingError(f"Engine(citus=...): {what} has no citus extension")
                row = conn.execute("SELECT node_name FROM shardflow.node_info").fetchone()
                node_name = row[0] if row else None
                smap = read_shard_map(conn) if row else None
                if row is not None and has_citus(conn):
                    if self.tenant is None:
                        distribute(conn)  # idempotent
                    self._citus = True
            if name is not None and node_name is not None and node_name != name:
                raise RoutingError(f"the cluster file says {redact(dsn)} is node {name!r}, "
                                   "but that "
                                   f"database is node {node_name!r}")
            found.append((name, dsn, node_name, smap))
        maps = [f[3] for f in found if f[3] is not None]
        if not maps:
            # brand-new nodes: place the shards and initialise every node
            names = [f[0] or f"node{i}" for i, f in enumerate(found)]
            shard_map = (spec.shard_map if spec is not None
                         else ShardMap.balanced(self._shard_count, names))
            for (_, dsn, _, _), node_name in zip(found, names, strict=True):
                with self._connect_retrying(dsn, node_name) as conn:
                    init_node(conn, node_name, shard_map)
                    if has_citus(conn):
                        distribute(conn)
                        self._citus = True
            return [NodeSpec(n, "", 0, dsn) for (_, dsn, _, _), n in
                    zip(found, names, strict=True)], shard_map
        if len(maps) != len(found):
            missing = [f[1] for f in found if f[3] is None]
            raise RoutingError("some nodes are not initialised (no shard map): "
                               f"{[redact(m) for m in missing]}")
        shard_map = max(maps, key=lambda m: m.epoch)
        nodes = [NodeSpec(str(f[2]), "", 0, f[1]) for f in found]
        given = {n.name for n in nodes}
        missing_nodes = sorted(set(shard_map.placement) - given)
        if missing_nodes:
            raise RoutingError(f"the shard map places shards on node(s) {missing_nodes}, "
                               f"but only {sorted(given)} were given")
        return nodes, shard_map

    async def refresh_shard_map(self) -> bool:
        """Re-read the shard map from every node and adopt the newest (highest epoch);
        True when it changed. Called after a shard move is noticed (a refused write, a
        row not found) and periodically by workers."""
        best: ShardMap | None = None
        for node in list(self.driver.nodes.values()):
            try:
                # cheap check first: the full map only when a node has a newer one
                row = await self.driver.fetchrow(node, "shard_map_epoch", patience=BACKGROUND)
                if row is None or int(row["epoch"]) <= self.shard_map.epoch:
                    continue
                rows = await self.driver.fetch(node, "read_shard_map", patience=BACKGROUND)
            except ShardflowError:
                continue
            if not rows:
                continue
            m = ShardMap(len(rows), tuple(r["node"] for r in rows),
                         max(int(r["epoch"]) for r in rows))
            if best is None or m.epoch > best.epoch:
                best = m
        if best is None or best.epoch <= self.shard_map.epoch:
            return False
        self.shard_map = best
        self.driver.shard_map = best
        return True

    async def tenant_row(self, tenant: str, query: str, *args: Any) -> Any:
        """One row of ``query`` ($1 tenant, $2 shard, ...) from the tenant's node. No row
        may mean the shard just moved: re-read the map and ask the new node."""
        shard = self._route(tenant)
        node = self.driver.node_for_shard(shard)
        row = await self.driver.fetchrow(node, query, tenant, shard, *args)
        if row is None:
            await self.refresh_shard_map()
            if self.driver.node_for_shard(shard) is not node:
                row = await self.tenant_row(tenant, query, *args)
        return row

    # -- starting --------------------------------------------------------------------

    def _resolve(self, workflow: Callable[..., Any] | str) -> _Registered:
        name = workflow if isinstance(workflow, str) else getattr(
            workflow, "__shardflow_name__", None)
        if name is None:
            raise UnknownWorkflowName(
                f"{getattr(workflow, '__qualname__', workflow)!r} is not a registered "
                "workflow: decorate it with @engine.workflow()")
        reg = self._workflows.get(name)
        if reg is None:
            raise UnknownWorkflowName(f"no workflow named {name!r} is registered with this "
                                      f"engine (registered: {self.workflow_names})")
        return reg

    async def start(
        self,
        workflow: Callable[..., Any] | str,
        *args: Any,
        tenant: str | None = None,
        workflow_id: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
        delay: float = 0.0,
        **kwargs: Any,
    ) -> WorkflowHandle:
        """Start a workflow; returns once its row is committed (durable).

        Starting an existing (tenant, workflow_id) returns the existing workflow's handle
        and never runs it twice. Inside a workflow this starts a child in the same
        tenant, exactly once.
        """
        self._require_open()
        reg = self._resolve(workflow)
        ctx = context.current()
        if ctx is not None and tenant is not None and tenant != ctx.tenant:
            raise InvalidArgument(f"a child workflow runs in its parent's tenant "
                                  f"{ctx.tenant!r}, not {tenant!r}")
        if ctx is None and tenant is None:
            tenant = self.tenant
        if ctx is None and tenant is None:
            raise InvalidArgument("tenant is required to start a workflow")
        tenant_id = validate_tenant(ctx.tenant if ctx is not None else tenant)
        self._route(tenant_id)  # a tenant-bound engine refuses other tenants here
        if workflow_id is not None:
            _validate_id(workflow_id, "workflow_id")
        if timeout is not None:
            timeout = checks.seconds(timeout, "timeout", zero_ok=False)
        delay = checks.seconds(delay, "delay")
        q = self._start_queue(reg, queue, priority)
        inputs = dump_args(args, kwargs, workflow=reg.name,
                           max_bytes=self.config.max_payload_bytes)
        if ctx is not None:
            child_id = await ctx.start_child(reg.name, inputs, workflow_id, q, priority, timeout)
            return WorkflowHandle(self, tenant_id, child_id)
        wf_id = workflow_id or str(uuid.uuid4())
        shard = self.shard_map.shard(tenant_id)
        for attempt in (1, 2):
            routed = self.driver.node_for_shard(shard)
            try:
                batcher = self._start_batcher(routed)
                if batcher is not None:
                    inserted = await batcher.start((
                        tenant_id, shard, wf_id, reg.name, q, priority, inputs,
                        self.max_attempts_of(reg.name), timeout,
                        float(delay)))
                else:
                    inserted = await self.driver.insert_workflow(
                        tenant=tenant_id, shard=shard, workflow_id=wf_id, name=reg.name,
                        queue=q, priority=priority, inputs=inputs, parent_id=None,
                        max_attempts=self.max_attempts_of(reg.name),
                        timeout=timeout, delay=float(delay), notify=self.config.notify,
                    )
                break
            except DatabaseError:
                # the shard may have moved: a stale map's write is refused by the old
                # node. The insert is idempotent, so retrying on the new node is safe.
                await self.refresh_shard_map()
                if attempt == 2 or self.driver.node_for_shard(shard) is routed:
                    raise
        if not inserted:
            info = await self.get_info(tenant_id, wf_id)
            if info["name"] != reg.name:
                raise InvalidArgument(
                    f"workflow_id {wf_id!r} of tenant {tenant_id!r} is already used by a "
                    f"{info['name']!r} workflow, not {reg.name!r}")
        else:
            self.metrics["started"] += 1
            self.wake_workers(shard)
        return WorkflowHandle(self, tenant_id, wf_id)

    async def start_many(self, workflow: Callable[..., Any] | str, starts: Iterable[Start],
                         *, queue: str | None = None, priority: int = 0,
                         chunk: int = 2000) -> list[WorkflowHandle]:
        """Start many workflows at once: rows grouped by node and written ``chunk`` per
        statement, the nodes in parallel. Returns when every row is committed; handles
        in the order given. Every start is checked before anything is written (a bad
        one is named by its position and tenant). Existing (tenant, id) pairs are kept
        and not run twice, as with :meth:`start`."""
        self._require_open()
        if context.current() is not None:
            raise InvalidArgument("start_many cannot be called inside a workflow: start "
                                  "children one by one with engine.start")
        reg = self._resolve(workflow)
        q = self._start_queue(reg, queue, priority)
        if not isinstance(chunk, int) or chunk < 1:
            raise InvalidArgument(f"chunk must be an int >= 1, got {chunk!r}")
        max_attempts = self.max_attempts_of(reg.name)
        handles: list[WorkflowHandle] = []
        per_node: dict[str, list[tuple[Any, ...]]] = {}
        for i, st in enumerate(starts):
            if not isinstance(st, Start):
                raise InvalidArgument(f"starts[{i}] must be a shardflow.Start, got "
                                      f"{type(st).__name__}")
            try:
                tenant_id = validate_tenant(st.tenant)
                self._route(tenant_id)
                if st.workflow_id is not None:
                    _validate_id(st.workflow_id, "workflow_id")
                inputs = dump_args(tuple(st.args), dict(st.kwargs), workflow=reg.name,
                                   max_bytes=self.config.max_payload_bytes)
            except ShardflowError as exc:
                raise type(exc)(f"starts[{i}] (tenant {st.tenant!r}): {exc}") from None
            wf_id = st.workflow_id or str(uuid.uuid4())
            shard = self.shard_map.shard(tenant_id)
            node = self.driver.node_for_shard(shard)
            per_node.setdefault(node.name, []).append((
                tenant_id, shard, wf_id, reg.name, q, priority, inputs, max_attempts, None,
                0.0))
            handles.append(WorkflowHandle(self, tenant_id, wf_id))

        async def write(name: str, rows: list[tuple[Any, ...]]) -> None:
            node = self.driver.nodes[name]
            for k in range(0, len(rows), chunk):
                inserted = await insert_rows(self.driver, node, rows[k:k + chunk],
                                             self.config.notify)
                self.metrics["started"] += len(inserted)

        await asyncio.gather(*(write(n, rows) for n, rows in per_node.items()))
        self.wake_workers()
        return handles

    def _require_open(self) -> None:
        if not self._opened:
            raise InvalidArgument("the engine is not open: use 'async with engine:' "
                                  "or 'await engine.open()'")

    def wake_workers(self, shard: int | None = None) -> None:
        if self._worker is not None:
            self._worker.wake(shard)

    # -- reading ---------------------------------------------------------------------

    def _route(self, tenant: str) -> int:
        tenant = validate_tenant(tenant)
        if self.tenant is not None and tenant != self.tenant:
            raise InvalidArgument(f"this engine is bound to tenant {self.tenant!r}; "
                                  f"{tenant!r} is another tenant")
        return self.shard_map.shard(tenant)

    async def get_info(self, tenant: str, workflow_id: str) -> dict[str, Any]:
        self._require_open()
        self._route(tenant)
        _validate_id(workflow_id, "workflow_id")
        row = await self.tenant_row(tenant, "get_workflow", workflow_id)
        if row is None:
            raise WorkflowNotFound(tenant, workflow_id)
        info = dict(row)
        for k in ("inputs", "output", "error"):
            info[k] = loads(info[k])
        return info

    async def get(self, tenant: str, workflow_id: str) -> WorkflowHandle:
        """A handle on an existing workflow; WorkflowNotFound when there is none."""
        await self.get_info(tenant, workflow_id)
        return WorkflowHandle(self, tenant, workflow_id)

    async def steps(self, tenant: str, workflow_id: str) -> list[dict[str, Any]]:
        self._require_open()
        shard = self._route(tenant)
        await self.get_info(tenant, workflow_id)
        rows = await self.driver.on_shard(shard, "list_steps", tenant, shard, workflow_id)
        out = []
        for r in rows:
            d = dict(r)
            d["output"], d["error"] = loads(d["output"]), loads(d["error"])
            out.append(d)
        return out

    async def list_workflows(self, *, tenant: str | None = None, status: str | None = None,
                             name: str | None = None, limit: int = 100,
                             since: dt.datetime | None = None,
                             until: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Workflows across every node (or the tenant's node), newest first."""
        self._require_open()
        if status is not None and status not in STATUSES:
            raise InvalidArgument(f"status must be one of {', '.join(STATUSES)}; got {status!r}")
        if not isinstance(limit, int) or limit < 1:
            raise InvalidArgument(f"limit must be a positive int, got {limit!r}")
        bounds = []
        for label, when in (("since", since), ("until", until)):
            if when is not None and (not isinstance(when, dt.datetime) or when.tzinfo is None):
                raise InvalidArgument(f"{label} must be a timezone-aware datetime, got {when!r}")
            bounds.append(when.timestamp() if when is not None else None)
        tenant = tenant if tenant is not None else self.tenant
        if tenant is not None:
            validate_tenant(tenant)
            nodes = [self.driver.node_for_shard(self._route(tenant))]
        else:
            nodes = list(self.driver.nodes.values())
        results = await asyncio.gather(*(
            self.driver.fetch(n, "list_workflows", tenant, status, name, limit,
                              self.shard_map.shards_of(n.name), *bounds) for n in nodes))
        rows = [dict(r) for rs in results for r in rs]
        rows.sort(key=lambda r: r["created_at"], reverse=True)
        return rows[:limit]

    async def wait_terminal(self, tenant: str, workflow_id: str,
                            timeout: float | None) -> dict[str, Any]:
        """Poll (or be woken locally) until the workflow ends; its status/output/error."""
        self._require_open()
        if timeout is not None:
            timeout = checks.seconds(timeout, "timeout")
        key = (tenant, workflow_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = 0.01
        while True:
            row = await self.tenant_row(tenant, "get_status", workflow_id)
            if row is None:
                raise WorkflowNotFound(tenant, workflow_id)
            if row["status"] in TERMINAL:
                return {"status": row["status"], "output": loads(row["output"]),
                        "error": loads(row["error"])}
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"workflow {workflow_id!r} of tenant {tenant!r} did not "
                                   f"finish within {timeout}s (status {row['status']})")
            ev = self._done_events.setdefault(key, asyncio.Event())
            wait = delay if deadline is None else min(delay, max(0.0, deadline - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), wait)
            # local completions wake us at once; other processes are polled with backoff
            delay = min(delay * 1.5, 0.5)

    def outcome_value(self, tenant: str, workflow_id: str, outcome: dict[str, Any]) -> Any:
        status = outcome["status"]
        if status == "succeeded":
            return outcome["output"]
        if status == "cancelled":
            raise WorkflowCancelled(tenant, workflow_id, status, outcome["error"])
        if status == "purged":
            raise WorkflowFailed(tenant, workflow_id, status, {
                "type": "Purged", "message": "the workflow finished and retention purged "
                "it: its outcome is no longer kept (its id stays taken for the "
                "idempotency window)"})
        raise WorkflowFailed(tenant, workflow_id, status, outcome["error"])

    def notify_done(self, tenant: str, workflow_id: str) -> None:
        ev = self._done_events.pop((tenant, workflow_id), None)
        if ev is not None:
            ev.set()

    # -- messages and events ---------------------------------------------------------

    def register_waiter(self, ctx: context.WorkflowContext) -> None:
        self._waiters.setdefault(ctx.key, set()).add(ctx)

    def unregister_waiter(self, ctx: context.WorkflowContext) -> None:
        waiters = self._waiters.get(ctx.key)
        if waiters is not None:
            waiters.discard(ctx)
            if not waiters:
                del self._waiters[ctx.key]

    async def send(self, tenant: str, workflow_id: str, topic: str, message: Any, *,
                   idempotency_key: str | None = None, _from_workflow: bool = False) -> None:
        """Send ``message`` to a workflow's ``recv(topic)``. Inside a workflow, exactly
        once; outside, give ``idempotency_key`` to make retries safe."""
        self._require_open()
        ctx = context.current()
        if ctx is not None and not _from_workflow:
            await ctx.send(tenant, workflow_id, topic, message)
            return
        shard = self._route(tenant)
        _validate_id(workflow_id, "workflow_id")
        checks.text(topic, "topic")
        if idempotency_key is not None:
            checks.text(idempotency_key, "idempotency_key", max_len=1000)
        payload = dumps(message, what=f"message to {workflow_id!r} on topic {topic!r}",
                        max_bytes=self.config.max_payload_bytes)
        node = self.driver.node_for_shard(shard)
        async with self.driver.transaction(node) as conn:
            row = await conn.fetchrow(Q["lock_workflow_row"], tenant, shard, workflow_id)
            if row is None or row["status"] == "purged":
                raise WorkflowNotFound(tenant, workflow_id)
            await conn.fetchrow(Q["insert_message"], tenant, shard, workflow_id, topic,
                                payload, idempotency_key)
            await conn.execute(Q["wake_workflow"], tenant, shard, workflow_id)
        for w in self._waiters.get((tenant, workflow_id), ()):
            w.wake.set()
        self.wake_workers()

    async def get_event(self, tenant: str, workflow_id: str, key: str,
                        timeout: float = 0.0) -> Any:
        """The value a workflow published under ``key``; waits up to ``timeout`` for it,
        then returns None."""
        self._require_open()
        shard = self._route(tenant)
        _validate_id(workflow_id, "workflow_id")
        checks.text(key, "event key")
        timeout = checks.seconds(timeout, "timeout")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            row = await self.driver.row_on_shard(shard, "get_event", tenant, shard,
                                                 workflow_id, key)
            if row is not None:
                return loads(row["value"])
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(min(self.config.poll_interval, deadline - loop.time()))

    # -- control ---------------------------------------------------------------------

    async def cancel(self, tenant: str, workflow_id: str, *,
                     reason: str = "cancelled") -> list[str]:
        """Cancel a workflow and its children; returns the ids cancelled."""
        self._require_open()
        shard = self._route(tenant)
        checks.text(reason, "reason", max_len=10_000)
        await self.get_info(tenant, workflow_id)
        rows = await self.driver.on_shard(
            shard, "cancel_tree", tenant, shard, workflow_id,
            dumps({"type": "Cancelled", "message": reason}, what="reason", max_bytes=10_000))
        ids = [r["workflow_id"] for r in rows]
        for wid in ids:
            self.notify_done(tenant, wid)
        if self._worker is not None:
            self._worker.interrupt(tenant, ids)
        return ids

    async def resume(self, tenant: str, workflow_id: str) -> WorkflowHandle:
        """Run a cancelled, failed or dead workflow again from its last checkpoint."""
        self._require_open()
        shard = self._route(tenant)
        await self.get_info(tenant, workflow_id)
        node = self.driver.node_for_shard(shard)
        async with self.driver.transaction(node) as conn:
            rows = await conn.fetch(Q["resume_tree"], tenant, shard, workflow_id,
                                    time.time())
            ids = [r["workflow_id"] for r in rows]
            if ids:
                await conn.execute(Q["resume_failed_steps"], tenant, shard, ids,
                                   [r["step_seq"] for r in rows])
        if not ids:
            info = await self.get_info(tenant, workflow_id)
            if info["status"] == "succeeded":
                raise InvalidArgument(f"workflow {workflow_id!r} of tenant {tenant!r} "
                                      "succeeded; there is nothing to resume (use fork)")
            if info["status"] == "purged":
                raise InvalidArgument(f"workflow {workflow_id!r} of tenant {tenant!r} "
                                      "was purged by retention: nothing is left to resume")
        self.wake_workers()
        return WorkflowHandle(self, tenant, workflow_id)

    async def fork(self, tenant: str, workflow_id: str, *, from_step: int,
                   new_workflow_id: str | None = None) -> WorkflowHandle:
        """A new workflow with the same inputs that replays the checkpoints of steps
        before ``from_step`` and runs the rest again."""
        self._require_open()
        shard = self._route(tenant)
        _validate_id(workflow_id, "workflow_id")
        checks.int32(from_step, "from_step", minimum=0)
        if new_workflow_id is not None:
            _validate_id(new_workflow_id, "new_workflow_id")
        if (await self.get_info(tenant, workflow_id))["status"] == "purged":
            raise InvalidArgument(f"workflow {workflow_id!r} of tenant {tenant!r} was "
                                  "purged by retention: nothing is left to fork")
        new_id = new_workflow_id or f"{workflow_id[:200]}.fork-{uuid.uuid4().hex[:8]}"
        node = self.driver.node_for_shard(shard)
        async with self.driver.transaction(node) as conn:
            forked = await conn.fetchval(Q["fork_workflow"], tenant, shard, workflow_id,
                                         new_id, from_step)
        if not forked:
            # never adopt an existing workflow as the fork: it may be anything
            raise InvalidArgument(f"new_workflow_id {new_id!r} of tenant {tenant!r} is "
                                  "already used by another workflow")
        self.wake_workers()
        return WorkflowHandle(self, tenant, new_id)
