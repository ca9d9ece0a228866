"""The audit of ``shardflow drill chaos``: every invariant, from the history and the rows.

:func:`audit` is a pure function of the run's :class:`History` (what the driver planned,
what it started and was told was durable, what it sent, cancelled, resumed and forked,
the faults it injected) and a :class:`DbSnapshot` (plain rows read from every node after
the drain), so a test can feed it a doctored history or snapshot and see it report the
violation. What each workflow must look like follows from its script and from what the
driver did to it (:func:`stop_index`), never from what the engine says happened.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from .chaos_flows import EXT_RETRIES, child_ids, expected_output

TERMINAL = ("succeeded", "failed", "cancelled", "dead")


@dataclass
class SendRecord:
    """One message the driver sent to a receiver (``recv_loop``)."""

    msg_id: str
    keyed: bool
    acked: bool = False  # the send returned (for keyed sends: after retries)
    errors: int = 0
    retried_after_consumed: bool = False  # sent again, same key, once it was received


@dataclass
class WfRecord:
    """One top-level workflow: its plan and everything the driver did to it."""

    tenant: str
    workflow_id: str
    kind: str
    ops: list[Any]
    at: float  # planned start, seconds into the load
    queue: str | None = None
    timeout: float | None = None
    plan_cancel: bool = False
    plan_resume: bool = False
    acked: bool = False
    start_errors: int = 0
    t_ack: float | None = None
    cancel_acked: bool | None = None  # None: not attempted
    resume_acked: bool | None = None
    go_sent: bool = False
    gate_opened: bool = False
    fork_of: str | None = None  # the workflow forked (None: this one; or a child)
    fork_id: str | None = None
    fork_from: int | None = None
    fork_acked: bool | None = None
    sends: list[SendRecord] = field(default_factory=list)
    senders: list[str] = field(default_factory=list)  # sender workflows' ids (same tenant)
    events_read: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # driver-side errors, for the report


@dataclass
class History:
    seed: int
    run: str  # every workflow id of the run starts with it
    max_attempts: int
    workflows: dict[str, WfRecord] = field(default_factory=dict)  # "tenant/id" -> record
    faults: list[dict[str, Any]] = field(default_factory=list)
    queue_running_max: int = 0  # most chaos-limited workflows seen running at once
    queue_limit: int = 0
    nodes: int = 1

    def add(self, rec: WfRecord) -> None:
        self.workflows[f"{rec.tenant}/{rec.workflow_id}"] = rec


@dataclass
class WfRow:
    status: str
    attempts: int
    parent_id: str | None
    output: Any
    created_at: float
    finished_at: float | None


@dataclass
class DbSnapshot:
    """Rows of the run read after the drain, keyed by (tenant, workflow_id)."""

    workflows: dict[tuple[str, str], WfRow] = field(default_factory=dict)
    effects: dict[tuple[str, str, str], int] = field(default_factory=dict)  # + label
    recvs: dict[tuple[str, str], list[Any]] = field(default_factory=dict)  # messages, seq order
    messages_left: dict[tuple[str, str], int] = field(default_factory=dict)
    step_reruns: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class Invariant:
    key: str
    title: str
    ok: bool
    checked: int
    violations: list[str] = field(default_factory=list)
    figure: Any = None  # the count an informational invariant reports


def stop_index(rec: WfRecord) -> tuple[int | None, bool]:
    """``(index, strict)``: the op at which the workflow must have stopped given what
    the driver did (None: it runs to the end), and whether the transactional ops before
    it must have applied exactly once (strict) or at most once (a timeout may strike
    before them)."""
    for i, op in enumerate(rec.ops):
        if op[0] == "fail" or (op[0] == "ext" and op[2] > EXT_RETRIES):
            return i, True
        if op[0] in ("gate", "ext_gate") and not rec.resume_acked:
            return i, True
        if _parks(op) and not (rec.resume_acked and rec.go_sent):
            return i, True
        if op[0] == "sleep" and rec.timeout is not None and op[1] > rec.timeout:
            return i, False
    return None, True


def _parks(op: list[Any]) -> bool:
    """The op waits for the driver's "go" (itself, or a child that does)."""
    return op[0] == "park" or (op[0] == "child" and any(_parks(o) for o in op[2]))


def expected_status(rec: WfRecord) -> str | None:
    """The terminal status the script and the driver's actions imply (None: unknown,
    because the driver never managed the action the script needs)."""
    if rec.kind == "cancel":
        if not rec.cancel_acked:
            return None
        return "succeeded" if rec.resume_acked and rec.go_sent else "cancelled"
    stop, _ = stop_index(rec)
    if stop is None:
        return "succeeded"
    op = rec.ops[stop][0]
    if op == "sleep":
        return "cancelled"  # timed out
    if op in ("park", "child"):
        return "cancelled"
    return "failed"


