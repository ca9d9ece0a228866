"""``python -m loadtest.shardsweep``: what the number of shards per node costs.

Each logical shard is one partition of each table on its node (README, "choosing the
shard count"). The hot statements reach rows through the partitioned parents, and a
statement's fixed cost grows with the partitions per node (executor set-up and locks
for each), so the same workload costs more Postgres CPU per workflow with more shards
per node; more shards buy finer moves and room to grow to more nodes. This measures the
trade-off on this machine: for each shard count it brings up a fresh local cluster of
``--nodes`` nodes in a temporary directory, runs one saturated ``shardflow bench``
(the performance report's saturation run), and takes the cluster down::

    .venv/bin/python -m loadtest.shardsweep --shards 4,16,64,256 --nodes 4 \\
        --out results/$(date +%F)-shards-per-node

It writes ``--out``/``shards_per_node.png`` (throughput and Postgres CPU per workflow vs
partitions per node), ``report.md`` (the figures, every command, machine and versions),
``sweep.json`` (every bench summary) and ``runs/`` (each run's own report).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from shardflow.bench import pyplot

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.shardsweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="4,16,64,256",
                   help="comma-separated shard counts (default 4,16,64,256)")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--rate", type=float, default=8000.0,
                   help="offered starts/s: far above capacity, so the workers set the pace")
    p.add_argument("--workflows", type=int, default=25000)
    p.add_argument("--tenants", type=int, default=1000)
    p.add_argument("--worker-processes", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        a.shard_counts = [int(s) for s in a.shards.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--shards must be comma-separated integers, got {a.shards!r}"
                         ) from None
    if not a.shard_counts or any(s < a.nodes for s in a.shard_counts):
        raise ValueError(f"--shards: every count must be >= --nodes ({a.nodes}), "
                         f"got {a.shards!r}")
    if a.nodes < 1 or a.workflows < 1 or a.rate <= 0 or a.worker_processes < 1:
        raise ValueError("--nodes, --workflows, --rate and --worker-processes must be "
                         "positive")
    return a


def _shardflow(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "shardflow.cli", *args], cwd=ROOT,
                          capture_output=True, check=False)


def run_one(a: argparse.Namespace, shards: int, console: Console) -> dict[str, Any]:
    runs = (a.out / "runs").absolute()
    runs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"shardsweep-{shards}-"))
    cdir = tmp / "cluster"
    up = _shardflow("cluster", "up", "--nodes", str(a.nodes), "--shards", str(shards),
                    "--dir", str(cdir))
    if up.returncode != 0:
        raise RuntimeError(f"cluster up --shards {shards} failed: "
                           f"{up.stderr.decode(errors='replace').strip()[-300:]}")
    try:
        json_path = runs / f"shards-{shards}.json"
        json_path.unlink(missing_ok=True)
        bench = ["--cluster-file", str(cdir / "cluster.json"), "--results-dir", str(runs),
                 "--scenario", f"shards-{shards}", "--json", str(json_path),
                 "--rate", f"{a.rate:g}", "--workflows", str(a.workflows),
                 "--worker-processes", str(a.worker_processes), "--tenants", str(a.tenants),
                 "--drain-timeout", "600"]
        with (runs / f"shards-{shards}.log").open("wb") as log:
            proc = subprocess.run([sys.executable, "-m", "shardflow.bench", *bench],
                                  cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  check=False)
        if proc.returncode != 0 or not json_path.is_file():
            raise RuntimeError(f"bench with {shards} shards failed (exit {proc.returncode}):"
                               f" see {runs / f'shards-{shards}.log'}")
        summary: dict[str, Any] = json.loads(json_path.read_text())
        summary["command"] = shlex.join(["python", "-m", "shardflow.bench", *bench])
        summary["cluster_command"] = (f"shardflow cluster up --nodes {a.nodes} "
                                      f"--shards {shards}")
        console.print(f"{shards} shards ({shards / a.nodes:g} per node): "
                      f"{summary['workflows_per_sec']:,.1f} workflows/s, "
                      f"{summary['db_cpu_us_per_workflow']:,.0f} µs Postgres CPU/workflow, "
                      f"{summary['wal_bytes_per_workflow']:,.0f} B WAL/workflow, audit ok")
        return summary
    finally:
        _shardflow("cluster", "down", "--dir", str(cdir))
        shutil.rmtree(tmp, ignore_errors=True)


def plot(a: argparse.Namespace, rows: list[dict[str, Any]]) -> bool:
    """shards_per_node.png; False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    per_node = [r["shards"] / a.nodes for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(per_node, [r["workflows_per_sec"] for r in rows], "o-", label="workflows/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shards (partitions per table) per node")
    ax.set_ylabel("workflows/s (saturated)")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(per_node, [r["db_cpu_us_per_workflow"] for r in rows], "s--", color="tab:red",
             label="Postgres CPU µs / workflow")
    ax2.set_ylabel("Postgres CPU µs / workflow")
    ax2.set_ylim(bottom=0)
    for x, r in zip(per_node, rows, strict=True):
        ax.annotate(f"{r['workflows_per_sec']:,.0f}", (x, r["workflows_per_sec"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax2.annotate(f"{r['db_cpu_us_per_workflow']:,.0f} µs",
                     (x, r["db_cpu_us_per_workflow"]), textcoords="offset points",
                     xytext=(0, -12), ha="center", fontsize=8, color="tab:red")
    fig.legend(loc="lower left", bbox_to_anchor=(0.1, 0.12))
    ax.set_title(f"Shards per node: {a.nodes} nodes, {a.worker_processes} worker processes, "
                 f"{a.tenants} tenants, 3-step workflows")
    fig.tight_layout()
    fig.savefig(a.out / "shards_per_node.png", dpi=120)
    plt.close(fig)
    return True


def write_report(a: argparse.Namespace, rows: list[dict[str, Any]], argv: list[str],
                 plotted: bool) -> None:
    first = rows[0]
    lines = [
        "# Shards per node: what they cost",
        "",
        "Made by `" + shlex.join(["python", "-m", "loadtest.shardsweep", *argv]) + "`: for "
        "each shard count a fresh local cluster, one saturated bench run (open loop far "
        "above capacity, bounded by `--workflows`; throughput = completed / (first start "
        "to last completion)), the cluster taken down.",
        "",
        "![throughput and cost vs shards per node](shards_per_node.png)" if plotted
        else "(no plot: matplotlib is not installed)",
        "",
        "| shards | per node | workflows/s | Postgres CPU µs/wf | WAL B/wf | worker CPU µs/wf "
        "| p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lat = r["latency_ms"]
        lines.append(f"| {r['shards']} | {r['shards'] / a.nodes:g} | "
                     f"{r['workflows_per_sec']:,.1f} | {r['db_cpu_us_per_workflow']:,.1f} | "
                     f"{r['wal_bytes_per_workflow']:,.0f} | "
                     f"{r['worker_cpu_us_per_workflow']:,.1f} | {lat['p50']:,.1f} | "
                     f"{lat['p99']:,.1f} |")
    lines += ["", "Commands (each run's own report is in `runs/`):", "", "```sh"]
    for r in rows:
        lines += [r["cluster_command"], r["command"]]
    lines += ["```", "",
              f"Machine: {json.dumps(first.get('machine'))}; versions: "
              f"{json.dumps(first.get('versions'))}; bench settings: "
              f"{json.dumps(first['settings']['bench'])}.", ""]
    (a.out / "report.md").write_text("\n".join(lines))
    (a.out / "sweep.json").write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    try:
        a = parse_args(raw)
    except ValueError as exc:
        print(f"shardsweep: error: {exc}", file=sys.stderr)
        return 2
    console = Console()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for shards in a.shard_counts:
            rows.append(run_one(a, shards, console))
    except RuntimeError as exc:
        console.print(f"[red]shardsweep: {exc}[/red]")
        return 1
    write_report(a, rows, raw, plot(a, rows))
    console.print(f"report: {a.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
