"""The report of ``shardflow drill chaos``: chaos.json, report.md and chaos.png."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from .bench import pyplot

if TYPE_CHECKING:
    from .chaos import ChaosResult

MAX_LISTED = 40  # violations listed per invariant in report.md (all are in chaos.json)


def _per_sec(ts: list[float], xs: list[float]) -> list[int]:
    import bisect

    return [bisect.bisect_left(ts, x) - bisect.bisect_left(ts, x - 1.0) for x in xs]


def _plot(path: Path, result: ChaosResult) -> bool:
    plt = pyplot()
    if plt is None or not result.timeline.get("finished"):
        return False
    t0 = result.t0
    fin = [f - t0 for f in result.timeline["finished"]]
    created = [c - t0 for c in result.timeline["created"]]
    horizon = max([*fin, *created, 1.0])
    xs = [0.25 * i for i in range(int(horizon * 4) + 2)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot(xs, _per_sec(created, xs), label="started/s", alpha=0.5)
    ax.plot(xs, _per_sec(fin, xs), label="completed/s")
    colors = {"kill": "red", "stop": "purple", "drop": "orange", "stall": "brown",
              "pg-restart": "black", "move": "green"}
    seen: set[str] = set()
    for f in result.history.faults:
        if "t_fault" not in f:
            continue
        kind = f["kind"]
        ax.axvline(f["t_fault"] - t0, color=colors.get(kind, "gray"), linestyle="--",
                   alpha=0.8, label=None if kind in seen else f"fault: {kind}")
        seen.add(kind)
        if "t_heal" in f:
            ax.axvspan(f["t_fault"] - t0, f["t_heal"] - t0, color=colors.get(kind, "gray"),
                       alpha=0.08)
    ax.axvline(result.t_load_end - t0, color="gray", linestyle=":", label="load ends")
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("workflows per second (1 s window)")
    ax.set_title(f"chaos drill, seed {result.history.seed}: throughput and faults")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summary(result: ChaosResult) -> dict[str, Any]:
    h = result.history
    recs = list(h.workflows.values())
    faults = [{k: v for k, v in f.items() if k not in ("t_fault", "t_heal")} for f in h.faults]
    recovered = [f["recovered_s"] for f in h.faults
                 if f.get("recovered_s") is not None and not f.get("idle")]
    return {
        "ok": result.ok,
        "seed": h.seed,
        "settings": result.settings,
        "machine": result.machine,
        "invariants": [dataclasses.asdict(i) for i in result.invariants],
        "workflows": {
            "planned": len(recs),
            "acknowledged": sum(r.acked for r in recs),
            "start_errors": sum(r.start_errors for r in recs),
            "by_kind": _count(r.kind for r in recs),
            "statuses": result.statuses,
            "cancelled_by_driver": sum(bool(r.cancel_acked) for r in recs),
            "resumed": sum(bool(r.resume_acked) for r in recs),
            "forked": sum(bool(r.fork_acked) for r in recs),
            "messages_sent": sum(len(r.sends) for r in recs),
            "messages_resent_after_consumed": sum(
                s.retried_after_consumed and s.acked for r in recs for s in r.sends),
            "keyless_sends_errored": sum(s.errors for r in recs for s in r.sends),
        },
        "external_reruns": next((i.figure for i in result.invariants if i.key == "g"), 0),
        "queue_limit": {"queue": "chaos-limited", "concurrency": h.queue_limit,
                        "max_running_seen": h.queue_running_max,
                        "allowed_up_to": h.queue_limit + h.nodes},
        "faults": faults,
        "recovery_s": {"count": len(recovered),
                       "max": max(recovered) if recovered else None,
                       "mean": round(sum(recovered) / len(recovered), 3) if recovered
                       else None},
        "load_s": round(result.t_load_end - result.t0, 2),
        "drain_s": round(result.t_drained - result.t_load_end, 2),
        "worker_processes_started": result.workers_spawned,
        "driver_notes": {f"{r.tenant}/{r.workflow_id}": r.notes[-5:]
                         for r in recs if r.notes},
    }


def _count(xs: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def _log_lines(logs: Path) -> dict[str, int]:
    """Tracebacks and ERROR lines per worker log: not an invariant (a fault makes workers
    log), but where to look first when one fails."""
    out: dict[str, int] = {}
    for f in sorted(logs.glob("worker-*.log")):
        text = f.read_text(errors="replace")
        n = text.count("Traceback") + text.count(" ERROR ")
        if n:
            out[f.name] = n
    return out


def write(out: Path, result: ChaosResult, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    s = summary(result)
    s["worker_log_errors"] = _log_lines(out / "workers")
    (out / "chaos.json").write_text(json.dumps(s, indent=2, default=str) + "\n")
    (out / "history.json").write_text(json.dumps(dataclasses.asdict(result.history),
                                                 default=str) + "\n")
    plotted = _plot(out / "chaos.png", result)
    w = s["workflows"]
    lines = [
        f"# Chaos drill, seed {s['seed']}: {'PASSED' if s['ok'] else 'FAILED'}",
        "",
        f"{w['planned']} workflows planned "
        f"({', '.join(f'{k} {v}' for k, v in w['by_kind'].items())}),"
        f" {w['acknowledged']} starts acknowledged, {len(s['faults'])} faults, "
        f"{s['load_s']} s of load, drained in {s['drain_s']} s. Final statuses: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(w['statuses'].items()))}.",
        "",
        "| invariant | result | checked | violations |",
        "|---|---|---|---|",
    ]
    for i in result.invariants:
        verdict = "PASS" if i.ok else "**FAIL**"
        extra = f" (count: {i.figure})" if i.figure is not None else ""
        lines.append(f"| ({i.key}) {i.title}{extra} | {verdict} | {i.checked} | "
                     f"{len(i.violations)} |")
    for i in result.invariants:
        if i.violations:
            lines += ["", f"## ({i.key}) {i.title}: {len(i.violations)} violation(s)", ""]
            lines += [f"- {v}" for v in i.violations[:MAX_LISTED]]
            if len(i.violations) > MAX_LISTED:
                lines.append(f"- ... {len(i.violations) - MAX_LISTED} more in chaos.json")
    lines += ["", "## Faults", "",
              "| # | kind | at s | target | held s | recovered s | orphans | note |",
              "|---|---|---|---|---|---|---|---|"]
    for f in s["faults"]:
        target = f.get("node") or f.get("pid") or ""
        held = f.get("hold_s", f.get("down_s", f.get("pause_s", "")))
        rec = ("idle" if f.get("idle") and f.get("recovered_s") in (None, 0.0)
               else f.get("recovered_s", "NOT RECOVERED"))
        note = f.get("skipped") or f.get("error") or f.get("detail") or f.get("mode") or ""
        lines.append(f"| {f['n']} | {f['kind']} | {f.get('at_s', '')} | {target} | {held} | "
                     f"{rec} | {f.get('orphans', '')} | {note} |")
    q = s["queue_limit"]
    lines += [
        "",
        "Recovery: for a worker fault, from the fault until every workflow the victim held "
        "is held by another worker or finished; for a node fault, from the heal until a "
        "workflow checkpoints on that node again ('idle': nothing was due there). "
        f"Mean {s['recovery_s']['mean']} s, max {s['recovery_s']['max']} s.",
        "",
        f"External step re-runs (at least once, counted, allowed): {s['external_reruns']}. "
        f"Messages: {w['messages_sent']} sent by the driver, "
        f"{w['messages_resent_after_consumed']} re-sent with the same key after they were "
        f"consumed, {w['keyless_sends_errored']} keyless sends errored (may or may not be "
        f"delivered: checked at most once). Cancelled by the driver {w['cancelled_by_driver']}"
        f", resumed {w['resumed']}, forked {w['forked']}. Queue {q['queue']} (concurrency "
        f"{q['concurrency']}, each node may exceed it by one): at most "
        f"{q['max_running_seen']} seen running (sampled every 0.5 s).",
        "",
        ("![chaos](chaos.png)" if plotted else "(no plot: matplotlib is not installed)"),
        "",
        f"Machine: {s['machine']}. Settings: `{json.dumps(s['settings']['engine'])}`.",
        "",
        "Command:", "", "```sh", command, "```", "",
        f"Tracebacks/ERROR lines in the worker logs: {s['worker_log_errors'] or 'none'}.",
        "",
        "Every figure is in chaos.json; the driver's full history (each workflow's script "
        "and what was done to it) in history.json; worker logs in workers/.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out


def print_summary(console: Console, result: ChaosResult, report_dir: Path) -> None:
    t = Table(title=f"shardflow drill chaos, seed {result.history.seed}")
    t.add_column("invariant")
    t.add_column("result")
    t.add_column("checked", justify="right")
    t.add_column("violations", justify="right")
    for i in result.invariants:
        t.add_row(f"({i.key}) {i.title}" + (f" = {i.figure}" if i.figure is not None else ""),
                  "[green]PASS[/green]" if i.ok else "[red]FAIL[/red]", str(i.checked),
                  str(len(i.violations)))
    console.print(t)
    for i in result.invariants:
        for v in i.violations[:5]:
            console.print(f"  [red]({i.key})[/red] {v}")
    console.print(f"report: {report_dir}/report.md")
