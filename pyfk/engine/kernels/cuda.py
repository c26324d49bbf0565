"""Backend `cuda`: torch GEMMs for the score tiles + CUDA k-selection (`pyfk._C_cuda`).

Per pool tile of T rows, the (M, T) float32 scores are the Hadamard product of the
per-scale Grams (product) or one Gram (dot), computed with torch GEMMs; the exact
top-k is then selected by `_C_cuda.select_topk` (csrc/cuda/kselect.cu), which merges
the tile straight into the running (M, k) state of packed int64 keys (the key spec of
`pyfk.engine.topk_state`, mirrored by csrc/cuda/kselect.cuh: ties go to the smaller pool
index) -- no torch.topk, no (M, T) key tensor. `merge_keys` merges two sorted key lists
for callers that keep tile results apart.

GEMM precision (option `gemm`, e.g. pyfk.topk(..., options={"gemm": "tf32"}); default
from $PYFK_CUDA_GEMM, read at every call, else "auto"):
    "auto"      (default) bfloat16/float16 GEMMs when the pool descriptors are stored in
                that dtype, float32 otherwise; always float32 accumulation and output;
    "float32"   exact float32 GEMMs (the torch reference's arithmetic);
    "tf32"      float32 inputs on TF32 tensor cores;
    "bfloat16" / "float16".
Selection is exact in every mode: only the scores carry the GEMM's rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pyfk.engine import topk_state
from pyfk.engine.backend import Backend, load_extension, register
from pyfk.engine.layout import Layout
from pyfk.engine.topk_state import TopK, pack_keys

_C_cuda, IMPORT_ERROR = load_extension("pyfk._C_cuda", "CUDA extension")

MAX_K = 1024
# The key spec (pyfk.engine.topk_state); csrc/cuda/kselect.cuh mirrors both (tests/engine/test_key_spec.py).
MAX_INDEX = topk_state.MAX_INDEX
EMPTY_KEY = topk_state.EMPTY_KEY  # pack_keys(-inf, -1): an empty state slot
GEMM_MODES = ("auto", "float32", "tf32", "bfloat16", "float16")
GEMM_ENV = "PYFK_CUDA_GEMM"  # the default of option `gemm`, read at every call
_TILE_ELEMENTS = 1 << 27  # M x T float32 scores per tile (512 MiB); a Gram or two more in flight
_HALF = (torch.bfloat16, torch.float16)
_mm_out_dtype_ok: bool | None = None  # torch.mm(..., out_dtype=float32) works here (probed once)


def default_gemm() -> str:
    """$PYFK_CUDA_GEMM (one of GEMM_MODES), else "auto": what option gemm=None means."""
    return os.environ.get(GEMM_ENV, "auto") or "auto"


BUILD_ERROR = Path(__file__).resolve().parents[2] / "_C_cuda_build_error.txt"  # written by setup.py


def available() -> str | None:
    """None when the backend can run here, else why not (a failed build where a CUDA compiler was
    found says so, from the file setup.py leaves next to the extension)."""
    if _C_cuda is None:
        if BUILD_ERROR.is_file():
            return (f"pyfk._C_cuda failed to build although a CUDA compiler was found: "
                    f"{BUILD_ERROR.read_text().strip()} (rebuild to see the compiler errors)")
        return IMPORT_ERROR
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


# ----------------------------------------------------------------------------- host-side helpers

def tile_columns(m: int, k: int, budget: int = _TILE_ELEMENTS) -> int:
    """Pool rows per score tile: about `budget` scores, at least k, a multiple of 128."""
    t = max(1, budget // max(m, 1))
    t = max(128, (t // 128) * 128)
    return max(t, k)


def resolve_gemm_dtype(mode: str, pool_dtype: torch.dtype | None = None) -> torch.dtype | str:
    """torch.float32, torch.bfloat16, torch.float16 or "tf32" for a GEMM mode and the pool's dtype."""
    if mode not in GEMM_MODES:
        raise ValueError(f"gemm_dtype: expected one of {list(GEMM_MODES)}, got {mode!r}")
    if mode == "auto":
        return pool_dtype if pool_dtype in _HALF else torch.float32
    if mode == "tf32":
        return "tf32"
    return getattr(torch, mode)


