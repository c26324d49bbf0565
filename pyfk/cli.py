"""The `pyfk` command line (also `python -m pyfk`).

    pyfk bench [--quick] [--M 1000 --N 50000 --widths 64,128,256,512 --k 32] [--json out.json]
    pyfk backends
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyfk import BackendUnavailable, __version__
from pyfk.descriptors import COMBINES

# Defaults of `pyfk bench` (the size) and of `pyfk bench --quick`.
_FULL = {"M": 1000, "N": 50000, "widths": [64, 128, 256, 512]}
_QUICK = {"M": 200, "N": 10000, "widths": [32, 64]}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one backend name")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyfk", description="pyfk: fused top-k for the practical Fisher kernel (deep active learning).")
    parser.add_argument("--version", action="version", version=f"pyfk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = sub.add_parser(
        "bench", help="time pyfk.topk per backend against the materialise-then-topk baseline",
        description="Time pyfk.topk on random descriptors per backend; report ms, GFLOP/s, the share of the "
                    "torch float32 GEMM rate, the speed-up over materialising the M x N matrix with torch "
                    "and torch.topk, and the peak RSS growth. Scores are checked against the torch backend "
                    f"first. Default size: M={_FULL['M']} N={_FULL['N']} "
                    f"widths={','.join(map(str, _FULL['widths']))} k=32.")
    bench.add_argument("--M", type=_positive, default=None, help=f"queries (default {_FULL['M']})")
    bench.add_argument("--N", type=_positive, default=None, help=f"pool size (default {_FULL['N']})")
    bench.add_argument("--widths", type=_int_list, default=None,
                       help=f"comma-separated scale widths L_j (default {','.join(map(str, _FULL['widths']))})")
    bench.add_argument("--k", type=_positive, default=32, help="neighbours per query (default 32)")
    bench.add_argument("--combine", choices=COMBINES, default="product", help="similarity (default product)")
    bench.add_argument("--dtype", choices=("float16", "float32", "float64"), default="float32",
                       help="dtype of the random descriptors (default float32)")
    bench.add_argument("--backends", type=_name_list, default=["cpu", "torch"],
                       help="comma-separated backends to time (default cpu,torch)")
    bench.add_argument("--threads", type=_positive, default=None,
                       help="torch.set_num_threads before timing; the cpu backend uses the same count")
    bench.add_argument("--repeats", type=_positive, default=3, help="timed runs per backend, median (default 3)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random descriptors (default 0)")
    bench.add_argument("--no-baseline", action="store_true", help="skip the materialise baseline")
    bench.add_argument("--no-check", action="store_true", help="skip the correctness check against torch")
    bench.add_argument("--no-peak", action="store_true",
                       help="skip the peak RSS measurement (made on the warm-up calls)")
    bench.add_argument("--json", metavar="PATH", type=Path, default=None,
                       help="also write the full result as JSON to PATH (parent folders are created)")
    bench.add_argument("--quick", action="store_true",
                       help=f"small fast size: M={_QUICK['M']} N={_QUICK['N']} "
                            f"widths={','.join(map(str, _QUICK['widths']))} (explicit --M/--N/--widths win)")
    bench.set_defaults(func=_cmd_bench)

    backends = sub.add_parser("backends", help="list the backends and whether they can run here",
                              description="List every pyfk backend, the devices it runs on, and whether it is "
                                          "available here (and if not, why).")
    backends.add_argument("--json", action="store_true", help="print the list as JSON")
    backends.set_defaults(func=_cmd_backends)
    return parser


def _cmd_bench(args: argparse.Namespace) -> int:
    from pyfk.bench import format_table, run_bench  # imported late: `pyfk --help` stays fast

    size = _QUICK if args.quick else _FULL
    M = args.M if args.M is not None else size["M"]
    N = args.N if args.N is not None else size["N"]
    widths = args.widths if args.widths is not None else size["widths"]
    try:
        result = run_bench(M, N, widths, k=args.k, combine=args.combine, dtype=args.dtype, backends=args.backends,
                           threads=args.threads, repeats=args.repeats, check=not args.no_check,
                           baseline=not args.no_baseline, peak=not args.no_peak, seed=args.seed)
    except (BackendUnavailable, ValueError) as exc:
        print(f"pyfk bench: error: {exc}", file=sys.stderr)
        return 2
    except AssertionError as exc:
        print(f"pyfk bench: correctness check failed: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    import pyfk

    rows = pyfk.backends()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("backend", "available", "devices", "description / why not")]
    for r in rows:
        table.append((r["name"], "yes" if r["available"] else "no", ",".join(r["devices"]),
                      r["description"] if r["available"] else r["reason"]))
    width = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], width)) + "  " + row[3])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)
