#!/usr/bin/env python
"""One-call GPU suite: correctness of every GPU backend, then timings (DESIGN.md section 6).

    python benchmarks/gpu_suite.py [--build] [--quick] [--dry-run] [--out DIR]

In one run, under ~9 minutes (a global guard skips what is left, reporting it):
  1. versions and the GPU;
  2. the CUDA k-selection kernels themselves (pyfk._C_cuda) against torch on packed keys:
     ties, odd sizes, k = 1..1024, running-state init, strided rows, merge, unpack;
  3. every available backend among GPU_BACKENDS against backend "torch" on fresh random
     CUDA inputs (float32/bfloat16/float16, small odd shapes): top-k scores allclose with a
     dtype-appropriate tolerance (recall@k instead for approximate backends);
  4. the dense bf16 GEMM rate (torch.matmul 8192^3, CUDA events, median);
  5. timings of pyfk.topk per backend on bf16 descriptors: N=200k M=5k, then the
     ImageNet-scale case N=1,281,167 M=50,000 L=64/128/256/512 k=32. A backend whose
     full run would not fit its time budget (the torch reference, always, at full scale)
     is timed on a slice of the queries and scaled linearly in M; the table says so
     ("est." and the slice size). Linear scaling slightly overstates the sliced time
     (per-call pool normalisation is not per query), so speed-ups against a sliced
     reference are a little generous.
Prints per backend and dtype: ms, TFLOP/s (4*sum(L)*M*N), % of the measured bf16 GEMM
rate, speed-up vs the torch reference. Writes benchmarks/results/gpu_suite_<date>.json
(and a copy under $OUT when that is set). Exits 1 if a correctness check fails.
--dry-run prints the plan and checks imports without a GPU (exit 0).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_BACKENDS = ("triton", "cuda", "torch", "faiss", "faiss_ann")
APPROXIMATE = ("faiss_ann",)
REFERENCE = "torch"
DTYPES = ("float32", "bfloat16", "float16")
# Allowed |score - reference| as a fraction of max |reference score| per descriptor dtype:
# float32 inputs may run on float32 or TF32 GEMMs; half inputs on half GEMMs.
TOLERANCE = {"float32": 2e-3, "float16": 5e-3, "bfloat16": 3e-2}
CHECK_SHAPES = [  # (M, N, widths, k, combine)
    (37, 1001, [3, 17], 7, "product"),
    (5, 4099, [64, 33], 32, "product"),
    (1, 257, [8], 1, "product"),
    (13, 2050, [16, 16, 16], 100, "product"),
    (11, 3001, [24, 40], 16, "features"),
]
WIDTHS = (64, 128, 256, 512)
K = 32
TIMING_CASES = [  # name, M, N, per-backend budget (s)
    ("N200k_M5k", 5_000, 200_000, 25.0),
    ("imagenet_N1281167_M50000", 50_000, 1_281_167, 45.0),
]
QUICK_CASES = [("N50k_M2k", 2_000, 50_000, 10.0)]
TIME_LIMIT_S = 540.0  # stop starting new work after 9 minutes
DEVICE = "cuda"  # every tensor the suite makes lives here


class Clock:
    def __init__(self, limit: float):
        self.start = time.monotonic()
        self.limit = limit

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.limit - self.elapsed()


def flops(M: int, N: int, widths) -> float:
    return 4.0 * sum(widths) * M * N


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- plan / environment

def plan_text(cases) -> str:
    lines = ["plan:",
             "  kernels: pyfk._C_cuda select/merge/unpack vs torch on packed keys (exact equality)",
             f"  correctness: backends {list(GPU_BACKENDS)} (those available) vs {REFERENCE!r}, dtypes {list(DTYPES)},",
             f"    shapes (M, N, widths, k, combine) {CHECK_SHAPES}; tolerance x max|score| {TOLERANCE}",
             "  GEMM: torch.matmul bf16 8192^3, CUDA events, median of 20",
             f"  timing: bf16, widths {list(WIDTHS)}, k={K}:"]
    for name, M, N, budget in cases:
        lines.append(f"    {name}: M={M} N={N} {flops(M, N, WIDTHS) / 1e12:.1f} TFLOP, "
                     f"budget {budget:.0f} s per backend")
    lines.append(f"  global guard: no new work after {TIME_LIMIT_S:.0f} s; skipped cases are reported")
    return "\n".join(lines)


def versions() -> dict:
    import torch
    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # report; never fail on an optional package
        info["triton"] = f"not importable ({type(exc).__name__})"
    try:
        import faiss
        info["faiss"] = getattr(faiss, "__version__", "?")
    except Exception:
        info["faiss"] = "not installed"
    nvcc = shutil.which("nvcc")
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        info["nvcc"] = out[-1] if out else "?"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                       "memory_gib": round(p.total_memory / (1 << 30), 1)}
    return info


def build() -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(ROOT)]
    log("build: " + " ".join(cmd))
    subprocess.run(cmd, check=True)


# ----------------------------------------------------------------------------- 2. kernel checks

def kernel_checks(failures: list) -> list:
    """The raw CUDA kernels against torch on packed keys; results must be identical."""
    import torch

    from pyfk.engine.kernels import cuda as cs
    from pyfk.engine.kernels.torch import pack_keys, unpack_keys

    rows_out = []
    dev = torch.device(DEVICE)
    empty = torch.tensor(cs._C_cuda.EMPTY_KEY, dtype=torch.int64, device=dev)

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

def make_desc(M: int, widths, dtype, seed: int, device=None):
    import torch

    import pyfk
    device = device or DEVICE
    gen = torch.Generator(device=device).manual_seed(seed)
    z = [torch.randn(M, w, device=device, generator=gen).to(dtype) for w in widths]
    g = [torch.randn(M, w, device=device, generator=gen).to(dtype) for w in widths]
    return pyfk.Descriptors(z=z, g=g)


def backend_checks(names, failures: list) -> list:
    import torch

    import pyfk
    rows = []
    seed = int(time.time()) % 100000  # fresh inputs every run; the seed is recorded
    for name in names:
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            for i, (M, N, widths, k, combine) in enumerate(CHECK_SHAPES):
                q = make_desc(M, widths, dtype, seed + 2 * i)
                p = make_desc(N, widths, dtype, seed + 2 * i + 1)
                row = {"backend": name, "dtype": dtype_name, "M": M, "N": N, "widths": widths, "k": k,
                       "combine": combine, "seed": seed + 2 * i}
                try:
                    ws, wi = pyfk.topk(q, p, k, combine=combine, backend=REFERENCE)
                    gs, gi = pyfk.topk(q, p, k, combine=combine, backend=name)
                    torch.cuda.synchronize()
                    valid = (gi.shape == (M, k) and bool(((gi >= 0) & (gi < N)).all())
                             and bool((gi.sort(dim=1).values.diff(dim=1) != 0).all()))
                    if name in APPROXIMATE:
                        hits = [len(set(a) & set(b)) for a, b in zip(gi.tolist(), wi.tolist())]
                        row["recall"] = sum(hits) / float(M * k)
                        row["ok"] = valid
                    else:
                        scale = float(ws.abs().max())
                        diff = float((gs - ws).abs().max())
                        tol = TOLERANCE[dtype_name] * scale + 1e-6
                        sorted_ok = bool((gs.diff(dim=1) <= 0).all())
                        row.update(max_abs_diff=diff, rel_diff=diff / max(scale, 1e-30), tol=tol,
                                   index_agreement=float((gi == wi).float().mean()),
                                   ok=bool(valid and sorted_ok and diff <= tol and bool(torch.isfinite(gs).all())))
                except Exception as exc:
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                rows.append(row)
                if not row["ok"]:
                    failures.append(f"backend {name} {dtype_name} {M}x{N} {widths} k={k} {combine}: "
                                    f"{row.get('error') or row}")
            mine = [r for r in rows if r["backend"] == name and r["dtype"] == dtype_name]
            status = "ok  " if all(r["ok"] for r in mine) else "FAIL"
            if name in APPROXIMATE:
                extra = f"min recall@k {min(r.get('recall', 0.0) for r in mine):.3f}"
            else:
                rel = max(r.get("rel_diff", float("inf")) for r in mine)
                agree = min(r.get("index_agreement", 0.0) for r in mine)
                extra = (f"max |diff|/max|score| {rel:.2e} (tol {TOLERANCE[dtype_name]:.0e}), "
                         f"min index agreement {agree:.3f}")
            log(f"  {status} {name:10s} {dtype_name:9s} {len(mine)} shapes, {extra}")
    return rows


# ----------------------------------------------------------------------------- 4. GEMM rate

def gemm_rate(n: int = 8192, reps: int = 20) -> dict:
    import torch
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        torch.matmul(a, b)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    sec = statistics.median(times)
    return {"n": n, "seconds": sec, "tflops": 2.0 * n ** 3 / sec / 1e12}


# ----------------------------------------------------------------------------- 5. timings

def _timed(fn) -> float:
    import torch
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / 1e3


def time_backend(name: str, q, p, k: int, budget: float, clock: Clock) -> dict:
    """Median seconds of pyfk.topk over all M queries, measured or scaled from a slice."""
    import pyfk
    M = q.n

    def run(m):
        qs = q if m == M else q.take(slice(0, m))
        return lambda: pyfk.topk(qs, p, k, backend=name)

    m0 = min(M, 256)
    small_pool = p.take(slice(0, min(p.n, 65536)))
    qw = q.take(slice(0, min(M, 64)))
    _timed(lambda: pyfk.topk(qw, small_pool, k, backend=name))  # warm-up: module load, compilation, handles
    t0 = _timed(run(m0))
    est = t0 * M / m0
    if est * 3 <= budget and est * 3 < clock.left():
        if m0 < M:
            _timed(run(M))  # warm-up at full size
        reps = max(1, min(5, int(budget / (2 * max(est, 1e-6)))))
        times = [_timed(run(M)) for _ in range(reps)]
        return {"seconds": statistics.median(times), "times": times, "measured_m": M, "scaled": False}
    afford = min(budget / 2, max(clock.left() - 30, 0) / 2)
    m1 = int(min(M, max(m0, m0 * afford / max(t0, 1e-9))))
    m1 = max(m0, (m1 // 64) * 64)
    t1 = _timed(run(m1)) if m1 > m0 else t0
    return {"seconds": t1 * M / m1, "times": [t1], "measured_m": m1, "scaled": m1 < M}


def timing(names, cases, gemm: dict, clock: Clock) -> list:
    import torch
    rows = []
    for case, M, N, budget in cases:
        # Rough need: the reference's pilot + slice, plus each backend's budget.
        if clock.left() < 60:
            for name in names:
                rows.append({"case": case, "backend": name, "dtype": "bfloat16", "skipped": "time guard"})
            log(f"  {case}: skipped (time guard, {clock.elapsed():.0f} s elapsed)")
            continue
        try:
            q = make_desc(M, WIDTHS, torch.bfloat16, 7)
            p = make_desc(N, WIDTHS, torch.bfloat16, 8)
        except torch.cuda.OutOfMemoryError as exc:
            for name in names:
                rows.append({"case": case, "backend": name, "dtype": "bfloat16", "error": f"OOM making inputs: {exc}"})
            continue
        fl = flops(M, N, WIDTHS)
        case_rows = []
        for name in [REFERENCE] + [n for n in names if n != REFERENCE]:
            row = {"case": case, "backend": name, "dtype": "bfloat16", "M": M, "N": N, "widths": list(WIDTHS), "k": K,
                   "flops": fl}
            if clock.left() < 45:
                row["skipped"] = "time guard"
            else:
                try:
                    row.update(time_backend(name, q, p, K, budget, clock))
                    row["tflops"] = fl / row["seconds"] / 1e12
                    row["pct_gemm"] = 100.0 * row["tflops"] / gemm["tflops"]
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    torch.cuda.empty_cache()
            case_rows.append(row)
            log(f"  {case} {name}: " + (f"{1e3 * row['seconds']:.1f} ms"
                                        + (f" (est. from M={row['measured_m']})" if row.get("scaled") else "")
                                        if "seconds" in row else row.get("skipped") or row.get("error")))
        ref = next((r for r in case_rows if r["backend"] == REFERENCE and "seconds" in r), None)
        for r in case_rows:
            if ref and "seconds" in r:
                r["speedup_vs_torch"] = ref["seconds"] / r["seconds"]
        rows += case_rows
        del q, p
        torch.cuda.empty_cache()
    return rows


def table(rows, gemm) -> str:
    head = ("case", "backend", "dtype", "ms", "TFLOP/s", "%GEMM", "vs torch", "note")
    out = [head]
    for r in rows:
        if "seconds" not in r:
            why = r.get("skipped") or r.get("error", "")
            out.append((r["case"], r["backend"], r["dtype"], "-", "-", "-", "-", why))
            continue
        note = f"est. from M={r['measured_m']} (linear in M)" if r.get("scaled") else "measured"
        sp = r.get("speedup_vs_torch")
        out.append((r["case"], r["backend"], r["dtype"], f"{1e3 * r['seconds']:.1f}", f"{r['tflops']:.1f}",
                    f"{r['pct_gemm']:.1f}", "-" if sp is None else f"{sp:.1f}x", note))
    width = [max(len(str(row[i])) for row in out) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, width)) for row in out]
    lines.insert(1, "  ".join("-" * w for w in width))
    lines.append(f"TFLOP/s = 4*sum(L)*M*N / time; %GEMM of torch bf16 matmul {gemm['tflops']:.0f} TFLOP/s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", action="store_true", help="pip install --no-deps --no-build-isolation . first")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, check imports, exit 0")
    ap.add_argument("--quick", action="store_true", help="small timing case only")
    ap.add_argument("--no-timing", action="store_true", help="correctness and GEMM rate only")
    ap.add_argument("--backends", default=",".join(GPU_BACKENDS), help="comma-separated subset of GPU_BACKENDS")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for the JSON")
    ap.add_argument("--time-limit", type=float, default=TIME_LIMIT_S)
    args = ap.parse_args(argv)
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
    from pyfk.engine.kernels import cuda as cuda_select

    log(f"pyfk {pyfk.__version__} from {Path(pyfk.__file__).parent}")
    log(f"versions: {json.dumps(versions())}")
    wanted = [b for b in args.backends.split(",") if b]
    unknown = [b for b in wanted if b not in GPU_BACKENDS]
    if unknown:
        ap.error(f"--backends: unknown {unknown}; expected a subset of {list(GPU_BACKENDS)}")
    registry = {r["name"]: r for r in pyfk.backends()}
    avail = [b for b in wanted if b in registry and registry[b]["available"] and "cuda" in registry[b]["devices"]]
    for b in wanted:
        if b not in avail:
            why = registry[b]["reason"] if b in registry else "not registered in pyfk.backends()"
            log(f"backend {b}: unavailable ({why})")
    log(f"cuda_select.available(): {cuda_select.available() or 'yes'}")
    log(plan_text(cases))
    if args.dry_run:
        log("dry run: imports ok; nothing executed")
        return 0
    if not torch.cuda.is_available():
        log("no CUDA device: nothing to do (use --dry-run on CPU-only machines)")
        return 2

    failures: list[str] = []
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "argv": sys.argv, "versions": versions(), "backends_available": avail}
    if cuda_select.available() is None:
        log("\n[kernels] pyfk._C_cuda")
        result["kernel_checks"] = kernel_checks(failures)
    log("\n[correctness] vs backend 'torch'")
    result["checks"] = backend_checks(avail, failures)
    result["cuda_mm_out_dtype_float32"] = cuda_select._mm_out_dtype_ok  # None: no half GEMM ran
    log("\n[gemm]")
    result["gemm"] = gemm_rate()
    log(f"  bf16 matmul {result['gemm']['n']}^3: {result['gemm']['tflops']:.1f} TFLOP/s")
    if not args.no_timing:
        log("\n[timing]")
        result["timing"] = timing(avail, cases, result["gemm"], clock)
    result["failures"] = failures
    result["elapsed_s"] = clock.elapsed()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"gpu_suite_{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    log(f"\nwrote {path}")
    if "timing" in result:
        log(table(result["timing"], result["gemm"]))
    log(f"elapsed {clock.elapsed():.0f} s; correctness failures: {len(failures)}")
    for f in failures[:20]:
        log(f"  FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
