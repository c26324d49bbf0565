"""Sharded exact search on torch.distributed: `topk` and `select` (DESIGN.md section 9).

Each rank of the process group holds a contiguous shard of the global pool, in rank
order; global index = offsets[rank] + local row, offsets the exclusive prefix sum of the
shard sizes. A rank searches its shard with the engine (`pyfk.engine.search.search`),
the (M, k) states are merged by the one exact, tie-stable TopK merge
(`comm.merge_topk`), and every rank returns the same answer -- same indices, same
order, same float32 scores bit for bit -- as `pyfk.topk` / `pyfk.select` in one process
on the concatenated pool, with a backend whose score of a (query, row) pair does not depend
on which other pool rows it scores with, nor on the thread count: `cpu` (tested; its score can
depend on how many queries share the call -- a call of at most a few queries takes a GEMV path
that rounds differently -- which is why every rank is given the same queries). Backends that
score with library GEMMs (`torch`, `cuda`: MKL/cuBLAS round by shape and threads, so even
one process is not reproducible across those) return a valid, exact-to-rounding top-k,
the same on every rank (the merge is), whose last-ulp scores -- and so near-ties -- may
differ from one process's.
Every index given or returned (`exclude`, results, details) is global.

Every call is collective: all ranks of `group` call it with the same queries (or
validation set), k, budget, seed, exclude, combine and normalize, and their own shard.
Bad input never leaves a rank waiting: each rank validates locally, then `comm.agree`
makes every rank raise the first failing rank's ValueError/TypeError, prefixed with
"rank r of W:"; arguments that must be equal on every rank are compared (a digest, then
the values if they differ) and a mismatch raises the same ValueError on every rank.
Without an initialised process group, or with one rank, these are `pyfk.topk` and
`pyfk.select` themselves.
"""

from __future__ import annotations

import hashlib
import re
import warnings

import numpy as np
import torch
import torch.distributed as dist

from pyfk.distributed import comm
from pyfk.engine import search as engine
from pyfk.engine.descriptors import COMBINES, NORMALIZES, Descriptors, as_descriptors
from pyfk.engine.layout import Layout
from pyfk.engine.registry import resolve
from pyfk.engine.search import (
    DEFAULT_K,
    KernelDistances,
    _out,
    check_pair,
    check_pool_finite,
    check_representable,
    check_state_memory,
    greedy_k_centre,
    search,
)
from pyfk.engine.topk_state import TopK
from pyfk.errors import check_choice, check_index_set, check_int

__all__ = ["select", "topk"]

POOL = "local_pool"  # how errors name this rank's shard


# ----------------------------------------------------------------------------- collective checks

