"""Search: top-k over a pool in chunks, dense similarity, kernel distances, greedy
k-centre and the PFK acquisition -- each written once, on the backend protocol.

    topk(queries, pool, k, ...)       -> (M, k) scores, indices (validated; NumPy or torch out)
    search(queries, pool, k, ...)     -> TopK with global pool indices (no validation)
    KernelDistances(desc, ...)        -> min over centres of d(a, b)^2 = R(a,a) + R(b,b) - 2 R(a,b)
    greedy_k_centre(dist, count, ...) -> farthest-first picks and their distances
    rank_major(scores, index, budget) -> first `budget` distinct indices, rank by rank
    select(pool, val, budget, ...)    -> the PFK acquisition of DESIGN.md section 1
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from pyfk.engine import backend as _backend
from pyfk.engine.backend import Backend, PreparedPool
from pyfk.engine.descriptors import (
    COMBINES,
    F32_MAX,
    NORMALIZES,
    Descriptors,
    as_descriptors,
    first_non_finite_row,
    non_finite_message,
    normalized_block,
)
from pyfk.engine.layout import Layout
from pyfk.engine.measured import Problem
from pyfk.engine.registry import resolve
from pyfk.engine.topk_state import TopK
from pyfk.errors import check_choice, check_index_set, check_int, check_labels

# Show a progress bar (when stderr is a terminal) for searches above this many flops.
PROGRESS_FLOPS = 2e12
# Elements of one (centres x pool rows) similarity block in KernelDistances.
SIM_BLOCK = 1 << 26
# Elements of one float64 temporary when reducing such a block on the CPU.
SIM_SUB = 1 << 21


# ----------------------------------------------------------------------------- validation

def check_pair(queries: Descriptors, pool: Descriptors, combine: str, qname="queries", pname="pool"):
    """Queries and pool agree on kind, device, scales and widths, and have what `combine` needs."""
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


def check_representable(queries: Descriptors, pool: Descriptors, combine: str, normalize: str,
                        qname: str = "queries", pname: str = "pool") -> None:
    """With normalize="none", raise ValueError if R can leave the float32 range the kernels
    compute in. Bound (Cauchy-Schwarz, partial sums included): |z_j.z_j'| <= max ||z_j(q)||
    max ||z_j(p)||, likewise g, combined as R is. pcc/l2 rows have norms <= sqrt(L_j): no check."""
    if normalize != "none":
        return
    qn, pn = queries.max_row_norms(), pool.max_row_norms()
    total = 0.0
    for j in range(queries.num_scales):
        zz = qn[("z", j)] * pn[("z", j)]
        gg = qn[("g", j)] * pn[("g", j)] if combine != "features" else 0.0
        term = zz if combine == "features" else zz * gg if combine == "product" else zz + gg
        total += term
        worst = max(zz, gg, term, total)
        if not worst <= F32_MAX:
            part = "z" if zz >= gg else "g"
            name = pname if pn[(part, j)] >= qn[(part, j)] else qname
            raise ValueError(
                f"{name}: with normalize='none', the values of scale {j} ({part}[{j}]) give similarities up to "
                f"{worst:.3g}, beyond the float32 range ({F32_MAX:.3g}) the kernels compute in; rescale the "
                "descriptors or use normalize='pcc' or 'l2'")


def check_state_memory(m: int, k: int, name: str = "k") -> None:
    """The (M, k) state and its merge buffers (~48 bytes per slot) must fit in memory."""
    need = 48 * m * k
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available on this platform
        return
    if need > total // 2:
        raise ValueError(f"{name}: expected a k whose ({m} x k) top-k state fits in memory, got k={k}: it needs "
                         f"~{need / 2**30:.1f} GiB, this machine has {total / 2**30:.1f} GiB")


def check_pool_finite(pool: Descriptors, backend: Backend, combine: str, excluded: np.ndarray | None,
                      name: str = "pool") -> None:
    """The pool's NaN/Inf check, the same for every backend. A backend that checks the rows it
    reads during its own pass (`checks_finite`) never reads excluded rows, nor g under
    combine="features": those (`excluded`: sorted pool rows, or None) are checked here -- usually
    a small labeled set -- and the rest by the kernel, so a memory-mapped pool is read once per call."""
    if not backend.checks_finite:
        pool.check_finite(name)
        return
    pool.check_finite(name, float64_only=True)
    unread = []  # (row, order, part, j) of the first NaN/Inf the kernel will not see
    arrays = [("z", j, a) for j, a in enumerate(pool.z)] + [("g", j, a) for j, a in enumerate(pool.g or [])]
    for order, (part, j, a) in enumerate(arrays):
        if part == "g" and combine == "features":
            row = first_non_finite_row(a)
        elif excluded is not None and len(excluded):
            sub = a[torch.as_tensor(excluded, device=a.device)] if isinstance(a, torch.Tensor) else a[excluded]
            r = first_non_finite_row(sub)
            row = None if r is None else int(excluded[r])
        else:
            row = None
        if row is not None:
            unread.append((row, order, part, j))
    if unread:
        row, _, part, j = min(unread)
        raise ValueError(non_finite_message(name, part, j, row))


def resolve_for(backend, device, m: int, n: int, layout: Layout, k: int | None, part) -> Backend:
    """resolve(backend, device) told the search's shape, so that "auto" on CUDA can choose by
    measurement (pyfk.engine.measured): m queries against n pool rows searched on `layout`,
    k neighbours (None: dense similarity), the pool's dtype read from its raw array `part`."""
    problem = None
    if isinstance(backend, str) and backend == "auto" and m > 0 and n > 0:
        problem = Problem.for_layout(m, n, layout, k, part.dtype)
    return resolve(backend, device, problem)


