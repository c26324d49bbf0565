"""`pyfk plan`: predict time, memory and disk of a PFK acquisition before running it, and say
which backend, precision and sharding to use (issue #11 item 3).

    rates = calibrate()                                  # a few seconds of micro-benchmark, cached
    p = plan(1_281_167, 1000, (64, 128, 256, 512), k=32, dtype="float16", rates=rates)
    print(p.format()); p.to_dict()
    plan(10_000_000, 50_000, (64, 128, 256, 512), device="cuda", gpus=8)   # on paper
    check_against("benchmarks/results/zen3/preset_imagenet_fp16.json")     # predicted vs measured

The model (per rank; a rank holds a contiguous shard of ceil(N / world) pool rows):

* selection, CPU (`cpu` backend): t = F / R + n_rank * D * c_pack, where F = 4 * sum(L_j) * M *
  n_rank (DESIGN.md section 6, `pyfk.bench.topk_flops`), R the kernel's marginal rate and c_pack
  its per-pool-value cost of reading, converting, normalising and packing a row (paid once per
  call, whatever M). Both come from `calibrate`, which times `pyfk.topk` at two query counts on
  THIS machine. A store larger than the page cache is read from disk on every call (+ its bytes
  at `disk_gbps`, an assumption). Across ranks the (M, k) lists are all-gathered and merged:
  world * M * k int64 keys (assumed bandwidth and merge rate; tiny).
* selection, GPU (`triton`, else `cuda` for k > 128): F / R_gpu. No GPU figure is measured yet
  (benchmarks/RESULTS.md), so unless `gpu_rates` come from a `pyfk bench --device cuda --json`
  result (`gpu_rates_from_bench`) the rates are the ASSUMPTION `H100_ASSUMED` (datasheet peaks x
  assumed efficiencies) plus modelled memory traffic: the triton float16/bfloat16 path re-ranks
  its 2k candidates in float32 once per pool chunk (gathered rows), the cuda path writes and
  reads per-scale M x T Gram tiles in HBM.
* memory: the pool shard is mapped (page cache, file-backed) on the CPU or resident on the GPU;
  beyond it O(M x D + M x k) plus fixed tiles (~384 KiB per CPU thread; ~0.5-1 GiB chunks on a
  GPU). The M x N score matrix is never built; its size is shown for contrast.
* disk: the pool store's arrays (z_j, g_j per scale, N x 2 * sum(L_j) values of `dtype`) plus,
  for an extraction store, probs (N x classes float32) and four int64 columns.
* extraction time only from a measured rate (`extract_rate` images/s per rank, e.g. from
  `pyfk bench-extract --json`): it depends on the model, which a plan does not know.

The calibration cache is JSON under `pyfk.bench.cache_dir()/plan/`, keyed by the CPU (model
name, family, model, stepping, the avx512f/avx2/f16c/fma flags), thread count, pyfk version,
a hash of the compiled `pyfk._C`, the kernel ISA in use and the probe version; it is written
atomically (temp file + rename) and only ever parsed as JSON and validated: a corrupt or
foreign file is ignored and the rates measured again.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

import pyfk
from pyfk._version import __version__
from pyfk.bench import PRESETS, cache_dir, kernel_width, text_table, time_call, topk_flops
from pyfk.engine.descriptors import COMBINES
from pyfk.engine.kernels import cpu as _cpu
from pyfk.engine.kernels import cuda as _cuda
from pyfk.engine.kernels import triton as _triton
from pyfk.engine.topk_state import MAX_INDEX

SCHEMA = "pyfk.plan.rates/1"
PROBE_VERSION = 1  # bump when the probe changes: cached rates of another probe are not reused
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
DEVICES = ("cpu", "cuda", "auto")
TOLERANCE = 0.30  # check_against: |predicted / measured - 1| <= this
_FLAGS = ("avx512f", "avx2", "f16c", "fma")
_MAX_CACHE_BYTES = 1 << 20

# The probe: pyfk.topk at two query counts against one pool (both dtypes), the fastest of
# `repeats` interleaved rounds after a warm-up; ~3-4 s on a 2-core AVX2 machine. n grows with
# the thread count (8,192 rows per thread: the pool split that large runs take is what is timed).
_PROBE = {"m": (64, 1024), "n": 16384, "n_per_thread": 8192, "n_max": 65536, "widths": (64, 128, 256, 512),
          "k": 32, "repeats": 3, "dtypes": ("float32", "float16")}

# ----------------------------------------------------------------------------- assumptions
# Every figure below is an assumption, not a measurement; each is named where it is used
# and can be overridden (plan(..., disk_gbps=...), gpu_rates=...).
DISK_GBPS = 2.0          # sequential read of a store not in the page cache (NVMe-class), GB/s
NET_GBPS = {"cpu": 1.0, "cuda": 25.0}   # all-gather bandwidth per rank: gloo over 10 GbE; NCCL IB/NVLink
MERGE_KEYS_PER_S = {"cpu": 5e7, "cuda": 5e9}  # TopK merge of the gathered (score, index) keys
BUSY_LOAD = 0.5          # a calibration started above this load average per CPU is not cached
PAGE_CACHE_SHARE = 0.8   # share of RAM a mapped store may occupy and stay cached
GPU_MEMORY_SHARE = 0.9   # share of GPU memory a rank may plan to use
CPU_TILE_BYTES = 384 << 10  # packed pool block per CPU thread (csrc/cpu/kernel_impl.hpp)
STATE_BYTES_PER_SLOT = 48   # (M, k) state and its merge buffers (pyfk.engine.search.check_state_memory)
CPU_HEAP_BYTES_PER_SLOT = 28  # per thread: its heaps and sorted list, per (query, k) slot

# NVIDIA H100 SXM5 80 GB datasheet peaks (dense): FP16/BF16 tensor 989 TFLOP/s, TF32 495,
# FP32 (no tensor cores) 67; HBM3 3.35 TB/s; 132 SMs. Efficiencies are guesses for a fused
# kernel with small K per scale (64-512) and an in-register top-k epilogue (triton: 40% of
# the tensor-core peak, 50% of FP32), and for torch GEMMs on such shapes (cuda: 60%).
H100_ASSUMED = {
    "name": "NVIDIA H100 SXM5 80GB",
    "measured": [],  # "backend/dtype" entries of "tflops" that were measured (gpu_rates_from_bench)
    "source": "ASSUMPTION (no pyfk GPU figure is measured yet): H100 SXM5 datasheet dense peaks (FP16/BF16 "
              "989, TF32 495, FP32 67 TFLOP/s; HBM3 3.35 TB/s) x assumed efficiencies (triton 40% of the "
              "tensor-core peak, 50% of FP32; cuda GEMMs 60%) + modelled HBM traffic",
    "memory_gib": 79.1,        # what torch reports for an H100 80GB
    "sms": 132,
    "hbm_gbps": 0.8 * 3350.0,  # 80% of the datasheet bandwidth reached by streaming kernels (assumed)
    "h2d_gbps": 20.0,          # host -> device copies, pinned, PCIe Gen5 x16 (assumed)
    "tflops": {
        "triton": {"float16": 0.40 * 989, "bfloat16": 0.40 * 989, "tf32": 0.40 * 495, "float32": 0.50 * 67},
        "cuda": {"float16": 0.60 * 989, "bfloat16": 0.60 * 989, "tf32": 0.60 * 495, "float32": 0.60 * 67},
    },
}
RERANK_BYTES = 16  # triton low precision: HBM bytes per (query, candidate, column) of the float32 re-rank
GRAM_BYTES = 24    # cuda: HBM bytes per (query, pool row, scale) for the zz, gg tiles and the running sum


# ----------------------------------------------------------------------------- validation

def _int_arg(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def _widths_arg(widths) -> tuple[int, ...]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) == 0:
        raise ValueError(f"widths: expected a non-empty sequence of positive scale widths, got {widths!r}")
    for w in widths:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
            raise ValueError(f"widths: expected positive integer scale widths, got {list(widths)!r}")
    return tuple(int(w) for w in widths)


def _dtype_arg(dtype) -> str:
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype: expected one of {list(ITEMSIZE)}, got {dtype!r}")
    return dtype


def _positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- the machine

def _cpuinfo() -> dict:
    """model name, cpu family, model, stepping and the relevant flags of the first CPU in /proc/cpuinfo."""
    info = {"model_name": "", "family": "", "model": "", "stepping": "", "flags": []}
    fields = {"model name": "model_name", "cpu family": "family", "model": "model", "stepping": "stepping"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                key = key.strip()
                if not sep:
                    if any(info[v] for v in fields.values()):
                        break  # end of the first CPU's block
                    continue
                if key in fields and not info[fields[key]]:
                    info[fields[key]] = value.strip()
                elif key == "flags" and not info["flags"]:
                    have = set(value.split())
                    info["flags"] = [f for f in _FLAGS if f in have]
    except OSError:
        import platform

        info["model_name"] = platform.processor() or platform.machine()
    return info


@lru_cache(maxsize=1)
def _build_id() -> str:
    """The first 16 hex digits of the compiled pyfk._C's SHA-256 ("none" if not built): a rebuilt
    kernel (same pyfk version, other speed) invalidates cached rates."""
    try:
        spec = importlib.util.find_spec("pyfk._C")
        origin = spec.origin if spec else None
        if not origin or not os.path.isfile(origin):
            return "none"
        h = hashlib.sha256()
        with open(origin, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:16]
    except (ImportError, OSError, ValueError):
        return "none"


def _cpu_backend() -> str:
    """The backend the CPU probe times: `cpu` where the extension is built, else `torch`."""
    return "cpu" if _cpu.IMPORT_ERROR is None else "torch"


def _threads_arg(threads) -> int:
    return torch.get_num_threads() if threads is None else _int_arg("threads", threads)


def cache_key(threads: int | None = None) -> dict:
    """What cached rates must match to be reused on this machine."""
    info = _cpuinfo()
    backend = _cpu_backend()
    return {"device": "cpu", "cpu": info["model_name"], "cpu_family": info["family"], "cpu_model": info["model"],
            "cpu_stepping": info["stepping"], "flags": info["flags"], "threads": _threads_arg(threads),
            "pyfk": __version__, "build": _build_id(), "backend": backend,
            "isa": _cpu.isa() if backend == "cpu" else "none", "probe": PROBE_VERSION}


def _ram_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------- rates

@dataclasses.dataclass
class Rates:
    """Measured CPU rates of one backend with one thread count.

    gflops[dtype]: the marginal top-k rate (GFLOP/s of 4 * sum(L) * M * N work);
    pack_ns[dtype]: ns per pool value (row x D) per call, every thread together (0 when
    only one shape was timed); probe: the shapes and times behind them."""

    backend: str
    threads: int
    gflops: dict
    pack_ns: dict
    key: dict
    source: str = "measured"
    date: str = ""
    probe: dict = dataclasses.field(default_factory=dict)

    def rate(self, dtype: str) -> tuple[float, float, str | None]:
        """(GFLOP/s, ns per pool value, note) for a pool of `dtype`; dtypes the probe did not
        time take the float32 figures, with a note saying so."""
        if dtype in self.gflops:
            return self.gflops[dtype], self.pack_ns.get(dtype, 0.0), None
        base = "float32" if "float32" in self.gflops else next(iter(self.gflops))
        return (self.gflops[base], self.pack_ns.get(base, 0.0),
                f"{dtype} pools were not calibrated: the {base} rate is used (a {dtype} pool is converted "
                f"chunk by chunk on the CPU, so this is optimistic)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> Rates:
        """Rates from to_dict()'s output, validated: ValueError on anything else."""
        if not isinstance(d, Mapping):
            raise ValueError("rates: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise ValueError(f"rates: expected the fields {sorted(names)}, got {sorted(d)}")
        if not isinstance(d["backend"], str) or not isinstance(d["source"], str) or not isinstance(d["date"], str):
            raise ValueError("rates: backend, source and date must be strings")
        _int_arg("rates.threads", d["threads"])
        for name, low in (("gflops", 0.0), ("pack_ns", None)):
            table = d[name]
            if not isinstance(table, Mapping) or (name == "gflops" and not table):
                raise ValueError(f"rates.{name}: expected an object of dtype -> number")
            for dt, v in table.items():
                ok = (dt in ITEMSIZE and isinstance(v, (int, float)) and not isinstance(v, bool)
                      and math.isfinite(v) and (v > low if low is not None else v >= 0))
                if not ok:
                    raise ValueError(f"rates.{name}[{dt!r}]: expected a known dtype and a finite "
                                     f"{'positive' if low is not None else 'non-negative'} number, got {v!r}")
        if not isinstance(d["key"], Mapping) or not isinstance(d["probe"], Mapping):
            raise ValueError("rates: key and probe must be objects")
        return cls(backend=d["backend"], threads=int(d["threads"]),
                   gflops={k: float(v) for k, v in d["gflops"].items()},
                   pack_ns={k: float(v) for k, v in d["pack_ns"].items()}, key=dict(d["key"]),
                   source=d["source"], date=d["date"], probe=dict(d["probe"]))

    @classmethod
    def from_bench(cls, result, backend: str | None = None) -> Rates:
        """One-point rates from a CPU `pyfk bench --json` result (a dict or a path): the rate the
        `cpu` backend (or `backend`) reached there, for that run's dtype; pack cost 0."""
        result = _load_bench(result)
        if result["args"].get("device", "cpu") != "cpu":
            raise ValueError("bench: expected a CPU result (args.device 'cpu'); for a GPU result use "
                             "gpu_rates_from_bench")
        row = _bench_row(result, backend or "cpu")
        mach = result.get("machine") or {}
        dtype = result["args"]["dtype"]
        threads = int(row.get("threads") or mach.get("torch_threads") or 1)
        key = {"device": "cpu", "cpu": mach.get("cpu", "?"), "threads": threads, "pyfk": mach.get("pyfk", "?"),
               "backend": row["resolved"], "isa": row.get("isa") or mach.get("isa", "?")}
        a = result["args"]
        return cls(backend=row["resolved"], threads=threads, gflops={dtype: float(row["gflops"])},
                   pack_ns={dtype: 0.0}, key=key, source=f"pyfk bench result of {result.get('date', '?')}",
                   date=str(result.get("date", "")),
                   probe={"M": a["M"], "N": a["N"], "widths": list(a["widths"]), "seconds": row["seconds"]})

    def describe(self) -> str:
        parts = []
        for dt in sorted(self.gflops):
            text = f"{dt} {self.gflops[dt]:.1f} GFLOP/s"
            if self.pack_ns.get(dt):
                text += f" + {self.pack_ns[dt]:.3f} ns per pool value"
            parts.append(text)
        isa = self.key.get("isa")
        return (f"{self.backend} backend" + (f" ({isa})" if isa and isa != "none" else "")
                + f", {self.threads} threads: " + "; ".join(parts) + f" [{self.source}]")


def _probe_n(threads: int) -> int:
    return int(min(_PROBE["n_max"], max(_PROBE["n"], _PROBE["n_per_thread"] * threads)))


@lru_cache(maxsize=2)
def _probe_pool(n: int, widths: tuple, seed: int) -> tuple:
    """Seeded float32 descriptors (z, g) of n rows (cached for the calibration's calls)."""
    rng = np.random.default_rng(seed)
    z = [rng.standard_normal((n, w), dtype=np.float32) for w in widths]
    g = [rng.standard_normal((n, w), dtype=np.float32) for w in widths]
    return z, g


def _run_probe(backend: str, dtype: str, ms: Sequence[int], n: int, widths: tuple, k: int, threads: int,
               repeats: int) -> dict:
    """{m: seconds} of pyfk.topk(m queries, n pool rows of `dtype`) for each m in `ms`: one warm-up
    each, then `repeats` rounds that time every m in turn (interleaved, so a burst of other work
    hits all of them alike), and the fastest round per m (what the machine can do, least disturbed).
    The one timing function of the calibration (tests replace it)."""
    zq, gq = _probe_pool(max(ms), widths, 1)
    zp, gp = _probe_pool(n, widths, 2)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    p = pyfk.Descriptors(z=[a.astype(np_dtype) for a in zp], g=[a.astype(np_dtype) for a in gp])
    queries = {m: pyfk.Descriptors(z=[a[:m].astype(np_dtype) for a in zq], g=[a[:m].astype(np_dtype) for a in gq])
               for m in ms}
    options = {"threads": threads, "split": "pool"} if backend == "cpu" else None
    calls = {m: (lambda q=q: pyfk.topk(q, p, k, backend=backend, options=options, progress=False))
             for m, q in queries.items()}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for call in calls.values():
            call()
        best = {m: math.inf for m in ms}
        for _ in range(repeats):
            for m, call in calls.items():
                best[m] = min(best[m], time_call(call))
    finally:
        torch.set_num_threads(previous)
    return best


def _loadavg() -> float | None:
    """The 1-minute load average (None where unknown)."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def busy(rates: Rates) -> str | None:
    """Why these rates may be too low (the machine was busy when they were measured), or None."""
    load, cpus = rates.probe.get("loadavg_before"), rates.probe.get("cpu_count")
    if isinstance(load, (int, float)) and isinstance(cpus, int) and cpus > 0 and load > BUSY_LOAD * cpus:
        return (f"the calibration ran with a load average of {load:.2f} on {cpus} CPUs: other work shared the "
                "cores, so the rates (and this plan) may be pessimistic; rerun with --recalibrate when it is quiet")
    return None


def _fit(times: Mapping[int, float], n: int, widths: tuple) -> tuple[float, float]:
    """(GFLOP/s, ns per pool value) from the times at two query counts: t = F(m) / R + n * D * c."""
    (m0, t0), (m1, t1) = sorted(times.items())[0], sorted(times.items())[-1]
    f0, f1 = topk_flops(m0, n, widths, "product"), topk_flops(m1, n, widths, "product")
    d = kernel_width(widths, "product")
    per_flop = (t1 - t0) / (f1 - f0) if f1 > f0 else 0.0
    if not per_flop > 0 or per_flop * f0 > t0:  # noise: fall back to one point, no pack term
        return f1 / t1 / 1e9, 0.0
    pack = (t0 - per_flop * f0) / (n * d)
    return 1.0 / per_flop / 1e9, pack * 1e9


def _measure(threads: int) -> Rates:
    backend = _cpu_backend()
    n, widths, k, repeats = _probe_n(threads), tuple(_PROBE["widths"]), _PROBE["k"], _PROBE["repeats"]
    gflops, pack_ns, probe = {}, {}, {"N": n, "widths": list(widths), "k": k, "repeats": repeats, "seconds": {}}
    t_start = datetime.datetime.now(datetime.timezone.utc)
    probe["loadavg_before"] = _loadavg()
    probe["cpu_count"] = os.cpu_count()
    for dtype in _PROBE["dtypes"]:
        ms = tuple(int(m) for m in _PROBE["m"])
        times = {int(m): float(t) for m, t in _run_probe(backend, dtype, ms, n, widths, k, threads, repeats).items()}
        for m, t in times.items():
            if not (math.isfinite(t) and t > 0):
                raise RuntimeError(f"calibrate: the probe returned {t!r} s for M={m}")
        gflops[dtype], pack_ns[dtype] = _fit(times, n, widths)
        probe["seconds"][dtype] = {str(m): t for m, t in times.items()}
    _probe_pool.cache_clear()
    return Rates(backend=backend, threads=threads, gflops=gflops, pack_ns=pack_ns, key=cache_key(threads),
                 source="measured", date=t_start.isoformat(timespec="seconds"), probe=probe)


def cache_path(key: Mapping, root=None) -> Path:
    """The cache file of rates with this key: <cache_dir>/plan/rates-<hash of the key>.json."""
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:16]
    return Path(root if root is not None else cache_dir()) / "plan" / f"rates-{digest}.json"


def _read_cache(path: Path, key: Mapping) -> Rates | None:
    """Rates cached at `path` for exactly `key`, or None (missing, corrupt, foreign, other key)."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _MAX_CACHE_BYTES:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("key") != dict(key):
            return None
        rates = Rates.from_dict(doc.get("rates"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if rates.key != dict(key):
        return None
    rates.source = f"cached {rates.date} at {path}"
    return rates


def _write_cache(path: Path, rates: Rates) -> str | None:
    """Write atomically (temp file in the same folder, then rename); the error text if that failed."""
    doc = {"schema": SCHEMA, "key": rates.key, "rates": rates.to_dict()}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return None


def calibrate(device: str = "cpu", threads: int | None = None, cache_dir=None, force: bool = False) -> Rates:
    """This machine's top-k rates: read from the cache, else measured (a few seconds) and cached.

    device: "cpu" only (GPU rates come from a `pyfk bench --device cuda --json` result through
    gpu_rates_from_bench, else the plan uses the H100_ASSUMED assumption). threads: the kernel's
    thread count (default torch.get_num_threads()). cache_dir: default pyfk.bench.cache_dir()
    ($PYFK_CACHE_DIR, else ~/.cache/pyfk). force: measure even if cached rates exist.
    Rates measured while the machine was busy (load average above BUSY_LOAD per CPU before the
    probe) are returned with a warning but not cached. A cache that cannot be written is
    reported as a warning, never an error.
    """
    if device != "cpu":
        raise ValueError(f"device: calibrate measures the CPU only (got {device!r}); GPU rates come from a "
                         "`pyfk bench --device cuda --json` result (gpu_rates_from_bench), else the plan uses "
                         "the documented H100 assumption")
    key = cache_key(threads)
    path = cache_path(key, cache_dir)
    if not force:
        cached = _read_cache(path, key)
        if cached is not None:
            return cached
    rates = _measure(key["threads"])
    why = busy(rates)
    if why is not None:  # not cached: the next call measures again
        warnings.warn(f"pyfk plan: {why}; not cached", stacklevel=2)
        return rates
    problem = _write_cache(path, rates)
    if problem is not None:
        warnings.warn(f"pyfk plan: could not cache the rates at {path} ({problem})", stacklevel=2)
    return rates


def gpu_rates_from_bench(result, base: Mapping | None = None) -> dict:
    """GPU rates from a `pyfk bench --device cuda --json` result (a dict or a path): every exact
    backend row's measured end-to-end rate for that run's dtype, on top of `base` (default
    H100_ASSUMED: its memory, bandwidth and the other dtypes' assumptions)."""
    result = _load_bench(result)
    if result["args"].get("device") != "cuda":
        raise ValueError("bench: expected a GPU result (args.device 'cuda')")
    out = json.loads(json.dumps(dict(base or H100_ASSUMED)))
    dtype = result["args"]["dtype"]
    gpu = (result.get("machine") or {}).get("gpu") or {}
    got = []
    for row in result["rows"]:
        if row.get("gflops") and row.get("resolved") in ("triton", "cuda", "torch") and row.get("recall") is None:
            opts = row.get("options") or {}
            kind = "tf32" if dtype == "float32" and (opts.get("allow_tf32") or opts.get("gemm") == "tf32") else dtype
            if f"{row['resolved']}/{kind}" not in got:  # the first timed row of each wins
                out["tflops"].setdefault(row["resolved"], {})[kind] = row["gflops"] / 1e3
                got.append(f"{row['resolved']}/{kind}")
    if not got:
        raise ValueError("bench: the result has no timed triton/cuda/torch row")
    out["measured"] = sorted(set(out.get("measured") or []) | set(got))
    out["name"] = gpu.get("name", out.get("name"))
    if gpu.get("memory_gib"):
        out["memory_gib"] = float(gpu["memory_gib"])
    if gpu.get("sms"):
        out["sms"] = int(gpu["sms"])
    a = result["args"]
    out["source"] = (f"measured by pyfk bench on {out['name']} ({result.get('date', '?')}, M={a['M']} N={a['N']}, "
                     f"{', '.join(got)}); other backends and dtypes: "
                     + ("as given" if base is not None else "the H100 assumption"))
    return out


def _load_bench(result) -> dict:
    if isinstance(result, (str, os.PathLike)):
        path = Path(result)
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"bench: cannot read {path} as JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(result, Mapping) or not isinstance(result.get("args"), Mapping) \
            or not isinstance(result.get("rows"), list):
        raise ValueError("bench: expected a `pyfk bench --json` result (an object with 'args' and 'rows')")
    for field in ("M", "N", "widths", "k", "dtype"):
        if field not in result["args"]:
            raise ValueError(f"bench: args.{field} is missing")
    return dict(result)


def _bench_row(result: Mapping, backend: str) -> dict:
    rows = [r for r in result["rows"] if isinstance(r, Mapping) and r.get("seconds")
            and backend in (r.get("backend"), r.get("resolved"))]
    if not rows:
        have = [r.get("backend") for r in result["rows"] if isinstance(r, Mapping)]
        raise ValueError(f"bench: no timed row of backend {backend!r} (rows: {have})")
    row = dict(rows[0])
    row.setdefault("resolved", row.get("backend"))
    if not row.get("gflops"):
        row["gflops"] = topk_flops(result["args"]["M"], result["args"]["N"], result["args"]["widths"],
                                   result["args"].get("combine", "product")) / row["seconds"] / 1e9
    return row


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class Plan:
    """A prediction: inputs, the recommendation and per-rank time, memory and disk (bytes, seconds)."""

    inputs: dict
    backend: str
    precision: str
    sharding: dict
    selection: dict
    memory: dict
    disk: dict
    extraction: dict
    rates: dict
    notes: list

    @property
    def seconds(self) -> float:
        """Predicted selection (top-k) seconds per call and rank: the store warm (in the page cache, or
        resident on the GPU), plus its read from disk where a CPU shard cannot stay cached."""
        return self.selection["seconds"]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def format(self) -> str:
        return format_plan(self)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _gib(b: float) -> str:
    if b >= 1 << 30:
        return f"{b / (1 << 30):,.1f} GiB"
    if b >= 1 << 20:
        return f"{b / (1 << 20):,.1f} MiB"
    return f"{b / 1024:,.1f} KiB"


def _secs(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms"


def store_bytes(n: int, widths: Sequence[int], dtype: str, *, classes: int | None = None,
                with_true: bool = False) -> dict:
    """Bytes of a DescriptorStore of n rows: the descriptor arrays (z_j and g_j per scale, plus g_true_j
    with_true) and, for an extraction store (classes given), probs (float32) and pred/pseudo/labels/ids
    (int64). Each array is one .npy file (128-byte header); the manifest is ~4 KiB."""
    widths = _widths_arg(widths)
    item = ITEMSIZE[_dtype_arg(dtype)]
    per_scale = 3 if with_true else 2
    descriptors = n * per_scale * sum(widths) * item
    files = per_scale * len(widths)
    extra = 0
    if classes is not None:
        extra = n * _int_arg("classes", classes) * 4 + 4 * n * 8
        files += 5
    overhead = 128 * files + 4096
    return {"descriptors": descriptors, "extraction_extra": extra, "overhead": overhead,
            "total": descriptors + extra + overhead}


def plan(n: int, m: int, widths: Sequence[int], k: int = 32, dtype: str = "float16", device: str = "cpu",
         world: int = 1, gpus: int = 0, rates: Rates | None = None, gpu_rates: Mapping | None = None, *,
         combine: str = "product", threads: int | None = None, classes: int | None = None,
         extract_rate: float | None = None, ram_bytes: int | None = None, disk_gbps: float = DISK_GBPS,
         cache_dir=None) -> Plan:
    """Predict one top-k call of m queries against an n-row pool (scale widths L_j, k neighbours,
    pool stored as `dtype`) on `world` ranks, and recommend backend, precision and sharding.

    device: "cpu", "cuda" or "auto" (cuda when gpus > 0). gpus: GPUs in all (one rank per GPU;
    with device "cuda" it defaults to world, and world to it). rates: CPU rates (default
    calibrate(threads=threads, cache_dir=cache_dir): measured once, cached). gpu_rates: a dict
    like H100_ASSUMED or from gpu_rates_from_bench (default H100_ASSUMED). classes: the model's
    classes (extraction store size). extract_rate: measured extraction images/s per rank.
    ram_bytes: RAM per CPU rank (default this machine's). disk_gbps: store read rate when it
    is not in the page cache (assumption). Bad inputs raise ValueError naming the argument.
    """
    n, m, k = _int_arg("n", n), _int_arg("m", m), _int_arg("k", k)
    widths = _widths_arg(widths)
    dtype = _dtype_arg(dtype)
    world, gpus = _int_arg("world", world), _int_arg("gpus", gpus, low=0)
    if combine not in COMBINES:
        raise ValueError(f"combine: expected one of {list(COMBINES)}, got {combine!r}")
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {list(DEVICES)}, got {device!r}")
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cpu" and gpus:
        raise ValueError(f"gpus: {gpus} GPUs given with device='cpu' (use device='cuda' or 'auto')")
    if device == "cuda":
        if gpus == 0:
            gpus = world
        elif world == 1:
            world = gpus
        if gpus != world:
            raise ValueError(f"world: expected one rank per GPU (world == gpus), got world={world}, gpus={gpus}")
    if world > n:
        raise ValueError(f"world: expected at most n={n} ranks (each holds at least one pool row), got {world}")
    if k > n:
        raise ValueError(f"k: expected 1 <= k <= n={n}, got {k}")
    disk_gbps = _positive_number("disk_gbps", disk_gbps)
    if extract_rate is not None:
        extract_rate = _positive_number("extract_rate", extract_rate)
    if classes is not None:
        classes = _int_arg("classes", classes)
    if ram_bytes is not None:
        ram_bytes = _int_arg("ram_bytes", ram_bytes)

    n_rank = _ceil_div(n, world)
    d = kernel_width(widths, combine)           # columns the kernels read per row
    d_store = 2 * sum(widths)                   # columns a store holds per row (z and g)
    item = ITEMSIZE[dtype]
    flops = topk_flops(m, n, widths, combine)
    flops_rank = topk_flops(m, n_rank, widths, combine)
    inputs = {"n": n, "m": m, "widths": list(widths), "k": k, "dtype": dtype, "device": device, "world": world,
              "gpus": gpus, "combine": combine, "classes": classes, "extract_rate": extract_rate,
              "disk_gbps": disk_gbps}
    notes: list[str] = []
    pool_store = store_bytes(n, widths, dtype)
    store = store_bytes(n, widths, dtype, classes=classes)
    shard_read = n_rank * d * item              # bytes of its shard a rank's kernel reads per call
    shard_store = n_rank * d_store * item
    disk = {"store_bytes": pool_store["total"],
            "extraction_store_bytes": store["total"], "per_rank_bytes": _ceil_div(store["total"], world),
            "classes": classes}
    if classes is None:
        notes.append(f"extraction store: without classes, probs (N x classes float32: 4,000 B per row for 1,000 "
                     f"classes, against {d_store * item:,} B of descriptors) and 4 int64 columns are not counted")
    merge_keys = world * m * k
    merge_s = 0.0 if world == 1 else (merge_keys * 8 / (NET_GBPS[device] * 1e9) + merge_keys / MERGE_KEYS_PER_S[device])
    mn_matrix = m * n * 4

    if device == "cpu":
        if rates is None:
            rates = calibrate("cpu", threads=threads, cache_dir=cache_dir)
        if threads is not None and int(threads) != rates.threads:
            notes.append(f"threads={threads} asked, rates measured with {rates.threads}: used as measured")
        gflops, pack_ns, note = rates.rate(dtype)
        if note:
            notes.append(note)
        if busy(rates):
            notes.append(busy(rates))
        probed = rates.probe.get("widths")
        if isinstance(probed, list) and probed and min(widths) < min(probed):
            notes.append(f"the rates were measured at widths {'/'.join(map(str, probed))}: narrower scales run "
                         "below that rate per flop (RESULTS.md: 16/16 reached ~65% of the 64-512 rate), so this "
                         "time is optimistic")
        compute_s = flops_rank / (gflops * 1e9)
        pack_s = n_rank * d * pack_ns * 1e-9
        warm = compute_s + pack_s + merge_s
        ram = ram_bytes or _ram_bytes()
        fits = ram is None or shard_store <= PAGE_CACHE_SHARE * ram
        read_s = shard_read / (disk_gbps * 1e9)
        backend = rates.backend
        threads_used = rates.threads
        panel = 8  # queries are packed in panels of MR rows (6-14 by ISA): round up generously
        anon = {"queries_normalised": m * d * 4, "queries_packed": _ceil_div(m, panel) * panel * d * 4,
                "topk_state": STATE_BYTES_PER_SLOT * m * k,
                "thread_tiles": threads_used * CPU_TILE_BYTES,
                "thread_heaps": threads_used * CPU_HEAP_BYTES_PER_SLOT * m * k if threads_used > 1 else 0,
                "rank_merge": 2 * merge_keys * 8 if world > 1 else 0}
        memory = {"pool_shard_mapped_bytes": shard_read, "pool_shard_store_bytes": shard_store,
                  "anonymous_bytes": sum(anon.values()), "anonymous": anon, "ram_bytes": ram,
                  "shard_fits_page_cache": fits, "mn_matrix_bytes_not_built": mn_matrix,
                  "mn_matrix_bytes_per_rank_not_built": m * n_rank * 4}
        selection = {"seconds": warm, "seconds_cold": warm + read_s, "compute_s": compute_s, "pack_s": pack_s,
                     "merge_s": merge_s, "read_s_if_cold": read_s, "flops": flops, "flops_per_rank": flops_rank,
                     "rate_gflops": gflops, "pack_ns_per_value": pack_ns,
                     "calls_per_rank": _ceil_div(n_rank, _cpu.chunk_rows(m, d))}
        if not fits:
            selection["seconds"] = warm + read_s
            notes.append(f"the shard ({_gib(shard_store)}) exceeds {PAGE_CACHE_SHARE:.0%} of RAM "
                         f"({_gib(ram)}): every call reads it from disk (+{_secs(read_s)} at an assumed "
                         f"{disk_gbps:g} GB/s)")
        need = _ceil_div(n * d_store * item, int(PAGE_CACHE_SHARE * ram)) if ram else 1
        precision = ("float16 store (half the disk, page cache and read of float32; F16C converts rows while "
                     "packing), float32 arithmetic and accumulation, float32 scores")
        if dtype == "float16" and "float32" in rates.gflops and "float16" in rates.gflops:
            precision += f"; fp16 measured at {rates.gflops['float16'] / rates.gflops['float32']:.0%} of the fp32 rate"
        if dtype != "float16":
            precision = f"{dtype} store as asked; recommended: " + precision
        rates_info = {**rates.to_dict(), "kind": "cpu", "measured": True, "description": rates.describe()}
        if world > 1:
            notes.append("world > 1 on the CPU: each rank is assumed to run on a machine like this one "
                         f"({threads_used} threads); ranks sharing one machine share its cores")
        sharding = {"world": world, "rows_per_rank": n_rank, "shard_bytes": shard_store,
                    "fits": fits, "min_world_to_fit": max(1, need),
                    "advice": (f"{world} shard(s) of {n_rank:,} rows ({_gib(shard_store)} each)"
                               + ("; each fits in the page cache after the first read" if fits else
                                  f"; does not fit in the page cache: use world >= {need} to keep shards cached"))}
    else:
        g = dict(gpu_rates or H100_ASSUMED)
        low = dtype in ("float16", "bfloat16")
        if k <= _triton.MAX_K:
            backend = "triton"
        elif k <= _cuda.MAX_K:
            backend = "cuda"
            notes.append(f"k={k} > {_triton.MAX_K}: the triton kernel would fall back to torch; cuda selects "
                         f"up to k={_cuda.MAX_K}")
        else:
            backend = "torch"
            notes.append(f"k={k} > {_cuda.MAX_K}: only the torch reference handles it")
        gemm = dtype if low else "float32"
        table = g["tflops"].get(backend) or g["tflops"].get("cuda") or {}
        tflops = table.get(gemm) or table.get("float32")
        if not tflops:
            raise ValueError(f"gpu_rates: no TFLOP/s for backend {backend!r} and dtype {gemm!r}")
        # a measured end-to-end rate already holds the re-rank and memory traffic
        measured = f"{backend}/{gemm}" in (g.get("measured") or [])
        compute_s = flops_rank / (tflops * 1e12)
        hbm = float(g["hbm_gbps"]) * 1e9
        chunk = (_triton.chunk_rows(m, d) if backend == "triton" else _cuda.chunk_rows(m, d))
        calls = _ceil_div(n_rank, chunk)
        k_pad = max(16, 1 << max(0, (2 * k if low else k) - 1).bit_length())
        extra_s, extra = 0.0, {}
        if not measured and backend == "triton" and low:
            extra["rerank_s"] = calls * m * k_pad * d * RERANK_BYTES / hbm
            notes.append(f"triton {dtype}: the {k_pad} low-precision candidates per query are re-ranked in "
                         f"float32 once per pool chunk ({calls} chunks of {chunk:,} rows): "
                         f"~{_secs(extra['rerank_s'])} of gathered-row traffic (modelled at {RERANK_BYTES} B per "
                         "query x candidate x column); fewer, larger chunks or one re-rank at the end would cut it")
        if not measured and backend == "cuda":
            pairs = len(widths) if combine == "product" else 1
            extra["gram_traffic_s"] = m * n_rank * (GRAM_BYTES * pairs + 4) / hbm
        extra_s = sum(extra.values())
        warm = compute_s + extra_s + merge_s
        h2d = float(g.get("h2d_gbps", 20.0)) * 1e9
        load_warm = shard_store / h2d
        load_cold = shard_store / min(h2d, disk_gbps * 1e9)
        bm = 64 if k_pad <= 32 else max(16, 2048 // k_pad)
        splits = max(1, _ceil_div(2 * int(g.get("sms", 132)), _ceil_div(m, bm)))
        dev = {"pool_shard_resident": shard_store,
               "queries": m * d * (4 + (2 if low else 0)),
               "topk_state": STATE_BYTES_PER_SLOT * m * k}
        if backend == "triton":
            dev["chunk_normalised"] = 2 * chunk * d * 4 + (chunk * d * 2 if low else 0)
            dev["kernel_keys"] = m * splits * k_pad * 8
            dev["rerank_temporaries"] = 3 * (1 << 24) * 4 if low else 0
        else:
            dev["chunk_normalised"] = 2 * chunk * d * 4
            dev["score_tiles"] = 3 * m * _cuda.tile_columns(m, k) * 4
        total = sum(dev.values())
        cap = float(g["memory_gib"]) * (1 << 30)
        fits = total <= GPU_MEMORY_SHARE * cap
        fixed = total - shard_store
        per_gpu_room = GPU_MEMORY_SHARE * cap - fixed
        need = _ceil_div(n * d_store * item, int(per_gpu_room)) if per_gpu_room > 0 else None
        memory = {"gpu_bytes": total, "gpu": dev, "gpu_capacity_bytes": cap, "fits_gpu": fits,
                  "host_staging_bytes": shard_store, "mn_matrix_bytes_not_built": mn_matrix,
                  "mn_matrix_bytes_per_rank_not_built": m * n_rank * 4}
        selection = {"seconds": warm, "compute_s": compute_s, **extra, "merge_s": merge_s,
                     "load_s_page_cache": load_warm, "load_s_cold": load_cold, "flops": flops,
                     "flops_per_rank": flops_rank, "rate_tflops": tflops, "calls_per_rank": calls}
        if not fits:
            notes.append(f"a rank needs ~{_gib(total)} of GPU memory, more than {GPU_MEMORY_SHARE:.0%} of "
                         f"{_gib(cap)}" + (f": use at least {need} GPUs" if need else ": reduce M"))
        if low:
            precision = f"{dtype} pool on the GPU (tensor cores), float32 accumulation and scores"
            precision += ("; triton re-ranks its 2k best candidates in float32 (exact unless more than k items "
                          "lie within the half-precision rounding of the k-th score)" if backend == "triton" else
                          "; the selection itself is exact" if backend == "cuda" else "")
        else:
            precision = ("float32 (exact IEEE dots; allow_tf32=True is ~"
                         f"{table.get('tf32', tflops) / tflops:.0f}x faster but rounds to TF32); recommended: "
                         "a float16 or bfloat16 store")
        rates_info = {**g, "kind": "gpu", "measured": measured, "description": g.get("source", "")}
        if not measured:
            notes.insert(0, f"the {backend} {gemm} GPU rate is an ASSUMPTION, not a measurement (see rates); "
                            "replace it with `pyfk bench --device cuda --json` via --rates-json")
        sharding = {"world": world, "rows_per_rank": n_rank, "shard_bytes": shard_store, "fits": fits,
                    "min_world_to_fit": need,
                    "advice": (f"{world} rank(s), one per GPU, each with {n_rank:,} rows ({_gib(shard_store)} "
                               f"resident); loading a shard takes ~{_secs(load_warm)} from the page cache, "
                               f"~{_secs(load_cold)} cold (assumed {disk_gbps:g} GB/s disk), once per round")}

    if n - 1 > MAX_INDEX:
        notes.append(f"n={n:,}: global indices beyond {MAX_INDEX:,} do not fit the packed (score, index) keys")
    extraction = {"store_bytes": store["total"], "per_rank_bytes": disk["per_rank_bytes"],
                  "images_per_s_per_rank": extract_rate,
                  "seconds": None if extract_rate is None else n_rank / extract_rate,
                  "note": ("from the given rate" if extract_rate is not None else
                           "time not predicted: measure the model with `pyfk bench-extract --json` and pass its "
                           "rate (images/s per rank)")}
    return Plan(inputs=inputs, backend=backend, precision=precision, sharding=sharding, selection=selection,
                memory=memory, disk=disk, extraction=extraction, rates=rates_info, notes=notes)


# ----------------------------------------------------------------------------- report

def format_plan(p: Plan) -> str:
    """A plain-text report of a Plan."""
    i, s, mem = p.inputs, p.selection, p.memory
    widths = "/".join(map(str, i["widths"]))
    where = (f"{i['world']} GPU rank(s)" if i["device"] == "cuda" else f"{i['world']} CPU rank(s)")
    lines = [f"pyfk {__version__} plan: N={i['n']:,} pool rows x M={i['m']:,} queries, widths {widths} "
             f"(D={kernel_width(i['widths'], i['combine']):,}), k={i['k']}, {i['dtype']}, {i['combine']}, {where}",
             f"rates: {p.rates.get('description', '')}", ""]
    rows = [("", "per rank", "note")]
    rows.append(("backend", p.backend, "recommended"))
    if i["device"] == "cpu":
        rows += [("work", f"{s['flops_per_rank'] / 1e12:,.3f} TFLOP", f"4*sum(L)*M*N/world; {s['flops'] / 1e12:,.3f} "
                                                                      "TFLOP in all"),
                 ("selection time", _secs(s["seconds"]),
                  f"{s['rate_gflops']:.1f} GFLOP/s: {_secs(s['compute_s'])} compute + {_secs(s['pack_s'])} "
                  f"pool packing" + (f" + {_secs(s['merge_s'])} rank merge" if s["merge_s"] else "")),
                 ("  cold store", _secs(s["seconds_cold"]), f"+ reading the shard at {i['disk_gbps']:g} GB/s "
                                                            "(assumed)"),
                 ("pool shard (mapped)", _gib(mem["pool_shard_mapped_bytes"]),
                  "page cache, file-backed: " + ("fits" if mem["shard_fits_page_cache"] else "does NOT fit")
                  + (f" in {_gib(mem['ram_bytes'])} RAM" if mem.get("ram_bytes") else "")),
                 ("memory beyond it", _gib(mem["anonymous_bytes"]), "queries, packed panels, (M, k) state, "
                                                                   "per-thread tiles and heaps")]
    else:
        tag = "" if p.rates.get("measured") else " (ASSUMED)"
        extra = "".join(f" + {_secs(s[key])} {label}" for key, label in
                        (("rerank_s", "fp32 re-rank"), ("gram_traffic_s", "Gram tiles in HBM"),
                         ("merge_s", "rank merge")) if s.get(key))
        rows += [("work", f"{s['flops_per_rank'] / 1e12:,.1f} TFLOP", f"{s['flops'] / 1e12:,.1f} TFLOP in all"),
                 ("selection time" + tag, _secs(s["seconds"]),
                  f"{s['rate_tflops']:.0f} TFLOP/s: {_secs(s['compute_s'])} kernel{extra}"),
                 ("pool load", _secs(s["load_s_page_cache"]), f"host -> GPU; {_secs(s['load_s_cold'])} from a "
                                                              "cold disk; once per round"),
                 ("GPU memory", _gib(mem["gpu_bytes"]), ("fits" if mem["fits_gpu"] else "does NOT fit")
                  + f" in {_gib(mem['gpu_capacity_bytes'])}; pool shard {_gib(mem['gpu']['pool_shard_resident'])}")]
    rows += [("M x N matrix", _gib(mem["mn_matrix_bytes_per_rank_not_built"]),
              f"NOT built (shown for contrast; {_gib(mem['mn_matrix_bytes_not_built'])} in all)"),
             ("disk: pool store", _gib(p.disk["store_bytes"] / i["world"]),
              f"{_gib(p.disk['store_bytes'])} in all: z_j, g_j as {i['dtype']}"),
             ("disk: extraction store", _gib(p.disk["per_rank_bytes"]),
              f"{_gib(p.disk['extraction_store_bytes'])} in all"
              + (f" with probs of {i['classes']} classes" if i["classes"] else " (without probs: classes unknown)")),
             ("extraction time", "-" if p.extraction["seconds"] is None else _secs(p.extraction["seconds"]),
              p.extraction["note"] if p.extraction["seconds"] is None
              else f"at {p.extraction['images_per_s_per_rank']:g} images/s per rank")]
    lines += text_table(rows, left=3)
    lines += ["", f"precision: {p.precision}", f"sharding: {p.sharding['advice']}"]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- check against a run

def check_against(bench, rates: Rates | None = None, *, gpu_rates: Mapping | None = None, cache_dir=None,
                  tolerance: float = TOLERANCE, backend: str | None = None, force: bool = False) -> dict:
    """Predict the run recorded in a `pyfk bench --json` result (a dict or a path) and compare:
    {"predicted_s", "measured_s", "ratio" (predicted / measured), "within" (|ratio - 1| <= tolerance),
    "backend", "plan", "notes"}. CPU rates default to calibrate() with the run's thread count."""
    result = _load_bench(bench)
    a = result["args"]
    device = a.get("device", "cpu")
    backend = backend or ("cpu" if device == "cpu" else "triton")
    row = _bench_row(result, backend)
    notes = []
    if device == "cpu" and rates is None:
        rates = calibrate("cpu", threads=row.get("threads"), cache_dir=cache_dir, force=force)
    if device == "cpu":
        mach = result.get("machine") or {}
        if mach.get("cpu") and mach["cpu"] != rates.key.get("cpu"):
            notes.append(f"the run's CPU ({mach['cpu']}) is not the calibrated one ({rates.key.get('cpu')})")
        if row.get("isa") and rates.key.get("isa") not in (None, "?", row["isa"]):
            notes.append(f"the run used isa {row['isa']}, the rates {rates.key.get('isa')}")
        if row.get("threads") and int(row["threads"]) != rates.threads:
            notes.append(f"the run used {row['threads']} threads, the rates {rates.threads}")
    if row.get("scaled"):
        notes.append(f"the measured time was scaled from M={row.get('measured_m')} (bench --budget)")
    p = plan(a["N"], a["M"], a["widths"], k=a["k"], dtype=a["dtype"], device=device,
             gpus=1 if device == "cuda" else 0, rates=rates, gpu_rates=gpu_rates,
             combine=a.get("combine", "product"))
    predicted, measured = p.seconds, float(row["seconds"])
    ratio = predicted / measured
    return {"predicted_s": predicted, "measured_s": measured, "ratio": ratio,
            "within": abs(ratio - 1.0) <= tolerance, "tolerance": tolerance, "backend": row["resolved"],
            "measured_gflops": float(row["gflops"]), "predicted_gflops": p.selection["flops"] / predicted / 1e9,
            "bench_date": result.get("date"), "args": {k: a[k] for k in ("M", "N", "widths", "k", "dtype")},
            "rates": p.rates.get("description"), "plan": p.to_dict(),
            "notes": notes + [n for n in p.notes if not n.startswith("extraction store")]}


def format_check(res: Mapping) -> str:
    a = res["args"]
    lines = [f"pyfk plan check: M={a['M']:,} N={a['N']:,} widths {'/'.join(map(str, a['widths']))} k={a['k']} "
             f"{a['dtype']}, backend {res['backend']}, run of {res.get('bench_date')}",
             f"rates: {res['rates']}",
             f"predicted {res['predicted_s']:.2f} s ({res['predicted_gflops']:.1f} GFLOP/s), measured "
             f"{res['measured_s']:.2f} s ({res['measured_gflops']:.1f} GFLOP/s): ratio {res['ratio']:.2f} -> "
             + ("within" if res["within"] else "OUTSIDE") + f" +-{res['tolerance']:.0%}"]
    lines += [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def widths_arg(text: str) -> list[int]:
    """argparse type of `--widths` (`pyfk plan`, `pyfk bench`): comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _count(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", "").replace(",", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def _rate_arg(text: str) -> float:
    """A number of images/s, or a `pyfk bench-extract --json` file (its extract row's images/s)."""
    try:
        value = float(text)
    except ValueError:
        try:
            doc = json.loads(Path(text).read_text(encoding="utf-8"))
            value = float(next(r["images_per_s"] for r in doc["rows"] if r.get("method") == "extract"))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, StopIteration):
            raise argparse.ArgumentTypeError(f"expected images/s or a `pyfk bench-extract --json` file, "
                                             f"got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive rate, got {text!r}")
    return value


_CLI_DEFAULTS = {"M": 1000, "widths": [64, 128, 256, 512], "k": 32, "dtype": "float16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `pyfk plan` flags (also `python -m pyfk.plan`)."""
    p.add_argument("--N", type=_count(1), default=None, help="pool rows (required unless --preset/--check-json)")
    p.add_argument("--M", type=_count(1), default=None, help="queries, e.g. misclassified validation examples "
                                                            f"(default {_CLI_DEFAULTS['M']})")
    p.add_argument("--widths", type=widths_arg, default=None,
                   help=f"comma-separated scale widths L_j (default {','.join(map(str, _CLI_DEFAULTS['widths']))})")
    p.add_argument("--k", type=_count(1), default=None, help=f"neighbours per query (default {_CLI_DEFAULTS['k']})")
    p.add_argument("--dtype", choices=tuple(ITEMSIZE), default=None,
                   help=f"store dtype (default {_CLI_DEFAULTS['dtype']})")
    p.add_argument("--combine", choices=COMBINES, default="product", help="similarity (default product)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="cpu, cuda, or auto (default: cuda when --gpus > 0, else cpu)")
    p.add_argument("--world", type=_count(1), default=1, help="ranks (shards); default 1 (with --gpus: one per GPU)")
    p.add_argument("--gpus", type=_count(0), default=0, help="GPUs in all, one rank each (default 0)")
    p.add_argument("--threads", type=_count(1), default=None,
                   help="CPU threads per rank for the calibration (default torch.get_num_threads())")
    p.add_argument("--classes", type=_count(1), default=None, help="model classes: adds probs to the extraction store")
    p.add_argument("--extract-rate", type=_rate_arg, default=None, metavar="IMG_PER_S|BENCH_EXTRACT_JSON",
                   help="measured extraction images/s per rank (a number or a `pyfk bench-extract --json` file)")
    p.add_argument("--disk-gbps", type=float, default=DISK_GBPS,
                   help=f"store read rate when not in the page cache, GB/s (assumed; default {DISK_GBPS:g})")
    p.add_argument("--rates-json", type=Path, default=None, metavar="BENCH_JSON",
                   help="take the rates from a `pyfk bench --json` result instead of calibrating (a --device cuda "
                        "result replaces the H100 assumption)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="start from the shape of `pyfk bench --preset` (imagenet: N=1,281,167 M=1000 widths "
                        "64,128,256,512 k=32 float16); --N/--M/--widths/--k/--dtype given explicitly win")
    p.add_argument("--check-json", type=Path, default=None, metavar="BENCH_JSON",
                   help="predict the run recorded in a `pyfk bench --json` result and print predicted vs measured "
                        "(exit 1 when outside +-30%%)")
    p.add_argument("--recalibrate", action="store_true", help="measure the rates again even if cached")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the rates are cached (default $PYFK_CACHE_DIR, else ~/.cache/pyfk; under plan/)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the plan (or check) as JSON to PATH ('-': print only the JSON)")


def _emit(args, text: str, doc: dict) -> None:
    if args.json == "-":
        print(json.dumps(doc, indent=2))
        return
    print(text)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {path}")


def command(args: argparse.Namespace) -> int:
    """Run `pyfk plan` from parsed arguments; 0 on success, 1 for a check outside the tolerance,
    2 for a bad input (one line on stderr; PYFK_DEBUG=1 for the traceback)."""
    try:
        rates, gpu_rates = None, None
        if args.rates_json is not None:
            doc = _load_bench(args.rates_json)
            if doc["args"].get("device", "cpu") == "cuda":
                gpu_rates = gpu_rates_from_bench(doc)
            else:
                rates = Rates.from_bench(doc)
        if args.check_json is not None:
            res = check_against(args.check_json, rates, gpu_rates=gpu_rates, cache_dir=args.cache_dir,
                                force=args.recalibrate)
            _emit(args, format_check(res), res)
            return 0 if res["within"] else 1
        base = dict(_CLI_DEFAULTS, **(PRESETS[args.preset] if args.preset else {}))
        n = args.N if args.N is not None else base.get("N")
        m = args.M if args.M is not None else base["M"]
        widths = args.widths if args.widths is not None else base["widths"]
        k = args.k if args.k is not None else base["k"]
        dtype = args.dtype if args.dtype is not None else base["dtype"]
        if n is None:
            raise ValueError("--N: the pool size is required (or --preset, --check-json)")
        device = args.device
        if device == "auto":
            device = "cuda" if args.gpus else "cpu"
        if device == "cpu" and rates is None:
            rates = calibrate("cpu", threads=args.threads, cache_dir=args.cache_dir, force=args.recalibrate)
        p = plan(n, m, widths, k=k, dtype=dtype, device=device, world=args.world, gpus=args.gpus, rates=rates,
                 gpu_rates=gpu_rates, combine=args.combine, threads=args.threads, classes=args.classes,
                 extract_rate=args.extract_rate, disk_gbps=args.disk_gbps)
    except (ValueError, RuntimeError) as exc:
        if os.environ.get("PYFK_DEBUG"):
            raise
        print(f"pyfk plan: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    _emit(args, p.format(), p.to_dict())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyfk.plan",
        description="Predict time, memory and disk of a PFK top-k selection (and its extraction store) from "
                    "rates measured on this machine (a few seconds, cached), and recommend backend, precision "
                    "and sharding; --check-json compares a prediction with a `pyfk bench --json` run.")
    add_arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