def check_args(m: int, n: int, k: int, index_offset: int) -> None:
    """The limits of the key space and the kernel; raises ValueError."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k: the cuda backend selects 1 <= k <= {MAX_K}, got {k}; use backend='torch'")
    if index_offset < 0 or (n > 0 and index_offset + n - 1 > MAX_INDEX):
        raise ValueError(f"index: pool indices must lie in [0, 2**32 - 2], got rows {index_offset}.."
                         f"{index_offset + n - 1}")


# ----------------------------------------------------------------------------- GEMMs

def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for half-precision operands with float32 output (float32 accumulation)."""
    global _mm_out_dtype_ok
    if _mm_out_dtype_ok is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _mm_out_dtype_ok = True
            return out
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=): half output, then float32
            if _mm_out_dtype_ok:
                raise
            _mm_out_dtype_ok = False
    return torch.mm(a, b).float()


def _gram(a: torch.Tensor, b: torch.Tensor, dtype) -> torch.Tensor:
    if dtype in _HALF:
        return _mm_f32(a, b.T)
    if dtype == "tf32":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return a @ b.T
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    return a @ b.T


def scores_tile(q: torch.Tensor, p: torch.Tensor, widths, product: bool, dtype=torch.float32) -> torch.Tensor:
    """(M, T) float32 scores of q (M, D) and p (T, D), both already in the GEMM dtype."""
    if not product:
        return _gram(q, p, dtype)
    out = None
    for z, g in Layout(tuple(widths), "product").pairs():
        zz = _gram(q[:, z], p[:, z], dtype)
        zz.mul_(_gram(q[:, g], p[:, g], dtype))
        out = zz if out is None else out.add_(zz)
    return out


# ----------------------------------------------------------------------------- the update

