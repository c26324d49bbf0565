"""Sharded acquisition: any registered strategy over a pool split across the ranks of a group.

    sel = pyfk.distributed.acquire("badge", PoolInputs(badge=my_shard), budget=125, labeled=L, seed=0)

Each rank holds a contiguous shard of the pool (shard sizes in rank order; global index
= offsets[rank] + local row). `labeled`, the returned indices and every index in the
provenance are global, and every rank gets the Selection `pyfk.acquire` returns for the
whole pool in one process: the same indices in the same order, the same float64 scores,
the same provenance (plus "world"; "seconds" is the slowest rank's).

How each family stays exact:

  random            every rank knows N and the labeled set, so every rank makes the one-process
                    draw itself: numpy's Generator.choice draws positions among the unlabeled rows
                    from the pool size alone, mapped to global rows through the sorted labeled set
                    (O(budget + |labeled|) memory, no O(N) array).
  entropy, margin, least_confidence, var_ratio, bald, std, ensemble_*
                    each rank scores its shard with the strategy's own per-row score
                    (uncertainty.ROW_SCORES), keeps its local top `budget` and the candidates are
                    merged: score descending, ties to the smaller global index. Communication:
                    world x budget (score, index) pairs per rank.
  coreset           greedy k-centre, step by step: every rank's min d^2 array covers its own rows;
                    the labeled rows (the initial centres) are gathered from their owners in the
                    centre blocks one process uses; each step reduces the arg-max across ranks
                    (comm.argmax_global: ties to the smaller index) and broadcasts the winning
                    row's normalised descriptors and R(x, x), with which every rank updates its
                    own rows. Per step: two scalar all-gathers and one (1, D + 1) broadcast.
  badge             k-means++ seeding: the first pick is the global arg-max of R(x, x); each
                    later draw needs np.cumsum of the global weight vector bit for bit, so the
                    cumulative sum runs through the ranks in order (rank q starts from rank q-1's
                    last partial sum, point to point): O(N / world) memory and work per rank, at
                    the price of a serial pass of N float64 additions plus world - 1 hops per
                    step (about 1 ms per million rows). The drawn position is the sum of the
                    ranks' searchsorted counts. Per step also one scalar broadcast, one scalar
                    all-gather and the (1, D + 2) row broadcast.
  pcc, pfk, pfk_sum pyfk.distributed.search.select (sharded top-k, exact merge); the per-scale
                    provenance terms are computed by each pick's owner and gathered.

coreset and badge compare kernel distances computed on each rank's shard with those one
process computes on the whole pool: they agree bit for bit only where the backend's
similarity kernel gives every (query, pool row) entry independently of how the pool rows
are split. The `cpu` backend does (SHARD_EXACT_BACKENDS); BLAS/cuBLAS matmuls (`torch`,
and the similarity `triton`/`cuda`/`faiss` use) need not, so these two strategies raise
NotImplementedError with them unless `exact=False` is passed (same algorithm; picks may
then differ from one process at near-ties of d^2).

Validation: every rank checks its own inputs, then `comm.agree` makes every rank raise the
same error before any collective could hang; every rank must pass the same strategy,
budget, labeled set, seed, backend and parameters (checked: a mismatch is a ValueError on
every rank). Error messages about a shard's descriptors name its local rows (the message
starts with the failing rank); probability errors name global rows.
"""

from __future__ import annotations

import hashlib
import operator
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pyfk.al.strategies import base
from pyfk.al.strategies.base import (
    POOL_FIELDS,
    PoolInputs,
    Selection,
    ValInputs,
    check_budget,
    check_call,
    make_selection,
    top_budget,
)
from pyfk.al.strategies.diversity import _descriptor_field
from pyfk.al.strategies.pfk import _scale_terms, pfk_result
from pyfk.al.strategies.uncertainty import ROW_SCORES, row_scores
from pyfk.distributed import comm
from pyfk.engine import search as engine_search
from pyfk.engine.descriptors import NORMALIZES, as_descriptors
from pyfk.engine.layout import Layout
from pyfk.engine.registry import resolve
from pyfk.engine.search import KernelDistances
from pyfk.errors import check_choice

