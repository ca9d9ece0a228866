"""Measure workflow starts on Citus: through the coordinator vs on the tenant's placement.

    python -m loadtest.citus_starts --cluster-file DIR/cluster.json [--starts 2000]

Runs the engine's own ``insert_workflow`` statement (``shardflow/sql/queries.sql``) with
``--concurrency`` connections, first through the coordinator (Citus routes each insert
to the worker holding the tenant's shard), then directly on the worker that holds each
tenant's placement (Citus 11+ syncs metadata to workers, so a worker accepts the insert
and executes it locally when the shard is its own). Prints starts/s and latency
percentiles for both. Placements are looked up once per tenant on the coordinator
(``get_shard_id_for_distribution_column``, ``citus_shards``), as a client would cache them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path

import asyncpg

from shardflow import clusterfile
from shardflow.driver import Q


async def _run(pools: dict[str, asyncpg.Pool], route: dict[str, str], tenants: list[str],
               starts: int, concurrency: int) -> tuple[float, list[float]]:
    lat: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(starts):
        queue.put_nowait(i)

    async def client() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            tenant = tenants[i % len(tenants)]
            pool = pools[route[tenant]]
            t0 = time.perf_counter()
            await pool.fetchrow(Q["insert_workflow"], tenant, 0, str(uuid.uuid4()),
                                "citus.start", "default", 0, '{"args": [], "kwargs": {}}',
                                None, 20, None, 3600.0, False)
            lat.append((time.perf_counter() - t0) * 1000)

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return starts / (time.perf_counter() - t), lat


async def main_async(cluster_file: Path, starts: int, concurrency: int, tenants_n: int) -> None:
    spec = clusterfile.load(cluster_file)
    coord = spec.nodes[0]
    tenants = [f"cs-{i}" for i in range(tenants_n)]
    conn = await asyncpg.connect(coord.dsn)
    placement: dict[str, str] = {}
    for t in tenants:
        port = await conn.fetchval(
            "SELECT nodeport FROM citus_shards WHERE shardid = "
            "get_shard_id_for_distribution_column('shardflow.workflows_s0', $1::text)", t)
        placement[t] = next(n.dsn for n in spec.nodes if n.port == port)
    pools = {n.dsn: await asyncpg.create_pool(n.dsn, min_size=concurrency,
                                              max_size=concurrency) for n in spec.nodes}
    out = {}
    for mode, route in (("coordinator", dict.fromkeys(tenants, coord.dsn)),
                        ("placement", placement)):
        rate, lat = await _run(pools, route, tenants, starts, concurrency)
        q = statistics.quantiles(lat, n=100)
        out[mode] = {"starts_per_sec": round(rate, 1), "p50_ms": round(q[49], 2),
                     "p99_ms": round(q[98], 2)}
    # the measured rows are parked (delay 1 h): remove them
    await conn.execute("DELETE FROM shardflow.workflows WHERE name = 'citus.start'")
    await conn.close()
    for p in pools.values():
        await p.close()
    print(json.dumps({"starts": starts, "concurrency": concurrency, "tenants": tenants_n,
                      "workers": len(spec.nodes) - 1, **out}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster-file", type=Path, required=True)
    p.add_argument("--starts", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tenants", type=int, default=200)
    a = p.parse_args()
    asyncio.run(main_async(a.cluster_file, a.starts, a.concurrency, a.tenants))


if __name__ == "__main__":
    main()
