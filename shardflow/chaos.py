"""``shardflow drill chaos``: a seeded, Jepsen-style chaos run with an audit of every invariant.

A seeded script (``chaos_plan``) starts a mix of workflows from many tenants: steps,
transactional steps, durable sleeps longer than ``suspend_after``, messages (with and
without idempotency keys, one send retried after its message was consumed, sends from
other workflows), events, child workflows, timeouts, failing code, cancels, resumes,
forks and a queue with a concurrency limit. Worker processes run them through a TCP
proxy per node while seeded faults strike: SIGKILL of a worker (a replacement starts),
SIGSTOP/SIGCONT of a worker, a dropped or stalled node connection, a Postgres restart,
a shard move (``--faults``). After the drain, the audit (``chaos_audit.audit``, a pure
function of the driver's history and the rows) checks:

(a) no acknowledged start lost; (b) transactional effects exactly once; (c) messages
delivered exactly once; (d) each workflow in the terminal state its script implies;
(e) none dead unless its own code failed max_attempts times; (f) nothing pending or
running; (g) external re-runs counted; (h) every fault recovered from (times measured);
(i) forks are new workflows replaying their prefix.

Same seed, same script and fault schedule (the timing of a real run still varies).
Writes ``results/<date>-drill-chaos-seed<N>/`` (chaos.json, report.md, chaos.png).
Exit 0 when every invariant holds, 1 when one fails, 2 on bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import chaos_report, clusterfile
from .chaos_audit import DbSnapshot, History, Invariant, audit, snapshot
from .chaos_faults import (
    DEFAULT_KINDS,
    KINDS,
    FaultContext,
    NodeConn,
    WorkerPool,
    inject,
    plan_faults,
)
from .chaos_flows import (
    CHAOS_ENGINE,
    CONFIG_ENV,
    DEFERRED_DDL,
    DSNS_ENV,
    EFFECTS_DDL,
    LIMITED_CONCURRENCY,
    LIMITED_QUEUE,
    make_engine,
)
from .chaos_plan import Actor, make_plan
from .clusterfile import ClusterSpec
from .config import EngineConfig
from .driver import dsn_for_server
from .errors import ShardflowError
from .netproxy import TcpProxy

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ChaosOptions:
    duration: float = 30.0
    seed: int = 1
    workers: int = 3
    tenants: int = 20
    rate: float = 20.0
    faults: tuple[str, ...] = DEFAULT_KINDS
    drain_timeout: float = 180.0
    fault_gap: tuple[float, float] = (3.0, 6.0)


@dataclass
class ChaosResult:
    history: History
    invariants: list[Invariant]
    settings: dict[str, Any]
    machine: dict[str, Any]
    timeline: dict[str, list[float]] = field(default_factory=dict)  # epoch s
    t0: float = 0.0
    t_load_end: float = 0.0
    t_drained: float = 0.0
    workers_spawned: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(i.ok for i in self.invariants)


async def _wait_workers(nodes: list[NodeConn], pool: WorkerPool, timeout: float) -> None:
    """Until every worker process heartbeats on every node (start-up is not a fault)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {p.pid for p in pool.live()}
        seen = []
        for n in nodes:
            with contextlib.suppress(Exception):
                rows = await n.fetch("SELECT pid FROM shardflow.workers "
                                     "WHERE lease_expires_at > now()")
                seen.append(pids <= {r["pid"] for r in rows})
        if len(seen) == len(nodes) and all(seen):
            return
        for p in pool.procs:
            if p.poll() is not None:
                raise ShardflowError(f"worker process {p.pid} exited with code "
                                     f"{p.returncode} at start-up (see worker-*.log)")
        await asyncio.sleep(0.2)
    raise ShardflowError(f"worker processes did not heartbeat within {timeout:.0f}s")


