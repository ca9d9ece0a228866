"""``python -m loadtest.perfreport``: the performance report of a shardflow cluster.

Runs ``shardflow bench`` (``python -m shardflow.bench``) as one subprocess per measurement,
each writing its summary with ``--json``, and turns the summaries into figures, a report
and a capacity model::

    .venv/bin/python -m loadtest.perfreport --cluster-file .shardflow/cluster.json \\
        --out results/$(date +%F)-performance [--quick] [--skip-peer] [--max-backlog N]

Run it from the repository root (the bench's workers import ``loadtest.benchflows``).
It writes into ``--out``: ``throughput_vs_workers.png``, ``throughput_vs_tenants.png``,
``throughput_vs_backlog.png``, ``latency_vs_rate.png``, ``cost_per_workflow.png``,
``dbos_comparison.png`` (unless ``--skip-peer``), ``report.md`` (every figure with the
commands that made it, a table of all runs, the machine and settings, and the capacity
model), ``perf.json`` (every raw summary) and ``runs/`` (each bench run's own report, its
summary and its output).

How each figure is measured, and why:

* **Maximum throughput** (vs worker processes, tenants, backlog) is measured at
  saturation: an open loop far above capacity (4x the calibrated maximum) bounded by
  ``--workflows`` (the calibrated maximum times ~20 s), so the arrivals come in the
  first quarter of the run and the workers always have work until the last one
  completes; throughput = completed / (first start to last completion). A closed loop
  would bound throughput by its own result polling; an unbounded open loop above
  capacity would grow the drain without end. A first, shorter saturation run calibrates
  the maximum (its figures are in the table too). A run that did not saturate (it
  completed at >= 90% of the offered rate) is repeated once at 4x the rate.
* **Backlog**: the same saturating load with N pending workflows preloaded
  (``--backlog``, priority below the run's, see ``shardflow/bench.py``); the plotted
  throughput counts every completion in the run, the backlog's included
  (``completed_per_sec_all``).
* **Latency vs offered rate**: open-loop runs at fractions of the measured maximum
  (2 worker processes, 10% to 110%); p50 and p99 from start commit to completion commit.
  The knee is the highest offered rate up to which every run kept up (completed >= 95%
  of the offered rate) and kept its p99 within 10x the p99 of the lowest rate.
* **Cost per workflow** (Postgres CPU, WAL, statements, worker CPU) at half the
  maximum: not saturated, so the cost is the engine's, not the queueing's. A separate
  run at the same rate profiles one worker with py-spy and ranks Postgres's statements.
* **DBOS Transact**: one ``--peer dbos`` run at 1.3x the maximum (both saturated), the
  same workload on the same machine and Postgres right after.

Time: the full report takes about 12 minutes on the 2-core VM of ``results/`` (18 bench
runs; budget 20-25 minutes on a busier machine): a saturation run is sized to ~20 s of load
whatever the maximum is (1 worker process: up to ~40 s), a rate run has 20 s of arrivals,
and each run spends ~5-10 s more on its set-up, clean-up and report; the 1M backlog ~1-2
minutes to load, vacuum and clean up; the DBOS run ~1.5 minutes, as DBOS drains its
saturated queue slower. ``--max-backlog 10000000`` adds about 10 minutes. ``--quick``
(3-second runs and toy sizes, for the tests) takes about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from shardflow import clusterfile
from shardflow.bench import pyplot
from shardflow.config import EngineConfig

ROOT = Path(__file__).resolve().parent.parent

# The capacity model's assumptions (stated in the report): the cores of one Postgres node
# in the worked example, and the CPU utilisation to plan for (headroom for vacuum,
# checkpoints, failover and bursts).
EXAMPLE_NODES = 100
NODE_CORES = (4, 8, 16, 32)
EXAMPLE_CORES = 8
TARGET_UTILISATION = 0.6
SAT_RATE_FACTOR = 4.0  # saturation runs offer this many times the calibrated maximum
PEER_RATE_FACTOR = 1.3  # the DBOS run offers this many times shardflow's maximum
KNEE_KEEP_UP = 0.95  # completed / offered at or above this: the run kept up
KNEE_P99_FACTOR = 10.0  # p99 at most this many times the lowest rate's p99


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The sizes of one report."""

    duration: float  # seconds of arrivals of a rate run
    sat_seconds: float  # a saturation run's workflows = calibrated maximum x this
    calibrate: bool  # measure the maximum first (else: sat_rate, sat_workflows)
    calib_rate: float  # the calibration run (or, without one, every saturation run)
    calib_workflows: int
    workers: tuple[int, ...]
    default_workers: int
    tenants: tuple[int, ...]
    default_tenants: int
    backlogs: tuple[int, ...]
    fractions: tuple[float, ...]  # latency vs rate: offered = fraction x maximum
    profile_separately: bool  # a run of its own at half max (else: on the 50% run)
    peer_duration: float


FULL = Plan(duration=20, sat_seconds=20, calibrate=True, calib_rate=2000,
            calib_workflows=3000, workers=(1, 2, 4), default_workers=2,
            tenants=(10, 1000, 100_000), default_tenants=1000,
            backlogs=(0, 100_000, 1_000_000, 10_000_000),
            fractions=(0.1, 0.25, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1),
            profile_separately=True, peer_duration=15)
QUICK = Plan(duration=3, sat_seconds=3, calibrate=False, calib_rate=500,
             calib_workflows=60, workers=(1, 2), default_workers=2,
             tenants=(10, 100), default_tenants=100, backlogs=(0, 1000),
             fractions=(0.25, 0.5, 0.9), profile_separately=False, peer_duration=3)


