"""Small failure drills under load: the integrity audit must hold (nothing lost, no
transactional step twice). Timings are reported by the drills, never asserted here."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardflow import clusterfile
from shardflow.drill import DRILL_FIELDS
from shardflow.drill import main as drill_main

from .conftest import PerTestDB, make_tempdir

pytestmark = pytest.mark.slow


@pytest.fixture
def drill_dir(db: PerTestDB) -> Iterator[Path]:
    d = make_tempdir("shardflow-drill-")
    clusterfile.save(db.cluster_spec(), d / "cluster.json")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _drill(d: Path, *args: str) -> dict[str, object]:
    code = drill_main([*args, "--cluster-file", str(d / "cluster.json"), "--results-dir",
                       str(d / "results"), "--json", str(d / "drill.json"), "--rate", "25",
                       "--duration", "8", "--fault-at", "3", "--tenants", "20"])
    summary = json.loads((d / "drill.json").read_text())
    assert tuple(summary)[:len(DRILL_FIELDS)] == DRILL_FIELDS
    assert code == 0, summary
    assert summary["integrity_ok"] is True
    assert summary["lost"] == 0 and summary["duplicates_tx"] == 0
    assert summary["acknowledged"] == summary["completed"] == 200
    report = next((d / "results").glob("*-drill-*"))
    assert (report / "drill.json").exists() and "Integrity audit" in (
        report / "report.md").read_text()
    return summary


def test_worker_crash_drill(drill_dir: Path) -> None:
    summary = _drill(drill_dir, "worker-crash", "--kill", "1", "--worker-processes", "2")
    details = summary["details"]
    assert isinstance(details, dict) and len(details["killed_pids"]) == 1
    # every orphan of the dead worker was taken over by the other one
    assert details["orphans_not_resumed"] == 0


@pytest.mark.parametrize("mode", ["drop", "stall"])
def test_network_fault_drill(drill_dir: Path, mode: str) -> None:
    summary = _drill(drill_dir, "network", "--node", "1", "--mode", mode, "--fault-for", "2",
                     "--worker-processes", "2")
    details = summary["details"]
    assert isinstance(details, dict) and details["mode"] == mode


@pytest.mark.parametrize("argv, message", [
    (["worker-crash", "--kill", "3", "--worker-processes", "3"], "would leave no worker"),
    (["network", "--node", "node9"], "is not a node of this cluster"),
    (["worker-crash", "--fault-at", "50", "--duration", "10"], "--fault-at must be inside"),
])
def test_bad_drill_input(argv: list[str], message: str, drill_dir: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    assert drill_main([*argv, "--cluster-file", str(drill_dir / "cluster.json"),
                       "--results-dir", str(drill_dir / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