async def _pending(nodes: list[NodeConn], run: str) -> int:
    """Workflows of the run still pending or running; a node that cannot be read
    counts as one (the drain goes on waiting rather than ending on a blind spot)."""
    total = 0
    for n in nodes:
        try:
            rows = await n.fetch("SELECT count(*) AS n FROM shardflow.workflows WHERE "
                                 "workflow_id LIKE $1 AND status IN ('pending', 'running')",
                                 run + "%")
            total += int(rows[0]["n"])
        except Exception:
            total += 1
    return total


async def run_chaos(opts: ChaosOptions, spec: ClusterSpec, console: Console,
                    work_dir: Path, log_dir: Path) -> ChaosResult:
    """One chaos run on ``spec`` (direct DSNs): gate files go to ``work_dir``, the worker
    processes' logs to ``log_dir``."""
    run = f"c{opts.seed}x{secrets.token_hex(3)}"
    gates = work_dir / "gates"
    gates.mkdir(parents=True, exist_ok=True)
    for spec_node in spec.nodes:
        with psycopg.connect(spec_node.dsn, autocommit=True) as conn:
            conn.execute(EFFECTS_DDL)
            conn.execute(DEFERRED_DDL)
    config = EngineConfig(**CHAOS_ENGINE)
    history = History(opts.seed, run, config.max_attempts, queue_limit=LIMITED_CONCURRENCY,
                      nodes=len(spec.nodes))
    plan = make_plan(opts.seed, duration=opts.duration, rate=opts.rate,
                     tenants=opts.tenants, run=run, gates=gates)
    for rec in plan:
        history.add(rec)
    proxies = {n.name: TcpProxy(n.host, n.port) for n in spec.nodes}
    proxied = [dsn_for_server(n.dsn, "127.0.0.1", proxies[n.name].start()) for n in spec.nodes]
    env = {**os.environ, DSNS_ENV: ",".join(proxied), CONFIG_ENV: json.dumps(CHAOS_ENGINE),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    pool = WorkerPool(env, log_dir)
    nodes = [NodeConn(n.name, n.dsn) for n in spec.nodes]
    client = make_engine([n.dsn for n in spec.nodes], config=config, run_workers=False)
    result = ChaosResult(history, [], {}, {})
    try:
        async with client:
            for _ in range(opts.workers):
                pool.spawn()
            await _wait_workers(nodes, pool, 90.0)
            result.machine = await _machine(nodes[0])
            await _play(opts, console, history, plan, client, pool, proxies, nodes, spec,
                        result)
            pool.stop_all()
            snap = await _snap(nodes, run)
            result.invariants = audit(history, snap)
            result.timeline = {
                "created": sorted(r.created_at for r in snap.workflows.values()),
                "finished": sorted(r.finished_at for r in snap.workflows.values()
                                   if r.finished_at is not None)}
            result.statuses = dict(Counter(r.status for r in snap.workflows.values()))
    finally:
        pool.stop_all()
        for p in proxies.values():
            p.stop()
        for n in nodes:
            await n.close()
    result.workers_spawned = len(pool.procs)
    return result


async def _snap(nodes: list[NodeConn], run: str) -> DbSnapshot:
    # connections of its own: the monitor's, cancelled a moment ago, may still be busy
    # with its last query ("another operation is in progress" ended a 10-minute run)
    conns = [await asyncpg.connect(n.dsn, timeout=10) for n in nodes]
    try:
        return await snapshot(conns, run)
    finally:
        for conn in conns:
            await conn.close()


async def _play(opts: ChaosOptions, console: Console, history: History, plan: list[Any],
                client: Any, pool: WorkerPool, proxies: dict[str, TcpProxy],
                nodes: list[NodeConn], spec: ClusterSpec, result: ChaosResult) -> None:
    counts = {"started": 0, "completed": 0, "faults": 0}
    t0 = time.time() + 0.5
    result.t0 = t0
    by_key = {f"{r.tenant}/{r.workflow_id}": r for r in plan}

    def started() -> None:
        counts["started"] += 1

    actors = [asyncio.create_task(Actor(client, r, by_key, t0, started).run()) for r in plan]
    ctx = FaultContext(spec, pool, proxies, nodes, history.run, console.log)
    schedule = plan_faults(opts.seed, list(opts.faults), opts.duration, gap=opts.fault_gap)

    async def faults() -> None:
        for i, (at, kind, choice) in enumerate(schedule):
            await asyncio.sleep(max(0.0, t0 + at - time.time()))
            try:
                rec = await inject(ctx, i + 1, kind, choice, t0)
            except Exception as exc:  # a fault that cannot be injected is reported
                rec = {"n": i + 1, "kind": kind, "error": f"{type(exc).__name__}: {exc}",
                       "idle": True}
                console.log(f"fault {i + 1} {kind} could not be injected: {exc}")
            history.faults.append(rec)
            counts["faults"] += 1

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                        console=console, transient=False)
    done_at = time.time() + opts.duration
    with progress:
        task = progress.add_task("chaos", total=opts.duration, info="")

        async def monitor() -> None:
            while True:
                done = running_limited = 0
                for n in nodes:
                    with contextlib.suppress(Exception):
                        row = (await n.fetch(
                            "SELECT count(*) FILTER (WHERE status IN ('succeeded', 'failed', "
                            "'cancelled', 'dead')) AS d, count(*) FILTER (WHERE status = "
                            "'running' AND queue = $2) AS q FROM shardflow.workflows "
                            "WHERE workflow_id LIKE $1", history.run + "%", LIMITED_QUEUE))[0]
                        done += int(row["d"])
                        running_limited += int(row["q"])
                counts["completed"] = max(counts["completed"], done)
                history.queue_running_max = max(history.queue_running_max, running_limited)
                now = time.time()
                progress.update(task, completed=min(opts.duration, max(0.0, now - t0)),
                                description="load" if now < done_at else "drain",
                                info=f"started {counts['started']}/{len(plan)}  completed "
                                     f"{counts['completed']}  faults {counts['faults']}/"
                                     f"{len(schedule)}")
                await asyncio.sleep(0.5)

        mon = asyncio.create_task(monitor())
        fault_task = asyncio.create_task(faults())
        await fault_task
        await asyncio.sleep(max(0.0, done_at - time.time()))
        result.t_load_end = time.time()
        # heal everything still broken, keep the worker count, then drain
        pool.cont_all()
        for p in proxies.values():
            await asyncio.to_thread(p.set_mode, "pass")
        while len(pool.live()) < opts.workers:
            pool.spawn()
        if not any(p.pid in pool.extra for p in pool.live()):
            pool.spawn(extra=True)  # chaos.extra needs a worker that knows it
        deadline = time.monotonic() + opts.drain_timeout
        _, pending = await asyncio.wait(actors, timeout=opts.drain_timeout)
        for a in pending:
            a.cancel()
        # polling the database: the workflows end in other processes
        while time.monotonic() < deadline and await _pending(nodes, history.run):  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        if ctx.watchers:
            await asyncio.wait(ctx.watchers, timeout=max(1.0, deadline - time.monotonic()))
        result.t_drained = time.time()
        mon.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await mon
    result.settings = {
        "duration_s": opts.duration, "seed": opts.seed, "workers": opts.workers,
        "tenants": opts.tenants, "rate": opts.rate, "faults": list(opts.faults),
        "drain_timeout_s": opts.drain_timeout, "planned_workflows": len(plan),
        "fault_schedule": schedule, "engine": CHAOS_ENGINE, "run": history.run,
        "nodes": [n.name for n in spec.nodes], "shards": spec.shard_map.shard_count,
    }


