"""Durable execution semantics, in one process, on the real 3-node cluster."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import pytest

import shardflow
from shardflow import (
    InvalidArgument,
    InvalidTenant,
    PayloadTooLarge,
    SerializationError,
    StepError,
    UnknownWorkflowName,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowNotFound,
)

from .conftest import FAST, PerTestDB
from .flows import EFFECTS_DDL, make_engine


def effects(db: PerTestDB, tenant: str, wf: str, what: str | None = None) -> int:
    sql = "SELECT count(*) FROM public.effects WHERE tenant_id = %s AND workflow_id = %s"
    params: list[Any] = [tenant, wf]
    if what is not None:
        sql += " AND what = %s"
        params.append(what)
    return int(db.scalar(tenant, sql, *params))  # type: ignore[arg-type]


async def test_start_result_and_checkpoints(db: PerTestDB) -> None:
    """A workflow runs its steps once, checkpoints each, and returns its result."""
    db.run_all(EFFECTS_DDL)
    eng = make_engine(db.dsns)
    async with eng:
        h = await eng.start("crashy", 7, tenant="acme", workflow_id="w1")
        assert await h.result(timeout=30) == [1, "done-x", 2, 7]
        steps = await eng.steps("acme", "w1")
        assert [(s["seq"], s["name"], s["kind"], s["status"]) for s in steps] == [
            (0, "record", "transaction", "done"), (1, "external", "step", "done"),
            (2, "record", "transaction", "done")]
        assert [s["attempts"] for s in steps] == [1, 1, 1]
        info = await eng.get_info("acme", "w1")
        assert info["status"] == "succeeded" and info["inputs"] == {"args": [7], "kwargs": {}}
    assert effects(db, "acme", "w1") == 2


async def test_start_is_durable_when_it_returns(db: PerTestDB) -> None:
    """start commits the row before returning, even with no worker running anywhere."""
    eng = make_engine(db.dsns, run_workers=False)
    async with eng:
        await eng.start("quick", 1, tenant="t-durable", workflow_id="d1")
    assert db.scalar("t-durable", "SELECT status FROM shardflow.workflows WHERE workflow_id = 'd1'"
                     ) == "pending"


async def test_same_id_start_returns_existing_and_runs_once(db: PerTestDB) -> None:
    db.run_all(EFFECTS_DDL)
    eng = make_engine(db.dsns)
    async with eng:
        handles = await asyncio.gather(*(
            eng.start("quick", 21, tenant="acme", workflow_id="same") for _ in range(20)))
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
        assert results == [42] * 20
        again = await eng.start("quick", 99, tenant="acme", workflow_id="same")
        assert await again.result(timeout=5) == 42
        with pytest.raises(InvalidArgument, match="already used by a 'quick' workflow"):
            await eng.start("crashy", 1, tenant="acme", workflow_id="same")
    assert effects(db, "acme", "same") == 1


async def test_step_retries_with_backoff_then_succeeds(db: PerTestDB) -> None:
    eng = db.engine()
    calls = {"n": 0}

    @eng.step(retries=3)
    async def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError(f"try {calls['n']}")
        return "ok"

    @eng.workflow()
    async def wf() -> str:
        return await flaky()

    async with eng:
        assert await (await eng.start(wf, tenant="acme", workflow_id="r1")).result(timeout=30) == "ok"
        steps = await eng.steps("acme", "r1")
    assert calls["n"] == 3
    assert steps[0]["retries"] == 2 and steps[0]["status"] == "done"


async def test_step_error_is_checkpointed_and_replayed(db: PerTestDB) -> None:
    """A step that fails after its retries records its error; the workflow sees the same
    StepError on replay, and result() raises WorkflowFailed naming it."""
    eng = db.engine()
    calls = {"n": 0}

    @eng.step(retries=1)
    async def broken() -> None:
        calls["n"] += 1
        raise ValueError("card declined")

    @eng.workflow()
    async def wf() -> str:
        try:
            await broken()
        except StepError as exc:
            return f"handled {exc.error['type']}: {exc.error['message']}"
        return "unreachable"

    @eng.workflow()
    async def unhandled() -> None:
        await broken()

    async with eng:
        assert await (await eng.start(wf, tenant="acme", workflow_id="e1")).result(
            timeout=30) == "handled ValueError: card declined"
        h = await eng.start(unhandled, tenant="acme", workflow_id="e2")
        with pytest.raises(WorkflowFailed, match="card declined") as info:
            await h.result(timeout=30)
        assert info.value.status == "failed"
        # resuming the failed workflow runs the failed step again (replaying its
        # recorded error would fail it forever, also once the outage is over), and the
        # new run of the external step is counted
        before = calls["n"]
        await eng.resume("acme", "e2")
        with pytest.raises(WorkflowFailed):
            await h.result(timeout=30)
        assert calls["n"] == before + 2
        (step,) = [s for s in await eng.steps("acme", "e2") if s["kind"] == "step"]
        assert step["attempts"] == 2 and step["status"] == "error"
    assert calls["n"] == 6


async def test_transaction_step_commits_with_checkpoint(db: PerTestDB) -> None:
    """If the transaction's function fails, its writes roll back and nothing is recorded
    as done; the transaction's writes and its checkpoint are one commit."""
    db.run_all(EFFECTS_DDL)
    eng = db.engine()

    @eng.transaction(retries=0)
    async def half(conn: Any) -> None:
        await conn.execute("INSERT INTO public.effects (tenant_id, workflow_id, what) "
                           "VALUES ($1, $2, 'half')", shardflow.tenant(), shardflow.workflow_id())
        raise RuntimeError("boom after write")

    @eng.workflow()
    async def wf() -> None:
        await half()

    async with eng:
        h = await eng.start(wf, tenant="acme", workflow_id="tx1")
        with pytest.raises(WorkflowFailed, match="boom after write"):
            await h.result(timeout=30)
        steps = await eng.steps("acme", "tx1")
    assert effects(db, "acme", "tx1") == 0
    assert [(s["kind"], s["status"]) for s in steps] == [("transaction", "error")]


