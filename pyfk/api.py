"""Public API: topk, similarity, select, backends (DESIGN.md section 8).

A thin layer: it validates inputs, normalises the pool chunk by chunk and hands
float32 blocks to a backend (pyfk.registry); only the kernels know devices.
"""

from __future__ import annotations

import numbers
import sys
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from pyfk.engine.descriptors import COMBINES, NORMALIZES, Descriptors, normalized_block, segments
from pyfk.engine.registry import resolve

# Show a progress bar (when stderr is a terminal) for searches above this many flops.
_PROGRESS_FLOPS = 2e12


# ----------------------------------------------------------------------------- validation

def _check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def _check_int(value, name: str, lo: int, hi: int, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}]{what}, got {value}")
    return value


def _check_descriptors(d, name: str) -> Descriptors:
    """Descriptors as given, or those of a DescriptorStore (memmaps, streamed) or an Extraction."""
    if isinstance(d, Descriptors):
        return d
    from pyfk.features.extract import Extraction
    from pyfk.features.store import DescriptorStore

    if isinstance(d, DescriptorStore):
        return d.descriptors()
    if isinstance(d, Extraction):
        return d.descriptors
    raise TypeError(f"{name}: expected pyfk.Descriptors, a DescriptorStore or an Extraction, got {type(d).__name__}")


def _check_pair(queries: Descriptors, pool: Descriptors, combine: str, qname="queries", pname="pool"):
    if queries.kind != pool.kind:
        raise TypeError(f"{qname}/{pname}: expected both NumPy or both torch, got {queries.kind} and {pool.kind}")
    if queries.device != pool.device:
        raise ValueError(f"{qname}/{pname}: expected one device, got {queries.device} and {pool.device}")
    if queries.num_scales != pool.num_scales:
        raise ValueError(f"{pname}: expected {queries.num_scales} scales like {qname}, got {pool.num_scales}")
    if queries.widths != pool.widths:
        raise ValueError(f"{pname}: expected scale widths {queries.widths} like {qname}, got {pool.widths}")
    if combine != "features":
        for name, d in ((qname, queries), (pname, pool)):
            if not d.has_g:
                raise ValueError(f"{name}: combine={combine!r} needs gradients g, but {name}.g is None "
                                 "(use combine='features' for features only)")
        if queries.g_widths != pool.g_widths:
            raise ValueError(f"{pname}: expected gradient widths {queries.g_widths} like {qname}, "
                             f"got {pool.g_widths}")
    if pool.n == 0:
        raise ValueError(f"{pname}: expected a non-empty pool, got 0 rows")
    if queries.n == 0:
        raise ValueError(f"{qname}: expected at least one row, got 0")


def _check_index_set(idx, name: str, n: int) -> np.ndarray:
    """Sorted unique int64 indices in [0, n); duplicates or out-of-range raise."""
    if isinstance(idx, torch.Tensor):
        idx = idx.detach().cpu().numpy()
    arr = np.asarray(idx)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected a 1-D array of integer indices, got dtype {arr.dtype}, "
                        f"shape {arr.shape}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ValueError(f"{name}: expected indices in [0, {n}), got {bad[:5].tolist()}")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{name}: expected distinct indices, got duplicates {uniq[counts > 1][:5].tolist()}")
    return uniq


def _out(t: torch.Tensor, like: Descriptors):
    return t.cpu().numpy() if like.kind == "numpy" else t.to(like.device)


# ----------------------------------------------------------------------------- engine

def _show_progress(progress, flops: float) -> bool:
    if progress is None:
        return flops > _PROGRESS_FLOPS and sys.stderr.isatty()
    return bool(progress)


def _topk_rows(queries, pool, k, combine, normalize, backend, rows, progress=None):
    """Top-k over the pool rows `rows` (sorted int64 array or None for all).

    Returns torch (scores, positions) where positions index into `rows`.
    """
    b = resolve(backend, pool.device)
    q_parts, widths, product = segments(queries, combine)
    p_parts, _, _ = segments(pool, combine)
    q = normalized_block(q_parts, slice(None), normalize)
    m, width = q.shape
    total = pool.n if rows is None else len(rows)
    scores = torch.full((m, k), float("-inf"), dtype=torch.float32, device=q.device)
    index = torch.full((m, k), -1, dtype=torch.int64, device=q.device)
    step = b.chunk_rows(m, width)
    flops = 2.0 * m * total * width
    bar = tqdm(total=total, unit="rows", unit_scale=True, desc=f"pyfk.topk [{b.name}]",
               disable=not _show_progress(progress, flops))
    with bar:
        for start in range(0, total, step):
            stop = min(total, start + step)
            sel = slice(start, stop) if rows is None else rows[start:stop]
            scores, index = b.topk_update(q, p_parts, sel, normalize, widths, product, k, start, scores, index)
            bar.update(stop - start)
    return scores, index