async def _machine(node: NodeConn) -> dict[str, Any]:
    pg = "?"
    with contextlib.suppress(Exception):
        pg = str((await node.fetch("SHOW server_version"))[0][0])
    return {"cpus": os.cpu_count(), "postgres": pg, "python": platform.python_version(),
            "platform": platform.platform()}


# -- the command -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardflow drill chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (30)")
    p.add_argument("--seed", type=int, default=1, help="the script's seed (1)")
    p.add_argument("--workers", type=int, default=3, help="worker processes (3)")
    p.add_argument("--tenants", type=int, default=20, help="tenants (20)")
    p.add_argument("--rate", type=float, default=20.0, help="workflows started per second (20)")
    p.add_argument("--faults", default=",".join(DEFAULT_KINDS),
                   help=f"fault kinds, comma separated, of {', '.join(KINDS)}; 'none' for "
                        f"none (default {','.join(DEFAULT_KINDS)})")
    p.add_argument("--fault-gap", default="3,6", help="seconds between faults, min,max (3,6)")
    p.add_argument("--out", type=Path, help="report directory (default results/<date>-drill-"
                                            "chaos-seed<N>)")
    p.add_argument("--cluster-file", type=Path,
                   help="an existing cluster (default: a fresh local cluster in a temp dir)")
    p.add_argument("--nodes", type=int, default=3, help="nodes of the fresh cluster (3)")
    p.add_argument("--shards", type=int, default=16, help="shards of the fresh cluster (16)")
    p.add_argument("--drain-timeout", type=float, default=180.0)
    return p


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise _ArgError(message)