def _out(t: torch.Tensor, like: Descriptors):
    return t.cpu().numpy() if like.kind == "numpy" else t.to(like.device)


def _show_progress(progress, flops: float) -> bool:
    if progress is None:
        return flops > PROGRESS_FLOPS and sys.stderr.isatty()
    return bool(progress)


# ----------------------------------------------------------------------------- top-k

def search(queries: Descriptors, pool: Descriptors | PreparedPool, k: int, combine: str, normalize: str,
           backend: str | Backend = "auto", rows: np.ndarray | None = None, progress=None,
           options: dict | None = None) -> TopK:
    """Top-k of every query over the pool rows `rows` (sorted int64, None = all), as a TopK
    of global pool indices. `pool` may be a PreparedPool from an earlier call (same combine
    and normalisation), which is then reused. Inputs are not validated here (see `topk`)."""
    total = pool.n if rows is None else len(rows)
    prepared = isinstance(pool, PreparedPool)
    p_parts, layout = (pool.parts, pool.layout) if prepared else Layout.of(pool, combine)
    b = backend if isinstance(backend, Backend) else resolve_for(backend, pool.device, queries.n, total, layout, k,
                                                                  p_parts[0])
    opts = b.resolve_options(options)
    if not prepared:
        pool = b.prepare(p_parts, layout, normalize)
    q_parts, _ = Layout.of(queries, combine)
    q = normalized_block(q_parts, slice(None), normalize, device=pool.device)
    m, width = q.shape
    state = TopK.empty(m, k, q.device)
    step = b.chunk_rows(m, width, opts)
    bar = tqdm(total=total, unit="rows", unit_scale=True, desc=f"pyfk.topk [{b.name}]",
               disable=not _show_progress(progress, 2.0 * m * total * width))
    with bar:
        for start in range(0, total, step):
            stop = min(total, start + step)
            sel = slice(start, stop) if rows is None else rows[start:stop]
            state = b.topk(q, pool, sel, k, state, start, opts)
            bar.update(stop - start)
    return state if rows is None else state.remapped(rows)


