"""pyfk.distributed.topk / select on 2 and 3 local gloo ranks: every rank's answer equals --
bit for bit -- pyfk.topk / pyfk.select on the whole pool in one process; bad input on one
rank raises the same clear error on every rank, at once.

Spawning ranks is the cost (~3 s each), so each world size runs every case in one
run_ranks call: the ranks build the same seeded data, each takes its contiguous shard,
and the results come back to the parent, which computes the single-process reference.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from harness import checked_cases, descriptors_of, run_ranks

import pyfk
from pyfk.distributed import search as dsearch

WIDTHS = [8, 5]


# ----------------------------------------------------------------------------- data

def _arrays(rng, n, widths, *, integer=False, distinct=None, g=True):
    """(z, g) float32 arrays; `distinct`: rows drawn from that many distinct rows (duplicates)."""
    rows = n if distinct is None else distinct

    def one():
        if integer:
            return [rng.integers(-2, 3, size=(rows, L)).astype(np.float32) for L in widths]
        return [rng.standard_normal((rows, L)).astype(np.float32) for L in widths]

    z, gg = one(), (one() if g else None)
    if distinct is not None:
        pick = rng.integers(0, distinct, n)
        z = [a[pick] for a in z]
        gg = None if gg is None else [a[pick] for a in gg]
    return z, gg


def _descriptors(arrays, rows=slice(None), kind="numpy", dtype=None):
    return descriptors_of(*arrays, rows, kind, dtype)


def _case(name, op, queries, pool, sizes, kind="numpy", pool_dtype=None, error=None, per_rank=None, exact=True,
          **kwargs):
    assert sum(sizes) == pool[0][0].shape[0], name
    return dict(name=name, op=op, queries=queries, pool=pool, sizes=sizes, kind=kind, pool_dtype=pool_dtype,
                error=error, per_rank=per_rank, exact=exact, kwargs=kwargs)


def _cases(seed, world):
    """Every case for `world` ranks, from `seed` (the same in the parent and every rank)."""
    rng = np.random.default_rng(seed)
    W = {2: 0, 3: 1}[world]

    def sizes(two, three):
        return (two, three)[W]

    cases = []
    # --- error propagation first: the group must stay usable after each
    q, p = _arrays(rng, 6, WIDTHS), _arrays(rng, 20, WIDTHS)
    sz = sizes((12, 8), (7, 5, 8))

    def widths_on_rank1(rank, queries, pool, kw):
        if rank == 1:
            pool = _descriptors(_arrays(np.random.default_rng(0), pool.n, [8, 6]))
        return queries, pool, kw

    def both_widths_on_rank1(rank, queries, pool, kw):
        if rank == 1:
            r = np.random.default_rng(0)
            queries, pool = _descriptors(_arrays(r, queries.n, [8, 6])), _descriptors(_arrays(r, pool.n, [8, 6]))
        return queries, pool, kw

    def nan_on_rank1(rank, queries, pool, kw):
        if rank == 1:
            pool.z[0] = pool.z[0].copy()
            pool.z[0][2, 1] = np.nan
        return queries, pool, kw

    def k_differs(rank, queries, pool, kw):
        return queries, pool, {**kw, "k": 3 + rank}

    def not_descriptors_on_rank0(rank, queries, pool, kw):
        return queries, ("not descriptors" if rank == 0 else pool), kw

    def huge_on_rank1(rank, queries, pool, kw):
        if rank == 1:
            pool.z[1] = pool.z[1] * np.float32(1e37)
        return queries, pool, kw

    def empty_everywhere(rank, queries, pool, kw):
        return queries, _descriptors(p, slice(0, 0)), kw

    def labels_differ(rank, val, pool, kw):
        if rank == 1:
            kw = {**kw, "val_labels": kw["val_labels"][::-1].copy()}
        return val, pool, kw

    r1 = f"rank 1 of {world}: "
    cases += [
        _case("err widths on rank 1", "topk", q, p, sz, k=3, per_rank=widths_on_rank1,
              error=(ValueError, re.escape(r1 + "local_pool: expected scale widths [8, 5] like queries, got [8, 6]"))),
        _case("err widths differ between ranks", "topk", q, p, sz, k=3, per_rank=both_widths_on_rank1,
              error=(ValueError, r"^queries: expected the same on every rank, got 6 rows of widths \[8, 5\] on "
                                 r"rank 0 and 6 rows of widths \[8, 6\] on rank 1$")),
        _case("err k beyond the global pool", "topk", q, p, sz, k=21,
              error=(ValueError, r"^rank 0 of \d: k: expected an integer in \[1, 20\] \(the pool size\), got 21$")),
        _case("err NaN on rank 1", "topk", q, p, sz, k=3, per_rank=nan_on_rank1,
              error=(ValueError, re.escape(r1 + f"local_pool: z[0] contains NaN or Inf values (first at global row "
                                           f"{sz[0] + 2}, local row 2)"))),
        _case("err exclude out of range", "topk", q, p, sz, k=3, exclude=np.array([3, 20]),
              error=(ValueError, r"^rank 0 of \d: exclude: expected indices in \[0, 20\), got \[20\]$")),
        _case("err k differs", "topk", q, p, sz, k=3, per_rank=k_differs,
              error=(ValueError, r"^k: expected the same on every rank, got 3 on rank 0 and 4 on rank 1$")),
        _case("err not Descriptors on rank 0", "topk", q, p, sz, k=3, per_rank=not_descriptors_on_rank0,
              error=(TypeError, r"^rank 0 of \d: local_pool: expected pyfk.Descriptors.*got str$")),
        _case("err float32 range over all shards", "topk", q, p, sz, k=3, normalize="none",
              per_rank=huge_on_rank1,
              error=(ValueError, r"^rank 0 of \d: local_pool: with normalize='none', the values of scale 1 .*"
                                 r"beyond the float32 range")),
        _case("err empty everywhere", "topk", q, p, sz, k=3, per_rank=empty_everywhere,
              error=(ValueError, r"^rank 0 of \d: local_pool: expected a non-empty pool, got 0 rows on every rank$")),
        _case("err select budget", "select", q, p, sz, budget=21,
              error=(ValueError, r"^rank 0 of \d: budget: expected an integer in \[1, 20\]")),
        _case("err select labels differ", "select", q, p, sz, budget=3,
              val_labels=np.arange(6), val_pred=np.array([0, 1, 0, 0, 0, 0]), per_rank=labels_differ,
              error=(ValueError, r"^val_labels/val_pred \(the validation rows queried\): expected the same on "
                                 r"every rank, got 4 indices \[2, 3, 4, 5\].* on rank 0 and 5 indices "
                                 r"\[0, 1, 2, 3, 4\].* on rank 1$")),
    ]

    # --- top-k equality
    cases.append(_case("unequal shards", "topk", _arrays(rng, 7, WIDTHS), _arrays(rng, 29, WIDTHS),
                       sizes((20, 9), (4, 17, 8)), k=6))
    cases.append(_case("an empty shard", "topk", _arrays(rng, 5, WIDTHS), _arrays(rng, 21, WIDTHS),
                       sizes((0, 21), (9, 0, 12)), k=5))
    for normalize, combine in (("none", "product"), ("pcc", "sum"), ("l2", "product")):
        cases.append(_case(f"ties across shards {normalize} {combine}", "topk",
                           _arrays(rng, 5, WIDTHS, integer=True), _arrays(rng, 30, WIDTHS, integer=True, distinct=6),
                           sizes((13, 17), (10, 10, 10)), k=9, combine=combine, normalize=normalize))
    cases.append(_case("k larger than every shard", "topk", _arrays(rng, 6, WIDTHS), _arrays(rng, 27, WIDTHS),
                       sizes((12, 15), (3, 4, 20)), k=21))
    excl = sizes(np.r_[0:10, 15, 29], np.r_[8:16, 29])  # all of one shard and parts of its neighbours
    cases.append(_case("exclude spanning shards, k = what is left", "topk", _arrays(rng, 4, WIDTHS),
                       _arrays(rng, 30, WIDTHS, integer=True, distinct=9), sizes((10, 20), (10, 5, 15)),
                       k=30 - len(excl), exclude=excl))
    cases.append(_case("exclude as a torch tensor, unsorted", "topk", _arrays(rng, 3, WIDTHS),
                       _arrays(rng, 30, WIDTHS), sizes((10, 20), (10, 5, 15)), k=4,
                       exclude=torch.tensor([29, 3, 11, 17])))
    cases.append(_case("M = 1", "topk", _arrays(rng, 1, WIDTHS), _arrays(rng, 25, WIDTHS), sizes((11, 14), (8, 9, 8)),
                       k=4))
    cases.append(_case("k = N, a one-row shard", "topk", _arrays(rng, 4, WIDTHS), _arrays(rng, 17, WIDTHS),
                       sizes((1, 16), (1, 8, 8)), k=17))
    cases.append(_case("features, no g", "topk", _arrays(rng, 4, [6, 3, 4], g=False),
                       _arrays(rng, 23, [6, 3, 4], g=False), sizes((9, 14), (9, 7, 7)), k=7, combine="features"))
    cases.append(_case("fp16 pool", "topk", _arrays(rng, 5, WIDTHS), _arrays(rng, 26, WIDTHS),
                       sizes((14, 12), (6, 14, 6)), pool_dtype=np.float16, k=8))
    cases.append(_case("torch in, bf16 pool", "topk", _arrays(rng, 5, WIDTHS), _arrays(rng, 26, WIDTHS),
                       sizes((14, 12), (6, 14, 6)), kind="torch", pool_dtype=torch.bfloat16, k=8))
    # torch's GEMM (MKL) rounds a pair's score differently with the matrix shape and thread
    # count -- even pyfk.topk in one process does -- so backend="torch" is checked for a
    # valid top-k, equal on every rank, not bit for bit against one process
    cases.append(_case("backend torch, a one-row shard", "topk", _arrays(rng, 6, WIDTHS), _arrays(rng, 40, WIDTHS),
                       sizes((1, 39), (1, 20, 19)), k=12, backend="torch", exact=False))
    # query panels on one side of the comparison, pool ranges on the other (cpu split rule)
    cases.append(_case("large pool, kernel splits differ", "topk", _arrays(rng, 40, [16, 8]),
                       _arrays(rng, 20000, [16, 8]), sizes((3000, 17000), (6000, 7000, 7000)), k=40))

    # --- select equality
    val = _arrays(rng, 30, WIDTHS)
    labels = rng.integers(0, 3, 30)
    pred = np.where(rng.random(30) < 0.5, labels, (labels + 1) % 3)
    cases.append(_case("select: k-centre over the errors, details", "select", val, _arrays(rng, 40, WIDTHS),
                       sizes((25, 15), (5, 0, 35)), budget=6, val_labels=labels, val_pred=pred,
                       return_details=True))
    cases.append(_case("select: no labels, k doubles, exclude", "select", _arrays(rng, 4, WIDTHS, integer=True),
                       _arrays(rng, 35, WIDTHS, integer=True, distinct=12), sizes((20, 15), (12, 11, 12)),
                       budget=10, k=1, exclude=np.array([0, 5, 12, 20, 34]), return_details=True))
    cases.append(_case("select: use_all, sum, seed", "select", val, _arrays(rng, 33, WIDTHS),
                       sizes((16, 17), (11, 11, 11)), budget=5, val_labels=labels, val_pred=pred, use_all=True,
                       combine="sum", seed=3, exclude=np.array([2, 16, 30])))
    cases.append(_case("select: features, errors as queries", "select", _arrays(rng, 30, WIDTHS, g=False),
                       _arrays(rng, 24, WIDTHS, g=False), sizes((24, 0), (2, 12, 10)), budget=20,
                       val_labels=labels, val_pred=pred, combine="features", k=2))
    return cases


# ----------------------------------------------------------------------------- ranks

def _run_case(case, rank, world, kind, pool_dtype):
    offsets = np.r_[0, np.cumsum(case["sizes"])]
    rows = slice(int(offsets[rank]), int(offsets[rank + 1]))
    queries = _descriptors(case["queries"], kind=kind)
    pool = _descriptors(case["pool"], rows, kind=kind, dtype=pool_dtype)
    kw = dict(case["kwargs"])
    if case["per_rank"] is not None:
        queries, pool, kw = case["per_rank"](rank, queries, pool, kw)
    if case["op"] == "topk":
        return dsearch.topk(queries, pool, **kw)
    return dsearch.select(pool, queries, **kw)


def _rank_main(rank, world, seed):
    out = []
    for case in _cases(seed, world):
        t0 = time.perf_counter()
        try:
            res = _run_case(case, rank, world, case["kind"], case["pool_dtype"])
        except (ValueError, TypeError) as exc:
            out.append(("error", type(exc).__name__, str(exc), time.perf_counter() - t0))
            continue
        if case["op"] == "topk":
            s, i = res
            out.append(("topk", type(s).__name__, str(s.dtype), str(i.dtype),
                        s.float().numpy() if isinstance(s, torch.Tensor) else s,
                        i.numpy() if isinstance(i, torch.Tensor) else i))
        else:
            out.append(("select", res))
    return out


# ----------------------------------------------------------------------------- parent

def _reference(case):
    queries = _descriptors(case["queries"], kind=case["kind"])
    pool = _descriptors(case["pool"], kind=case["kind"], dtype=case["pool_dtype"])
    if case["op"] == "topk":
        return pyfk.topk(queries, pool, **case["kwargs"])
    return pyfk.select(pool, queries, **case["kwargs"])


def _assert_same_selection(got, ref, name):
    if isinstance(ref, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(ref), name
        for key in ref:
            assert np.array_equal(got[key], ref[key]), (name, key, got[key], ref[key])
            assert np.asarray(got[key]).dtype == np.asarray(ref[key]).dtype, (name, key)
    else:
        assert got.dtype == np.int64 and np.array_equal(got, ref), (name, got, ref)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_one_process(world, rng):
    seed = int(rng.integers(2**31))
    results = run_ranks(_rank_main, world, (seed,), timeout=150)
    cases = _cases(seed, world)
    for case, per_rank in checked_cases(cases, results):
        name = case["name"]
        ref = _reference(case)
        for rank, res in enumerate(per_rank):
            assert res[0] != "error", (name, rank, res)
            if case["op"] == "topk":
                _, out_type, s_dtype, i_dtype, s, i = res
                want_type = "Tensor" if case["kind"] == "torch" else "ndarray"
                assert (out_type, s_dtype, i_dtype) == (want_type, str(ref[0].dtype), str(ref[1].dtype)), name
                if not case["exact"]:
                    dense = pyfk.similarity(_descriptors(case["queries"]), _descriptors(case["pool"]),
                                            case["kwargs"].get("combine", "product"), backend="torch")
                    pyfk.testing.assert_topk_valid(s, i, dense, case["kwargs"]["k"])
                    assert np.array_equal(s, per_rank[0][4]) and np.array_equal(i, per_rank[0][5]), (name, rank)
                    continue
                ref_s = ref[0].numpy() if isinstance(ref[0], torch.Tensor) else ref[0]
                ref_i = ref[1].numpy() if isinstance(ref[1], torch.Tensor) else ref[1]
                assert np.array_equal(i, ref_i), (name, rank, i, ref_i)
                assert np.array_equal(s.view(np.int32), ref_s.view(np.int32)), (name, rank)  # bit for bit
            else:
                _assert_same_selection(res[1], ref, f"{name} (rank {rank})")


def test_cases_cover_what_they_claim(rng):
    """The data really has ties across shards, k beyond every shard, and a k-centre path."""
    cases = {c["name"]: c for c in _cases(int(rng.integers(2**31)), 3)}
    c = cases["ties across shards none product"]
    s, i = _reference(c)
    assert (np.diff(s, axis=1) == 0).any()  # equal scores side by side ...
    bounds = np.cumsum(c["sizes"])[:-1]
    shard = np.searchsorted(bounds, i, side="right")
    tied = (np.diff(s, axis=1) == 0) & (np.diff(shard, axis=1) != 0)
    assert tied.any()  # ... from different shards, ordered by the smaller index
    assert cases["k larger than every shard"]["kwargs"]["k"] > max(cases["k larger than every shard"]["sizes"])
    c = cases["select: k-centre over the errors, details"]
    kw = c["kwargs"]
    assert kw["budget"] < int((kw["val_labels"] != kw["val_pred"]).sum())
    assert _reference(cases["select: no labels, k doubles, exclude"])["k"] > 1


def test_single_process_fallback(rng):
    """Without a process group both functions are pyfk.topk / pyfk.select."""
    assert not torch.distributed.is_initialized()
    q, p = _descriptors(_arrays(rng, 5, WIDTHS)), _descriptors(_arrays(rng, 40, WIDTHS, integer=True, distinct=10))
    for kw in ({"k": 7}, {"k": 9, "exclude": [1, 5, 39], "combine": "sum"}, {"k": 3, "backend": "torch"}):
        s, i = dsearch.topk(q, p, **kw)
        rs, ri = pyfk.topk(q, p, **kw)
        assert np.array_equal(s, rs) and np.array_equal(i, ri)
    labels = np.array([0, 1, 2, 0, 1])
    pred = np.array([1, 1, 0, 2, 1])
    for kw in ({"budget": 2, "val_labels": labels, "val_pred": pred, "return_details": True},
               {"budget": 12, "k": 1, "exclude": np.arange(5)}):
        _assert_same_selection(dsearch.select(p, q, **kw), pyfk.select(p, q, **kw), str(kw))
    with pytest.raises(ValueError, match=r"^k: expected an integer in \[1, 40\]"):
        dsearch.topk(q, p, k=41)