def _attempt(fn):
    """(fn(), None), or (None, the exception) -- so that the rank still reaches the next collective."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - handed to _agree, raised there on every rank
        return None, exc


def _agree(error: BaseException | None, group) -> None:
    """comm.agree, with the failing rank's own ValueError/TypeError prefixed like the others'
    ("rank r of W: ..."), so that every rank raises the same text."""
    try:
        comm.agree(error, group)
    except (ValueError, TypeError) as exc:
        if exc is error and type(exc) in (ValueError, TypeError):
            rank, world = comm.rank_and_world(group)
            raise type(exc)(f"rank {rank} of {world}: {exc}") from exc
        raise


_NON_FINITE = re.compile(r"^(?:pool|local_pool): ([zg]\[\d+\]) contains NaN or Inf values \(first at row (\d+)\)$")


def _global_rows(error: BaseException | None, offset: int) -> BaseException | None:
    """A NaN/Inf error of the engine (local row) restated with the global row too."""
    if not isinstance(error, ValueError):
        return error
    m = _NON_FINITE.match(str(error))
    if m is None:
        return error
    row = int(m[2])
    return ValueError(f"{POOL}: {m[1]} contains NaN or Inf values (first at global row {offset + row}, "
                      f"local row {row})")


def _digest(value) -> int:
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little", signed=True)


def _indices(a: np.ndarray | None) -> str | None:
    """A readable, exact stand-in for an index array in a signature."""
    if a is None:
        return None
    head = ", ".join(str(int(x)) for x in a[:8]) + (", ..." if len(a) > 8 else "")
    return f"{len(a)} indices [{head}] (digest {_digest(a.tobytes()) & (2**64 - 1):016x})"


def _check_same(signature: list[tuple[str, object]], group) -> None:
    """Raise the same ValueError on every rank unless every rank passed an equal `signature`
    ((argument, value) pairs of plain Python values). One int64 all-gather when they agree."""
    _, world = comm.rank_and_world(group)
    got = comm.all_gather_tensor(torch.tensor([_digest(signature)], dtype=torch.int64), group)
    if len({int(g[0]) for g in got}) == 1:
        return
    every: list = [None] * world
    dist.all_gather_object(every, signature, group=group)
    for q in range(1, world):
        for (name, v0), (_, vq) in zip(every[0], every[q]):
            if repr(v0) != repr(vq):
                raise ValueError(f"{name}: expected the same on every rank, got {v0} on rank 0 and {vq} on rank {q}")
    raise ValueError(f"arguments: expected the same on every rank, got {every[0]} on rank 0 and others elsewhere")


class _PoolNorms:
    """What check_representable reads of a pool -- scale count and largest row norms --
    here over every shard."""

    def __init__(self, num_scales: int, norms: dict):
        self.num_scales = num_scales
        self.norms = norms

    def max_row_norms(self) -> dict:
        return self.norms


def _global_norms(pool: Descriptors, combine: str, group) -> _PoolNorms:
    """Largest row norms of every array `combine` reads, over all shards (collective)."""
    keys = [("z", j) for j in range(pool.num_scales)]
    if combine != "features":
        keys += [("g", j) for j in range(pool.num_scales)]
    local = pool.max_row_norms()
    got = comm.all_gather_tensor(torch.tensor([local[key] for key in keys], dtype=torch.float64), group)
    best = torch.stack(got).max(0).values.tolist()
    return _PoolNorms(pool.num_scales, dict(zip(keys, best)))


# ----------------------------------------------------------------------------- the shard

def _check_pair(queries: Descriptors, pool: Descriptors, combine: str, qname: str) -> None:
    """engine.check_pair, except that this rank's shard may be empty (the pool as a whole is
    checked non-empty once the shard sizes are known)."""
    try:
        check_pair(queries, pool, combine, qname=qname, pname=POOL)
    except ValueError as exc:
        if pool.n or not str(exc).startswith(f"{POOL}: expected a non-empty pool"):
            raise
        if queries.n == 0:
            raise ValueError(f"{qname}: expected at least one row, got 0") from None


class _Shard:
    """This rank's part of the global pool, after the global `exclude` (sorted int64 or None)."""

    def __init__(self, offsets: np.ndarray, rank: int, excluded: np.ndarray | None):
        self.offset = int(offsets[rank])
        self.n = int(offsets[rank + 1]) - self.offset
        self.total = int(offsets[-1])
        if excluded is None:
            excluded = np.zeros(0, dtype=np.int64)
        mine = excluded[(excluded >= self.offset) & (excluded < self.offset + self.n)] - self.offset
        # as in the engine: local rows left to search (None = all), the excluded ones (checked apart)
        self.rows = None if len(mine) == 0 else np.setdiff1d(np.arange(self.n, dtype=np.int64), mine,
                                                             assume_unique=True)
        self.excluded = mine if len(mine) else None
        self.available = self.n - len(mine)
        self.total_available = self.total - len(excluded)


def _sharded_search(queries: Descriptors, pool, k: int, combine: str, normalize: str, b, shard: _Shard,
                    progress, options, group) -> TopK:
    """The exact top-k of `queries` over every shard, identical on every rank: the engine's
    search over this shard's rows (k capped at what it holds, global indices, padded to k
    with empty slots), then one exact merge. `pool`: this shard's Descriptors or PreparedPool."""
    def local() -> TopK:
        if shard.available == 0:
            return TopK.empty(queries.n, k)
        state = search(queries, pool, min(k, shard.available), combine, normalize, b, shard.rows, progress,
                       options).shifted(shard.offset)
        if state.k < k:
            state = TopK.empty(queries.n, k, state.device).merge(state)
        return state

    state, error = _attempt(local)
    _agree(_global_rows(error, shard.offset), group)
    return comm.merge_topk(state, group)


