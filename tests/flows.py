"""Workflows shared by the tests and by worker subprocesses (``shardflow.worker``).

``engine`` is built from ``$SHARDFLOW_TEST_DSNS``; ``make_engine`` builds more engines
(other workers) with the same workflows registered.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import shardflow
from shardflow import Engine, EngineConfig

FAST = EngineConfig(
    lease_timeout=1.0,
    heartbeat_interval=0.2,
    recovery_interval=0.2,
    poll_interval=0.05,
    sweep_interval=0.2,
    suspend_after=1.0,
    step_backoff_base=0.01,
    connect_timeout=10.0,
)

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS public.effects (
    tenant_id   text NOT NULL,
    workflow_id text NOT NULL,
    what        text NOT NULL,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


def make_engine(dsns: list[str] | None = None, **kw: Any) -> Engine:
    if dsns is None:
        dsns = os.environ["SHARDFLOW_TEST_DSNS"].split(",")
    eng = Engine(dsns=dsns, config=kw.pop("config", FAST), **kw)

    @eng.transaction(name="record")
    async def record(conn: Any, what: str) -> int:
        await conn.execute(
            "INSERT INTO public.effects (tenant_id, workflow_id, what) VALUES ($1, $2, $3)",
            shardflow.tenant(), shardflow.workflow_id(), what)
        return int(await conn.fetchval(
            "SELECT count(*) FROM public.effects WHERE tenant_id = $1 AND workflow_id = $2",
            shardflow.tenant(), shardflow.workflow_id()))

    @eng.step(name="external")
    async def external(tag: str) -> str:
        # Marks its start in a file so a test knows when to SIGKILL the process; blocks
        # in the process that has SHARDFLOW_TEST_BLOCK set.
        marker = os.environ.get("SHARDFLOW_TEST_MARKER_DIR")
        if marker:
            Path(marker, f"{shardflow.workflow_id()}.{tag}").write_text(str(os.getpid()))
        if os.environ.get("SHARDFLOW_TEST_BLOCK"):
            await asyncio.sleep(3600)
        return f"done-{tag}"

    @eng.workflow(name="crashy")
    async def crashy(n: int) -> list[Any]:
        a = await record("before")
        b = await external("x")
        c = await record("after")
        return [a, b, c, n]

    @eng.step(name="nap")
    async def nap(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @eng.workflow(name="steady")
    async def steady(n: int) -> int:
        for i in range(3):
            await record(f"s{i}")
            await nap(0.05)
        return n

    @eng.transaction(name="hold")
    async def hold(conn: Any, tag: str) -> str:
        # Inside its transaction (the workflow row held FOR SHARE): marks its start,
        # then blocks in the process that has SHARDFLOW_TEST_BLOCK set, where a test
        # freezes it with SIGSTOP.
        marker = os.environ.get("SHARDFLOW_TEST_MARKER_DIR")
        if marker:
            Path(marker, f"{shardflow.workflow_id()}.{tag}").write_text(str(os.getpid()))
        if os.environ.get("SHARDFLOW_TEST_BLOCK"):
            await asyncio.sleep(3600)
        await conn.execute(
            "INSERT INTO public.effects (tenant_id, workflow_id, what) VALUES ($1, $2, $3)",
            shardflow.tenant(), shardflow.workflow_id(), tag)
        return tag

    @eng.workflow(name="holder")
    async def holder() -> str:
        return await hold("h")

    @eng.workflow(name="quick")
    async def quick(x: int) -> int:
        await record("q")
        return x * 2

    return eng


engine = make_engine() if "SHARDFLOW_TEST_DSNS" in os.environ else None
