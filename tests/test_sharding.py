"""Shard-aware workers: routing, balanced ownership, rebalance, fairness, NOTIFY."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections import Counter

import pytest

from shardflow.ownership import target_share

from .conftest import FAST, PerTestDB
from .flows import make_engine
from .test_crash import Workers, wait_for, workers  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


def owners(db: PerTestDB) -> dict[int, str | None]:
    """Live owner of every shard, read from the shard's own node."""
    out: dict[int, str | None] = {}
    for node in db.spec.nodes:
        with db.connect(node.name) as conn:
            rows = conn.execute(
                "SELECT s, (SELECT l.owner FROM shardflow.shard_leases l "
                "            JOIN shardflow.workers k ON k.worker_id = l.owner "
                "           WHERE l.shard_id = s AND k.lease_expires_at > now()) "
                "FROM unnest(%s::int[]) s", (db.spec.shard_map.shards_of(node.name),)
            ).fetchall()
            out.update({int(s): o for s, o in rows})
    return out


def balanced(db: PerTestDB, n_workers: int) -> bool:
    own = owners(db)
    if any(o is None for o in own.values()):
        return False
    counts = Counter(own.values())
    return len(counts) == n_workers and max(counts.values()) - min(counts.values()) <= 1


def test_target_shares_differ_by_at_most_one() -> None:
    members = [f"w{i}" for i in range(7)]
    shares = [target_share(256, members, m) for m in members]
    assert sum(s or 0 for s in shares) == 256
    assert max(s or 0 for s in shares) - min(s or 0 for s in shares) == 1
    assert target_share(256, members, "stranger") is None


async def test_rows_live_only_on_the_tenants_node(db: PerTestDB) -> None:
    async with make_engine(db.dsns) as eng:
        tenants = [f"route-{i}" for i in range(9)]
        for t in tenants:
            assert await (await eng.start("quick", 1, tenant=t, workflow_id="r")).result(timeout=30) == 2
    for t in tenants:
        home = db.node_of_tenant(t)
        for node in db.spec.nodes:
            with db.connect(node.name) as conn:
                row = conn.execute("SELECT count(*) FROM shardflow.workflows WHERE tenant_id = %s",
                                   (t,)).fetchone()
                assert row is not None and row[0] == (1 if node.name == home else 0)


async def test_workers_balance_shards_and_rebalance_after_sigkill(
        db: PerTestDB, workers: Workers) -> None:  # noqa: F811
    """Three worker processes split the 16 shards 6/5/5; SIGKILL one and the other two
    take its shards (8/8) within a few seconds, leaving no shard unowned."""
    procs = [workers.spawn(block=False) for _ in range(3)]
    await wait_for(lambda: balanced(db, 3), 30, "three workers to balance the shards")
    counts = sorted(Counter(owners(db).values()).values())
    assert counts == [5, 5, 6]
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    t0 = time.monotonic()
    await wait_for(lambda: balanced(db, 2), 30, "two workers to rebalance the shards")
    took = time.monotonic() - t0
    assert sorted(Counter(owners(db).values()).values()) == [8, 8]
    # workflows on every shard still run after the rebalance
    async with make_engine(db.dsns, run_workers=False) as client:
        hs = [await client.start("quick", i, tenant=f"after-{i}") for i in range(20)]
        assert [await h.result(timeout=30) for h in hs] == [2 * i for i in range(20)]
    print(f"rebalance after SIGKILL took {took:.2f}s")


async def test_small_tenant_is_not_starved_by_a_flood(db: PerTestDB) -> None:
    """A tenant with 20,000 queued workflows does not delay another tenant's single
    workflow: claims visit tenants in turn instead of draining the flood first."""
    eng = db.engine(config=dataclasses.replace(FAST, max_concurrency=16, claim_batch=16))
    @eng.workflow(name="work")
    async def work(x: int) -> int:
        if x >= 0:
            await asyncio.sleep(0.01)
        return x

    # the flood shares the small tenant's shard, so only fair claiming can save it
    small = "small-tenant"
    shard = db.spec.shard_map.shard(small)
    big = next(f"big-{i}" for i in range(10_000) if db.spec.shard_map.shard(f"big-{i}") == shard)
    with db.tenant_conn(big) as conn:
        conn.execute(
            "INSERT INTO shardflow.workflows (tenant_id, shard_id, workflow_id, name, inputs, "
            "created_at, ready_at) SELECT %s, %s, 'f' || g, 'work', "
            "'{\"args\": [1], \"kwargs\": {}}', now() - interval '1 hour', "
            "now() - interval '1 hour' FROM generate_series(1, 20000) g", (big, shard))
    async with eng:
        await asyncio.sleep(0.3)  # the flood is being worked on
        h = await eng.start(work, -1, tenant=small)
        assert await h.result(timeout=30) == -1
        left = db.scalar(big, "SELECT count(*) FROM shardflow.workflows WHERE tenant_id = %s "
                         "AND status = 'pending'", big)
    assert int(left) > 15_000  # type: ignore[arg-type]