def _operand(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.to(dtype) if dtype in _HALF else x.float()


def topk_update(q, p, widths, product, k, index_offset, scores, index, *, gemm_dtype=torch.float32,
                tile: int | None = None):
    """Merge the top-k of q x p (pool rows numbered from index_offset) into the sorted
    (M, k) state (scores float32, index int64; -1 = empty). Returns the new state.

    Same contract as `pyfk.engine.kernels.torch.topk_update`; q and p are normalised CUDA
    tensors; `gemm_dtype` is torch.float32, torch.bfloat16, torch.float16 or "tf32" (see
    `resolve_gemm_dtype`).
    """
    reason = available()
    if reason is not None:
        raise RuntimeError(f"cuda backend: {reason}")
    if q.device.type != "cuda" or p.device != q.device:
        raise ValueError(f"cuda backend: expected q and p on one CUDA device, got {q.device} and {p.device}")
    m, n = q.shape[0], p.shape[0]
    check_args(m, n, k, index_offset)
    if scores.shape != (m, k) or index.shape != (m, k):
        raise ValueError(f"scores/index: expected ({m}, {k}) state tensors, got {tuple(scores.shape)} and "
                         f"{tuple(index.shape)}")
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        return _update(_C_cuda, stream, q, p, widths, product, k, index_offset, scores, index, gemm_dtype, tile)


def _update(lib, stream, q, p, widths, product, k, index_offset, scores, index, gemm_dtype, tile):
    """The tile loop of topk_update on an already checked device; `lib` is pyfk._C_cuda
    (the tests pass a host emulation of it to check this loop without a GPU)."""
    m, n = q.shape[0], p.shape[0]
    if m == 0 or n == 0:
        return scores, index
    keys = pack_keys(scores.to(q.device), index.to(q.device)).contiguous()  # the state, in place
    tile = tile or tile_columns(m, k)
    qc = _operand(q, gemm_dtype)
    for start in range(0, n, tile):
        stop = min(n, start + tile)
        block = scores_tile(qc, _operand(p[start:stop], gemm_dtype), widths, product, gemm_dtype).contiguous()
        # Stream-ordered: `block` may be freed (and its memory reused by later work on
        # this stream) as soon as the launch is queued. init == out: in-place update.
        lib.select_topk(block.data_ptr(), m, stop - start, k, keys.data_ptr(), stream,
                        ld=block.stride(0), index_offset=index_offset + start, init_ptr=keys.data_ptr())
    out_scores = torch.empty((m, k), dtype=torch.float32, device=q.device)
    out_index = torch.empty((m, k), dtype=torch.int64, device=q.device)
    lib.unpack_keys(keys.data_ptr(), m * k, out_scores.data_ptr(), out_index.data_ptr(), stream)
    return out_scores, out_index


def merge(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k of two (rows, k) sorted int64 key tensors on one CUDA device (exact merge)."""
    if available() is not None:
        raise RuntimeError(f"cuda backend: {available()}")
    if a.shape != b.shape or a.dim() != 2 or a.dtype != torch.int64 or b.dtype != torch.int64:
        raise ValueError(f"merge: expected two (rows, k) int64 tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty_like(a) if out is None else out
    with torch.cuda.device(a.device):
        _C_cuda.merge_keys(a.data_ptr(), b.data_ptr(), a.shape[0], a.shape[1], out.data_ptr(),
                           torch.cuda.current_stream(a.device).cuda_stream)
    return out


def select_keys(block: torch.Tensor, k: int, index_offset: int = 0, init: torch.Tensor | None = None) -> torch.Tensor:
    """(rows, k) sorted keys of the k best columns of a (rows, n) float32 or int64-key CUDA tensor."""
    if available() is not None:
        raise RuntimeError(f"cuda backend: {available()}")
    if block.dim() != 2 or block.dtype not in (torch.float32, torch.int64):
        raise ValueError(f"select_keys: expected a 2-D float32 or int64 tensor, got {block.dtype} {tuple(block.shape)}")
    if block.shape[1] > 0 and block.stride(1) != 1:
        block = block.contiguous()
    rows, n = block.shape
    ld = block.stride(0) if rows > 1 else n
    out = torch.empty((rows, k), dtype=torch.int64, device=block.device)
    init_ptr = 0
    if init is not None:
        init = init.contiguous()
        if init.shape != (rows, k) or init.dtype != torch.int64:
            raise ValueError(f"init: expected a ({rows}, {k}) int64 tensor")
        init_ptr = init.data_ptr()
    with torch.cuda.device(block.device):
        stream = torch.cuda.current_stream(block.device).cuda_stream
        if block.dtype == torch.float32:
            check_args(rows, n, k, index_offset)
            _C_cuda.select_topk(block.data_ptr(), rows, n, k, out.data_ptr(), stream, ld=ld,
                                index_offset=index_offset, init_ptr=init_ptr)
        else:
            _C_cuda.select_topk_keys(block.data_ptr(), rows, n, k, out.data_ptr(), stream, ld=ld, init_ptr=init_ptr)
    return out


# ----------------------------------------------------------------------------- the backend

def chunk_rows(m: int, width: int) -> int:
    """Pool rows per `topk` call: a ~1 GiB normalised float32 chunk."""
    return max(4096, (1 << 30) // (4 * max(width, 1)))


def _pool_dtype(parts) -> torch.dtype | None:
    first = parts[0]
    return first.dtype if isinstance(first, torch.Tensor) else None


class CudaBackend(Backend):
    """Option gemm: one of GEMM_MODES, or None (the default): $PYFK_CUDA_GEMM, read at every
    call, else "auto" (see the module docstring)."""

    name = "cuda"
    devices = ("cuda",)
    description = ("torch GEMMs (Hadamard product of per-scale Grams) + CUDA k-selection "
                   "(pyfk._C_cuda: exact block select fused with the running top-k merge)")
    options = {"gemm": None}
    auto_priority = {"cuda": 1}

    def unavailable_reason(self):
        return available()

    def resolve_options(self, options):
        opts = super().resolve_options(options)
        if opts["gemm"] is not None and opts["gemm"] not in GEMM_MODES:
            raise ValueError(f"gemm: expected None or one of {list(GEMM_MODES)}, got {opts['gemm']!r}")
        return opts

    def chunk_rows(self, m, width, options):
        return chunk_rows(m, width)

    def topk(self, queries, pool, rows, k, state, offset, options):
        dtype = resolve_gemm_dtype(options["gemm"] or default_gemm(), _pool_dtype(pool.parts))
        s, i = topk_update(queries, pool.block(rows), pool.layout.widths, pool.layout.product, k, offset,
                           state.scores, state.index, gemm_dtype=dtype)
        return TopK(s, i)


register(CudaBackend())
