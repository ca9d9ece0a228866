"""The hot path: group commit of checkpoints and starts, bulk starts, the fast claim."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest

import shardflow
from shardflow import EngineConfig, InvalidArgument, Start

from .conftest import FAST, PerTestDB


def _engine(db: PerTestDB, config: EngineConfig = FAST, **kw: object) -> shardflow.Engine:
    eng = db.engine(config=config, **kw)

    @eng.step(name="hp.step")
    async def step(i: int) -> int:
        return i + 1

    @eng.workflow(name="hp.flow")
    async def flow(n: int) -> int:
        total = 0
        for i in range(n):
            total += await step(i)
        return total

    return eng


def _count(db: PerTestDB, sql: str, *args: object) -> int:
    total = 0
    for node in db.spec.nodes:
        with db.connect(node.name) as conn:
            row = conn.execute(sql, args).fetchone()
            total += int(row[0]) if row else 0
    return total


async def test_concurrent_workflows_share_commits(db: PerTestDB) -> None:
    """200 workflows of 3 steps at once: every checkpoint is written exactly once, and
    the writes went in far fewer batches than rows (one commit carried many)."""
    eng = _engine(db)
    async with eng:
        handles = await asyncio.gather(*(
            eng.start("hp.flow", 3, tenant=f"gc-{i % 20}", workflow_id=f"w{i}")
            for i in range(200)))
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
        writers = list(eng._group.values())
    assert results == [6] * 200
    rows = sum(w.rows for w in writers)
    batches = sum(w.batches for w in writers)
    # 3 steps started + 3 finished + 1 workflow finished per workflow
    assert rows == 200 * 7
    assert batches < rows / 3, (batches, rows)
    assert _count(db, "SELECT count(*) FROM shardflow.steps WHERE status = 'done' "
                      "AND attempts = 1 AND tenant_id LIKE 'gc-%%'") == 600
    assert _count(db, "SELECT count(*) FROM shardflow.workflows WHERE status = 'succeeded' "
                      "AND tenant_id LIKE 'gc-%%'") == 200


async def test_a_batch_writes_nothing_for_a_workflow_it_does_not_own(db: PerTestDB) -> None:
    """A stale fence in a batch is refused for that row only; the others are written."""
    eng = _engine(db, run_workers=False)
    async with eng:
        h1 = await eng.start("hp.flow", 1, tenant="fence", workflow_id="a")
        h2 = await eng.start("hp.flow", 1, tenant="fence", workflow_id="b")
        shard = eng.shard_map.shard("fence")
        node = eng.driver.node_for_shard(shard)
        with db.connect(node.name) as conn:  # as a claim would: running, fence 1
            conn.execute("UPDATE shardflow.workflows SET status = 'running', fence = 1 "
                         "WHERE tenant_id = 'fence'")
        gc = eng.group_commit(node)
        assert gc is not None
        ok, stale = await asyncio.gather(
            gc.step_started("fence", shard, h1.workflow_id, 1, 0, "hp.step"),
            gc.step_started("fence", shard, h2.workflow_id, 7, 0, "hp.step"))
    assert ok == 1 and stale is None
    assert _count(db, "SELECT count(*) FROM shardflow.steps WHERE tenant_id = 'fence'") == 1


async def test_start_many_writes_every_row_once(db: PerTestDB) -> None:
    eng = _engine(db)
    starts = [Start(tenant=f"bulk-{i % 50}", args=(2,), workflow_id=f"b{i}")
              for i in range(3000)]
    async with eng:
        handles = await eng.start_many("hp.flow", starts)
        assert [h.workflow_id for h in handles[:3]] == ["b0", "b1", "b2"]
        # the same ids again: kept, not run twice
        again = await eng.start_many("hp.flow", starts[:100])
        assert len(again) == 100
        results = await asyncio.gather(*(h.result(timeout=120) for h in handles))
    assert results == [3] * 3000
    assert _count(db, "SELECT count(*) FROM shardflow.workflows "
                      "WHERE tenant_id LIKE 'bulk-%%'") == 3000
    assert _count(db, "SELECT count(*) FROM shardflow.steps WHERE tenant_id LIKE 'bulk-%%' "
                      "AND attempts = 1") == 6000


async def test_start_many_refuses_bad_input_before_writing(db: PerTestDB) -> None:
    eng = _engine(db, run_workers=False)
    async with eng:
        with pytest.raises(InvalidArgument, match=r"starts\[2\] \(tenant ''\)"):
            await eng.start_many("hp.flow", [Start(tenant="ok", args=(1,)),
                                             Start(tenant="ok2", args=(1,)),
                                             Start(tenant="", args=(1,))])
        with pytest.raises(InvalidArgument, match=r"starts\[0\] must be a shardflow.Start"):
            await eng.start_many("hp.flow", [("ok", 1)])  # type: ignore[list-item]
        with pytest.raises(InvalidArgument, match="unknown queue"):
            await eng.start_many("hp.flow", [Start(tenant="ok")], queue="nope")
    assert _count(db, "SELECT count(*) FROM shardflow.workflows WHERE tenant_id LIKE 'ok%%'"
                  ) == 0


async def test_start_without_group_commit_still_works(db: PerTestDB) -> None:
    eng = _engine(db, config=dataclasses.replace(FAST, group_commit=False))
    async with eng:
        hs = await asyncio.gather(*(eng.start("hp.flow", 2, tenant=f"solo-{i}")
                                    for i in range(20)))
        assert await asyncio.gather(*(h.result(timeout=60) for h in hs)) == [3] * 20
        assert eng._group == {} and eng._starts == {}


async def test_claims_take_the_oldest_ready_work_first(db: PerTestDB) -> None:
    """The fast claim takes ready rows oldest first across the shards it owns."""
    eng = _engine(db, run_workers=False)
    async with eng:
        old = [await eng.start("hp.flow", 0, tenant=f"age-{i}", workflow_id="old")
               for i in range(10)]
        await asyncio.sleep(0.05)
        await eng.start_many("hp.flow", [Start(tenant=f"age-{i}", args=(0,),
                                               workflow_id=f"new{k}")
                                         for i in range(10) for k in range(3)])
        claimed: list[str] = []
        for node in eng.driver.nodes.values():
            shards = eng.shard_map.shards_of(node.name)
            n_old = sum(eng.shard_map.node_of_shard(eng.shard_map.shard(h.tenant))
                        == node.name for h in old)
            if n_old:  # as many as there are old ones here: exactly those come first
                rows = await eng.driver.claim(node, shards, ["hp.flow"], "tester", n_old,
                                              8, 0)
                claimed += [r["workflow_id"] for r in rows]
    assert claimed == ["old"] * 10


async def test_transaction_steps_in_groups_commit_once_each(db: PerTestDB) -> None:
    """100 workflows whose transaction steps share groups: each step's write commits
    once with its checkpoint and sees its own workflow; a step that raises is rolled
    back alone (its group's other steps commit)."""
    eng = db.engine()
    for node in db.spec.nodes:
        with db.connect(node.name) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS public.grouped "
                         "(tenant_id text, workflow_id text, n int)")

    @eng.transaction(name="hp.write")
    async def write(conn: object, n: int) -> str:
        await conn.execute(  # type: ignore[attr-defined]
            "INSERT INTO public.grouped VALUES ($1, $2, $3)",
            shardflow.tenant(), shardflow.workflow_id(), n)
        if n % 10 == 7:
            raise ValueError(f"refused {n}")
        return f"{shardflow.tenant()}/{shardflow.workflow_id()}"

    @eng.workflow(name="hp.tx")
    async def tx(n: int) -> str:
        try:
            return await write(n)
        except shardflow.StepError:
            return "failed"

    async with eng:
        handles = await asyncio.gather(*(
            eng.start("hp.tx", i, tenant=f"tx-{i % 7}", workflow_id=f"t{i}")
            for i in range(100)))
        results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
        groups = sum(t.groups for t in eng._tx.values())
        steps = sum(t.steps for t in eng._tx.values())
    for i, r in enumerate(results):
        assert r == ("failed" if i % 10 == 7 else f"tx-{i % 7}/t{i}")
    assert steps == 100 and groups < steps, (groups, steps)
    rows: list[tuple[str, str, int]] = []
    for node in db.spec.nodes:
        with db.connect(node.name) as conn:
            rows += conn.execute("SELECT tenant_id, workflow_id, n FROM public.grouped"
                                 ).fetchall()
    # one write per succeeding step, filed under its own workflow; none of the failed
    assert sorted(rows) == sorted((f"tx-{i % 7}", f"t{i}", i) for i in range(100)
                                  if i % 10 != 7)


