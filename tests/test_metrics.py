"""Prometheus metrics served by a worker process's engine, scraped over HTTP."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

from shardflow import InvalidArgument

from .conftest import PerTestDB
from .test_crash import wait_for


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


async def test_worker_metrics(db: PerTestDB) -> None:
    eng = db.engine()

    @eng.step(name="m.step")
    async def step(i: int) -> int:
        return i

    @eng.transaction(name="m.tx")
    async def tx(conn: object, i: int) -> int:
        return i

    @eng.workflow(name="m.flow")
    async def flow(i: int) -> int:
        return await step(i) + await tx(i)

    @eng.workflow(name="m.fails")
    async def fails() -> None:
        raise RuntimeError("no")

    port = eng.serve_metrics(0)
    async with eng:
        hs = [await eng.start(flow, i, tenant=f"m-{i % 3}") for i in range(12)]
        assert await asyncio.gather(*(h.result(timeout=30) for h in hs)) == [
            2 * i for i in range(12)]
        bad = await eng.start(fails, tenant="m-0")
        with pytest.raises(Exception, match="no"):
            await bad.result(timeout=30)
        # counted by the worker once its commit returns, which result() may beat
        await wait_for(lambda: eng.metrics["succeeded"] == 12, 10, "the successes counted")
        await wait_for(lambda: eng.metrics["failed"] == 1, 10, "the failure counted")
        m = await asyncio.to_thread(_scrape, port)
    assert m["shardflow_workflows_started_total"] == 13
    assert m['shardflow_workflows_finished_total{status="succeeded"}'] == 12
    assert m['shardflow_workflows_finished_total{status="failed"}'] == 1
    assert m['shardflow_step_duration_seconds_count{kind="step"}'] == 12
    assert m['shardflow_step_duration_seconds_count{kind="transaction"}'] == 12
    assert m["shardflow_claim_batch_size_sum"] >= 13  # every workflow claimed once
    # one worker owns every shard of every node
    owned = {k: v for k, v in m.items() if k.startswith("shardflow_owned_shards{")}
    assert sum(owned.values()) == db.spec.shard_map.shard_count and len(owned) == 3
    assert all(v > 0 for k, v in m.items() if k.startswith("shardflow_lease_renewals_total"))
    eng.prom.close()


def test_bad_metrics_port(db: PerTestDB) -> None:
    eng = db.engine()
    with pytest.raises(InvalidArgument, match="metrics port"):
        eng.serve_metrics(70000)