@dataclass
class Run:
    """One bench subprocess and what it returned."""

    name: str
    purpose: str
    args: list[str]  # the bench's options
    exit_code: int | None = None
    wall_s: float = 0.0
    summary: dict[str, Any] | None = None
    peer: dict[str, Any] | None = None  # DBOS's full figures (peer_dbos.json)
    note: str = ""

    @property
    def command(self) -> str:
        return shlex.join(["python", "-m", "shardflow.bench", *self.args])

    @property
    def ok(self) -> bool:
        """Measured, and the bench's audit passed (exit 0)."""
        return self.exit_code == 0 and self.summary is not None

    def fig(self, key: str) -> Any:
        return None if self.summary is None else self.summary.get(key)

    @property
    def offered(self) -> float | None:
        if self.summary is None:
            return None
        rate = self.summary["settings"]["bench"].get("rate")
        return float(rate) if rate is not None else None


@dataclass
class Report:
    """Everything measured, in run order."""

    out: Path
    cluster_file: Path
    plan: Plan
    quick: bool
    command: str
    engine_config: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    maximum: float | None = None
    started: str = ""
    # starts alone (loadtest/startmany.py): its JSON line, and the command
    starts: dict[str, Any] | None = None
    starts_command: str = ""

    def get(self, name: str) -> Run | None:
        return next((r for r in self.runs if r.name == name), None)