async def test_durable_sleep_survives_engine_restart(db: PerTestDB) -> None:
    """A sleep longer than suspend_after parks the workflow (pending until due); a new
    engine finishes it without restarting the sleep from zero."""
    def build() -> Any:
        eng = db.engine()

        @eng.workflow(name="sleeper")
        async def sleeper() -> str:
            await shardflow.sleep(2.0)
            return "woke"

        return eng

    eng = build()
    async with eng:
        h = await eng.start("sleeper", tenant="acme", workflow_id="s1")
        await asyncio.sleep(0.6)
        info = await eng.get_info("acme", "s1")
        assert info["status"] == "pending"  # parked: no worker slot held
        wake_at = (await eng.steps("acme", "s1"))[0]["output"]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    eng2 = build()
    async with eng2:
        assert await (await eng2.get("acme", "s1")).result(timeout=30) == "woke"
        steps = await eng2.steps("acme", "s1")
    assert loop.time() - t0 < 2.0  # finished at the original wake time, not 2 s after restart
    assert [s["output"] for s in steps] == [wake_at]
    assert h.workflow_id == "s1"


async def test_messages_are_delivered_once_and_recv_times_out(db: PerTestDB) -> None:
    eng = db.engine()

    @eng.workflow()
    async def inbox() -> list[Any]:
        a = await shardflow.recv("topic", timeout=20)
        b = await shardflow.recv("topic", timeout=20)
        c = await shardflow.recv("other", timeout=0.3)
        return [a, b, c]

    async with eng:
        h = await eng.start(inbox, tenant="acme", workflow_id="m1")
        await eng.send("acme", "m1", "topic", {"n": 1})
        await eng.send("acme", "m1", "topic", {"n": 2}, idempotency_key="k2")
        await eng.send("acme", "m1", "topic", {"n": 2}, idempotency_key="k2")  # retried send
        assert await h.result(timeout=30) == [{"n": 1}, {"n": 2}, None]
    left = db.scalar("acme", "SELECT count(*) FROM shardflow.messages "
                             "WHERE workflow_id = 'm1' AND taken_at IS NULL")
    assert left == 0
    # taken messages keep their rows (and so their idempotency keys) until retention
    assert db.scalar("acme", "SELECT count(*) FROM shardflow.messages "
                             "WHERE workflow_id = 'm1'") == 2
    with pytest.raises(WorkflowNotFound):
        async with db.engine(run_workers=False) as e:
            await e.send("acme", "nope", "topic", 1)