async def test_a_claim_over_many_shards_does_not_starve_a_tenant_behind_a_flood(
        db: PerTestDB) -> None:
    """A claim that spans every shard of a node (a sweep), with older work elsewhere that
    could fill the whole batch: a small tenant whose one workflow sits behind a flood in
    the same shard is still claimed in the first call."""
    eng = _engine(db, run_workers=False)
    async with eng:
        smap = eng.shard_map
        flood = "flood-0"
        shard = smap.shard(flood)
        node_name = smap.node_of_shard(shard)
        small = next(t for t in (f"small-{i}" for i in range(10_000))
                     if smap.shard(t) == shard)
        others = [t for t in (f"other-{i}" for i in range(10_000))
                  if smap.node_of_shard(smap.shard(t)) == node_name
                  and smap.shard(t) != shard][:20]
        # oldest first: other shards' work, then the flood, then the small tenant
        await eng.start_many("hp.flow", [Start(tenant=t, args=(0,)) for t in others
                                         for _ in range(3)])
        await eng.start_many("hp.flow", [Start(tenant=flood, args=(0,))
                                         for _ in range(100)])
        await eng.start_many("hp.flow", [Start(tenant=small, args=(0,), workflow_id="s")])
        node = eng.driver.nodes[node_name]
        rows = await eng.driver.claim(node, smap.shards_of(node_name), ["hp.flow"],
                                      "tester", 32, 8, 0)
    tenants = [r["tenant_id"] for r in rows]
    assert small in tenants, (len(rows), sorted(set(tenants)))
    assert len(rows) <= 32 and tenants.count(flood) <= 8


