"""``shardflow demo``: cluster up, run real workflows across tenants, print a summary.

Each demo workflow does a transactional step (an inventory update committed with its
checkpoint), an external step, and a durable sleep. At the end an audit query checks, on
every node, that each started workflow succeeded once and each transactional effect
happened once.
"""

from __future__ import annotations

import asyncio
import platform
import time
from pathlib import Path
from typing import Any

import psycopg
from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from . import __version__, clusterfile, context
from .engine import Engine
from .localcluster import LocalCluster

_DEMO_DDL = """
CREATE TABLE IF NOT EXISTS public.demo_inventory (
    tenant_id text NOT NULL,
    order_id  text NOT NULL,
    reserved  int NOT NULL,
    PRIMARY KEY (tenant_id, order_id)
)
"""


def build_engine(cluster_file: Path) -> Engine:
    engine = Engine(cluster_file=cluster_file)

    @engine.transaction(name="demo.reserve")
    async def reserve(conn: Any, order_id: str, qty: int) -> int:
        await conn.execute(
            "INSERT INTO public.demo_inventory (tenant_id, order_id, reserved) "
            "VALUES ($1, $2, $3)", context.tenant(), order_id, qty)
        return qty

    @engine.step(name="demo.charge", retries=3)
    async def charge(order_id: str, cents: int) -> str:
        await asyncio.sleep(0.001)  # stands for a call to a payment API
        return f"receipt-{order_id}-{cents}"

    @engine.workflow(name="demo.checkout")
    async def checkout(order_id: str) -> str:
        await reserve(order_id, 1)
        receipt = await charge(order_id, 500)
        await context.sleep(0.01)
        return receipt

    return engine


async def _run(engine: Engine, workflows: int, tenants: int, console: Console
               ) -> dict[str, Any]:
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds
    async with engine:
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(400)

        async def one(i: int, progress: Progress, task: Any) -> None:
            async with sem:
                started = time.perf_counter()
                h = await engine.start("demo.checkout", f"o{i}", tenant=f"tenant-{i % tenants}",
                                       workflow_id=f"demo-{i}")
                await h.result(timeout=120)
                hist.record_value(int((time.perf_counter() - started) * 1e6))
                progress.advance(task)

        with Progress("[progress.description]{task.description}", BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("workflows", total=workflows)
            await asyncio.gather(*(one(i, progress, task) for i in range(workflows)))
        elapsed = time.perf_counter() - t0
    return {"elapsed": elapsed, "hist": hist}


def run_demo(*, nodes: int, workflows: int, tenants: int, directory: Path | None,
             console: Console) -> int:
    # where 'cluster up' would put it: --dir, else beside $SHARDFLOW_CLUSTER, else .shardflow
    lc = LocalCluster(clusterfile.local_dir(directory),
                      log=lambda m: console.print(f"[dim]{m}[/dim]"))
    spec = lc.up(nodes) if not lc.file.exists() else lc.up()
    console.print(f"cluster: {len(spec.nodes)} nodes, {spec.shard_map.shard_count} shards "
                  f"({lc.file})")
    for node in spec.nodes:
        with psycopg.connect(node.dsn, autocommit=True) as conn:
            conn.execute(_DEMO_DDL)
            conn.execute("DELETE FROM public.demo_inventory")
            conn.execute("DELETE FROM shardflow.workflows WHERE name = 'demo.checkout'")
            conn.execute("DELETE FROM shardflow.steps WHERE workflow_id LIKE 'demo-%'")
    engine = build_engine(lc.file)
    res = asyncio.run(_run(engine, workflows, tenants, console))
    hist: HdrHistogram = res["hist"]
    # Audit: every workflow succeeded once, every reservation happened once.
    succeeded = reserved = reruns = 0
    for node in spec.nodes:
        with psycopg.connect(node.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FILTER (WHERE status = 'succeeded') "
                               "FROM shardflow.workflows WHERE name = 'demo.checkout'").fetchone()
            succeeded += int(row[0]) if row else 0
            row = conn.execute("SELECT count(*) FROM public.demo_inventory").fetchone()
            reserved += int(row[0]) if row else 0
            row = conn.execute("SELECT coalesce(sum(attempts - 1), 0) FROM shardflow.steps "
                               "WHERE workflow_id LIKE 'demo-%'").fetchone()
            reruns += int(row[0]) if row else 0
    t = Table(title="shardflow demo")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("nodes / shards / tenants", f"{len(spec.nodes)} / {spec.shard_map.shard_count} / "
                                     f"{tenants}"),
        ("workflows completed", f"{succeeded} of {workflows}"),
        ("transactional effects", f"{reserved} (expected {workflows})"),
        ("external step re-runs", str(reruns)),
        ("throughput", f"{workflows / res['elapsed']:.0f} workflows/s"),
        ("latency p50 / p99 / max", f"{hist.get_value_at_percentile(50) / 1000:.1f} / "
                                    f"{hist.get_value_at_percentile(99) / 1000:.1f} / "
                                    f"{hist.get_max_value() / 1000:.1f} ms"),
        ("machine", f"{platform.machine()}, Python {platform.python_version()}, "
                    f"PostgreSQL {spec.settings.get('postgres_version', '?')}, "
                    f"shardflow {__version__}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    ok = succeeded == workflows and reserved == workflows
    console.print("[green]audit passed[/green]" if ok else "[red]audit FAILED[/red]")
    console.print(f"the cluster keeps running; stop it with: shardflow cluster down"
                  f"{' --dir ' + str(directory) if directory else ''}")
    return 0 if ok else 1