# Backends whose similarity kernel gives each (query, pool row) entry independently of how the
# pool rows are split into calls (and of the thread count): sharded coreset/badge are exact with them.
SHARD_EXACT_BACKENDS = frozenset({"cpu"})

GREEDY = ("coreset", "badge")
PFK_COMBINES = {"pcc": "features", "pfk": "product", "pfk_sum": "sum"}


def acquire(strategy: str, local_pool: PoolInputs, budget: int, *, labeled=None, seed: int = 0,
            val: ValInputs | None = None, backend: str = "auto", group=None, exact: bool = True,
            progress: bool | None = None, **params) -> Selection:
    """Run acquisition strategy `strategy` over a pool sharded across the ranks of `group`.

    Collective: every rank of `group` (None: the default group) calls it with its own
    contiguous shard `local_pool` (a PoolInputs; a shard may be empty) and the same
    strategy, budget, labeled (global indices), seed, val, backend and params. Returns on
    every rank the Selection `pyfk.acquire(strategy, whole_pool, ...)` returns in one
    process (global indices). Without a process group (or with one rank) it is
    `pyfk.acquire` itself.

    exact: coreset and badge are exact only with a backend in SHARD_EXACT_BACKENDS ("cpu");
    with another they raise NotImplementedError, unless exact=False (same algorithm, picks
    may differ at near-ties of the float32 distances). progress: as in `pyfk.acquire` (rank 0's
    bar only). Raises what `pyfk.acquire` raises, on every rank, plus ValueError when the ranks'
    calls disagree.
    """
    rank, world = comm.rank_and_world(group)
    if world == 1:
        return base.select(strategy, local_pool, budget, labeled=labeled, seed=seed, val=val, backend=backend,
                           progress=progress, **params)

    # 1. local checks (no collective before agree: a failing rank must not leave the others waiting)
    error, call = None, None
    try:
        if not isinstance(exact, (bool, np.bool_)):
            raise TypeError(f"exact: expected True or False, got {type(exact).__name__} {exact!r}")
        call = _local_call(strategy, local_pool, val, seed, params, backend)
        call.progress = progress
    except Exception as exc:  # noqa: BLE001 - raised on every rank by agree
        error = exc
    comm.agree(error, group)

    # 2. the shards and the call every rank made
    offsets = comm.shard_offsets(call.local_n, group)
    sig = _signature(strategy, budget, labeled, seed, backend, exact, call)
    _check_same_call(sig, group, world)
    n = int(offsets[-1])
    if n == 0:
        raise ValueError(f"pool.{call.size_field}: expected a non-empty pool, got 0 rows (every shard is empty)")
    labeled_arr, budget, available = check_budget(labeled, budget, n)
    if call.unsupported:  # a strategy registered after this module was written
        raise NotImplementedError(f"{strategy}: no sharded version; pyfk.distributed.acquire knows "
                                  f"{sorted(['random', *ROW_SCORES, *GREEDY, *PFK_COMBINES])}")
    if strategy in GREEDY and exact and call.backend.name not in SHARD_EXACT_BACKENDS:
        raise NotImplementedError(
            f"{strategy}: sharded selection is exact only with backend {sorted(SHARD_EXACT_BACKENDS)}, whose "
            f"similarity kernel does not depend on how the pool is split; backend {call.backend.name!r} "
            "(BLAS/cuBLAS matmuls) may round d^2 differently per shard. Use backend='cpu' (CPU descriptors), "
            "or pass exact=False to run the same algorithm with possibly different picks at near-ties")
    sh = _Shard(group=group, rank=rank, world=world, offsets=offsets, n=n, lo=int(offsets[rank]),
                hi=int(offsets[rank + 1]), labeled=labeled_arr, budget=budget, seed=call.seed, val=val,
                backend=backend)

    # 3. the local work that can fail (probabilities checked while scored; descriptors checked finite)
    start = time.perf_counter()
    error, prepared = None, None
    try:
        prepared = _prepare(strategy, local_pool, call, sh)
    except Exception as exc:  # noqa: BLE001
        error = exc
    comm.agree(error, group)

    # 4. the collective selection
    indices, scores, extras = _run(strategy, local_pool, call, sh, prepared)
    seconds = max(float(t[0]) for t in comm.all_gather_tensor(
        torch.tensor([time.perf_counter() - start], dtype=torch.float64), group))
    sel = make_selection(strategy, indices, scores, extras, budget=budget, n=n, labeled=labeled_arr, seed=call.seed,
                         params=call.params, seconds=seconds, available=available)
    sel.provenance["world"] = world
    return sel