def _parse(queries, qname: str, local_pool, combine, normalize, backend, options, group, *, queries_first: bool):
    """The first collective step of topk/select: (queries, this rank's pool, backend, options,
    shard offsets), every rank raising the same error if any rank's arguments are bad.
    queries_first: which argument is checked first (pyfk.topk checks queries, pyfk.select the pool)."""
    def parse():
        if queries_first:
            q, p = as_descriptors(queries, qname), as_descriptors(local_pool, POOL)
        else:
            p = as_descriptors(local_pool, POOL)
            q = as_descriptors(queries, qname)
        check_choice(combine, "combine", COMBINES)
        check_choice(normalize, "normalize", NORMALIZES)
        _check_pair(q, p, combine, qname)
        b = resolve(backend, p.device)
        return q, p, b, b.resolve_options(options)

    parsed, error = _attempt(parse)
    _agree(error, group)
    q, p, b, opts = parsed
    return q, p, b, opts, comm.shard_offsets(p.n, group)


def _progress(progress, rank: int):
    """One progress bar per group (rank 0's), not one per rank on the same terminal."""
    return progress if rank == 0 else False


# ----------------------------------------------------------------------------- top-k

def topk(queries, local_pool, k: int = 32, combine: str = "product", normalize: str = "pcc",
         backend: str = "auto", *, exclude=None, group=None, options=None, progress=None):
    """`pyfk.topk` over a pool sharded across the ranks of `group` (collective).

    Args as `pyfk.topk`, with `local_pool` this rank's contiguous shard (may be empty) and
    `queries`, `k`, `exclude` (global pool indices), `combine`, `normalize` the same on
    every rank; 1 <= k <= the global pool size minus the excluded rows (a shard may hold
    fewer than k rows). `group`: a torch.distributed group (default: the default group).
    Returns, on every rank, (scores, global indices) identical -- bit for bit -- to
    `pyfk.topk(queries, whole_pool, ...)` in one process, whole_pool the shards
    concatenated in rank order: (M, k) float32 descending, (M, k) int64; NumPy in -> NumPy
    out, torch in -> torch on the queries' device. A progress bar is shown by rank 0 only.
    """
    rank, world = comm.rank_and_world(group)
    if world == 1:
        return engine.topk(queries, local_pool, k, combine, normalize, backend, exclude=exclude,
                           progress=progress, options=options)

    q, p, b, opts, offsets = _parse(queries, "queries", local_pool, combine, normalize, backend, options, group,
                                    queries_first=True)

    def validate():
        if offsets[-1] == 0:
            raise ValueError(f"{POOL}: expected a non-empty pool, got 0 rows on every rank")
        excluded = None if exclude is None else check_index_set(exclude, "exclude", int(offsets[-1]))
        shard = _Shard(offsets, rank, excluded)
        if shard.total_available == 0:
            raise ValueError("exclude: every pool row is excluded; nothing left to search")
        kk = check_int(k, "k", 1, shard.total_available,
                       f" (the {'available ' if excluded is not None else ''}pool size)")
        check_state_memory(q.n, kk)
        q.check_finite("queries")
        check_pool_finite(p, b, combine, shard.excluded, name=POOL)
        return excluded, shard, kk

    checked, error = _attempt(validate)
    _agree(_global_rows(error, int(offsets[rank])), group)
    excluded, shard, kk = checked
    _check_same([("queries", f"{q.n} rows of widths {q.widths}"),
                 ("queries.g", q.g_widths if combine != "features" else None),
                 ("k", kk), ("combine", combine), ("normalize", normalize), ("exclude", _indices(excluded))], group)
    if normalize == "none":  # the float32 range of R over the whole pool
        norms = _global_norms(p, combine, group)
        _agree(_attempt(lambda: check_representable(q, norms, combine, normalize, pname=POOL))[1], group)
    state = _sharded_search(q, p, kk, combine, normalize, b, shard, _progress(progress, rank), opts, group)
    return _out(state.scores, q), _out(state.index, q)


# ----------------------------------------------------------------------------- selection

