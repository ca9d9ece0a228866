"""The chaos drill: a short seeded run under real faults passes its audit, and the audit
itself catches each kind of violation when fed a doctored history or snapshot."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from shardflow import chaos
from shardflow.chaos_audit import (
    DbSnapshot,
    History,
    Invariant,
    SendRecord,
    WfRecord,
    WfRow,
    audit,
    expected_status,
)
from shardflow.chaos_faults import plan_faults
from shardflow.chaos_flows import expected_output
from shardflow.chaos_plan import make_plan

from .conftest import PerTestDB, make_tempdir

T = "tenant-1"


def _clean() -> tuple[History, DbSnapshot]:
    """A history of four workflows and the rows of a run where everything went right."""
    h = History(seed=7, run="r", max_attempts=10)
    db = DbSnapshot()

    def add(rec: WfRecord, status: str, effects: dict[str, int]) -> None:
        rec.acked = True
        h.add(rec)
        known, out = expected_output(rec.ops)
        db.workflows[(T, rec.workflow_id)] = WfRow(
            status, 1, None, out if status == "succeeded" and known else None, 100.0, 101.0)
        for label, n in effects.items():
            db.effects[(T, rec.workflow_id, label)] = n

    add(WfRecord(T, "r-1", "basic", [["tx", "t0", 0], ["ext", "e1", 0, 0]], 0.0),
        "succeeded", {"t0": 1})
    add(WfRecord(T, "r-2", "fails", [["tx", "t0", 0], ["fail", "x"], ["tx", "after", 0]],
                 0.1), "failed", {"t0": 1})
    recv = WfRecord(T, "r-3", "recv", [["tx", "t0", 0], ["recv_loop", "inbox"]], 0.2,
                    sends=[SendRecord("m0", True, acked=True),
                           SendRecord("m1", False, acked=True)])
    add(recv, "succeeded", {"t0": 1, "recv1:m0": 1, "recv2:m1": 1})
    db.recvs[(T, "r-3")] = [{"id": "m0"}, {"id": "m1"}, {"done": True}, None]
    db.workflows[(T, "r-3")].output = {"got": ["m0", "m1"], "extra": None}
    cancel = WfRecord(T, "r-4", "cancel", [["tx", "t0", 0], ["park", "parked"],
                                           ["tx", "after", 0]], 0.3, cancel_acked=True)
    add(cancel, "cancelled", {"t0": 1})
    return h, db


def _failed(invariants: list[Invariant]) -> dict[str, list[str]]:
    return {i.key: i.violations for i in invariants if not i.ok}


def test_audit_passes_a_clean_run() -> None:
    """The baseline: the doctored cases below differ from it by one fact each."""
    h, db = _clean()
    assert _failed(audit(h, db)) == {}


@pytest.mark.parametrize(("doctor", "key", "words"), [
    (lambda h, db: db.workflows.pop((T, "r-1")), "a", "no row"),
    (lambda h, db: db.effects.__setitem__((T, "r-1", "t0"), 2), "b", "applied 2 times"),
    (lambda h, db: db.effects.__setitem__((T, "r-2", "after"), 1), "b", "after the op"),
    (lambda h, db: db.effects.pop((T, "r-1", "t0")), "b", "applied 0x"),
    (lambda h, db: db.recvs[(T, "r-3")].insert(1, {"id": "m0"}), "c", "delivered 2 times"),
    (lambda h, db: db.recvs[(T, "r-3")].__setitem__(3, {"id": "m0"}), "c", "delivered 2"),
    (lambda h, db: db.recvs[(T, "r-3")].pop(0), "c", "never delivered"),
    (lambda h, db: db.messages_left.__setitem__((T, "r-3"), 1), "c", "still queued"),
    (lambda h, db: setattr(db.workflows[(T, "r-2")], "status", "succeeded"), "d",
     "the script implies failed"),
    (lambda h, db: setattr(db.workflows[(T, "r-4")], "status", "succeeded"), "d",
     "implies cancelled"),
    (lambda h, db: setattr(db.workflows[(T, "r-1")], "output", ["t0", "oops"]), "d",
     "differs"),
    (lambda h, db: setattr(db.workflows[(T, "r-1")], "status", "dead"), "e", "dead after"),
    (lambda h, db: setattr(db.workflows[(T, "r-1")], "status", "pending"), "f",
     "still pending"),
    (lambda h, db: h.faults.append({"n": 1, "kind": "kill", "recovered_s": None}), "h",
     "did not resume"),
])
def test_audit_detects_each_violation(doctor: Any, key: str, words: str) -> None:
    """One doctored fact: the audit fails exactly the invariant it breaks, naming it."""
    h, db = _clean()
    doctor(h, db)
    failed = _failed(audit(h, db))
    assert key in failed, failed
    assert any(words in v for v in failed[key]), failed[key]


def test_dead_is_excused_only_when_faults_hit_it_max_attempts_times() -> None:
    """A workflow that many faults struck may die; one no fault touched may not."""
    h, db = _clean()
    db.workflows[(T, "r-2")].status = "dead"
    assert "e" in _failed(audit(h, db))
    h.faults = [{"n": i, "kind": "kill", "t_fault": 100.5, "recovered_s": 1.0}
                for i in range(10)]
    assert "e" not in _failed(audit(copy.deepcopy(h), db))


def test_expectations_follow_the_drivers_actions() -> None:
    """A resumed cancel must succeed; a gate never opened must fail; a timeout cancels."""
    rec = WfRecord(T, "x", "cancel", [["park", "p"], ["tx", "a", 0]], 0.0)
    assert expected_status(rec) is None  # the driver never managed to cancel it
    rec.cancel_acked = True
    assert expected_status(rec) == "cancelled"
    rec.resume_acked = rec.go_sent = True
    assert expected_status(rec) == "succeeded"
    gated = WfRecord(T, "g", "gated", [["gate", "/nope"], ["tx", "a", 0]], 0.0)
    assert expected_status(gated) == "failed"
    gated.resume_acked = True
    assert expected_status(gated) == "succeeded"
    timed = WfRecord(T, "t", "timeout", [["sleep", 30.0]], 0.0, timeout=3.0)
    assert expected_status(timed) == "cancelled"


def test_forks_and_cancelled_trees_are_judged_with_their_children() -> None:
    """A fork of a child must be a new root replaying its prefix; a cancelled parent's
    parked child must be cancelled, and succeed once the parent is resumed."""
    h, db = _clean()
    child_ops = [["tx", "c0", 0], ["ext", "c1", 0, 0], ["tx", "c2", 0]]
    parent = WfRecord(T, "r-5", "parent", [["child", 0, child_ops]], 0.4, acked=True,
                      fork_of="r-5.k0", fork_id="r-5.k0.fork", fork_from=1, fork_acked=True)
    h.add(parent)
    db.workflows[(T, "r-5")] = WfRow("succeeded", 1, None, [["c0", "c1", "c2"]], 100, 101)
    db.workflows[(T, "r-5.k0")] = WfRow("succeeded", 1, "r-5", ["c0", "c1", "c2"], 100, 101)
    db.workflows[(T, "r-5.k0.fork")] = WfRow("succeeded", 1, None, ["c0", "c1", "c2"],
                                             102, 103)
    db.effects.update({(T, "r-5.k0", "c0"): 1, (T, "r-5.k0", "c2"): 1,
                       (T, "r-5.k0.fork", "c2"): 1})
    assert _failed(audit(h, db)) == {}
    db.workflows[(T, "r-5.k0.fork")].parent_id = "r-5"
    db.effects[(T, "r-5.k0.fork", "c0")] = 1  # a replayed step ran again
    failed = _failed(audit(h, db))
    assert "parent_id" in failed["i"][0] and "expected 0" in failed["b"][0]

    h, db = _clean()
    tree = WfRecord(T, "r-6", "cancel", [["child", 0, [["tx", "c0", 0], ["park", "p"],
                                                       ["tx", "c1", 0]]]], 0.5, acked=True,
                    cancel_acked=True)
    h.add(tree)
    db.workflows[(T, "r-6")] = WfRow("cancelled", 1, None, None, 100, 101)
    db.workflows[(T, "r-6.k0")] = WfRow("cancelled", 1, "r-6", None, 100, 101)
    db.effects[(T, "r-6.k0", "c0")] = 1
    assert _failed(audit(h, db)) == {}
    tree.resume_acked = tree.go_sent = True  # resumed: both must now succeed
    failed = _failed(audit(h, db))
    assert any("r-6.k0: ended cancelled, the script implies succeeded" in v
               for v in failed["d"]), failed


def test_same_seed_same_script() -> None:
    """The plan and the fault schedule are functions of the seed."""
    kw: dict[str, Any] = dict(duration=20, rate=10, tenants=5, run="r", gates=Path("/g"))
    a, b = make_plan(3, **kw), make_plan(3, **kw)
    assert [(r.workflow_id, r.kind, r.ops, r.at) for r in a] == [
        (r.workflow_id, r.kind, r.ops, r.at) for r in b]
    assert [r.ops for r in make_plan(4, **kw)] != [r.ops for r in a]
    kinds = ["kill", "stop", "drop"]
    sched = plan_faults(3, kinds, 20)
    assert sched == plan_faults(3, kinds, 20)
    assert {k for _, k, _ in sched} == set(kinds)  # each kind at least once


def test_bad_cli_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Bad options: one line on stderr, exit code 2, nothing started."""
    assert chaos.main(["--faults", "kill,meteor"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "meteor" in err
    assert chaos.main(["--duration", "0"]) == 2
    assert chaos.main(["--workers", "1"]) == 2  # kill/stop need a survivor


@pytest.mark.slow
async def test_short_chaos_run_passes_its_audit(db: PerTestDB) -> None:
    """25 s of seeded load under SIGKILL, SIGSTOP and dropped and stalled connections:
    every invariant holds, and every kind of fault really struck."""
    opts = chaos.ChaosOptions(duration=25, seed=11, workers=3, tenants=8, rate=8,
                              faults=("kill", "stop", "drop", "stall"),
                              drain_timeout=150, fault_gap=(2.5, 4.0))
    work = make_tempdir("shardflow-chaos-test-")
    result = await chaos.run_chaos(opts, db.cluster_spec(), Console(quiet=True), work,
                                   work)
    struck = [f["kind"] for f in result.history.faults if "t_fault" in f]
    for kind in opts.faults:
        assert struck.count(kind) > 0, (kind, result.history.faults)
    assert sum(r.acked for r in result.history.workflows.values()) > 100
    failed = _failed(result.invariants)
    assert failed == {}, {k: v[:10] for k, v in failed.items()}
