"""Benchmark harness for the fused top-k (DESIGN.md section 6).

    result = run_bench(M=1000, N=50000, widths=(64, 128, 256, 512))
    print(format_table(result))

For every backend it times `pyfk.topk` on fresh seeded random descriptors and
reports GFLOP/s, the share of the float32 GEMM rate torch reaches in the same
process, the speed-up over the "materialise" baseline (the full M x N matrix
with torch GEMMs, then `torch.topk`) and the peak RSS growth during the call.
Every backend's scores are checked against the torch reference before timing.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

import pyfk
from pyfk.engine.descriptors import COMBINES, normalized_block, segments
from pyfk.engine.kernels import cpu as _cpu
from pyfk.engine.kernels import torch as _reference

BASELINE = "materialise"
APPROXIMATE = ("faiss_ann",)  # backends whose top-k is approximate: recall@k is reported, scores not checked
_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
_BASELINE_LIMIT_BYTES = 8 << 30  # skip the baseline when its M x N float32 matrix is larger
_GEMM_MAX_K = 4096
_MiB = float(1 << 20)


# ----------------------------------------------------------------------------- inputs and flops

def make_descriptors(n: int, widths: Sequence[int], dtype: str = "float32", seed: int = 0) -> pyfk.Descriptors:
    """n rows of random z and g per scale width, NumPy arrays of `dtype`."""
    rng = np.random.default_rng(seed)
    np_dtype = _DTYPES[dtype]
    z = [rng.standard_normal((n, w), dtype=np.float32).astype(np_dtype, copy=False) for w in widths]
    g = [rng.standard_normal((n, w), dtype=np.float32).astype(np_dtype, copy=False) for w in widths]
    return pyfk.Descriptors(z=z, g=g)


def topk_flops(M: int, N: int, widths: Sequence[int], combine: str) -> float:
    """Multiply-adds x 2 of the GEMMs behind one top-k: z and g GEMMs unless features only."""
    per_pair = 2 * sum(widths) * M * N
    return float(per_pair if combine == "features" else 2 * per_pair)


def kernel_width(widths: Sequence[int], combine: str) -> int:
    """Columns of the normalised block the kernels see (z only, or z and g)."""
    return sum(widths) if combine == "features" else 2 * sum(widths)


# ----------------------------------------------------------------------------- measurement

def _median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


def _measure(fn, repeats: int, peak: bool = True) -> dict:
    """One warm-up call, then `repeats` timed calls (median seconds).

    Peak RSS growth is taken on the warm-up call: a full call like the others, and
    the timed calls then pay neither the sampler nor the page faults that
    malloc_trim's returned pages cost on the next touch (~10% at the issue's size).
    """
    if peak:
        with PeakRSS() as mem:
            fn()
    else:
        fn()
    seconds, times = _median_time(fn, repeats, warmup=0)
    return {"seconds": seconds, "times": times, "peak_mib": mem.growth / _MiB if peak else None}


def gemm_rate(M: int, N: int, K: int, repeats: int = 3, seed: int = 0) -> dict:
    """float32 GFLOP/s of `a @ b.T` for a (m, K) x (n, K) GEMM shaped like the top-k work."""
    m, n, K = min(M, 2048), min(N, 16384), min(K, _GEMM_MAX_K)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, K, generator=gen)
    b = torch.randn(n, K, generator=gen)
    seconds, times = _median_time(lambda: a @ b.T, repeats)
    return {"m": m, "n": n, "K": K, "seconds": seconds, "times": times, "gflops": 2.0 * m * n * K / seconds / 1e9}


# ----------------------------------------------------------------------------- the engines

def materialise_topk(q: pyfk.Descriptors, p: pyfk.Descriptors, k: int, combine: str = "product",
                     normalize: str = "pcc") -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline: normalise everything, build the full M x N matrix with torch GEMMs, torch.topk."""
    q_parts, widths, product = segments(q, combine)
    p_parts, _, _ = segments(p, combine)
    qn = normalized_block(q_parts, slice(None), normalize)
    pn = normalized_block(p_parts, slice(None), normalize)
    S = _reference.similarity(qn, pn, widths, product)
    return torch.topk(S, k, dim=1)


def _runner(name: str, q, p, k: int, combine: str):
    if name == BASELINE:
        return lambda: materialise_topk(q, p, k, combine)
    return lambda: pyfk.topk(q, p, k, combine=combine, normalize="pcc", backend=name)


