"""Benchmark harness for `pyfk.topk` (DESIGN.md section 6): one device-aware harness for
`pyfk bench` (CPU, or a GPU with --device cuda) and benchmarks/gpu_suite.py.

    result = run_bench(M=1000, N=50000, widths=(64, 128, 256, 512))                # CPU, NumPy inputs
    result = run_bench(5000, 200000, (64, 128, 256, 512), dtype="bfloat16", device="cuda",
                       backends=["torch", "triton", "cuda"], budget=25.0)          # torch inputs on the GPU
    print(format_table(result))
    write_json("out.json", result)

For every backend it first checks the top-k scores against the torch reference on a
slice, then times `pyfk.topk` exactly as a user calls it (with the backend `options`,
if any: `{"isa": "avx2"}`, `{"cpu.threads": 2}`, ...) and reports GFLOP/s, the share
of the GEMM rate measured in the same run, the speed-up over the "materialise"
baseline (the full M x N matrix with torch GEMMs, then `torch.topk`) and over the
torch backend, the peak memory growth during the call (process RSS on the CPU,
allocated CUDA memory on a GPU) and recall@k for approximate backends. The backend
`backend="auto"` takes is the registry's answer (`pyfk.engine.registry.auto_choice`).

The pieces, which benchmarks/gpu_suite.py uses one by one:
    make_descriptors(n, widths, dtype, seed, device)   seeded random descriptors
    topk_flops(M, N, widths, combine)                   the flop count of section 6
    time_call / median_time                             timing; on CUDA synchronised, CUDA events
    gemm_rate(M, N, K, ..., device, dtype)              the GEMM rate reached in this run
    compare_topk / check_scores                         correctness against the torch reference
    parse_options / backend_options                     backend options (`--option key=value`)
    machine_info(device), text_table, write_json
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import pyfk
from pyfk.engine import registry
from pyfk.engine.descriptors import COMBINES, normalized_block
from pyfk.engine.kernels import cpu as _cpu
from pyfk.engine.kernels.faiss import recall_at_k
from pyfk.engine.layout import Layout
from pyfk.features.store import DescriptorStore

BASELINE = "materialise"
REFERENCE = "torch"  # the backend every other one is checked against, and the GPU speed-up reference
DEVICES = ("cpu", "cuda")
DTYPES = ("float16", "bfloat16", "float32", "float64")
_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
# Allowed |score - reference| as a fraction of max |reference score|, per device and descriptor dtype.
# CPU kernels compute in float32 whatever the input dtype; on a GPU float32 inputs may run on
# float32 or TF32 GEMMs, half inputs on half GEMMs.
TOLERANCE = {
    "cpu": {"float16": 1e-3, "bfloat16": 1e-3, "float32": 1e-3, "float64": 1e-3},
    "cuda": {"float16": 5e-3, "bfloat16": 3e-2, "float32": 2e-3, "float64": 2e-3},
}
_BASELINE_LIMIT_BYTES = 8 << 30  # skip the baseline when its M x N float32 matrix is larger
_GEMM_CAPS = {"cpu": (2048, 16384, 4096), "cuda": (16384, 65536, 8192)}  # (m, n, K) of the GEMM probe
_PILOT_M = 256  # budget mode: queries of the pilot call that estimates a full run
_GUARD_S = 45.0  # with a deadline: no backend is started with less time than this left
_MiB = float(1 << 20)


# ----------------------------------------------------------------------------- inputs and flops

def check_device(device) -> torch.device:
    """torch.device(device) if the harness can run there (cpu, or cuda when a GPU is visible)."""
    dev = torch.device(device)
    if dev.type not in DEVICES:
        raise ValueError(f"device: expected one of {list(DEVICES)}, got {str(device)!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: CUDA is not available here (torch {torch.__version__}, "
                         f"torch.cuda.is_available() is False)")
    return dev


def make_descriptors(n: int, widths: Sequence[int], dtype: str = "float32", seed: int = 0,
                     device="cpu") -> pyfk.Descriptors:
    """n rows of seeded standard-normal z and g per scale width, of `dtype`.

    On the CPU NumPy arrays (what a user or a store hands over; bfloat16: torch CPU
    tensors); on CUDA torch tensors drawn on the device (a CPU generator would take
    minutes at ImageNet scale).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    dev = torch.device(device)
    if dev.type == "cpu" and dtype in _NUMPY_DTYPES:
        rng = np.random.default_rng(seed)
        np_dtype = _NUMPY_DTYPES[dtype]
        z = [rng.standard_normal((n, w), dtype=np.float32).astype(np_dtype, copy=False) for w in widths]
        g = [rng.standard_normal((n, w), dtype=np.float32).astype(np_dtype, copy=False) for w in widths]
    else:
        gen = torch.Generator(device=dev).manual_seed(seed)
        t_dtype = getattr(torch, dtype)
        z = [torch.randn(n, w, device=dev, generator=gen).to(t_dtype) for w in widths]
        g = [torch.randn(n, w, device=dev, generator=gen).to(t_dtype) for w in widths]
    return pyfk.Descriptors(z=z, g=g)