class Runner:
    """Runs the bench subprocesses one after another under a progress display."""

    def __init__(self, report: Report, console: Console, total: int) -> None:
        self.report = report
        self.console = console
        self.runs_dir = report.out / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                                 BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=console)
        self.overall = self.progress.add_task("performance report", total=total)
        self.current = self.progress.add_task("", total=None)

    def add_runs(self, n: int) -> None:
        task = self.progress.tasks[self.overall]
        self.progress.update(self.overall, total=(task.total or 0) + n)

    def bench(self, name: str, purpose: str, args: list[str]) -> Run:
        """One ``shardflow bench`` run: its report in runs/<date>-perf-<name>/, its
        summary in runs/<name>.json, its output in runs/<name>.log."""
        json_path = self.runs_dir / f"{name}.json"
        json_path.unlink(missing_ok=True)  # a stale one must not pass for this run's
        full = ["--cluster-file", str(self.report.cluster_file),
                "--results-dir", str(self.runs_dir), "--scenario", f"perf-{name}",
                "--json", str(json_path), *args]
        if self.report.engine_config:
            full += ["--engine-config", json.dumps(self.report.engine_config)]
        run = Run(name=name, purpose=purpose, args=full)
        self.report.runs.append(run)
        self.progress.reset(self.current, total=None,
                            description=f"  {name}: {purpose}")
        t0 = time.monotonic()
        env = dict(os.environ, COLUMNS="120")  # the bench's tables, readable in the log
        with (self.runs_dir / f"{name}.log").open("wb") as log:
            proc = subprocess.run([sys.executable, "-m", "shardflow.bench", *full], cwd=ROOT,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        run.wall_s = round(time.monotonic() - t0, 1)
        run.exit_code = proc.returncode
        if json_path.is_file():
            run.summary = json.loads(json_path.read_text())
        if "--peer" in args:
            found = sorted(self.runs_dir.glob(f"*-perf-{name}/peer_dbos.json"))
            if found:
                run.peer = json.loads(found[-1].read_text())
        self.progress.advance(self.overall)
        self.console.print(_one_line(run))
        return run


def _one_line(run: Run) -> str:
    if run.summary is None:
        return (f"[red]{run.name}: no summary (exit {run.exit_code}); see "
                f"runs/{run.name}.log[/red]")
    s = run.summary
    lat = s["latency_ms"]
    extra = (f", all {s['completed_per_sec_all']:,.1f}/s with a backlog of {s['backlog']:,}"
             if s.get("backlog") else "")
    audit = "audit ok" if run.exit_code == 0 else f"[red]audit FAILED (exit {run.exit_code})[/red]"
    return (f"{run.name}: {s['workflows_per_sec']:,.1f} workflows/s{extra}, p50/p99 "
            f"{lat['p50']:,.1f}/{lat['p99']:,.1f} ms, {run.wall_s:.0f} s, {audit}")


# -- the measurements ----------------------------------------------------------------------


def _saturation_args(plan: Plan, rate: float, workflows: int, workers: int,
                     tenants: int) -> list[str]:
    return ["--rate", f"{rate:g}", "--workflows", str(workflows), "--worker-processes",
            str(workers), "--tenants", str(tenants), "--drain-timeout", "600"]


def _saturated(run: Run) -> bool:
    """Completed clearly below the offered rate: the workers, not the arrivals, set
    the pace."""
    offered = run.offered
    wfs = run.fig("workflows_per_sec")
    return bool(offered and wfs is not None and wfs < 0.9 * offered)


def measure(report: Report, console: Console, skip_peer: bool, max_backlog: int) -> None:
    """Every run of the plan, in an order where each knows what it needs: the maximum
    (calibration, then 2 worker processes) before the rates that are fractions of it;
    the backlogs last. The last backlog's leftover rows stay pending until the next
    bench run deletes them (as every bench run does with earlier bench rows)."""
    plan = report.plan
    backlogs = [b for b in plan.backlogs if b and b <= max_backlog]
    total = (int(plan.calibrate) + len(plan.workers)
             + sum(t != plan.default_tenants for t in plan.tenants) + len(backlogs)
             + len(plan.fractions) + int(plan.profile_separately) + int(not skip_peer))
    runner = Runner(report, console, total)
    with runner.progress:
        rate, workflows = plan.calib_rate, plan.calib_workflows
        if plan.calibrate:
            cal = runner.bench("calibrate", "a first saturation run, to size the others",
                               _saturation_args(plan, plan.calib_rate, plan.calib_workflows,
                                                plan.default_workers, plan.default_tenants))
            cap = cal.fig("workflows_per_sec")
            if not cap:
                raise RuntimeError(f"the calibration run measured nothing (exit "
                                   f"{cal.exit_code}): see {runner.runs_dir}/calibrate.log")
            rate = round(SAT_RATE_FACTOR * cap)
            workflows = max(200, round(cap * plan.sat_seconds))

        def saturate(name: str, purpose: str, workers: int, tenants: int,
                     backlog: int = 0) -> Run:
            extra = ["--backlog", str(backlog)] if backlog else []
            run = runner.bench(name, purpose, _saturation_args(
                plan, rate, workflows, workers, tenants) + extra)
            if run.ok and not _saturated(run):
                # faster than the calibration said: the arrivals set the pace. Once
                # more, far above it (the first run stays in the table).
                runner.add_runs(1)
                run.name, run.note = f"{name}-unsaturated", "did not saturate: repeated"
                run = runner.bench(name, purpose + " (again, 4x the rate: the first run "
                                   "did not saturate)", _saturation_args(
                                       plan, rate * 4, workflows * 2, workers, tenants) + extra)
            return run

        for w in plan.workers:
            saturate(f"workers-{w}", f"maximum throughput with {w} worker "
                     f"process{'es' if w > 1 else ''}", w,
                     plan.default_tenants)
        base = report.get(f"workers-{plan.default_workers}")
        if base is None or not base.fig("workflows_per_sec"):
            raise RuntimeError(f"the run with {plan.default_workers} worker processes "
                               "measured nothing: see its log in runs/")
        report.maximum = float(base.fig("workflows_per_sec"))
        for t in plan.tenants:
            if t != plan.default_tenants:
                saturate(f"tenants-{t}", f"maximum throughput with {t:,} tenants",
                         plan.default_workers, t)
        half = min(plan.fractions, key=lambda f: abs(f - 0.5))
        for f in plan.fractions:
            offered = max(1.0, round(f * report.maximum, 1))
            extra = ["--profile"] if f == half and not plan.profile_separately else []
            runner.bench(f"rate-{round(f * 100)}pct",
                         f"latency at {f:.0%} of the maximum ({offered:g}/s offered)",
                         ["--rate", f"{offered:g}", "--duration", f"{plan.duration:g}",
                          "--worker-processes", str(plan.default_workers), "--tenants",
                          str(plan.default_tenants), "--drain-timeout", "600", *extra])
        if plan.profile_separately:
            offered = max(1.0, round(half * report.maximum, 1))
            runner.bench("profile", f"py-spy and pg_stat_statements at {offered:g}/s",
                         ["--rate", f"{offered:g}", "--duration", f"{plan.duration:g}",
                          "--worker-processes", str(plan.default_workers), "--tenants",
                          str(plan.default_tenants), "--profile"])
        if not skip_peer:
            offered = round(PEER_RATE_FACTOR * report.maximum, 1)
            runner.bench("peer-dbos", f"shardflow, then DBOS Transact, at {offered:g}/s",
                         ["--rate", f"{offered:g}", "--duration", f"{plan.peer_duration:g}",
                          "--worker-processes", str(plan.default_workers), "--tenants",
                          str(plan.default_tenants), "--drain-timeout", "600",
                          "--peer", "dbos"])
        # starts alone: engine.start_many with no workers running
        n = 2000 if report.quick else 200_000
        cmd = [sys.executable, "-m", "loadtest.startmany", "--cluster-file",
               str(report.cluster_file), "--workflows", str(n)]
        report.starts_command = shlex.join(["python", *cmd[1:]])
        runner.progress.reset(runner.current, total=None,
                              description=f"  starts alone: {n:,} with start_many")
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode == 0 and proc.stdout.strip():
            report.starts = json.loads(proc.stdout.strip().splitlines()[-1])
            console.print(f"starts alone: {report.starts}")
        else:
            console.print(f"[red]starts alone failed[/red]: {proc.stderr.strip()[-500:]}")
        # last: a run cleans up the one before it, and deleting a million rows leaves
        # the tables and indexes larger (vacuumed, not shrunk) for every run after
        for b in backlogs:
            saturate(f"backlog-{b}", f"maximum throughput with {b:,} workflows pending",
                     plan.default_workers, plan.default_tenants, backlog=b)


# -- analysis ------------------------------------------------------------------------------


def rate_runs(report: Report) -> list[Run]:
    """The latency-vs-rate runs that measured something, by offered rate."""
    runs = [r for r in report.runs if r.name.startswith("rate-") and r.summary is not None]
    return sorted(runs, key=lambda r: r.offered or 0.0)


def knee(runs: list[Run]) -> tuple[Run | None, str]:
    """The highest offered rate up to which every run kept up and kept its p99 near the
    lowest rate's; and the rule, in words, with the low-load p99."""
    if not runs:
        return None, "no rate runs"
    low_p99 = float(runs[0].summary["latency_ms"]["p99"]) if runs[0].summary else 0.0
    rule = (f"the highest offered rate up to which every run completed >= "
            f"{KNEE_KEEP_UP:.0%} of the offered rate and kept p99 <= {KNEE_P99_FACTOR:g}x "
            f"the p99 at the lowest rate ({low_p99:,.1f} ms, so <= "
            f"{KNEE_P99_FACTOR * low_p99:,.1f} ms)")
    best: Run | None = None
    for r in runs:
        if not _keeps_up(r, low_p99):
            break
        best = r
    return best, rule


def _keeps_up(r: Run, low_p99: float) -> bool:
    offered, s = r.offered, r.summary
    if not offered or s is None:
        return False
    return bool(float(s["workflows_per_sec"]) >= KNEE_KEEP_UP * offered
                and float(s["latency_ms"]["p99"]) <= KNEE_P99_FACTOR * max(low_p99, 1e-3))


def cost_run(report: Report) -> Run | None:
    """The run at (closest to) half the maximum with its costs measured."""
    runs = [r for r in rate_runs(report) if r.fig("db_cpu_us_per_workflow") is not None]
    half = (report.maximum or 0.0) / 2
    if not runs or not half:
        return None
    return min(runs, key=lambda r: abs((r.offered or 0.0) - half))


def capacity(report: Report) -> dict[str, Any] | None:
    """The capacity model's figures from the half-max run (see the report's section)."""
    ref = cost_run(report)
    if ref is None or ref.summary is None:
        return None
    s = ref.summary
    db, wal, wk = (s["db_cpu_us_per_workflow"], s["wal_bytes_per_workflow"],
                   s["worker_cpu_us_per_workflow"])
    stm = s["statements_per_workflow"]
    shards = int(s["shards"])
    per_core = 1e6 / db if db else None
    out: dict[str, Any] = {
        "reference_run": ref.name, "offered": ref.offered,
        "db_cpu_us_per_workflow": db, "wal_bytes_per_workflow": wal,
        "worker_cpu_us_per_workflow": wk, "statements_per_workflow": stm,
        "workflows_per_sec_per_pg_core": per_core,
        "wal_mb_per_sec_per_1000_wfs": None if wal is None else wal * 1000 / 1e6,
        "worker_cores_per_1000_wfs": None if wk is None else wk * 1000 / 1e6,
        "statements_per_sec_per_1000_wfs": None if stm is None else stm * 1000,
        "per_node": {c: None if per_core is None else per_core * c * TARGET_UTILISATION
                     for c in NODE_CORES},
        "shards": shards,
    }
    sat = report.get(f"workers-{report.plan.default_workers}")
    if sat is not None and sat.fig("db_cpu_us_per_workflow"):
        out["saturation_db_cpu_us_per_workflow"] = sat.fig("db_cpu_us_per_workflow")
    if per_core is not None:
        # shards sit whole on nodes: the busiest node holds ceil(shards / nodes) of them,
        # and it sets the pace when tenants spread evenly over the shards
        busiest = math.ceil(shards / EXAMPLE_NODES) / (shards / EXAMPLE_NODES)
        node_rate = per_core * EXAMPLE_CORES * TARGET_UTILISATION
        cluster_rate = EXAMPLE_NODES * node_rate / busiest
        out["example"] = {
            "nodes": EXAMPLE_NODES, "cores_per_node": EXAMPLE_CORES,
            "utilisation": TARGET_UTILISATION, "busiest_node_factor": busiest,
            "node_rate": node_rate, "cluster_rate": cluster_rate,
            "wal_mb_per_sec_per_node": None if wal is None else node_rate * wal / 1e6,
            "worker_cores": None if wk is None else cluster_rate * wk / 1e6,
            "pool_size": s["settings"]["engine"].get("pool_size"),
        }
    return out


# -- figures -------------------------------------------------------------------------------


def _footer(fig: Any, report: Report, runs: list[Run]) -> None:
    """The command that made the figure, on the figure."""
    fig.text(0.005, 0.005, f"{report.command}  (runs: {', '.join(r.name for r in runs)}; "
             "commands in report.md)", fontsize=6, color="0.4")


def _save(fig: Any, path: Path, report: Report, runs: list[Run]) -> None:
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _footer(fig, report, runs)
    fig.savefig(path, dpi=110)


def _annotate(ax: Any, xs: list[Any], ys: list[float]) -> None:
    """Each point's value above it (with room for the labels at the top)."""
    if ys and max(ys) > 0:
        ax.set_ylim(top=max(ys) * 1.15)
    for x, y in zip(xs, ys, strict=True):
        ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, 5),
                    ha="center", fontsize=8)


