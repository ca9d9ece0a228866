"""A frozen machine (SIGSTOP inside a transaction step) and a stalled node must not stop
recovery, heartbeats or cancels anywhere else (issue 14, defect 4)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import psycopg
import pytest

from shardflow.netproxy import TcpProxy

from .conftest import PerTestDB
from .flows import make_engine
from .test_crash import Workers, wait_for, workers  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow


async def test_a_frozen_worker_stops_neither_recovery_nor_cancels(
        db: PerTestDB, workers: Workers) -> None:  # noqa: F811
    """One worker is SIGSTOPped inside a transaction step (its workflow row locked),
    another is SIGKILLed mid-step: a survivor recovers every orphan of the killed one,
    a cancel of a workflow the frozen one holds returns, and the frozen one's other
    workflow is recovered once its session is ended, its transactional effect once."""
    frozen = workers.spawn(block=True)
    try:
        async with make_engine(db.dsns, run_workers=False) as client:
            await client.start("holder", tenant="frz-a", workflow_id="frozen-a")
            await client.start("holder", tenant="frz-b", workflow_id="frozen-b")
            await wait_for(lambda: all((workers.markers / f"frozen-{x}.h").exists()
                                       for x in "ab"), what="both transaction steps")
            os.kill(frozen.pid, signal.SIGSTOP)
            killed = workers.spawn(block=True)
            ids = [(f"tenant-{i}", f"wf-{i}") for i in range(6)]
            for tenant, wf in ids:
                await client.start("crashy", 1, tenant=tenant, workflow_id=wf)
            await wait_for(lambda: all((workers.markers / f"{wf}.x").exists()
                                       for _, wf in ids), what="the killed worker's steps")
            killed.kill()
            killed.wait()
            # a cancel of a workflow whose row the frozen worker locks: it returns once
            # a live worker's recovery ends the frozen session
            cancel = asyncio.create_task(client.cancel("frz-b", "frozen-b"))
            async with make_engine(db.dsns) as survivor:
                for tenant, wf in ids:
                    out = await (await survivor.get(tenant, wf)).result(timeout=30)
                    assert out[1] == "done-x"
                assert await asyncio.wait_for(cancel, timeout=30) == ["frozen-b"]
                assert await (await survivor.get("frz-a", "frozen-a")).result(
                    timeout=30) == "h"
                # (the frozen process is still stopped: only ending its session, by the
                # recovery of a live worker, released those row locks)
                assert frozen.poll() is None
            assert db.scalar("frz-a", "SELECT count(*) FROM public.effects "
                                      "WHERE workflow_id = 'frozen-a'") == 1
            assert db.scalar("frz-b", "SELECT count(*) FROM public.effects "
                                      "WHERE workflow_id = 'frozen-b'") == 0
    finally:
        if frozen.poll() is None:
            os.kill(frozen.pid, signal.SIGCONT)


async def test_a_stalled_node_does_not_expire_the_leases_on_the_others(
        db: PerTestDB) -> None:
    """Every packet to one node is held (the network stalls, nothing is dropped): the
    worker's heartbeats on the other nodes go on, so its leases there hold."""
    stalled = db.spec.nodes[1]
    proxy = TcpProxy("127.0.0.1", stalled.port)
    port = proxy.start()
    dsns = [d.replace(f"port={stalled.port}", f"port={port}").replace(
        f":{stalled.port}/", f":{port}/") for d in db.dsns]
    assert dsns != db.dsns
    others = [db.dsn_of(n.name) for n in db.spec.nodes if n.name != stalled.name]
    eng = make_engine(dsns)
    try:
        async with eng:
            worker_id = eng._worker.worker_id
            await asyncio.sleep(0.5)
            proxy.set_mode("stall")
            try:
                end = time.monotonic() + 4 * eng.config.lease_timeout
                while time.monotonic() < end:
                    for dsn in others:
                        with psycopg.connect(dsn, autocommit=True) as conn:
                            row: Any = conn.execute(
                                "SELECT lease_expires_at > now() FROM shardflow.workers "
                                "WHERE worker_id = %s", (worker_id,)).fetchone()
                        assert row is not None and row[0], f"lease expired on {dsn}"
                    await asyncio.sleep(0.2)
            finally:
                proxy.set_mode("pass")
    finally:
        proxy.stop()


async def test_a_stalled_node_does_not_stop_shard_ownership_on_the_others(
        db: PerTestDB) -> None:
    """While one node stalls, a worker that stops hands its shards on the other nodes
    over to the one that stays: the ownership loop, which visits the nodes in turn,
    gives up on the stalled one instead of waiting on it for ever."""
    stalled = db.spec.nodes[1]
    proxy = TcpProxy("127.0.0.1", stalled.port)
    port = proxy.start()
    dsns = [d.replace(f":{stalled.port}/", f":{port}/") for d in db.dsns]
    a, b = make_engine(dsns), make_engine(dsns)
    try:
        async with a:
            await b.open()
            await wait_for(lambda: 0 < a._worker.ownership.all_owned() < 16, what="a split")
            proxy.set_mode("stall")
            closing = asyncio.create_task(b.close())  # waits on the stalled node itself
            healthy = [n.name for n in db.spec.nodes if n.name != stalled.name]
            want = {n: set(a.shard_map.shards_of(n)) for n in healthy}

            def took_over() -> bool:
                return all(a._worker.ownership.owned.get(n, set()) == want[n]
                           for n in healthy)
            await wait_for(took_over, timeout=40, what="the shards of the healthy nodes")
            proxy.set_mode("pass")
            await asyncio.wait_for(closing, 60)
    finally:
        proxy.set_mode("pass")
        proxy.stop()
