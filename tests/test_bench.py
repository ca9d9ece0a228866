"""The load-test harness runs end to end on a test database and its audit holds.

Small on purpose (a few hundred workflows, one worker process): it checks that the bench
measures and audits correctly, never how fast anything is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from rich.console import Console

from shardflow import clusterfile
from shardflow.bench import SUMMARY_FIELDS, BenchOptions, run_bench
from shardflow.bench import main as bench_main

from .conftest import PerTestDB, make_tempdir
from .flows import FAST


@pytest.fixture
def bench_dir(db: PerTestDB) -> Iterator[Path]:
    d = make_tempdir("shardflow-bench-")
    clusterfile.save(db.cluster_spec(), d / "cluster.json")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _opts(d: Path, **kw: Any) -> BenchOptions:
    base: dict[str, Any] = dict(
        cluster_file=d / "cluster.json", duration=3.0, tenants=20, steps=3,
        payload_bytes=64, worker_processes=1, results_dir=d / "results",
        # the test cluster's fast timings, so start-up and the drain stay short
        engine_config={f.name: getattr(FAST, f.name) for f in dataclasses.fields(FAST)},
        drain_timeout=60.0)
    return BenchOptions(**{**base, **kw})


def _run(opts: BenchOptions) -> dict[str, Any]:
    return run_bench(opts, Console(file=io.StringIO(), width=120))


def test_bench_runs_and_audits(bench_dir: Path) -> None:
    result = _run(_opts(bench_dir, rate=100.0, json_path=bench_dir / "out.json"))
    assert result["audit"]["started"] == 300
    _check(result, bench_dir)
    assert json.loads((bench_dir / "out.json").read_text()) == result["summary"]


def test_closed_loop_with_a_zipf_tenant_mix(bench_dir: Path, db: PerTestDB) -> None:
    result = _run(_opts(bench_dir, concurrency=8, workflows=120, tenants=50, skew="zipf",
                        zipf_s=1.1))
    assert result["audit"]["started"] == 120
    assert result["summary"]["settings"]["bench"]["mode"] == "closed"
    _check(result, bench_dir)
    per_tenant: Counter[str] = Counter()
    for node in db.cluster_spec().nodes:
        with psycopg.connect(node.dsn) as conn:
            per_tenant.update(dict(conn.execute(
                "SELECT tenant_id, count(*) FROM shardflow.workflows "
                "WHERE name = 'bench.flow' GROUP BY tenant_id").fetchall()))
    assert sum(per_tenant.values()) == 120
    # zipf(1.1) over 50 tenants: the first takes ~28% (uniform would give 2%)
    assert per_tenant["bench-t00000"] >= 15, per_tenant.most_common(3)
    assert per_tenant.most_common(1)[0][0] == "bench-t00000"


def test_locust_as_the_load_generator(bench_dir: Path) -> None:
    # not importorskip: importing locust monkey-patches this process with gevent
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install locust)")
    result = _run(_opts(bench_dir, locust_users=3, locust_processes=2, duration=3.0))
    audit = result["audit"]
    assert audit["started"] > 0
    _check(result, bench_dir)
    report_dir = result["report_dir"]
    assert "locust" in (report_dir / "report.md").read_text()
    final = json.loads((report_dir / "locust_final.json").read_text())
    starts = next(e for e in final if e["method"] == "start")
    assert starts["num_requests"] == audit["started"] and starts["num_failures"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--rate", "-5"], "--rate must be > 0"),
    (["--locust-users", "2", "--rate", "5"], "--locust-users is the load"),
    (["--engine-config", "{bad"], "--engine-config is not JSON"),
    (["--engine-config", '{"no_such_setting": 1}'], "no_such_setting"),
    (["--cluster-file", "/nonexistent/cluster.json"], "does not exist"),
    (["--tenants", "0"], "--tenants"),
])
def test_bad_bench_input_is_one_line_and_exit_2(argv: list[str], message: str,
                                                bench_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    if "--cluster-file" not in argv:
        argv = ["--cluster-file", str(bench_dir / "cluster.json"), *argv]
    assert bench_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (bench_dir / "results").exists()  # nothing started, nothing written


def _check(result: dict[str, Any], d: Path) -> None:
    audit = result["audit"]

    assert audit["started"] > 0
    assert audit["completed"] == audit["started"]
    assert audit["duplicates"] == 0
    assert audit["failed"] == 0
    assert audit["effect_keys"] == audit["started"]  # every effect applied, and once
    assert audit["ok"]

    report_dir = result["report_dir"]
    on_disk = json.loads((report_dir / "summary.json").read_text())
    assert tuple(on_disk) == SUMMARY_FIELDS
    assert on_disk == result["summary"]
    assert on_disk["completed"] == audit["started"]
    assert set(on_disk["latency_ms"]) == {"p50", "p90", "p99", "p999", "max"}
    assert set(on_disk["machine"]) == {"cpus", "mem_gb"}
    assert set(on_disk["versions"]) == {"python", "postgres", "shardflow"}
    assert on_disk["settings"]["engine"]["lease_timeout"] == 1.0
    assert on_disk["wal_bytes_per_workflow"] > 0
    assert on_disk["worker_cpu_us_per_workflow"] > 0
    assert (report_dir / "report.md").exists()
    assert (report_dir / "latency_ms.hgrm").read_text().strip()
    assert report_dir.name in (d / "results" / "README.md").read_text()


def test_peer_dbos_runs_the_same_workload(bench_dir: Path) -> None:
    if importlib.util.find_spec("dbos") is None:
        pytest.skip("DBOS Transact is not installed (pip install 'shardflow[peer]')")
    result = _run(_opts(bench_dir, rate=20.0, duration=2.0, peer="dbos"))
    summary = result["summary"]
    peer = summary["peer"]
    assert peer["name"] == "dbos" and peer["version"]
    assert peer["workflows_per_sec"] > 0 and set(peer["latency_ms"]) >= {"p50", "p99"}
    assert summary["ratio"] == round(summary["workflows_per_sec"]
                                     / peer["workflows_per_sec"], 2)
    report_dir = result["report_dir"]
    assert json.loads((report_dir / "summary.json").read_text())["peer"] == peer
    assert "Side by side: DBOS Transact" in (report_dir / "report.md").read_text()
    figures = json.loads((report_dir / "peer_dbos.json").read_text())
    # DBOS's side is audited too: every start completed once, no duplicate effect
    assert figures["completed"] == figures["started"] == 40
    assert figures["duplicates"] == 0 and figures["failed"] == 0


def test_bench_with_retention_counts_purged_workflows(bench_dir: Path) -> None:
    engine = {f.name: getattr(FAST, f.name) for f in dataclasses.fields(FAST)}
    result = _run(_opts(bench_dir, rate=20.0, duration=9.0, retention=5.0,
                        engine_config={**engine, "retention_interval": 0.5}))
    audit = result["audit"]
    assert audit["ok"], audit
    assert audit["started"] == 180 and result["summary"]["completed"] == 180
    assert audit["purged_by_retention"] > 0  # the first seconds' workflows were deleted
    assert audit["effect_keys"] == 180  # and every one ran its transaction once
    report = (result["report_dir"] / "report.md").read_text()
    assert "## Retention" in report