# ----------------------------------------------------------------------------- the call and the shards

@dataclass
class _Call:
    """What a rank's local checks found: the merged params, the seed, the shard size and,
    for descriptor strategies, the shard's Descriptors, Layout and resolved backend."""

    params: dict
    seed: int
    local_n: int
    size_field: str
    desc: object = None
    layout: Layout | None = None
    backend: object = None
    shapes: tuple = ()
    unsupported: bool = False
    progress: bool | None = None


@dataclass
class _Shard:
    group: object
    rank: int
    world: int
    offsets: np.ndarray
    n: int
    lo: int
    hi: int
    labeled: np.ndarray
    budget: int
    seed: int
    val: ValInputs | None
    backend: str

    @property
    def local_n(self) -> int:
        return self.hi - self.lo

    @property
    def local_labeled(self) -> np.ndarray:
        """Local positions of the labeled rows in this shard."""
        lab = self.labeled
        return lab[(lab >= self.lo) & (lab < self.hi)] - self.lo

    def local_rows(self) -> np.ndarray:
        """Local positions of this shard's unlabeled rows, sorted."""
        return np.setdiff1d(np.arange(self.local_n, dtype=np.int64), self.local_labeled, assume_unique=True)

    def owner(self, index: int) -> int:
        """The rank holding global row `index`."""
        return int(np.searchsorted(self.offsets, index, side="right")) - 1


def _local_call(strategy, pool, val, seed, params, backend) -> _Call:
    spec, merged, seed, local_n = check_call(strategy, pool, val, seed, params, allow_empty=True)
    size_field = spec.needs.pool[0] if spec.needs.pool else next(
        f for f in (*POOL_FIELDS, "n") if getattr(pool, f) is not None)
    call = _Call(params=merged, seed=seed, local_n=local_n, size_field=size_field)
    if strategy in ROW_SCORES:
        field = ROW_SCORES[strategy][0]
        shape = tuple(int(s) for s in getattr(pool, field).shape)
        call.shapes = (shape[0], shape[2]) if field == "mc_probs" else shape[1:]  # (K, C) or (C,)
    elif strategy in GREEDY:
        name, combine = ("features", "features") if strategy == "coreset" else ("badge", "product")
        if strategy == "coreset":
            check_choice(merged["normalize"], "normalize", NORMALIZES)
        desc = as_descriptors(getattr(pool, name), f"pool.{name}")
        if combine != "features" and not desc.has_g:
            raise ValueError(f"pool.{name}: combine={combine!r} needs gradients g, but g is None")
        call.desc = desc
        call.layout = Layout.of(desc, combine)[1]
        call.backend = resolve(backend, desc.device)
        call.shapes = (tuple(desc.widths), desc.g_widths)
    elif strategy in PFK_COMBINES:
        check_choice(merged["normalize"], "normalize", NORMALIZES)
        desc = as_descriptors(pool.descriptors, "pool.descriptors")
        call.desc = desc
        call.shapes = (tuple(desc.widths), desc.g_widths)
    elif strategy != "random":
        call.unsupported = True
    return call