async def test_recv_wakes_a_parked_workflow(db: PerTestDB) -> None:
    """A recv with a long timeout parks the workflow; a message wakes it early."""
    eng = db.engine()

    @eng.workflow()
    async def waiter() -> Any:
        return await shardflow.recv("go", timeout=60)

    async with eng:
        h = await eng.start(waiter, tenant="acme", workflow_id="p1")
        for _ in range(100):
            if (await eng.get_info("acme", "p1"))["status"] == "pending" and await eng.steps("acme", "p1"):
                break
            await asyncio.sleep(0.05)
        await eng.send("acme", "p1", "go", "now")
        assert await h.result(timeout=10) == "now"


async def test_events_and_child_workflows(db: PerTestDB) -> None:
    eng = db.engine()

    @eng.workflow()
    async def child(x: int) -> int:
        await shardflow.set_event("progress", {"child": x})
        return x * 10

    @eng.workflow()
    async def parent() -> list[int]:
        await shardflow.set_event("stage", "children")
        h1 = await eng.start(child, 1)
        h2 = await eng.start(child, 2, workflow_id="explicit-child")
        return [await h1.result(), await h2.result()]

    async with eng:
        h = await eng.start(parent, tenant="acme", workflow_id="par")
        assert await h.result(timeout=30) == [10, 20]
        assert await eng.get_event("acme", "par", "stage") == "children"
        assert await eng.get_event("acme", "explicit-child", "progress", timeout=5) == {"child": 2}
        kids = [k for k in await eng.list_workflows(tenant="acme") if k["workflow_id"] != "par"]
        assert sorted(k["workflow_id"] for k in kids) == ["explicit-child", "par.c1"]
        assert {k["parent_id"] for k in kids} == {"par"}
        assert await eng.get_event("acme", "par", "missing", timeout=0.1) is None


async def test_cancel_reaches_children(db: PerTestDB) -> None:
    eng = db.engine()

    @eng.workflow()
    async def sleepy_child() -> None:
        await shardflow.sleep(30)

    @eng.workflow()
    async def parent() -> None:
        await eng.start(sleepy_child, workflow_id="kid")
        await shardflow.sleep(30)

    async with eng:
        h = await eng.start(parent, tenant="acme", workflow_id="top")
        for _ in range(100):
            if db.scalar("acme", "SELECT count(*) FROM shardflow.workflows WHERE workflow_id='kid'"):
                break
            await asyncio.sleep(0.05)
        cancelled = await eng.cancel("acme", "top")
        assert sorted(cancelled) == ["kid", "top"]
        with pytest.raises(WorkflowCancelled):
            await h.result(timeout=5)
        assert (await eng.get_info("acme", "kid"))["status"] == "cancelled"


async def test_workflow_timeout_cancels_it(db: PerTestDB) -> None:
    eng = db.engine()

    @eng.workflow()
    async def slow() -> None:
        await asyncio.sleep(10)

    async with eng:
        h = await eng.start(slow, tenant="acme", timeout=0.5)
        with pytest.raises(WorkflowCancelled, match="timed out"):
            await h.result(timeout=10)


async def test_resume_and_fork(db: PerTestDB) -> None:
    db.run_all(EFFECTS_DDL)
    eng = make_engine(db.dsns)
    async with eng:
        h = await eng.start("crashy", 1, tenant="acme", workflow_id="f1")
        assert (await h.result(timeout=30))[0] == 1
        forked = await eng.fork("acme", "f1", from_step=2, new_workflow_id="f1-fork")
        # steps 0 and 1 replay from the copied checkpoints; step 2 runs again
        assert await forked.result(timeout=30) == [1, "done-x", 1, 1]
        assert [s["seq"] for s in await eng.steps("acme", "f1-fork")] == [0, 1, 2]
        with pytest.raises(InvalidArgument, match="nothing to resume"):
            await eng.resume("acme", "f1")
    assert effects(db, "acme", "f1") == 2
    assert effects(db, "acme", "f1-fork") == 1


async def test_nondeterminism_fails_the_workflow_clearly(db: PerTestDB) -> None:
    """Replaying a history that recorded another step at a position fails the workflow
    with NonDeterminismError, even if the body catches exceptions."""
    eng = db.engine()
    version = {"v": 1}

    @eng.step()
    async def a() -> str:
        return "a"

    @eng.step()
    async def b() -> str:
        return "b"

    @eng.workflow()
    async def changing() -> str:
        try:
            if version["v"] == 1:
                await a()
            else:
                await b()
        except Exception:
            pass
        await shardflow.sleep(1.5)
        return "done"

    async with eng:
        h = await eng.start(changing, tenant="acme", workflow_id="nd")
        await asyncio.sleep(0.5)
        version["v"] = 2  # the code changes while the workflow is parked in its sleep
        with pytest.raises(WorkflowFailed, match=r"at position 0 the code asked for step '.*b' but the history records step '.*a'"):
            await h.result(timeout=30)
        info = await eng.get_info("acme", "nd")
        assert info["error"]["type"] == "NonDeterminismError"


