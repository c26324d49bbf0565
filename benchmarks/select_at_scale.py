"""PFK selection on the ImageNet-shaped fp16 store: one process vs W gloo processes.

    python benchmarks/select_at_scale.py [--world 2] [--threads 1] [--budget 1000] [--json OUT.json]

The pool is the `pyfk bench --preset imagenet` store (N = 1,281,167 fp16 rows, scales
64/128/256/512, z and g; built once under the cache directory). The validation set is
M = 1,000 seeded fp16 rows, all of them errors (labels != predictions), so the search has
1,000 centres. One process runs `pyfk.select` on the whole store; then W processes (spawned,
gloo on loopback, `--threads` each) each take a contiguous row range of the same memory-
mapped store as their shard and run `pyfk.distributed.select`. Prints time and peak anonymous
RSS growth (pyfk.bench.PeakRSS: the mapped store's pages excluded) per run and whether
every rank's picks equal the single process's (indices, order, scores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))


def _val(widths, m: int, seed: int = 7):
    import pyfk

    rng = np.random.default_rng(seed)
    z = [rng.standard_normal((m, w)).astype(np.float16) for w in widths]
    g = [rng.standard_normal((m, w)).astype(np.float16) for w in widths]
    labels = np.zeros(m, dtype=np.int64)
    return pyfk.Descriptors(z, g), labels, labels + 1  # every row an error


def _pool(lo: int | None = None, hi: int | None = None):
    import pyfk
    from pyfk.bench import PRESETS, preset_store

    store = preset_store("imagenet", progress=False)
    d = store.descriptors()
    if lo is None:
        return d, PRESETS["imagenet"]["widths"]
    return pyfk.Descriptors([a[lo:hi] for a in d.z], [a[lo:hi] for a in d.g]), PRESETS["imagenet"]["widths"]


def _rank(rank, world, threads, budget, m):
    import torch

    import pyfk

    torch.set_num_threads(threads)
    n = 1281167
    bounds = [n * r // world for r in range(world + 1)]
    pool, widths = _pool(bounds[rank], bounds[rank + 1])
    val, y, y_hat = _val(widths, m)
    from pyfk.bench import PeakRSS

    with PeakRSS(0.01) as peak:
        t0 = time.perf_counter()
        d = pyfk.distributed.select(pool, val, budget, y, y_hat, return_details=True, options={"threads": threads})
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mib": peak.growth / 2**20, "indices": d["indices"].tolist(),
            "score": np.asarray(d["score"]).tolist(), "rows": bounds[rank + 1] - bounds[rank]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="kernel threads per process (default 1)")
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--M", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from harness import run_ranks

    import pyfk

    torch.set_num_threads(args.threads)
    pool, widths = _pool()  # builds the store if needed (once)
    val, y, y_hat = _val(widths, args.M)
    flops = 4 * sum(widths) * args.M * pool.n
    from pyfk.bench import PeakRSS

    with PeakRSS(0.01) as peak:
        t0 = time.perf_counter()
        one = pyfk.select(pool, val, args.budget, y, y_hat, return_details=True, options={"threads": args.threads})
        one_s = time.perf_counter() - t0
    one_peak = peak.growth / 2**20
    print(f"1 process, {args.threads} thread(s): {one_s:.1f} s, {flops / one_s / 1e9:.1f} GFLOP/s, "
          f"peak anonymous RSS growth {one_peak:.0f} MiB (the mapped store excluded)")
    ranks = run_ranks(_rank, args.world, (args.threads, args.budget, args.M), timeout=3600)
    same = all(r["indices"] == one["indices"].tolist() and r["score"] == np.asarray(one["score"]).tolist()
               for r in ranks)
    slowest = max(r["seconds"] for r in ranks)
    print(f"{args.world} gloo processes, {args.threads} thread(s) each: {slowest:.1f} s (slowest rank), "
          f"{flops / slowest / 1e9:.1f} GFLOP/s, peak anonymous RSS growth per rank "
          + ", ".join(f"{r['peak_mib']:.0f}" for r in ranks) + " MiB; picks identical to one process: "
          + str(same))
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": platform.processor() or _cpu_model(),
              "N": pool.n, "M": args.M, "widths": widths, "budget": args.budget, "threads": args.threads,
              "world": args.world, "flops": flops,
              "one": {"seconds": one_s, "peak_mib": one_peak},
              "ranks": [{k: r[k] for k in ("seconds", "peak_mib", "rows")} for r in ranks],
              "identical": same, "argv": sys.argv}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if not same:
        raise SystemExit(1)


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
