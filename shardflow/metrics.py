"""Prometheus metrics of one engine (one process), in a registry of its own.

Counters and gauges are read from the engine at scrape time (no bookkeeping on the hot
path beyond the counters the engine keeps anyway); two histograms are observed where
the work happens: step durations and claim batch sizes. ``Engine.serve_metrics(port)``
(or ``shardflow worker ... --metrics-port P``: process i listens on P + i) serves them
on ``http://127.0.0.1:P/metrics``.

Metrics (all prefixed ``shardflow_``): ``workflows_started_total``,
``workflows_finished_total{status}`` (succeeded, failed, dead), ``workflows_recovered_total``
(taken over from dead workers), ``claims_unreceived_total`` (claimed while the reply was
lost, handed back), ``step_reruns_total`` (non-transactional steps run again after a
crash), ``lease_renewals_total{node}``, ``running_workflows``, ``owned_shards{node}``,
``backlog{node}`` (pending workflows in the shards this worker owns, refreshed every few
seconds), ``step_duration_seconds{kind}``, ``claim_batch_size``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .engine import Engine


class _EngineCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        m = self.engine.metrics
        yield CounterMetricFamily("shardflow_workflows_started",
                                  "Workflows started by this process", value=m["started"])
        finished = CounterMetricFamily("shardflow_workflows_finished",
                                       "Workflows this process finished, by final status",
                                       labels=["status"])
        for status in ("succeeded", "failed", "dead"):
            finished.add_metric([status], m[status])
        yield finished
        yield CounterMetricFamily("shardflow_workflows_recovered",
                                  "Workflows of dead workers put back to pending",
                                  value=m["recovered"])
        yield CounterMetricFamily("shardflow_claims_unreceived",
                                  "Claimed workflows whose claim reply was lost, handed back",
                                  value=m["reconciled"])
        yield CounterMetricFamily("shardflow_step_reruns",
                                  "Non-transactional steps run again after a crash",
                                  value=m["step_reruns"])
        worker: Any = self.engine._worker
        yield GaugeMetricFamily("shardflow_running_workflows",
                                "Workflows running in this process",
                                value=len(worker.running) if worker is not None else 0)
        owned = GaugeMetricFamily("shardflow_owned_shards",
                                  "Shards (Citus: shard placements) this worker polls",
                                  labels=["node"])
        backlog = GaugeMetricFamily("shardflow_backlog",
                                    "Pending workflows in the shards this worker owns",
                                    labels=["node"])
        if worker is not None:
            for node, shards in worker.ownership.owned.items():
                owned.add_metric([node], len(shards))
            for node, n in worker.backlog.items():
                backlog.add_metric([node], n)
        yield owned
        yield backlog


class EngineMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.step_seconds = Histogram(
            "shardflow_step_duration_seconds",
            "Duration of a step's execution, checkpoint included, by kind",
            ["kind"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.claim_batch = Histogram(
            "shardflow_claim_batch_size", "Workflows taken by one claim",
            registry=self.registry, buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.lease_renewals = Counter(
            "shardflow_lease_renewals", "Heartbeats written (one per node per interval)",
            ["node"], registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        self._server: Any = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0: a free port); returns the port."""
        if self._server is None:
            self._server, _thread = start_http_server(port, host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
