#!/usr/bin/env python
"""One-call GPU suite: correctness of every GPU backend, then timings (DESIGN.md section 6).

    python benchmarks/gpu_suite.py [--build] [--phases core|tune|tests|all|PHASE,...] [--triton-cache TAR]
                                   [--quick] [--dry-run] [--out DIR] [--option [BACKEND.]KEY=VALUE]

A 30-minute GPU lease, three calls of under 10 minutes each (each on a fresh machine: --build):
    --build --phases core  --triton-cache .device_cache/triton_cache.tar.gz   timings, recall, profile
    --build --phases tune  --triton-cache .device_cache/triton_cache.tar.gz   rates, sweep, inputs
    --build --phases tests --triton-cache .device_cache/triton_cache.tar.gz   kernel tests on the GPU
(.device_cache/ is git-ignored: copy the triton_cache.tar.gz each call writes to $OUT there and
carry it into the next call, so kernels compile once).

The suite's own job is the GPU machine's: build, import checks, the raw CUDA kernel
checks, the plan, time guards, tables and the JSON file. Everything measured goes
through the benchmark harness `pyfk.bench`, the one `pyfk bench` uses: seeded problem
generation (`make_descriptors`, on the GPU), the check against the torch reference
(`compare_topk`), timing with CUDA synchronisation and events (`run_bench`, budget
mode), the GEMM rate (`gemm_rate`), the flop count (`topk_flops`), machine info and
JSON writing. So a number here and a `pyfk bench --device cuda` number mean the same.

Phases (--phases; a global guard skips what is left after ~9 minutes, reporting it). Group
"core" (the default) is 1-5 below and the profile; "tune" is the GEMM rates, profile, sweep and
inputs; "tests" the GPU tests:
  1. versions and the GPU (`pyfk.bench.machine_info("cuda")`);
  2. the CUDA k-selection kernels themselves (pyfk._C_cuda) against torch on packed keys:
     ties, odd sizes, k = 1..1024, running-state init, strided rows, merge, unpack;
  3. every available backend among GPU_BACKENDS against backend "torch" on fresh random
     CUDA inputs (float32/bfloat16/float16, small odd shapes; the seed is printed and
     recorded, --seed repeats it): top-k scores allclose with a dtype-appropriate
     tolerance (`pyfk.bench.TOLERANCE`), valid distinct indices, descending finite
     scores (recall@k instead of scores for approximate backends);
  4. the dense bf16 GEMM rate (torch.matmul 8192^3, CUDA events, median);
  5. timings of pyfk.topk per backend on bf16 descriptors (the triton row records what its
     v2 kernel did: sample, candidate slots, candidates, redone rows), then VARIANTS (triton's v1
     kernel), then per timed case 64 sampled queries of every exact backend against the
     float32 reference: recall@k must be 1.0. Cases: N=200k M=5k, then the
     ImageNet-scale case N=1,281,167 M=50,000 L=64/128/256/512 k=32. A backend whose
     full run would not fit its time budget (the torch reference, always, at full scale)
     is timed on a slice of the queries and scaled linearly in M; the table says so
     ("est." and the slice size). Linear scaling slightly overstates the sliced time
     (per-call pool normalisation is not per query), so speed-ups against a sliced
     reference are a little generous;
  6. profile: one triton v2 call on the largest case (bf16 random and class-sorted) with
     _triton_filter.PROFILE set: seconds per stage (prepare, queries, sample, threshold, filter,
     select) and candidate counts;
  7. gemm also records nvidia-smi clocks before and after, the device copy rate, and float16,
     float32 and TF32 GEMM rates beside bfloat16 (`machine_rates`);
  8. sweep: v2 launch options (SWEEP: tile sizes, warps, stages, L2 group) on the largest case,
     first call (compile) and median time each; every answer must equal the default's exactly;
  9. inputs: triton and cuda on float16, float32, class-clustered and class-sorted pools
     (INPUTS), each then checked on sampled queries against the float32 reference;
 10. tests: pytest GPU_TESTS (the Triton and CUDA kernel tests, compiled for the GPU).
Prints per backend and dtype: ms, TFLOP/s (4*sum(L)*M*N), % of the measured bf16 GEMM
rate, speed-up vs the torch reference, peak CUDA memory. Writes
benchmarks/results/gpu_suite_<date>.json (and a copy under $OUT when that is set).
The JSON is rewritten after every phase (a kill loses at most the phase running) and records
the commit, which backend "auto" takes for CUDA tensors, and why any backend is unavailable.
--build checks for Python.h first. Exits 1 if a correctness check fails (sweep answers and
sampled recall included), a phase raises, a GPU test fails, or one of pyfk's own GPU backends
(triton, cuda, torch) is unavailable on the GPU machine (e.g. a failed pyfk._C_cuda build);
2 without a CUDA device.
--dry-run prints the plan, checks imports and the harness on the CPU, no GPU needed (exit 0).
--compile-report [--json PATH] only compiles the Triton kernel's production configurations for
sm_90 and reports registers, spills, MMA kind, loads and instruction counts (no GPU needed;
benchmarks/compile_report.py); exit 1 if a configuration failed to compile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_BACKENDS = ("triton", "cuda", "torch", "faiss", "faiss_ann")
OWN_GPU_BACKENDS = ("triton", "cuda", "torch")  # unavailable on a GPU machine = a failure of the suite
REFERENCE = "torch"
DTYPES = ("float32", "bfloat16", "float16")
CHECK_SHAPES = [  # (M, N, widths, k, combine)
    (37, 1001, [3, 17], 7, "product"),
    (5, 4099, [64, 33], 32, "product"),
    (1, 257, [8], 1, "product"),
    (13, 2050, [16, 16, 16], 100, "product"),
    (11, 3001, [24, 40], 16, "features"),
]
WIDTHS = (64, 128, 256, 512)
K = 32
TIMING_DTYPE = "bfloat16"
TIMING_SEED = 7  # queries from seed 7, pool from seed 8
TIMING_REPEATS = 5  # at most; fewer when the budget allows fewer
TIMING_CASES = [  # name, M, N, per-backend budget (s)
    ("N200k_M5k", 5_000, 200_000, 25.0),
    ("imagenet_N1281167_M50000", 50_000, 1_281_167, 45.0),
]
QUICK_CASES = [("N50k_M2k", 2_000, 50_000, 10.0)]
# timed besides each backend's defaults: (label, backend, options) -- the triton v1 kernel against v2
VARIANTS = [("triton[merge]", "triton", {"kernel": "merge"})]
RECALL_QUERIES = 64  # per timed case: sampled queries checked against the float32 reference
# tuning (--phases tune): the v2 launch options swept on the largest timed case (bf16, random); the
# first is the default Config, whose answer every other one must reproduce exactly
SWEEP = [
    {},
    {"num_stages": 4},
    {"num_stages": 2},
    {"num_warps": 4},
    {"block_n": 128},
    {"block_n": 128, "num_stages": 2},
    {"block_m": 64, "block_n": 128, "num_warps": 4},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 4},
    {"group_m": 4},
    {"group_m": 16},
]
SWEEP_REPEATS = 3
# input kinds timed besides the bf16 random case: (label, dtype, pool kind); "classes": rows drawn
# around CLASSES class centres (what real features look like), "sorted": the pool ordered by class
INPUTS = [("float16", "float16", "random"), ("float32", "float32", "random"),
          ("bf16-classes", "bfloat16", "classes"), ("bf16-classes-sorted", "bfloat16", "sorted")]
INPUT_BACKENDS = ("triton", "cuda")
CLASSES = 1000
PHASES = ("kernels", "correctness", "gemm", "timing", "variants", "recall", "profile", "sweep", "inputs", "tests")
PHASE_GROUPS = {
    "core": ("kernels", "correctness", "gemm", "timing", "variants", "recall", "profile"),
    "tune": ("gemm", "profile", "sweep", "inputs"),
    "tests": ("tests",),
    "all": PHASES,
}
NEEDS_GEMM = {"timing", "variants", "sweep", "inputs"}  # report % of the GEMM rate
# the test files that run kernels on a GPU when one is there (CPU: the interpreter / compile checks)
GPU_TESTS = ("tests/engine/test_triton.py", "tests/engine/test_triton_filter.py", "tests/engine/test_key_spec.py",
             "tests/engine/test_cuda_compile.py", "tests/engine/test_gpu_suite.py")
GEMM_N, GEMM_DTYPE, GEMM_REPEATS = 8192, "bfloat16", 20
TIME_LIMIT_S = 540.0  # stop starting new work after 9 minutes
DEVICE = "cuda"  # every tensor the suite makes lives here


class Clock:
    def __init__(self, limit: float):
        self.start = time.monotonic()
        self.limit = limit

    @property
    def deadline(self) -> float:
        """The time.monotonic() after which no new work starts."""
        return self.start + self.limit

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.limit - self.elapsed()


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- plan / environment

def plan_text(cases) -> str:
    from pyfk import bench as harness

    lines = ["plan:",
             "  kernels: pyfk._C_cuda select/merge/unpack vs torch on packed keys (exact equality)",
             f"  correctness: backends {list(GPU_BACKENDS)} (those available) vs {REFERENCE!r}, dtypes {list(DTYPES)},",
             f"    shapes (M, N, widths, k, combine) {CHECK_SHAPES}; tolerance x max|score| "
             f"{ {d: harness.TOLERANCE[DEVICE][d] for d in DTYPES} }",
             f"  GEMM: torch.matmul {GEMM_DTYPE} {GEMM_N}^3, CUDA events, median of {GEMM_REPEATS}",
             f"  timing: {TIMING_DTYPE}, widths {list(WIDTHS)}, k={K}, pyfk.bench.run_bench in budget mode:"]
    for name, M, N, budget in cases:
        lines.append(f"    {name}: M={M} N={N} {harness.topk_flops(M, N, WIDTHS, 'product') / 1e12:.1f} TFLOP, "
                     f"budget {budget:.0f} s per backend")
    big = cases[-1][0]
    lines += [f"  profile: one triton v2 call on {big} (bf16 random, bf16 class-sorted) with seconds per stage",
              f"  sweep: triton v2 launch options on {big} (bf16 random), {SWEEP_REPEATS} repeats each, every answer "
              f"equal to the default's: {SWEEP}",
              f"  inputs: {list(INPUT_BACKENDS)} on {big} for {[label for label, _, _ in INPUTS]} ({CLASSES} classes), "
              f"then {RECALL_QUERIES} sampled queries each vs the float32 reference",
              f"  tests: pytest {' '.join(GPU_TESTS)}",
              f"  global guard: no new work after {TIME_LIMIT_S:.0f} s; skipped cases are reported"]
    return "\n".join(lines)


def python_headers() -> str | None:
    """None when Python.h is where extensions are built against, else what is missing."""
    import sysconfig

    include = Path(sysconfig.get_paths()["include"])
    return None if (include / "Python.h").is_file() else f"no Python.h in {include} (install the python3-dev headers)"


def commit_id() -> str | None:
    """The checkout's commit (and '+dirty' with uncommitted changes), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def build() -> None:
    missing = python_headers()
    if missing:  # pip would fail deep inside CMake; say why up front
        raise SystemExit(f"build: cannot build pyfk's extensions: {missing}")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(ROOT)]
    log("build: " + " ".join(cmd))
    subprocess.run(cmd, check=True)


