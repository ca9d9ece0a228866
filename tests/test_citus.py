"""Citus mode on a real Citus cluster (a coordinator and two workers).

Skipped, with the reason, when the citus extension is not installed for the machine's
PostgreSQL (Citus is not packaged in Debian: build a 13.x release to run these).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import shardflow
from shardflow.clusterfile import ClusterSpec
from shardflow.localcluster import LocalCluster, citus_available, find_binaries

from .conftest import FAST, make_tempdir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not citus_available(find_binaries()),
                       reason="the citus extension is not installed for this PostgreSQL"),
]

ORDERS_DDL = """
CREATE TABLE IF NOT EXISTS public.orders (
    tenant_id text NOT NULL,
    order_id  text NOT NULL,
    cents     int NOT NULL,
    PRIMARY KEY (tenant_id, order_id)
)
"""


@pytest.fixture(scope="module")
def citus() -> Iterator[tuple[ClusterSpec, LocalCluster]]:
    base = make_tempdir("shardflow-citus-")
    lc = LocalCluster(base / "c")
    spec = lc.up(2, citus=True)
    with psycopg.connect(spec.nodes[0].dsn, autocommit=True) as conn:
        conn.execute(ORDERS_DDL)
        conn.execute("SELECT create_distributed_table('public.orders', 'tenant_id', "
                     "colocate_with => 'shardflow.workflows')")
    try:
        yield spec, lc
    finally:
        lc.down(purge=True)
        shutil.rmtree(base, ignore_errors=True)


def test_workflow_tables_are_distributed_and_colocated(citus: Any) -> None:
    spec, lc = citus
    with psycopg.connect(spec.nodes[0].dsn) as conn:
        rows = conn.execute(
            "SELECT logicalrelid::regclass::text, column_to_column_name(logicalrelid, partkey),"
            " colocationid FROM pg_dist_partition WHERE logicalrelid::regclass::text LIKE "
            "'shardflow.%' AND logicalrelid::regclass::text NOT LIKE '%\\_s0'").fetchall()
    tables = {r[0]: (r[1], r[2]) for r in rows}
    assert set(tables) == {"shardflow.workflows", "shardflow.steps", "shardflow.messages",
                           "shardflow.events"}
    assert {col for col, _ in tables.values()} == {"tenant_id"}
    assert len({coloc for _, coloc in tables.values()}) == 1
    roles = {s.name: s.role for s in lc.status()}
    assert roles == {"coordinator": "coordinator", "worker0": "citus worker",
                     "worker1": "citus worker"}
    assert sum(s.shards for s in lc.status()) > 0


async def test_workflows_and_colocated_transaction_steps(citus: Any) -> None:
    """Workflows run through the coordinator; a transaction step writes a business
    table colocated by tenant in the checkpoint's transaction, exactly once, on the
    same worker as the tenant's workflow rows."""
    spec, lc = citus
    engine = shardflow.Engine(cluster_file=lc.file, config=FAST)

    @engine.transaction(name="place_order")
    async def place_order(conn: Any, order_id: str, cents: int) -> int:
        await conn.execute("INSERT INTO public.orders (tenant_id, order_id, cents) "
                           "VALUES ($1, $2, $3)", shardflow.tenant(), order_id, cents)
        return cents

    @engine.step(name="notify")
    async def notify(order_id: str) -> str:
        return f"sent-{order_id}"

    @engine.workflow(name="citus_checkout")
    async def checkout(order_id: str) -> list[Any]:
        c = await place_order(order_id, 250)
        n = await notify(order_id)
        await shardflow.sleep(0.01)
        return [c, n]

    tenants = [f"citus-{i}" for i in range(12)]
    async with engine:
        hs = [await engine.start(checkout, f"o-{t}", tenant=t, workflow_id=f"o-{t}")
              for t in tenants]
        results = await asyncio.gather(*(h.result(timeout=60) for h in hs))
        again = await engine.start(checkout, "o-x", tenant=tenants[0], workflow_id=f"o-{tenants[0]}")
        assert await again.result(timeout=10) == [250, f"sent-o-{tenants[0]}"]
        listed = await engine.list_workflows(status="succeeded", limit=100)
    assert results == [[250, f"sent-o-{t}"] for t in tenants]
    assert {r["tenant_id"] for r in listed} >= set(tenants)
    with psycopg.connect(spec.nodes[0].dsn) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT tenant_id) FROM public.orders "
                           "WHERE tenant_id = ANY(%s)", (tenants,)).fetchone()
        assert row == (12, 12)
        # the tenant's order and its workflow checkpoint live in one shard group
        for t in tenants[:3]:
            a = conn.execute("SELECT get_shard_id_for_distribution_column('public.orders', %s::text)",
                             (t,)).fetchone()
            b = conn.execute("SELECT get_shard_id_for_distribution_column("
                             "'shardflow.steps', %s::text)", (t,)).fetchone()
            assert a is not None and b is not None
            na = conn.execute("SELECT nodeport FROM citus_shards WHERE shardid = %s",
                              (a[0],)).fetchone()
            nb = conn.execute("SELECT nodeport FROM citus_shards WHERE shardid = %s",
                              (b[0],)).fetchone()
            assert na == nb
    # the workers really hold the rows (not the coordinator)
    per_worker = []
    for node in spec.nodes[1:]:
        with psycopg.connect(node.dsn) as conn:
            conn.execute("SET citus.override_table_visibility TO off")  # show shard tables
            tables = conn.execute("SELECT relname FROM pg_class WHERE relname LIKE 'orders\\_%' "
                                  "AND relkind = 'r'").fetchall()
            n = 0
            for (rel,) in tables:
                r = conn.execute(f'SELECT count(*) FROM public."{rel}" WHERE tenant_id = ANY(%s)',
                                 (tenants,)).fetchone()
                n += int(r[0]) if r else 0
            per_worker.append(n)
    assert sum(per_worker) == 12 and all(n > 0 for n in per_worker)