async def test_crowded_shards_all_get_claims(db: PerTestDB) -> None:
    """Every shard of a node crowded by a flood (as under a large backlog): each claim's
    budget fits one flood's share, so the fair claim serves one shard per call, and it
    must not be the same shard every call. Before migration 0015 the first crowded
    shard in the worker's list took every claim while the others waited (the 10M
    backlog run kept one shard's workflows pending until its drain timed out)."""
    eng = _engine(db, run_workers=False)
    async with eng:
        smap = eng.shard_map
        node_name = smap.node_of_shard(0)
        floods: dict[int, str] = {}
        for t in (f"crowd-{i}" for i in range(10_000)):
            sh = smap.shard(t)
            if smap.node_of_shard(sh) == node_name and sh not in floods:
                floods[sh] = t
            if len(floods) == 4:
                break
        for t in floods.values():
            await eng.start_many("hp.flow", [Start(tenant=t, args=(0,)) for _ in range(400)])
        node = eng.driver.nodes[node_name]
        seen: dict[str, int] = {}
        for _ in range(40):  # 320 rows claimed at most: no flood runs out
            rows = await eng.driver.claim(node, smap.shards_of(node_name), ["hp.flow"],
                                          "tester", 8, 8, 0)
            assert rows
            for r in rows:
                seen[r["tenant_id"]] = seen.get(r["tenant_id"], 0) + 1
    # every flood got claims (a shard missed by 40 uniform draws: p < 1e-4)
    assert sorted(seen) == sorted(floods.values()), seen