def check_scores(name: str, q: pyfk.Descriptors, p: pyfk.Descriptors, k: int, combine: str,
                 m: int = 64, n: int = 4096) -> float:
    """Compare `name`'s top-k scores with the torch backend's on the first m queries x n pool rows.

    Only scores are compared: indices may legitimately differ between exact ties.
    Returns the largest absolute difference; raises AssertionError beyond tolerance.
    """
    qs, ps = q.take(slice(0, min(q.n, m))), p.take(slice(0, min(p.n, n)))
    kk = min(k, ps.n)
    want = np.asarray(pyfk.topk(qs, ps, kk, combine=combine, normalize="pcc", backend="torch")[0])
    got = np.asarray(_runner(name, qs, ps, kk, combine)()[0])
    atol = 1e-3 * float(np.abs(want).max())
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=atol):
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        raise AssertionError(f"backend {name!r}: top-{kk} scores differ from the torch backend on a "
                             f"{qs.n} x {ps.n} slice (max abs diff {diff:.3g}, atol {atol:.3g})")
    return float(np.abs(got - want).max())


def recall_vs_exact(name: str, q: pyfk.Descriptors, p: pyfk.Descriptors, k: int, combine: str) -> float:
    """recall@k of an approximate backend against the exact answer (cpu backend, else torch)."""
    from pyfk.engine.kernels.faiss import recall_at_k

    exact = "cpu" if _cpu.IMPORT_ERROR is None else "torch"
    want = np.asarray(pyfk.topk(q, p, k, combine=combine, normalize="pcc", backend=exact)[1])
    got = np.asarray(_runner(name, q, p, k, combine)()[1])
    return recall_at_k(got, want)


def check_backends(names: Sequence[str]) -> None:
    """Raise ValueError for an unknown name, pyfk.BackendUnavailable for one that cannot run here."""
    rows = {r["name"]: r for r in pyfk.backends()}
    for name in names:
        if name == "auto":
            continue
        if name not in rows:
            raise ValueError(f"backends: expected 'auto' or one of {sorted(rows)}, got {name!r}")
        if not rows[name]["available"]:
            raise pyfk.BackendUnavailable(f"backend {name!r} is not available: {rows[name]['reason']}")
        if "cpu" not in rows[name]["devices"]:
            raise ValueError(f"backend {name!r} runs on {rows[name]['devices']} tensors; the benchmark uses CPU")


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def auto_choice() -> str:
    """The backend backend="auto" picks for CPU tensors, read from the choice pyfk logs."""
    log, capture = logging.getLogger("pyfk"), _Capture()
    level = log.level
    log.addHandler(capture)
    log.setLevel(logging.INFO)
    try:
        tiny = make_descriptors(2, [2])
        pyfk.topk(tiny, tiny, 1, backend="auto")
    finally:
        log.removeHandler(capture)
        log.setLevel(level)
    for message in capture.messages:
        found = re.search(r"chose '([^']+)'", message)
        if found:
            return found.group(1)
    return "auto"


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