async def test_workers_claim_from_placements_on_the_citus_workers(citus: Any) -> None:
    """Shard-aware workers on Citus lease the Citus shards of the workflow table
    (balanced between workers) and claim on the Citus worker holding each placement,
    not through the coordinator (citus#1985)."""
    spec, lc = citus
    coord, workers = spec.nodes[0], spec.nodes[1:]
    for node in spec.nodes:
        with psycopg.connect(node.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
    engines = [shardflow.Engine(cluster_file=lc.file, config=FAST) for _ in range(2)]
    for eng in engines:
        @eng.workflow(name="citus_direct")
        async def direct(i: int) -> int:
            return i * 2

    async with engines[0] as a, engines[1]:
        hs = [await a.start(direct, i, tenant=f"direct-{i}") for i in range(40)]
        assert await asyncio.gather(*(h.result(timeout=60) for h in hs)) == [
            i * 2 for i in range(40)]
        for _ in range(100):  # the second worker joins a tick later: wait for balance
            owned = [eng._worker.ownership.owned[coord.name] for eng in engines]
            if abs(len(owned[0]) - len(owned[1])) <= 1:
                break
            await asyncio.sleep(0.1)
        with psycopg.connect(coord.dsn) as conn:
            units = {r[0] for r in conn.execute(
                "SELECT shardid FROM pg_dist_shard "
                "WHERE logicalrelid = 'shardflow.workflows_s0'::regclass").fetchall()}
            leases = dict(conn.execute("SELECT shard_id, owner FROM shardflow.shard_leases")
                          .fetchall())
    assert owned[0] | owned[1] == units and not owned[0] & owned[1]
    assert abs(len(owned[0]) - len(owned[1])) <= 1
    assert set(leases) == units

    def claims(dsn: str, fn: str) -> int:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                               "WHERE query LIKE %s", (f"%shardflow.{fn}(%",)).fetchone()
            return int(row[0]) if row else 0

    # every Citus worker served claims; the coordinator only gave the queue budgets
    assert all(claims(w.dsn, "claim_tables") > 0 for w in workers)
    assert claims(coord.dsn, "claim_tables") == 0
    assert claims(coord.dsn, "claim_fair") == 0
    assert claims(coord.dsn, "queue_budgets") > 0


async def test_queue_limit_is_exact_and_a_flood_does_not_starve_on_citus(citus: Any) -> None:
    """On Citus the queue budgets come from the coordinator for the whole cluster, so a
    concurrency limit is exact; a tenant's flood does not delay another tenant."""
    spec, lc = citus
    eng = shardflow.Engine(cluster_file=lc.file, config=FAST)
    eng.queue("citus_limited", concurrency=3)
    running = {"now": 0, "peak": 0}
    release = asyncio.Event()

    @eng.workflow(name="citus_held", queue="citus_limited")
    async def held() -> None:
        running["now"] += 1
        running["peak"] = max(running["peak"], running["now"])
        await release.wait()
        running["now"] -= 1

    @eng.workflow(name="citus_quick")
    async def quick(i: int) -> int:
        return i

    async with eng:
        hs = [await eng.start(held, tenant=f"climit-{i}") for i in range(12)]
        for _ in range(100):
            if running["now"] >= 3:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # more claims would have happened by now
        assert running["now"] == 3 and running["peak"] == 3
        release.set()
        await asyncio.gather(*(h.result(timeout=30) for h in hs))
        assert running["peak"] == 3
    # the flood shares the small tenant's Citus shard: only fair claiming can save it
    def citus_shard(conn: Any, tenant: str) -> int:
        row = conn.execute("SELECT get_shard_id_for_distribution_column("
                           "'shardflow.workflows_s0', %s::text)", (tenant,)).fetchone()
        return int(row[0])

    small = "citus-small"
    with psycopg.connect(spec.nodes[0].dsn, autocommit=True) as conn:
        home = citus_shard(conn, small)
        big = next(t for t in (f"citus-big-{i}" for i in range(10_000))
                   if citus_shard(conn, t) == home)
        conn.execute(
            "INSERT INTO shardflow.workflows (tenant_id, shard_id, workflow_id, name, inputs,"
            " created_at, ready_at) SELECT %s, 0, 'f' || g, 'citus_quick', "
            "'{\"args\": [1], \"kwargs\": {}}', now() - interval '1 hour', "
            "now() - interval '1 hour' FROM generate_series(1, 5000) g", (big,))
    async with eng:
        await asyncio.sleep(0.3)  # the flood is being worked on
        h = await eng.start(quick, -1, tenant=small)
        assert await h.result(timeout=30) == -1
        left = len(await eng.list_workflows(tenant=big, status="pending", limit=10_000))
    assert left > 2_500