def _digest(x) -> str:
    """A short fingerprint of the labeled set as given (None and empty are the same)."""
    if x is None:
        return "none"
    try:
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if a.size == 0:
            return "none"
        if a.dtype.kind in "iu":
            a = a.astype(np.int64)
        blob = f"{a.dtype}{a.shape}".encode() + np.ascontiguousarray(a).tobytes()
        return f"{a.size} indices, sha256 {hashlib.sha256(blob).hexdigest()[:12]}"
    except Exception:  # noqa: BLE001 - an odd object: check_budget reports it
        return repr(type(x))


def _signature(strategy, budget, labeled, seed, backend, exact, call: _Call) -> dict:
    try:
        budget = repr(operator.index(budget)) if not isinstance(budget, bool) else repr(budget)
    except TypeError:
        budget = repr(budget)
    return {"strategy": strategy, "budget": budget, "labeled": _digest(labeled), "seed": call.seed,
            "backend": repr(backend) if call.backend is None else f"{backend!r} ({call.backend.name})",
            "exact": bool(exact), "params": repr(base._jsonable(call.params)), "shard shapes": repr(call.shapes)}


def _check_same_call(sig: dict, group, world: int) -> None:
    """ValueError on every rank if the ranks' calls differ (strategy, budget, labeled, ...)."""
    sigs: list = [None] * world
    dist.all_gather_object(sigs, sig, group=group)
    for key in sig:
        for q in range(1, world):
            if sigs[q][key] != sigs[0][key]:
                raise ValueError(f"{key}: every rank must pass the same value to pyfk.distributed.acquire "
                                 f"(and shards of the same widths), got {sigs[0][key]} on rank 0 and "
                                 f"{sigs[q][key]} on rank {q}")


def _prepare(strategy, pool, call: _Call, sh: _Shard):
    if strategy in ROW_SCORES:
        field, score_fn = ROW_SCORES[strategy]
        return row_scores(pool, field, score_fn, offset=sh.lo)
    if strategy in GREEDY:
        name, combine, normalize = (("features", "features", call.params["normalize"]) if strategy == "coreset"
                                    else ("badge", "product", "none"))
        desc = _descriptor_field(pool, name, combine)
        return _ShardDistances(desc, combine, normalize, call.backend, call.layout, sh)
    return None


def _run(strategy, pool, call: _Call, sh: _Shard, prepared):
    if strategy == "random":
        return _random(sh)
    if strategy in ROW_SCORES:
        return _top_scores(prepared, sh)
    if strategy == "coreset":
        return _coreset(prepared, sh)
    if strategy == "badge":
        return _badge(prepared, sh)
    return _pfk_family(pool, call, sh, PFK_COMBINES[strategy], **call.params)


# ----------------------------------------------------------------------------- random and per-row scores

def _random(sh: _Shard):
    """uncertainty._random's draw, made on every rank: Generator.choice over the unlabeled rows
    draws positions from their count alone; position p is the p-th unlabeled global row."""
    pos = np.random.default_rng(sh.seed).choice(sh.n - len(sh.labeled), size=sh.budget, replace=False)
    pos = np.asarray(pos, dtype=np.int64)
    # labeled[i] - i unlabeled rows precede labeled[i]: row = p + #{i : labeled[i] - i <= p}
    gaps = sh.labeled - np.arange(len(sh.labeled), dtype=np.int64)
    idx = pos + np.searchsorted(gaps, pos, side="right")
    return idx, np.zeros(sh.budget), {}


