"""Retention: finished workflows older than their tenant's retention are deleted with
their steps by the workers that own their shards; others are kept."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil

import pytest

from shardflow import InvalidArgument, WorkflowNotFound, clusterfile
from shardflow.cli import main as cli_main

from .conftest import PerTestDB, make_tempdir
from .flows import FAST


async def test_expired_workflows_are_deleted_per_tenant(db: PerTestDB) -> None:
    eng = db.engine(config=dataclasses.replace(FAST, retention_interval=0.2))

    @eng.step(name="r.step")
    async def step(i: int) -> int:
        return i

    @eng.workflow(name="r.flow")
    async def flow(i: int) -> int:
        return await step(i)

    async with eng:
        await eng.set_retention(0.5)  # every tenant...
        await eng.set_retention(3600, tenant="r-long")  # ...but this one
        short = [await eng.start(flow, i, tenant="r-short") for i in range(5)]
        long = [await eng.start(flow, i, tenant="r-long") for i in range(5)]
        for h in short + long:
            await h.result(timeout=30)

        async def gone(h: object) -> bool:
            # purged: the row is a tombstone of the id (its data gone) for the
            # idempotency window, then deleted (see test_promises)
            try:
                info = await eng.get_info(h.tenant, h.workflow_id)  # type: ignore[attr-defined]
            except WorkflowNotFound:
                return True
            return bool(info["status"] == "purged" and info["inputs"] is None)

        for _ in range(100):  # a retention pass every 0.2 s
            if all([await gone(h) for h in short]):
                break
            await asyncio.sleep(0.1)
        assert all([await gone(h) for h in short])
        assert not any([await gone(h) for h in long])
        assert eng.metrics["purged"] == 5
        settings = {r["tenant_id"]: r["keep_seconds"] for r in await eng.retention()}
        assert settings == {"*": 0.5, "r-long": 3600.0}
        with pytest.raises(InvalidArgument, match="retention seconds"):
            await eng.set_retention(-1)
    # the steps went with their workflows
    short_steps = db.scalar("r-short", "SELECT count(*) FROM shardflow.steps "
                            "WHERE tenant_id = %s", "r-short")
    long_steps = db.scalar("r-long", "SELECT count(*) FROM shardflow.steps "
                           "WHERE tenant_id = %s", "r-long")
    assert (short_steps, long_steps) == (0, 5)


def test_retention_cli(db: PerTestDB, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_tempdir("shardflow-ret-")
    try:
        clusterfile.save(db.cluster_spec(), d / "c.json")
        c = ["--cluster", str(d / "c.json")]
        assert cli_main(["retention", "set", "86400", *c]) == 0
        assert cli_main(["retention", "set", "60", "--tenant", "acme", *c]) == 0
        capsys.readouterr()
        assert cli_main(["retention", "list", "--json", *c]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert {r["tenant_id"]: r["keep_seconds"] for r in rows} == {"*": 86400, "acme": 60}
        assert cli_main(["retention", "clear", "--tenant", "acme", *c]) == 0
        assert cli_main(["retention", "set", "-5", *c]) == 2
        err = capsys.readouterr().err
        assert "retention seconds must be >= 0" in err
    finally:
        shutil.rmtree(d, ignore_errors=True)
