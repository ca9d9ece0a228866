"""The benchmark workflow, shared by the bench's client and its worker processes.

Workers run ``python -m shardflow.worker loadtest.benchflows:engine``; the module-level
``engine`` reads its cluster file from ``$SHARDFLOW_BENCH_CLUSTER`` (falling back to the
usual ``$SHARDFLOW_CLUSTER`` / ``.shardflow/cluster.json``) and its engine settings from
``$SHARDFLOW_BENCH_CONFIG`` (JSON of EngineConfig fields), so the bench's client and its
workers are configured identically without editing this file.

One workflow, ``bench.flow(steps, payload, step_ms=0)``: ``steps - 1`` external steps
that do no work (so the figures are the engine's own cost per checkpoint; with
``step_ms`` each waits that long, as a call to another service would) and one transactional
step that inserts a row into ``public.bench_effects`` on the tenant's node, committed
with its checkpoint: the audit counts those rows to prove exactly-once.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import shardflow
from shardflow import Engine, EngineConfig

CLUSTER_ENV = "SHARDFLOW_BENCH_CLUSTER"
CONFIG_ENV = "SHARDFLOW_BENCH_CONFIG"
WORKFLOW_NAME = "bench.flow"

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS public.bench_effects (
    tenant_id   text NOT NULL,
    workflow_id text NOT NULL,
    seq         int NOT NULL
)
"""
# No unique constraint on purpose: a duplicate effect must be countable by the audit,
# not turned into an error that would hide it.


def config_from_env() -> EngineConfig:
    raw = os.environ.get(CONFIG_ENV)
    return EngineConfig(**json.loads(raw)) if raw else EngineConfig()


def make_engine(cluster_file: str | Path | None = None, *,
                config: EngineConfig | None = None, run_workers: bool = True) -> Engine:
    """An engine with the benchmark workflow registered."""
    path = cluster_file or os.environ.get(CLUSTER_ENV) or None
    eng = Engine(cluster_file=path, config=config or config_from_env(),
                 run_workers=run_workers)

    @eng.step(name="bench.noop")
    async def noop(i: int, ms: float = 0.0) -> int:
        if ms > 0:
            await asyncio.sleep(ms / 1000)  # stands for a call to another service
        return i

    @eng.transaction(name="bench.effect")
    async def effect(conn: Any, seq: int) -> int:
        await conn.execute(
            "INSERT INTO public.bench_effects (tenant_id, workflow_id, seq) "
            "VALUES ($1, $2, $3)", shardflow.tenant(), shardflow.workflow_id(), seq)
        return seq

    @eng.workflow(name=WORKFLOW_NAME)
    async def flow(steps: int, payload: str, step_ms: float = 0.0) -> int:
        # the payload rides in the inputs (written once at start, read at each claim);
        # the steps return small values so the payload is not multiplied per checkpoint
        for i in range(steps - 1):
            await noop(i, step_ms)
        await effect(steps - 1)
        return len(payload)

    return eng


# Built at import (no connection is made until the engine opens).
engine = make_engine()