def _top_scores(scores: np.ndarray, sh: _Shard):
    """The global top `budget` of per-row scores (ties to the smaller index): each rank's local
    top `budget` (under the same order), gathered and merged."""
    rows = sh.local_rows()
    k = min(sh.budget, len(rows))
    cand_s = np.full(sh.budget, -np.inf)
    cand_i = np.full(sh.budget, -1, dtype=np.int64)
    if k:
        idx, s = top_budget(scores, rows, k)
        cand_i[:k], cand_s[:k] = idx + sh.lo, s
    all_s = torch.cat(comm.all_gather_tensor(torch.from_numpy(cand_s), sh.group)).numpy()
    all_i = torch.cat(comm.all_gather_tensor(torch.from_numpy(cand_i), sh.group)).numpy()
    keep = all_i >= 0
    all_s, all_i = all_s[keep], all_i[keep]
    order = np.lexsort((all_i, -all_s))[:sh.budget]
    return all_i[order], all_s[order], {}


# ----------------------------------------------------------------------------- kernel distances on a shard

class _ShardDistances:
    """KernelDistances over this rank's rows (None for an empty shard) and the d^2 from
    centre rows given as normalised descriptors (gathered or broadcast from their owners)."""

    def __init__(self, desc, combine, normalize, backend, layout: Layout, sh: _Shard):
        self.sh = sh
        self.width = layout.width
        self.kd = KernelDistances(desc, combine, normalize, backend) if sh.local_n else None
        self.diag = self.kd.diag if self.kd is not None else np.zeros(0)
        self.backend_name = backend.name

    def pack(self, local_rows, extra=()) -> torch.Tensor:
        """(m, D + 1 + len(extra)) float64: normalised rows, R(x, x), then the extra columns."""
        local_rows = np.asarray(local_rows, dtype=np.int64)
        block = self.kd.pool.block(local_rows).detach().cpu().to(torch.float64)
        cols = [block, torch.from_numpy(self.diag[local_rows])[:, None]]
        cols += [torch.as_tensor(np.asarray(e, dtype=np.float64)).reshape(-1, 1) for e in extra]
        return torch.cat(cols, 1)

    def broadcast(self, index: int, extra=()) -> torch.Tensor:
        """The packed row of global row `index`, from its owner, on every rank."""
        owner = self.sh.owner(index)
        mine = self.sh.rank == owner
        rows = self.pack([index - self.sh.lo], [[e] for e in extra]) if mine else None
        return comm.broadcast_rows(rows, owner, (1, self.width + 1 + len(extra)), torch.float64, self.sh.group)

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """The packed rows of sorted global rows `indices` (any owners), in order, on every rank."""
        owners = np.searchsorted(self.sh.offsets, indices, side="right") - 1
        pieces = []
        for q in np.unique(owners):
            sel = indices[owners == q]
            rows = self.pack(sel - self.sh.lo) if q == self.sh.rank else None
            pieces.append(comm.broadcast_rows(rows, int(q), (len(sel), self.width + 1), torch.float64,
                                              self.sh.group))
        return torch.cat(pieces)

    def min_d2(self, packed: torch.Tensor) -> np.ndarray:
        """(local n,) float64 min d^2 from the packed centre rows to this shard's rows, clamped
        at 0: KernelDistances.min_d2 with the centres given as rows, reduced in the same order
        (the similarity kernel sees the same query block; the min and the sums are elementwise)."""
        kd = self.kd
        if kd is None:
            return np.zeros(0)
        q_all = packed[:, :self.width].to(torch.float32).to(kd.pool.device)
        qdiag_all = packed[:, self.width].numpy()
        out = np.full(kd.n, np.inf)
        per_block = max(1, engine_search.SIM_BLOCK // self.sh.n)  # one process's centre blocks (the whole N)
        for c0 in range(0, len(q_all), per_block):
            kd.fold_min_d2(q_all[c0:c0 + per_block], qdiag_all[c0:c0 + per_block], out)
        np.maximum(out, 0.0, out=out)
        return out


def _coreset(sd: _ShardDistances, sh: _Shard):
    """pyfk.engine.search.greedy_k_centre(dist, budget, seed=seed, initial=labeled), sharded."""
    local_lab = sh.local_labeled
    picked: list[int] = []
    scores: list[float] = []
    if len(sh.labeled):
        per_block = max(1, engine_search.SIM_BLOCK // sh.n)
        min_d2 = np.full(sh.local_n, np.inf)
        for c0 in range(0, len(sh.labeled), per_block):  # a block at a time: bounded memory
            np.minimum(min_d2, sd.min_d2(sd.gather(sh.labeled[c0:c0 + per_block])), out=min_d2)
    else:
        first = int(np.random.default_rng(sh.seed).integers(sh.n))
        picked.append(first)
        scores.append(np.inf)
        min_d2 = sd.min_d2(sd.broadcast(first)) if sh.budget > 1 else np.zeros(sh.local_n)
    min_d2[local_lab] = -np.inf
    for c in picked:
        if sh.lo <= c < sh.hi:
            min_d2[c - sh.lo] = -np.inf
    while len(picked) < sh.budget:
        if sh.local_n:
            i = int(np.argmax(min_d2))  # first maximum
            v, c = comm.argmax_global(float(min_d2[i]), sh.lo + i, sh.group)
        else:
            v, c = comm.argmax_global(-np.inf, -1, sh.group)
        picked.append(c)
        scores.append(v)
        if sh.lo <= c < sh.hi:
            min_d2[c - sh.lo] = -np.inf
        if len(picked) < sh.budget:
            np.minimum(min_d2, sd.min_d2(sd.broadcast(c)), out=min_d2)
    extras = {"backend": sd.backend_name, "combine": "features", "initial_centres": int(len(sh.labeled)),
              "random_start": int(picked[0]) if not len(sh.labeled) else None}
    return np.array(picked, dtype=np.int64), np.array(scores, dtype=np.float64), extras


def _global_rank(group, q: int) -> int:
    return q if group is None else dist.get_global_rank(group, q)


def _chained_cumsum(w: np.ndarray, sh: _Shard) -> tuple[np.ndarray, float]:
    """This rank's segment of np.cumsum(global w) bit for bit, and the global total: rank q
    continues from rank q-1's last partial sum (np.cumsum adds left to right)."""
    dev = comm._device(sh.group)
    carry = None
    if sh.rank > 0:
        buf = torch.zeros(1, dtype=torch.float64, device=dev)
        dist.recv(buf, src=_global_rank(sh.group, sh.rank - 1), group=sh.group)
        carry = float(buf.cpu()[0])
    if len(w):
        if carry is not None:
            w = w.copy()
            w[0] = carry + w[0]
        cum = np.cumsum(w)
        last = float(cum[-1])
    else:
        cum = w
        last = 0.0 if carry is None else carry
    if sh.rank < sh.world - 1:
        dist.send(torch.tensor([last], dtype=torch.float64, device=dev), dst=_global_rank(sh.group, sh.rank + 1),
                  group=sh.group)
    mine = torch.tensor([[last]], dtype=torch.float64) if sh.rank == sh.world - 1 else None
    total = float(comm.broadcast_rows(mine, sh.world - 1, (1, 1), torch.float64, sh.group)[0, 0])
    return cum, total


def _gathered_ints(value: int, sh: _Shard) -> list[int]:
    return [int(t[0]) for t in comm.all_gather_tensor(torch.tensor([int(value)], dtype=torch.int64), sh.group)]


def _badge(sd: _ShardDistances, sh: _Shard):
    """diversity._badge (k-means++ seeding on the BADGE embeddings), sharded."""
    rng = np.random.default_rng(sh.seed)
    rows = sh.local_rows()
    if len(rows):
        i = int(np.argmax(sd.diag[rows]))  # largest embedding norm, ties to the smaller index
        first_score, first = comm.argmax_global(float(sd.diag[rows[i]]), sh.lo + int(rows[i]), sh.group)
    else:
        first_score, first = comm.argmax_global(-np.inf, -1, sh.group)
    picked, scores, fallbacks = [first], [first_score], 0
    unavailable = np.zeros(sh.local_n, dtype=bool)
    unavailable[sh.local_labeled] = True
    if sh.lo <= first < sh.hi:
        unavailable[first - sh.lo] = True
    min_d2 = sd.min_d2(sd.broadcast(first)) if sh.budget > 1 else np.zeros(sh.local_n)
    while len(picked) < sh.budget:
        w = np.where(unavailable, 0.0, min_d2)
        cum, total = _chained_cumsum(w, sh)
        if total > 0:
            u = rng.random()
            t = u * total
            c = sum(_gathered_ints(np.searchsorted(cum, t, side="right"), sh))
            # one process also falls back when w[c] <= 0, which cannot happen for c < N: w >= 0,
            # so w[c] == 0 would give cum[c] == cum[c - 1] <= t (or cum[0] == 0 <= t) -- not > t
            if c >= sh.n:  # u * total rounded up to total: the last row of positive weight
                pos = np.flatnonzero(w > 0)
                c = max(_gathered_ints(sh.lo + int(pos[-1]) if len(pos) else -1, sh))
        else:  # every remaining d^2 is 0: smallest unpicked index
            free = np.flatnonzero(~unavailable)
            c = min(_gathered_ints(sh.lo + int(free[0]) if len(free) else sh.n, sh))
            fallbacks += 1
        mine = sh.lo <= c < sh.hi
        picked.append(c)
        if len(picked) < sh.budget:
            packed = sd.broadcast(c, extra=[min_d2[c - sh.lo] if mine else 0.0])
            scores.append(float(packed[0, -1]))
            if mine:
                unavailable[c - sh.lo] = True
            np.minimum(min_d2, sd.min_d2(packed[:, :-1]), out=min_d2)
        else:
            value = torch.tensor([[float(min_d2[c - sh.lo])]], dtype=torch.float64) if mine else None
            scores.append(float(comm.broadcast_rows(value, sh.owner(c), (1, 1), torch.float64, sh.group)[0, 0]))
    extras = {"backend": sd.backend_name, "combine": "product", "normalize": "none", "zero_fallbacks": fallbacks}
    return np.array(picked, dtype=np.int64), np.array(scores, dtype=np.float64), extras


# ----------------------------------------------------------------------------- the PFK family

def _pfk_family(pool, call: _Call, sh: _Shard, combine, k, normalize, use_all):
    """pfk._pfk_family on pyfk.distributed.search.select; each pick's owner computes its
    per-scale terms, gathered in pick order."""
    from pyfk.distributed.search import select as sharded_select

    val = sh.val
    details = sharded_select(pool.descriptors, val.descriptors, sh.budget, val.labels, val.pred, k=k,
                             combine=combine, normalize=normalize, seed=sh.seed,
                             exclude=sh.labeled if len(sh.labeled) else None, backend=sh.backend,
                             use_all=use_all, return_details=True, group=sh.group, progress=call.progress)
    idx = np.asarray(details["indices"], dtype=np.int64)
    centre = np.asarray(details["centre"], dtype=np.int64)
    scales = call.desc.num_scales
    mine = (idx >= sh.lo) & (idx < sh.hi)
    local = np.zeros((len(idx), scales))
    if mine.any():
        local[mine] = _scale_terms(call.desc, as_descriptors(val.descriptors, "val.descriptors"),
                                   idx[mine] - sh.lo, centre[mine], combine, normalize)
    gathered = comm.all_gather_tensor(torch.from_numpy(local), sh.group)
    owners = np.searchsorted(sh.offsets, idx, side="right") - 1
    terms = np.stack([gathered[q][i].numpy() for i, q in enumerate(owners)]) if len(idx) else local
    return pfk_result(details, combine, terms)
