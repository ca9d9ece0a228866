"""locust users that start shardflow workflows through the psycopg (sync) client.

For teams that already run locust, including its distributed master/worker mode. Each
user, in a loop, starts the benchmark workflow (``loadtest/benchflows.py``) and waits
for it. Two request types reach locust's statistics: ``start`` (the start committed:
durable) and ``workflow`` (start to completion observed, including this client's
polling delay of up to 0.5 s).

The usual way to run it is through the bench, which starts the shardflow workers,
shows the live dashboard, audits every workflow and writes the report in the same format
as every other run (latency from the database's commit timestamps, not locust's)::

    shardflow bench --locust-users 20 --duration 30 --tenants 1000
    shardflow bench --locust-users 40 --locust-processes 2 ...    # master + 2 workers
    shardflow bench --locust-users 40 --locust-expect-workers 3 ...  # workers elsewhere:
        # on each other machine, with the same environment:
        # locust -f loadtest/locustfile.py --worker --master-host <bench host>

It also runs on its own (workers started separately)::

    SHARDFLOW_BENCH_CLUSTER=.shardflow/cluster.json \\
        shardflow worker loadtest.benchflows:engine --processes 2
    SHARDFLOW_BENCH_CLUSTER=.shardflow/cluster.json \\
        locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 30s --csv results/locust

Environment (the bench sets it): ``SHARDFLOW_BENCH_CLUSTER`` (cluster file),
``SHARDFLOW_LOCUST_RUN`` (workflow id prefix: the run the bench audits),
``SHARDFLOW_LOCUST_TENANTS`` (default 100), ``SHARDFLOW_LOCUST_SKEW`` (uniform or
zipf:<s>), ``SHARDFLOW_LOCUST_STEPS`` (3), ``SHARDFLOW_LOCUST_PAYLOAD`` (100 bytes).
"""

from __future__ import annotations

import itertools
import os
import random
import time
import uuid
from typing import Any

from locust import User, between, events, task

from shardflow.syncclient import SyncClient

CLUSTER = os.environ.get("SHARDFLOW_BENCH_CLUSTER")
RUN = os.environ.get("SHARDFLOW_LOCUST_RUN") or "locust-" + uuid.uuid4().hex[:8]
TENANTS = int(os.environ.get("SHARDFLOW_LOCUST_TENANTS", "100"))
SKEW = os.environ.get("SHARDFLOW_LOCUST_SKEW", "uniform")
STEPS = int(os.environ.get("SHARDFLOW_LOCUST_STEPS", "3"))
PAYLOAD_BYTES = int(os.environ.get("SHARDFLOW_LOCUST_PAYLOAD", "100"))

# the same tenant names and mix as the bench's own load generator
_TENANT_NAMES = [f"bench-t{i:05d}" for i in range(TENANTS)]
_ZIPF_S = float(SKEW.split(":", 1)[1]) if SKEW.startswith("zipf:") else None
_CUM = list(itertools.accumulate(
    1.0 / (k + 1) ** _ZIPF_S if _ZIPF_S is not None else 1.0 for k in range(TENANTS)))
_PAYLOAD = random.Random(1).randbytes(PAYLOAD_BYTES).hex()[:PAYLOAD_BYTES]


def _fire(kind: str, t0: float, exc: BaseException | None) -> None:
    events.request.fire(request_type=kind, name="bench.flow",
                        response_time=(time.perf_counter() - t0) * 1000,
                        response_length=0, exception=exc, context={})


class WorkflowUser(User):  # type: ignore[misc]
    wait_time = between(0.0, 0.01)

    def on_start(self) -> None:
        self.client = SyncClient(cluster_file=CLUSTER)
        # workflow ids unique per user: with --processes locust forks after this module
        # is imported, so nothing module-level may tell processes apart
        self.tag = uuid.uuid4().hex[:8]
        self.seq = itertools.count()

    def on_stop(self) -> None:
        self.client.close()

    @task
    def start_and_wait(self) -> None:
        tenant = random.choices(_TENANT_NAMES, cum_weights=_CUM)[0]
        wid = f"{RUN}-{self.tag}-{next(self.seq)}"
        t0 = time.perf_counter()
        try:
            self.client.start("bench.flow", STEPS, _PAYLOAD, tenant=tenant, workflow_id=wid)
        except Exception as exc:  # reported to locust, not raised into its loop
            _fire("start", t0, exc)
            return
        _fire("start", t0, None)
        err: Any = None
        try:
            self.client.result(tenant, wid, timeout=120)
        except Exception as exc:
            err = exc
        _fire("workflow", t0, err)
