#!/usr/bin/env python
"""One-call GPU suite: correctness of every GPU backend, then timings (DESIGN.md section 6).

    python benchmarks/gpu_suite.py [--build] [--quick] [--dry-run] [--out DIR] [--option [BACKEND.]KEY=VALUE]

The suite's own job is the GPU machine's: build, import checks, the raw CUDA kernel
checks, the plan, time guards, tables and the JSON file. Everything measured goes
through the benchmark harness `pyfk.bench`, the one `pyfk bench` uses: seeded problem
generation (`make_descriptors`, on the GPU), the check against the torch reference
(`compare_topk`), timing with CUDA synchronisation and events (`run_bench`, budget
mode), the GEMM rate (`gemm_rate`), the flop count (`topk_flops`), machine info and
JSON writing. So a number here and a `pyfk bench --device cuda` number mean the same.

In one run, under ~9 minutes (a global guard skips what is left, reporting it):
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
     reference are a little generous.
Prints per backend and dtype: ms, TFLOP/s (4*sum(L)*M*N), % of the measured bf16 GEMM
rate, speed-up vs the torch reference, peak CUDA memory. Writes
benchmarks/results/gpu_suite_<date>.json (and a copy under $OUT when that is set).
The JSON is rewritten after every phase (setup, kernels, correctness, gemm, timing, variants,
recall: a kill
loses at most the phase running) and records the commit, which backend "auto" takes for CUDA
tensors, and why any backend is unavailable. --build checks for Python.h first.
Exits 1 if a correctness check fails or one of pyfk's own GPU backends (triton, cuda, torch)
is unavailable on the GPU machine (e.g. a failed pyfk._C_cuda build), 2 without a CUDA device.
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
    lines.append(f"  global guard: no new work after {TIME_LIMIT_S:.0f} s; skipped cases are reported")
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
            q_all = harness.make_descriptors(M, WIDTHS, TIMING_DTYPE, TIMING_SEED, DEVICE)
            pick = torch.linspace(0, M - 1, min(M, RECALL_QUERIES), device=DEVICE).round().long().unique()
            q = q_all.take(pick.cpu().numpy())
            del q_all
            p = harness.make_descriptors(N, WIDTHS, TIMING_DTYPE, TIMING_SEED + 1, DEVICE)
            want_s, want_i = harness.topk_runner(REFERENCE, q, p, K, "product", None)()
        except Exception as exc:  # noqa: BLE001 - recorded
            rows.append({"case": case, "error": f"{type(exc).__name__}: {exc}"})
            failures.append(f"recall {case}: {type(exc).__name__}: {exc}")
            continue
        for label, name, opts in runs:
            row = {"case": case, "backend": label, "queries": int(pick.numel()), "k": K}
            try:
                got_s, got_i = harness.topk_runner(name, q, p, K, "product", opts)()
                row["recall"] = harness.recall_at_k(got_i.cpu(), want_i.cpu())
                row["max_abs_score_error"] = float((got_s.float().cpu() - want_s.float().cpu()).abs().max())
                row["ok"] = row["recall"] == 1.0
            except Exception as exc:  # noqa: BLE001 - recorded
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
            if not row["ok"]:
                failures.append(f"recall {case} {label}: {row.get('error') or row}")
            log(f"  {'ok  ' if row['ok'] else 'FAIL'} {case} {label}: recall@{K} {row.get('recall')}, "
                f"max |score error| {row.get('max_abs_score_error')}")
        del p
        torch.cuda.empty_cache()
    return rows


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

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="pip install --no-deps --no-build-isolation . first")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan, check imports and the harness on the CPU, exit 0")
    ap.add_argument("--quick", action="store_true", help="small timing case only")
    ap.add_argument("--no-timing", action="store_true", help="correctness and GEMM rate only")
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
    clock = Clock(args.time_limit)
    cases = QUICK_CASES if args.quick else TIMING_CASES

    if args.build and not args.dry_run:
        build()
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
    if cuda_kernels.available() is None:
        log("\n[kernels] pyfk._C_cuda")
        result["kernel_checks"] = kernel_checks(failures, seed)
        save("kernels")
    log(f"\n[correctness] vs backend {REFERENCE!r}")
    result["checks"] = backend_checks(avail, failures, seed, options)
    # None: no half GEMM ran; False: torch.mm(..., out_dtype=float32) is missing here
    result["cuda_mm_out_dtype_float32"] = getattr(cuda_kernels, "_mm_out_dtype_ok", None)
    save("correctness")
    log("\n[gemm]")
    result["gemm"] = harness.gemm_rate(GEMM_N, GEMM_N, GEMM_N, repeats=GEMM_REPEATS, device=DEVICE, dtype=GEMM_DTYPE)
    log(f"  {GEMM_DTYPE} matmul {GEMM_N}^3: {result['gemm']['tflops']:.1f} TFLOP/s")
    save("gemm")
    if not args.no_timing:
        log("\n[timing]")
        result["timing"] = timing(avail, cases, result["gemm"], clock, options)
        save("timing")
        log("\n[variants]")
        result["timing"] += variant_timing(avail, cases, result["timing"], result["gemm"], clock)
        save("variants")
        log(f"\n[recall] {RECALL_QUERIES} sampled queries per timed case vs the float32 reference")
        result["recall"] = recall_checks(avail, cases, failures, options, clock)
        save("recall")
    save("done")
    log(f"\nwrote {path}")
    if "timing" in result:
        log(table(result["timing"], result["gemm"]))
    log(f"elapsed {clock.elapsed():.0f} s; correctness failures: {len(failures)}")
    for f in failures[:20]:
        log(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