def layout_for(widths: Sequence[int], combine: str) -> Layout:
    """The Layout of descriptors with scale widths L_j (z_j and g_j both L_j wide)."""
    ws = tuple(int(w) for w in widths)
    return Layout(ws if combine == "features" else tuple(w for w in ws for _ in range(2)), combine)


def topk_flops(M: int, N: int, widths: Sequence[int], combine: str) -> float:
    """FLOPs of one top-k (DESIGN.md section 6): 4 * sum_j L_j * M * N for combine="product"
    (one GEMM each for z_j and g_j per scale), 2 * D * M * N for the dot-product modes
    ("sum": D = 2 sum_j L_j columns, "features": D = sum_j L_j)."""
    layout = layout_for(widths, combine)
    if layout.product:
        per_pair = sum(2 * (z.stop - z.start) + 2 * (g.stop - g.start) for z, g in layout.pairs())
        return float(per_pair) * M * N
    return 2.0 * layout.width * M * N


def kernel_width(widths: Sequence[int], combine: str) -> int:
    """Columns of the normalised block the kernels see (z only, or z and g)."""
    return layout_for(widths, combine).width


def _dtype_name(desc: pyfk.Descriptors) -> str:
    return str(desc.z[0].dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- measurement

def time_call(fn: Callable[[], object], device="cpu") -> float:
    """Seconds of one call of `fn`: wall clock on the CPU; on CUDA, after a synchronize,
    between two CUDA events recorded around the call (the GPU work it queued included)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    torch.cuda.synchronize(dev)
    stream = torch.cuda.current_stream(dev)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record(stream)
    fn()
    e1.record(stream)
    e1.synchronize()
    return e0.elapsed_time(e1) / 1e3


def median_time(fn: Callable[[], object], repeats: int, device="cpu", warmup: int = 1) -> tuple[float, list[float]]:
    """`warmup` untimed calls, then the median seconds of `repeats` timed calls (and all of them)."""
    dev = torch.device(device)
    for _ in range(warmup):
        fn()
    times = [time_call(fn, dev) for _ in range(repeats)]
    return statistics.median(times), times


def _rss_bytes() -> int:
    """Anonymous resident memory: resident minus file-backed pages, so the pages of a
    memory-mapped store the kernel reads are not counted as memory the search needs."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


class PeakRSS:
    """Peak resident-set growth over a block: max(RSS) - RSS before, in bytes.

    A background thread samples /proc/self/statm every `interval` seconds; the
    kernels release the GIL, so it keeps running during the call. ru_maxrss is
    useless here: it only ever grows, so it hides every call after the biggest.
    Before starting, glibc is asked to return freed heap pages (malloc_trim):
    otherwise a buffer freed by the previous call stays resident, is reused, and
    the growth reads ~0 for allocations under glibc's (adaptive, up to 32 MiB)
    mmap threshold.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakRSS:
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
        self.before = self.peak = _rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.before


class PeakCUDA:
    """Peak growth of the CUDA memory torch allocates on `device` over a block, in bytes
    (torch's peak statistics, reset on entry; the caching allocator's reserve not counted)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.before = self.peak = 0

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = self.peak = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def growth(self) -> int:
        return self.peak - self.before


def peak_memory(device="cpu"):
    """The peak-growth monitor for `device`: PeakRSS on the CPU, PeakCUDA on a GPU."""
    dev = torch.device(device)
    return PeakCUDA(dev) if dev.type == "cuda" else PeakRSS()


def _peak_label(device: str) -> str:
    return "CUDA memory allocated" if device == "cuda" else "anonymous RSS (file-backed pages excluded)"


def _measure(fn, repeats: int, device, peak: bool = True) -> dict:
    """One warm-up call, then `repeats` timed calls (median seconds).

    Peak memory growth is taken on the warm-up call: a full call like the others, and
    the timed calls then pay neither the sampler nor the page faults that
    malloc_trim's returned pages cost on the next touch (~10% at the issue's size).
    """
    mem = peak_memory(device) if peak else contextlib.nullcontext()
    with mem:
        fn()
    seconds, times = median_time(fn, repeats, device, warmup=0)
    return {"seconds": seconds, "times": times, "peak_mib": mem.growth / _MiB if peak else None,
            "measured_m": None, "scaled": False}


def _measure_budgeted(run, M: int, N: int, k: int, repeats: int, device, peak: bool, budget: float,
                      deadline: float | None) -> dict:
    """Timing within a budget of about `budget` seconds per backend. `run(m, n)` is the call
    over the first m queries and n pool rows.

    A warm-up on a small problem (module loads, compilation, handles), then a pilot call on
    _PILOT_M queries estimates the full run. If three full runs fit the budget (and the
    deadline), one full warm-up and up to `repeats` timed runs follow (median); otherwise
    the largest query slice that fits is timed once and scaled linearly in M
    ("measured_m", "scaled"). Linear scaling slightly overstates the sliced time (the pool
    normalisation is per call, not per query).
    """
    def left() -> float:
        return float("inf") if deadline is None else deadline - time.monotonic()

    time_call(run(min(M, 64), max(k, min(N, 65536))), device)
    m0 = min(M, _PILOT_M)
    t0 = time_call(run(m0, N), device)
    est = t0 * M / m0
    mem = peak_memory(device) if peak else contextlib.nullcontext()
    if est * 3 <= budget and est * 3 < left():
        full = run(M, N)
        with mem:
            full()  # the warm-up at full size
        reps = max(1, min(repeats, int(budget / (2 * max(est, 1e-6)))))
        seconds, times = median_time(full, reps, device, warmup=0)
        measured, scaled = M, False
    else:
        afford = min(budget / 2, max(left() - 30, 0) / 2)
        m1 = int(min(M, max(m0, m0 * afford / max(t0, 1e-9))))
        m1 = max(m0, (m1 // 64) * 64)
        with mem:
            t1 = time_call(run(m1, N), device)
        seconds, times, measured, scaled = t1 * M / m1, [t1], m1, m1 < M
    return {"seconds": seconds, "times": times, "peak_mib": mem.growth / _MiB if peak else None,
            "measured_m": measured, "scaled": scaled}


def gemm_rate(M: int, N: int, K: int, repeats: int = 3, seed: int = 0, *, device="cpu",
              dtype: str = "float32") -> dict:
    """GFLOP/s of `a @ b.T` for an (m, K) x (n, K) GEMM of `dtype` shaped like the top-k work
    (m, n, K capped per device), median of `repeats` after warm-up, timed like the top-k."""
    dev = torch.device(device)
    cap_m, cap_n, cap_k = _GEMM_CAPS[dev.type]
    m, n, K = min(M, cap_m), min(N, cap_n), min(K, cap_k)
    gen = torch.Generator(device=dev).manual_seed(seed)
    t_dtype = getattr(torch, dtype)
    a = torch.randn(m, K, generator=gen, device=dev).to(t_dtype)
    b = torch.randn(n, K, generator=gen, device=dev).to(t_dtype)
    seconds, times = median_time(lambda: a @ b.T, repeats, dev, warmup=3 if dev.type == "cuda" else 1)
    gflops = 2.0 * m * n * K / seconds / 1e9
    return {"m": m, "n": n, "K": K, "dtype": dtype, "device": dev.type, "seconds": seconds, "times": times,
            "gflops": gflops, "tflops": gflops / 1e3}


def _gemm_dtype(dtype: str, device: torch.device) -> str:
    """The GEMM the kernels are compared with: half GEMMs for half inputs on a GPU, else float32."""
    return dtype if device.type == "cuda" and dtype in ("float16", "bfloat16") else "float32"


# ----------------------------------------------------------------------------- backends and options

def auto_choice(device="cpu") -> str:
    """The backend backend="auto" takes for tensors on `device` (the registry's answer)."""
    return registry.auto_choice(device)


def is_exact(name: str) -> bool:
    """Whether `name`'s top-k is exact (the baseline and "auto" always are)."""
    return name in (BASELINE, "auto") or registry.get(name).exact


def default_backends(device="cpu") -> list[str]:
    """The available exact backends `auto` may choose for `device`, best first (for the CPU:
    cpu, torch; for a GPU: triton, cuda, torch where they run)."""
    dev = torch.device(device).type
    found = [registry.get(r["name"]) for r in pyfk.backends()
             if r["available"] and r["exact"] and dev in r["devices"]]
    found = [b for b in found if dev in getattr(b, "auto_priority", {})]
    return [b.name for b in sorted(found, key=lambda b: b.auto_priority[dev])]


def check_backends(names: Sequence[str], device="cpu") -> None:
    """Raise ValueError for an unknown name or one that does not run on `device`,
    pyfk.BackendUnavailable for one that cannot run here."""
    dev = torch.device(device).type
    rows = {r["name"]: r for r in pyfk.backends()}
    for name in names:
        if name == "auto":
            auto_choice(dev)  # raises BackendUnavailable when nothing runs on this device
            continue
        if name not in rows:
            raise ValueError(f"backends: expected 'auto' or one of {sorted(rows)}, got {name!r}")
        if not rows[name]["available"]:
            raise pyfk.BackendUnavailable(f"backend: {name!r} is not available here: {rows[name]['reason']}")
        if dev not in rows[name]["devices"]:
            raise ValueError(f"backend {name!r} runs on {rows[name]['devices']} tensors; this benchmark "
                             f"uses {dev} (--device)")


def parse_option_value(text: str):
    """'none'/'null' -> None, 'true'/'false' -> bool, integers, floats, else the string."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_options(specs: Sequence[str] | None) -> dict:
    """['threads=2', 'cpu.isa=avx2'] -> {'threads': 2, 'cpu.isa': 'avx2'} (see backend_options)."""
    out = {}
    for spec in specs or ():
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option: expected KEY=VALUE or BACKEND.KEY=VALUE, got {spec!r}")
        out[key.strip()] = parse_option_value(value)
    return out


def backend_options(options: Mapping | None, backends: Mapping[str, str]) -> dict[str, dict]:
    """Split flat benchmark options among the benchmarked backends.

    `backends` maps each benchmarked name to the backend it runs ("auto" -> the registry's
    choice). A key "opt" goes to every backend whose options (pyfk.backends()[i]["options"])
    include it; "name.opt" only to backend `name` (as listed or as resolved). A key that no
    benchmarked backend accepts raises ValueError naming what each one accepts.
    """
    accepted = {r["name"]: r["options"] for r in pyfk.backends()}
    out: dict[str, dict] = {name: {} for name in backends}
    for key, value in (options or {}).items():
        scope, _, opt = str(key).rpartition(".")
        targets = [n for n, real in backends.items() if not scope or scope in (n, real)]
        if scope and not targets:
            raise ValueError(f"option {key!r}: backend {scope!r} is not among the benchmarked {list(backends)}")
        takers = [n for n in targets if opt in accepted.get(backends[n], {})]
        if not takers:
            have = "; ".join(f"{n}: {', '.join(sorted(accepted.get(real, {}))) or 'no options'}"
                             for n, real in backends.items() if n in targets)
            raise ValueError(f"option {key!r}: no benchmarked backend accepts {opt!r} ({have})")
        for n in takers:
            out[n][opt] = value
    return out


def _cpu_isas() -> list[str]:
    """Instruction sets this CPU runs, fastest first (empty if the extension is not built)."""
    try:
        return list(importlib.import_module("pyfk._C").isas())
    except (ImportError, AttributeError):
        return []


def effective_isa(option=None) -> str:
    """The instruction set the cpu backend runs with its `isa` option set to `option`
    (None: $PYFK_CPU_ISA, read now, else the best this CPU runs)."""
    if option is None:
        return _cpu.isa()
    if option == "auto":
        return (_cpu_isas() or ["auto"])[0]
    return str(option)


# ----------------------------------------------------------------------------- the engines

def materialise_topk(q: pyfk.Descriptors, p: pyfk.Descriptors, k: int, combine: str = "product",
                     normalize: str = "pcc") -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: normalise everything, build the full M x N matrix with torch GEMMs, torch.topk."""
    q_parts, layout = Layout.of(q, combine)
    p_parts, _ = Layout.of(p, combine)
    qn = normalized_block(q_parts, slice(None), normalize)
    pn = normalized_block(p_parts, slice(None), normalize)
    return torch.topk(layout.similarity(qn, pn), k, dim=1)


def topk_runner(name: str, q, p, k: int, combine: str, options: Mapping | None = None):
    """The timed call: `pyfk.topk` exactly as a user makes it (or the baseline)."""
    if name == BASELINE:
        return lambda: materialise_topk(q, p, k, combine)
    opts = dict(options) if options else None
    return lambda: pyfk.topk(q, p, k, combine=combine, normalize="pcc", backend=name, options=opts)


def as_cpu_tensor(x) -> torch.Tensor:
    """A result (torch on any device, or NumPy for NumPy inputs) as a CPU tensor."""
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def compare_topk(name: str, q: pyfk.Descriptors, p: pyfk.Descriptors, k: int, combine: str = "product", *,
                 options: Mapping | None = None, tolerance: float | None = None) -> dict:
    """Run `name` and the torch reference on the same inputs and compare.

    Every backend: (M, k) results, indices in [0, N) and distinct per row ("valid").
    Exact backends also: scores descending and finite, and max |score - reference| <=
    tolerance * max |reference score| + 1e-6 (tolerance: TOLERANCE[device][dtype]);
    indices are only reported ("index_agreement"): they may differ between exact ties.
    Approximate backends: recall@k against the reference instead. Returns a dict with "ok".
    """
    want_s, want_i = pyfk.topk(q, p, k, combine=combine, normalize="pcc", backend=REFERENCE)
    got_s, got_i = topk_runner(name, q, p, k, combine, options)()
    ws, wi = as_cpu_tensor(want_s).float(), as_cpu_tensor(want_i)
    gs, gi = as_cpu_tensor(got_s).float(), as_cpu_tensor(got_i)
    M, N = q.n, p.n
    out: dict = {"backend": name, "M": M, "N": N, "k": k}
    if tuple(gs.shape) != (M, k) or tuple(gi.shape) != (M, k):
        out.update(ok=False, valid=False,
                   error=f"expected ({M}, {k}) results, got {tuple(gs.shape)} and {tuple(gi.shape)}")
        return out
    valid = bool(((gi >= 0) & (gi < N)).all()) and bool((gi.sort(dim=1).values.diff(dim=1) != 0).all())
    out["valid"] = valid
    if not is_exact(name):
        out.update(recall=recall_at_k(gi, wi), ok=valid)
        return out
    if tolerance is None:
        tolerance = TOLERANCE[q.device.type][_dtype_name(q)]
    scale = float(ws.abs().max())
    diff = float((gs - ws).abs().max())
    sorted_ok = bool((gs.diff(dim=1) <= 0).all())
    finite = bool(torch.isfinite(gs).all())
    tol = tolerance * scale + 1e-6
    out.update(max_abs_diff=diff, rel_diff=diff / max(scale, 1e-30), tol=tol, sorted=sorted_ok, finite=finite,
               index_agreement=float((gi == wi).float().mean()),
               ok=bool(valid and sorted_ok and finite and diff <= tol))
    return out


def check_scores(name: str, q: pyfk.Descriptors, p: pyfk.Descriptors, k: int, combine: str,
                 m: int = 64, n: int = 4096, *, options: Mapping | None = None,
                 tolerance: float | None = None) -> float:
    """compare_topk on the first m queries x n pool rows; the largest absolute score difference.

    Raises AssertionError when the check fails (see compare_topk for what is checked).
    """
    qs, ps = q.take(slice(0, min(q.n, m))), p.take(slice(0, min(p.n, n)))
    kk = min(k, ps.n)
    res = compare_topk(name, qs, ps, kk, combine, options=options, tolerance=tolerance)
    if not res["ok"]:
        if "error" in res:
            why = res["error"]
        elif not res["valid"]:
            why = "indices out of range or repeated within a row"
        elif "max_abs_diff" not in res:
            why = "invalid results"
        elif not (res["sorted"] and res["finite"]):
            why = "scores not descending" if res["finite"] else "scores not finite"
        else:
            why = f"max abs diff {res['max_abs_diff']:.3g}, allowed {res['tol']:.3g}"
        raise AssertionError(f"backend {name!r}: top-{kk} results differ from the {REFERENCE} backend on a "
                             f"{qs.n} x {ps.n} slice ({why})")
    return float(res.get("max_abs_diff", 0.0))


def recall_vs_exact(name: str, q: pyfk.Descriptors, p: pyfk.Descriptors, k: int, combine: str,
                    options: Mapping | None = None) -> float:
    """recall@k of an approximate backend against the exact answer of the backend `auto` takes."""
    exact = auto_choice(q.device)
    want = pyfk.topk(q, p, k, combine=combine, normalize="pcc", backend=exact)[1]
    got = topk_runner(name, q, p, k, combine, options)()[1]
    return recall_at_k(as_cpu_tensor(got), as_cpu_tensor(want))


# ----------------------------------------------------------------------------- machine info

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str:
    """The version of an optional package, or why it cannot be imported (never raises)."""
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # report; never fail on an optional package
        return "not installed" if isinstance(exc, ModuleNotFoundError) else f"not importable ({type(exc).__name__})"
    return str(getattr(module, "__version__", "?"))


def _cuda_info(device: torch.device) -> dict:
    info = {"torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "triton": _package_version("triton"), "faiss": _package_version("faiss")}
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
            lines = out.strip().splitlines()
            info["nvcc"] = lines[-1] if lines else "?"
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvcc"] = f"? ({type(exc).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device if device.index is not None else 0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                       "memory_gib": round(p.total_memory / (1 << 30), 1)}
    return info


def machine_info(device="cpu") -> dict:
    """The machine a result was measured on: CPU model, ISA, threads, versions, load; on CUDA
    also the GPU, CUDA, triton, faiss and nvcc versions (never fails without a GPU)."""
    dev = torch.device(device)
    info = {
        "cpu": _cpu_model(),
        "processor": platform.processor(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "pyfk": pyfk.__version__,
        "isa": _cpu.isa(),  # what a cpu-backend call without an `isa` option uses
        "isa_env": os.environ.get(_cpu.ISA_ENV),
        "isas": _cpu_isas(),
        "device": dev.type,
        "loadavg_1min": os.getloadavg()[0],  # other work on the machine skews every number below
    }
    if dev.type == "cuda":
        info.update(_cuda_info(dev))
    return info


def write_json(path, result: dict) -> Path:
    """Write a result dict as indented JSON (parent folders created; written beside and renamed into
    place, so a kill leaves the previous file or the new one, never half of one); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def text_table(rows: Sequence[Sequence], left: int = 1) -> list[str]:
    """Lines of a plain-text table: rows[0] is the header, underlined; the first `left`
    columns are left-aligned, the others right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    width = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for i, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if j < left else c.rjust(w)
                               for j, (c, w) in enumerate(zip(row, width))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in width))
    return lines


# ----------------------------------------------------------------------------- the harness

# The ImageNet-shaped case: an fp16 DescriptorStore the size of the ImageNet-1k train set.
PRESETS = {"imagenet": {"M": 1000, "N": 1_281_167, "widths": [64, 128, 256, 512], "k": 32, "dtype": "float16"}}
_PRESET_CHUNK = 1 << 16  # rows generated and committed per step (resumable)


def cache_dir() -> Path:
    """Where pyfk keeps reusable benchmark data: $PYFK_CACHE_DIR, else $XDG_CACHE_HOME/pyfk,
    else ~/.cache/pyfk."""
    if os.environ.get("PYFK_CACHE_DIR"):
        return Path(os.environ["PYFK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyfk"


def preset_store(name: str, root=None, seed: int = 1, progress: bool = True):
    """The preset's pool as a DescriptorStore under `root` (default cache_dir()/bench): built
    once from seeded random fp16 descriptors, chunk by chunk, each chunk committed, so an
    interrupted build resumes; a complete store is reused (opened read-only). Chunk c of
    array a is drawn from np.random.default_rng([seed, a, c]): the content never depends on
    where a build was interrupted."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    spec = PRESETS[name]
    n, widths, dtype = spec["N"], spec["widths"], spec["dtype"]
    root = Path(root) if root is not None else cache_dir() / "bench"
    path = root / f"{name}-N{n}-L{'-'.join(map(str, widths))}-{dtype}-seed{seed}"
    names = [f"{part}{j}" for j in range(len(widths)) for part in ("z", "g")]
    if (path / "manifest.json").exists():
        store = DescriptorStore.open(path, "r")
        if store.complete:
            return store
        store.close()
        store = DescriptorStore.open(path, "r+")
    else:
        arrays = {f"{part}{j}": ((w,), dtype) for j, w in enumerate(widths) for part in ("z", "g")}
        store = DescriptorStore.create(path, n, arrays, meta={"preset": name, "seed": seed})
    with tqdm(total=n, initial=store.rows_done, unit="rows", unit_scale=True, disable=not progress,
              desc=f"pyfk bench: building the {name} store at {path}") as bar:
        for start in range(store.rows_done, n, _PRESET_CHUNK):
            stop = min(n, start + _PRESET_CHUNK)
            chunk = start // _PRESET_CHUNK
            batch = {a: np.random.default_rng([seed, i, chunk]).standard_normal(
                (stop - start, widths[i // 2])).astype(dtype) for i, a in enumerate(names)}
            store.write(start, batch)
            store.commit(stop)
            bar.update(stop - start)
    store.close()
    return DescriptorStore.open(path, "r")


def run_bench(M: int, N: int, widths: Sequence[int], k: int = 32, combine: str = "product",
              dtype: str = "float32", backends: Sequence[str] | None = None, threads: int | None = None,
              repeats: int = 3, check: bool = True, baseline: bool = True, peak: bool = True,
              seed: int = 0, *, device="cpu", options: Mapping | None = None, budget: float | None = None,
              deadline: float | None = None, gemm: dict | None = None, errors: str = "raise",
              on_row: Callable[[dict], None] | None = None, pool: pyfk.Descriptors | None = None,
              preset: str | None = None) -> dict:
    """Benchmark `pyfk.topk` per backend against the materialise baseline; returns a JSON-ready dict.

    device: "cpu" (NumPy inputs) or "cuda" (torch inputs on the GPU). backends: None = the
    available exact backends `auto` may choose for the device (default_backends).
    options: backend options, flat ({"threads": 2, "cpu.isa": "avx2"}, see backend_options),
    passed as pyfk.topk(..., options=...) to each backend that accepts them.
    peak=False skips measuring the peak memory growth (taken during each backend's warm-up call).
    budget: seconds per backend; a backend whose full run would not fit is timed on a query
    slice and scaled linearly in M (rows say "scaled"). deadline: a time.monotonic() after
    which no backend is started (rows say "skipped"). gemm: a gemm_rate() result to reuse
    instead of measuring one shaped like this problem. errors="record" puts a backend's
    exception into its row ("error") instead of raising. on_row(row) is called as each row is done.
    pool: a pool to search instead of random descriptors (e.g. a DescriptorStore's memmaps from
    preset_store); N and the widths must match it. preset: its name, recorded in the JSON.
    Raises BackendUnavailable for a requested backend that cannot run here, before any work.
    """
    widths = [int(w) for w in widths]
    if combine not in COMBINES:
        raise ValueError(f"combine: expected one of {list(COMBINES)}, got {combine!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    if not widths or min(widths) < 1:
        raise ValueError(f"widths: expected positive scale widths, got {widths}")
    if not 1 <= k <= N:
        raise ValueError(f"k: expected 1 <= k <= N={N}, got {k}")
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")
    if budget is not None and budget <= 0:
        raise ValueError(f"budget: expected a positive number of seconds, got {budget}")
    if errors not in ("raise", "record"):
        raise ValueError(f"errors: expected 'raise' or 'record', got {errors!r}")
    dev = check_device(device)
    backends = default_backends(dev) if backends is None else list(backends)
    if not backends:
        raise pyfk.BackendUnavailable(f"backends: no exact backend is available for {dev.type} here")
    check_backends(backends, dev)  # fail fast, before any work
    chosen = {name: auto_choice(dev) if name == "auto" else name for name in backends}
    per_backend = backend_options(options, chosen)
    if threads:
        torch.set_num_threads(int(threads))

    args = {"M": M, "N": N, "widths": widths, "k": k, "combine": combine, "dtype": dtype, "backends": backends,
            "threads": threads, "repeats": repeats, "check": check, "baseline": baseline, "peak": peak,
            "seed": seed, "device": dev.type, "options": dict(options or {}), "budget": budget}
    result = {
        "args": args,
        "argv": list(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(dev),
        "flops": topk_flops(M, N, widths, combine),
        "mn_matrix_mib": M * N * 4 / _MiB,
        "peak_memory": _peak_label(dev.type) if peak else None,
    }
    if pool is not None and (pool.n != N or pool.widths != widths):
        raise ValueError(f"pool: expected {N} rows of widths {widths}, got {pool.n} rows of widths {pool.widths}")
    args["preset"] = preset
    q = make_descriptors(M, widths, dtype, seed, dev)
    p = pool if pool is not None else make_descriptors(N, widths, dtype, seed + 1, dev)
    result["gemm"] = gemm if gemm is not None else gemm_rate(
        M, N, kernel_width(widths, combine), repeats, seed, device=dev, dtype=_gemm_dtype(dtype, dev))

    names = backends + ([BASELINE] if baseline else [])
    rows = []
    for name in names:
        opts = per_backend.get(name) or {}
        row = {"backend": name, "resolved": chosen.get(name, name), "options": opts, "seconds": None,
               "gflops": None, "pct_gemm": None, "speedup": None, "speedup_vs_torch": None, "peak_mib": None,
               "max_abs_diff": None, "recall": None, "measured_m": None, "scaled": False, "note": ""}
        if row["resolved"] == "cpu":  # what the fused kernel ran with
            row["isa"] = effective_isa(opts.get("isa"))
            row["threads"] = int(opts.get("threads") or torch.get_num_threads())
        rows.append(row)
        try:
            _bench_row(row, q, p, k, combine, opts, result, dev, repeats, check, peak, budget, deadline)
        except Exception as exc:
            if errors == "raise":
                raise
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["note"] = f"error: {row['error']}"
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if on_row is not None:
            on_row(row)

    base = next((r["seconds"] for r in rows if r["backend"] == BASELINE and r["seconds"]), None)
    ref = next((r["seconds"] for r in rows if r["backend"] == REFERENCE and r["seconds"]), None)
    for row in rows:
        if row["seconds"]:
            row["speedup"] = base / row["seconds"] if base else None
            row["speedup_vs_torch"] = ref / row["seconds"] if ref else None
    result["rows"] = rows
    del q, p
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _bench_row(row: dict, q, p, k: int, combine: str, opts: dict, result: dict, dev: torch.device, repeats: int,
               check: bool, peak: bool, budget: float | None, deadline: float | None) -> None:
    """Check, time and score one backend (or the baseline) into `row`."""
    name, M, N = row["backend"], q.n, p.n
    if deadline is not None and deadline - time.monotonic() < _GUARD_S:
        row["skipped"] = "time guard"
        row["note"] = "skipped: time guard (the run's deadline is near)"
        return
    if name == BASELINE and M * N * 4 > _baseline_limit(dev):
        row["skipped"] = "too large"
        row["note"] = f"skipped: the M x N matrix would take {M * N * 4 / (1 << 30):.1f} GiB"
        return
    exact = is_exact(name)
    if check and exact:
        row["max_abs_diff"] = check_scores(name, q, p, k, combine, options=opts)
    if budget is None:
        row.update(_measure(topk_runner(name, q, p, k, combine, opts), repeats, dev, peak))
    else:
        def run(m: int, n: int):
            qs = q if m >= M else q.take(slice(0, m))
            ps = p if n >= N else p.take(slice(0, n))
            return topk_runner(name, qs, ps, k, combine, opts)
        row.update(_measure_budgeted(run, M, N, k, repeats, dev, peak, budget, deadline))
        if row["scaled"]:
            row["note"] = f"est. from M={row['measured_m']} (linear in M)"
    if not exact:
        row["recall"] = recall_vs_exact(name, q, p, k, combine, opts)
    row["gflops"] = result["flops"] / row["seconds"] / 1e9
    row["pct_gemm"] = 100.0 * row["gflops"] / result["gemm"]["gflops"]


def _baseline_limit(dev: torch.device) -> int:
    if dev.type == "cuda":  # the matrix, its top-k workspace and the normalised inputs must fit
        return min(_BASELINE_LIMIT_BYTES, torch.cuda.mem_get_info(dev)[0] // 3)
    return _BASELINE_LIMIT_BYTES


def _display_name(row: dict) -> str:
    name = row["backend"] if row["resolved"] == row["backend"] else f"{row['backend']} ({row['resolved']})"
    if row.get("options"):
        name += " [" + ", ".join(f"{k}={v}" for k, v in row["options"].items()) + "]"
    return name


def format_table(result: dict) -> str:
    """A plain-text report: machine and GEMM rate, then one row per backend."""
    a, mach, gemm = result["args"], result["machine"], result["gemm"]
    device = a.get("device", "cpu")
    isa = f"pyfk ISA {mach['isa']}" + (f" (PYFK_CPU_ISA={mach['isa_env']})" if mach.get("isa_env") else "")
    if mach.get("isas"):
        isa += f", CPU runs {'/'.join(mach['isas'])}"
    lines = [
        f"pyfk {mach['pyfk']} top-k benchmark  {result['date']}",
        f"machine: {mach['cpu']}, {mach['cpu_count']} CPUs, torch {mach['torch']} with {mach['torch_threads']} "
        f"threads, {isa}, load average {mach['loadavg_1min']:.2f}",
    ]
    if device == "cuda":
        gpu = mach.get("gpu") or {}
        lines.append(f"GPU: {gpu.get('name', '?')} (sm {gpu.get('capability', '?')}, {gpu.get('sms', '?')} SMs, "
                     f"{gpu.get('memory_gib', '?')} GiB), CUDA {mach.get('torch_cuda')}, triton {mach.get('triton')}")
    lines += [
        f"problem: M={a['M']} N={a['N']} widths={','.join(map(str, a['widths']))} k={a['k']} "
        f"combine={a['combine']} dtype={a['dtype']} device={device}; {result['flops'] / 1e9:.1f} GFLOP; "
        f"an M x N float32 matrix is {result['mn_matrix_mib']:.0f} MiB",
        f"torch {gemm.get('dtype', 'float32')} GEMM ({gemm['m']} x {gemm['n']} x {gemm['K']}): "
        f"{gemm['gflops']:.1f} GFLOP/s",
        "",
    ]

    def fmt(value, spec, suffix=""):
        return "-" if value is None else format(value, spec) + suffix

    vs_torch = device == "cuda"
    header = ["backend", "ms", "GFLOP/s", "%GEMM", "speed-up"] + (["vs torch"] if vs_torch else [])
    table = [header + ["peak MiB", f"recall@{a['k']}"]]
    notes = []
    for r in result["rows"]:
        ms = None if r["seconds"] is None else 1e3 * r["seconds"]
        cells = [_display_name(r), fmt(ms, ".1f") + (" est." if r.get("scaled") else ""), fmt(r["gflops"], ".1f"),
                 fmt(r["pct_gemm"], ".0f"), fmt(r["speedup"], ".2f", "x")]
        if vs_torch:
            cells.append(fmt(r.get("speedup_vs_torch"), ".1f", "x"))
        cells += [fmt(r["peak_mib"], ".0f"), "exact" if r.get("recall") is None else f"{r['recall']:.3f}"]
        table.append(cells)
        if r["note"]:
            notes.append(f"{r['backend']}: {r['note']}")
    lines += text_table(table)
    lines.append("")
    legend = f"ms: median of {a['repeats']} after one warm-up; "
    if a.get("budget"):
        legend += (f"est.: a full run would exceed the {a['budget']:g} s budget, so a query slice was timed "
                   "and scaled linearly in M; ")
    if a["baseline"]:
        legend += f"speed-up: vs {BASELINE} (full M x N matrix + torch.topk); "
    if vs_torch:
        legend += f"vs torch: vs the {REFERENCE} backend; "
    if a["peak"]:
        legend += f"peak MiB: {result.get('peak_memory') or 'RSS'} growth during the (warm-up) call; "
    if any(r.get("recall") is not None for r in result["rows"]):
        legend += f"recall@{a['k']}: share of the exact top-{a['k']} an approximate backend found"
    lines.append(legend.rstrip("; "))
    lines += notes
    return "\n".join(lines)
