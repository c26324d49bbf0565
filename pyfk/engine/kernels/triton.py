"""Backend `triton`: fused Triton kernel: multi-scale Hadamard-Gram similarity with running top-k.

Math (queries q, pool items p, both normalised, columns = segments of `widths`):
    product:  R(q, p) = sum_j (q_zj . p_zj) * (q_gj . p_gj)     (segments in pairs z_1, g_1, z_2, g_2, ...)
    dot:      R(q, p) = q . p                                   (combine "sum" / "features")
The M x N score matrix is never written.

Kernel (`_fk_topk_kernel`), grid = (cdiv(M, BLOCK_M), SPLITS):
  * inputs Q (M, D) and P (N, D), row-major, float32 / float16 / bfloat16 (same dtype);
    SEG: int32 (S/2, 4) table of [z offset, z width, g offset, g width] per pair.
  * each program owns BLOCK_M query rows and one contiguous range of pool tiles
    (its split). Per pool tile of BLOCK_N = TILE_R x K_PAD rows (TILE_R 1 or 2): per scale, two tl.dot
    accumulations over the z and g columns (K loop in BLOCK_K steps, masked, so
    widths need not be multiples of 16) in float32, then acc += zz * gg (product
    mode; plain-dot mode is one K loop over all D columns). float32 inputs use
    input_precision="ieee" (exact fp32) unless allow_tf32=True.
  * selection in registers: the scores are packed into int64 keys exactly like
    `pyfk.engine.topk_state.pack_keys`, the one key spec (order-preserving float32
    bits in the high word, 2**32 - 2 - global index in the low word; global index =
    index_offset + pool row), so key order == (score descending, index ascending).
    The program keeps a running (BLOCK_M, K_PAD) int64 block sorted descending per
    row. A tile is merged only if some row's best tile key beats its K_PAD-th
    running key: each K_PAD-wide part of the tile is sorted ascending (tl.sort), taken
    elementwise max with the running block (a bitonic merge step: it leaves the
    K_PAD largest of the union) and the result sorted descending again.
    (tl.topk / tl.flip are not used; tl.sort, reshape, permute and split exist in
    triton 3.x.) Padded pool rows get the empty key pack(-inf, -1).
  * output: (M, SPLITS, K_PAD) int64 keys (`kernel_keys`); the launcher
    (`topk_update`) merges the splits into the incoming (M, k) state with
    `TopK.merge` (exact, tie-stable).

Registers per program: the float32 (BLOCK_M, BLOCK_N) accumulators (3 in product
mode), the int64 (BLOCK_M, K_PAD) running keys and the tile keys being sorted.
Query and pool rows are streamed from global memory (L2) once per K step.

float16 / bfloat16 inputs: the kernel ranks on low-precision dot products; the
launcher then re-ranks the best K_PAD >= 2k candidates (a margin of at least k)
with float32 scores recomputed from float32 copies of the candidate rows, and
returns those float32 scores. The answer is exact unless more than K_PAD - k pool
items come within the low-precision rounding error of the k-th best score.

Limits: k <= 128 in the kernel (K_PAD = next power of two >= k, at least 16);
k > 128 falls back to the torch backend's `topk_update` (dense tiles + torch.topk).
Global indices must stay below 2**32 - 1.

Backend options (pyfk.topk(..., backend="triton", options={...})): `splits` (pool
splits per query block; None = enough programs to fill the GPU) and `allow_tf32`
(float32 dots on TF32 tensor cores; default False: exact IEEE fp32).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from pyfk.engine.backend import Backend, register
from pyfk.engine.kernels import _triton_filter as _filter
from pyfk.engine.kernels import torch as _torch_kernel
from pyfk.engine.layout import Layout
from pyfk.engine.topk_state import EMPTY_KEY, MAX_INDEX, TopK, pack_keys, unpack_keys

# triton is imported on first use (`_load`), never at import time: the interpreter
# (TRITON_INTERPRET=1) only works when it is set before triton is first imported.
triton = None
tl = None
_IMPORT_ERROR: str | None = None

MAX_K = 128
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _load() -> str | None:
    """Import triton once; None on success, else why it failed."""
    global triton, tl, _IMPORT_ERROR
    if triton is None and _IMPORT_ERROR is None:
        try:
            import triton as _triton
            import triton.language as _tl
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            _IMPORT_ERROR = f"the Python package 'triton' failed to import ({exc})"
        else:
            triton, tl = _triton, _tl
    return _IMPORT_ERROR


def interpreted() -> bool:
    """Whether kernels run in the Triton interpreter (on CPU tensors): TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> str | None:
    """None when the Triton kernel can run here, else the reason it cannot.

    Imports triton only when it could run (a CUDA device, or TRITON_INTERPRET=1), so
    probing never imports it in a mode a later interpreter session cannot use.
    """
    if triton is None and importlib.util.find_spec("triton") is None:
        return "the Python package 'triton' is not installed"
    if not (torch.cuda.is_available() or interpreted()):
        return "no CUDA device is available (and TRITON_INTERPRET=1 is not set)"
    return _load()