async def test_tenant_concurrency_cap(db: PerTestDB) -> None:
    eng = db.engine(config=dataclasses.replace(FAST, tenant_concurrency=2))
    release = asyncio.Event()
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()

    @eng.workflow(name="capped")
    async def capped(tenant: str) -> None:
        running[tenant] += 1
        peak[tenant] = max(peak[tenant], running[tenant])
        await release.wait()
        running[tenant] -= 1

    async with eng:
        hs = [await eng.start(capped, t, tenant=t) for t in ("cap-a", "cap-b") for _ in range(6)]
        await wait_for(lambda: sum(running.values()) == 4, 10, "both tenants at their cap")
        await asyncio.sleep(0.5)
        assert dict(running) == {"cap-a": 2, "cap-b": 2}
        release.set()
        await asyncio.gather(*(h.result(timeout=30) for h in hs))
    assert dict(peak) == {"cap-a": 2, "cap-b": 2}


async def test_notify_wakes_the_shard_owner_without_polling(db: PerTestDB) -> None:
    """With polling every 30 s, a start still runs at once: NOTIFY wakes the owner."""
    slow_poll = dataclasses.replace(FAST, poll_interval=30.0, sweep_interval=30.0)
    worker = make_engine(db.dsns, config=slow_poll)
    client = make_engine(db.dsns, run_workers=False)
    async with worker, client:
        await asyncio.sleep(0.5)  # the worker's first claims found nothing and went idle
        t0 = time.monotonic()
        h = await client.start("quick", 4, tenant="notify-me")
        assert await h.result(timeout=10) == 8
        assert time.monotonic() - t0 < 10


async def test_a_single_tenant_backlog_drains_between_sweeps(db: PerTestDB) -> None:
    """A claim takes at most per_tenant_batch from a tenant; the shard stays 'hot' while it
    yields work, so a one-tenant backlog drains without waiting for full sweeps."""
    eng = db.engine(config=dataclasses.replace(FAST, sweep_interval=60.0, poll_interval=60.0))

    @eng.workflow(name="solo")
    async def solo(i: int) -> int:
        return i

    async with eng:
        await asyncio.sleep(0.3)  # the start-up sweep is over
        hs = [await eng.start(solo, i, tenant="solo-tenant") for i in range(200)]
        assert await asyncio.gather(*(h.result(timeout=20) for h in hs)) == list(range(200))


async def test_hot_shards_no_longer_owned_do_not_spin_the_claim_loop(db: PerTestDB) -> None:
    """Found by the failover drill: a claim that failed leaves its shards "hot"; if they
    were rebalanced away meanwhile, the claim loop must drop them, not spin on them
    without ever awaiting (which starved the event loop, so the heartbeat stopped)."""
    eng = db.engine()

    @eng.workflow(name="after_spin")
    async def after(x: int) -> int:
        return x

    async with eng:
        worker = eng._worker
        node = db.spec.nodes[0].name
        # as after a failover: every shard of the node rebalanced away, one still hot
        owned = worker.ownership.owned[node]
        stranger = db.spec.shard_map.shards_of(node)[0]
        owned.clear()
        worker._hot.setdefault(node, set()).add(stranger)
        worker._wake[node].set()
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(asyncio.sleep(0.3), timeout=5)  # the loop still turns
        assert asyncio.get_running_loop().time() - t0 < 2
        h = await eng.start(after, 7, tenant="after-spin")
        assert await h.result(timeout=30) == 7