def parse(argv: list[str]) -> tuple[argparse.Namespace, ChaosOptions]:
    p = _parser()
    p.__class__ = _Parser  # one-line errors, raised (exit 2 in main)
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.faults.split(",") if k and k != "none")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise _ArgError(f"--faults: unknown kind(s) {', '.join(bad)} (kinds: {', '.join(KINDS)})")
    try:
        gap = tuple(float(x) for x in args.fault_gap.split(","))
    except ValueError:
        gap = ()
    if len(gap) != 2 or not 0 < gap[0] <= gap[1]:
        raise _ArgError(f"--fault-gap must be 'min,max' seconds, got {args.fault_gap!r}")
    for name in ("duration", "rate", "drain_timeout"):
        if getattr(args, name) <= 0:
            raise _ArgError(f"--{name.replace('_', '-')} must be > 0")
    for name, low in (("workers", 2 if {"kill", "stop"} & set(kinds) else 1), ("tenants", 1),
                      ("nodes", 1), ("shards", 1)):
        if getattr(args, name) < low:
            raise _ArgError(f"--{name} must be >= {low}")
    if args.cluster_file is not None and not args.cluster_file.is_file():
        raise _ArgError(f"--cluster-file {args.cluster_file} does not exist")
    return args, ChaosOptions(duration=args.duration, seed=args.seed, workers=args.workers,
                              tenants=args.tenants, rate=args.rate, faults=kinds,
                              drain_timeout=args.drain_timeout, fault_gap=(gap[0], gap[1]))


def main(argv: list[str]) -> int:
    try:
        args, opts = parse(argv)
    except _ArgError as exc:
        print(f"shardflow drill chaos: error: {exc}", file=sys.stderr)
        return 2
    console = Console()
    out = args.out or Path("results") / (f"{dt.date.today().isoformat()}-drill-chaos-"
                                         f"seed{opts.seed}")
    work = Path(tempfile.mkdtemp(prefix="shardflow-chaos-", dir="/tmp"))
    work.chmod(0o755)  # the postgres OS user reaches the cluster under it
    lc = None
    try:
        if args.cluster_file is not None:
            spec = clusterfile.load(args.cluster_file)
        else:
            from .localcluster import LocalCluster

            console.log(f"starting a local {args.nodes}-node cluster in {work}")
            lc = LocalCluster(work / "cluster")
            spec = lc.up(args.nodes, shard_count=args.shards)
        logs = out / "workers"
        logs.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(run_chaos(opts, spec, console, work, logs))
        report_dir = chaos_report.write(out, result, "shardflow drill chaos " + " ".join(argv))
    except (ShardflowError, OSError, psycopg.Error) as exc:
        print(f"shardflow drill chaos: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if lc is not None:
            with contextlib.suppress(Exception):
                lc.down(purge=True)
        shutil.rmtree(work, ignore_errors=True)
    chaos_report.print_summary(console, result, report_dir)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