def _tx_labels(ops: list[Any]) -> list[tuple[int, str]]:
    return [(i, op[1]) for i, op in enumerate(ops) if op[0] in ("tx", "txc")]


def positions(ops: list[Any]) -> list[int]:
    """The checkpoint position of each op of a flat script (tx, ext, sleep, event, send
    take one each), as the interpreter numbers them."""
    out, seq = [], 0
    for op in ops:
        out.append(seq)
        seq += {"child": 2, "park": 2, "fail": 0, "gate": 0}.get(op[0], 1)
    return out


def _faults_during(history: History, row: WfRow) -> int:
    end = row.finished_at if row.finished_at is not None else float("inf")
    return sum(1 for f in history.faults if row.created_at <= f.get("t_fault", 0.0) <= end)


def audit(history: History, db: DbSnapshot) -> list[Invariant]:
    """Every invariant of the chaos drill, each with its violations named."""
    a = Invariant("a", "no acknowledged start lost", True, 0)
    b = Invariant("b", "transactional effects exactly once", True, 0)
    c = Invariant("c", "messages delivered exactly once", True, 0)
    d = Invariant("d", "terminal state as scripted", True, 0)
    e = Invariant("e", "none dead unless its code failed max_attempts times", True, 0)
    f = Invariant("f", "nothing pending or running after the drain", True, 0)
    g = Invariant("g", "external step re-runs (counted, allowed)", True, 0)
    h = Invariant("h", "every fault recovered from", True, 0)
    i_ = Invariant("i", "forks are new top-level workflows, replaying their prefix", True, 0)

    # (b) first, globally: no (workflow, label) ever applied twice
    for (t, w, label), n in sorted(db.effects.items()):
        b.checked += 1
        if n > 1:
            b.violations.append(f"{t}/{w}: effect {label!r} applied {n} times")

    def check_labels(t: str, w: str, ops: list[Any], stop: int | None, strict: bool,
                     status: str | None) -> None:
        if status not in TERMINAL:
            return  # (f) reports it; its effects are not final
        for idx, label in _tx_labels(ops):
            n = db.effects.get((t, w, label), 0)
            if stop is not None and idx >= stop:
                if n:
                    b.violations.append(f"{t}/{w}: effect {label!r} applied {n}x after the "
                                        f"op where the script stops (op {stop})")
            elif (status == "succeeded" or (stop is not None and strict)) and n != 1:
                b.violations.append(f"{t}/{w}: effect {label!r} applied {n}x, not once")

    def check_wf(t: str, w: str, ops: list[Any], want: str | None, rec: WfRecord | None
                 ) -> WfRow | None:
        row = db.workflows.get((t, w))
        d.checked += 1
        if row is None:
            return None
        if want is None:
            d.violations.append(f"{t}/{w}: the driver could not do what the script needs "
                                f"({'; '.join(rec.notes[-2:]) if rec else '?'}); ended "
                                f"{row.status}")
        elif row.status != want and row.status in ("succeeded", "failed", "cancelled"):
            # (dead is judged by (e), which knows how many faults struck it)
            d.violations.append(f"{t}/{w}: ended {row.status}, the script implies {want}")
        elif row.status == "succeeded":
            known, out = expected_output(ops)
            if known and row.output != out:
                d.violations.append(f"{t}/{w}: result {row.output!r} differs from the "
                                    f"script's {out!r}")
        return row

    for rec in history.workflows.values():
        t, w = rec.tenant, rec.workflow_id
        if rec.acked:
            a.checked += 1
            if (t, w) not in db.workflows:
                a.violations.append(f"{t}/{w}: start acknowledged at {rec.t_ack}, no row")
                continue
        elif (t, w) not in db.workflows:
            continue  # never acknowledged and not there: allowed
        want = expected_status(rec)
        row = check_wf(t, w, rec.ops, want, rec)
        stop, strict = stop_index(rec)
        check_labels(t, w, rec.ops, stop, strict, row.status if row else None)
        # children: each exactly as its parent's script says (they run to the end)
        for cid, cops in child_ids(w, rec.ops):
            # a child shares its parent's fate when the driver acted on the parent (a
            # cancel cancels the tree, a resume resumes it); a child that waits for "go"
            # is judged like a parked workflow; other children of a parent that was
            # stopped may have ended either way, (f) still checks that they ended
            crec = dataclasses.replace(rec, workflow_id=cid, ops=cops, kind="child")
            cstop, cstrict = stop_index(crec)
            cwant: str | None
            if want in ("succeeded", "cancelled") and (want == "succeeded"
                                                       or any(_parks(o) for o in cops)):
                cwant = want
            else:
                cwant = crow_status(db, t, cid)
            crow = check_wf(t, cid, cops, cwant, None)
            if crow is None and row is not None and row.status == "succeeded":
                d.violations.append(f"{t}/{cid}: the child of a succeeded parent is missing")
            check_labels(t, cid, cops, cstop, cstrict, crow.status if crow else None)
        for key, value in rec.events_read.items():
            d.checked += 1
            wanted = next((op[2] for op in rec.ops if op[0] == "event" and op[1] == key),
                          None)
            if value != wanted:
                d.violations.append(f"{t}/{w}: get_event({key!r}) read {value!r}, the "
                                    f"workflow set {wanted!r}")
        if any(op[0] == "recv_loop" for op in rec.ops):
            _check_messages(history, db, rec, c)
        if rec.fork_id is not None and rec.fork_acked:
            _check_fork(db, rec, i_, b, d)

    # (e), (f), (g) over every row of the run, children and forks included
    for (t, w), row in sorted(db.workflows.items()):
        e.checked += 1
        f.checked += 1
        if row.status == "dead":
            hits = _faults_during(history, row)
            if hits < history.max_attempts:
                e.violations.append(f"{t}/{w}: dead after {row.attempts} attempts; only "
                                    f"{hits} faults struck while it ran and its code "
                                    f"fails at most once per claim")
        if row.status in ("pending", "running"):
            f.violations.append(f"{t}/{w}: still {row.status} after the drain "
                                f"(attempts {row.attempts})")
    g.figure = sum(db.step_reruns.values())
    g.checked = len(db.step_reruns)
    for fault in history.faults:
        h.checked += 1
        if fault.get("recovered_s") is None and not fault.get("idle"):
            h.violations.append(f"fault {fault.get('n')} {fault.get('kind')} at "
                                f"{fault.get('at_s')}s: work did not resume within "
                                f"{fault.get('bound_s')}s ({fault.get('detail', '')})")
    out = [a, b, c, d, e, f, g, h, i_]
    for inv in out:
        inv.ok = not inv.violations
    return out