async def test_a_value_postgres_refuses_fails_only_its_own_workflow(db: PerTestDB) -> None:
    """A step result with a NUL character (valid JSON, refused by jsonb) is refused at
    the boundary for that workflow; the others sharing its group commits succeed."""
    eng = db.engine()

    @eng.step(name="hp.nul")
    async def nul(i: int) -> str:
        return "bad\x00value" if i == 7 else f"ok{i}"

    @eng.workflow(name="hp.nulflow")
    async def nulflow(i: int) -> str:
        return await nul(i)

    async with eng:
        handles = await asyncio.gather(*(eng.start("hp.nulflow", i, tenant=f"nul-{i % 3}")
                                         for i in range(20)))
        outcomes = await asyncio.gather(*(h.result(timeout=60) for h in handles),
                                        return_exceptions=True)
    for i, out in enumerate(outcomes):
        if i == 7:
            assert isinstance(out, shardflow.WorkflowFailed) and "NUL" in str(out), out
        else:
            assert out == f"ok{i}", out


def _most_rows(plans: list[str]) -> int:
    """The largest row count of any node of the plans Postgres ran (auto_explain)."""
    return max((int(n) for p in plans for n in re.findall(r"actual rows=(\d+)", p)),
               default=0)


def test_hot_statements_planned_on_an_empty_node_never_scan(db: PerTestDB) -> None:
    """The hot statements' plans are made once per connection. Plans made while the
    statistics said "nothing here" (a quiet node after a VACUUM) must still reach each
    row directly when a backlog and checkpoints arrive. Before migration 0013 the
    claim's UPDATE read every pending row of the node per call, its "has checkpoints"
    test every step row (a hashed subplan), tx_lock's too, and the finish UPDATE every
    running row. Checked in the plans Postgres ran (auto_explain, row counts of every
    plan node), on one connection that keeps its cached plans throughout."""
    node = db.spec.nodes[0].name
    smap = db.spec.shard_map
    shards = smap.shards_of(node)
    plans: list[str] = []
    with db.connect(node) as admin, db.connect(node) as conn:
        admin.execute("VACUUM ANALYZE shardflow.workflows, shardflow.steps")
        conn.add_notice_handler(lambda d: plans.append(d.message_primary or ""))
        for setting in ("SET auto_explain.log_min_duration = 0",
                        "SET auto_explain.log_nested_statements = on",
                        "SET auto_explain.log_analyze = on",
                        "SET auto_explain.log_timing = off",
                        "SET client_min_messages = log"):
            conn.execute(setting)
        conn.execute("LOAD 'auto_explain'")
        claim = ("SELECT tenant_id, shard_id, workflow_id, fence, fresh "
                 "FROM shardflow.claim_fast(%s::int[], %s::text[], %s, %s, %s, %s)")
        tx_lock = "SELECT idx, owned, recorded FROM shardflow.tx_lock(%s, %s, %s, %s, %s)"
        # plans made now, on an empty node (more than five calls: past the point
        # where a cached plan turns generic)
        for _ in range(6):
            assert conn.execute(claim, (shards, ["w"], "me", 10, 5, 0)).fetchall() == []
            assert conn.execute(tx_lock, (["x"], [shards[0]], ["x"], [1], [1])
                                ).fetchall() == [(1, False, False)]
        tenants = [t for t in (f"bl-{i}" for i in range(20_000))
                   if smap.node_of_shard(smap.shard(t)) == node][:500]
        # 3,000 pending workflows, 15,000 checkpoints of other (finished) workflows
        admin.execute(
            "INSERT INTO shardflow.workflows (tenant_id, shard_id, workflow_id, name, inputs)"
            " SELECT t, shardflow.shard_of(t, %s), 'w' || g, 'w', '{}'"
            " FROM unnest(%s::text[]) AS t, generate_series(1, 6) AS g",
            (smap.shard_count, tenants))
        admin.execute(
            "INSERT INTO shardflow.steps (tenant_id, shard_id, workflow_id, seq, name, kind,"
            " status) SELECT tenant_id, shard_id, 'old-' || workflow_id, g, 's', 'step',"
            " 'done' FROM shardflow.workflows, generate_series(1, 5) AS g")
        plans.clear()
        rows = conn.execute(claim, (shards, ["w"], "me", 10, 5, 0)).fetchall()
        assert len(rows) == 10 and all(r[4] for r in rows)
        update = [p for p in plans if "Update on workflows" in p]
        assert len(update) == 1, plans
        assert "Tid Scan" in update[0] and "Index Scan" not in update[0], update[0]
        assert _most_rows(plans) < 1000, plans

        t, sh, wf, fe, _ = (list(c) for c in zip(*rows, strict=True))
        plans.clear()
        locked = conn.execute(tx_lock, (t, sh, wf, fe, [1] * 10)).fetchall()
        assert sorted(locked) == [(i, True, False) for i in range(1, 11)]
        assert _most_rows(plans) < 1000, plans

        # finish them: one checkpoint batch of ten "workflow finished" rows
        plans.clear()
        done = conn.execute(
            "SELECT op, idx FROM shardflow.checkpoint_batch("
            "'{}','{}','{}','{}','{}','{}', '{}','{}','{}','{}','{}','{}','{}','{}','{}',"
            "'{}','{}', %s::text[], %s::int[], %s::text[], %s::bigint[], %s::text[],"
            " %s::text[], %s::text[])",
            (t, sh, wf, fe, ["succeeded"] * 10, ["1"] * 10, [None] * 10)).fetchall()
        assert sorted(done) == [(3, i) for i in range(1, 11)]
        update = [p for p in plans if "Update on workflows" in p]
        assert len(update) == 1, plans
        assert "Tid Scan" in update[0] and "Index Scan" not in update[0], update[0]
        assert _most_rows(plans) < 1000, plans
        assert admin.execute("SELECT count(*) FROM shardflow.workflows "
                             "WHERE status = 'succeeded' AND output = '1'").fetchone() == (10,)