# ----------------------------------------------------------------------------- 2. kernel checks

def kernel_checks(failures: list, seed: int) -> list:
    """The raw CUDA kernels against torch on packed keys (the one key spec,
    pyfk.engine.topk_state); results must be identical. Inputs from torch's global
    generator, seeded with `seed`."""
    import torch

    from pyfk.engine.kernels import cuda as cs
    from pyfk.engine.topk_state import EMPTY_KEY, pack_keys, unpack_keys

    torch.manual_seed(seed)
    rows_out = []
    dev = torch.device(DEVICE)
    empty = torch.tensor(EMPTY_KEY, dtype=torch.int64, device=dev)

    def want_topk(keys: torch.Tensor, k: int) -> torch.Tensor:
        kk = min(k, keys.shape[1])
        top = keys.topk(kk, dim=1, sorted=True).values if kk else keys[:, :0]
        pad = empty.expand(keys.shape[0], k - kk)
        return torch.cat([top, pad], dim=1)

    def record(name: str, ok: bool, detail: str = "") -> None:
        rows_out.append({"check": name, "ok": bool(ok), "detail": detail})
        if not ok:
            failures.append(f"kernel {name}: {detail}")
        log(f"  {'ok  ' if ok else 'FAIL'} {name} {detail}")

    def scores_like(rows: int, n: int, kind: str) -> torch.Tensor:
        if kind == "ties":  # few distinct values: long runs of equal scores, +0 and -0
            s = (torch.randint(-20, 21, (rows, n), device=dev).float() / 7.0)
            s[s == 0] = torch.where(torch.rand_like(s[s == 0]) < 0.5, 0.0, -0.0)
            return s
        if kind == "ascending":  # every column beats the running threshold: worst case for flushes
            return torch.arange(n, device=dev, dtype=torch.float32).expand(rows, n).contiguous()
        return torch.randn(rows, n, device=dev)

    try:
        grid_ok = True
        for n in (1, 5, 33, 1000, 1025, 3000, 10007):
            for k in (1, 7, 32, 100, 1024):
                for kind in ("randn", "ties", "ascending"):
                    if kind == "ascending" and n < 1000:
                        continue
                    s = scores_like(6, n, kind)
                    offset = int(torch.randint(0, 1000, ()).item())
                    ids = torch.arange(offset, offset + n, device=dev).expand(6, n)
                    want = want_topk(pack_keys(s, ids), k)
                    got = cs.select_keys(s, k, index_offset=offset)
                    ok = torch.equal(got, want)
                    got_k = cs.select_keys(pack_keys(s, ids).contiguous(), k)
                    ok_k = torch.equal(got_k, want)
                    if not (ok and ok_k):
                        grid_ok = False
                        record(f"select n={n} k={k} {kind}", False, f"float ok={ok} keys ok={ok_k}")
        record("select (float32 and int64 sources) n x k x {randn,ties,ascending} grid", grid_ok)

        # Running-state init (fused merge), also aliased in place.
        for n, k in ((500, 32), (4099, 1024), (10, 64)):
            base = torch.randn(9, 3000, device=dev)
            state = want_topk(pack_keys(base, torch.arange(3000, device=dev).expand(9, 3000)), k)
            s = torch.randn(9, n, device=dev)
            ids = torch.arange(5000, 5000 + n, device=dev).expand(9, n)
            want = want_topk(torch.cat([state, pack_keys(s, ids)], dim=1), k)
            got = cs.select_keys(s, k, index_offset=5000, init=state)
            inplace = state.clone()
            with torch.cuda.device(dev):
                cs._C_cuda.select_topk(s.data_ptr(), 9, n, k, inplace.data_ptr(),
                                       torch.cuda.current_stream().cuda_stream, index_offset=5000,
                                       init_ptr=inplace.data_ptr())
            record(f"select with init n={n} k={k}", torch.equal(got, want) and torch.equal(inplace, want))

        # Strided rows (a column slice of a wider matrix).
        wide = torch.randn(8, 2000, device=dev)
        view = wide[:, 3:1800]
        want = want_topk(pack_keys(view.contiguous(), torch.arange(1797, device=dev).expand(8, 1797)), 50)
        got = torch.empty(8, 50, dtype=torch.int64, device=dev)
        cs._C_cuda.select_topk(view.data_ptr(), 8, 1797, 50, got.data_ptr(),
                               torch.cuda.current_stream().cuda_stream, ld=view.stride(0))
        record("select strided rows (ld > n)", torch.equal(got, want))

        # Many rows (one block each).
        s = torch.randn(20000, 700, device=dev)
        want = want_topk(pack_keys(s, torch.arange(700, device=dev).expand(20000, 700)), 32)
        record("select 20000 rows x 700", torch.equal(cs.select_keys(s, 32), want))

        # Merge: two sorted lists (disjoint indices), and in place.
        for k in (1, 5, 32, 257, 1024):
            a = want_topk(pack_keys(torch.randn(7, 2 * k, device=dev),
                                    torch.arange(2 * k, device=dev).expand(7, 2 * k)), k)
            b = want_topk(pack_keys(torch.randn(7, 2 * k, device=dev),
                                    torch.arange(2 * k, 4 * k, device=dev).expand(7, 2 * k)), k)
            want = want_topk(torch.cat([a, b], dim=1), k)
            got = cs.merge(a, b)
            a2 = a.clone()
            cs.merge(a2, b, out=a2)
            record(f"merge k={k}", torch.equal(got, want) and torch.equal(a2, want))
        e = want_topk(torch.empty(3, 0, dtype=torch.int64, device=dev), 4)
        x = want_topk(pack_keys(torch.randn(3, 2, device=dev), torch.arange(2, device=dev).expand(3, 2)), 4)
        record("merge with empty slots", torch.equal(cs.merge(e, x), want_topk(torch.cat([e, x], 1), 4)))

        # Unpack.
        keys = pack_keys(torch.randn(5, 40, device=dev), torch.randint(0, 1 << 31, (5, 40), device=dev))
        keys[0, :3] = empty
        sc = torch.empty(5, 40, device=dev)
        ix = torch.empty(5, 40, dtype=torch.int64, device=dev)
        cs._C_cuda.unpack_keys(keys.data_ptr(), keys.numel(), sc.data_ptr(), ix.data_ptr(),
                               torch.cuda.current_stream().cuda_stream)
        ws, wi = unpack_keys(keys)
        record("unpack", torch.equal(sc, ws) and torch.equal(ix, wi))
        torch.cuda.synchronize()
    except Exception as exc:
        record("kernel checks raised", False, f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    return rows_out


# ----------------------------------------------------------------------------- 3. backend checks

def backend_checks(names, failures: list, seed: int, options: dict) -> list:
    """Every backend in `names` against the torch reference on CHECK_SHAPES x DTYPES
    (pyfk.bench.compare_topk); `options`: per-backend option dicts."""
    from pyfk import bench as harness

    rows = []
    tolerance = harness.TOLERANCE[DEVICE]
    for name in names:
        for dtype_name in DTYPES:
            for i, (M, N, widths, k, combine) in enumerate(CHECK_SHAPES):
                row = {"backend": name, "dtype": dtype_name, "M": M, "N": N, "widths": widths, "k": k,
                       "combine": combine, "seed": seed + 2 * i, "options": options.get(name) or {}}
                try:
                    q = harness.make_descriptors(M, widths, dtype_name, seed + 2 * i, DEVICE)
                    p = harness.make_descriptors(N, widths, dtype_name, seed + 2 * i + 1, DEVICE)
                    row.update(harness.compare_topk(name, q, p, k, combine, options=options.get(name) or None,
                                                    tolerance=tolerance[dtype_name]))
                except Exception as exc:
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                rows.append(row)
                if not row["ok"]:
                    failures.append(f"backend {name} {dtype_name} {M}x{N} {widths} k={k} {combine}: "
                                    f"{row.get('error') or row}")
            mine = [r for r in rows if r["backend"] == name and r["dtype"] == dtype_name]
            status = "ok  " if all(r["ok"] for r in mine) else "FAIL"
            if not harness.is_exact(name):
                extra = f"min recall@k {min(r.get('recall', 0.0) for r in mine):.3f}"
            else:
                rel = max(r.get("rel_diff", float("inf")) for r in mine)
                agree = min(r.get("index_agreement", 0.0) for r in mine)
                extra = (f"max |diff|/max|score| {rel:.2e} (tol {tolerance[dtype_name]:.0e}), "
                         f"min index agreement {agree:.3f}")
            log(f"  {status} {name:10s} {dtype_name:9s} {len(mine)} shapes, {extra}")
    return rows


# ----------------------------------------------------------------------------- 5. timings

def case_meta(case: str, M: int, N: int) -> dict:
    """What every timing row of a case records about the problem."""
    from pyfk import bench as harness

    return {"case": case, "dtype": TIMING_DTYPE, "M": M, "N": N, "widths": list(WIDTHS), "k": K,
            "flops": harness.topk_flops(M, N, WIDTHS, "product")}


def bench_case(M: int, N: int, backends, scoped: dict, budget: float, gemm: dict, clock: Clock, **kw) -> dict:
    """pyfk.bench.run_bench on the suite's timing problem (seeds, dtype, k, repeats, peak memory,
    budget mode against the run's deadline, the measured GEMM rate)."""
    from pyfk import bench as harness

    return harness.run_bench(M, N, WIDTHS, k=K, dtype=TIMING_DTYPE, backends=backends, repeats=TIMING_REPEATS,
                             check=False, baseline=False, peak=True, seed=TIMING_SEED, device=DEVICE,
                             options=scoped, budget=budget, deadline=clock.deadline, gemm=gemm, errors="record", **kw)


def with_tflops(row: dict) -> dict:
    if row.get("gflops") is not None:
        row["tflops"] = row["gflops"] / 1e3
    return row


def timing(names, cases, gemm: dict, clock: Clock, options: dict) -> list:
    """pyfk.bench.run_bench per case (budget mode, the run's deadline, the measured GEMM
    rate), the reference first; rows tagged with the case."""
    import torch


    order = [REFERENCE] + [n for n in names if n != REFERENCE]
    scoped = {f"{n}.{key}": value for n in order for key, value in (options.get(n) or {}).items()}
    rows = []
    for case, M, N, budget in cases:
        meta = case_meta(case, M, N)
        # Rough need: the reference's pilot + slice, plus each backend's budget.
        if clock.left() < 60:
            rows += [{**meta, "backend": name, "skipped": "time guard"} for name in order]
            log(f"  {case}: skipped (time guard, {clock.elapsed():.0f} s elapsed)")
            continue

        def report(r, case=case):
            if r["seconds"] is not None:
                what = f"{1e3 * r['seconds']:.1f} ms" + (f" (est. from M={r['measured_m']})" if r["scaled"] else "")
            else:
                what = r.get("skipped") or r.get("error") or r["note"]
            log(f"  {case} {r['backend']}: {what}")

        try:
            res = bench_case(M, N, order, scoped, budget, gemm, clock, on_row=report)
        except Exception as exc:  # making the inputs (OOM) or setting up: every row of the case reports it
            what = "OOM making inputs" if isinstance(exc, torch.cuda.OutOfMemoryError) else type(exc).__name__
            rows += [{**meta, "backend": name, "error": f"{what}: {exc}"} for name in order]
            log(f"  {case}: {what}: {exc}")
            torch.cuda.empty_cache()
            continue
        for r in res["rows"]:
            row = with_tflops({**meta, **r})
            if r["backend"] == "triton" and (options.get("triton") or {}).get("kernel", "filter") == "filter":
                row["filter_stats"] = filter_stats()
            rows.append(row)
    return rows


def filter_stats() -> dict:
    """What the triton v2 kernel's latest search did (sample, candidate slots, candidates, redone
    and fallback rows, re-scored candidates)."""
    from dataclasses import asdict

    from pyfk.engine.kernels import _triton_filter

    return asdict(_triton_filter.LAST)


def variant_timing(avail, cases, rows, gemm: dict, clock: Clock) -> list:
    """VARIANTS timed like `timing` (their own run_bench calls), speed-up against the torch row of
    the same case in `rows`."""

    out = []
    for label, name, opts in VARIANTS:
        if name not in avail:
            continue
        for case, M, N, budget in cases:
            meta = {**case_meta(case, M, N), "options": opts}
            if clock.left() < 60:
                out.append({**meta, "backend": label, "skipped": "time guard"})
                continue
            try:
                res = bench_case(M, N, [name], {f"{name}.{key}": v for key, v in opts.items()}, budget, gemm,
                                 clock)
            except Exception as exc:  # noqa: BLE001 - recorded
                out.append({**meta, "backend": label, "error": f"{type(exc).__name__}: {exc}"})
                continue
            ref = next((r for r in rows if r.get("case") == case and r.get("backend") == REFERENCE
                        and r.get("seconds")), None)
            for r in res["rows"]:
                row = with_tflops({**meta, **r, "backend": label})
                if ref and r["seconds"]:
                    row["speedup_vs_torch"] = ref["seconds"] / r["seconds"]
                out.append(row)
                what = f"{1e3 * r['seconds']:.1f} ms" if r["seconds"] else (r.get("error") or r.get("note"))
                log(f"  {case} {label}: {what}")
    return out


def recall_checks(avail, cases, failures: list, options: dict, clock: Clock) -> list:
    """Per timed case, RECALL_QUERIES evenly spaced queries of the timing problem (same seeds)
    against the whole pool: every exact backend (and VARIANTS) against the float32 torch
    reference. recall@k must be 1.0 (a failure otherwise); the largest score error is reported."""
    import torch

    from pyfk import bench as harness

    runs = [(n, n, options.get(n) or None) for n in avail if harness.is_exact(n) and n != REFERENCE]
    runs += [(label, n, opts) for label, n, opts in VARIANTS if n in avail]
    rows = []
    for case, M, N, _ in cases:
        if clock.left() < 45:
            rows.append({"case": case, "skipped": "time guard"})
            continue
        try:
            q = sampled_queries(harness.make_descriptors(M, WIDTHS, TIMING_DTYPE, TIMING_SEED, DEVICE))
            p = harness.make_descriptors(N, WIDTHS, TIMING_DTYPE, TIMING_SEED + 1, DEVICE)
        except Exception as exc:  # noqa: BLE001 - recorded
            rows.append({"case": case, "error": f"{type(exc).__name__}: {exc}"})
            failures.append(f"recall {case}: {type(exc).__name__}: {exc}")
            continue
        rows += sampled_recall(runs, q, p, case, failures)
        del p
        torch.cuda.empty_cache()
    return rows


def sampled_queries(queries):
    """RECALL_QUERIES evenly spaced rows of `queries` (all of them if fewer)."""
    import numpy as np

    return queries.take(np.unique(np.linspace(0, queries.n - 1, min(queries.n, RECALL_QUERIES)).round()
                                  .astype(np.int64)))


def sampled_recall(runs, q, p, case: str, failures: list) -> list:
    """runs = [(label, backend, options)] on queries q against pool p, each against the float32
    torch reference: recall@K must be 1.0 (else a failure); the largest score error recorded."""
    from pyfk import bench as harness

    rows = []
    try:
        want_s, want_i = harness.topk_runner(REFERENCE, q, p, K, "product", None)()
    except Exception as exc:  # noqa: BLE001 - recorded
        failures.append(f"recall {case} reference: {type(exc).__name__}: {exc}")
        return [{"case": case, "backend": REFERENCE, "ok": False, "error": f"{type(exc).__name__}: {exc}"}]
    for label, name, opts in runs:
        row = {"case": case, "backend": label, "queries": q.n, "k": K}
        try:
            got_s, got_i = harness.topk_runner(name, q, p, K, "product", opts)()
            cpu = harness.as_cpu_tensor
            row["recall"] = harness.recall_at_k(cpu(got_i), cpu(want_i))
            row["max_abs_score_error"] = float((cpu(got_s).float() - cpu(want_s).float()).abs().max())
            row["ok"] = row["recall"] == 1.0
        except Exception as exc:  # noqa: BLE001 - recorded
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        rows.append(row)
        if not row["ok"]:
            failures.append(f"recall {case} {label}: {row.get('error') or row}")
        log(f"  {'ok  ' if row['ok'] else 'FAIL'} {case} {label}: recall@{K} {row.get('recall')}, "
            f"max |score error| {row.get('max_abs_score_error')}")
    return rows


# ----------------------------------------------------------------------------- 6. tuning (--phases tune)

def nvidia_smi() -> dict:
    """The GPU's clocks, power and driver as nvidia-smi reads them now (or why it could not)."""
    fields = ("name", "driver_version", "pstate", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.draw", "power.limit", "temperature.gpu")
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not on PATH"}
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:300]}
    values = [v.strip() for v in out.stdout.splitlines()[0].split(",")]
    return dict(zip(fields, values))


