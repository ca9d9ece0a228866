"""locust users that start shardflow workflows through the psycopg (sync) client.

For teams that already run locust (also its distributed master/worker mode). Each user
starts the benchmark workflow (``loadtest/benchflows.py``) and reports, as one locust
request, the time from its start being committed to its completion being observed.
Workers run separately, e.g.::

    SHARDFLOW_BENCH_CLUSTER=.shardflow/cluster.json \\
        shardflow worker loadtest.benchflows:engine --processes 2
    SHARDFLOW_BENCH_CLUSTER=.shardflow/cluster.json \\
        locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 30s --csv results/locust

Environment: ``SHARDFLOW_BENCH_CLUSTER`` (cluster file), ``SHARDFLOW_LOCUST_TENANTS``
(default 100), ``SHARDFLOW_LOCUST_STEPS`` (3), ``SHARDFLOW_LOCUST_PAYLOAD`` (100 bytes).
The bench (``shardflow bench``) remains the honest instrument: locust's response time
here includes this client's polling delay (up to 0.5 s), the bench's latency does not.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from locust import User, between, events, task

from shardflow.syncclient import SyncClient

CLUSTER = os.environ.get("SHARDFLOW_BENCH_CLUSTER")
TENANTS = int(os.environ.get("SHARDFLOW_LOCUST_TENANTS", "100"))
STEPS = int(os.environ.get("SHARDFLOW_LOCUST_STEPS", "3"))
PAYLOAD = "x" * int(os.environ.get("SHARDFLOW_LOCUST_PAYLOAD", "100"))


class WorkflowUser(User):  # type: ignore[misc]
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.client = SyncClient(cluster_file=CLUSTER)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def start_and_wait(self) -> None:
        tenant = f"locust-{random.randrange(TENANTS)}"
        t0 = time.perf_counter()
        exc: Any = None
        try:
            wid = self.client.start("bench.flow", STEPS, PAYLOAD, tenant=tenant)
            self.client.result(tenant, wid, timeout=120)
        except Exception as e:  # reported to locust, not raised into its loop
            exc = e
        events.request.fire(request_type="workflow", name="bench.flow",
                            response_time=(time.perf_counter() - t0) * 1000,
                            response_length=0, exception=exc, context={})