def crow_status(db: DbSnapshot, t: str, w: str) -> str | None:
    row = db.workflows.get((t, w))
    return row.status if row else None


def _check_messages(history: History, db: DbSnapshot, rec: WfRecord, c: Invariant) -> None:
    t, w = rec.tenant, rec.workflow_id
    got = db.recvs.get((t, w), [])
    # the loop's receipts up to {"done": true}, then one recv(topic, 0) that must find
    # nothing: a message there is a duplicate, counted with the others below
    done = next((k for k, m in enumerate(got) if isinstance(m, dict) and m.get("done")),
                len(got))
    timeouts = sum(1 for m in got[:done] if m is None)
    ids = [m["id"] for m in got if isinstance(m, dict) and "id" in m]
    exact = {s.msg_id for s in rec.sends if s.acked}
    maybe = {s.msg_id for s in rec.sends if not s.acked}
    for sid in rec.senders:
        srow = db.workflows.get((t, sid))
        srec = history.workflows.get(f"{t}/{sid}")
        sent = [op[4]["id"] for op in (srec.ops if srec else []) if op[0] == "send"]
        (exact if srow is not None and srow.status == "succeeded" else maybe).update(sent)
    c.checked += len(exact) + len(maybe)
    counts: dict[str, int] = {}
    for m in ids:
        counts[m] = counts.get(m, 0) + 1
    for m, n in sorted(counts.items()):
        if m not in exact and m not in maybe:
            c.violations.append(f"{t}/{w}: received {m!r}, which nobody sent")
        elif n > 1:
            c.violations.append(f"{t}/{w}: message {m!r} delivered {n} times")
    row = db.workflows.get((t, w))
    if row is not None and row.status == "succeeded":
        for m in sorted(exact - set(counts)):
            c.violations.append(f"{t}/{w}: acknowledged message {m!r} never delivered")
        if timeouts:
            c.violations.append(f"{t}/{w}: a recv timed out waiting for a message")
    left = db.messages_left.get((t, w), 0)
    if left and row is not None and row.status in TERMINAL:
        c.violations.append(f"{t}/{w}: {left} message(s) still queued after it ended "
                            f"(a duplicate send)")