def copy_rate(gib: float = 2.0, repeats: int = 10) -> dict:
    """Device-to-device copy of `gib` GiB (torch copy_, events, median): bytes read + written / s."""
    import torch

    from pyfk import bench as harness

    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    seconds, _ = harness.median_time(lambda: dst.copy_(src), repeats, DEVICE, warmup=2)
    return {"bytes": n, "seconds": seconds, "gb_per_s": 2 * n / seconds / 1e9}


def machine_rates(gemm: dict) -> dict:
    """What bounds the kernels here: clocks before and after, the copy rate and the GEMM rates of
    every input type the backends run (float32 with TF32 off and on, float16; bfloat16 = `gemm`)."""
    import torch

    from pyfk import bench as harness

    out = {"clocks_before": nvidia_smi()}
    try:
        out["copy"] = copy_rate()
        log(f"  copy: {out['copy']['gb_per_s']:.0f} GB/s (read + write)")
    except Exception as exc:  # noqa: BLE001 - recorded
        out["copy"] = {"error": f"{type(exc).__name__}: {exc}"}
    rates = {GEMM_DTYPE: gemm}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for label, dtype, allow in (("float16", "float16", False), ("float32", "float32", False),
                                ("tf32", "float32", True)):
        try:
            torch.backends.cuda.matmul.allow_tf32 = allow
            rates[label] = harness.gemm_rate(GEMM_N, GEMM_N, GEMM_N, repeats=GEMM_REPEATS, device=DEVICE, dtype=dtype)
            log(f"  {label} matmul {GEMM_N}^3: {rates[label]['tflops']:.1f} TFLOP/s")
        except Exception as exc:  # noqa: BLE001 - recorded
            rates[label] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    out["gemm"] = rates
    out["clocks_after"] = nvidia_smi()
    return out


