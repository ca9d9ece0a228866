"""Faults of ``shardflow drill chaos``: worker processes, their network, the nodes.

The drill owns the worker processes (:class:`WorkerPool`), a TCP proxy in front of every
node through which the workers connect (``shardflow/netproxy.py``), and, on a local
cluster, the nodes' data directories. Each fault returns a record with its times; a
watcher started with it measures **recovery**: for a worker fault, until every workflow
the victim held at the fault is held by another worker or finished; for a node fault,
from the heal until a workflow checkpoints on that node again (or the node has no work
that is due). A fault that is not recovered from within its bound fails invariant (h).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from .chaos_flows import EXTRA_ENV
from .clusterfile import ClusterSpec
from .localcluster import find_binaries, run_as_postgres
from .netproxy import TcpProxy
from .shardmove import move_shard

KINDS = ("kill", "stop", "drop", "stall", "pg-restart", "move")
DEFAULT_KINDS = ("kill", "stop", "drop", "stall", "pg-restart")
RECOVERY_BOUND_S = 60.0  # a fault not recovered from within this fails invariant (h)
ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the drill dies, so no worker outlives
    a crashed drill (Linux; elsewhere a no-op)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class WorkerPool:
    """Worker processes running ``shardflow.chaos_flows:engine`` through the proxies."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopped: set[int] = set()  # pids under SIGSTOP
        self.extra: set[int] = set()  # pids registering chaos.extra

    def spawn(self, extra: bool | None = None) -> subprocess.Popen[bytes]:
        """A worker process; every other one (or as ``extra`` says) also registers
        ``chaos.extra``, so the workers register different workflow sets."""
        if extra is None:
            extra = len(self.procs) % 2 == 0
        env = {**self.env, EXTRA_ENV: "1"} if extra else self.env
        with (self.log_dir / f"worker-{len(self.procs)}.log").open("wb") as log:
            p = subprocess.Popen(
                [sys.executable, "-m", "shardflow.worker", "shardflow.chaos_flows:engine"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)  # noqa: PLW1509 (no threads of ours touch it)
        self.procs.append(p)
        if extra:
            self.extra.add(p.pid)
        return p

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def cont_all(self) -> None:
        for pid in list(self.stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            self.stopped.discard(pid)

    def stop_all(self) -> None:
        """SIGTERM (workflows handed back), SIGKILL after 20 s."""
        self.cont_all()
        for p in self.live():
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class NodeConn:
    """A monitoring connection to one node (direct, not proxied) that reconnects after a
    restart of the node."""

    def __init__(self, name: str, dsn: str) -> None:
        self.name, self.dsn = name, dsn
        self._conn: asyncpg.Connection | None = None

    async def connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.dsn, timeout=5)
        return self._conn

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        for attempt in range(2):
            try:
                conn = await self.connection()
                return list(await conn.fetch(query, *args, timeout=10))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    TimeoutError):
                await self.close()
                if attempt == 1:
                    raise
        return []

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)
            self._conn = None


@dataclass
class FaultContext:
    spec: ClusterSpec  # direct DSNs
    pool: WorkerPool
    proxies: dict[str, TcpProxy]
    nodes: list[NodeConn]
    run: str
    log: Any  # callable(str)
    watchers: list[asyncio.Task[None]] = field(default_factory=list)


def plan_faults(seed: int, kinds: list[str], duration: float, t_first: float = 3.0,
                gap: tuple[float, float] = (3.0, 6.0)) -> list[tuple[float, str, int]]:
    """``(at, kind, choice)``: every enabled kind in a seeded shuffle, again and again,
    so a short run still gets each kind once; ``choice`` picks the victim."""
    rng = random.Random(seed * 7919 + 1)
    out: list[tuple[float, str, int]] = []
    t, order = t_first, list[str]()
    while t < duration - 1.0 and kinds:
        if not order:
            order = list(kinds)
            rng.shuffle(order)
        out.append((round(t, 2), order.pop(0), rng.randrange(1 << 30)))
        t += rng.uniform(*gap)
    return out