def _check_fork(db: DbSnapshot, rec: WfRecord, i_: Invariant, b: Invariant,
                d: Invariant) -> None:
    t, fid = rec.tenant, rec.fork_id
    assert fid is not None and rec.fork_from is not None
    i_.checked += 1
    row = db.workflows.get((t, fid))
    if row is None:
        i_.violations.append(f"{t}/{fid}: fork acknowledged, no row")
        return
    if row.parent_id is not None:
        i_.violations.append(f"{t}/{fid}: a fork has parent_id {row.parent_id!r}")
    d.checked += 1
    if row.status in TERMINAL and row.status != "succeeded":
        d.violations.append(f"{t}/{fid}: fork ended {row.status}, expected succeeded")
    if row.status != "succeeded":
        return
    ops = rec.ops if rec.fork_of is None else dict(child_ids(rec.workflow_id, rec.ops))[
        rec.fork_of]
    pos = positions(ops)
    known, out = expected_output(ops)
    if known and row.output != out:
        d.violations.append(f"{t}/{fid}: fork result {row.output!r} differs from the "
                            f"script's {out!r}")
    for idx, label in _tx_labels(ops):
        # steps before from_step are replayed from the copied checkpoints (their effect
        # belongs to the parent); the rest run again, once, as the fork's own
        n = db.effects.get((t, fid, label), 0)
        want = 0 if pos[idx] < rec.fork_from else 1
        if n != want:
            b.violations.append(f"{t}/{fid}: fork from step {rec.fork_from}: effect "
                                f"{label!r} (step {pos[idx]}) applied {n}x, expected {want}")


# -- reading the rows ------------------------------------------------------------------------


async def snapshot(conns: list[asyncpg.Connection], run: str) -> DbSnapshot:
    """The run's rows from every node (workflows, effects, received messages, queued
    messages, step re-runs) with plain SQL."""
    snap = DbSnapshot()
    like = run + "%"
    for conn in conns:
        for r in await conn.fetch(
                "SELECT tenant_id, workflow_id, status, attempts, parent_id, output, "
                "extract(epoch FROM created_at)::float8 AS c, "
                "extract(epoch FROM finished_at)::float8 AS f "
                "FROM shardflow.workflows WHERE workflow_id LIKE $1", like):
            snap.workflows[(r["tenant_id"], r["workflow_id"])] = WfRow(
                r["status"], r["attempts"], r["parent_id"], _json(r["output"]), r["c"], r["f"])
        for r in await conn.fetch(
                "SELECT tenant_id, workflow_id, label, count(*) AS n FROM public.chaos_effects "
                "WHERE workflow_id LIKE $1 GROUP BY 1, 2, 3", like):
            key = (r["tenant_id"], r["workflow_id"], r["label"])
            # after a shard move a tenant's effects may sit on two nodes: add them up
            snap.effects[key] = snap.effects.get(key, 0) + int(r["n"])
        for r in await conn.fetch(
                "SELECT tenant_id, workflow_id, output FROM shardflow.steps "
                "WHERE workflow_id LIKE $1 AND kind = 'recv' AND status = 'done' "
                "AND name = 'recv:inbox' ORDER BY tenant_id, workflow_id, seq", like):
            out = _json(r["output"])
            snap.recvs.setdefault((r["tenant_id"], r["workflow_id"]), []).append(
                out.get("message") if isinstance(out, dict) else None)
        # messages not yet received: deleted when taken, or (since migration 0017) kept
        # with taken_at set so their idempotency key still holds
        taken = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = "
            "'shardflow' AND table_name = 'messages' AND column_name = 'taken_at'")
        for r in await conn.fetch(
                "SELECT tenant_id, workflow_id, count(*) AS n FROM shardflow.messages "
                "WHERE workflow_id LIKE $1 " + ("AND taken_at IS NULL " if taken else "")
                + "GROUP BY 1, 2", like):
            snap.messages_left[(r["tenant_id"], r["workflow_id"])] = int(r["n"])
        for r in await conn.fetch(
                "SELECT tenant_id, workflow_id, sum(attempts - 1) AS n FROM shardflow.steps "
                "WHERE workflow_id LIKE $1 AND kind = 'step' AND attempts > 1 GROUP BY 1, 2",
                like):
            snap.step_reruns[(r["tenant_id"], r["workflow_id"])] = int(r["n"])
    return snap


def _json(v: Any) -> Any:
    import json

    return json.loads(v) if isinstance(v, str) else v


def history_json(history: History) -> dict[str, Any]:
    return dataclasses.asdict(history)
