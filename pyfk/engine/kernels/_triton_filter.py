"""The `triton` backend's v2 kernel: threshold, then filter (issue #12). Part of the triton backend
(pyfk/engine/kernels/triton.py), which imports it; it registers nothing itself.

Exact top-k of R(q, p) (see triton.py for R) in four steps, none of which sorts in the hot loop:

1. Prepare once (`FilterPool`, cached on the PreparedPool): the normalised pool rounded to a
   low-precision dtype (float16 default, bfloat16, or float32) in a zero-padded buffer whose
   segments start and end on multiples of 16 columns, rows padded to a multiple of MAX_BLOCK_N.
   Segment offsets, widths and K steps are compile-time constants, so every load is unmasked and
   16-byte aligned (vectorised, pipelined by `num_stages`). Also kept: per segment, the largest
   row norm ||p_j|| and the largest rounding residual ||round(p_j) - p_j|| over the pool.
2. Threshold: the kernel in DENSE mode scores the queries against a seeded random sample of the
   pool. Per query, tau = (k-th best sampled score) - 2 m, where m bounds |s_hat - s_f| for every
   pool row: s_hat the kernel's score, s_f the float32 re-score (`score_margin`, from the norms
   and residuals above and worst-case float32 accumulation). Then tau <= s_hat(e) for every e in
   the exact top-k by s_f (k sampled rows have s_f >= their s_hat - m, so the k-th best s_f >= the
   k-th sampled s_hat - m; and s_hat(e) >= s_f(e) - m). An incoming state raises tau to its k-th
   score - m.
3. Filter: one launch over the pool (FILTER mode): a persistent grid walks (query block, pool
   tile) tiles in grouped order (GROUP_M query blocks share each pool tile while it is in L2);
   per tile, fp32 accumulators per scale, the product epilogue, then `score >= tau[row]`. Hits
   are compacted (per-row count by one atomic add per row and tile, positions by a prefix sum)
   into a per-row candidate buffer of packed int64 keys (pyfk.engine.topk_state.pack_keys of
   (s_hat, global index)). A row whose buffer overflows is redone with tau raised to its stored
   candidates' k-th score - 2 m (still a lower bound); after MAX_REDOS the torch reference.
4. Select: per row, t = the k-th best s_hat among its candidates; every candidate with
   s_hat >= t - 2 m (which includes the exact top-k) is re-scored in float32 from the float32
   rows, and merged into the state with `TopK.merge` (exact, ties to the smaller index).

The answer equals the float32 top-k of the re-scored values; the margin only decides how many
candidates are kept and re-scored, never which are right.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pyfk.engine.topk_state import EMPTY_KEY, TopK, pack_keys, unpack_keys

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
_U_INPUT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 0.0}
# tensor-core float32 accumulation is not IEEE round-to-nearest on every GPU (truncation, few
# guard bits): 4 ulps per add, generous; the IEEE float32 path (FMA) gets 2 ulps
_U_ACC_MMA = 2.0 ** -21
_U_ACC_IEEE = 2.0 ** -23
_U32 = 2.0 ** -24  # one float32 rounding (products and sums outside the MMA)
_TF32_INPUT = 2.0 ** -10  # tf32 input rounding, truncation allowed


def _filter_kernel(Q, P, KCOL, TAU, CNT, CAND_S, CAND_I, OUT,
                   row_lo, row_hi, m_blocks, n_blocks, first_block, cap, n_steps,
                   stride_cm, stride_om,
                   STEP: tl.constexpr, PRODUCT: tl.constexpr, DENSE: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                   NUM_STAGES: tl.constexpr):
    """Q, P: tensor descriptors (TMA on Hopper) of the padded query and pool buffers (step 1),
    blocks [BLOCK_M, STEP] and [BLOCK_N, STEP]. KCOL: int32 (n_steps, 3) per K step: the z
    column, the g column (product; dot mode reads the first only) and 1 on the last step of a
    (z_j, g_j) pair. Pool rows [row_lo, row_hi) of P are scored. Tiles: m_blocks query blocks x
    n_blocks pool blocks from pool block first_block (= row_lo // BLOCK_N).
    DENSE: OUT[q, r - row_lo] = s_hat (float32).
    FILTER: every hit s_hat >= TAU[q] appended at CNT[q] to CAND_S[q, :cap] (s_hat, float32) and
    CAND_I[q, :cap] (r - row_lo, int32); CNT counts every hit, stored or not. Offsets inside a
    tile are int32 from a 64-bit tile base (fewer registers in the epilogue)."""
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
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PRODUCT:
            # one K loop over all pairs (z_j and g_j padded to one width): two dots per step, and
            # at a pair's last step acc += zz * gg and both restart from zero
            zz = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            gg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in tl.range(0, n_steps, num_stages=NUM_STAGES):
                cz = tl.load(KCOL + 3 * i)
                cg = tl.load(KCOL + 3 * i + 1)
                zz = tl.dot(Q.load([q_row, cz]), P.load([p_row, cz]).T, zz, input_precision=PRECISION)
                gg = tl.dot(Q.load([q_row, cg]), P.load([p_row, cg]).T, gg, input_precision=PRECISION)
                if tl.load(KCOL + 3 * i + 2) != 0:
                    acc += zz * gg
                    zz = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    gg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            for i in tl.range(0, n_steps, num_stages=NUM_STAGES):
                c = i * STEP
                acc = tl.dot(Q.load([q_row, c]), P.load([p_row, c]).T, acc, input_precision=PRECISION)
        rows = q_row + tl.arange(0, BLOCK_M)
        cols = p_row + tl.arange(0, BLOCK_N)
        col_ok = (cols >= row_lo) & (cols < row_hi)
        if DENSE:
            out = OUT + q_row.to(tl.int64) * stride_om
            offs = tl.arange(0, BLOCK_M)[:, None] * stride_om + (cols - row_lo)[None, :]
            tl.store(out + offs, acc, mask=col_ok[None, :])
        else:
            tau = tl.load(TAU + rows)
            hit = (acc >= tau[:, None]) & col_ok[None, :]
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
                tl.store(CAND_S + offs, tl.reshape(acc, (BLOCK_M * BLOCK_N,)), mask=keep)
                local = p_row - row_lo + tl.arange(0, BLOCK_M * BLOCK_N) % BLOCK_N
                tl.store(CAND_I + offs, local, mask=keep)


# Integers that change between calls on one pool: not specialised (no recompiles in timed loops).
RUNTIME_INTS = ("row_lo", "row_hi", "m_blocks", "n_blocks", "first_block", "cap")
# n_steps stays specialised: fixed per layout
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

    def steps(self) -> np.ndarray:
        """int32 (n_steps, 3): per K step the z column, the g column, 1 on a pair's last step
        (product); dot mode: the column twice, 0."""
        if not self.product:
            cols = np.arange(0, self.width, self.step)
            return np.stack([cols, cols, np.zeros_like(cols)], 1).astype(np.int32)
        rows = []
        for j in range(0, len(self.padded), 2):
            n = self.padded[j] // self.step
            for t in range(n):
                rows.append((self.offsets[j] + t * self.step, self.offsets[j + 1] + t * self.step, int(t == n - 1)))
        return np.asarray(rows, dtype=np.int32).reshape(-1, 3)


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


def score_margin(q_norm, q_resid, p_norm, p_resid, widths, product: bool, dtype, tf32: bool = False):
    """(M,) float64 m with |s_hat - s_f| <= m for every pool row: s_hat the kernel's score from
    rounded rows (`dtype`), s_f the float32 re-score (`exact_scores`) of the float32 rows.

    q_norm, q_resid (M, S): per query and segment ||q_j|| and ||round(q_j) - q_j||; p_norm, p_resid
    (S,): the pool's largest. Per segment dot of n columns, a = q_j, b = p_j (Cauchy-Schwarz):
        kernel:  |round(a).round(b) - a.b| <= |da| |b| + |a| |db| + |da| |db|
                 + gamma_n(u_acc) (|a| + |da|)(|b| + |db|)
        re-score: gamma_{n+1}(2^-24) |a| |b|          (float32 products, then a float32 sum)
    product: with |Z| <= |a_z||b_z| and errors Ez, Eg per dot, a pair errs by
    |Z| Eg + |G| Ez + Ez Eg plus one float32 rounding of the product, and the sum over pairs
    by gamma_P(2^-24) times its terms' magnitudes; sum/features: one dot over all columns.
    """
    q_norm = q_norm.to(torch.float64)
    q_resid = q_resid.to(torch.float64)
    p_norm = p_norm.to(device=q_norm.device, dtype=torch.float64)
    p_resid = p_resid.to(device=q_norm.device, dtype=torch.float64)
    if tf32:  # inputs rounded inside the MMA: not measurable, take the worst case
        q_resid = q_resid + _TF32_INPUT * q_norm
        p_resid = p_resid + _TF32_INPUT * p_norm
    u_acc = _U_ACC_IEEE if (dtype == torch.float32 and not tf32) else _U_ACC_MMA

    def dot_bounds(a, da, b, db, n):
        """(bound on |exact dot|, kernel error, re-score error) for one dot of n columns."""
        mag = a * b
        kern = da * b + a * db + da * db + _gamma(n, u_acc) * (a + da) * (b + db)
        return mag, kern, _gamma(n + 1, _U32) * mag

    if not product:
        n = int(sum(widths))
        a = q_norm.square().sum(1).sqrt()
        da = q_resid.square().sum(1).sqrt()
        b = p_norm.square().sum().sqrt()  # max_r sqrt(sum_j |p_rj|^2) <= sqrt(sum_j max_r |p_rj|^2)
        db = p_resid.square().sum().sqrt()
        _, kern, res = dot_bounds(a, da, b, db, n)
        return (kern + res) * (1 + 1e-9)

    n_pairs = len(widths) // 2
    g_sum = _gamma(n_pairs, _U32)
    total = torch.zeros(q_norm.shape[0], dtype=torch.float64, device=q_norm.device)
    mags_k = torch.zeros_like(total)
    mags_r = torch.zeros_like(total)
    for j in range(n_pairs):
        z, g = 2 * j, 2 * j + 1
        xz, ez, fz = dot_bounds(q_norm[:, z], q_resid[:, z], p_norm[z], p_resid[z], widths[z])
        xg, eg, fg = dot_bounds(q_norm[:, g], q_resid[:, g], p_norm[g], p_resid[g], widths[g])
        big_k = (xz + ez) * (xg + eg)
        big_r = (xz + fz) * (xg + fg)
        total += xz * eg + xg * ez + ez * eg + _U32 * big_k  # kernel
        total += xz * fg + xg * fz + fz * fg + _U32 * big_r  # re-score
        mags_k += big_k * (1 + _U32)
        mags_r += big_r * (1 + _U32)
    total += g_sum * (mags_k + mags_r)
    return total * (1 + 1e-9)


def _down32(x64: torch.Tensor) -> torch.Tensor:
    """float64 -> the largest float32 <= it (so a threshold never rises by the cast)."""
    x32 = x64.to(torch.float32)
    over = x32.to(torch.float64) > x64
    return torch.where(over, torch.nextafter(x32, torch.full_like(x32, float("-inf"))), x32)


# ----------------------------------------------------------------------------- re-scoring

def exact_scores(q32, fetch, widths, product: bool, cand) -> torch.Tensor:
    """float32 scores of query rows q32 (m, D) against candidates cand (m, r) (local pool positions,
    -1 = none; -inf there). fetch(positions int64 tensor) -> their normalised float32 rows (len, D).
    Products and sums in float32: the re-score s_f of `score_margin`."""
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


def launch(kernel, q_buf, p_buf, row_lo, row_hi, lay: PaddedLayout, steps: torch.Tensor, cfg: Config, *,
           dense_out=None, tau=None, cnt=None, cand=None, precision="ieee"):
    """One kernel launch over all query rows of q_buf and pool rows [row_lo, row_hi) of p_buf
    (steps: lay.steps() on the device): DENSE when dense_out is given (its shape (q_buf rows,
    row_hi - row_lo)), else FILTER (tau (q rows,) float32, cnt (q rows,) int32, cand = (scores
    float32, rows int32), both (q rows, cap), one stride)."""
    m_blocks = q_buf.shape[0] // cfg.block_m
    first_block = row_lo // cfg.block_n
    n_blocks = -(-row_hi // cfg.block_n) - first_block
    n_tiles = m_blocks * n_blocks
    if n_tiles == 0:
        return
    dense = dense_out is not None
    dummy = steps  # unused pointer arguments of the other mode
    grid = (_programs(cfg, n_tiles, q_buf.device),)
    kernel[grid](
        _descriptor(q_buf, [cfg.block_m, lay.step]), _descriptor(p_buf, [cfg.block_n, lay.step]), steps,
        tau if tau is not None else dummy, cnt if cnt is not None else dummy,
        cand[0] if cand is not None else dummy, cand[1] if cand is not None else dummy,
        dense_out if dense else dummy,
        int(row_lo), int(row_hi), m_blocks, n_blocks, first_block,
        cand[0].shape[1] if cand is not None else 0, steps.shape[0],
        cand[0].stride(0) if cand is not None else 0, dense_out.stride(0) if dense else 0,
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
        margin = score_margin(q_norm, q_resid, fpool.norm_max, fpool.resid_max, lay.widths, product, dtype,
                              tf32=precision == "tf32")
    # the sample (seeded: the same rows every call; the answer never depends on it)
    s = sample_size(n, k)
    with stage(stats, "sample", dev):
        gen = torch.Generator().manual_seed(0)
        sample = torch.randperm(n, generator=gen)[:s].sort().values.to(p_buf.device) + lo
        s_buf = torch.zeros((_round_up(s, MAX_BLOCK_N), lay.width), dtype=dtype, device=p_buf.device)
        s_buf[:s] = p_buf[sample]
    stats.sample = s
    state_kth = state.scores[:, -1].to(torch.float64)  # -inf while the state has empty slots
    # thresholds: dense scores against the sample, a query chunk at a time
    tau = torch.empty(m, dtype=torch.float64, device=dev)
    est = torch.empty(m, dtype=torch.float64, device=dev)
    chunk = max(cfg.block_m, (WORK_BYTES // (4 * s)) // cfg.block_m * cfg.block_m)
    with stage(stats, "threshold", dev):
        for q0 in range(0, m, chunk):
            q1 = min(m, q0 + chunk)
            qb = q_buf[q0:q0 + _round_up(q1 - q0, cfg.block_m)]
            dense = torch.empty((qb.shape[0], s), dtype=torch.float32, device=dev)
            launch(kernel, qb, s_buf, 0, s, lay, fpool.steps, cfg, dense_out=dense, precision=precision)
            dense = dense[:q1 - q0]
            if s >= k:
                kth = dense.topk(k, dim=1).values[:, -1].to(torch.float64)
            else:
                kth = torch.full((q1 - q0,), float("-inf"), dtype=torch.float64, device=dev)
            tau[q0:q1] = torch.maximum(kth - 2 * margin[q0:q1], state_kth[q0:q1] - margin[q0:q1])
            est[q0:q1] = (dense >= _down32(tau[q0:q1])[:, None]).sum(1).to(torch.float64) * (n / s)
            del dense
    # candidate slots per row: the sample's estimate (x 1.5, + 2k) for 99% of rows, bounded; the
    # rows beyond it overflow and are redone with a raised threshold
    typical = float(est.sort().values[min(m - 1, int(0.99 * m))])
    cap = int(min(MAX_CAP, max(MIN_CAP, 2 * k, 1 << math.ceil(math.log2(1.5 * typical + 2 * k)))))
    stats.cap = cap
    chunk = max(cfg.block_m, (WORK_BYTES // (8 * cap)) // cfg.block_m * cfg.block_m)
    for q0 in range(0, m, chunk):  # filter, then select, a chunk at a time (one candidate buffer live)
        q1 = min(m, q0 + chunk)
        qb = q_buf[q0:q0 + _round_up(q1 - q0, cfg.block_m)]
        with stage(stats, "filter", dev):
            keys = _filter_rows(kernel, qb, p_buf, lo, hi, lay, fpool.steps, cfg, tau[q0:q1], cap, index_offset,
                                precision, k, margin[q0:q1], stats)
        with stage(stats, "select", dev):
            state = _select(q32, [(q0, q1, keys)], state, k, margin, fetch, lay.widths, product, index_offset,
                            stats, reference)
    return state


def _filter_rows(kernel, qb, p_buf, lo, hi, lay, steps, cfg, tau, cap, index_offset, precision, k, margin,
                 stats):
    """Candidate keys (rows, cap) of one query chunk (EMPTY_KEY-padded) and a (rows,) bool mask of
    the rows that still overflowed after MAX_REDOS redos with raised thresholds (their keys are
    incomplete). qb holds the chunk's padded query rows, tau and margin its (rows,) float64."""
    rows = tau.shape[0]
    keys = torch.full((rows, cap), EMPTY_KEY, dtype=torch.int64, device=qb.device)
    failed = torch.zeros(rows, dtype=torch.bool, device=qb.device)
    todo = torch.arange(rows, device=qb.device)
    q_todo, tau_todo = qb, tau
    for attempt in range(MAX_REDOS + 1):
        rows_pad = q_todo.shape[0]
        tau32 = torch.full((rows_pad,), float("inf"), dtype=torch.float32, device=qb.device)
        tau32[:len(todo)] = _down32(tau_todo)
        cnt = torch.zeros(rows_pad, dtype=torch.int32, device=qb.device)
        cand_s = torch.full((rows_pad, cap), float("-inf"), dtype=torch.float32, device=qb.device)
        cand_i = torch.full((rows_pad, cap), -1, dtype=torch.int32, device=qb.device)
        launch(kernel, q_todo, p_buf, lo, hi, lay, steps, cfg, tau=tau32, cnt=cnt, cand=(cand_s, cand_i),
               precision=precision)
        cnt = cnt[:len(todo)]
        local = cand_i[:len(todo)].to(torch.int64)
        cand = pack_keys(cand_s[:len(todo)], torch.where(local >= 0, local + index_offset, local))
        stats.candidates += int(cnt.clamp(max=cap).sum())
        over = cnt > cap
        keys[todo] = cand
        if not bool(over.any()):
            break
        if attempt == MAX_REDOS:
            failed[todo[over]] = True
            break
        # raise tau: the stored candidates' k-th best s_hat, minus 2 m, is still a lower bound
        idx = over.nonzero().flatten()
        kth_score = unpack_keys(cand[idx].topk(k, dim=1).values[:, -1])[0].to(torch.float64)
        todo = todo[idx]
        tau_todo = torch.maximum(tau_todo[idx], kth_score - 2 * margin[todo])
        stats.redone += len(todo)
        q_todo = torch.zeros((_round_up(len(todo), cfg.block_m), qb.shape[1]), dtype=qb.dtype, device=qb.device)
        q_todo[:len(todo)] = qb[todo]
    return keys, failed


def _select(q32, parts, state: TopK, k, margin, fetch, widths, product, index_offset, stats, reference) -> TopK:
    """Step 4 for every chunk: re-score the candidates within 2 m of each row's k-th best and merge."""
    scores, index = state.scores.clone(), state.index.clone()
    fallback = []
    for q0, q1, (keys, failed) in parts:
        rows = torch.arange(q0, q1, device=keys.device)
        if bool(failed.any()):
            fallback.append(rows[failed])
            rows, keys = rows[~failed], keys[~failed]
        if len(rows) == 0:
            continue
        s_hat, _ = unpack_keys(keys)
        top = keys.topk(min(k, keys.shape[1]), dim=1).values[:, -1]
        t = torch.where(top == EMPTY_KEY, float("-inf"), unpack_keys(top)[0].to(torch.float64))
        keep = (keys != EMPTY_KEY) & (s_hat.to(torch.float64) >= (t - 2 * margin[rows])[:, None])
        r = int(keep.sum(1).max())
        if r == 0:
            continue
        best = torch.where(keep, keys, torch.full_like(keys, EMPTY_KEY)).topk(r, dim=1).values
        _, gidx = unpack_keys(best)
        local = torch.where(best == EMPTY_KEY, torch.full_like(gidx, -1), gidx - index_offset)
        stats.rescored += int((local >= 0).sum())
        exact = exact_scores(q32[rows], fetch, widths, product, local)
        merged = TopK(scores[rows], index[rows]).merge((exact, torch.where(local >= 0, gidx, local)))
        scores[rows], index[rows] = merged.scores, merged.index
    if fallback:
        rows = torch.cat(fallback)
        stats.fallback += len(rows)
        done = reference(q32[rows], TopK(scores[rows], index[rows]))
        scores[rows], index[rows] = done.scores, done.index
    return TopK(scores, index)