async def test_patch_keeps_old_workflows_on_the_old_path(db: PerTestDB) -> None:
    """A workflow that ran the old code past the patch point replays the old path; new
    executions take the new one. Without patch() the old one would be non-deterministic."""
    eng = db.engine()
    patched = {"on": False}

    @eng.step(name="old_way")
    async def old_way() -> str:
        return "old"

    @eng.step(name="new_way")
    async def new_way() -> str:
        return "new"

    @eng.workflow(name="flow")
    async def flow() -> list[str]:
        first = await old_way()
        if patched["on"] and await shardflow.patch("use-new-way"):
            second = await new_way()
        else:
            second = await old_way()
        await shardflow.sleep(1.5)
        return [first, second]

    async with eng:
        old = await eng.start(flow, tenant="acme", workflow_id="old")
        for _ in range(100):  # wait until the old code recorded both steps and parked
            if len(await eng.steps("acme", "old")) == 3:
                break
            await asyncio.sleep(0.05)
        patched["on"] = True
        new = await eng.start(flow, tenant="acme", workflow_id="new")
        assert await new.result(timeout=30) == ["old", "new"]
        assert await old.result(timeout=30) == ["old", "old"]
        new_steps = [(s["kind"], s["name"]) for s in await eng.steps("acme", "new")]
        assert new_steps == [("step", "old_way"), ("patch", "patch:use-new-way"),
                             ("step", "new_way"), ("sleep", "sleep")]
        assert [s["name"] for s in await eng.steps("acme", "old")] == [
            "old_way", "old_way", "sleep"]


async def test_dead_letter_after_max_attempts(db: PerTestDB) -> None:
    """A workflow claimed more than max_attempts times goes to 'dead', not round again."""
    eng = db.engine()

    @eng.workflow(name="doomed", max_attempts=2)
    async def doomed() -> None:
        await asyncio.sleep(0)

    async with eng:
        await eng.start("doomed", tenant="acme", workflow_id="dl", delay=3600)
        # as if two earlier claims had died mid-run
        with db.tenant_conn("acme") as conn:
            conn.execute("UPDATE shardflow.workflows SET attempts = 2, ready_at = now() "
                         "WHERE workflow_id = 'dl'")
        eng.wake_workers()
        with pytest.raises(WorkflowFailed, match="gave up after 2 attempts") as info:
            await (await eng.get("acme", "dl")).result(timeout=30)
        assert info.value.status == "dead"


async def test_bad_input_is_refused_before_anything_is_written(db: PerTestDB) -> None:
    eng = db.engine(config=dataclasses.replace(FAST, max_payload_bytes=1000))

    @eng.workflow(name="wf")
    async def wf(x: Any) -> Any:
        return x

    async with eng:
        with pytest.raises(SerializationError, match="argument 0 of workflow 'wf'"):
            await eng.start(wf, object(), tenant="acme", workflow_id="b1")
        with pytest.raises(SerializationError, match="argument 'k' of workflow 'wf'"):
            await eng.start(wf, 1, tenant="acme", workflow_id="b1", k={1, 2})
        with pytest.raises(PayloadTooLarge, match="limit is 1000"):
            await eng.start(wf, "x" * 2000, tenant="acme", workflow_id="b1")
        with pytest.raises(InvalidTenant, match="forbidden characters"):
            await eng.start(wf, 1, tenant="bad tenant", workflow_id="b1")
        with pytest.raises(InvalidTenant, match="must be a str"):
            await eng.start(wf, 1, tenant=5, workflow_id="b1")  # type: ignore[arg-type]
        with pytest.raises(UnknownWorkflowName, match="no workflow named 'nope'"):
            await eng.start("nope", tenant="acme")
        with pytest.raises(InvalidArgument, match="tenant is required"):
            await eng.start(wf, 1)
        with pytest.raises(WorkflowNotFound, match="'ghost' for tenant 'acme'"):
            await eng.get("acme", "ghost")
        with pytest.raises(InvalidArgument, match="status must be one of"):
            await eng.list_workflows(status="exploded")
        # an unserializable result fails the workflow with a readable error
        h = await eng.start(wf, 1, tenant="acme", workflow_id="ok")
        assert await h.result(timeout=30) == 1
    assert db.scalar("acme", "SELECT count(*) FROM shardflow.workflows WHERE workflow_id = 'b1'") == 0


