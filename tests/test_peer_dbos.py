"""The DBOS peer of the bench (loadtest/peer_dbos.py) runs end to end and audits.

Small on purpose (a two-second closed loop): it checks that the peer run starts its
processes, measures and audits correctly, never how fast DBOS is. Skipped when the
optional ``dbos`` package is not installed.
"""

from __future__ import annotations

import shutil

import pytest

from loadtest.peer_dbos import run_dbos_peer
from shardflow.clusterfile import ClusterSpec
from shardflow.localcluster import LocalCluster

pytest.importorskip("dbos", reason="the DBOS peer needs the optional dbos package "
                                   "(pip install dbos)")


def test_closed_loop_run_completes_every_workflow_once(cluster: ClusterSpec) -> None:
    messages: list[str] = []
    r = run_dbos_peer(admin_dsn=LocalCluster.admin_dsn(cluster.nodes[0].port),
                      duration=2.0, rate=None, concurrency=4, tenants=10, skew="zipf",
                      zipf_s=1.1, steps=3, payload_bytes=64, processes=2,
                      drain_timeout=60.0, progress=messages.append)

    assert r["name"] == "dbos"
    assert r["version"]
    assert r["completed"] == r["started"] == r["rows"] > 0
    assert r["failed"] == r["unfinished"] == r["start_errors"] == r["result_errors"] == 0
    assert r["duplicates"] == 0
    assert r["effect_rows"] == r["completed"]  # every transactional effect applied, once
    lat = r["latency_ms"]
    assert set(lat) == {"p50", "p90", "p99", "p999", "max"}
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert r["workflows_per_sec"] > 0
    assert sum(n for _, n in r["timeline"]) == r["completed"]
    assert "Percentile" in r["hgrm"]
    assert r["wal_bytes_per_workflow"] > 0
    assert r["worker_cpu_us_per_workflow"] > 0
    assert "docs.dbos.dev" in r["config"]
    assert messages[-1] == "done"
    shutil.rmtree(r["log_dir"])  # the children's logs, kept by the bench for inspection


def test_refuses_both_or_neither_load_mode() -> None:
    kw = {"admin_dsn": "postgresql://unused", "duration": 1.0, "tenants": 1,
          "skew": "uniform", "zipf_s": 1.1, "steps": 1, "payload_bytes": 0, "processes": 1}
    with pytest.raises(ValueError, match="exactly one"):
        run_dbos_peer(rate=10.0, concurrency=2, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        run_dbos_peer(rate=None, concurrency=None, **kw)  # type: ignore[arg-type]
