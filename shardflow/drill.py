"""``shardflow drill``: kill something real under load; measure recovery; audit integrity.

A drill is a bench run (same workers, same open-loop load, same dashboard and report)
with a fault injected ``--fault-at`` seconds into the load:

* ``worker-crash``: SIGKILL ``--kill K`` of the worker processes. Measured: how long
  each workflow the dead workers held ("orphan") waited until another worker took it
  over (p50/p99/max), from the kill.
* ``network``: the workers and the load reach node ``--node`` through a TCP proxy the
  drill controls; for ``--fault-for`` seconds it resets every connection and refuses
  new ones (``--mode drop``) or forwards nothing (``--mode stall``).
* ``failover``: SIGKILL node ``--node``'s primary (Patroni and its Postgres, as a machine
  loss) on a cluster started with ``shardflow cluster up --ha``; measured: detection
  (the old leader's key gone), promotion (a standby answers as primary), recovery.
* ``chaos``: ``shardflow drill chaos --help``: a seeded run of many faults at once with
  an audit of every invariant (shardflow/chaos.py; options of its own).

Every drill then reports throughput before the fault, the dip, the time until
completed/s is back to >= 90% of the pre-fault rate, and the **integrity audit**: every
acknowledged start completed exactly once (``lost``), no transactional step applied
twice (``duplicates_tx``), re-runs of non-transactional steps counted
(``reruns_external``). Reports go to ``results/<date>-drill-<kind>/`` (``drill.json``
with the fields below, ``report.md``, ``drill.png``) next to the bench's own files.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from . import clusterfile, ha
from .bench import (
    BenchOptions,
    FaultContext,
    check_output_paths,
    engine_config_json,
    pyplot,
    run_bench,
)
from .clusterfile import ClusterSpec, NodeSpec
from .config import EngineConfig, check_number
from .driver import dsn_for_server
from .errors import InvalidArgument, ShardflowError
from .netproxy import TcpProxy

DRILL_FIELDS = ("fault", "detect_s", "promote_s", "recovery_s", "throughput_before",
                "throughput_min", "lost", "duplicates_tx", "reruns_external",
                "acknowledged", "completed")

# Engine settings of the drills unless --engine-config says otherwise: a 1 s lease
# (heartbeat every 0.25 s) bounds how long a dead worker's workflows wait.
DRILL_ENGINE = {"lease_timeout": 1.0, "heartbeat_interval": 0.25, "recovery_interval": 0.25}


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))], 3)


# -- faults --------------------------------------------------------------------------------


@dataclass
class WorkerCrash:
    kill: int
    at: float

    async def run(self, ctx: FaultContext) -> dict[str, Any]:
        # connections of its own: the dashboard's poll uses the bench's meanwhile
        conns = [await asyncpg.connect(n.spec.dsn) for n in ctx.nodes]
        try:
            return await self._run(ctx, conns)
        finally:
            for c in conns:
                await c.close()

    async def _run(self, ctx: FaultContext, conns: list[asyncpg.Connection]) -> dict[str, Any]:
        await asyncio.sleep(self.at)
        victims = ctx.procs[: self.kill]
        pids = [p.pid for p in victims]
        ids = [r["worker_id"] for r in await conns[0].fetch(
            "SELECT worker_id FROM shardflow.workers WHERE pid = ANY($1::int[])", pids)]
        t_kill = time.time()
        ctx.killed.update(pids)  # on purpose: the bench must not fail the run for them
        for p in victims:
            os.kill(p.pid, signal.SIGKILL)
        ctx.console.log(f"drill: SIGKILLed worker processes {pids}")
        # the orphans: what the dead workers held at the kill (their rows still say so)
        orphans: dict[tuple[str, str], float | None] = {}
        for conn in conns:
            for r in await conn.fetch(
                    "SELECT tenant_id, workflow_id FROM shardflow.workflows "
                    "WHERE owner = ANY($1::text[]) AND status = 'running'", ids):
                orphans[(r["tenant_id"], r["workflow_id"])] = None
        # poll until every orphan runs again under a live worker (or has finished):
        # detected = released from the dead worker, resumed = claimed again
        detected: dict[tuple[str, str], float] = {}
        deadline = time.monotonic() + 120
        while any(v is None for v in orphans.values()) and time.monotonic() < deadline:
            waiting = [k for k, v in orphans.items() if v is None]
            now = time.time()
            for conn in conns:
                rows = await conn.fetch(
                    "SELECT tenant_id, workflow_id, status, owner FROM shardflow.workflows "
                    "WHERE tenant_id = ANY($1::text[]) AND workflow_id = ANY($2::text[]) "
                    "AND NOT (status = 'running' AND owner = ANY($3::text[]))",
                    [k[0] for k in waiting], [k[1] for k in waiting], ids)
                for r in rows:
                    key = (r["tenant_id"], r["workflow_id"])
                    if key not in orphans:
                        continue
                    detected.setdefault(key, now - t_kill)
                    if r["status"] != "pending":
                        orphans[key] = now - t_kill
            await asyncio.sleep(0.05)
        resumed = [v for v in orphans.values() if v is not None]
        return {
            "t_fault": t_kill, "killed_pids": pids, "killed_workers": ids,
            "orphans": len(orphans), "orphans_not_resumed": len(orphans) - len(resumed),
            "resume_s": {"p50": _pct(resumed, 50), "p99": _pct(resumed, 99),
                         "max": round(max(resumed), 3) if resumed else None},
            # the dead workers' lease lapsing, seen as their first orphan released
            "detect_s": round(min(detected.values()), 3) if detected else None,
        }


@dataclass
class NetworkFault:
    proxy: TcpProxy
    node: str
    mode: str
    at: float
    hold: float

    async def run(self, ctx: FaultContext) -> dict[str, Any]:
        await asyncio.sleep(self.at)
        t_fault = time.time()
        await asyncio.to_thread(self.proxy.set_mode, self.mode)
        ctx.console.log(f"drill: network to node {self.node}: {self.mode} for {self.hold:g}s")
        await asyncio.sleep(self.hold)
        await asyncio.to_thread(self.proxy.set_mode, "pass")
        t_heal = time.time()
        ctx.console.log(f"drill: network to node {self.node} restored")
        return {"t_fault": t_fault, "t_heal": t_heal, "node": self.node, "mode": self.mode,
                "fault_for_s": round(t_heal - t_fault, 3), "detect_s": None}


@dataclass
class PrimaryKill:
    """SIGKILL a node's primary as a machine loss: its Patroni, its postmaster and every
    backend. Then measure Patroni's detection (no leader in the cluster view of the
    survivors) and promotion (a standby answers /primary and accepts writes), and bring
    the old primary back as a standby (its rejoin, pg_rewind included, is reported)."""

    spec: ClusterSpec
    node: str
    at: float

    async def run(self, ctx: FaultContext) -> dict[str, Any]:
        state = ha.HAState.from_json(self.spec.settings["ha"])
        members = state.of(self.node)
        await asyncio.sleep(self.at)
        primary = None
        for m in members:
            if await asyncio.to_thread(m.is_primary):
                primary = m
        if primary is None:
            raise ShardflowError(f"node {self.node} has no primary to kill")
        others = [m for m in members if m is not primary]
        sync_before = [m.name for m in others if await asyncio.to_thread(m.is_sync_standby)]
        t_kill = time.time()
        pids = ha.kill_member(primary)
        ctx.console.log(f"drill: SIGKILLed primary {primary.name} of node {self.node} "
                        f"(Patroni and Postgres, {len(pids)} processes)")
        detect = promote = None
        new_primary = None
        while time.time() - t_kill < 90 and promote is None:
            for m in others:
                if detect is None and await asyncio.to_thread(_leader_gone, m, primary.name):
                    detect = time.time() - t_kill
                if (await asyncio.to_thread(m.is_primary)
                        and await asyncio.to_thread(_writable, m.pg_port)):
                    promote, new_primary = time.time() - t_kill, m.name
                    detect = detect if detect is not None else promote
            await asyncio.sleep(0.05)
        ctx.console.log(f"drill: {new_primary} promoted after {promote}s")
        # the old primary comes back as a standby of the new one
        patroni, _ = ha.find_tools()
        t_restart = time.time()
        await asyncio.to_thread(ha.start_member, patroni, primary)
        rejoin = None
        while time.time() - t_restart < 120:
            if await asyncio.to_thread(primary.is_replica):
                rejoin = round(time.time() - t_restart, 3)
                break
            await asyncio.sleep(0.2)
        return {"t_fault": t_kill, "node": self.node, "old_primary": primary.name,
                "new_primary": new_primary, "killed_pids": pids,
                "synchronous_replication": state.synchronous,
                "sync_standby_before": sync_before,
                "detect_s": round(detect, 3) if detect is not None else None,
                "promote_s": round(promote, 3) if promote is not None else None,
                "old_primary_rejoined_s": rejoin}


def _leader_gone(m: ha.Member, old: str) -> bool:
    code, body = ha.http_status(m.rest_port, "/cluster")
    if code != 200:
        return False
    leaders = [x.get("name") for x in json.loads(body).get("members", [])
               if x.get("role") == "leader"]
    return old not in leaders


def _writable(port: int) -> bool:
    import psycopg

    try:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres",
                             connect_timeout=1, autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            return row is not None and not row[0]
    except psycopg.Error:
        return False


# -- measurements --------------------------------------------------------------------------


def recovery_figures(finishes: list[float], t_fault: float, t_load_end: float,
                     window: float = 10.0) -> dict[str, float | None]:
    """From completion times (epoch s): mean completed/s over up to ``window`` seconds
    before the fault; the lowest 1-second rate after it (while load still arrived); and
    the time from the fault until a 1-second rate is back to >= 90% of the former."""
    finishes = sorted(finishes)
    first = finishes[0] if finishes else t_fault
    span = max(1.0, min(window, t_fault - first - 1.0))  # skip the first second (warm-up)
    before = sum(1 for f in finishes if t_fault - span <= f < t_fault) / span

    def rate(t: float) -> int:  # completions in [t - 1, t)
        lo = _bisect(finishes, t - 1.0)
        return _bisect(finishes, t) - lo

    steps = [t_fault + 1.0 + 0.1 * i for i in range(int(max(0.0, t_load_end - t_fault - 1) * 10))]
    rates = [(t, rate(t)) for t in steps]
    if not rates or before <= 0:
        return {"throughput_before": round(before, 1), "throughput_min": None,
                "recovery_s": None}
    t_min, low = min(rates, key=lambda x: x[1])
    recovery: float | None
    if low >= 0.9 * before:
        recovery = 0.0  # no dip below 90%
    else:
        back = next((t for t, r in rates if t > t_min and r >= 0.9 * before), None)
        recovery = round(back - t_fault, 2) if back is not None else None
    return {"throughput_before": round(before, 1), "throughput_min": float(low),
            "recovery_s": recovery}


def _bisect(xs: list[float], v: float) -> int:
    lo, hi = 0, len(xs)
    while lo < hi:
        mid = (lo + hi) // 2
        if xs[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


def drill_summary(kind: str, result: dict[str, Any], opts: BenchOptions) -> dict[str, Any]:
    """The drill's figures (``DRILL_FIELDS`` first) from a finished bench run."""
    fault = result["fault"] or {}
    rows: list[tuple[str, str, float, float | None]] = result["rows"]
    audit = result["audit"]
    acked = set(result["acked"] or [])
    in_db = {r[0] for r in rows}
    finishes = [float(r[3]) for r in rows if r[1] == "succeeded" and r[3] is not None]
    t_first = min((r[2] for r in rows), default=0.0)
    figures = recovery_figures(finishes, fault.get("t_fault", t_first),
                               t_first + opts.duration)
    lost = len(acked - in_db)
    summary: dict[str, Any] = {
        "fault": kind,
        "detect_s": fault.get("detect_s"),
        "promote_s": fault.get("promote_s"),
        "recovery_s": figures["recovery_s"],
        "throughput_before": figures["throughput_before"],
        "throughput_min": figures["throughput_min"],
        "lost": lost,
        "duplicates_tx": audit["duplicates"],
        "reruns_external": audit["reruns_external"],
        "acknowledged": len(acked),
        "completed": audit["completed"],
    }
    assert tuple(summary) == DRILL_FIELDS
    summary["unacknowledged_committed"] = len(in_db - acked)  # start errored, yet durable
    summary["failed"] = audit["failed"]
    summary["unfinished"] = audit["unfinished"]
    summary["client_errors"] = audit["start_errors"] + audit["result_errors"]
    summary["integrity_ok"] = (lost == 0 and audit["duplicates"] == 0
                               and audit["failed"] == 0 and audit["unfinished"] == 0
                               and audit["completed"] == len(in_db))
    summary["details"] = {k: v for k, v in fault.items() if not k.startswith("t_")}
    summary["fault_at_s"] = round(fault["t_fault"] - t_first, 3) if "t_fault" in fault else None
    summary["engine"] = opts.engine_config
    summary["bench_summary"] = str(Path(result["report_dir"]) / "summary.json")
    return summary


