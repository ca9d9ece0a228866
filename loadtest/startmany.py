"""``python -m loadtest.startmany``: how fast starts alone go (bulk submission).

Starts ``--workflows`` bench workflows with ``engine.start_many`` (no workers run, so
nothing competes with the inserts), in ``--batch`` starts per call, spread over
``--tenants``, and prints one JSON line: rows, seconds, starts per second, and the
Postgres CPU seconds the nodes spent (from /proc, local clusters only). The rows are
then deleted (``--keep`` keeps them, e.g. as a backlog).

    python -m loadtest.startmany --cluster-file .shardflow/cluster.json --workflows 200000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from shardflow import Start

from .benchflows import WORKFLOW_NAME, make_engine


def _postgres_cpu_seconds() -> float:
    """CPU seconds used so far by every postgres process on this machine."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "postgres":
                    continue
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / tick


async def run(cluster_file: Path, workflows: int, tenants: int, batch: int,
              keep: bool) -> dict[str, float]:
    eng = make_engine(cluster_file, run_workers=False)
    async with eng:
        payload = "x" * 100
        starts = [Start(tenant=f"sm-{i % tenants}", args=(3, payload),
                        workflow_id=f"sm-{i}") for i in range(workflows)]
        cpu0, t0 = _postgres_cpu_seconds(), time.perf_counter()
        for k in range(0, workflows, batch):
            await eng.start_many(WORKFLOW_NAME, starts[k:k + batch])
        seconds = time.perf_counter() - t0
        cpu = _postgres_cpu_seconds() - cpu0
        if not keep:
            for node in eng.driver.nodes.values():
                async with eng.driver.transaction(node) as conn:
                    await conn.execute("DELETE FROM shardflow.workflows "
                                       "WHERE tenant_id LIKE 'sm-%'")
    return {"workflows": workflows, "seconds": round(seconds, 3),
            "starts_per_sec": round(workflows / seconds, 1),
            "postgres_cpu_us_per_start": round(cpu * 1e6 / workflows, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.startmany", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster-file", type=Path, default=Path(".shardflow/cluster.json"))
    p.add_argument("--workflows", type=int, default=200_000)
    p.add_argument("--tenants", type=int, default=1000)
    p.add_argument("--batch", type=int, default=20_000, help="starts per start_many call")
    p.add_argument("--keep", action="store_true", help="keep the rows")
    a = p.parse_args(argv)
    for name in ("workflows", "tenants", "batch"):
        if getattr(a, name) < 1:
            print(f"startmany: error: --{name} must be >= 1", file=sys.stderr)
            return 2
    if not a.cluster_file.is_file():
        print(f"startmany: error: --cluster-file {a.cluster_file} does not exist",
              file=sys.stderr)
        return 2
    print(json.dumps(asyncio.run(run(a.cluster_file, a.workflows, a.tenants, a.batch,
                                     a.keep))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