async def _held_by(ctx: FaultContext, ids: list[str]) -> set[tuple[str, str]]:
    held: set[tuple[str, str]] = set()
    for n in ctx.nodes:
        with contextlib.suppress(Exception):
            for r in await n.fetch(
                    "SELECT tenant_id, workflow_id FROM shardflow.workflows "
                    "WHERE status = 'running' AND owner = ANY($1::text[])", ids):
                held.add((r["tenant_id"], r["workflow_id"]))
    return held


async def _worker_ids(ctx: FaultContext, pid: int) -> list[str]:
    ids: set[str] = set()
    for n in ctx.nodes:
        with contextlib.suppress(Exception):
            ids |= {r["worker_id"] for r in await n.fetch(
                "SELECT worker_id FROM shardflow.workers WHERE pid = $1", pid)}
    return sorted(ids)


async def _watch_orphans(ctx: FaultContext, rec: dict[str, Any], ids: list[str],
                         orphans: set[tuple[str, str]]) -> None:
    rec["orphans"] = len(orphans)
    if not orphans:
        rec["idle"] = True  # it held nothing: nothing to recover
        rec["recovered_s"] = 0.0
        return
    deadline = rec["t_fault"] + RECOVERY_BOUND_S
    while time.time() < deadline:
        if not (await _held_by(ctx, ids)) & orphans:
            rec["recovered_s"] = round(time.time() - rec["t_fault"], 3)
            return
        await asyncio.sleep(0.1)
    rec["detail"] = f"{len((await _held_by(ctx, ids)) & orphans)} of {len(orphans)} still held"


async def _watch_node(ctx: FaultContext, rec: dict[str, Any], node: NodeConn) -> None:
    deadline = rec["t_heal"] + RECOVERY_BOUND_S
    while time.time() < deadline:
        with contextlib.suppress(Exception):
            rows = await node.fetch(
                "SELECT EXISTS (SELECT 1 FROM shardflow.steps WHERE workflow_id LIKE $1 "
                "AND finished_at > to_timestamp($2)) AS moved, "
                "EXISTS (SELECT 1 FROM shardflow.workflows WHERE workflow_id LIKE $1 AND "
                "status IN ('pending', 'running') AND ready_at <= now()) AS due",
                ctx.run + "%", rec["t_heal"])
            if rows and rows[0]["moved"]:
                rec["recovered_s"] = round(time.time() - rec["t_heal"], 3)
                return
            if rows and not rows[0]["due"]:
                rec["idle"] = True  # nothing due on the node: nothing to resume
                rec["recovered_s"] = round(time.time() - rec["t_heal"], 3)
                return
        await asyncio.sleep(0.1)
    rec["detail"] = "no checkpoint on the node since the heal while work was due"


