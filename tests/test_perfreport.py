"""The performance report's tooling runs end to end on a real cluster: the bench's
``--backlog`` and ``--profile``, and ``python -m loadtest.perfreport --quick``.

Toy sizes on purpose: these check that the figures are produced, sane and audited, never
how fast anything is.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from rich.console import Console

from loadtest.perfreport import Run, knee
from loadtest.perfreport import main as perfreport_main
from shardflow import clusterfile
from shardflow.bench import BenchOptions, run_bench
from shardflow.bench import main as bench_main

from .conftest import ROOT, PerTestDB, make_tempdir
from .flows import FAST

FAST_CONFIG = {f.name: getattr(FAST, f.name) for f in dataclasses.fields(FAST)}
PNGS = ("throughput_vs_workers.png", "throughput_vs_tenants.png",
        "throughput_vs_backlog.png", "latency_vs_rate.png", "cost_per_workflow.png")


@pytest.fixture
def bench_dir(db: PerTestDB) -> Iterator[Path]:
    d = make_tempdir("shardflow-perf-")
    clusterfile.save(db.cluster_spec(), d / "cluster.json")
    # as `shardflow cluster up` does (the test template lacks it): statements per
    # workflow and the Postgres profile read it
    db.run_all("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_backlog_run_completes_with_the_audit_ok(bench_dir: Path, db: PerTestDB) -> None:
    """--backlog 1000 preloads 1,000 pending bl- rows on their tenants' nodes; the run's
    own workflows still pass the audit, and the summary counts the backlog apart."""
    opts = BenchOptions(cluster_file=bench_dir / "cluster.json", rate=40.0, duration=2.0,
                        tenants=30, steps=3, payload_bytes=64, worker_processes=1,
                        results_dir=bench_dir / "results", engine_config=FAST_CONFIG,
                        drain_timeout=60.0, backlog=1000, profile=True)
    result = run_bench(opts, Console(file=io.StringIO(), width=120))
    audit, summary = result["audit"], result["summary"]
    assert audit["ok"], audit
    assert audit["started"] == audit["completed"] == audit["rows"] == 80
    assert summary["backlog"] == 1000
    assert summary["completed_per_sec_all"] >= summary["workflows_per_sec"] > 0
    assert summary["backlog_completed_in_window"] >= 0
    assert summary["db_cpu_us_per_workflow"] and summary["db_cpu_us_per_workflow"] > 0

    # every backlog row sits on the node and in the shard of its tenant, once
    run_id = result["run_id"]
    ids: list[str] = []
    for node in db.cluster_spec().nodes:
        with psycopg.connect(node.dsn) as conn:
            rows = conn.execute(
                "SELECT workflow_id, tenant_id, shard_id, priority, inputs->'args' "
                "FROM shardflow.workflows WHERE workflow_id LIKE %s",
                (f"bl-{run_id}-%",)).fetchall()
        for wid, tenant, shard, priority, args in rows:
            assert db.node_of_tenant(tenant) == node.name
            assert shard == db.spec.shard_map.shard(tenant)
            assert priority == -1 and args[0] == 3 and len(args[1]) == 64
            ids.append(wid)
    assert sorted(ids) == sorted(f"bl-{run_id}-{g}" for g in range(1000))

    report_dir = result["report_dir"]
    text = (report_dir / "report.md").read_text()
    assert "## Backlog" in text and "## Profile" in text
    pg = (report_dir / "profile-postgres.txt").read_text()
    assert "calls/wf" in pg and "µs/wf" in pg
    if (report_dir / "profile-worker.txt").exists():  # py-spy may not be allowed to ptrace
        assert "by own time" in (report_dir / "profile-worker.txt").read_text()
    else:
        assert "No worker profile" in text


@pytest.mark.parametrize("argv, message", [
    (["--backlog", "-1"], "--backlog must be >= 0"),
    (["--backlog", "10", "--retention", "5"], "--backlog cannot be combined"),
    (["--backlog", "10", "--locust-users", "2"], "--backlog cannot be combined"),
])
def test_bad_backlog_is_one_line_and_exit_2(argv: list[str], message: str, bench_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--cluster-file", str(bench_dir / "cluster.json"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (bench_dir / "results").exists()  # nothing started, nothing written


def test_bad_perfreport_input_is_one_line_and_exit_2(
        bench_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--cluster-file", str(bench_dir / "cluster.json"), "--out",
            str(bench_dir / "out"), "--max-backlog", "-5", "--skip-peer"]
    assert perfreport_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-backlog must be >= 0" in err, err
    assert not (bench_dir / "out").exists()



@pytest.mark.parametrize(("argv", "message"), [
    (["--shards", "4,x"], "--shards must be comma-separated integers, got '4,x'"),
    (["--shards", "2,16"], "every count must be >= --nodes (4)"),
    (["--shards", "16", "--workflows", "0"], "must be positive"),
])
def test_bad_shardsweep_input_is_one_line_and_exit_2(
        argv: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.shardsweep import main as shardsweep_main

    assert shardsweep_main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()  # no cluster started, nothing written

def _run(name: str, offered: float, done: float, p99: float) -> Run:
    summary = {"workflows_per_sec": done, "latency_ms": {"p99": p99},
               "settings": {"bench": {"rate": offered}}}
    return Run(name=name, purpose="", args=[], exit_code=0, summary=summary)


def test_the_knee_is_the_last_rate_before_the_first_miss() -> None:
    """Kept up (>= 95% completed) with p99 within 10x the lowest rate's, in rate order."""
    runs = [_run("a", 10, 10, 20), _run("b", 50, 49, 150), _run("c", 80, 79, 199),
            _run("d", 90, 80, 150), _run("e", 100, 99, 100)]
    k, rule = knee(runs)
    assert k is not None and k.name == "c"  # d fell behind; e after it does not count
    assert "20.0 ms" in rule
    k, _ = knee([_run("a", 10, 10, 20), _run("b", 50, 50, 201)])
    assert k is not None and k.name == "a"  # p99 over 10x
    assert knee([_run("a", 10, 5, 20)])[0] is None