def class_descriptors(n: int, dtype: str, seed: int, kind: str, labels_seed: int):
    """n rows around CLASSES class centres (centres from seed 1234, shared by queries and pool):
    per segment centre[label] + noise of the same scale, labels uniform (from `labels_seed`);
    kind "sorted" orders the rows by label (a pool stored class by class)."""
    import torch

    import pyfk

    dev = torch.device(DEVICE)
    gen = torch.Generator(device=dev).manual_seed(1234)
    centres = [torch.randn(CLASSES, w, device=dev, generator=gen) for w in WIDTHS for _ in (0, 1)]
    labels = torch.randint(0, CLASSES, (n,), device=dev,
                           generator=torch.Generator(device=dev).manual_seed(labels_seed))
    if kind == "sorted":
        labels = labels.sort().values
    noise = torch.Generator(device=dev).manual_seed(seed)
    parts = [(c[labels] + torch.randn(n, c.shape[1], device=dev, generator=noise)).to(getattr(torch, dtype))
             for c in centres]
    return pyfk.Descriptors(z=parts[0::2], g=parts[1::2])


def make_inputs(M: int, N: int, dtype: str, kind: str):
    """(queries, pool) of the timing problem: `kind` "random" (pyfk.bench.make_descriptors, the
    timing seeds), or "classes" / "sorted" (class_descriptors)."""
    from pyfk import bench as harness

    if kind == "random":
        return (harness.make_descriptors(M, WIDTHS, dtype, TIMING_SEED, DEVICE),
                harness.make_descriptors(N, WIDTHS, dtype, TIMING_SEED + 1, DEVICE))
    if kind not in ("classes", "sorted"):
        raise ValueError(f"kind: expected 'random', 'classes' or 'sorted', got {kind!r}")
    return (class_descriptors(M, dtype, TIMING_SEED, "classes", TIMING_SEED + 2),
            class_descriptors(N, dtype, TIMING_SEED + 1, kind, TIMING_SEED + 3))