def topk(queries: Descriptors, pool: Descriptors, k: int = 32, combine: str = "product",
         normalize: str = "pcc", backend: str = "auto", *, exclude=None, progress=None, options=None):
    """Top-k pool items for every query under the PFK similarity.

    R(q, p) = sum_j (z_j(q).z_j(p)) * (g_j(q).g_j(p))   combine="product"
            = sum_j  z_j(q).z_j(p) + g_j(q).g_j(p)      combine="sum"
            = sum_j  z_j(q).z_j(p)                      combine="features"
    after per-example, per-scale normalisation (`normalize`: "pcc", "l2", "none").

    Args:
        queries: Descriptors with M rows; pool: Descriptors with N rows, same scales
            (a DescriptorStore or an Extraction works too).
        k: neighbours per query, 1 <= k <= N (minus excluded rows).
        exclude: optional pool indices to leave out (e.g. already labeled).
        backend: "auto", "cpu", "torch", ... (see `pyfk.backends()`).
        progress: show a tqdm bar; None = only for long searches on a terminal.
        options: backend options, e.g. {"threads": 2} for "cpu" (`pyfk.backends()` lists them).
    Returns:
        scores (M, k) float32, descending; index (M, k) int64 pool indices, ties to
        the smaller index. NumPy in -> NumPy out; torch in -> torch on the input device.
    The M x N score matrix is never held: memory is O(M * D + M * k) beyond the
    inputs for the `cpu` backend (which normalises pool rows as it packs them), plus
    a ~256 MiB normalised chunk for `torch`.
    """
    queries = as_descriptors(queries, "queries")
    pool = as_descriptors(pool, "pool")
    check_choice(combine, "combine", COMBINES)
    check_choice(normalize, "normalize", NORMALIZES)
    check_pair(queries, pool, combine)
    # a named backend is checked before k, as always; "auto" once k and the rows searched are known
    b = None if isinstance(backend, str) and backend == "auto" else resolve(backend, pool.device)
    opts = None if b is None else b.resolve_options(options)
    rows = None
    available = pool.n
    if exclude is not None:
        excluded = check_index_set(exclude, "exclude", pool.n)
        rows = np.setdiff1d(np.arange(pool.n, dtype=np.int64), excluded, assume_unique=True)
        available = len(rows)
        if available == 0:
            raise ValueError("exclude: every pool row is excluded; nothing left to search")
    k = check_int(k, "k", 1, available, f" (the {'available ' if rows is not None else ''}pool size)")
    if b is None:
        b = resolve_for(backend, pool.device, queries.n, available, Layout.of(pool, combine)[1], k, pool.z[0])
        opts = b.resolve_options(options)
    check_state_memory(queries.n, k)
    queries.check_finite("queries")
    check_pool_finite(pool, b, combine, excluded if exclude is not None else None)
    check_representable(queries, pool, combine, normalize)
    state = search(queries, pool, k, combine, normalize, b, rows, progress, opts)
    return _out(state.scores, queries), _out(state.index, queries)


def similarity(queries: Descriptors, pool: Descriptors, combine: str = "product",
               normalize: str = "pcc", backend: str = "auto", *, options=None):
    """Dense (M, N) float32 similarity matrix R (see `topk`), for small inputs and tests."""
    queries = as_descriptors(queries, "queries")
    pool = as_descriptors(pool, "pool")
    check_choice(combine, "combine", COMBINES)
    check_choice(normalize, "normalize", NORMALIZES)
    check_pair(queries, pool, combine)
    if queries.n * pool.n > (1 << 28):
        raise ValueError(f"queries/pool: a dense {queries.n} x {pool.n} matrix is too large; use pyfk.topk")
    q_parts, layout = Layout.of(queries, combine)
    p_parts, _ = Layout.of(pool, combine)
    b = resolve_for(backend, pool.device, queries.n, pool.n, layout, None, pool.z[0])
    opts = b.resolve_options(options)
    queries.check_finite("queries")
    check_pool_finite(pool, b, combine, None)
    check_representable(queries, pool, combine, normalize)
    q = normalized_block(q_parts, slice(None), normalize)
    return _out(b.pool_similarity(q, b.prepare(p_parts, layout, normalize), opts), queries)


# ----------------------------------------------------------------------------- kernel distances

