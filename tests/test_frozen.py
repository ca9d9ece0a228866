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
            t0 = time.monotonic()
            async with make_engine(db.dsns) as survivor:
                for tenant, wf in ids:
                    out = await (await survivor.get(tenant, wf)).result(timeout=30)
                    assert out[1] == "done-x"
                recovered = time.monotonic() - t0
                # a cancel of a workflow whose row the frozen worker locks returns
                assert await asyncio.wait_for(survivor.cancel("frz-b", "frozen-b"),
                                              timeout=20) == ["frozen-b"]
                assert await (await survivor.get("frz-a", "frozen-a")).result(
                    timeout=30) == "h"
                assert survivor.metrics["frozen_sessions_ended"] >= 1
            assert recovered < 25, recovered
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
