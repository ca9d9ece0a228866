"""Cron schedules: every tick starts its workflow exactly once across racing workers;
catch-up after downtime skips or backfills; pause/resume; bad input."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter

import pytest

from shardflow import InvalidArgument, clusterfile
from shardflow.cli import main as cli_main

from .conftest import PerTestDB, make_tempdir


def _flows(eng: object) -> object:
    @eng.workflow(name="sched.tick")  # type: ignore[attr-defined]
    async def tick(label: str) -> str:
        return label

    return tick


def _tick_ids(db: PerTestDB, tenant: str) -> list[str]:
    with db.tenant_conn(tenant) as conn:
        return [r[0] for r in conn.execute(
            "SELECT workflow_id FROM shardflow.workflows WHERE tenant_id = %s "
            "AND name = 'sched.tick' ORDER BY workflow_id", (tenant,)).fetchall()]


async def test_each_tick_runs_once_across_workers(db: PerTestDB) -> None:
    engines = [db.engine() for _ in range(3)]
    for e in engines:
        _flows(e)
    async with engines[0] as a, engines[1], engines[2]:
        sid = await a.schedule("sched.tick", "hello", cron="* * * * * *", tenant="s-acme",
                               schedule_id="every-second")
        assert sid == "every-second"
        await asyncio.sleep(4.5)
        await a.pause_schedule("s-acme", sid)
        await asyncio.sleep(1.0)
        ids = _tick_ids(db, "s-acme")
        fired = (await a.schedules(tenant="s-acme"))[0]["fired"]
        assert 3 <= len(ids) <= 6 and len(ids) == fired  # one workflow per tick
        assert all(i.startswith("every-second@") for i in ids)
        assert len(set(ids)) == len(ids)
        for i in ids:
            h = await a.get(tenant="s-acme", workflow_id=i)
            assert await h.result(timeout=30) == "hello"
        await asyncio.sleep(1.5)  # paused: nothing more
        assert len(_tick_ids(db, "s-acme")) == len(ids)


# next_run_at goes back to the 10-second tick 100 s before now's: eleven ticks fall
# due from there to now's own tick; skip fires only the latest
@pytest.mark.parametrize("catch_up, expect", [("skip", 1), ("backfill", 11)])
async def test_catch_up_after_downtime(db: PerTestDB, catch_up: str, expect: int) -> None:
    tenant = f"s-{catch_up}"
    client = db.engine(run_workers=False)
    _flows(client)
    async with client:
        await client.schedule("sched.tick", "x", cron="*/10 * * * * *", tenant=tenant,
                              schedule_id="ten-s", catch_up=catch_up)
    # the workers were down for ~100 s
    with db.tenant_conn(tenant) as conn:
        row = conn.execute(
            "UPDATE shardflow.schedules SET next_run_at = "
            "date_trunc('minute', now()) - interval '100 seconds' + "
            "interval '10 seconds' * floor(extract(second FROM now()) / 10) "
            "WHERE tenant_id = %s RETURNING now()", (tenant,)).fetchone()
        conn.commit()
    assert row is not None
    cutoff = row[0].strftime("%Y%m%dT%H%M%SZ")

    def missed() -> list[str]:  # ticks due before the workers came back
        return [i for i in _tick_ids(db, tenant) if i.split("@")[1] <= cutoff]

    worker = db.engine()
    _flows(worker)
    async with worker:
        for _ in range(200):  # however loaded the machine, until the pass has run
            if len(missed()) >= expect:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # a second pass must not add any
        ids = missed()
    assert len(ids) == expect, ids
    assert Counter(_tick_ids(db, tenant)).most_common(1)[0][1] == 1


async def test_bad_schedules(db: PerTestDB) -> None:
    eng = db.engine(run_workers=False)
    _flows(eng)
    async with eng:
        with pytest.raises(InvalidArgument, match="must have 5 fields"):
            await eng.schedule("sched.tick", "x", cron="* * *", tenant="s-bad")
        with pytest.raises(InvalidArgument, match="catch_up"):
            await eng.schedule("sched.tick", "x", cron="* * * * *", tenant="s-bad",
                               catch_up="sometimes")
        with pytest.raises(InvalidArgument, match="no schedule"):
            await eng.pause_schedule("s-bad", "missing")
        assert await eng.schedules(tenant="s-bad") == []


def test_schedules_cli(db: PerTestDB, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_tempdir("shardflow-sched-")
    clusterfile.save(db.cluster_spec(), d / "c.json")
    c = ["--cluster", str(d / "c.json")]
    try:
        eng = db.engine(run_workers=False)
        _flows(eng)

        async def make() -> None:
            async with eng:
                await eng.schedule("sched.tick", "n", cron="0 3 * * *", tenant="s-cli",
                                   schedule_id="nightly")

        asyncio.run(make())
        assert cli_main(["schedules", "pause", "s-cli", "nightly", *c]) == 0
        capsys.readouterr()
        assert cli_main(["schedules", "list", "--json", *c]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(r["schedule_id"], r["paused"], r["cron"]) for r in rows] == [
            ("nightly", True, "0 3 * * *")]
        assert cli_main(["schedules", "resume", "s-cli", "nightly", *c]) == 0
        assert cli_main(["schedules", "pause", "s-cli", "nope", *c]) == 2
        assert "no schedule 'nope'" in capsys.readouterr().err
    finally:
        shutil.rmtree(d, ignore_errors=True)