def select(local_pool, val, budget: int, val_labels=None, val_pred=None, k: int | None = None,
           combine: str = "product", normalize: str = "pcc", seed: int = 0, exclude=None, backend: str = "auto",
           *, use_all: bool = False, return_details: bool = False, group=None, options=None, progress=None):
    """`pyfk.select` (the PFK acquisition) over a pool sharded across the ranks of `group`
    (collective).

    Args as `pyfk.select`, with `local_pool` this rank's contiguous shard (may be empty) and
    everything else -- the validation set and its labels, budget, k, seed, `exclude`
    (global pool indices) -- the same on every rank. The validation errors are reduced to
    centres by greedy k-centre on every rank alike (the validation set is replicated, no
    communication), their top-k is searched over every shard and merged, and the
    rank-major pick (k doubling until enough) runs on the merged lists.
    Returns, on every rank, what `pyfk.select` returns on the concatenated pool: `budget`
    global int64 pool indices, or with return_details the same dict (centres, and per pick
    its centre, rank, score; the final k).
    """
    rank, world = comm.rank_and_world(group)
    if world == 1:
        return engine.select(local_pool, val, budget, val_labels, val_pred, k, combine, normalize, seed, exclude,
                             backend, use_all=use_all, return_details=return_details, progress=progress,
                             options=options)

    v, p, b, opts, offsets = _parse(val, "val", local_pool, combine, normalize, backend, options, group,
                                    queries_first=False)

    def validate():
        if offsets[-1] == 0:
            raise ValueError(f"{POOL}: expected a non-empty pool, got 0 rows on every rank")
        excluded = None if exclude is None else check_index_set(exclude, "exclude", int(offsets[-1]))
        shard = _Shard(offsets, rank, excluded)
        available = shard.total_available
        if available == 0:
            raise ValueError("exclude: every pool row is excluded; nothing left to select")
        n_pick = check_int(budget, "budget", 1, available, " (the pool size after exclusion)")
        kk = min(DEFAULT_K, available) if k is None else check_int(k, "k", 1, available,
                                                                   " (the pool size after exclusion)")
        s = check_int(seed, "seed", 0, 2**63 - 1)
        for flag, value in (("use_all", use_all), ("return_details", return_details)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{flag}: expected True or False, got {type(value).__name__} {value!r}")
        queries, no_error = engine.query_rows(v, val_labels, val_pred, use_all)
        v.check_finite("val")
        check_pool_finite(p, b, combine, shard.excluded, name=POOL)
        if n_pick < len(queries):  # k-centre computes R(v, v') among the validation rows
            vq = v.take(queries)
            check_representable(vq, vq, combine, normalize, qname="val", pname="val")
        return excluded, shard, n_pick, kk, s, queries, no_error

    checked, error = _attempt(validate)
    _agree(_global_rows(error, int(offsets[rank])), group)
    excluded, shard, n_pick, kk, seed, queries, no_error = checked
    _check_same([("val", f"{v.n} rows of widths {v.widths}"),
                 ("val.g", v.g_widths if combine != "features" else None),
                 ("budget", n_pick), ("k", kk), ("seed", seed), ("use_all", bool(use_all)),
                 ("return_details", bool(return_details)), ("combine", combine), ("normalize", normalize),
                 ("exclude", _indices(excluded)), ("val_labels/val_pred (the validation rows queried)",
                                                   _indices(queries))], group)
    if no_error:
        warnings.warn("select: the model makes no error on the validation set; "
                      "querying with every validation example instead", stacklevel=2)
    if normalize == "none":
        norms = _global_norms(p, combine, group)
        _agree(_attempt(lambda: check_representable(v, norms, combine, normalize, qname="val", pname=POOL))[1],
               group)

    def centres_and_pool():
        if n_pick < len(queries):
            dist_ = KernelDistances(v.take(queries), combine, normalize, b, opts)
            centres = queries[greedy_k_centre(dist_, n_pick, seed=seed)[0]]
        else:
            centres = queries
        p_parts, layout = Layout.of(p, combine)
        return centres, b.prepare(p_parts, layout, normalize)  # once, reused if k has to grow

    prepared, error = _attempt(centres_and_pool)
    _agree(error, group)
    centres, pool = prepared
    if n_pick < len(queries):  # the same validation set gives the same centres on every rank
        _check_same([("val (its k-centre reduction)", _indices(centres))], group)
    centre_desc = v.take(centres)
    show = _progress(progress, rank)
    return engine.rank_major_picks(lambda kk: _sharded_search(centre_desc, pool, kk, combine, normalize, b, shard,
                                                              show, opts, group),
                                   centres, kk, n_pick, shard.total_available, return_details)