async def inject(ctx: FaultContext, n: int, kind: str, choice: int, t0: float
                 ) -> dict[str, Any]:
    """Inject one fault; returns its record (recovery is filled in by a watcher)."""
    rng = random.Random(choice)
    rec: dict[str, Any] = {"n": n, "kind": kind, "bound_s": RECOVERY_BOUND_S}
    names = [x.name for x in ctx.spec.nodes]
    if kind in ("kill", "stop"):
        live = [p for p in ctx.pool.live() if p.pid not in ctx.pool.stopped]
        if len(live) < 2:
            rec.update(skipped="fewer than two running workers", idle=True)
            return rec
        victim = live[rng.randrange(len(live))]
        ids = await _worker_ids(ctx, victim.pid)
        orphans = await _held_by(ctx, ids)
        rec.update(pid=victim.pid, workers=ids, t_fault=time.time())
        rec["at_s"] = round(rec["t_fault"] - t0, 2)
        if kind == "kill":
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            # orphans again: the victim may have claimed more since we looked
            orphans |= await _held_by(ctx, ids)
            ctx.pool.spawn()
            ctx.log(f"fault {n}: SIGKILL worker {victim.pid} ({len(orphans)} workflows "
                    "held); replacement started")
            ctx.watchers.append(asyncio.create_task(_watch_orphans(ctx, rec, ids, orphans)))
        else:
            hold = round(rng.uniform(2.0, 5.0), 2)
            os.kill(victim.pid, signal.SIGSTOP)
            ctx.pool.stopped.add(victim.pid)
            ctx.log(f"fault {n}: SIGSTOP worker {victim.pid} for {hold}s "
                    f"({len(orphans)} workflows held)")
            ctx.watchers.append(asyncio.create_task(_watch_orphans(ctx, rec, ids, orphans)))
            await asyncio.sleep(hold)
            os.kill(victim.pid, signal.SIGCONT)
            ctx.pool.stopped.discard(victim.pid)
            rec.update(hold_s=hold, t_heal=time.time())
        return rec
    node = names[rng.randrange(len(names))]
    conn = next(c for c in ctx.nodes if c.name == node)
    rec.update(node=node)
    if kind in ("drop", "stall"):
        hold = round(rng.uniform(2.0, 5.0), 2)
        rec["t_fault"] = time.time()
        await asyncio.to_thread(ctx.proxies[node].set_mode, kind)
        ctx.log(f"fault {n}: network to {node}: {kind} for {hold}s")
        await asyncio.sleep(hold)
        await asyncio.to_thread(ctx.proxies[node].set_mode, "pass")
        rec.update(hold_s=hold, t_heal=time.time())
    elif kind == "pg-restart":
        data_dir = ctx.spec.node(node).data_dir
        if not data_dir:
            rec.update(skipped="the cluster file names no data directory", idle=True)
            return rec
        mode = rng.choice(("fast", "immediate"))
        down = round(rng.uniform(1.0, 3.0), 2)
        pg_ctl = find_binaries().tool("pg_ctl")
        rec["t_fault"] = time.time()
        ctx.log(f"fault {n}: Postgres {node} stopped ({mode}) for {down}s")
        out = await asyncio.to_thread(run_as_postgres, [pg_ctl, "-D", data_dir, "-m", mode,
                                                        "-w", "-t", "60", "stop"], timeout=90)
        rec["stop_rc"] = out.returncode
        await asyncio.sleep(down)
        log = str(Path(data_dir).parent / "postgres.log")
        out = await asyncio.to_thread(run_as_postgres, [pg_ctl, "-D", data_dir, "-l", log,
                                                        "-w", "-t", "60", "start"], timeout=90)
        rec.update(mode=mode, down_s=down, start_rc=out.returncode, t_heal=time.time())
        if out.returncode != 0:
            rec["detail"] = f"pg_ctl start failed: {(out.stderr or out.stdout).strip()[:200]}"
    elif kind == "move":
        rows = await conn.fetch("SELECT shard_id, node FROM shardflow.shard_map ORDER BY 1")
        shard = rows[rng.randrange(len(rows))]["shard_id"]
        src = next(r["node"] for r in rows if r["shard_id"] == shard)
        target = rng.choice([x for x in names if x != src])
        rec.update(t_fault=time.time(), shard=shard, source=src, node=target)
        try:
            report = await asyncio.to_thread(move_shard, ctx.spec, shard, target)
            rec.update(pause_s=round(report.pause_s, 3), t_heal=time.time())
            ctx.log(f"fault {n}: shard {shard} moved {src} -> {target} "
                    f"(pause {report.pause_s * 1000:.0f} ms)")
        except Exception as exc:  # a refused move is reported, not fatal to the drill
            rec.update(t_heal=time.time(), move_error=str(exc)[:300], idle=True,
                       recovered_s=0.0)
            ctx.log(f"fault {n}: shard move refused: {exc}")
            return rec
        conn = next(c for c in ctx.nodes if c.name == target)
    rec["at_s"] = round(rec["t_fault"] - t0, 2)
    ctx.watchers.append(asyncio.create_task(_watch_node(ctx, rec, conn)))
    return rec