def timed(name: str, q, p, opts, gemm: dict, repeats: int) -> tuple[dict, tuple]:
    """The first call (compilation and caches included) and the median of `repeats` more of
    pyfk.topk: a row (seconds, first_call_s, times, TFLOP/s, % of `gemm`) and the answer."""
    from pyfk import bench as harness

    fn = harness.topk_runner(name, q, p, K, "product", opts)
    answer = []
    first = harness.time_call(lambda: answer.append(fn()), DEVICE)
    seconds, times = harness.median_time(fn, repeats, DEVICE, warmup=0)
    flops = harness.topk_flops(q.n, p.n, WIDTHS, "product")
    row = {"seconds": seconds, "first_call_s": first, "times": times, "tflops": flops / seconds / 1e12,
           "pct_gemm": 100.0 * flops / seconds / 1e9 / gemm["gflops"]}
    return row, answer[0]


def profile_phase(avail, cases, clock: Clock) -> list:
    """One v2 call per input kind on the largest case with _triton_filter.PROFILE set: seconds
    per stage (prepare, queries, sample, threshold, filter, select; the device synchronised
    around each) and what the filter did. Slower than an unprofiled call: a breakdown only."""
    import torch

    from pyfk import bench as harness
    from pyfk.engine.kernels import _triton_filter

    if "triton" not in avail:
        return [{"skipped": "triton unavailable"}]
    case, M, N, _ = cases[-1]
    rows = []
    for label, kind in (("bf16", "random"), ("bf16-classes-sorted", "sorted")):
        if clock.left() < 60:
            rows.append({"case": case, "input": label, "skipped": "time guard"})
            continue
        try:
            q, p = make_inputs(M, N, TIMING_DTYPE, kind)
            fn = harness.topk_runner("triton", q, p, K, "product", None)
            fn()  # compiles
            total_plain = harness.time_call(fn, DEVICE)
            _triton_filter.PROFILE = True
            try:
                total = harness.time_call(fn, DEVICE)
            finally:
                _triton_filter.PROFILE = False
            row = {"case": case, "input": label, "M": M, "N": N, "seconds_plain": total_plain,
                   "seconds_profiled": total, **filter_stats()}
            parts = " ".join(f"{k} {1e3 * v:.1f}" for k, v in row["seconds"].items())
            log(f"  {case} {label}: {1e3 * total_plain:.1f} ms plain, profiled (ms): {parts}; "
                f"candidates/query {row['candidates'] / max(1, row['queries']):.0f}, "
                f"re-scored/query {row['rescored'] / max(1, row['queries']):.1f}, cap {row['cap']}, "
                f"redone {row['redone']}, fallback {row['fallback']}")
        except Exception as exc:  # noqa: BLE001 - recorded
            row = {"case": case, "input": label, "error": f"{type(exc).__name__}: {exc}"}
            log(f"  {case} {label}: {row['error']}")
        rows.append(row)
        q = p = None
        torch.cuda.empty_cache()
    return rows