def test_quick_report_end_to_end(bench_dir: Path) -> None:
    """--quick --skip-peer writes every PNG, report.md and perf.json with sane figures."""
    out = bench_dir / "perf"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.perfreport", "--cluster-file",
         str(bench_dir / "cluster.json"), "--out", str(out), "--quick", "--skip-peer",
         "--engine-config", json.dumps(FAST_CONFIG)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for png in PNGS:
        assert (out / png).stat().st_size > 10_000, png
        assert f"]({png})" in report
    assert not (out / "dbos_comparison.png").exists()
    for section in ("## Capacity model", "### Worked example: 100 nodes", "## All runs",
                    "## Commands", "## Machine, versions, settings", "Knee: "):
        assert section in report, section

    perf: dict[str, Any] = json.loads((out / "perf.json").read_text())
    runs = {r["name"]: r for r in perf["runs"]}
    assert set(runs) >= {"workers-1", "workers-2", "tenants-10", "backlog-1000",
                         "rate-25pct", "rate-50pct", "rate-90pct"}
    for r in perf["runs"]:
        s = r["summary"]
        assert r["exit_code"] == 0, r  # the bench's audit passed
        assert s["workflows_per_sec"] > 0 and s["completed"] > 0
        assert s["failed"] == 0 and s["duplicates"] == 0
        assert s["latency_ms"]["p99"] >= s["latency_ms"]["p50"] > 0
        assert r["command"].startswith("python -m shardflow.bench ") and r["command"] in report
    assert runs["backlog-1000"]["summary"]["backlog"] == 1000
    assert (runs["backlog-1000"]["summary"]["completed_per_sec_all"]
            >= runs["backlog-1000"]["summary"]["workflows_per_sec"])
    assert runs["workers-2"]["summary"]["backlog"] == 0
    assert runs["tenants-10"]["summary"]["tenants"] == 10
    assert perf["maximum_workflows_per_sec"] == runs["workers-2"]["summary"]["workflows_per_sec"]
    rates = [runs[n]["summary"]["settings"]["bench"]["rate"]
             for n in ("rate-25pct", "rate-50pct", "rate-90pct")]
    assert rates == sorted(rates) and rates[0] > 0
    cap = perf["capacity"]
    assert cap["reference_run"] == "rate-50pct"
    assert cap["workflows_per_sec_per_pg_core"] > 0
    assert cap["example"]["cluster_rate"] > 0
    # the half-max run also profiled (--quick puts --profile on it)
    assert list(out.glob("runs/*-perf-rate-50pct/profile-postgres.txt"))
