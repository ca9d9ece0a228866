"""The load-test harness runs end to end on a test database and its audit holds.

Small on purpose (a few hundred workflows, one worker process): it checks that the bench
measures and audits correctly, never how fast anything is.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from shardflow import clusterfile
from shardflow.bench import SUMMARY_FIELDS, BenchOptions, run_bench

from .conftest import PerTestDB, make_tempdir
from .flows import FAST


def test_bench_runs_and_audits(db: PerTestDB) -> None:
    d = make_tempdir("shardflow-bench-")
    cluster_file = d / "cluster.json"
    clusterfile.save(db.cluster_spec(), cluster_file)
    opts = BenchOptions(
        cluster_file=cluster_file,
        rate=100.0,
        duration=3.0,
        tenants=20,
        steps=3,
        payload_bytes=64,
        worker_processes=1,
        results_dir=d / "results",
        # the test cluster's fast timings, so start-up and the drain stay short
        engine_config={f.name: getattr(FAST, f.name) for f in dataclasses.fields(FAST)},
        drain_timeout=60.0,
    )
    try:
        result = run_bench(opts, Console(file=io.StringIO(), width=120))
        _check(result, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _check(result: dict[str, Any], d: Path) -> None:
    audit = result["audit"]

    assert audit["started"] == 300
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