def machine_info() -> dict:
    return {
        "cpu": _cpu_model(),
        "processor": platform.processor(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "pyfk": pyfk.__version__,
        "isa": _cpu.isa(),
        "loadavg_1min": os.getloadavg()[0],  # other work on the machine skews every number below
    }


# ----------------------------------------------------------------------------- the harness

def run_bench(M: int, N: int, widths: Sequence[int], k: int = 32, combine: str = "product",
              dtype: str = "float32", backends: Sequence[str] = ("cpu", "torch"), threads: int | None = None,
              repeats: int = 3, check: bool = True, baseline: bool = True, peak: bool = True,
              seed: int = 0) -> dict:
    """Benchmark `pyfk.topk` per backend against the materialise baseline; returns a JSON-ready dict.

    `peak=False` skips measuring the peak RSS growth (taken during each backend's warm-up call).
    Raises BackendUnavailable for a requested backend that cannot run here, before any work.
    """
    widths = [int(w) for w in widths]
    if combine not in COMBINES:
        raise ValueError(f"combine: expected one of {list(COMBINES)}, got {combine!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {list(_DTYPES)}, got {dtype!r}")
    if not widths or min(widths) < 1:
        raise ValueError(f"widths: expected positive scale widths, got {widths}")
    if not 1 <= k <= N:
        raise ValueError(f"k: expected 1 <= k <= N={N}, got {k}")
    if repeats < 1:
        raise ValueError(f"repeats: expected at least 1, got {repeats}")
    backends = list(backends)
    check_backends(backends)  # fail fast, before any work
    if threads:
        torch.set_num_threads(int(threads))
    chosen = {name: auto_choice() if name == "auto" else name for name in backends}

    args = {"M": M, "N": N, "widths": widths, "k": k, "combine": combine, "dtype": dtype, "backends": backends,
            "threads": threads, "repeats": repeats, "check": check, "baseline": baseline, "peak": peak,
            "seed": seed}
    result = {
        "args": args,
        "argv": list(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "flops": topk_flops(M, N, widths, combine),
        "mn_matrix_mib": M * N * 4 / _MiB,
    }
    q = make_descriptors(M, widths, dtype, seed)
    p = make_descriptors(N, widths, dtype, seed + 1)
    result["gemm"] = gemm_rate(M, N, kernel_width(widths, combine), repeats, seed)

    names = backends + ([BASELINE] if baseline else [])
    rows = []
    for name in names:
        row = {"backend": name, "resolved": chosen.get(name, name), "seconds": None, "gflops": None,
               "pct_gemm": None, "speedup": None, "peak_mib": None, "max_abs_diff": None, "recall": None,
               "note": ""}
        rows.append(row)
        if name == BASELINE and M * N * 4 > _BASELINE_LIMIT_BYTES:
            row["note"] = f"skipped: the M x N matrix would take {M * N * 4 / (1 << 30):.1f} GiB"
            continue
        if check and name not in APPROXIMATE:
            row["max_abs_diff"] = check_scores(name, q, p, k, combine)
        row.update(_measure(_runner(name, q, p, k, combine), repeats, peak))
        if name in APPROXIMATE:
            row["recall"] = recall_vs_exact(name, q, p, k, combine)
        row["gflops"] = result["flops"] / row["seconds"] / 1e9
        row["pct_gemm"] = 100.0 * row["gflops"] / result["gemm"]["gflops"]

    base = next((r["seconds"] for r in rows if r["backend"] == BASELINE and r["seconds"]), None)
    for row in rows:
        if base and row["seconds"]:
            row["speedup"] = base / row["seconds"]
    result["rows"] = rows
    return result


def format_table(result: dict) -> str:
    """A plain-text report: machine and GEMM rate, then one row per backend."""
    a, mach, gemm = result["args"], result["machine"], result["gemm"]
    lines = [
        f"pyfk {mach['pyfk']} top-k benchmark  {result['date']}",
        f"machine: {mach['cpu']}, {mach['cpu_count']} CPUs, torch {mach['torch']} with {mach['torch_threads']} "
        f"threads, pyfk ISA {mach['isa']}, load average {mach['loadavg_1min']:.2f}",
        f"problem: M={a['M']} N={a['N']} widths={','.join(map(str, a['widths']))} k={a['k']} "
        f"combine={a['combine']} dtype={a['dtype']}; {result['flops'] / 1e9:.1f} GFLOP; "
        f"an M x N float32 matrix is {result['mn_matrix_mib']:.0f} MiB",
        f"torch float32 GEMM ({gemm['m']} x {gemm['n']} x {gemm['K']}): {gemm['gflops']:.1f} GFLOP/s",
        "",
    ]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    header = ("backend", "ms", "GFLOP/s", "%GEMM", "speed-up", "peak MiB", f"recall@{a['k']}")
    table = [header]
    notes = []
    for r in result["rows"]:
        name = r["backend"] if r["resolved"] == r["backend"] else f"{r['backend']} ({r['resolved']})"
        ms = None if r["seconds"] is None else 1e3 * r["seconds"]
        table.append((name, fmt(ms, ".1f"), fmt(r["gflops"], ".1f"), fmt(r["pct_gemm"], ".0f"),
                      fmt(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
                      fmt(r["peak_mib"], ".0f"), "exact" if r.get("recall") is None else f"{r['recall']:.3f}"))
        if r["note"]:
            notes.append(f"{r['backend']}: {r['note']}")
    cols = list(zip(*table))
    width = [max(len(c) for c in col) for col in cols]
    for i, row in enumerate(table):
        cells = [row[0].ljust(width[0])] + [c.rjust(w) for c, w in zip(row[1:], width[1:])]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in width))
    lines.append("")
    legend = f"ms: median of {a['repeats']} after one warm-up; "
    if a["baseline"]:
        legend += f"speed-up: vs {BASELINE} (full M x N matrix + torch.topk); "
    if a["peak"]:
        legend += "peak MiB: RSS growth during the (warm-up) call; "
    if any(r.get("recall") is not None for r in result["rows"]):
        legend += f"recall@{a['k']}: share of the exact top-{a['k']} an approximate backend found"
    lines.append(legend.rstrip("; "))
    lines += notes
    return "\n".join(lines)