class KernelDistances:
    """Kernel distances d(a, b)^2 = R(a,a) + R(b,b) - 2 R(a,b) from every pool row to a
    set of centres, through a backend's similarity kernel. The pool is prepared once; its
    normalised copy is kept on its device when it fits in pyfk.engine.backend.CACHE_BYTES,
    else normalised chunk by chunk at every call (a pool streamed from a store)."""

    def __init__(self, desc: Descriptors, combine: str, normalize: str, backend: str | Backend = "auto",
                 options: dict | None = None):
        parts, layout = Layout.of(desc, combine)
        # "auto": one centre against the pool per call, as greedy k-centre adds them; no top-k
        self.backend = backend if isinstance(backend, Backend) else resolve_for(
            backend, desc.device, 1, desc.n, layout, None, desc.z[0])
        self.options = self.backend.resolve_options(options)
        self.pool = self.backend.prepare(parts, layout, normalize)
        self.pool.keep(_backend.CACHE_BYTES)
        self.layout = layout
        self.n = self.pool.n
        self.diag = self.pool.diag()

    def min_d2(self, centres) -> np.ndarray:
        """(n,) float64: min over `centres` (pool rows) of d^2 to every pool row, clamped at 0.
        Blocks of centres x pool rows hold at most SIM_BLOCK similarities."""
        centres = np.unique(np.asarray(centres, dtype=np.int64))
        out = np.full(self.n, np.inf)
        per_block = max(1, SIM_BLOCK // self.n)
        for c0 in range(0, len(centres), per_block):
            cb = centres[c0:c0 + per_block]
            self.fold_min_d2(self.pool.block(cb), self.diag[cb], out)
        np.maximum(out, 0.0, out=out)
        return out

    def fold_min_d2(self, q, qdiag: np.ndarray, out: np.ndarray) -> None:
        """out = min(out, d^2 from each centre row of `q` to every pool row), not clamped.
        q: (c, D) normalised centre rows on the pool's device (pool rows, or rows sent from
        another rank's shard); qdiag: (c,) float64 their R(q, q)."""
        qdiag_np = np.asarray(qdiag, dtype=np.float64)[:, None]
        step = max(1, min(self.pool.stream_rows, SIM_BLOCK // len(q)))
        for start in range(0, self.n, step):
            stop = min(self.n, start + step)
            s = self.backend.similarity(q, self.pool.block(slice(start, stop)), self.layout, self.options)
            if s.device.type == "cpu":  # NumPy (no contention with the kernel's threads), float64
                s_np = s.numpy()        # temporaries of at most SIM_SUB elements
                sub = max(1, SIM_SUB // s_np.shape[1])
                m = np.full(s_np.shape[1], np.inf)
                for r in range(0, s_np.shape[0], sub):
                    part = s_np[r:r + sub].astype(np.float64)
                    part *= -2.0
                    part += qdiag_np[r:r + sub]
                    np.minimum(m, part.min(0), out=m)
            else:  # reduce on the device, bring back one row
                t = s.to(torch.float64).mul_(-2.0).add_(torch.as_tensor(qdiag_np, device=s.device))
                m = t.min(0).values.cpu().numpy()
            m += self.diag[start:stop]
            np.minimum(out[start:stop], m, out=out[start:stop])


def greedy_k_centre(dist: KernelDistances, count: int, *, seed: int, initial=None,
                    excluded=None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy farthest-first k-centre: `count` picks, each the row farthest (largest min d^2)
    from the centres so far; ties to the smaller row.

    Centres start as `initial` (e.g. the labeled rows), or, if there are none, as one
    seeded uniform row (picked first, distance +inf: the min over no centres). Rows in
    `initial`, `excluded` or already picked are never picked. Returns (picks int64,
    their min d^2 at pick time float64).
    """
    n = dist.n
    initial = np.zeros(0, dtype=np.int64) if initial is None else np.asarray(initial, dtype=np.int64)
    picked: list[int] = []
    scores: list[float] = []
    excluded = None if excluded is None else np.asarray(excluded, dtype=np.int64)
    if len(initial):
        min_d2 = dist.min_d2(initial)
    else:
        rng = np.random.default_rng(seed)
        if excluded is not None and len(excluded):  # a uniform row among those that may be picked
            free = np.setdiff1d(np.arange(n, dtype=np.int64), excluded)
            first = int(free[rng.integers(len(free))])
        else:
            first = int(rng.integers(n))
        picked.append(first)
        scores.append(np.inf)
        min_d2 = dist.min_d2(np.array([first])) if count > 1 else np.zeros(n)
    min_d2[initial] = -np.inf
    if excluded is not None:
        min_d2[excluded] = -np.inf
    min_d2[picked] = -np.inf
    while len(picked) < count:
        c = int(np.argmax(min_d2))  # first maximum: ties to the smaller row
        picked.append(c)
        scores.append(float(min_d2[c]))
        min_d2[c] = -np.inf
        if len(picked) < count:
            np.minimum(min_d2, dist.min_d2(np.array([c])), out=min_d2)
    return np.array(picked, dtype=np.int64), np.array(scores, dtype=np.float64)


# ----------------------------------------------------------------------------- selection

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


def query_rows(val: Descriptors, val_labels, val_pred, use_all) -> tuple[np.ndarray, bool]:
    """Step 1 of select: the validation rows to query -- the errors (val_pred != val_labels), or
    every row if use_all or labels/predictions are not given -- and whether the model made no
    error (every row is queried instead; the caller warns)."""
    if use_all or val_labels is None or val_pred is None:
        if not use_all and (val_labels is None) != (val_pred is None):
            raise ValueError("val_labels/val_pred: give both (to query the errors) or neither")
        return np.arange(val.n, dtype=np.int64), False
    y = check_labels(val_labels, "val_labels", val.n)
    y_hat = check_labels(val_pred, "val_pred", val.n)
    rows = np.flatnonzero(y != y_hat).astype(np.int64)
    if rows.size == 0:
        return np.arange(val.n, dtype=np.int64), True
    return rows, False


def rank_major_picks(search_k, centres: np.ndarray, k: int, budget: int, available: int, return_details: bool):
    """Steps 3-4 of select: `search_k(k)` -> the centres' TopK over the available pool;
    rank-major pick of `budget` distinct rows, k doubling (up to `available`) until enough.
    Returns the picks, or with return_details select's dict."""
    while True:
        state = search_k(k)
        s_np, i_np = state.scores.cpu().numpy(), state.index.cpu().numpy()
        chosen, where = rank_major(s_np, i_np, budget)
        if len(chosen) == budget or k == available:
            break
        k = min(available, 2 * k)
    if not return_details:
        return chosen
    return {"indices": chosen, "centres": centres, "centre": centres[where[:, 0]], "rank": where[:, 1],
            "score": s_np[where[:, 0], where[:, 1]], "k": k}


DEFAULT_K = 32


def select(pool: Descriptors, val: Descriptors, budget: int, val_labels=None, val_pred=None, k: int | None = None,
           combine: str = "product", normalize: str = "pcc", seed: int = 0, exclude=None,
           backend: str = "auto", *, use_all: bool = False, return_details: bool = False, progress=None,
           options=None):
    """The PFK acquisition (Gudovskiy et al., CVPR 2020), as in DESIGN.md section 1.

    1. queries = validation rows with val_pred != val_labels (all rows if use_all, or
       if labels/predictions are not given);
    2. if budget < #queries, greedy k-centre (seeded) reduces them to `budget` centres;
    3. top-k pool neighbours per centre, `exclude`d pool rows removed first (k=None:
       32, or the available pool if smaller; an explicit k must fit the pool);
    4. rank-major order, first `budget` distinct pool indices; k doubles until enough.
    Returns an int64 array of `budget` pool indices (NumPy), or with return_details a
    dict that also holds the centres (validation rows) and, per chosen index, the
    centre, rank (0-based) and score that brought it in.
    """
    pool = as_descriptors(pool, "pool")
    val = as_descriptors(val, "val")
    check_choice(combine, "combine", COMBINES)
    check_choice(normalize, "normalize", NORMALIZES)
    check_pair(val, pool, combine, qname="val", pname="pool")
    rows = np.arange(pool.n, dtype=np.int64)
    excluded = None
    if exclude is not None:
        excluded = check_index_set(exclude, "exclude", pool.n)
        rows = np.setdiff1d(rows, excluded, assume_unique=True)
    available = len(rows)
    if available == 0:
        raise ValueError("exclude: every pool row is excluded; nothing left to select")
    budget = check_int(budget, "budget", 1, available, " (the pool size after exclusion)")
    k = min(DEFAULT_K, available) if k is None else check_int(k, "k", 1, available, " (the pool size after exclusion)")
    seed = check_int(seed, "seed", 0, 2**63 - 1)
    for flag, value in (("use_all", use_all), ("return_details", return_details)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{flag}: expected True or False, got {type(value).__name__} {value!r}")

    queries, no_error = query_rows(val, val_labels, val_pred, use_all)
    if no_error:
        warnings.warn("select: the model makes no error on the validation set; "
                      "querying with every validation example instead", stacklevel=2)
    p_parts, layout = Layout.of(pool, combine)
    # "auto": the centres' top-k over the available rows (the k-centre step uses the same backend)
    b = resolve_for(backend, pool.device, min(budget, len(queries)), available, layout, k, pool.z[0])
    opts = b.resolve_options(options)
    val.check_finite("val")
    check_pool_finite(pool, b, combine, excluded)
    check_representable(val, pool, combine, normalize, qname="val", pname="pool")

    if budget < len(queries):
        val_queries = val.take(queries)
        # k-centre computes R(v, v') among the validation rows: they must fit float32 too
        check_representable(val_queries, val_queries, combine, normalize, qname="val", pname="val")
        dist = KernelDistances(val_queries, combine, normalize, b, opts)
        centres = queries[greedy_k_centre(dist, budget, seed=seed)[0]]
    else:
        centres = queries
    centre_desc = val.take(centres)
    search_rows = None if available == pool.n else rows
    prepared = b.prepare(p_parts, layout, normalize)  # once, reused if k has to grow
    return rank_major_picks(lambda kk: search(centre_desc, prepared, kk, combine, normalize, b, search_rows,
                                              progress, opts), centres, k, budget, available, return_details)