def plot_workers(plt: Any, report: Report) -> list[Run]:
    runs = [r for w in report.plan.workers if (r := report.get(f"workers-{w}")) and r.summary]
    if not runs:
        return []
    xs = [int(r.summary["settings"]["bench"]["worker_processes"]) for r in runs if r.summary]
    ys = [float(r.fig("workflows_per_sec")) for r in runs]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, ys, marker="o", label="completed workflows/s (saturated)")
    ax.plot(xs, [ys[0] * x / xs[0] for x in xs], linestyle="--", color="0.6",
            label=f"linear from {xs[0]} process")
    _annotate(ax, xs, ys)
    ax.set_xticks(xs)
    ax.set_xlabel("worker processes")
    ax.set_ylabel("workflows/s")
    cpus = runs[0].summary["machine"]["cpus"] if runs[0].summary else "?"
    ax.set_title(f"maximum throughput vs worker processes ({cpus} CPUs shared by all)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, report.out / "throughput_vs_workers.png", report, runs)
    plt.close(fig)
    return runs


def _tenant_run(report: Report, t: int) -> Run | None:
    name = (f"workers-{report.plan.default_workers}" if t == report.plan.default_tenants
            else f"tenants-{t}")
    return report.get(name)


def plot_tenants(plt: Any, report: Report) -> list[Run]:
    runs = [r for t in report.plan.tenants if (r := _tenant_run(report, t)) and r.summary]
    if not runs:
        return []
    xs = [int(r.fig("tenants")) for r in runs]
    ys = [float(r.fig("workflows_per_sec")) for r in runs]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, ys, marker="o")
    _annotate(ax, xs, ys)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:,}" for x in xs])
    ax.set_xlabel("tenants (uniform)")
    ax.set_ylabel("workflows/s (saturated)")
    ax.set_title(f"maximum throughput vs tenants ({report.plan.default_workers} worker "
                 "processes)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    _save(fig, report.out / "throughput_vs_tenants.png", report, runs)
    plt.close(fig)
    return runs


def backlog_runs(report: Report) -> list[Run]:
    base = report.get(f"workers-{report.plan.default_workers}")
    runs = [base] if base is not None and base.summary else []
    return runs + [r for r in report.runs if r.name.startswith("backlog-")
                   and not r.name.endswith("-unsaturated") and r.summary]


def plot_backlog(plt: Any, report: Report) -> list[Run]:
    runs = backlog_runs(report)
    if not runs:
        return []
    labels = [f"{int(r.fig('backlog') or 0):,}" for r in runs]
    xs = list(range(len(runs)))
    all_ = [float(r.fig("completed_per_sec_all")) for r in runs]
    own = [float(r.fig("workflows_per_sec")) for r in runs]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, all_, marker="o", label="all completions/s (backlog's included)")
    ax.plot(xs, own, marker="s", linestyle="--", label="the run's own workflows/s")
    _annotate(ax, xs, all_)
    ax.set_xticks(xs, labels)
    ax.set_xlabel("workflows pending in the table when the run starts (backlog)")
    ax.set_ylabel("workflows/s (saturated)")
    ax.set_title("maximum throughput vs backlog")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, report.out / "throughput_vs_backlog.png", report, runs)
    plt.close(fig)
    return runs