# jitted lazily (`_kernel`); the annotations are strings (__future__), as triton accepts
def _fk_topk_kernel(Q, P, SEG, OUT, M, N, D, n_pairs, index_offset, tiles_per_split, n_splits,
                    stride_qm, stride_pn,
                    PRODUCT: tl.constexpr, BLOCK_M: tl.constexpr, K_PAD: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                    EMPTY: tl.constexpr, MAX_INDEX: tl.constexpr, TILE_R: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    q_rows = Q + rows.to(tl.int64)[:, None] * stride_qm
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    running = tl.full((BLOCK_M, K_PAD), EMPTY, tl.int64)
    t0 = split * tiles_per_split
    for t in range(t0, t0 + tiles_per_split):
        cols = t * BLOCK_N + offs_n
        col_ok = cols < N
        p_cols = P + cols.to(tl.int64)[None, :] * stride_pn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PRODUCT:
            for j in range(n_pairs):
                zo = tl.load(SEG + 4 * j)
                zw = tl.load(SEG + 4 * j + 1)
                go = tl.load(SEG + 4 * j + 2)
                gw = tl.load(SEG + 4 * j + 3)
                zz = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for kk in range(0, zw, BLOCK_K):
                    c = kk + offs_k
                    cm = c < zw
                    a = tl.load(q_rows + (zo + c)[None, :], mask=row_ok[:, None] & cm[None, :], other=0.0)
                    b = tl.load(p_cols + (zo + c)[:, None], mask=cm[:, None] & col_ok[None, :], other=0.0)
                    zz = tl.dot(a, b, zz, input_precision=PRECISION)
                gg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for kk in range(0, gw, BLOCK_K):
                    c = kk + offs_k
                    cm = c < gw
                    a = tl.load(q_rows + (go + c)[None, :], mask=row_ok[:, None] & cm[None, :], other=0.0)
                    b = tl.load(p_cols + (go + c)[:, None], mask=cm[:, None] & col_ok[None, :], other=0.0)
                    gg = tl.dot(a, b, gg, input_precision=PRECISION)
                acc += zz * gg
        else:
            for kk in range(0, D, BLOCK_K):
                c = kk + offs_k
                cm = c < D
                a = tl.load(q_rows + c[None, :], mask=row_ok[:, None] & cm[None, :], other=0.0)
                b = tl.load(p_cols + c[:, None], mask=cm[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
        # pack (score, global index) into int64 keys: pyfk.engine.topk_state.pack_keys, mirrored
        # here (tests/engine/test_key_spec.py holds the two to one answer)
        s = tl.where(acc == 0.0, 0.0, acc)  # fold -0 into +0
        bits = s.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order == signed int order
        gidx = cols.to(tl.int64) + index_offset
        keys = (bits.to(tl.int64) << 32) + (MAX_INDEX - gidx)[None, :]  # MAX_INDEX = 2**32 - 2
        keys = tl.where(col_ok[None, :], keys, EMPTY)
        # merge only when some row's best tile key beats its K_PAD-th running key
        beats = tl.max(keys, axis=1) > tl.min(running, axis=1)
        if tl.max(beats.to(tl.int32), axis=0) > 0:
            if TILE_R == 2:  # two K_PAD-wide halves, merged one after the other
                halves = tl.permute(tl.reshape(keys, (BLOCK_M, 2, K_PAD)), (0, 2, 1))
                first, second = tl.split(halves)
                running = tl.sort(tl.maximum(running, tl.sort(first, dim=1)), dim=1, descending=True)
                running = tl.sort(tl.maximum(running, tl.sort(second, dim=1)), dim=1, descending=True)
            else:
                running = tl.sort(tl.maximum(running, tl.sort(keys, dim=1)), dim=1, descending=True)
    offs_out = tl.arange(0, K_PAD)
    out = OUT + (rows.to(tl.int64)[:, None] * n_splits + split) * K_PAD + offs_out[None, :]
    tl.store(out, running, mask=row_ok[:, None])


_JITTED = []
# Integer arguments that change from call to call on one pool (the registry chunk's size and global
# offset, the split plan): Triton would otherwise specialise the compiled kernel on their value
# being 1 or a multiple of 16 and recompile inside timed loops. D, n_pairs and the row strides stay
# specialised: they are fixed per pool, and a stride divisible by 16 lets loads vectorise.
RUNTIME_INTS = ("M", "N", "index_offset", "tiles_per_split", "n_splits")


def _kernel():
    """The jitted kernel (compiled, or interpreted under TRITON_INTERPRET=1)."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the Triton backend is not available: {reason}")
    if not _JITTED:
        _JITTED.append(triton.jit(_fk_topk_kernel, do_not_specialize=RUNTIME_INTS))
    return _JITTED[0]


def default_warps(dtype, k_pad: int) -> int:
    """Warps per program: 4 for float16/bfloat16 up to K_PAD 64 (the main configuration), else 8.
    From the sm_90 compile report (benchmarks/compile_report.py, triton 3.9 / ptxas 13.4): at 4 warps
    float32 spills 24-68 B at every K_PAD and low precision 740 B at K_PAD 128; at 8 warps both are
    spill-free up to K_PAD 128. K_PAD 256 (k > 64 at low precision, 2k candidates) spills at 4, 8 and
    16 warps. Chosen without a GPU: to be confirmed by timing (benchmarks/gpu_suite.py)."""
    return 4 if dtype in _LOW_PRECISION and k_pad <= 64 else 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _seg_table(widths, product: bool, device) -> torch.Tensor:
    """int32 (S/2, 4) [z offset, z width, g offset, g width] per (z_j, g_j) pair; one zero row in dot mode."""
    rows = [[z.start, z.stop - z.start, g.start, g.stop - g.start] for z, g in _pairs(widths, product)]
    return torch.tensor(rows or [[0, 0, 0, 0]], dtype=torch.int32, device=device)


def _pairs(widths, product: bool) -> list[tuple[slice, slice]]:
    """(z_j, g_j) column slices when product, else none (one plain dot product)."""
    return Layout(tuple(widths), "product").pairs() if product else []


def _default_splits(m_blocks: int, n_tiles: int, device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_tiles, -(-2 * sms // max(1, m_blocks))))
    return 1


def check_splits(splits) -> int | None:
    """Option `splits`: None or a positive int; anything else raises ValueError naming it."""
    if splits is None:
        return None
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits: expected None or a positive integer, got {splits!r}")
    return int(splits)


def kernel_keys(q, p, widths, product, k, index_offset, *, splits=None, allow_tf32=False, block_m=None,
                block_k=None, tile_r=None, num_warps=None) -> torch.Tensor:
    """The fused kernel's raw output: (M, S, K_PAD) int64 keys (pyfk.engine.topk_state.pack_keys
    of (score, index_offset + pool row)), per query row and pool split s the K_PAD best of that
    split sorted descending, padded with EMPTY_KEY; K_PAD = max(16, next power of two >= k).

    q (M, D), p (N, D): normalised, same dtype (float32, float16 or bfloat16), contiguous;
    1 <= k <= 2 * MAX_K. S = the splits actually launched (at most `splits`).
    """
    m, n = q.shape[0], p.shape[0]
    low = q.dtype in _LOW_PRECISION
    d = q.shape[1]
    k_pad = max(16, _next_pow2(k))
    if m == 0 or n == 0:
        return torch.full((m, 1, k_pad), EMPTY_KEY, dtype=torch.int64, device=q.device)
    # defaults: a ~64 x 32 score tile per program; warps by default_warps (spill-free up to K_PAD 128)
    bm = block_m or (64 if k_pad <= 32 else max(16, 2048 // k_pad))
    bk = block_k or (32 if q.dtype == torch.float32 else 64)
    tile_r = int(tile_r) if tile_r else (2 if bm * k_pad * 2 <= 2048 else 1)
    num_warps = num_warps or default_warps(q.dtype, k_pad)
    if tile_r not in (1, 2):
        raise ValueError(f"tile_r: expected 1 or 2, got {tile_r}")
    m_blocks = _cdiv(m, bm)
    n_tiles = _cdiv(n, k_pad * tile_r)
    splits = int(splits) if splits else _default_splits(m_blocks, n_tiles, q.device)
    splits = max(1, min(splits, n_tiles))
    tiles_per_split = _cdiv(n_tiles, splits)
    splits = _cdiv(n_tiles, tiles_per_split)
    seg = _seg_table(list(widths), product, q.device)
    out = torch.empty((m, splits, k_pad), dtype=torch.int64, device=q.device)
    precision = "tf32" if (allow_tf32 and not low) else "ieee"
    _kernel()[(m_blocks, splits)](
        q, p, seg, out, m, n, d, len(widths) // 2 if product else 0, int(index_offset), tiles_per_split, splits,
        q.stride(0), p.stride(0),
        PRODUCT=bool(product), BLOCK_M=bm, K_PAD=k_pad, BLOCK_K=bk, PRECISION=precision,
        EMPTY=EMPTY_KEY, MAX_INDEX=MAX_INDEX, TILE_R=tile_r, BLOCK_N=k_pad * tile_r,
        num_warps=num_warps)
    return out


def topk_update(q, p, widths, product, k, index_offset, scores, index, *, splits=None, allow_tf32=False,
                q_exact=None, p_exact=None, block_m=None, block_k=None, tile_r=None, num_warps=None):
    """Merge the top-k of q x p (pool rows numbered from index_offset) into the sorted
    (M, k) state (scores float32, index int64; -1 = empty). Returns the new state.

    q (M, D), p (N, D): normalised, same dtype (float32, float16 or bfloat16; others
    are computed in float32). widths: segment widths (pairs z_j, g_j when product).
    k <= 128 runs the fused kernel; k > 128 falls back to the torch backend's `topk_update`.
    splits: pool splits per query block (default: enough programs to fill the GPU).
    allow_tf32: float32 dots on TF32 tensor cores instead of exact IEEE fp32.
    q_exact / p_exact: float32 copies of q / p used to re-rank float16/bfloat16
    results exactly (default: q.float() / p.float()).
    block_m / block_k / tile_r / num_warps: tuning (query rows per program, K step,
    pool tile = tile_r x K_PAD rows with tile_r in {1, 2}, warps: default_warps).
    """
    m, n = q.shape[0], p.shape[0]
    if k > MAX_K:
        q32 = q_exact if q_exact is not None else q.float()
        p32 = p_exact if p_exact is not None else p.float()
        return _torch_kernel.topk_update(q32, p32, widths, product, k, index_offset, scores, index)
    if m == 0 or n == 0:
        return scores, index
    if q.dtype != p.dtype or q.dtype not in (torch.float32, *_LOW_PRECISION):
        q, p = q.float(), p.float()
    low = q.dtype in _LOW_PRECISION
    q = q.contiguous()
    p = p.contiguous()
    keys = kernel_keys(q, p, widths, product, 2 * k if low else k, index_offset, splits=splits,
                       allow_tf32=allow_tf32, block_m=block_m, block_k=block_k, tile_r=tile_r,
                       num_warps=num_warps)
    k_pad = keys.shape[2]
    cand = keys.view(m, -1)
    if low:  # re-rank the best K_PAD (>= 2k) low-precision candidates in float32
        r = min(cand.shape[1], k_pad)
        top = cand.topk(r, dim=1, sorted=True).values if r < cand.shape[1] else cand
        _, cidx = unpack_keys(top)
        q32 = q_exact if q_exact is not None else q.float()
        p32 = p_exact if p_exact is not None else p.float()
        p32 = p32.to(q.device)
        local = torch.where(cidx >= 0, cidx - index_offset, cidx)
        exact = _filter.exact_scores(q32.to(q.device), lambda rows: p32[rows], list(widths), product, local)
        cand = pack_keys(exact, cidx)
    state = TopK(scores, index).merge(TopK.from_keys(cand))
    return state.scores, state.index


def similarity(q, p, widths, product):
    """Dense (M, N) scores (small inputs only): the torch reference."""
    return _torch_kernel.similarity(q.float(), p.float(), widths, product)


def chunk_rows(m: int, width: int) -> int:
    """Pool rows per call: a ~512 MiB normalised float32 chunk."""
    return max(4096, (512 << 20) // (4 * max(width, 1)))


def _parts_low_dtype(parts):
    """float16 / bfloat16 when every pool segment is a torch tensor of that one dtype, else None."""
    dtypes = {a.dtype if isinstance(a, torch.Tensor) else None for a in parts}
    if len(dtypes) == 1:
        dt = dtypes.pop()
        if dt in _LOW_PRECISION:
            return dt
    return None


KERNELS = ("filter", "merge")
TILE_OPTIONS = ("block_m", "block_n", "group_m", "num_warps", "num_stages", "programs")


def tile_config(options) -> _filter.Config:
    """v2's launch configuration: `_filter.Config` defaults, overridden by the options in
    TILE_OPTIONS that are not None (checked: ValueError naming the option)."""
    return _filter.Config(**{name: options[name] for name in TILE_OPTIONS
                             if options.get(name) is not None}).check()


def filter_kernel():
    """The jitted v2 kernel (pyfk/engine/kernels/_triton_filter.py)."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the Triton backend is not available: {reason}")
    return _filter.jitted(triton, tl)


class TritonBackend(Backend):
    """Options: kernel ("filter": v2, threshold then filter, any k, one launch over the pool;
    "merge": v1, running top-k merged in registers, k <= 128), precision (v2's pool buffer:
    None = float16, or bfloat16 when values exceed float16's safe range; "fp16", "bf16", "fp32"),
    splits (v1: pool splits per query block; None = enough programs to fill the GPU),
    allow_tf32 (v1: float32 dots on TF32 tensor cores instead of exact IEEE fp32; v2 always runs a
    float32 buffer on TF32 tensor cores, its margin covering their rounding, and re-scores in float32),
    and v2's launch tuning (None = the tuned default of `_triton_filter.Config`): block_m, block_n
    (query and pool rows per tile, powers of two in [16, 128]), group_m (query blocks sharing a pool
    tile in L2), num_warps, num_stages (K-loop pipeline depth), programs (persistent programs;
    None = one per SM).

    v2 prepares the pool once per PreparedPool (a padded low-precision buffer, cached in
    `pool.extra`) and returns exact float32 top-k (see _triton_filter). v1 normalises each pool
    chunk on the device and computes in the pool's dtype when every segment is float16/bfloat16
    (candidates re-ranked in float32), else in float32.
    """

    name = "triton"
    devices = ("cuda",)
    description = "fused Triton Hadamard-Gram top-k (v2: sampled threshold, filtered candidates, fp32 re-score)"
    options = {"kernel": "filter", "precision": None, "splits": None, "allow_tf32": False,
               **{name: None for name in TILE_OPTIONS}}
    auto_priority = {"cuda": 0}

    def unavailable_reason(self):
        return available()

    def accepts(self, device_type):
        """CUDA tensors; and CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, how CI
        runs this kernel), so that pyfk.topk(..., backend="triton") is tested through the public
        API. CPU stays out of `devices`: "auto" and the every-CPU-backend tests never pick the
        interpreter, which is orders of magnitude slower."""
        return device_type in self.devices or (device_type == "cpu" and interpreted())

    def info(self):
        return {**super().info(), "interpreter": interpreted()}

    def resolve_options(self, options):
        """The defaults updated with `options`, checked (ValueError naming a bad option)."""
        opts = super().resolve_options(options)
        if opts["kernel"] not in KERNELS:
            raise ValueError(f"kernel: expected one of {list(KERNELS)}, got {opts['kernel']!r}")
        if opts["precision"] is not None and opts["precision"] not in _filter.PRECISIONS:
            raise ValueError(f"precision: expected None or one of {list(_filter.PRECISIONS)}, "
                             f"got {opts['precision']!r}")
        check_splits(opts["splits"])
        if not isinstance(opts["allow_tf32"], (bool, np.bool_)):
            raise ValueError(f"allow_tf32: expected True or False, got {opts['allow_tf32']!r}")
        tuned = {name: opts[name] for name in TILE_OPTIONS if opts[name] is not None}
        if tuned and opts["kernel"] != "filter":
            raise ValueError(f"{', '.join(tuned)}: options of the v2 kernel (kernel='filter'), "
                             f"got kernel={opts['kernel']!r}")
        tile_config(opts)  # ValueError naming a bad value
        return opts

    def chunk_rows(self, m, width, options):
        if options["kernel"] == "filter":  # one launch over the whole (prepared) pool
            return 1 << 62
        return chunk_rows(m, width)

    def topk(self, queries, pool, rows, k, state, offset, options):
        if options["kernel"] == "filter":
            return self._filter_topk(queries, pool, rows, k, state, offset, options)
        p32 = pool.block(rows)
        q32 = queries.float()
        low = _parts_low_dtype(pool.parts) if k <= MAX_K else None
        q, p = (q32.to(low), p32.to(low)) if low is not None else (q32, p32)
        s, i = topk_update(q, p, pool.layout.widths, pool.layout.product, k, offset, state.scores, state.index,
                           splits=options["splits"], allow_tf32=bool(options["allow_tf32"]),
                           q_exact=q32, p_exact=p32)
        return TopK(s, i)

    def _filter_topk(self, queries, pool, rows, k, state, offset, options, stats=None):
        stats = stats if stats is not None else _filter.Stats()
        with _filter.stage(stats, "prepare", pool.device):
            fpool = _filter.FilterPool.of(pool, options["precision"])
        if isinstance(rows, slice):
            start = rows.indices(pool.n)[0]

            def pool_rows(local):
                return local.cpu().numpy() + start
        else:
            sel = np.asarray(rows)

            def pool_rows(local):
                return sel[local.cpu().numpy()]

        def fetch(local):
            return pool.block(pool_rows(local))

        def reference(q, st):  # rows the filter gave up on: the torch reference, chunk by chunk
            positions = np.arange(pool.n)[rows] if isinstance(rows, slice) else np.asarray(rows)
            step = pool.stream_rows
            s, i = st.scores, st.index
            for lo in range(0, len(positions), step):
                block = pool.block(positions[lo:lo + step])
                s, i = _torch_kernel.topk_update(q, block, pool.layout.widths, pool.layout.product, k,
                                                 offset + lo, s, i)
            return TopK(s, i)

        return _filter.filter_topk(filter_kernel(), queries.float(), fpool, rows, k, state, offset, fetch,
                                   pool.layout.product, cfg=tile_config(options), stats=stats,
                                   reference=reference)


register(TritonBackend())