def sweep_phase(avail, cases, gemm: dict, failures: list, clock: Clock) -> list:
    """The v2 launch options of SWEEP on the largest case (bf16, random), each timed like `timed`;
    every configuration's answer must equal the default configuration's exactly (a failure
    otherwise: the tiling must never change the answer)."""
    import torch

    from pyfk import bench as harness

    if "triton" not in avail:
        return [{"skipped": "triton unavailable"}]
    case, M, N, _ = cases[-1]
    q, p = make_inputs(M, N, TIMING_DTYPE, "random")
    rows, want = [], None
    for opts in SWEEP:
        row = {"case": case, "M": M, "N": N, "dtype": TIMING_DTYPE, "options": opts}
        if clock.left() < 45:
            rows.append({**row, "skipped": "time guard"})
            continue
        try:
            timing_row, (got_s, got_i) = timed("triton", q, p, opts or None, gemm, SWEEP_REPEATS)
            row.update(timing_row, filter_stats=filter_stats())
            if want is None:
                want = (got_s, got_i)
            cpu = harness.as_cpu_tensor
            row["same_answer"] = bool(torch.equal(cpu(got_i), cpu(want[1])) and torch.equal(cpu(got_s), cpu(want[0])))
            if not row["same_answer"]:
                failures.append(f"sweep {case} {opts}: the answer differs from the default configuration's")
            log(f"  {case} triton {opts or 'default'}: {1e3 * row['seconds']:.1f} ms ({row['tflops']:.1f} "
                f"TFLOP/s, {row['pct_gemm']:.1f}% GEMM), first call {row['first_call_s']:.1f} s, "
                f"same answer {row['same_answer']}")
        except Exception as exc:  # noqa: BLE001 - a configuration that cannot launch is a finding
            row["error"] = f"{type(exc).__name__}: {exc}"
            log(f"  {case} triton {opts}: {row['error']}")
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def inputs_phase(avail, cases, gemm: dict, failures: list, clock: Clock) -> list:
    """INPUT_BACKENDS on the largest case for each of INPUTS (float16, float32, class-clustered
    bf16, class-sorted bf16), timed like `timed`; then RECALL_QUERIES sampled queries of each
    input against the float32 reference (recall@k must be 1.0)."""
    import torch

    names = [n for n in INPUT_BACKENDS if n in avail]
    case, M, N, _ = cases[-1]
    rows = []
    for label, dtype, kind in INPUTS:
        meta = {"case": case, "input": label, "dtype": dtype, "kind": kind, "M": M, "N": N}
        if clock.left() < 60:
            rows += [{**meta, "backend": n, "skipped": "time guard"} for n in names]
            continue
        try:
            q, p = make_inputs(M, N, dtype, kind)
        except Exception as exc:  # noqa: BLE001 - OOM making inputs: recorded
            rows += [{**meta, "backend": n, "error": f"{type(exc).__name__}: {exc}"} for n in names]
            torch.cuda.empty_cache()
            continue
        for name in names:
            row = {**meta, "backend": name}
            if clock.left() < 45:
                rows.append({**row, "skipped": "time guard"})
                continue
            try:
                row.update(timed(name, q, p, None, gemm, TIMING_REPEATS)[0])
                if name == "triton":
                    row["filter_stats"] = filter_stats()
                log(f"  {case} {label} {name}: {1e3 * row['seconds']:.1f} ms ({row['tflops']:.1f} TFLOP/s)")
            except Exception as exc:  # noqa: BLE001 - recorded
                row["error"] = f"{type(exc).__name__}: {exc}"
                log(f"  {case} {label} {name}: {row['error']}")
                torch.cuda.empty_cache()
            rows.append(row)
        if clock.left() >= 45:
            rows += [{**r, "input": label} for r in
                     sampled_recall([(n, n, None) for n in names], sampled_queries(q), p, f"{case} {label}", failures)]
        q = p = None
        torch.cuda.empty_cache()
    return rows


def tests_phase(out_dir: Path, failures: list, clock: Clock) -> dict:
    """pytest on GPU_TESTS (the kernels compiled for this GPU), in parallel when pytest-xdist is
    there; counts from its JUnit XML; a failed or erroring test is a failure of the suite."""
    import importlib.util
    import xml.etree.ElementTree as ET  # our own pytest's report, nothing else is parsed

    junit = out_dir / "gpu_tests_junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *GPU_TESTS]
    if importlib.util.find_spec("xdist") is not None:
        cmd[3:3] = ["-n", str(min(8, os.cpu_count() or 1))]
    log("  " + " ".join(cmd))
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30.0, clock.left() - 20))
    except subprocess.TimeoutExpired:
        failures.append("tests: pytest ran past the time guard")
        return {"cmd": cmd, "error": "timeout", "seconds": time.monotonic() - t0}
    out = {"cmd": cmd, "returncode": res.returncode, "seconds": time.monotonic() - t0,
           "tail": (res.stdout + res.stderr)[-4000:]}
    if junit.is_file():
        suites = ET.parse(junit).getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] = sum(int(t.get(key, 0)) for t in suites)
    log("  " + (res.stdout.strip().splitlines() or ["(no output)"])[-1])
    if res.returncode != 0:
        failures.append(f"tests: pytest exit {res.returncode} ({out.get('failures')} failed, "
                        f"{out.get('errors')} errors)")
    return out