def plot_latency(plt: Any, report: Report) -> list[Run]:
    runs = rate_runs(report)
    if not runs:
        return []
    k, _ = knee(runs)
    xs = [float(r.offered or 0.0) for r in runs]
    p50 = [float(r.summary["latency_ms"]["p50"]) for r in runs if r.summary]
    p99 = [float(r.summary["latency_ms"]["p99"]) for r in runs if r.summary]
    done = [float(r.fig("workflows_per_sec")) for r in runs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    a1.plot(xs, p50, marker="o", label="p50")
    a1.plot(xs, p99, marker="o", label="p99")
    a1.set_yscale("log")
    a1.set_xlabel("offered workflows/s (open loop)")
    a1.set_ylabel("latency ms, start commit to completion commit")
    a1.set_title("latency vs offered rate")
    a2.plot(xs, done, marker="o", label="completed/s")
    a2.plot(xs, xs, linestyle="--", color="0.6", label="= offered")
    a2.set_xlabel("offered workflows/s (open loop)")
    a2.set_ylabel("completed workflows/s")
    a2.set_title("completed vs offered")
    for ax in (a1, a2):
        if report.maximum:
            ax.axvline(report.maximum, color="0.5", linestyle=":",
                       label=f"measured maximum {report.maximum:,.0f}/s")
        if k is not None and k.offered:
            ax.axvline(k.offered, color="tab:red", linestyle="--",
                       label=f"knee {k.offered:,.0f}/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, report.out / "latency_vs_rate.png", report, runs)
    plt.close(fig)
    return runs


COSTS = (("db_cpu_us_per_workflow", "Postgres CPU µs / workflow"),
         ("wal_bytes_per_workflow", "WAL bytes / workflow"),
         ("statements_per_workflow", "statements / workflow"),
         ("worker_cpu_us_per_workflow", "worker CPU µs / workflow"))


def plot_costs(plt: Any, report: Report) -> list[Run]:
    ref = cost_run(report)
    runs = [r for r in rate_runs(report) if r.fig("db_cpu_us_per_workflow") is not None]
    if ref is None or not runs:
        return []
    fig, axes = plt.subplots(1, 4, figsize=(15, 4))
    xs = [float(r.offered or 0.0) for r in runs]
    for ax, (key, label) in zip(axes, COSTS, strict=True):
        ys = [r.fig(key) for r in runs]
        ax.plot([x for x, y in zip(xs, ys, strict=True) if y is not None],
                [y for y in ys if y is not None], marker="o", color="0.6")
        v = ref.fig(key)
        if v is not None:
            ax.bar([ref.offered or 0.0], [v], width=max(xs) * 0.06, color="tab:blue",
                   label=f"at half max: {v:,.1f}")
            ax.legend(fontsize=8)
        ax.set_title(label)
        ax.set_xlabel("offered workflows/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"cost per workflow (bar: {ref.name}, {ref.offered:g}/s offered = half the "
                 "maximum; line: every rate)")
    _save(fig, report.out / "cost_per_workflow.png", report, runs)
    plt.close(fig)
    return runs


def plot_peer(plt: Any, report: Report) -> list[Run]:
    run = report.get("peer-dbos")
    if run is None or run.summary is None or run.peer is None:
        return []
    s, p = run.summary, run.peer
    names = ["shardflow", f"DBOS {p.get('version', '')}"]
    panels = [("workflows/s (completed)", s["workflows_per_sec"], p["workflows_per_sec"]),
              ("Postgres CPU µs / workflow", s["db_cpu_us_per_workflow"],
               p.get("db_cpu_us_per_workflow")),
              ("WAL bytes / workflow", s["wal_bytes_per_workflow"],
               p.get("wal_bytes_per_workflow")),
              ("latency p99 ms", s["latency_ms"]["p99"], p["latency_ms"]["p99"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (title, a, b) in zip(axes, panels, strict=True):
        vals = [a or 0.0, b or 0.0]
        ax.bar(names, vals, color=["tab:blue", "tab:gray"])
        _annotate(ax, names, vals)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    offered = run.offered or 0.0

    def state(wfs: float) -> str:
        return "saturated" if wfs < KNEE_KEEP_UP * offered else "kept up"

    fig.suptitle(f"shardflow vs DBOS Transact, same workload at {offered:g}/s offered "
                 f"(shardflow {state(s['workflows_per_sec'])}, DBOS "
                 f"{state(p['workflows_per_sec'])}), ratio {s.get('ratio')}x")
    _save(fig, report.out / "dbos_comparison.png", report, [run])
    plt.close(fig)
    return [run]


# -- the report ----------------------------------------------------------------------------


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _runs_table(report: Report) -> list[str]:
    lines = ["| run | purpose | workers | tenants | backlog | offered /s | workflows/s | "
             "all /s | p50 ms | p99 ms | PG CPU µs/wf | WAL B/wf | stmts/wf | "
             "worker CPU µs/wf | audit | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.runs:
        s = r.summary
        if s is None:
            lines.append(f"| {r.name} | {r.purpose} | | | | | | | | | | | | | "
                         f"no summary (exit {r.exit_code}) | {r.wall_s:.0f} |")
            continue
        b = s["settings"]["bench"]
        lines.append(
            f"| {r.name} | {r.purpose}{' (' + r.note + ')' if r.note else ''} | "
            f"{b['worker_processes']} | {s['tenants']:,} | {s.get('backlog', 0):,} | "
            f"{_f(r.offered)} | {_f(s['workflows_per_sec'])} | "
            f"{_f(s.get('completed_per_sec_all'))} | {_f(s['latency_ms']['p50'])} | "
            f"{_f(s['latency_ms']['p99'])} | {_f(s['db_cpu_us_per_workflow'])} | "
            f"{_f(s['wal_bytes_per_workflow'])} | {_f(s['statements_per_workflow'], 2)} | "
            f"{_f(s['worker_cpu_us_per_workflow'])} | "
            f"{'ok' if r.exit_code == 0 else 'FAILED'} | {r.wall_s:.0f} |")
    return lines


def _figure(title: str, png: str, runs: list[Run], text: list[str]) -> list[str]:
    if not runs:
        return [f"## {title}", "", "_Not drawn: no run measured it (see the table)._", ""]
    return [f"## {title}", "", f"![{title}]({png})", "", *text, "",
            "Made by (each run's own report is in `runs/`):", "", "```sh",
            *(r.command for r in runs), "```", ""]


def _capacity_section(report: Report, cap: dict[str, Any] | None) -> list[str]:
    if cap is None:
        return ["## Capacity model", "", "_No figures: the half-max run measured no costs._",
                ""]
    per_core = cap["workflows_per_sec_per_pg_core"]
    ex = cap.get("example")
    first = next((r.summary for r in report.runs if r.summary), {}) or {}
    cpus = first.get("machine", {}).get("cpus", "?")
    lines = [
        "## Capacity model", "",
        f"From the run at half the maximum (`{cap['reference_run']}`, {_f(cap['offered'])} "
        "workflows/s offered, 3-step workflows: 2 external steps + 1 transactional, "
        "100-byte payload), where the system is not queueing, so the cost is the engine's:",
        "",
        "| figure | value | from |",
        "|---|---|---|",
        f"| workflows/s per Postgres core | **{_f(per_core)}** | 1e6 / "
        f"{_f(cap['db_cpu_us_per_workflow'])} µs of Postgres CPU per workflow |",
        f"| WAL per 1,000 workflows/s | {_f(cap['wal_mb_per_sec_per_1000_wfs'], 2)} MB/s | "
        f"{_f(cap['wal_bytes_per_workflow'])} bytes per workflow |",
        f"| worker cores per 1,000 workflows/s | "
        f"{_f(cap['worker_cores_per_1000_wfs'], 2)} | "
        f"{_f(cap['worker_cpu_us_per_workflow'])} µs of worker CPU per workflow |",
        f"| statements/s per 1,000 workflows/s | "
        f"{_f(cap['statements_per_sec_per_1000_wfs'], 0)} | "
        f"{_f(cap['statements_per_workflow'], 2)} statements per workflow |",
        "",
    ]
    if "saturation_db_cpu_us_per_workflow" in cap and per_core:
        sat = cap["saturation_db_cpu_us_per_workflow"]
        lines += [f"At saturation the same workload cost {_f(sat)} µs of Postgres CPU per "
                  f"workflow ({_f(1e6 / sat)} workflows/s per core): "
                  + ("less, as work batches under load, so the half-max figure used here is "
                     "the conservative one." if sat <= cap["db_cpu_us_per_workflow"] else
                     f"more, so the figures below are {sat / cap['db_cpu_us_per_workflow']:.2f}"
                     "x optimistic for a node run at its limit."), ""]
    if report.maximum:
        lines += [f"Measured here: at most {_f(report.maximum)} workflows/s with "
                  f"{report.plan.default_workers} worker processes, with the Postgres nodes, "
                  f"the workers and the load generator all sharing {cpus} CPUs.", ""]
    lines += ["Per Postgres node, planning for "
              f"{TARGET_UTILISATION:.0%} CPU (headroom for vacuum, checkpoints, bursts and "
              "a failover):", "", "| cores per node | workflows/s per node |", "|---|---|",
              *(f"| {c} | {_f(v, 0)} |" for c, v in cap["per_node"].items()), ""]
    if ex is not None:
        lines += [
            f"### Worked example: {ex['nodes']} nodes", "",
            f"* {ex['nodes']} Postgres primaries of {ex['cores_per_node']} cores at "
            f"{ex['utilisation']:.0%}: {_f(ex['node_rate'], 0)} workflows/s per node.",
            f"* Shards sit whole on nodes: {cap['shards']} shards over {ex['nodes']} nodes "
            f"puts {math.ceil(cap['shards'] / ex['nodes'])} on the busiest, "
            f"{ex['busiest_node_factor']:.2f}x the average, and the busiest node sets the "
            f"pace when tenants spread evenly: **{_f(ex['cluster_rate'], 0)} workflows/s** "
            f"for the cluster. More shards at init (`shardflow cluster up --shards`, e.g. "
            f"{ex['nodes'] * 10}) bring that factor near 1.",
            f"* WAL per node: {_f(ex['wal_mb_per_sec_per_node'], 1)} MB/s written (and "
            "shipped to each standby).",
            f"* Workers: {_f(ex['worker_cores'], 0)} cores of worker processes in all "
            "(stateless: anywhere that reaches the nodes), at 100% of each core; plan "
            f"the same {ex['utilisation']:.0%} there. Each worker process keeps up to "
            f"`pool_size` ({ex['pool_size']}) connections to every node: with P processes a "
            "node sees up to that many times P (raise max_connections or pool).",
            "",
        ]
    lines += [
        "Assumptions, and where they break:", "",
        "* Postgres CPU is the limit and scales with cores. Measured as utime+stime of every "
        "server process (/proc), so it includes WAL writing, vacuum and checkpoints over the "
        "window, and the bench's once-a-second poll; not the disk: a slow fsync or a "
        "replication round trip adds latency and, with synchronous_commit, can cap a node "
        "below its CPU.",
        "* Tenants spread evenly over shards. A tenant lives on one shard: the busiest "
        "tenant's rate is bounded by one node.",
        "* The workload: 3 checkpoints per workflow and small payloads. Costs grow with "
        "steps and payload; re-measure with yours (`shardflow bench --steps N "
        "--payload-bytes B`).",
        "* On a shared machine (here) the per-core figure comes from CPU time, which stays "
        "meaningful when processes compete; the throughput does not: on dedicated hardware "
        "the workers and the load generator do not take Postgres's cores.",
        "",
    ]
    return lines


def write_report(report: Report, skip_peer: bool) -> None:
    plt = pyplot()
    plots: dict[str, list[Run]] = {}
    if plt is not None:
        plots = {"workers": plot_workers(plt, report), "tenants": plot_tenants(plt, report),
                 "backlog": plot_backlog(plt, report), "latency": plot_latency(plt, report),
                 "cost": plot_costs(plt, report),
                 "peer": [] if skip_peer else plot_peer(plt, report)}
    cap = capacity(report)
    k, rule = knee(rate_runs(report))
    first = next((r.summary for r in report.runs if r.summary), None) or {}
    ref = cost_run(report)
    peer = report.get("peer-dbos")
    lines = [
        f"# shardflow performance report ({report.started[:10]})", "",
        "Every figure is measured by `shardflow bench` (`python -m shardflow.bench`); this "
        "report was made by:", "", "```sh", report.command, "```", "",
        f"{len(report.runs)} runs, {sum(r.wall_s for r in report.runs) / 60:.1f} minutes; "
        f"audits: {sum(r.exit_code == 0 for r in report.runs)} passed, "
        f"{sum(r.exit_code != 0 for r in report.runs)} failed or missing. "
        + (f"Maximum throughput ({report.plan.default_workers} worker processes, "
           f"{report.plan.default_tenants:,} tenants): **{_f(report.maximum)} workflows/s**."
           if report.maximum else ""),
        "",
    ]
    if report.quick:
        lines += ["**`--quick`: 3-second runs and toy sizes, to test the tooling. These "
                  "figures say nothing about performance.**", ""]
    if plt is None:
        lines += ["_matplotlib is not importable: no figures (pip install matplotlib)._", ""]
    else:
        lines += _figure(
            "Throughput vs worker processes", "throughput_vs_workers.png",
            plots["workers"],
            ["Saturated: open loop at 4x the calibrated maximum, bounded by `--workflows`; "
             "throughput = completed / (first start to last completion). Every process, "
             "every Postgres node and the load generator share this machine's CPUs."])
        lines += _figure(
            "Throughput vs tenants", "throughput_vs_tenants.png", plots["tenants"],
            ["The same saturating load over 10 to 100,000 tenants (uniform): claims visit "
             "tenants in turn, one index probe per tenant with work."])
        lines += _figure(
            "Throughput vs backlog", "throughput_vs_backlog.png", plots["backlog"],
            ["The same saturating load with N workflows preloaded pending (`--backlog N`: "
             "server-side INSERT ... SELECT generate_series on each node, priority below "
             "the run's, then VACUUM ANALYZE and CHECKPOINT before the window). The solid "
             "line counts every completion in the run, the backlog's included; the "
             "dashed one only the run's own (which the audit covers)."])
        lines += _figure(
            "Latency vs offered rate", "latency_vs_rate.png", plots["latency"],
            [f"Open loop at fractions of the maximum, {report.plan.duration:g} s of "
             "arrivals each; latency from start commit to completion commit. "
             + (f"**Knee: {_f(k.offered)} workflows/s offered** ({k.name}): " if k and
                k.offered else "**No knee: even the lowest rate missed the rule:** ")
             + rule + "."])
        lines += _figure(
            "Cost per workflow", "cost_per_workflow.png", plots["cost"],
            [f"At half the maximum ({ref.name}, {_f(ref.offered)}/s offered; bars) and at "
             "every rate (lines). Postgres CPU: every server process of every node (/proc);"
             " WAL: pg_current_wal_lsn; statements: pg_stat_statements; worker CPU: the "
             "worker processes." if ref else ""])
        if not skip_peer:
            lines += _figure(
                "shardflow vs DBOS Transact", "dbos_comparison.png", plots["peer"],
                ["One run at 1.3x shardflow's maximum, then the same workload (steps, "
                 "payload, tenants, rate, duration, worker processes) on DBOS Transact on "
                 "the first node's Postgres server (DBOS does not shard). "
                 + (f"Ratio: **{peer.summary.get('ratio')}x**; DBOS's full figures in "
                    "`runs/*-perf-peer-dbos/peer_dbos.json`." if peer and peer.summary
                    else "")])
    profiles = sorted(p for p in report.out.glob("runs/*-perf-*/profile-*.txt")
                      if p.name in ("profile-worker.txt", "profile-postgres.txt"))
    if profiles:
        lines += ["## Profiles", "",
                  "py-spy on one worker and pg_stat_statements over the half-max profile run "
                  "(the run is in the table):", "",
                  *(f"* [`{p.relative_to(report.out)}`]({p.relative_to(report.out)})"
                    for p in profiles), ""]
    if report.starts:
        st = report.starts
        lines += ["## Starts alone (bulk submission)", "",
                  f"`engine.start_many`, {st['workflows']:,} workflows in calls of 20,000 "
                  f"(no workers running): **{_f(st['starts_per_sec'], 0)} starts/s**, "
                  f"{_f(st['postgres_cpu_us_per_start'])} µs of Postgres CPU per start; "
                  "durable (committed) when each call returns.", "",
                  "```sh", report.starts_command, "```", ""]
    lines += _capacity_section(report, cap)
    lines += ["## All runs", "", *_runs_table(report), "",
              "`all /s`: every completion between the run's first start and last completion, "
              "a preloaded backlog's included. Costs are per completed workflow over the "
              "measured window. Audit: every workflow the run started completed exactly "
              "once, none failed, no transactional effect applied twice.", "",
              "## Commands", "", "Every run, exactly as it ran (from the repository root):",
              "", "```sh", *(f"# {r.name}\n{r.command}" for r in report.runs), "```", ""]
    versions = first.get("versions", {})
    machine = first.get("machine", {})
    settings = first.get("settings", {})
    differ = [r.name for r in report.runs if r.summary and (
        r.summary["settings"]["engine"] != settings.get("engine")
        or r.summary["settings"]["postgres"] != settings.get("postgres"))]
    lines += ["## Machine, versions, settings", "",
              f"{machine.get('cpus')} CPUs, {machine.get('mem_gb')} GB RAM ({_cpu_model()});"
              f" Python {versions.get('python')}, PostgreSQL {versions.get('postgres')}, "
              f"shardflow {versions.get('shardflow')}; {first.get('nodes')} Postgres nodes, "
              f"{first.get('shards')} shards, all on this machine with the workers and the "
              "load generator.", "",
              "Engine and Postgres settings (the same in every run"
              + (f" except {', '.join(differ)}" if differ else "") + "):", "",
              "```json", json.dumps({k: settings.get(k) for k in ("engine", "postgres")},
                                    indent=2), "```", ""]
    (report.out / "report.md").write_text("\n".join(lines))
    (report.out / "perf.json").write_text(json.dumps({
        "command": report.command, "started": report.started,
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": report.quick, "plan": dataclasses.asdict(report.plan),
        "maximum_workflows_per_sec": report.maximum,
        "knee": None if k is None else {"run": k.name, "offered": k.offered, "rule": rule},
        "capacity": cap, "starts_alone": report.starts,
        "runs": [{"name": r.name, "purpose": r.purpose, "command": r.command,
                  "exit_code": r.exit_code, "wall_s": r.wall_s, "note": r.note,
                  "summary": r.summary, "peer": r.peer} for r in report.runs],
    }, indent=2) + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU model unknown"


# -- command line --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.perfreport", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster-file", type=Path, default=Path(".shardflow/cluster.json"))
    p.add_argument("--out", type=Path,
                   default=Path("results") / f"{dt.date.today().isoformat()}-performance")
    p.add_argument("--quick", action="store_true",
                   help="3-second runs and toy sizes (tests the tooling, measures nothing)")
    p.add_argument("--skip-peer", action="store_true", help="no DBOS Transact run")
    p.add_argument("--max-backlog", type=int, default=1_000_000, metavar="N",
                   help="largest backlog to measure (of 100k, 1M, 10M; default 1M)")
    p.add_argument("--engine-config", default="{}",
                   help="EngineConfig fields as JSON, for every run (default: defaults)")
    a = p.parse_args(argv)
    if a.max_backlog < 0:
        raise ValueError(f"--max-backlog must be >= 0, got {a.max_backlog}")
    if not a.cluster_file.is_file():
        raise ValueError(f"--cluster-file {a.cluster_file} does not exist (start a cluster "
                         "with 'shardflow cluster up')")
    clusterfile.load(a.cluster_file)  # a broken file fails here, not in the first run
    try:
        a.engine_config = json.loads(a.engine_config)
    except ValueError as exc:
        raise ValueError(f"--engine-config is not JSON: {exc}") from exc
    if not isinstance(a.engine_config, dict):
        raise ValueError("--engine-config must be a JSON object of EngineConfig fields")
    EngineConfig(**a.engine_config)
    if not a.skip_peer:
        import importlib.util

        if importlib.util.find_spec("dbos") is None:
            raise ValueError("the DBOS comparison needs DBOS Transact (pip install "
                             "'shardflow[peer]'), or give --skip-peer")
    return a


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    try:
        a = parse_args(raw)
    except (ValueError, TypeError) as exc:
        print(f"perfreport: error: {exc}", file=sys.stderr)
        return 2
    console = Console()
    out: Path = a.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out=out, cluster_file=a.cluster_file.absolute(),
                    plan=QUICK if a.quick else FULL, quick=a.quick,
                    command=shlex.join(["python", "-m", "loadtest.perfreport", *raw]),
                    engine_config=a.engine_config,
                    started=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    try:
        measure(report, console, a.skip_peer, a.max_backlog)
    except RuntimeError as exc:
        console.print(f"[red]perfreport: {exc}[/red]")
        write_report(report, a.skip_peer)  # what was measured, for the diagnosis
        return 1
    write_report(report, a.skip_peer)
    console.print(f"report: {out / 'report.md'}")
    return 0 if all(r.exit_code == 0 for r in report.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