async def test_unregistered_workflow_stays_pending_with_a_reason(db: PerTestDB) -> None:
    """A workflow no live worker registers is neither failed nor dropped."""
    producer = db.engine(run_workers=False)

    @producer.workflow(name="only-on-producer")
    async def orphan() -> None: ...

    async with producer:
        await producer.start("only-on-producer", tenant="acme", workflow_id="u1")
    worker = make_engine(db.dsns)
    async with worker:
        with db.tenant_conn("acme") as conn:
            conn.execute("UPDATE shardflow.workflows SET ready_at = now() - interval '10 s' "
                         "WHERE workflow_id = 'u1'")
        reason = None
        for _ in range(120):
            reason = db.scalar("acme", "SELECT reason FROM shardflow.workflows WHERE workflow_id='u1'")
            if reason:
                break
            await asyncio.sleep(0.1)
    assert reason == "no live worker registers workflow 'only-on-producer'"
    assert db.scalar("acme", "SELECT status FROM shardflow.workflows WHERE workflow_id='u1'") == "pending"


async def test_list_workflows_fans_out_to_all_nodes(db: PerTestDB) -> None:
    db.run_all(EFFECTS_DDL)
    eng = make_engine(db.dsns)
    tenants = [f"tenant-{i}" for i in range(12)]
    async with eng:
        hs = [await eng.start("quick", i, tenant=t) for i, t in enumerate(tenants)]
        await asyncio.gather(*(h.result(timeout=30) for h in hs))
        rows = await eng.list_workflows(status="succeeded", limit=100)
        assert sorted(r["tenant_id"] for r in rows) == sorted(tenants)
        nodes = {db.node_of_tenant(t) for t in tenants}
        assert len(nodes) == 3  # the tenants really are spread over every node
        only = await eng.list_workflows(tenant="tenant-3")
        assert [r["tenant_id"] for r in only] == ["tenant-3"]
    assert json.dumps([r["workflow_id"] for r in rows])


async def test_recv_timeout_survives_restart(db: PerTestDB) -> None:
    """The recv deadline is recorded: after a restart the wait ends at the original
    deadline, not a full timeout later."""
    def build() -> Any:
        eng = db.engine()

        @eng.workflow(name="patient")
        async def patient() -> Any:
            return await shardflow.recv("never", timeout=2.0)

        return eng

    loop = asyncio.get_running_loop()
    async with build() as eng:
        await eng.start("patient", tenant="acme", workflow_id="rt")
        await asyncio.sleep(0.5)
    t0 = loop.time()
    async with build() as eng2:
        assert await (await eng2.get("acme", "rt")).result(timeout=30) is None
        steps = await eng2.steps("acme", "rt")
    assert loop.time() - t0 < 2.0
    assert [(s["kind"], s["status"], s["output"]["message"]) for s in steps] == [
        ("recv", "done", None)]


async def test_sync_client_starts_and_waits_like_the_engine(db: PerTestDB) -> None:
    """The psycopg (sync) client starts by name with the same SQL and routing; an async
    worker runs the workflow; the sync client reads its result and its errors."""
    from shardflow.syncclient import SyncClient

    eng = make_engine(db.dsns)
    async with eng:
        def drive() -> tuple[Any, ...]:
            with SyncClient(dsns=db.dsns) as c:
                wid = c.start("quick", 21, tenant="sync-t", workflow_id="s1")
                again = c.start("quick", 99, tenant="sync-t", workflow_id="s1")
                res = c.result("sync-t", wid, timeout=30)
                bad = c.start("crashy", tenant="sync-t")  # missing argument: fails
                with pytest.raises(WorkflowFailed, match="missing 1 required positional"):
                    c.result("sync-t", bad, timeout=30)
                with pytest.raises(WorkflowNotFound):
                    c.status("sync-t", "nope")
                with pytest.raises(InvalidTenant):
                    c.start("quick", 1, tenant="")
                return wid, again, res

        wid, again, res = await asyncio.to_thread(drive)
    assert (wid, again, res) == ("s1", "s1", 42)