# ----------------------------------------------------------------------------- triton cache

def triton_cache_in(tar_path: str | None) -> str | None:
    """With --triton-cache: TRITON_CACHE_DIR set to a fresh folder, filled from the archive if it
    exists (an earlier run's compiled kernels: your own, never a file from elsewhere). Returns
    the folder. Must run before triton is imported."""
    import tarfile
    import tempfile

    if not tar_path:
        return None
    folder = tempfile.mkdtemp(prefix="pyfk-triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = folder
    if Path(tar_path).is_file():
        with tarfile.open(tar_path) as tar:
            tar.extractall(folder, filter="data")  # no absolute paths, links out or devices
        log(f"triton cache: {sum(1 for _ in Path(folder).rglob('*'))} entries from {tar_path}")
    else:
        log(f"triton cache: {tar_path} not found, starting empty")
    return folder


def triton_cache_out(folder: str | None, out_dir: Path) -> str | None:
    """The cache folder packed as out_dir/triton_cache.tar.gz (and $OUT); the path or None."""
    import tarfile

    if not folder:
        return None
    dest = out_dir / "triton_cache.tar.gz"
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname=".")
    if os.environ.get("OUT"):
        shutil.copy(dest, Path(os.environ["OUT"]) / dest.name)
    log(f"triton cache: packed into {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
    return str(dest)


def table(rows, gemm) -> str:
    from pyfk import bench as harness

    out = [("case", "backend", "dtype", "ms", "TFLOP/s", "%GEMM", "vs torch", "peak GiB", "note")]
    for r in rows:
        if r.get("seconds") is None:
            why = r.get("skipped") or r.get("error", "")
            out.append((r["case"], r["backend"], r["dtype"], "-", "-", "-", "-", "-", why))
            continue
        note = f"est. from M={r['measured_m']} (linear in M)" if r.get("scaled") else "measured"
        sp, peak = r.get("speedup_vs_torch"), r.get("peak_mib")
        out.append((r["case"], r["backend"], r["dtype"], f"{1e3 * r['seconds']:.1f}", f"{r['tflops']:.1f}",
                    f"{r['pct_gemm']:.1f}", "-" if sp is None else f"{sp:.1f}x",
                    "-" if peak is None else f"{peak / 1024:.1f}", note))
    lines = harness.text_table(out, left=len(out[0]))
    lines.append(f"TFLOP/s = 4*sum(L)*M*N / time; %GEMM of torch {gemm['dtype']} matmul {gemm['tflops']:.0f} "
                 "TFLOP/s; peak GiB: CUDA memory allocated beyond the inputs during the (warm-up) call")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- compile report

def auto_choice(harness) -> str | None:
    """What backend="auto" picks for CUDA tensors here (None if nothing can run them)."""
    try:
        return harness.auto_choice("cuda")
    except Exception:  # noqa: BLE001 -- BackendUnavailable, or no CUDA torch: recorded as None
        return None


def compile_report_main(argv) -> int:
    """benchmarks/compile_report.py (the Triton kernel compiled for sm_90 without a GPU), its exit code."""
    return subprocess.call([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), *argv])


# ----------------------------------------------------------------------------- main

def phase_list(spec: str, no_timing: bool = False) -> list[str]:
    """The phases named by `spec` (phases and PHASE_GROUPS, comma-separated), in PHASES order,
    with "gemm" added when a phase reports % of the GEMM rate; --no-timing drops timed phases."""
    wanted = set()
    for name in (x.strip() for x in spec.split(",") if x.strip()):
        if name in PHASE_GROUPS:
            wanted.update(PHASE_GROUPS[name])
        elif name in PHASES:
            wanted.add(name)
        else:
            raise ValueError(f"--phases: expected phases {list(PHASES)} or groups {list(PHASE_GROUPS)}, "
                             f"got {name!r}")
    if no_timing:
        wanted -= {"timing", "variants", "recall", "profile", "sweep", "inputs"}
    if wanted & NEEDS_GEMM:
        wanted.add("gemm")
    if not wanted:
        raise ValueError(f"--phases: nothing to run in {spec!r}")
    return [p for p in PHASES if p in wanted]