def topk(queries: Descriptors, pool: Descriptors, k: int = 32, combine: str = "product",
         normalize: str = "pcc", backend: str = "auto", *, exclude=None, progress=None):
    """Top-k pool items for every query under the PFK similarity.

    R(q, p) = sum_j (z_j(q).z_j(p)) * (g_j(q).g_j(p))   combine="product"
            = sum_j  z_j(q).z_j(p) + g_j(q).g_j(p)      combine="sum"
            = sum_j  z_j(q).z_j(p)                      combine="features"
    after per-example, per-scale normalisation (`normalize`: "pcc", "l2", "none").

    Args:
        queries: Descriptors with M rows; pool: Descriptors with N rows, same scales.
        k: neighbours per query, 1 <= k <= N (minus excluded rows).
        exclude: optional pool indices to leave out (e.g. already labeled).
        backend: "auto", "cpu", "torch", ... (see `pyfk.backends()`).
        progress: show a tqdm bar; None = only for long searches on a terminal.
    Returns:
        scores (M, k) float32, descending; index (M, k) int64 pool indices, ties to
        the smaller index. NumPy in -> NumPy out; torch in -> torch on the input device.
    The M x N score matrix is never held: memory is O(M * D + M * k) beyond the
    inputs for the `cpu` backend (which normalises pool rows as it packs them), plus
    a ~256 MiB normalised chunk for `torch`.
    """
    queries = _check_descriptors(queries, "queries")
    pool = _check_descriptors(pool, "pool")
    _check_choice(combine, "combine", COMBINES)
    _check_choice(normalize, "normalize", NORMALIZES)
    _check_pair(queries, pool, combine)
    rows = None
    available = pool.n
    if exclude is not None:
        excluded = _check_index_set(exclude, "exclude", pool.n)
        rows = np.setdiff1d(np.arange(pool.n, dtype=np.int64), excluded, assume_unique=True)
        available = len(rows)
        if available == 0:
            raise ValueError("exclude: every pool row is excluded; nothing left to search")
    k = _check_int(k, "k", 1, available, f" (the {'available ' if rows is not None else ''}pool size)")
    queries.check_finite("queries")
    pool.check_finite("pool")
    scores, pos = _topk_rows(queries, pool, k, combine, normalize, backend, rows, progress)
    if rows is not None:
        pos = torch.from_numpy(rows).to(pos.device)[pos]
    return _out(scores, queries), _out(pos, queries)


def similarity(queries: Descriptors, pool: Descriptors, combine: str = "product",
               normalize: str = "pcc", backend: str = "auto"):
    """Dense (M, N) float32 similarity matrix R (see `topk`), for small inputs and tests."""
    queries = _check_descriptors(queries, "queries")
    pool = _check_descriptors(pool, "pool")
    _check_choice(combine, "combine", COMBINES)
    _check_choice(normalize, "normalize", NORMALIZES)
    _check_pair(queries, pool, combine)
    if queries.n * pool.n > (1 << 28):
        raise ValueError(f"queries/pool: a dense {queries.n} x {pool.n} matrix is too large; use pyfk.topk")
    queries.check_finite("queries")
    pool.check_finite("pool")
    b = resolve(backend, pool.device)
    q_parts, widths, product = segments(queries, combine)
    p_parts, _, _ = segments(pool, combine)
    q = normalized_block(q_parts, slice(None), normalize)
    p = normalized_block(p_parts, slice(None), normalize)
    return _out(b.similarity(q, p, widths, product), queries)


# ----------------------------------------------------------------------------- selection

def _self_similarity(q: torch.Tensor, widths, product) -> torch.Tensor:
    """R(x, x) per row of a normalised block."""
    if not product:
        return (q * q).sum(1)
    out = torch.zeros(q.shape[0], dtype=q.dtype, device=q.device)
    col = 0
    for wz, wg in zip(widths[0::2], widths[1::2]):
        zz = (q[:, col:col + wz] ** 2).sum(1)
        col += wz
        out += zz * (q[:, col:col + wg] ** 2).sum(1)
        col += wg
    return out


def k_centre(q: torch.Tensor, widths, product, count: int, seed: int, backend) -> np.ndarray:
    """Greedy farthest-first k-centre over normalised rows q under the kernel distance
    d(a, b)^2 = R(a, a) + R(b, b) - 2 R(a, b); seeded random start, ties to the smaller row."""
    n = q.shape[0]
    rng = np.random.default_rng(seed)
    diag = _self_similarity(q, widths, product).double().cpu().numpy()
    chosen = [int(rng.integers(n))]
    min_d2 = np.full(n, np.inf)
    while len(chosen) < count:
        c = chosen[-1]
        row = backend.similarity(q[c:c + 1], q, widths, product)[0].double().cpu().numpy()
        min_d2 = np.minimum(min_d2, diag + diag[c] - 2.0 * row)
        min_d2[chosen] = -np.inf  # never re-pick a centre, whatever rounding says
        chosen.append(int(np.argmax(min_d2)))  # first maximum: ties to the smaller row
    return np.asarray(chosen, dtype=np.int64)


