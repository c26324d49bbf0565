#!/usr/bin/env python
"""Compile-time facts of the Triton kernel for Hopper (sm_90), without a GPU (issue #12, item 3).

    python benchmarks/compile_report.py [--json PATH] [--config NAME ...] [--list]
    python benchmarks/gpu_suite.py --compile-report [--json PATH]

Compiles `_fk_topk_kernel` (pyfk/engine/kernels/triton.py) for its production
configurations with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`
(32 = the warp size) -- no driver, no device -- and reports per configuration:

  * the configuration: combine (PRODUCT), dtype and input_precision, BLOCK_M, BLOCK_N,
    BLOCK_K, K_PAD, TILE_R, num_warps, num_stages;
  * registers per thread, spill stores / loads, stack frame and local bytes, shared
    memory, barriers: the log of the ptxas run that made the cubin (triton's own,
    TRITON_DUMP_PTXAS_LOG=1; re-run with `ptxas -v` on the PTX if that log is missing),
    cross-checked with `cuobjdump -res-usage` on the cubin;
  * the MMA kind: "wgmma" (PTX has wgmma.mma_async), "mma.sync", else "none/fma";
  * global loads: vector (ld.global.v2/v4/v8) vs scalar counts, the element widths
    (scalar 16-bit loads -- ld.global.b16 -- are the v1 kernel's known defect), async
    copies (cp.async) and TMA (cp.async.bulk.tensor), and the SASS LDG/LDGSTS/UTMALDG mix;
  * static instruction counts: PTX and SASS (cuobjdump -sass, else nvdisasm; null when
    neither is found), with the sort/merge-related ones (shuffles, 64-bit selects and
    compares, barriers);
  * compile time (triton.compile, seconds), the triton version, the target, the error.

Where the configuration comes from: not replicated. For each (combine, dtype, k,
allow_tf32) the report calls pyfk's own `topk_update` on "meta" tensors (no data, no
device) with `_kernel()` swapped for a recorder, so the launch arguments, the
constexprs (BLOCK_M, K_PAD, ... as `kernel_keys` picks them, K_PAD from 2k for
float16/bfloat16, the kernel's re-rank margin) and num_warps are exactly what
production launches; triton's own binder (`create_function_from_signature` /
`JITFunction._pack_args`) then derives the signature, the integer specialisations and
the 16-byte divisibility hints from those arguments, as a launch on a GPU would. The
problem is the GPU suite's ImageNet-scale timing case: M = 50,000 queries, scale
widths 64/128/256/512 (D = 1920 columns, product), a pool chunk of `chunk_rows` rows
(the second chunk: index_offset = its row count). On meta tensors `_default_splits`
returns 1 split, which is also what it picks at this M on an H100 (132 SMs:
ceil(264 / 1563 query blocks) = 1), so n_splits is specialised to 1 as there.

Each configuration compiles in its own subprocess with TRITON_INTERPRET unset and a
fresh TRITON_CACHE_DIR (so the compile time is a real compile, and a test process
running the interpreter is not disturbed). stdout: one JSON record per configuration,
as each finishes; --json PATH: the whole report, rewritten after every configuration
(a kill loses nothing). Exit status 1 if any configuration failed (the others still run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyfk.bench import write_json

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"merge": "pyfk.engine.kernels.triton._fk_topk_kernel",  # v1
           "filter": "pyfk.engine.kernels._triton_filter._filter_kernel"}  # v2
KERNEL = KERNELS["filter"]
SUITE_N = 1_281_167  # the suite's ImageNet-scale pool (v2 launches over the whole pool)
CAPABILITY = 90  # Hopper
WARP_SIZE = 32
SUITE_WIDTHS = (64, 128, 256, 512)  # benchmarks/gpu_suite.py WIDTHS
SUITE_M = 50_000  # the suite's ImageNet-scale query count
CHILD_TIMEOUT_S = 300
MMA_KINDS = ("wgmma", "mma.sync", "none/fma")


@dataclass(frozen=True)
class ReportConfig:
    """One configuration to compile: what a caller of pyfk.topk chooses. kernel "filter" (v2):
    the launch `_triton_filter.launch` makes with `_triton_filter.Config(**tuning)` (block_m,
    block_n, group_m, num_warps, num_stages), mode "filter" (the pool pass) or "dense" (the
    sample pass); k does not reach the v2 kernel. kernel "merge" (v1): the tile sizes follow
    through pyfk's own launcher (`topk_update`); `tuning` passes its tuning keywords (block_m,
    block_k, tile_r, num_warps) to override them."""

    name: str
    combine: str = "product"  # "product" (PRODUCT=True) or "sum" / "features" (one dot product)
    dtype: str = "bfloat16"  # float32, float16, bfloat16
    k: int = 32
    allow_tf32: bool = False
    tuning: dict = field(default_factory=dict)
    widths: tuple = SUITE_WIDTHS
    m: int = SUITE_M
    kernel: str = "merge"
    mode: str = "filter"


def production_configs() -> list[ReportConfig]:
    """The configurations production launches (pyfk's defaults). v2 ("filter-*"): the pool pass
    in float16 (the default buffer), bfloat16, float32 (on TF32 tensor cores), combine="sum", and
    the dense sample pass. v1 ("product-*", "sum-*"): k = 32 (the suite's k), k = 64 (K_PAD 128 at
    low precision) and k = 128 (the kernel's largest), plus one small k (TILE_R = 2).
    About 5-25 s each here."""
    return [
        ReportConfig("filter-product-fp16", "product", "float16", 32, kernel="filter"),
        ReportConfig("filter-product-bf16", "product", "bfloat16", 32, kernel="filter"),
        ReportConfig("filter-product-fp32", "product", "float32", 32, allow_tf32=True, kernel="filter"),
        ReportConfig("filter-sum-fp16", "sum", "float16", 32, kernel="filter"),
        ReportConfig("filter-dense-product-fp16", "product", "float16", 32, kernel="filter", mode="dense"),
        ReportConfig("product-bf16-k32", "product", "bfloat16", 32),
        ReportConfig("product-fp16-k32", "product", "float16", 32),
        ReportConfig("product-fp32-ieee-k32", "product", "float32", 32),
        ReportConfig("product-fp32-tf32-k32", "product", "float32", 32, allow_tf32=True),
        ReportConfig("sum-bf16-k32", "sum", "bfloat16", 32),
        ReportConfig("product-bf16-k64", "product", "bfloat16", 64),
        ReportConfig("product-bf16-k128", "product", "bfloat16", 128),
        ReportConfig("product-fp32-ieee-k128", "product", "float32", 128),
        ReportConfig("product-bf16-k8", "product", "bfloat16", 8),
    ]


def main_config() -> ReportConfig:
    """The configuration the CI assertion checks (wgmma, no spills, vectorised async loads): the
    v2 pool pass on the GPU suite's timing case -- combine="product", the float16 buffer."""
    return production_configs()[0]


def small_config() -> ReportConfig:
    """A quick configuration for tests (~1-2 s of compile): one dot product, float16, k = 8 (K_PAD 16),
    tuned down to 16 query rows and one K_PAD-wide pool tile. (With tile_r=2 instead, triton 3.9
    fails this one in make_ttgir: an scf.if layout mismatch after the two-halves merge.)"""
    return ReportConfig("test-sum-fp16-k8-bm16", "sum", "float16", 8, tuning={"block_m": 16, "tile_r": 1},
                        widths=(32,))


def config_from_dict(d: dict) -> ReportConfig:
    d = dict(d)
    d["widths"] = tuple(d.get("widths", SUITE_WIDTHS))
    d["tuning"] = dict(d.get("tuning") or {})
    return ReportConfig(**d)


# ----------------------------------------------------------------------------- toolchain (no triton import)

def _triton_dir() -> Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def find_tool(name: str) -> str | None:
    """An NVIDIA tool (ptxas, cuobjdump, nvdisasm) the way triton finds it (TRITON_<NAME>_PATH,
    then the copy bundled under triton/backends/nvidia/bin), else PATH or /usr/local/cuda*/bin.
    Does not import triton."""
    candidates = [os.environ.get(f"TRITON_{name.upper().replace('-', '_')}_PATH")]
    tdir = _triton_dir()
    if tdir is not None:
        candidates.append(str(tdir / "backends" / "nvidia" / "bin" / name))
    candidates.append(shutil.which(name))
    candidates += sorted(str(p / name) for p in Path("/usr/local").glob("cuda*/bin"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def toolchain_missing() -> str | None:
    """None when this machine can compile the report, else why not (for skips). Does not import triton."""
    if _triton_dir() is None:
        return "the Python package 'triton' is not installed"
    if find_tool("ptxas") is None and find_tool("ptxas-blackwell") is None:
        return "no ptxas (neither bundled with triton nor on PATH / /usr/local/cuda*/bin)"
    return None


# ----------------------------------------------------------------------------- text analysis (no triton)

_PTX_INSN = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)[^:]*;\s*(?://.*)?$")
_SASS_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)")


def ptx_opcodes(ptx: str) -> Counter:
    """Static count of each PTX instruction opcode (inline asm included; directives, labels,
    comments and debug sections excluded)."""
    ops = Counter()
    for line in ptx.splitlines():
        s = line.strip()
        if not s or s.startswith(("//", ".", "{", "}", "$")):
            continue
        m = _PTX_INSN.match(s)
        if m:
            ops[m.group(1)] += 1
    return ops


def sass_opcodes(sass: str) -> Counter:
    """Static count of each SASS opcode in cuobjdump -sass / nvdisasm output."""
    return Counter(m.group(1) for m in _SASS_INSN.finditer(sass))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def mma_loop_facts(sass: str, log: str) -> dict:
    """Where the spills sit relative to the tensor-core loop. mma_loop: the address range of the
    shortest backward branch enclosing an MMA instruction (the innermost K loop; longer ranges are
    the tile loop or mbarrier retry jumps from the end of the function); mainloop_local_ops:
    LDL/STL inside it (spill traffic paid per K step, not once per tile); wgmma_serialized:
    ptxas warned (C7515) that non-wgmma instructions define wgmma accumulators inside a pipeline
    stage, so the wgmmas run one at a time."""
    insns = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _SASS_LINE.finditer(sass)]
    mma_at = [a for a, op, _ in insns if op.startswith(("HGMMA", "HMMA"))]
    loops = []
    for addr, op, rest in insns:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            if any(lo <= a <= addr for a in mma_at):
                loops.append((addr - lo, lo, addr))
    if not loops:
        return {"mma_loop": None, "mainloop_local_ops": None, "wgmma_serialized": "C7515" in (log or "")}
    _, lo, hi = min(loops)
    local = sum(1 for a, op, _ in insns if op.startswith(("LDL", "STL")) and lo <= a <= hi)
    return {"mma_loop": [hex(lo), hex(hi)], "mainloop_local_ops": local, "wgmma_serialized": "C7515" in (log or "")}


def mma_kind(ops: Counter) -> str:
    if any(op.startswith("wgmma.mma_async") for op in ops):
        return "wgmma"
    if any(op.startswith("mma.sync") for op in ops):
        return "mma.sync"
    return "none/fma"


def _elem_bits(op: str) -> int | None:
    m = re.search(r"\.[bsuf](\d+)$", op)
    return int(m.group(1)) if m else None


_CP_ASYNC = re.compile(r"^\s*(?:@!?%\w+\s+)?cp\.async\.(?:ca|cg)\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],"
                       r"\s*(0x[0-9a-fA-F]+|\d+)", re.M)


def load_facts(ops: Counter, ptx: str = "") -> dict:
    """Global-load facts from PTX: ld.global vector (.v2/.v4/.v8) vs scalar counts and element
    widths; cp.async copies (global -> shared, with their sizes in bytes, from `ptx`) and TMA
    (cp.async.bulk.tensor). `vectorized`: most of the loads that move operands (ld.global and
    cp.async copies) move several elements: a vector ld.global or a cp.async of >= 8 bytes; or
    the operands come by TMA (whole tiles per copy)."""
    vec = scalar = scalar16 = 0
    bits = Counter()
    lanes = Counter()
    load_bytes = Counter()
    opcodes = {}
    for op, n in ops.items():
        if not op.startswith("ld.global"):
            continue
        opcodes[op] = n
        parts = op.split(".")
        width = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        eb = _elem_bits(op)
        lanes[str(width)] += n
        if eb is not None:
            bits[str(eb)] += n
            load_bytes[str(width * eb // 8)] += n
        if width > 1:
            vec += n
        else:
            scalar += n
            if eb is not None and eb <= 16:
                scalar16 += n
    cp_sizes = Counter(int(m.group(1), 0) for m in _CP_ASYNC.finditer(ptx))
    cp_async = sum(n for op, n in ops.items()
                   if op.startswith(("cp.async.ca.", "cp.async.cg.")))
    tma = sum(n for op, n in ops.items() if op.startswith("cp.async.bulk.tensor"))
    bulk = sum(n for op, n in ops.items() if op.startswith("cp.async.bulk")
               and not op.startswith(("cp.async.bulk.tensor", "cp.async.bulk.commit", "cp.async.bulk.wait")))
    cp_wide = sum(n for size, n in cp_sizes.items() if size >= 8)
    cp_narrow = sum(n for size, n in cp_sizes.items() if size < 8)
    def by_key(c):
        return dict(sorted(((str(k), v) for k, v in c.items()), key=lambda kv: int(kv[0])))

    return {
        "vectorized": tma > 0 or vec + cp_wide > scalar + cp_narrow,
        "global_loads": vec + scalar,
        "vector_loads": vec,
        "scalar_loads": scalar,
        "scalar_16bit_loads": scalar16,
        "lanes_per_load": by_key(lanes),
        "element_bits": by_key(bits),
        "bytes_per_load": by_key(load_bytes),
        "ld_global_opcodes": dict(sorted(opcodes.items())),
        "async_copy": cp_async > 0,
        "cp_async": cp_async,
        "cp_async_bytes": by_key(cp_sizes),
        "tma": tma > 0,
        "cp_async_bulk_tensor": tma,
        "cp_async_bulk": bulk,
        "ldmatrix": sum(n for op, n in ops.items() if op.startswith("ldmatrix")),
        "global_stores": sum(n for op, n in ops.items() if op.startswith("st.global")),
    }


def sort_merge_facts(ops: Counter) -> dict:
    """PTX instructions the in-register bitonic sort / merge is made of (static counts)."""
    def count(pred):
        return sum(n for op, n in ops.items() if pred(op))

    return {
        "shfl_sync": count(lambda op: op.startswith("shfl.sync")),
        "bar_sync": count(lambda op: op.startswith(("bar.sync", "barrier.sync"))),
        "selp_b64": count(lambda op: op == "selp.b64"),
        "setp_64": count(lambda op: op.startswith("setp.") and op.endswith(("s64", "u64", "b64"))),
        "minmax_64": count(lambda op: op.startswith(("min.", "max.")) and op.endswith(("s64", "u64"))),
        "shared_ld_st": count(lambda op: op.startswith(("ld.shared", "st.shared"))),
        "local_ld_st": count(lambda op: op.startswith(("ld.local", "st.local"))),
    }


def sass_facts(ops: Counter) -> dict:
    def pick(prefixes):
        return {op: n for op, n in sorted(ops.items()) if op.startswith(prefixes)}

    total = sum(ops.values())
    return {
        "instructions": total - ops.get("NOP", 0),
        "mma": pick(("HGMMA", "HMMA", "IMMA")),
        "global_loads": pick(("LDG", "LDGSTS", "UTMALDG", "UBLKCP")),
        "local": pick(("LDL", "STL")),
        "shuffles": sum(n for op, n in ops.items() if op.startswith("SHFL")),
        "barriers": sum(n for op, n in ops.items() if op.startswith(("BAR", "WARPGROUP"))),
        "top_opcodes": dict(ops.most_common(12)),
    }


_LOG_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "stack_frame_bytes": r"(\d+) bytes stack frame",
    "spill_stores_bytes": r"(\d+) bytes spill stores",
    "spill_loads_bytes": r"(\d+) bytes spill loads",
    "barriers": r"used (\d+) barriers",
    "smem_bytes": r"(\d+) bytes smem",
    "ptxas_ms": r"Compile time = ([\d.]+) ms",
}


def parse_ptxas_log(log: str) -> dict:
    out = {}
    for key, pat in _LOG_PATTERNS.items():
        m = re.search(pat, log)
        if m:
            out[key] = float(m.group(1)) if key == "ptxas_ms" else int(m.group(1))
    return out


def parse_res_usage(text: str) -> dict:
    """`cuobjdump -res-usage`: REG, STACK, SHARED (static), LOCAL of the kernel's function."""
    m = re.search(r"Function [^\n]*:\s*\n\s*(REG:.*)", text)
    if not m:
        return {}
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", m.group(1))}


# ----------------------------------------------------------------------------- launch capture (child side)

class _Captured(Exception):  # control flow, not an error
    def __init__(self, grid, args, kwargs):
        super().__init__("captured")
        self.grid, self.args, self.kwargs = grid, args, kwargs


class _Recorder:
    """Stands in for the jitted kernel: `_kernel()[grid](*args, **kwargs)` raises _Captured."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise _Captured(grid, args, kwargs)
        return launch


def _import_kernel_module():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from pyfk.engine.kernels import triton as tt
    return tt


def capture_filter_launch(cfg: ReportConfig):
    """(grid, args, kwargs, problem) of the v2 launch (`_triton_filter.launch`) for `cfg` on meta
    tensors: the whole suite pool (SUITE_N rows) in its padded buffer, or for mode "dense" the
    sample buffer (the sample size `filter_topk` picks for k)."""
    import torch

    from pyfk.bench import layout_for

    _import_kernel_module()
    from pyfk.engine.kernels import _triton_filter as tf

    layout = layout_for(cfg.widths, cfg.combine)
    lay = tf.PaddedLayout.of(layout.widths, layout.product)
    steps = torch.empty(lay.steps().shape, dtype=torch.int32, device=torch.device("meta"))
    tune = tf.Config(**cfg.tuning).check()
    dtype = getattr(torch, cfg.dtype)
    meta = torch.device("meta")
    q = torch.empty((tf._round_up(cfg.m, tune.block_m), lay.width), dtype=dtype, device=meta)
    precision = tf.input_precision(dtype)  # what filter_topk passes
    problem = {"M": cfg.m, "D": layout.width, "D_pad": lay.width, "layout_widths": list(layout.widths),
               "mode": cfg.mode}
    width = 2 * (len(layout.widths) // 2) + 1 if layout.product else 1  # error_table's columns
    err = torch.empty((q.shape[0], width), dtype=torch.float32, device=meta)
    if cfg.mode == "dense":
        n = tf.sample_size(SUITE_N, cfg.k)
        out = torch.empty((q.shape[0], n), dtype=torch.float32, device=meta)
        extra = {"dense_out": (out, torch.empty_like(out))}
    else:
        n = SUITE_N
        extra = {"tau": torch.empty(q.shape[0], dtype=torch.float32, device=meta),
                 "cnt": torch.empty(q.shape[0], dtype=torch.int32, device=meta),
                 "cand": (torch.empty((q.shape[0], 1024), dtype=torch.float32, device=meta),
                          torch.empty((q.shape[0], 1024), dtype=torch.int32, device=meta))}
    p = torch.empty((tf._round_up(n, tf.MAX_BLOCK_N), lay.width), dtype=dtype, device=meta)
    problem["N"] = n
    try:
        tf.launch(_Recorder(), q, p, 0, n, lay, steps, err, 1e-7, tune, precision=precision, **extra)
    except _Captured as c:
        problem["grid"] = list(c.grid) if isinstance(c.grid, (tuple, list)) else str(c.grid)
        return c.grid, c.args, c.kwargs, problem
    raise RuntimeError(f"_triton_filter.launch did not launch the kernel for {cfg.name}")


def capture_launch(cfg: ReportConfig):
    """(grid, args, kwargs, problem) of the kernel launch pyfk makes for `cfg` (v1: through
    `topk_update`), on meta tensors (nothing allocated, nothing run)."""
    if cfg.kernel == "filter":
        return capture_filter_launch(cfg)
    import torch

    from pyfk.bench import layout_for

    tt = _import_kernel_module()
    layout = layout_for(cfg.widths, cfg.combine)
    d = layout.width
    n = tt.chunk_rows(cfg.m, d)
    dtype = getattr(torch, cfg.dtype)
    meta = torch.device("meta")
    q = torch.empty((cfg.m, d), dtype=dtype, device=meta)
    p = torch.empty((n, d), dtype=dtype, device=meta)
    scores = torch.empty((cfg.m, cfg.k), dtype=torch.float32, device=meta)
    index = torch.empty((cfg.m, cfg.k), dtype=torch.int64, device=meta)
    problem = {"M": cfg.m, "N": n, "D": d, "layout_widths": list(layout.widths), "index_offset": n}
    saved = tt._kernel
    tt._kernel = lambda *a, **kw: _Recorder()
    try:
        tt.topk_update(q, p, list(layout.widths), layout.product, cfg.k, n, scores, index,
                       allow_tf32=cfg.allow_tf32, **cfg.tuning)
    except _Captured as c:
        problem["grid"] = list(c.grid) if isinstance(c.grid, (tuple, list)) else str(c.grid)
        return c.grid, c.args, c.kwargs, problem
    except Exception as exc:  # noqa: BLE001 - e.g. the torch fallback running on meta tensors
        why = f"{type(exc).__name__}: {exc}"
    else:
        why = "it returned"
    finally:
        tt._kernel = saved
    fallback = f" (k={cfg.k} > MAX_K={tt.MAX_K}: the torch fallback)" if cfg.k > getattr(tt, "MAX_K", cfg.k) else ""
    raise RuntimeError(f"topk_update did not launch the kernel through _kernel() for {cfg.name}{fallback}; {why}")


def _specialize(jf, backend, args, kwargs):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run derives them (triton 3.x)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(jf.signature, jf.params, backend)
    kw = dict(kwargs)
    bound_args, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = jf._pack_args(backend, kw, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _tool_version(path: str | None) -> str | None:
    if not path:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else None


def _ptxas_rerun(ptx: str, ptxas: str, arch: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, timeout=600)
        return res.stdout + res.stderr


def _disassemble(cubin: bytes) -> tuple[str | None, str | None, str | None]:
    """(SASS text, which tool, cuobjdump -res-usage text) of a cubin; None where no tool."""
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    sass = tool = res = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        if cuobjdump:
            r = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, timeout=300)
            if r.returncode == 0 and r.stdout.strip():
                sass, tool = r.stdout, cuobjdump
            r = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                res = r.stdout
        if sass is None and nvdisasm:
            r = subprocess.run([nvdisasm, "-c", str(path)], capture_output=True, text=True, timeout=300)
            if r.returncode == 0 and r.stdout.strip():
                sass, tool = r.stdout, nvdisasm
    return sass, tool, res


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)


def compile_record(cfg: ReportConfig, rec: dict | None = None, artifacts: str | None = None) -> dict:
    """Compile `cfg` in this process and return its record (`rec`, filled in as it goes, so a
    caller catching an exception keeps what was learnt). The process must not run the Triton
    interpreter (TRITON_INTERPRET=1); `compile_config` runs this in a clean subprocess.
    artifacts: a directory to write <name>.ttgir / .ptx / .sass / .ptxas.log into."""
    rec = _base_record(cfg) if rec is None else rec
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: compile in a subprocess without it (compile_config)")
    grid, args, kwargs, problem = capture_launch(cfg)
    rec["problem"] = problem
    tt = _import_kernel_module()
    reason = tt._load()
    if reason is not None:
        raise RuntimeError(reason)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction

    try:  # ptxas prints its -v log when this is set (also passed in the child's environment)
        triton.knobs.nvidia.dump_ptxas_log = True
    except Exception:  # noqa: BLE001 - an older knobs API: the log is re-made below
        pass
    if cfg.kernel == "filter":
        from pyfk.engine.kernels import _triton_filter as tf
        tf.triton, tf.tl = triton, triton.language  # its module globals, as `jitted` sets them
        fn = tf._filter_kernel
    else:
        fn = tt._fk_topk_kernel
    fn = getattr(fn, "fn", fn)  # the plain function, whatever wraps it
    jf = JITFunction(fn)
    target = GPUTarget("cuda", CAPABILITY, WARP_SIZE)
    backend = make_backend(target)
    signature, constexprs, attrs, options = _specialize(jf, backend, args, kwargs)
    names = jf.arg_names
    const = {names[k[0]]: v for k, v in constexprs.items()}
    rec["config"] = {
        "combine": cfg.combine, "PRODUCT": const.get("PRODUCT"), "dtype": cfg.dtype,
        "input_precision": const.get("PRECISION"), "k": cfg.k, "allow_tf32": cfg.allow_tf32,
        "kernel": cfg.kernel, "mode": cfg.mode if cfg.kernel == "filter" else None,
        **{key: const.get(key) for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "K_PAD", "TILE_R", "GROUP_M",
                                           "NUM_STAGES", "STEP")},
        "num_warps": options.num_warps, "num_stages": options.num_stages,
    }
    rec["specialization"] = {
        "signature": {k: v for k, v in signature.items() if v != "constexpr"},
        "divisible_by_16": [names[k[0]] for k, v in attrs.items() if any("divisibility" in str(a) for a in v)],
        "constexprs": _jsonable({k: v for k, v in const.items()}),
    }
    rec["config_source"] = ("pyfk.engine.kernels._triton_filter.launch" if cfg.kernel == "filter" else
                            "pyfk.engine.kernels.triton.topk_update") + " launch (meta tensors), triton's JIT binder"
    ptxas_path = None
    with contextlib.suppress(Exception):
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas_path = get_ptxas(CAPABILITY).path
    ptxas_path = ptxas_path or find_tool("ptxas")
    rec["ptxas"] = {"path": ptxas_path, "version": _tool_version(ptxas_path)}

    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        kernel = triton.compile(ASTSource(jf, signature, constexprs, attrs), target=target, options=options.__dict__)
    rec["compile_seconds"] = round(time.perf_counter() - t0, 3)
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    arch = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M)
    rec["target"]["sm"] = arch.group(1) if arch else None
    log = "\n".join(ln for ln in buf.getvalue().splitlines() if "ptxas" in ln or "bytes stack frame" in ln)
    facts = parse_ptxas_log(log)
    rec["ptxas"]["log_source"] = "triton's ptxas run"
    if "registers" not in facts and ptxas_path:
        log = _ptxas_rerun(ptx, ptxas_path, rec["target"]["sm"] or "sm_90a")
        facts = parse_ptxas_log(log)
        rec["ptxas"]["log_source"] = "ptxas -v re-run on the PTX"
    rec["ptxas"]["log"] = [ln.strip() for ln in log.splitlines() if ln.strip()]
    rec["ptxas"]["ms"] = facts.pop("ptxas_ms", None)
    sass, sass_tool, res_usage = _disassemble(cubin)
    res = parse_res_usage(res_usage or "")
    rec.update({
        "registers": facts.get("registers", res.get("reg")),
        "spill_stores_bytes": facts.get("spill_stores_bytes"),
        "spill_loads_bytes": facts.get("spill_loads_bytes"),
        "stack_frame_bytes": facts.get("stack_frame_bytes", res.get("stack")),
        "local_bytes": res.get("local"),
        "barriers": facts.get("barriers"),
        "shared_bytes": getattr(kernel.metadata, "shared", None),  # dynamic shared memory triton requests
        "static_shared_bytes": res.get("shared"),
        "res_usage": res or None,
    })
    if res.get("reg") is not None and rec["registers"] is not None and res["reg"] != rec["registers"]:
        rec["warnings"] = [f"ptxas log says {rec['registers']} registers, cuobjdump -res-usage {res['reg']}"]
    ops = ptx_opcodes(ptx)
    sops = sass_opcodes(sass) if sass else None
    rec["mma"] = mma_kind(ops)
    rec["mma_ptx"] = {op: n for op, n in sorted(ops.items()) if op.startswith(("wgmma", "mma."))}
    rec["loads"] = load_facts(ops, ptx)
    if artifacts:
        adir = Path(artifacts)
        adir.mkdir(parents=True, exist_ok=True)
        for ext, text in (("ttgir", kernel.asm.get("ttgir")), ("ptx", ptx), ("sass", sass), ("ptxas.log", log)):
            if text:
                (adir / f"{cfg.name}.{ext}").write_text(text)
    rec["instructions"] = {
        "ptx": sum(ops.values()),
        "sass": sass_facts(sops)["instructions"] if sops else None,
        "sass_tool": sass_tool,
        "sort_merge_ptx": sort_merge_facts(ops),
        "sass_detail": sass_facts(sops) if sops else None,
    }
    rec["mma_loop"] = mma_loop_facts(sass, log) if sass else None
    return rec


# ----------------------------------------------------------------------------- driver (parent side)

def _base_record(cfg: ReportConfig) -> dict:
    return {"name": cfg.name, "request": asdict(cfg), "kernel": KERNELS[cfg.kernel],
            "triton_version": _triton_version(),
            "target": {"backend": "cuda", "capability": CAPABILITY, "warp_size": WARP_SIZE}, "error": None}


def _triton_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("triton")
    except Exception:  # noqa: BLE001
        return None


def child_env(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=cache_dir, TRITON_DUMP_PTXAS_LOG="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    env.pop("TRITON_ALWAYS_COMPILE", None)
    return env


def compile_config(cfg: ReportConfig, timeout: float = CHILD_TIMEOUT_S, artifacts: str | None = None) -> dict:
    """Compile `cfg` in a subprocess (TRITON_INTERPRET unset, a fresh TRITON_CACHE_DIR) and
    return its record; a failure is recorded in record["error"], never raised."""
    rec = _base_record(cfg)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pyfk_compile_report_") as tmp:
        out = Path(tmp) / "record.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(cfg)), "--record", str(out)]
        if artifacts:
            cmd += ["--artifacts", str(Path(artifacts).resolve())]
        res = _run_child(cmd, timeout, env=child_env(str(Path(tmp) / "cache")))
        if res is None:
            rec["error"] = f"timed out after {timeout:.0f} s"
        else:
            if out.exists():
                child = json.loads(out.read_text())
                child_target = child.pop("target", {})
                rec.update(child)
                rec["target"] = {**rec["target"], **child_target}
            if res.returncode != 0 and not rec.get("error"):
                tail = (res.stderr or res.stdout or "").strip().splitlines()[-15:]
                rec["error"] = f"compile subprocess exited {res.returncode}: " + "\n".join(tail)
            if rec.get("error"):
                rec["diagnostics"] = _diagnostics(res.stderr or "")
    rec["wall_seconds"] = round(time.monotonic() - t0, 3)
    return rec


def _run_child(cmd, timeout: float, env: dict):
    """subprocess.run in its own session; on timeout the child and what it started (ptxas)
    are killed as a group and None is returned."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT),
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _diagnostics(stderr: str, limit: int = 40) -> list[str]:
    """The compiler's messages from a failed child's stderr (MLIR errors and notes with their
    source lines), without the IR dump that follows them and without warnings."""
    out = []
    for line in stderr.splitlines():
        if line.startswith(("module {", "#")) or "Traceback" in line:
            break
        if line.strip() and "Warning" not in line and "warn_once" not in line:
            out.append(line.rstrip())
    return out[:limit]


def _child(cfg_json: str, record_path: str, artifacts: str | None = None) -> int:
    cfg = config_from_dict(json.loads(cfg_json))
    rec = _base_record(cfg)
    try:
        compile_record(cfg, rec, artifacts)
        status = 0
    except Exception as exc:  # noqa: BLE001 - recorded, the parent goes on
        rec["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        rec["traceback"] = traceback.format_exc()[-4000:]
        status = 1
    Path(record_path).write_text(json.dumps(_jsonable(rec), indent=1))
    return status


def summary_line(rec: dict) -> str:
    """One human line per record (stderr)."""
    if rec.get("error"):
        return f"  FAIL {rec['name']}: {rec['error'].splitlines()[0]}"
    c, ld, ins = rec["config"], rec["loads"], rec["instructions"]
    cp = " ".join(f"{n}x{b}B" for b, n in ld["cp_async_bytes"].items()) or "0"
    tiles = (f"BM={c['BLOCK_M']} BN={c['BLOCK_N']} GROUP_M={c['GROUP_M']} STEP={c['STEP']}"
             if c.get("kernel") == "filter" else
             f"BM={c['BLOCK_M']} BN={c['BLOCK_N']} BK={c['BLOCK_K']} K_PAD={c['K_PAD']} TILE_R={c['TILE_R']}")
    return (f"  ok   {rec['name']}: {tiles} warps={c['num_warps']} stages={c['num_stages']} | regs {rec['registers']} "
            f"spill st/ld {rec['spill_stores_bytes']}/{rec['spill_loads_bytes']} B | {rec['mma']} | "
            f"ld.global vec/scalar {ld['vector_loads']}/{ld['scalar_loads']} "
            f"(16-bit scalar {ld['scalar_16bit_loads']}) cp.async {cp} tma {ld['cp_async_bulk_tensor']} "
            f"vectorised={ld['vectorized']} | PTX {ins['ptx']} SASS {ins['sass']} | {rec['compile_seconds']} s")


def run_report(configs, json_path=None, timeout: float = CHILD_TIMEOUT_S, log=None, artifacts=None) -> dict:
    """Compile every config (each in its own subprocess); print one JSON record per config to
    stdout as it finishes; rewrite `json_path` (if given) after each. Returns the report."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.monotonic()
    report = {
        "report": "pyfk compile report (issue #12 item 3): Triton kernel compiled for sm_90 without a GPU",
        "kernels": KERNELS,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_version": _triton_version(),
        "target": {"backend": "cuda", "capability": CAPABILITY, "warp_size": WARP_SIZE},
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "main_config": main_config().name,
        "configs": [],
        "errors": 0,
        "complete": False,
    }
    json_path = Path(json_path) if json_path else None
    for cfg in configs:
        rec = compile_config(cfg, timeout=timeout, artifacts=artifacts)
        report["configs"].append(rec)
        report["errors"] += bool(rec.get("error"))
        report["elapsed_s"] = round(time.monotonic() - t0, 1)
        if json_path:
            write_json(json_path, report)
        print(json.dumps(rec), flush=True)
        log(summary_line(rec))
    report["complete"] = True
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    if json_path:
        write_json(json_path, report)
    log(f"compile report: {len(report['configs'])} configs, {report['errors']} failed, {report['elapsed_s']} s"
        + (f"; wrote {json_path}" if json_path else ""))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, metavar="PATH", help="write the report here (rewritten after each config)")
    ap.add_argument("--config", action="append", default=None, metavar="NAME",
                    help="compile only these production configs (repeatable; see --list)")
    ap.add_argument("--list", action="store_true", help="list the production configs and exit")
    ap.add_argument("--timeout", type=float, default=CHILD_TIMEOUT_S, help="seconds per config")
    ap.add_argument("--artifacts", default=None, metavar="DIR",
                    help="also write each config's TTGIR, PTX, SASS and ptxas log here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--record", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        return _child(args.child, args.record, args.artifacts)
    configs = production_configs()
    if args.list:
        for c in configs:
            print(f"{c.name}{'  (main)' if c.name == main_config().name else ''}: {asdict(c)}")
        return 0
    if args.config:
        known = {c.name: c for c in configs}
        unknown = [n for n in args.config if n not in known]
        if unknown:
            ap.error(f"--config: unknown {unknown}; expected among {list(known)}")
        configs = [known[n] for n in args.config]
    missing = toolchain_missing()
    if missing:
        print(f"compile report: cannot run here: {missing}", file=sys.stderr)
        return 2
    report = run_report(configs, args.json, timeout=args.timeout, artifacts=args.artifacts)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
