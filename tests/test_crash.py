"""Crash recovery, racing starters and recoverers, and lease fencing with real processes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shardflow

from .conftest import PerTestDB, make_tempdir
from .flows import EFFECTS_DDL, FAST, make_engine

pytestmark = pytest.mark.slow


class Workers:
    """Worker subprocesses (``python -m shardflow.worker tests.flows:engine``)."""

    def __init__(self, db: PerTestDB, markers: Path) -> None:
        self.db = db
        self.markers = markers
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *, block: bool) -> subprocess.Popen[bytes]:
        env = self.db.env()
        env["SHARDFLOW_TEST_MARKER_DIR"] = str(self.markers)
        if block:
            env["SHARDFLOW_TEST_BLOCK"] = "1"
        p = subprocess.Popen([sys.executable, "-m", "shardflow.worker", "tests.flows:engine"],
                             env=env, cwd=Path(__file__).resolve().parent.parent)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def workers(db: PerTestDB) -> Iterator[Workers]:
    db.run_all(EFFECTS_DDL)
    w = Workers(db, make_tempdir("shardflow-markers-"))
    yield w
    w.stop_all()


def count(db: PerTestDB, tenant: str, sql: str, *params: Any) -> int:
    return int(db.scalar(tenant, sql, *params))  # type: ignore[arg-type]


async def wait_for(pred: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_sigkilled_worker_is_recovered_from_the_last_checkpoint(
        db: PerTestDB, workers: Workers) -> None:
    """SIGKILL a worker mid-step: a live worker resumes every workflow from its last
    checkpoint; no transactional step runs twice and the external re-run is recorded."""
    victim = workers.spawn(block=True)
    ids = [(f"tenant-{i}", f"wf-{i}") for i in range(8)]
    async with make_engine(db.dsns, run_workers=False) as client:
        for tenant, wf in ids:
            await client.start("crashy", 1, tenant=tenant, workflow_id=wf)
    # every workflow has committed its first transaction and is inside the external step
    await wait_for(lambda: all((workers.markers / f"{wf}.x").exists() for _, wf in ids),
                   what="workflows to reach the external step")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.time()
    survivor = make_engine(db.dsns)
    async with survivor:
        handles = [await survivor.get(t, wf) for t, wf in ids]
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
        assert results == [[1, "done-x", 2, 1]] * len(ids)
        for tenant, wf in ids:
            steps = await survivor.steps(tenant, wf)
            # the transaction before the crash is not re-run; the external step is, once,
            # and the re-run is recorded
            assert [(s["name"], s["attempts"]) for s in steps] == [
                ("record", 1), ("external", 2), ("record", 1)]
            info = await survivor.get_info(tenant, wf)
            assert info["attempts"] == 2
            assert count(db, tenant, "SELECT count(*) FROM public.effects WHERE workflow_id=%s "
                         "AND what='before'", wf) == 1
            resumed = steps[1]["finished_at"].timestamp() - killed_at
            assert resumed < 30, resumed


async def test_racing_starters_in_many_processes_run_once(db: PerTestDB, workers: Workers) -> None:
    """Eight processes start the same (tenant, id) at the same instant: one row, one run."""
    script = (
        "import asyncio, sys, time\n"
        "from tests.flows import make_engine\n"
        "async def main():\n"
        "    async with make_engine(run_workers=False) as e:\n"
        "        go = float(sys.argv[1])\n"
        "        while time.time() < go: await asyncio.sleep(0.001)\n"
        "        h = await e.start('quick', 5, tenant='racer', workflow_id='race')\n"
        "        print(h.workflow_id)\n"
        "asyncio.run(main())\n"
    )
    go = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", script, str(go)], env=db.env(),
                              cwd=Path(__file__).resolve().parent.parent,
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outs == ["race"] * 8
    assert all(p.returncode == 0 for p in procs)
    for _ in range(3):
        workers.spawn(block=False)
    async with make_engine(db.dsns, run_workers=False) as client:
        assert await (await client.get("racer", "race")).result(timeout=60) == 10
    assert count(db, "racer", "SELECT count(*) FROM shardflow.workflows WHERE workflow_id='race'") == 1
    assert count(db, "racer", "SELECT count(*) FROM public.effects WHERE workflow_id='race'") == 1


async def test_racing_recoverers_resume_each_orphan_once(db: PerTestDB, workers: Workers) -> None:
    """Three workers race to recover a dead worker's workflows: each transactional step
    still runs once, and each external step is re-run exactly once."""
    victim = workers.spawn(block=True)
    ids = [(f"t{i}", f"o{i}") for i in range(12)]
    async with make_engine(db.dsns, run_workers=False) as client:
        for tenant, wf in ids:
            await client.start("crashy", 2, tenant=tenant, workflow_id=wf)
        await wait_for(lambda: all((workers.markers / f"{wf}.x").exists() for _, wf in ids),
                       what="workflows to reach the external step")
        victim.kill()
        victim.wait()
        for _ in range(3):
            workers.spawn(block=False)
        for tenant, wf in ids:
            assert await (await client.get(tenant, wf)).result(timeout=60) == [1, "done-x", 2, 2]
            steps = await client.steps(tenant, wf)
            assert [s["attempts"] for s in steps] == [1, 2, 1]
            assert count(db, tenant, "SELECT count(*) FROM public.effects WHERE workflow_id=%s",
                         wf) == 2


async def test_expired_lease_cannot_checkpoint_after_takeover(db: PerTestDB) -> None:
    """A worker whose workflow was taken over (new fencing token) cannot write its
    checkpoint: the write matches no row and the local run stops."""
    eng = db.engine()
    gate = asyncio.Event()
    entered = asyncio.Event()

    @eng.step(name="slow")
    async def slow() -> str:
        entered.set()
        await gate.wait()
        return "late"

    @eng.workflow(name="fenced")
    async def fenced() -> str:
        return await slow()

    async with eng:
        await eng.start(fenced, tenant="acme", workflow_id="fx")
        await asyncio.wait_for(entered.wait(), 10)
        # another worker takes over, as the recovery sweep + claim would
        with db.tenant_conn("acme") as conn:
            conn.execute("UPDATE shardflow.workflows SET fence = fence + 1, owner = 'intruder' "
                         "WHERE workflow_id = 'fx'")
        gate.set()
        await wait_for(lambda: ("acme", "fx") not in eng._worker.running, 10,
                       "the fenced-off run to stop")
    row = db.scalar("acme", "SELECT status || '/' || owner FROM shardflow.workflows "
                    "WHERE workflow_id = 'fx'")
    assert row == "running/intruder"
    assert db.scalar("acme", "SELECT status FROM shardflow.steps WHERE workflow_id = 'fx'") == "started"


async def test_heartbeats_are_one_write_per_worker_per_node(db: PerTestDB) -> None:
    """Lease renewal does not grow with the number of workflows in flight."""
    eng = db.engine()
    release = asyncio.Event()

    @eng.workflow(name="parked")
    async def parked() -> None:
        await release.wait()

    async with eng:
        for i in range(60):
            await eng.start(parked, tenant=f"hb-{i}")
        await wait_for(lambda: len(eng._worker.running) == 60, 20, "60 running workflows")
        before = _worker_updates(db)
        await asyncio.sleep(2.0)
        after = _worker_updates(db)
        for node in db.spec.nodes:  # one lease row per worker per node, whatever it runs
            with db.connect(node.name) as conn:
                row = conn.execute("SELECT count(*) FROM shardflow.workers").fetchone()
                assert row is not None and row[0] == 1
        release.set()
    per_node = [(after[n] - before[n]) for n in before]
    # heartbeat_interval 0.2 s over 2 s: ~10 renewals per node, for 60 workflows
    assert all(3 <= d <= 15 for d in per_node), per_node


def _worker_updates(db: PerTestDB) -> dict[str, int]:
    out = {}
    for node in db.spec.nodes:
        with db.connect(node.name) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute("SELECT n_tup_upd + n_tup_ins FROM pg_stat_user_tables "
                               "WHERE relname = 'workers'").fetchone()
            out[node.name] = int(row[0]) if row else 0
    return out


def test_worker_cli_bad_target_is_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "shardflow.cli", "worker", "no_such_mod:engine"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("shardflow: error: cannot import module 'no_such_mod'")
    assert len(out.stderr.strip().splitlines()) == 1
    assert os.environ.get("SHARDFLOW_TEST_BLOCK") is None
    assert shardflow.__version__


async def test_worker_processes_stop_gracefully_on_sigterm(db: PerTestDB, workers: Workers) -> None:
    """`shardflow worker --processes 2` runs two workers; SIGTERM stops both and hands
    their workflows back at once (no lease wait), deleting their lease rows."""
    env = db.env()
    env["SHARDFLOW_TEST_BLOCK"] = "1"
    env["SHARDFLOW_TEST_MARKER_DIR"] = str(workers.markers)
    parent = subprocess.Popen([sys.executable, "-m", "shardflow.cli", "worker",
                               "tests.flows:engine", "--processes", "2"], env=env,
                              cwd=Path(__file__).resolve().parent.parent)
    def live_workers() -> int:
        with db.connect("node0") as conn:
            row = conn.execute("SELECT count(DISTINCT pid) FROM shardflow.workers "
                               "WHERE lease_expires_at > now()").fetchone()
            return int(row[0]) if row else 0

    try:
        await wait_for(lambda: live_workers() == 2, what="two worker processes")
        ids = [(f"g{i}", f"g{i}") for i in range(6)]
        async with make_engine(db.dsns, run_workers=False) as client:
            for tenant, wf in ids:
                await client.start("crashy", 3, tenant=tenant, workflow_id=wf)
            await wait_for(lambda: all((workers.markers / f"{wf}.x").exists() for _, wf in ids),
                           what="workflows to start running")
            owners = {(await client.get_info(t, wf))["owner"] for t, wf in ids}
            assert all(o is not None for o in owners)
            parent.send_signal(signal.SIGTERM)
            assert parent.wait(timeout=30) == 0
            for tenant, wf in ids:
                info = await client.get_info(tenant, wf)
                assert (info["status"], info["owner"]) == ("pending", None)
        for node in db.spec.nodes:
            with db.connect(node.name) as conn:
                row = conn.execute("SELECT count(*) FROM shardflow.workers").fetchone()
                assert row is not None and row[0] == 0
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.parametrize("group_commit", [True, False])
async def test_a_failed_checkpoint_write_hands_the_workflow_back(db: PerTestDB,
                                                                 group_commit: bool) -> None:
    """When the database refuses a checkpoint write (fault injected once at the driver
    boundary), the worker hands the workflow back; it re-runs from its checkpoints
    instead of staying 'running' under a live owner forever. With group commit the
    whole batch carrying the checkpoint fails."""
    from shardflow import RetryableDatabaseError

    eng = db.engine(config=dataclasses.replace(FAST, group_commit=group_commit))
    calls = {"n": 0}

    @eng.step(name="once")
    async def once() -> str:
        calls["n"] += 1
        return "ok"

    @eng.workflow(name="hb")
    async def hb() -> str:
        return await once()

    async with eng:
        failed = {"done": False}
        method = "fetch" if group_commit else "fetchrow"
        real = getattr(eng.driver, method)

        async def flaky(node: Any, query: str, *args: Any, **kw: Any) -> Any:
            # the single-row write, or a batch carrying a step finished ($7: tenants)
            finishing = query == "step_finished" or (query == "checkpoint_batch"
                                                     and len(args[6]) > 0)
            if finishing and not failed["done"]:
                failed["done"] = True
                raise RetryableDatabaseError("injected: connection lost", sqlstate="08006")
            return await real(node, query, *args, **kw)

        setattr(eng.driver, method, flaky)
        h = await eng.start(hb, tenant="handback", workflow_id="hb1")
        assert await h.result(timeout=20) == "ok"
        info = await eng.get_info("handback", "hb1")
    assert failed["done"] and info["attempts"] == 2
    steps = await _steps(db, "handback", "hb1")
    assert steps == [("once", 2)]  # the external step ran again, and that re-run is counted
    assert calls["n"] == 2


async def _steps(db: PerTestDB, tenant: str, wf: str) -> list[tuple[str, int]]:
    with db.tenant_conn(tenant) as conn:
        return [(r[0], r[1]) for r in conn.execute(
            "SELECT name, attempts FROM shardflow.steps WHERE workflow_id = %s ORDER BY seq",
            (wf,)).fetchall()]


async def test_a_claim_whose_reply_was_lost_is_handed_back(db: PerTestDB) -> None:
    """A claim can commit while its reply is lost (the connection drops, the primary
    fails over): the row says "running" under this worker's live lease, and recovery
    only takes workflows of dead workers. The worker finds it and hands it back."""
    eng = db.engine()

    @eng.workflow(name="lost_reply")
    async def lost(x: int) -> int:
        return x + 1

    tenant = "lost-reply-tenant"
    shard = db.spec.shard_map.shard(tenant)
    async with eng:
        with db.tenant_conn(tenant) as conn:
            conn.execute(
                "INSERT INTO shardflow.workflows (tenant_id, shard_id, workflow_id, name, "
                "inputs, status, owner, fence, attempts, started_at) VALUES (%s, %s, "
                "'lost-1', 'lost_reply', '{\"args\": [41], \"kwargs\": {}}', 'running', "
                "%s, 1, 1, now())", (tenant, shard, eng._worker.worker_id))
            conn.commit()
        h = await eng.get(tenant, "lost-1")
        assert await h.result(timeout=30) == 42
        assert eng.metrics["reconciled"] == 1
