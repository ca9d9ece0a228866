"""One table over several ``shardflow drill chaos`` runs (their ``chaos.json``).

    python -m loadtest.chaos_summary results/2026-12-08-drill-chaos-seed101 ... \
        --out results/2026-12-08-chaos-summary.md

Per run: the seed, what was started, the faults, every invariant's verdict; per fault
kind over all runs: how many struck, and the recovery times (p50 / max; for a worker
fault from the fault until every workflow the victim held is held by another worker or
finished, for a node fault from the heal until a workflow checkpoints there again).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def _load(run: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run / "chaos.json").read_text())
    data["dir"] = run
    return data


def summary(runs: list[Path]) -> str:
    data = [_load(r) for r in runs]
    lines = ["| run | seed | load s | started | faults | invariants | violations | "
             "external re-runs | drained in s |", "|---|---|---|---|---|---|---|---|---|"]
    times: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for d in data:
        inv = d["invariants"]
        bad = sum(len(i["violations"]) for i in inv)
        verdict = "all pass" if d["ok"] else ", ".join(
            f"({i['key']}) FAIL" for i in inv if not i["ok"])
        lines.append(
            f"| [{d['dir'].name}]({d['dir'].name}/report.md) | {d['seed']} | "
            f"{d['load_s']:.0f} | {d['settings']['planned_workflows']:,} | "
            f"{len(d['faults'])} | {verdict} ({len(inv)} checked) | {bad} | "
            f"{d.get('external_reruns', 0)} | {d['drain_s']:.1f} |")
        for f in d["faults"]:
            counts[f["kind"]] += 1
            if not f.get("idle") and f.get("recovered_s") is not None:
                times[f["kind"]].append(float(f["recovered_s"]))
    lines += ["", "| fault | struck | recovery measured | p50 s | max s |",
              "|---|---|---|---|---|"]
    for kind in sorted(counts):
        ts = times[kind]
        p50 = f"{statistics.median(ts):.2f}" if ts else "–"
        mx = f"{max(ts):.2f}" if ts else "–"
        lines.append(f"| {kind} | {counts[kind]} | {len(ts)} | {p50} | {mx} |")
    machine = data[0].get("machine", {}) if data else {}
    lines += ["", f"Machine: {machine}. Engine settings: "
              f"`{json.dumps(data[0]['settings']['engine']) if data else ''}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    text = summary(a.runs)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