def _plot(report_dir: Path, rows: list[tuple[str, str, float, float | None]],
          fault: dict[str, Any], kind: str) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    t0 = min(r[2] for r in rows)
    ends = sorted(float(r[3]) - t0 for r in rows if r[1] == "succeeded" and r[3] is not None)
    starts = sorted(r[2] - t0 for r in rows)
    horizon = max([*ends, *starts, 1.0])
    xs = [0.25 * i for i in range(int(horizon * 4) + 1)]

    def per_sec(ts: list[float]) -> list[int]:
        return [_bisect(ts, x) - _bisect(ts, x - 1.0) for x in xs]

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(xs, per_sec(starts), label="started/s", alpha=0.6)
    ax.plot(xs, per_sec(ends), label="completed/s")
    if "t_fault" in fault:
        ax.axvline(fault["t_fault"] - t0, color="red", linestyle="--", label=f"fault: {kind}")
    if "t_heal" in fault:
        ax.axvline(fault["t_heal"] - t0, color="green", linestyle=":", label="healed")
    ax.set_xlabel("seconds since the first start")
    ax.set_ylabel("workflows per second (1 s window)")
    ax.set_title(f"drill {kind}: throughput around the fault")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "drill.png", dpi=110)
    plt.close(fig)


def _write(report_dir: Path, summary: dict[str, Any], command: str) -> None:
    (report_dir / "drill.json").write_text(json.dumps(summary, indent=2) + "\n")
    ok = summary["integrity_ok"]
    lines = [
        f"# Drill: {summary['fault']}",
        "",
        f"Integrity audit: **{'passed' if ok else 'FAILED'}**: {summary['acknowledged']:,} "
        f"acknowledged starts, {summary['lost']} lost, {summary['completed']:,} completed, "
        f"{summary['duplicates_tx']} transactional steps applied twice, "
        f"{summary['reruns_external']} re-runs of non-transactional steps (counted, "
        f"allowed), {summary['unacknowledged_committed']} starts that errored for the "
        f"client yet were committed (completed like the others), "
        f"{summary['client_errors']} client errors.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {k} | {summary[k]} |" for k in DRILL_FIELDS),
        f"| fault at (s after the first start) | {summary['fault_at_s']} |",
        "",
        "Details of the fault:",
        "",
        "```json",
        json.dumps(summary["details"], indent=2),
        "```",
        "",
        "`recovery_s`: from the fault until a 1-second window of completions is back to "
        "at least 90% of the mean rate before it (0 when it never fell below). "
        "`throughput_min`: the lowest 1-second window after the fault while load "
        "arrived. The load is open loop, so work that waited out the fault arrives late "
        "and completes in a burst after it.",
        "",
        "![drill](drill.png)",
        "",
        "Command:",
        "",
        "```sh",
        command,
        "```",
        "",
        "The bench's own report of this run (latency, cost per workflow, machine, "
        "versions, settings) follows.",
        "",
    ]
    bench_md = report_dir / "report.md"
    rest = bench_md.read_text() if bench_md.exists() else ""
    bench_md.write_text("\n".join(lines) + "\n---\n\n" + rest)


