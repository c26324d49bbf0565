"""Markdown tables of an AL run directory for benchmarks/RESULTS.md.

    python benchmarks/al_tables.py runs/demo-full                      # pfk against the others
    python benchmarks/al_tables.py runs/noisy_audit --reference pfk+audit --reference entropy+audit

Reads DIR/results.json (written by `pyfk run` / `pyfk demo`) and prints, per metric, the mean over
seeds with the half-width of its 95% t-interval per strategy and round, then each reference
strategy minus every other, paired by seed (pyfk.al.runner.compare; * = the interval excludes 0).
"""

from __future__ import annotations

import argparse
import json
import os

from pyfk.al.runner import compare

METRICS = ("minority_accuracy", "accuracy", "wrong_labels")


def mean_table(summary: dict, metric: str) -> str:
    strategies = [s for s, entries in summary.items() if all(metric in e for e in entries)]
    if not strategies:
        return ""
    rounds = [e["round"] for e in summary[strategies[0]]]
    lines = [f"| round (labels) | {' | '.join(strategies)} |", "|---|" + "---|" * len(strategies)]
    for i, r in enumerate(rounds):
        cells = []
        for s in strategies:
            e = summary[s][i]
            half = "" if e.get(metric + "_lo") is None else f" ± {(e[metric + '_hi'] - e[metric + '_lo']) / 2:.3f}"
            cells.append(f"{e[metric]:.3f}{half}")
        cost = summary[strategies[0]][i].get("queries", summary[strategies[0]][i]["labels"])
        lines.append(f"| {r} ({cost}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(paired: dict, metric: str) -> str:
    per = paired.get("metrics", {}).get(metric)
    if not per:
        return ""
    others = list(per)
    rounds = [e["round"] for e in per[others[0]]["rounds"]]

    def cell(p):
        if p is None:
            return ""
        if p["lo"] is None:
            return f"{p['diff']:+.3f}"
        return (f"{p['diff']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}] {p['wins']}-{p['ties']}-{p['losses']}"
                + (" *" if p["holds"] else ""))

    lines = [f"| {paired['reference']} minus | " + " | ".join(f"round {r}" for r in rounds) + " | mean of rounds |",
             "|---|" + "---|" * (len(rounds) + 1)]
    for o in others:
        lines.append(f"| {o} | " + " | ".join(cell(e) for e in per[o]["rounds"]) + f" | {cell(per[o]['mean'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run directory holding results.json")
    p.add_argument("--reference", action="append", default=None, help="reference strategy (repeatable; default pfk)")
    args = p.parse_args()
    with open(os.path.join(args.run, "results.json")) as f:
        results = json.load(f)
    for metric in METRICS:
        table = mean_table(results["summary"], metric)
        if table:
            print(f"\n{metric}: mean over seeds ± half-width of the 95% t-interval\n\n{table}")
    for ref in args.reference or ["pfk"]:
        paired = compare(results["rows"], ref, METRICS)
        for metric in METRICS:
            table = paired_table(paired, metric)
            if table:
                print(f"\n{metric}, paired by seed: mean difference [95% interval] wins-ties-losses\n\n{table}")


if __name__ == "__main__":
    main()