def test_the_event_loop_is_chosen_by_shardflow_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers and the bench run on uvloop when it is installed, asyncio's loop on
    request, and a wrong SHARDFLOW_LOOP is refused with a message naming it."""
    from shardflow import loop
    from shardflow.errors import ConfigError

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    monkeypatch.setenv("SHARDFLOW_LOOP", "uvloop")
    assert loop.run(which()).startswith("uvloop")
    assert loop.loop_name() == "uvloop"
    monkeypatch.setenv("SHARDFLOW_LOOP", "asyncio")
    assert loop.run(which()).startswith("asyncio")
    assert loop.loop_name() == "asyncio"
    monkeypatch.setenv("SHARDFLOW_LOOP", "tokio")
    with pytest.raises(ConfigError, match=r"SHARDFLOW_LOOP.*'tokio'"):
        loop.run(which())


async def test_shardflow_statements_are_planned_for_their_values(db: PerTestDB) -> None:
    """shardflow's own connections plan every statement for its values (a generic plan
    cached while a partition looked empty would scan it once it has filled up); the lane
    where users' grouped transaction steps run keeps Postgres's default."""
    eng = _engine(db, run_workers=False)
    async with eng:
        node = next(iter(eng.driver.nodes.values()))
        async with eng.driver.pool(node).acquire() as conn:
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
        for lane in ("claim", "checkpoints"):
            pool = await eng.driver.lane(node, lane)
            assert await pool.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
        users = await eng.driver.lane(node, "transactions")
        assert await users.fetchval("SHOW plan_cache_mode") == "auto"


def test_a_claim_of_a_few_rows_does_not_claim_again_at_once() -> None:
    """Shards a claim drained (a few rows, every tenant under its share) wait for a
    notify; shards it may have stopped short in are claimed from again at once."""
    from shardflow.executor import _may_have_more

    def rows(*pairs: tuple[int, str]) -> list[dict[str, object]]:
        return [{"shard_id": s, "tenant_id": t} for s, t in pairs]

    assert _may_have_more(rows((1, "a"), (2, "b")), 64, 8) == set()
    # a tenant's whole share from shard 3: it may have more there
    assert _may_have_more(rows((1, "a"), *[(3, "t")] * 8), 64, 8) == {3}
    # half the limit or more: every shard it took from
    assert _may_have_more(rows(*[(s, f"t{s}") for s in range(32)]), 64, 8) == set(range(32))