# -- the command -------------------------------------------------------------------------


def _node_named(spec: ClusterSpec, node: str) -> NodeSpec:
    names = [n.name for n in spec.nodes if n.role in ("primary", "coordinator")]
    if node.isdigit() and int(node) < len(names):
        node = names[int(node)]
    for n in spec.nodes:
        if n.name == node and n.role in ("primary", "coordinator"):
            return n
    raise ValueError(f"--node {node!r} is not a node of this cluster (nodes: "
                     f"{', '.join(names)}; or an index 0..{len(names) - 1})")


def _proxied_file(spec: ClusterSpec, target: NodeSpec, port: int, path: Path) -> Path:
    """A copy of the cluster file at ``path`` in which ``target`` is reached through the
    proxy on ``port``: the workers and the load use it; the drill itself (monitoring,
    the audit) goes direct."""
    proxied = ClusterSpec(
        nodes=tuple(NodeSpec(n.name, n.host, port, dsn_for_server(n.dsn, "127.0.0.1", port),
                             n.role, n.data_dir) if n.name == target.name else n
                    for n in spec.nodes),
        shard_map=spec.shard_map)
    clusterfile.save(proxied, path)
    return path


def run_drill(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    spec = clusterfile.load(Path(args.cluster_file))
    engine = {**DRILL_ENGINE, **engine_config_json(args.engine_config)}
    EngineConfig.from_mapping(engine, source="--engine-config")
    results = Path(args.results_dir)
    scenario = args.scenario or f"drill-{args.kind}"
    if not args.scenario and spec.kind == "ha" and not ha.HAState.from_json(
            spec.settings["ha"]).synchronous:
        scenario += "-async"  # its own report: the loss window differs
    # Every option is checked (BenchOptions checks the load's) before anything is
    # started or written: the network drill's proxy and its copy of the cluster file
    # (DSNs included) come after.
    opts = BenchOptions(
        cluster_file=Path(args.cluster_file), rate=args.rate, duration=args.duration,
        tenants=args.tenants, steps=args.steps, worker_processes=args.worker_processes,
        results_dir=results, scenario=scenario, engine_config=engine, payload_bytes=100,
        step_ms=args.step_ms, drain_timeout=args.drain_timeout)
    fault: Any
    proxy: TcpProxy | None = None
    monitor_spec: ClusterSpec | None = None
    if args.kind == "worker-crash":
        if args.kill >= args.worker_processes:
            raise ValueError(f"--kill {args.kill} would leave no worker process of "
                             f"--worker-processes {args.worker_processes}")
        fault = WorkerCrash(kill=args.kill, at=args.fault_at)
    elif args.kind == "network":
        target = _node_named(spec, args.node)
        proxy = TcpProxy(target.host, target.port)
        monitor_spec = spec
        fault = NetworkFault(proxy=proxy, node=target.name, mode=args.mode, at=args.fault_at,
                             hold=args.fault_for)
    else:
        if spec.kind != "ha":
            raise ValueError("the failover drill needs a cluster with standbys and "
                             "Patroni: 'shardflow cluster up --ha'")
        target = _node_named(spec, args.node)
        fault = PrimaryKill(spec=spec, node=target.name, at=args.fault_at)
    try:
        if proxy is not None:
            opts = dataclasses.replace(opts, cluster_file=_proxied_file(
                spec, target, proxy.start(), results / f".drill-network-{os.getpid()}.json"))
        result = run_bench(opts, console, fault=fault, monitor_spec=monitor_spec)
    finally:
        if proxy is not None:
            proxy.stop()
            Path(opts.cluster_file).unlink(missing_ok=True)
    summary = drill_summary(args.kind, result, opts)
    report_dir = Path(result["report_dir"])
    _plot(report_dir, result["rows"], result["fault"] or {}, args.kind)
    _write(report_dir, summary, "shardflow drill " + " ".join(sys.argv[2:]) if sys.argv[1:2]
           == ["drill"] else f"shardflow drill {args.kind} ...")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    t = Table(title=f"shardflow drill {args.kind}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k in (*DRILL_FIELDS, "unacknowledged_committed", "client_errors"):
        t.add_row(k, str(summary[k]))
    console.print(t)
    console.print("[green]integrity audit passed[/green]" if summary["integrity_ok"]
                  else "[red]integrity audit FAILED[/red]")
    console.print(f"report: {report_dir}")
    return summary


def add_arguments(p: argparse.ArgumentParser, cluster_help: str | None = None
                  ) -> None:
    p.add_argument("kind", choices=("failover", "worker-crash", "network"),
                   help="the fault; 'shardflow drill chaos --help' for the chaos run")
    p.add_argument("--cluster-file", type=Path, default=None, metavar="FILE",
                   help=cluster_help)
    p.add_argument("--rate", type=float, default=50.0, help="open-loop starts/s (default 50)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (30)")
    p.add_argument("--fault-at", type=float, default=10.0,
                   help="seconds into the load when the fault strikes (10)")
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--step-ms", type=float, default=100.0,
                   help="each external step waits this long (100), so that workflows are "
                        "in flight when the fault strikes")
    p.add_argument("--worker-processes", type=int, default=3)
    p.add_argument("--kill", type=int, default=1, help="worker-crash: processes to SIGKILL")
    p.add_argument("--node", default="0", help="failover/network: node name or index (0)")
    p.add_argument("--mode", choices=("drop", "stall"), default="drop",
                   help="network: reset connections (drop) or hang them (stall)")
    p.add_argument("--fault-for", type=float, default=5.0,
                   help="network: seconds the fault lasts (5)")
    p.add_argument("--engine-config", default="{}",
                   help=f"EngineConfig fields as JSON over the drill's {DRILL_ENGINE}")
    p.add_argument("--drain-timeout", type=float, default=180.0)
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--scenario", help="report directory name (default drill-<kind>)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write drill.json here")


def _chaos(argv: list[str]) -> int:
    """``shardflow drill chaos ...``: the chaos run (shardflow/chaos.py), which has its
    own options and reports its own errors."""
    try:
        from . import chaos
    except ImportError as exc:
        if exc.name != f"{__package__}.chaos":
            raise  # chaos is there, something it imports is not: say that
        raise ShardflowError("the chaos drill is not available in this version "
                             "(no module shardflow.chaos)") from exc
    return chaos.main(argv)


def main(argv: list[str] | None = None,
         console_factory: Callable[[], Console] = Console) -> int:
    """The drills' command line: every error is one line and exit 2, bad input before
    anything starts or is written."""
    from .cliutil import CLUSTER_HELP, OneLineParser, guarded

    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["chaos"]:
        return guarded("shardflow drill chaos", lambda: _chaos(args_in[1:]))
    p = OneLineParser(prog="shardflow drill", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, CLUSTER_HELP)

    def run() -> int:
        args = p.parse_args(args_in)
        args.cluster_file = clusterfile.resolve(args.cluster_file)
        # NaN-proof: every comparison with NaN is false, so each check says what is
        # right and refuses everything else
        for flag, value in (("--duration", args.duration), ("--fault-at", args.fault_at),
                            ("--fault-for", args.fault_for)):
            check_number(flag, value, low=0, low_open=True, high=7 * 86400,
                         error=InvalidArgument)
        check_number("--kill", args.kill, integer=True, low=1, high=256, error=InvalidArgument)
        if not args.fault_at < args.duration:
            raise ValueError(f"--fault-at must be inside the load (0 < {args.fault_at:g} < "
                             f"--duration {args.duration:g})")
        if not Path(args.cluster_file).is_file():
            raise ValueError(f"--cluster-file {args.cluster_file} does not exist (start a "
                             "cluster with 'shardflow cluster up')")
        check_output_paths(Path(args.results_dir), args.json)
        summary = run_drill(args, console_factory())
        return 0 if summary["integrity_ok"] else 1

    return guarded("shardflow drill", run)


if __name__ == "__main__":
    sys.exit(main())
