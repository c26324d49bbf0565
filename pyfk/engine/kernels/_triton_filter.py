"""The `triton` backend's v2 kernel: threshold, then filter (issue #12). Part of the triton backend
(pyfk/engine/kernels/triton.py), which imports it; it registers nothing itself.

Exact top-k of R(q, p) (see triton.py for R) in five steps, none of which sorts in the hot loop:

1. Prepare once (`FilterPool`, cached on the PreparedPool): the normalised pool rounded to a
   low-precision dtype (float16 default, bfloat16, or float32) in a zero-padded buffer whose
   segments start and end on multiples of 16 columns, rows padded to a multiple of MAX_BLOCK_N.
   Segment offsets, widths and K steps are compile-time constants, so every load is unmasked and
   16-byte aligned (vectorised, pipelined by `num_stages`). Also kept: per segment, the largest
   row norm ||p_j|| and the largest rounding residual ||round(p_j) - p_j|| over the pool.
2. Bounds: per (query, pool row) the kernel computes its score s_hat and a proven error bound e
   with s_hat - e <= s_f <= s_hat + e, s_f the float32 re-score (`error_table`: per-query
   coefficients from the rows' norms and measured rounding residuals, times the kernel's own
   |z_j.z_j'| and |g_j.g_j'| -- far tighter than a bound from norms alone).
3. Threshold: the kernel in DENSE mode scores the queries against a seeded random sample of the
   pool; tau = the k-th best lower bound s_hat - e over the sample, so tau <= the k-th best s_f
   of the pool. An incoming state raises tau to its k-th score.
4. Filter: one launch over the pool (FILTER mode): a persistent grid walks (query block, pool
   tile) tiles in grouped order (GROUP_M query blocks share each pool tile while it is in L2);
   per tile, fp32 accumulators per scale, the product epilogue with the bound, then
   `s_hat + e >= tau[row]`: every row of the exact top-k passes. Hits are appended with relaxed
   atomics to per-row candidate buffers (lower bound, upper bound, row). A row whose buffer
   overflows is redone with tau raised to its stored candidates' k-th best lower bound (still
   <= the k-th best); after MAX_REDOS the torch reference.
5. Select: per row, every candidate whose upper bound reaches the k-th best lower bound among
   its candidates (this includes the exact top-k) is re-scored in float32 from the float32 rows
   and merged into the state with `TopK.merge` (exact, ties to the smaller index).

The answer equals the float32 top-k of the re-scored values; the bounds only decide how many
candidates are kept and re-scored, never which are right.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pyfk.engine.topk_state import TopK

# set by `jitted(triton, tl)` before the kernel is compiled (triton is imported lazily by triton.py)
triton = None
tl = None

MAX_BLOCK_N = 128  # pool rows are padded to a multiple of this: any BLOCK_N up to it loads unmasked
SEG_ALIGN = 16  # segment widths and offsets are padded to multiples of this (the MMA K granule)
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FP16_SAFE = 2.0 ** 14  # above this |value| the float16 buffer could overflow: bfloat16 is used
SAMPLE_DIV = 32  # the sample is ~1/32 of the pool ...
SAMPLE_PER_K = 32  # ... and at least 32 k rows (expected candidates per row ~ k * n / sample)
MIN_CAP = 64
MAX_CAP = 1 << 16  # candidate slots per query row, at most
WORK_BYTES = 512 << 20  # dense sample scores + candidate buffer per query chunk
MAX_REDOS = 3
RESCORE_ELEMS = 1 << 24  # float32 elements gathered per re-score step

# unit roundoffs of the inputs (rounding to nearest) and of the accumulation (per add, relative)
# tensor-core float32 accumulation is not IEEE round-to-nearest on every GPU (truncation, few
# guard bits): 4 ulps per add, generous; the IEEE float32 path (FMA) gets 2 ulps
_U_ACC_MMA = 2.0 ** -21
_U_ACC_IEEE = 2.0 ** -23
_U32 = 2.0 ** -24  # one float32 rounding (products and sums outside the MMA)
_TF32_INPUT = 2.0 ** -10  # tf32 input rounding, truncation allowed


def _filter_kernel(Q, P, KCOL, ERR, TAU, CNT, CAND_HI, CAND_I, OUT_LO, OUT_HI,
                   row_lo, row_hi, m_blocks, n_blocks, first_block, cap, n_steps, n_pairs,
                   stride_e, stride_cm, stride_om, cross,
                   STEP: tl.constexpr, PRODUCT: tl.constexpr, DENSE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                   NUM_STAGES: tl.constexpr):
    """Q, P: tensor descriptors (TMA on Hopper) of the padded query and pool buffers (step 1),
    blocks [BLOCK_M, STEP] and [BLOCK_N, STEP]. KCOL: int32, flat (`PaddedLayout.steps`): per K
    step the z column and the g column (product; dot mode reads the first only) and a 0, then per
    pair its first and end step. ERR: float32 (q rows, stride_e) per query row: product mode
    [cz_0, cg_0, cz_1, cg_1, ..., K], dot mode [K] (`error_table`); cross: the a*b coefficient.
    Per (query, pool row) the kernel's score s_hat and its error bound
        e = K + sum_j (|zz_j| cz_j + |gg_j| cg_j + cross |zz_j| |gg_j|) + 2^-22 |s_hat|
    (dot mode: e = K + 2^-22 |s_hat|), so that s_hat - e <= s_f <= s_hat + e for the float32
    re-score s_f. Pool rows [row_lo, row_hi) of P are scored. Tiles: m_blocks query blocks x
    n_blocks pool blocks from pool block first_block (= row_lo // BLOCK_N).
    DENSE: OUT_LO[q, r - row_lo] = s_hat - e, OUT_HI[...] = s_hat + e (float32).
    FILTER: every hit s_hat + e >= TAU[q] appended at CNT[q] to CAND_HI[q, :cap] (s_hat + e,
    float32) and CAND_I[q, :cap] (r - row_lo, int32); CNT counts every hit, stored or not (no
    lower bound is stored: one more store spills registers; the host gets lower bounds by
    re-scoring). Offsets inside a tile are int32 from a 64-bit tile base (fewer registers)."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_tiles = m_blocks * n_blocks
    per_group = GROUP_M * n_blocks
    # num_stages=1: the tile loop is not software-pipelined; the one K loop over every pair is
    for tile in tl.range(pid, n_tiles, n_programs, num_stages=1):
        # grouped order: GROUP_M query blocks take each pool block in turn (it stays in L2)
        group = tile // per_group
        first_m = group * GROUP_M
        size_m = tl.minimum(m_blocks - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % size_m
        pid_n = first_block + (tile % per_group) // size_m
        q_row = pid_m * BLOCK_M
        p_row = pid_n * BLOCK_N
        err_rows = ERR + q_row.to(tl.int64) * stride_e + tl.arange(0, BLOCK_M) * stride_e
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        err = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + tl.load(err_rows + (stride_e - 1))[:, None]
        if PRODUCT:
            # per pair a pipelined K loop over its steps (z_j and g_j padded to one width, two dots
            # per step), then acc += zz * gg and the pair's error terms. The accumulators restart
            # outside the pipelined loop: zeroing them inside it serialises the wgmmas (ptxas C7515)
            for j in range(0, n_pairs):
                first = tl.load(KCOL + 3 * n_steps + 2 * j)
                last = tl.load(KCOL + 3 * n_steps + 2 * j + 1)
                zz = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                gg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for i in tl.range(first, last, num_stages=NUM_STAGES):
                    cz = tl.load(KCOL + 3 * i)
                    cg = tl.load(KCOL + 3 * i + 1)
                    zz = tl.dot(Q.load([q_row, cz]), P.load([p_row, cz]).T, zz, input_precision=PRECISION)
                    gg = tl.dot(Q.load([q_row, cg]), P.load([p_row, cg]).T, gg, input_precision=PRECISION)
                a = tl.abs(zz)
                b = tl.abs(gg)
                coef_z = tl.load(err_rows + 2 * j)
                coef_g = tl.load(err_rows + 2 * j + 1)
                err += a * coef_z[:, None] + b * (coef_g[:, None] + cross * a)
                acc += zz * gg
        else:
            for i in tl.range(0, n_steps, num_stages=NUM_STAGES):
                c = i * STEP
                acc = tl.dot(Q.load([q_row, c]), P.load([p_row, c]).T, acc, input_precision=PRECISION)
        # the float32 roundings of s_hat -/+ e themselves (<= 2^-24 |s_hat| each, and the relative
        # ones of e are inside the host's 2^-10 slack)
        err += 2.384185791015625e-07 * tl.abs(acc)  # 2^-22
        rows = q_row + tl.arange(0, BLOCK_M)
        cols = p_row + tl.arange(0, BLOCK_N)
        col_ok = (cols >= row_lo) & (cols < row_hi)
        hi = acc + err
        if DENSE:
            offs = q_row.to(tl.int64) * stride_om + (tl.arange(0, BLOCK_M)[:, None] * stride_om
                                                     + (cols - row_lo)[None, :])
            tl.store(OUT_HI + offs, hi, mask=col_ok[None, :])
            tl.store(OUT_LO + offs, acc - err, mask=col_ok[None, :])
        else:
            tau = tl.load(TAU + rows)
            hit = (hi >= tau[:, None]) & col_ok[None, :]
            if tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0) > 0:
                # a slot per hit: one relaxed atomic add on its row's counter (hits are rare). Done
                # on the flattened tile: a prefix sum per row costs ~60 more registers and
                # spills, and triton 3.9 fails to compile a 2-D atomic in the MMA layout
                flat_hit = tl.reshape(hit, (BLOCK_M * BLOCK_N,))
                row_in_tile = tl.arange(0, BLOCK_M * BLOCK_N) // BLOCK_N
                pos = tl.atomic_add(CNT + q_row + row_in_tile, flat_hit.to(tl.int32), mask=flat_hit,
                                    sem="relaxed")
                keep = flat_hit & (pos < cap)
                offs = q_row.to(tl.int64) * stride_cm + (row_in_tile * stride_cm + pos)
                tl.store(CAND_HI + offs, tl.reshape(hi, (BLOCK_M * BLOCK_N,)), mask=keep)
                local = p_row - row_lo + tl.arange(0, BLOCK_M * BLOCK_N) % BLOCK_N
                tl.store(CAND_I + offs, local, mask=keep)


# Integers that change between calls on one pool: not specialised (no recompiles in timed loops).
RUNTIME_INTS = ("row_lo", "row_hi", "m_blocks", "n_blocks", "first_block", "cap")
# n_steps and n_pairs stay specialised: fixed per layout
_JITTED = []


def jitted(triton_module, tl_module):
    """The jitted kernel; triton.py passes the modules it imported (lazily, interpreter-aware)."""
    global triton, tl
    if not _JITTED:
        triton, tl = triton_module, tl_module
        _JITTED.append(triton.jit(_filter_kernel, do_not_specialize=RUNTIME_INTS))
    return _JITTED[0]


# ----------------------------------------------------------------------------- layout and buffers

def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


@dataclass(frozen=True)
class PaddedLayout:
    """Where each segment sits in the padded buffers, and the K step (the TMA block width).

    product: z_j and g_j are both padded to one width, a multiple of `step`, so one K loop walks
    every pair with two dots per step; sum/features: segments padded to SEG_ALIGN and the row to
    a multiple of `step` (one dot over all columns). step: the largest of 64, 32, 16 that divides
    every padded width. Padding columns are zero: they add nothing to any dot product."""

    widths: tuple[int, ...]  # the true widths
    padded: tuple[int, ...]
    offsets: tuple[int, ...]
    step: int
    width: int  # D_pad
    product: bool

    @classmethod
    def of(cls, widths, product: bool) -> PaddedLayout:
        widths = tuple(int(w) for w in widths)
        if product:
            pairs = [_round_up(max(z, g), SEG_ALIGN) for z, g in zip(widths[0::2], widths[1::2])]
            step = next(st for st in (64, 32, 16) if all(w % st == 0 for w in pairs))
            padded = tuple(w for w in pairs for _ in (0, 1))
            width = sum(padded)
        else:
            padded = tuple(_round_up(w, SEG_ALIGN) for w in widths)
            total = sum(padded)
            step = 64 if total >= 128 else 32 if total >= 64 else 16
            width = _round_up(total, step)
        offsets = tuple(int(x) for x in np.cumsum((0,) + padded[:-1]))
        return cls(widths, padded, offsets, step, width, bool(product))

    @property
    def n_pairs(self) -> int:
        """(z_j, g_j) pairs (product); 0 in dot mode."""
        return len(self.padded) // 2 if self.product else 0

    @property
    def n_steps(self) -> int:
        """K steps of `step` columns: over every pair (product), or over all columns."""
        if self.product:
            return sum(self.padded[0::2]) // self.step
        return self.width // self.step

    def steps(self) -> np.ndarray:
        """The kernel's int32 step table, flat: n_steps rows (z column, g column, 0) -- dot mode:
        (column, column, 0) -- then n_pairs rows (first step, end step) of each pair's steps."""
        if not self.product:
            cols = np.arange(0, self.width, self.step)
            return np.stack([cols, cols, np.zeros_like(cols)], 1).astype(np.int32).reshape(-1)
        rows, bounds = [], []
        for j in range(0, len(self.padded), 2):
            n = self.padded[j] // self.step
            bounds += [len(rows), len(rows) + n]
            rows += [(self.offsets[j] + t * self.step, self.offsets[j + 1] + t * self.step, 0) for t in range(n)]
        return np.concatenate([np.asarray(rows, dtype=np.int32).reshape(-1), np.asarray(bounds, dtype=np.int32)])


def pad_rows(x32: torch.Tensor, lay: PaddedLayout, dtype, rows_to: int):
    """x32 (n, D) float32 normalised rows -> (buffer (n_pad, D_pad) of `dtype`, zero-padded,
    norms (n, S) float64 per segment, residuals (n, S) float64 = ||round(x_j) - x_j|| per segment)."""
    n = x32.shape[0]
    buf = torch.zeros((_round_up(max(n, 1), rows_to), lay.width), dtype=dtype, device=x32.device)
    norms = torch.empty((n, len(lay.widths)), dtype=torch.float64, device=x32.device)
    resid = torch.empty_like(norms)
    src = 0
    for s, (w, off) in enumerate(zip(lay.widths, lay.offsets)):
        seg = x32[:, src:src + w]
        low = seg.to(dtype)
        buf[:n, off:off + w] = low
        seg64 = seg.to(torch.float64)
        norms[:, s] = seg64.norm(dim=1)
        resid[:, s] = (low.to(torch.float64) - seg64).norm(dim=1)
        src += w
    return buf, norms, resid


def choose_dtype(precision: str | None, max_abs: float) -> torch.dtype:
    """The buffer dtype: `precision` ("fp16", "bf16", "fp32"), or None = float16 unless values
    reach FP16_SAFE (then bfloat16, which has float32's range)."""
    if precision is not None:
        return PRECISIONS[precision]
    return torch.float16 if max_abs < FP16_SAFE else torch.bfloat16


class FilterPool:
    """A pool prepared for the v2 kernel (step 1): `buffer` (N_pad, D_pad), its PaddedLayout,
    per-segment max row norm and max rounding residual over the pool (float64, (S,)).

    One pass over the pool, each block normalised once. With precision None the buffer starts as
    float16 and is rebuilt as bfloat16 if a block reaches FP16_SAFE (`choose_dtype`)."""

    def __init__(self, pool, precision: str | None):
        self.layout = PaddedLayout.of(pool.layout.widths, pool.layout.product)
        self.steps = torch.as_tensor(self.layout.steps(), device=pool.device)
        self.n = pool.n
        self._fill(pool, choose_dtype(precision, 0.0), adaptive=precision is None)

    def _fill(self, pool, dtype: torch.dtype, adaptive: bool) -> None:
        self.dtype = dtype
        self.buffer = torch.zeros((_round_up(max(pool.n, 1), MAX_BLOCK_N), self.layout.width), dtype=dtype,
                                  device=pool.device)
        S = len(self.layout.widths)
        self.norm_max = torch.zeros(S, dtype=torch.float64, device=pool.device)
        self.resid_max = torch.zeros_like(self.norm_max)
        step = pool.stream_rows
        for start in range(0, pool.n, step):
            stop = min(pool.n, start + step)
            block = pool.block(slice(start, stop))
            if adaptive and choose_dtype(None, float(block.abs().max())) != dtype:
                return self._fill(pool, choose_dtype(None, FP16_SAFE), adaptive=False)  # rare: start over
            buf, norms, resid = pad_rows(block, self.layout, dtype, 1)
            self.buffer[start:stop] = buf[:stop - start]
            self.norm_max = torch.maximum(self.norm_max, norms.amax(0))
            self.resid_max = torch.maximum(self.resid_max, resid.amax(0))

    @staticmethod
    def of(pool, precision: str | None) -> FilterPool:
        """The cached FilterPool of a PreparedPool (built on first use)."""
        key = ("triton-filter", precision)
        if key not in pool.extra:
            pool.extra[key] = FilterPool(pool, precision)
        return pool.extra[key]

    def rows(self, sel) -> tuple[torch.Tensor, int, int]:
        """(buffer, row_lo, row_hi) holding pool rows `sel` (a slice: a view of the buffer; an int64
        array: those rows gathered into a new padded buffer)."""
        if isinstance(sel, slice):
            lo, hi, _ = sel.indices(self.n)
            return self.buffer, lo, hi
        idx = torch.as_tensor(np.asarray(sel), device=self.buffer.device)
        sub = torch.zeros((_round_up(max(len(idx), 1), MAX_BLOCK_N), self.layout.width), dtype=self.dtype,
                          device=self.buffer.device)
        sub[:len(idx)] = self.buffer[idx]
        return sub, 0, len(idx)


def sample_size(n: int, k: int) -> int:
    """Pool rows sampled for the threshold: ~n / SAMPLE_DIV, at least SAMPLE_PER_K * k, at most n."""
    return min(n, max(SAMPLE_PER_K * k, -(-n // SAMPLE_DIV)))


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for a buffer dtype: a float32 buffer runs on TF32 tensor cores (the
    margin covers their rounding): the IEEE float32 FMA path spills kilobytes at every tile size
    of the sm_90 compile report."""
    return "tf32" if dtype == torch.float32 else "ieee"


# ----------------------------------------------------------------------------- the error bound

def _gamma(n: int, u: float) -> float:
    """Worst-case relative error of a sum of n terms with relative error u per add (n u < 1)."""
    nu = n * u
    return nu / (1.0 - nu)


SLACK = 1.0 + 2.0 ** -10  # covers the float32 arithmetic of e itself (relative error < 1e-6)


def error_table(q_norm, q_resid, p_norm, p_resid, widths, product: bool, dtype, tf32: bool = False):
    """(table (M, W) float64, cross) such that the kernel's per-element bound
        e = K + sum_j (|zz_j| cz_j + |gg_j| cg_j + cross |zz_j| |gg_j|)   (+ 2^-22 |s_hat|, in-kernel)
    satisfies |s_hat - s_f| <= e for every (query, pool row): s_hat the kernel's score from rounded
    rows (`dtype`), zz_j / gg_j its pair-j dots, s_f the float32 re-score (`exact_scores`) of the
    float32 rows. Rows of the table: product [cz_0, cg_0, cz_1, cg_1, ..., K], dot mode [K].

    q_norm, q_resid (M, S): per query and segment ||q_j|| and ||round(q_j) - q_j||; p_norm, p_resid
    (S,): the pool's largest. One dot of n columns, a = q_j, b = p_j (Cauchy-Schwarz):
        kernel   E: |round(a).round(b) - a.b| <= |da| |b| + |a| |db| + |da| |db|
                    + gamma_n(u_acc) (|a| + |da|)(|b| + |db|)
        re-score F: gamma_{n+1}(2^-24) |a| |b|          (float32 products, then a float32 sum)
    product: with Z' = E_z + F_z, G' = E_g + F_g, the kernel's dots zz, gg and X = |zz| + Z',
    Y = |gg| + G' (bounds on |Z| and on the re-score's dots), a pair's products differ by at most
        |zz| G' + |gg| Z' + Z' G'  (= X Y - |zz||gg|)
    and the float32 roundings of both products and both sums over P pairs add at most
    c X Y, c = 2 (2^-24 + gamma_P(2^-24)) (1 + 2^-24). Expanded per pair: |zz| G'(1+c) +
    |gg| Z'(1+c) + Z'G'(1+c) + c |zz||gg|; everything times SLACK. Dot mode: K = E + F over all
    columns at once, times SLACK. Unlike a bound from norms alone (|Z| <= |a||b|), the kernel's
    own |zz|, |gg| make e ~sqrt(width) times tighter on typical rows.
    """
    q_norm = q_norm.to(torch.float64)
    q_resid = q_resid.to(torch.float64)
    p_norm = p_norm.to(device=q_norm.device, dtype=torch.float64)
    p_resid = p_resid.to(device=q_norm.device, dtype=torch.float64)
    if tf32:  # inputs rounded inside the MMA: not measurable, take the worst case
        q_resid = q_resid + _TF32_INPUT * q_norm
        p_resid = p_resid + _TF32_INPUT * p_norm
    u_acc = _U_ACC_IEEE if (dtype == torch.float32 and not tf32) else _U_ACC_MMA

    def dot_bound(a, da, b, db, n):
        """E + F of one dot of n columns."""
        kern = da * b + a * db + da * db + _gamma(n, u_acc) * (a + da) * (b + db)
        return kern + _gamma(n + 1, _U32) * a * b

    if not product:
        n = int(sum(widths))
        a = q_norm.square().sum(1).sqrt()
        da = q_resid.square().sum(1).sqrt()
        b = p_norm.square().sum().sqrt()  # max_r sqrt(sum_j |p_rj|^2) <= sqrt(sum_j max_r |p_rj|^2)
        db = p_resid.square().sum().sqrt()
        return (dot_bound(a, da, b, db, n) * SLACK)[:, None], 0.0

    n_pairs = len(widths) // 2
    c = 2 * (_U32 + _gamma(n_pairs, _U32)) * (1 + _U32)
    table = torch.empty((q_norm.shape[0], 2 * n_pairs + 1), dtype=torch.float64, device=q_norm.device)
    const = torch.zeros(q_norm.shape[0], dtype=torch.float64, device=q_norm.device)
    for j in range(n_pairs):
        z, g = 2 * j, 2 * j + 1
        zp = dot_bound(q_norm[:, z], q_resid[:, z], p_norm[z], p_resid[z], widths[z])
        gp = dot_bound(q_norm[:, g], q_resid[:, g], p_norm[g], p_resid[g], widths[g])
        table[:, 2 * j] = gp * (1 + c) * SLACK  # times |zz_j|
        table[:, 2 * j + 1] = zp * (1 + c) * SLACK  # times |gg_j|
        const += zp * gp * (1 + c)
    table[:, -1] = const * SLACK
    return table, c * SLACK


def _up32(x64: torch.Tensor) -> torch.Tensor:
    """float64 -> the smallest float32 >= it (a bound never shrinks by the cast)."""
    x32 = x64.to(torch.float32)
    under = x32.to(torch.float64) < x64
    return torch.where(under, torch.nextafter(x32, torch.full_like(x32, float("inf"))), x32)


def device_error_table(table64: torch.Tensor, rows: int) -> torch.Tensor:
    """The (rows, W) float32 table the kernel reads: `table64` rounded up, zero-padded rows."""
    out = torch.zeros((rows, table64.shape[1]), dtype=torch.float32, device=table64.device)
    out[:table64.shape[0]] = _up32(table64)
    return out


# ----------------------------------------------------------------------------- re-scoring

def exact_scores(q32, fetch, widths, product: bool, cand) -> torch.Tensor:
    """float32 scores of query rows q32 (m, D) against candidates cand (m, r) (local pool positions,
    -1 = none; -inf there). fetch(positions int64 tensor) -> their normalised float32 rows (len, D).
    Products and sums in float32: the re-score s_f of `error_table`."""
    m, r = cand.shape
    out = torch.full((m, r), float("-inf"), dtype=torch.float32, device=q32.device)
    if m == 0 or r == 0:
        return out
    d = q32.shape[1]
    cols = np.cumsum((0,) + tuple(widths))
    step = max(1, RESCORE_ELEMS // max(1, r * d))
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        c = cand[lo:hi]
        valid = c >= 0
        uniq, inverse = torch.unique(torch.where(valid, c, torch.zeros_like(c)), return_inverse=True)
        rows = fetch(uniq).to(q32.device)
        prod = rows[inverse.reshape(-1)].reshape(hi - lo, r, d) * q32[lo:hi, None, :]
        if product:
            total = None
            for j in range(0, len(widths), 2):
                zz = prod[..., cols[j]:cols[j + 1]].sum(-1)
                gg = prod[..., cols[j + 1]:cols[j + 2]].sum(-1)
                total = zz * gg if total is None else total + zz * gg
        else:
            total = prod.sum(-1)
        out[lo:hi] = torch.where(valid, total, out[lo:hi])
    return out


# ----------------------------------------------------------------------------- launching

@dataclass
class Config:
    """Tuning of one launch: query rows and pool rows per tile, query blocks per L2 group, warps,
    pipeline stages, persistent programs (None: one per SM on CUDA -- 181-212 registers x 256
    threads and ~144 KB of shared memory leave room for one -- 4 in the interpreter)."""

    # 128 x 64 tiles, 8 warps, 3 stages: the largest spill-free tile of the sm_90 compile report
    # (triton 3.6 and 3.9: wgmma, TMA loads; 128 x 128 spills ~150 B in the filter epilogue)
    block_m: int = 128
    block_n: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    programs: int | None = None

    def check(self):
        for name in ("block_m", "block_n", "group_m", "num_warps", "num_stages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1) or v > MAX_BLOCK_N:
                raise ValueError(f"{name}: expected a power of two in [16, {MAX_BLOCK_N}], got {v}")
        p = self.programs
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1):
            raise ValueError(f"programs: expected None (one per SM) or a positive integer, got {p!r}")
        return self


def _programs(cfg: Config, n_tiles: int, device) -> int:
    if cfg.programs:
        return max(1, min(int(cfg.programs), n_tiles))
    if device.type == "cuda":
        return max(1, min(n_tiles, torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_tiles, 4))


def launch(kernel, q_buf, p_buf, row_lo, row_hi, lay: PaddedLayout, steps: torch.Tensor, err: torch.Tensor,
           cross: float, cfg: Config, *, dense_out=None, tau=None, cnt=None, cand=None, precision="ieee"):
    """One kernel launch over all query rows of q_buf and pool rows [row_lo, row_hi) of p_buf
    (steps: lay.steps() on the device, flat; err: the (q_buf rows, W) float32 `device_error_table`,
    cross its a*b coefficient): DENSE when dense_out = (lower, upper) is given (each (q_buf rows,
    row_hi - row_lo) float32, one stride), else FILTER (tau (q rows,) float32, cnt (q rows,)
    int32, cand = (upper bounds float32, rows int32), each (q rows, cap), one stride)."""
    m_blocks = q_buf.shape[0] // cfg.block_m
    first_block = row_lo // cfg.block_n
    n_blocks = -(-row_hi // cfg.block_n) - first_block
    n_tiles = m_blocks * n_blocks
    if n_tiles == 0:
        return
    if err.shape[0] != q_buf.shape[0] or err.dtype != torch.float32:
        raise ValueError(f"err: expected a ({q_buf.shape[0]}, W) float32 table, got {tuple(err.shape)} {err.dtype}")
    dense = dense_out is not None
    dummy = steps  # unused pointer arguments of the other mode
    out_lo, out_hi = dense_out if dense else (dummy, dummy)
    cand_hi, cand_i = cand if cand is not None else (dummy, dummy)
    grid = (_programs(cfg, n_tiles, q_buf.device),)
    kernel[grid](
        _descriptor(q_buf, [cfg.block_m, lay.step]), _descriptor(p_buf, [cfg.block_n, lay.step]), steps, err,
        tau if tau is not None else dummy, cnt if cnt is not None else dummy, cand_hi, cand_i,
        out_lo, out_hi,
        int(row_lo), int(row_hi), m_blocks, n_blocks, first_block,
        cand[0].shape[1] if cand is not None else 0, lay.n_steps, lay.n_pairs, err.stride(0),
        cand[0].stride(0) if cand is not None else 0, out_lo.stride(0) if dense else 0, float(cross),
        STEP=lay.step, PRODUCT=lay.product, DENSE=dense, PRECISION=precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _descriptor(buf: torch.Tensor, block):
    """A host-side TMA tensor descriptor of a padded buffer (zero fill outside it)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(buf, block)


@dataclass
class Stats:
    """What a search did (for benchmarks and tests): sample rows, candidate slots per row,
    candidates found (sum over rows), rows redone after an overflow, rows finished by the torch
    reference, candidates re-scored in float32 (sum over rows). With PROFILE set, `seconds`
    holds wall seconds per stage (the device synchronised around each): prepare (the pool's
    padded buffer, built once per PreparedPool: 0 when cached), queries (padded query rows and
    margins), sample (gathering the sample rows), threshold (the dense pass and its k-th
    scores), filter (the filter launches, redos included), select (re-score and merge)."""

    sample: int = 0
    cap: int = 0
    candidates: int = 0
    redone: int = 0
    fallback: int = 0
    rescored: int = 0
    queries: int = 0
    pool_rows: int = 0
    seconds: dict = field(default_factory=dict)


LAST = Stats()  # the latest filter_topk call's (benchmarks/gpu_suite.py records it with its timings)
# True: every stage is timed into Stats.seconds, synchronising the device around it (slower: for
# a breakdown, never for the timings that are reported as the kernel's)
PROFILE = False


@contextlib.contextmanager
def stage(stats: Stats, name: str, device):
    """Adds the wall seconds of the block to stats.seconds[name] when PROFILE is set."""
    if not PROFILE:
        yield
        return
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda *a: None)
    sync(device)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        stats.seconds[name] = stats.seconds.get(name, 0.0) + time.perf_counter() - t0


def filter_topk(kernel, q32, fpool: FilterPool, sel, k, state: TopK, index_offset, fetch, product, *,
                cfg: Config | None = None, stats: Stats | None = None,
                reference=None) -> TopK:
    """`state` merged with the exact top-k of normalised float32 queries q32 (M, D) against pool
    rows `sel` of fpool (local position i has global index index_offset + i). fetch(positions)
    gives float32 rows for re-scoring; reference(q32 rows, state) finishes rows the filter gave
    up on (MAX_REDOS overflows)."""
    global LAST
    cfg = (cfg or Config()).check()
    stats = stats if stats is not None else Stats()
    LAST = stats
    lay = fpool.layout
    dtype = fpool.dtype
    precision = input_precision(dtype)
    p_buf, lo, hi = fpool.rows(sel)
    n = hi - lo
    m = q32.shape[0]
    stats.queries, stats.pool_rows = m, n
    if m == 0 or n == 0:
        return state
    dev = q32.device
    with stage(stats, "queries", dev):
        q_buf, q_norm, q_resid = pad_rows(q32, lay, dtype, cfg.block_m)
        table, cross = error_table(q_norm, q_resid, fpool.norm_max, fpool.resid_max, lay.widths, product, dtype,
                                   tf32=precision == "tf32")
        err = device_error_table(table, q_buf.shape[0])
    # the sample (seeded: the same rows every call; the answer never depends on it)
    s = sample_size(n, k)
    with stage(stats, "sample", dev):
        gen = torch.Generator(device=p_buf.device).manual_seed(0)
        sample = torch.randperm(n, generator=gen, device=p_buf.device)[:s].sort().values + lo
        s_buf = torch.zeros((_round_up(s, MAX_BLOCK_N), lay.width), dtype=dtype, device=p_buf.device)
        s_buf[:s] = p_buf[sample]
    stats.sample = s
    # -inf while the state has empty slots; a new row must reach the state's k-th to enter
    state_kth = state.scores[:, -1].to(device=dev, dtype=torch.float32)
    # thresholds: lower and upper bounds against the sample, a query chunk at a time. tau = the
    # k-th best lower bound: k sample rows score at least that, so the k-th best of the pool does
    tau = torch.empty(m, dtype=torch.float32, device=dev)
    est = torch.empty(m, dtype=torch.float64, device=dev)
    chunk = max(cfg.block_m, (WORK_BYTES // (8 * s)) // cfg.block_m * cfg.block_m)
    with stage(stats, "threshold", dev):
        for q0 in range(0, m, chunk):
            q1 = min(m, q0 + chunk)
            rows_pad = _round_up(q1 - q0, cfg.block_m)
            qb = q_buf[q0:q0 + rows_pad]
            lower = torch.empty((rows_pad, s), dtype=torch.float32, device=dev)
            upper = torch.empty_like(lower)
            launch(kernel, qb, s_buf, 0, s, lay, fpool.steps, err[q0:q0 + rows_pad], cross, cfg,
                   dense_out=(lower, upper), precision=precision)
            lower, upper = lower[:q1 - q0], upper[:q1 - q0]
            tau[q0:q1] = torch.maximum(_kth(lower, k), state_kth[q0:q1])
            est[q0:q1] = (upper >= tau[q0:q1, None]).sum(1).to(torch.float64) * (n / s)
            del lower, upper
    # candidate slots per row: the sample's estimate (x 1.5, + 2k) for 99% of rows, bounded; the
    # rows beyond it overflow and are redone with a raised threshold
    typical = float(est.sort().values[min(m - 1, int(0.99 * m))])
    cap = int(min(MAX_CAP, max(MIN_CAP, 2 * k, 1 << math.ceil(math.log2(1.5 * typical + 2 * k)))))
    stats.cap = cap
    # a candidate slot: its upper bound (float32) and pool row (int32)
    chunk = max(cfg.block_m, (WORK_BYTES // (8 * cap)) // cfg.block_m * cfg.block_m)
    for q0 in range(0, m, chunk):  # filter, then select, a chunk at a time (one candidate buffer live)
        q1 = min(m, q0 + chunk)
        rows_pad = _round_up(q1 - q0, cfg.block_m)
        rescore = _Rescorer(q32[q0:q1], fetch, lay.widths, product, k, stats)
        with stage(stats, "filter", dev):
            found = _filter_rows(kernel, q_buf[q0:q0 + rows_pad], err[q0:q0 + rows_pad], cross, p_buf, lo, hi,
                                 lay, fpool.steps, cfg, tau[q0:q1], cap, precision, rescore, stats)
        with stage(stats, "select", dev):
            state = _select(q32, q0, q1, found, state, rescore, index_offset, stats, reference)
    return state


class _Rescorer:
    """float32 re-scores (`exact_scores`) of one query chunk's candidates, counted in stats."""

    def __init__(self, q32, fetch, widths, product, k, stats):
        self.q32, self.fetch, self.widths, self.product, self.k, self.stats = q32, fetch, widths, product, k, stats

    def __call__(self, rows, local):
        """Exact scores of chunk rows `rows` against local pool rows `local` (len(rows), r) (-1: none)."""
        self.stats.rescored += int((local >= 0).sum())
        return exact_scores(self.q32[rows], self.fetch, self.widths, self.product, local)

    def best_k(self, rows, upper, local):
        """(exact scores, local rows, positions) of each row's k candidates with the best upper
        bounds, re-scored: the k-th best of those scores is a lower bound on the row's k-th best."""
        kk = min(self.k, upper.shape[1])
        top = upper.topk(kk, dim=1)
        pick = torch.where(top.values > float("-inf"), local.gather(1, top.indices).to(torch.int64), -1)
        return self(rows, pick), pick, top.indices


def _kth(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k-th best (-inf with fewer than k columns)."""
    if scores.shape[1] < k:
        return torch.full((scores.shape[0],), float("-inf"), dtype=scores.dtype, device=scores.device)
    return scores.topk(k, dim=1).values[:, -1]


def _filter_rows(kernel, qb, err, cross, p_buf, lo, hi, lay, steps, cfg, tau, cap, precision, rescore, stats):
    """Candidates of one query chunk: (upper bound, local row) each (rows, cap) (-inf, -1 in empty
    slots) and a (rows,) bool mask of the rows that still overflowed after MAX_REDOS redos with
    raised thresholds (their candidates are incomplete). qb, err: the chunk's padded query rows
    and error table; tau its (rows,) float32 thresholds."""
    rows = tau.shape[0]
    dev = qb.device
    failed = torch.zeros(rows, dtype=torch.bool, device=dev)
    todo = torch.arange(rows, device=dev)
    q_todo, err_todo, tau_todo = qb, err, tau
    for attempt in range(MAX_REDOS + 1):
        rows_pad = q_todo.shape[0]
        tau32 = torch.full((rows_pad,), float("inf"), dtype=torch.float32, device=dev)
        tau32[:len(todo)] = tau_todo
        cnt = torch.zeros(rows_pad, dtype=torch.int32, device=dev)
        cand = (torch.full((rows_pad, cap), float("-inf"), dtype=torch.float32, device=dev),
                torch.full((rows_pad, cap), -1, dtype=torch.int32, device=dev))
        launch(kernel, q_todo, p_buf, lo, hi, lay, steps, err_todo, cross, cfg, tau=tau32, cnt=cnt, cand=cand,
               precision=precision)
        cnt = cnt[:len(todo)]
        if attempt == 0:  # every row: the launch's buffers are the result
            upper, local = cand[0][:rows], cand[1][:rows]
        else:
            upper[todo], local[todo] = cand[0][:len(todo)], cand[1][:len(todo)]
        stats.candidates += int(cnt.clamp(max=cap).sum())
        over = cnt > cap
        if not bool(over.any()):
            break
        if attempt == MAX_REDOS:
            failed[todo[over]] = True
            break
        # raise tau to the k-th best re-score among the stored candidates: k real rows reach it
        todo = todo[over.nonzero().flatten()]
        exact, _, _ = rescore.best_k(todo, upper[todo], local[todo])
        tau_todo = torch.maximum(tau_todo[over], _kth(exact, rescore.k))
        stats.redone += len(todo)
        q_todo = torch.zeros((_round_up(len(todo), cfg.block_m), qb.shape[1]), dtype=qb.dtype, device=dev)
        q_todo[:len(todo)] = qb[todo]
        err_todo = torch.zeros((q_todo.shape[0], err.shape[1]), dtype=err.dtype, device=dev)
        err_todo[:len(todo)] = err[todo]
    return upper, local, failed


def _select(q32, q0, q1, found, state: TopK, rescore, index_offset, stats, reference) -> TopK:
    """Step 5 for query rows [q0, q1): per row, the k candidates with the best upper bounds are
    re-scored and merged into the state; then every other candidate whose upper bound reaches
    the state's new k-th score (a lower bound on the final one) is re-scored and merged. Rows the
    filter gave up on go to `reference`."""
    upper, local, failed = found
    scores, index = state.scores.clone(), state.index.clone()
    rows = torch.arange(q1 - q0, device=upper.device)
    fallback = rows[failed] + q0
    if len(fallback):  # rare: leave those rows out (a copy of the candidates)
        rows, upper, local = rows[~failed], upper[~failed], local[~failed]
    if len(rows):
        g = rows + q0
        exact, pick, positions = rescore.best_k(rows, upper, local)
        merged = TopK(scores[g], index[g]).merge((exact, torch.where(pick >= 0, pick + index_offset, pick)))
        keep = (local >= 0) & (upper >= merged.scores[:, -1:].to(upper.device))
        keep.scatter_(1, positions, False)  # re-scored already
        r = int(keep.sum(1).max())
        if r:
            order = torch.where(keep, upper, torch.full_like(upper, float("-inf"))).topk(r, dim=1).indices
            more = torch.where(keep.gather(1, order), local.gather(1, order).to(torch.int64), -1)
            merged = merged.merge((rescore(rows, more), torch.where(more >= 0, more + index_offset, more)))
        scores[g], index[g] = merged.scores, merged.index
    if len(fallback):
        stats.fallback += len(fallback)
        done = reference(q32[fallback], TopK(scores[fallback], index[fallback]))
        scores[fallback], index[fallback] = done.scores, done.index
    return TopK(scores, index)
