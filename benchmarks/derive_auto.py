#!/usr/bin/env python
"""Turn GPU suite results into the table backend="auto" chooses by on CUDA (pyfk/engine/measured.py).

    python benchmarks/derive_auto.py SUITE_JSON... [--table PATH] [--write]

Reads benchmarks/gpu_suite.py JSON files (result["versions"]["gpu"], result["timing"],
result["commit"], result["date"]) and makes one table entry per GPU, timed case and dtype:
the seconds of every backend timed there. Rows with an error, skipped, or without seconds are
left out; a row timed on a query slice and scaled in M ("scaled") is marked "estimated";
labels with "[" (e.g. "triton[merge]") are variants of a backend, not backends, and are left
out. The combine is the row's ("combine"), else "product" (the suite times that one only).

Prints the entries; with --write merges them into the table (default: the packaged
pyfk/engine/measured_cuda.json): an entry for the same gpu, dtype, combine, M, N, widths, k
replaces the old one in place, others are appended; among the given files a later one wins.
The table is written atomically (a temp file beside it, then os.replace). Exit 0, or 1 when
a file is unreadable or holds no usable timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from pyfk.engine import measured  # noqa: E402  (after the path fix above)

SKIP_FIELDS = ("error", "skipped")


def suite_entries(path) -> list[measured.Measurement]:
    """The table entries of one gpu_suite JSON file, in the order its cases first appear.
    ValueError naming the file when it is not a suite result with a GPU and timings."""
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: expected a gpu_suite JSON file, got one that cannot be read ({exc})") from None
    gpu = (result.get("versions") or {}).get("gpu") if isinstance(result, dict) else None
    if not isinstance(gpu, dict) or not gpu.get("name") or not gpu.get("capability"):
        raise ValueError(f"{path}: expected versions.gpu with name and capability (a suite run on a GPU), got {gpu!r}")
    rows = result.get("timing")
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a 'timing' list (the suite ran without --no-timing), got "
                         f"{type(rows).__name__}")
    groups: dict[tuple, dict] = {}  # (case, dtype, combine, M, N, widths, k) -> seconds and estimated
    for i, row in enumerate(rows):
        name = row.get("backend")
        if not isinstance(name, str) or "[" in name or any(row.get(f) for f in SKIP_FIELDS):
            continue
        seconds = row.get("seconds")
        if seconds is None:
            continue
        try:
            key = (row["case"], row["dtype"], row.get("combine", "product"), row["M"], row["N"],
                   tuple(row["widths"]), row["k"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: timing[{i}]: expected case, dtype, M, N, widths, k, got a row without "
                             f"{exc}") from None
        group = groups.setdefault(key, {"seconds": {}, "estimated": []})
        group["seconds"][name] = seconds
        if row.get("scaled"):
            group["estimated"].append(name)
    entries = []
    for (case, dtype, combine, M, N, widths, k), group in groups.items():
        obj = {"gpu": gpu["name"], "capability": gpu["capability"], "dtype": dtype, "combine": combine, "M": M,
               "N": N, "widths": list(widths), "k": k, "seconds": group["seconds"],
               "estimated": group["estimated"], "source": path.name, "commit": result.get("commit"),
               "date": result.get("date")}
        entries.append(measured.Measurement.from_json(obj, f"{path}: case {case!r}"))
    return entries


def describe(entry: measured.Measurement) -> str:
    ranked = sorted(entry.seconds, key=entry.seconds.get)
    times = ", ".join(f"{n} {entry.seconds[n]:.4g} s" + (" est." if n in entry.estimated else "") for n in ranked)
    return (f"{entry.gpu} ({entry.capability}) {entry.dtype} {entry.combine} M={entry.M} N={entry.N} "
            f"widths={list(entry.widths)} k={entry.k}: {times}  [{entry.source}]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suite_json", nargs="+", help="gpu_suite_<stamp>.json files")
    ap.add_argument("--table", default=str(measured.PACKAGED_TABLE),
                    help="the table to merge into (default: the packaged pyfk/engine/measured_cuda.json)")
    ap.add_argument("--write", action="store_true", help="merge the entries into --table (else only print them)")
    args = ap.parse_args(argv)
    new: list[measured.Measurement] = []
    try:
        for path in args.suite_json:
            found = suite_entries(path)
            if not found:
                raise ValueError(f"{path}: expected timing rows with seconds, got none usable "
                                 "(every row errored, was skipped, or is a variant)")
            new += found
    except ValueError as exc:
        print(f"derive_auto: {exc}", file=sys.stderr)
        return 1
    for entry in new:
        print(describe(entry))
    table = Path(args.table)
    if not args.write:
        print(f"{len(new)} entries; pass --write to merge them into {table}")
        return 0
    try:
        old = measured.load_table(table, "--table") if table.exists() else []
        note = json.loads(table.read_text(encoding="utf-8")).get("note") if table.exists() else None
    except ValueError as exc:
        print(f"derive_auto: {exc}", file=sys.stderr)
        return 1
    merged = measured.updated_entries(old, new)
    new_keys = {e.key for e in new}
    replaced = sum(e.key in new_keys for e in old)
    measured.write_table(table, merged, note)
    print(f"wrote {len(merged)} entries to {table} ({replaced} replaced, {len(merged) - len(old)} added)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