def rank_major(scores: np.ndarray, index: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """First `budget` distinct pool indices taken rank by rank (all rank-1 neighbours,
    best score first, then rank-2, ...). Ties within a rank: smaller pool index, then
    earlier centre. Returns (chosen indices, position (centre, rank) of each) --
    fewer than `budget` if the candidates run out."""
    m, kk = index.shape
    chosen, where, seen = [], [], set()
    for r in range(kk):
        col_s, col_i = scores[:, r], index[:, r]
        order = np.lexsort((np.arange(m), col_i, -col_s.astype(np.float64)))
        for c in order:
            i = int(col_i[c])
            if i < 0 or i in seen:
                continue
            seen.add(i)
            chosen.append(i)
            where.append((int(c), r))
            if len(chosen) == budget:
                return np.asarray(chosen, dtype=np.int64), np.asarray(where, dtype=np.int64)
    return np.asarray(chosen, dtype=np.int64), np.asarray(where, dtype=np.int64).reshape(-1, 2)


def select(pool: Descriptors, val: Descriptors, budget: int, val_labels=None, val_pred=None, k: int = 32,
           combine: str = "product", normalize: str = "pcc", seed: int = 0, exclude=None,
           backend: str = "auto", *, use_all: bool = False, return_details: bool = False, progress=None):
    """The PFK acquisition (Gudovskiy et al., CVPR 2020), as in DESIGN.md section 1.

    1. queries = validation rows with val_pred != val_labels (all rows if use_all, or
       if labels/predictions are not given);
    2. if budget < #queries, greedy k-centre (seeded) reduces them to `budget` centres;
    3. top-k pool neighbours per centre, `exclude`d pool rows removed first;
    4. rank-major order, first `budget` distinct pool indices; k doubles until enough.
    Returns an int64 array of `budget` pool indices (NumPy), or with return_details a
    dict that also holds the centres (validation rows) and, per chosen index, the
    centre, rank (0-based) and score that brought it in.
    """
    pool = _check_descriptors(pool, "pool")
    val = _check_descriptors(val, "val")
    _check_choice(combine, "combine", COMBINES)
    _check_choice(normalize, "normalize", NORMALIZES)
    _check_pair(val, pool, combine, qname="val", pname="pool")
    rows = np.arange(pool.n, dtype=np.int64)
    if exclude is not None:
        rows = np.setdiff1d(rows, _check_index_set(exclude, "exclude", pool.n), assume_unique=True)
    available = len(rows)
    if available == 0:
        raise ValueError("exclude: every pool row is excluded; nothing left to select")
    budget = _check_int(budget, "budget", 1, available, " (the pool size after exclusion)")
    k = _check_int(k, "k", 1, available, " (the pool size after exclusion)")
    seed = _check_int(seed, "seed", 0, 2**63 - 1)

    if use_all or val_labels is None or val_pred is None:
        if not use_all and (val_labels is None) != (val_pred is None):
            raise ValueError("val_labels/val_pred: give both (to query the errors) or neither")
        queries = np.arange(val.n, dtype=np.int64)
    else:
        y = _labels(val_labels, "val_labels", val.n)
        y_hat = _labels(val_pred, "val_pred", val.n)
        queries = np.flatnonzero(y != y_hat).astype(np.int64)
        if queries.size == 0:
            warnings.warn("select: the model makes no error on the validation set; "
                          "querying with every validation example instead", stacklevel=2)
            queries = np.arange(val.n, dtype=np.int64)
    val.check_finite("val")
    pool.check_finite("pool")

    b = resolve(backend, pool.device)
    v_parts, widths, product = segments(val, combine)
    vq = normalized_block(v_parts, queries, normalize)
    if budget < len(queries):
        centres = queries[k_centre(vq, widths, product, budget, seed, b)]
    else:
        centres = queries
    centre_desc = val.take(centres)
    search_rows = None if available == pool.n else rows
    kk = k
    while True:
        scores, pos = _topk_rows(centre_desc, pool, kk, combine, normalize, backend, search_rows, progress)
        s_np, p_np = scores.cpu().numpy(), pos.cpu().numpy()
        picked, where = rank_major(s_np, p_np, budget)
        if len(picked) == budget or kk == available:
            break
        kk = min(available, 2 * kk)
    chosen = rows[picked] if search_rows is not None else picked
    if not return_details:
        return chosen
    return {"indices": chosen, "centres": centres, "centre": centres[where[:, 0]], "rank": where[:, 1],
            "score": s_np[where[:, 0], where[:, 1]], "k": kk}


def _labels(y, name: str, n: int) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    arr = np.asarray(y)
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},) to match val, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected integer class labels, got dtype {arr.dtype}")
    return arr