def run_phases(phases, result: dict, save, avail, cases, failures: list, seed: int, options: dict, clock: Clock,
               out_dir: Path) -> None:
    """Each phase in order, its results into `result`, saved after each."""
    from pyfk import bench as harness
    from pyfk.engine.kernels import cuda as cuda_kernels

    def one(phase: str) -> None:
        """One phase's work, its results into `result`."""
        if phase == "kernels":
            if cuda_kernels.available() is not None:
                log(f"  skipped: pyfk._C_cuda unavailable ({cuda_kernels.available()})")
                return
            result["kernel_checks"] = kernel_checks(failures, seed)
        elif phase == "correctness":
            result["checks"] = backend_checks(avail, failures, seed, options)
            # None: no half GEMM ran; False: torch.mm(..., out_dtype=float32) is missing here
            result["cuda_mm_out_dtype_float32"] = getattr(cuda_kernels, "_mm_out_dtype_ok", None)
        elif phase == "gemm":
            result["gemm"] = harness.gemm_rate(GEMM_N, GEMM_N, GEMM_N, repeats=GEMM_REPEATS, device=DEVICE,
                                               dtype=GEMM_DTYPE)
            log(f"  {GEMM_DTYPE} matmul {GEMM_N}^3: {result['gemm']['tflops']:.1f} TFLOP/s")
            result["machine_rates"] = machine_rates(result["gemm"])
        elif phase == "timing":
            result["timing"] = timing(avail, cases, result["gemm"], clock, options)
        elif phase == "variants":
            result["timing"] = result.get("timing", []) + variant_timing(avail, cases, result.get("timing", []),
                                                                        result["gemm"], clock)
        elif phase == "recall":
            log(f"  {RECALL_QUERIES} sampled queries per timed case vs the float32 reference")
            result["recall"] = recall_checks(avail, cases, failures, options, clock)
        elif phase == "profile":
            result["profile"] = profile_phase(avail, cases, clock)
        elif phase == "sweep":
            result["sweep"] = sweep_phase(avail, cases, result["gemm"], failures, clock)
        elif phase == "inputs":
            result["inputs"] = inputs_phase(avail, cases, result["gemm"], failures, clock)
        elif phase == "tests":
            result["tests"] = tests_phase(out_dir, failures, clock)

    for phase in phases:
        log(f"\n[{phase}]")
        try:
            one(phase)
        except Exception as exc:  # a phase that breaks is a failure; the phases after it still run
            failures.append(f"phase {phase} raised {type(exc).__name__}: {exc}")
            log(f"  phase {phase} raised:")
            traceback.print_exc()
        save(phase)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="pip install --no-deps --no-build-isolation . first")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan, check imports and the harness on the CPU, exit 0")
    ap.add_argument("--quick", action="store_true", help="small timing case only")
    ap.add_argument("--no-timing", action="store_true", help="leave out the timed phases (timing, variants, recall, "
                    "profile, sweep, inputs)")
    ap.add_argument("--phases", default="core", metavar="LIST",
                    help=f"comma-separated phases {list(PHASES)} or groups "
                         f"{ {g: list(v) for g, v in PHASE_GROUPS.items()} } (default core)")
    ap.add_argument("--triton-cache", default=None, metavar="TAR",
                    help="compiled Triton kernels: read from this archive if it exists (an earlier run's "
                         "triton_cache.tar.gz), and the run's cache written as triton_cache.tar.gz to --out "
                         "(and $OUT)")
    ap.add_argument("--backends", default=",".join(GPU_BACKENDS), help="comma-separated subset of GPU_BACKENDS")
    ap.add_argument("--option", action="append", default=None, metavar="[BACKEND.]KEY=VALUE",
                    help="a backend option for the checks and timings, as in `pyfk bench --option` (repeatable)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the correctness inputs (default: fresh each run, printed and recorded)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the JSON")
    ap.add_argument("--time-limit", type=float, default=TIME_LIMIT_S)
    ap.add_argument("--compile-report", action="store_true",
                    help="only compile the Triton kernel's production configs for sm_90 (no GPU needed) and "
                         "report registers, spills, MMA kind, loads, instruction counts: benchmarks/compile_report.py")
    ap.add_argument("--json", default=None, metavar="PATH", help="with --compile-report: write the report here")
    args = ap.parse_args(argv)
    if args.compile_report:
        return compile_report_main(["--json", args.json] if args.json else [])
    if args.json:
        ap.error("--json: only with --compile-report")
    try:
        phases = phase_list(args.phases, args.no_timing)
    except ValueError as exc:
        ap.error(str(exc))
    clock = Clock(args.time_limit)
    cases = QUICK_CASES if args.quick else TIMING_CASES

    if args.build and not args.dry_run:
        build()
    cache = None if args.dry_run else triton_cache_in(args.triton_cache)  # before triton is imported
    import torch
    try:
        import pyfk
    except ImportError:  # not installed: the source tree (its extensions built in place, if at all)
        sys.path.insert(0, str(ROOT))
        import pyfk
    from pyfk import bench as harness
    from pyfk.engine.kernels import cuda as cuda_kernels

    log(f"pyfk {pyfk.__version__} from {Path(pyfk.__file__).parent}")
    versions = harness.machine_info(DEVICE)
    log(f"versions: {json.dumps(versions, default=str)}")
    wanted = [b for b in args.backends.split(",") if b]
    unknown = [b for b in wanted if b not in GPU_BACKENDS]
    if unknown:
        ap.error(f"--backends: unknown {unknown}; expected a subset of {list(GPU_BACKENDS)}")
    registry = {r["name"]: r for r in pyfk.backends()}
    avail = [b for b in wanted if b in registry and registry[b]["available"] and DEVICE in registry[b]["devices"]]
    missing = {}
    for b in wanted:
        if b not in avail:
            why = registry[b]["reason"] if b in registry else "not registered in pyfk.backends()"
            missing[b] = why
            log(f"backend {b}: unavailable ({why})")
    try:  # checked against every wanted backend, available or not, before any work
        options = harness.backend_options(harness.parse_options(args.option),
                                          {b: b for b in dict.fromkeys([REFERENCE, *wanted]) if b in registry})
    except ValueError as exc:
        ap.error(f"--option: {exc}")
    log(f"cuda kernels available(): {cuda_kernels.available() or 'yes'}")
    commit, auto = commit_id(), auto_choice(harness)
    log(f"Python.h: {python_headers() or 'found'}; commit {commit}; auto on cuda: {auto}")
    log(f"phases: {', '.join(phases)}")
    log(plan_text(cases))
    if args.dry_run:
        smoke = harness.run_bench(8, 300, [4, 3], k=5, backends=[REFERENCE], repeats=1, peak=False, device="cpu")
        row = smoke["rows"][0]
        log(f"harness on the CPU: {REFERENCE} {1e3 * row['seconds']:.2f} ms, checked against the reference "
            f"and the {harness.BASELINE} baseline ({len(smoke['rows'])} rows)")
        log("dry run: imports ok; nothing executed on a GPU")
        return 0
    if not torch.cuda.is_available():
        log("no CUDA device: nothing to do (use --dry-run on CPU-only machines)")
        return 2

    # pyfk's own GPU backends must run on a GPU machine (faiss may simply not be installed there)
    failures: list[str] = [f"backend {b} unavailable on a GPU machine: {why}" for b, why in missing.items()
                           if b in OWN_GPU_BACKENDS]
    seed = args.seed if args.seed is not None else int(time.time()) % 100000  # fresh inputs unless given
    log(f"seed {seed} (repeat with --seed {seed})")
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "argv": sys.argv, "commit": commit, "versions": versions, "backends_available": avail,
              "backends_missing": missing, "auto_on_cuda": auto, "seed": seed, "options": options,
              "failures": failures, "phases_done": []}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"gpu_suite_{stamp}.json"

    def save(phase: str) -> None:
        """The JSON as it stands, rewritten after every phase (a kill loses at most the phase running)."""
        result["phases_done"].append(phase)
        result["elapsed_s"] = clock.elapsed()
        harness.write_json(path, result)
        if os.environ.get("OUT"):
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)

    save("setup")
    try:
        run_phases(phases, result, save, avail, cases, failures, seed, options, clock, Path(args.out))
    finally:
        result["triton_cache"] = triton_cache_out(cache, Path(args.out))
        save("done")
    log(f"\nwrote {path}")
    if result.get("timing"):
        log(table(result["timing"], result["gemm"]))
    log(f"elapsed {clock.elapsed():.0f} s; correctness failures: {len(failures)}")
    for f in failures[:20]:
        log(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
