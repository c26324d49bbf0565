"""pyfk.distributed.acquire on 2 and 3 local gloo ranks: every strategy's Selection on every
rank equals -- indices, order and float64 scores bit for bit, and the provenance -- what
pyfk.acquire returns for the whole pool in one process.

Spawning ranks is the cost, so each world size runs every case in one run_ranks call: the
ranks build the same seeded data, take their contiguous shard under several shardings
(unequal, an empty shard first or in the middle), and return their Selections; the parent
computes the single-process reference. The data has ties across shard boundaries
(duplicate probability rows, duplicate feature / BADGE rows, flat distributions), labeled
rows in every shard, and budgets up to every unlabeled row.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from harness import run_ranks

import pyfk
from pyfk.al.strategies import STRATEGIES, PoolInputs, ValInputs, select
from pyfk.engine import search as engine_search

N = 37
PFK = ("pcc", "pfk", "pfk_sum")
SHARDINGS = {2: [(23, 14), (5, 32)], 3: [(15, 0, 22), (0, 30, 7), (12, 12, 13)]}
FLAT_SHARDINGS = {2: [(7, 5)], 3: [(4, 0, 8)]}  # flat_badge has 12 rows
SMALL_BLOCKS = (5 * N, 7)  # (SIM_BLOCK, SIM_SUB): 5 centres per block
GREEDY_NAMES = ("coreset", "badge")
LABELED = [0, 1, 2, 4, 9, 13, 20, 22, 23, 24, 30, 36]
# (labeled, budget, seed); budget None: every unlabeled row
CASES = [((1, 4, 20, 22, 23, 30, 36), 9, 3), ((), 6, 11), ((0, 2, 13, 24, 25, 35), None, 5)]


# ----------------------------------------------------------------------------- data

def problem(n: int = N, seed: int = 0):
    """Every PoolInputs field for one pool with ties across any shard boundary, and a ValInputs."""
    rng = np.random.default_rng(seed)
    c = 4
    probs = rng.dirichlet(np.ones(c) * 0.7, n)
    probs[[3, 20, 27, 33]] = 1.0 / c                   # maximal uncertainty, four ways
    probs[[5, 14, 26, 31]] = probs[8]                  # duplicates far apart
    probs[[10, 29]] = [0.45, 0.45, 0.05, 0.05]         # margin 0
    mc = rng.dirichlet(np.ones(c) * 0.5, (4, n))
    mc[:, [2, 19, 28, 34]] = mc[:, [9]]
    mc[:, [7, 25]] = 1.0 / c
    # integer-valued features / BADGE factors: many exactly equal distances, duplicate rows
    h = rng.integers(-2, 3, (n, 5)).astype(np.float32)
    h[[6, 16, 24, 32]] = h[1]
    h[[12, 22, 30]] = 3.0                              # equal largest norms in different shards
    e = rng.integers(-1, 2, (n, c)).astype(np.float32)
    e[[12, 22, 30]] = [2.0, -2.0, 2.0, -2.0]
    e[[6, 16, 24, 32]] = e[1]
    badge = pyfk.Descriptors([np.c_[h, np.ones(n, np.float32)]], [e], same_widths=False)
    pz = [rng.standard_normal((n, w)).astype(np.float32) for w in (6, 5)]
    pg = [rng.standard_normal((n, w)).astype(np.float32) for w in (6, 5)]
    for a in pz + pg:
        a[[11, 21, 35]] = a[4]
    vz = [rng.standard_normal((14, w)).astype(np.float32) for w in (6, 5)]
    vg = [rng.standard_normal((14, w)).astype(np.float32) for w in (6, 5)]
    y = rng.integers(0, c, 14)
    y_hat = np.where(rng.random(14) < 0.5, (y + 1) % c, y)
    pool = dict(probs=probs, mc_probs=mc, badge=badge, features=pyfk.Descriptors([h]),
                descriptors=pyfk.Descriptors(pz, pg))
    return pool, ValInputs(pyfk.Descriptors(vz, vg), y, y_hat)


def flat_badge(n: int = 12):
    """Identical BADGE rows: every d^2 is 0, so each later pick is the fallback."""
    h = np.tile(np.array([[1.0, 2.0, 1.0]], dtype=np.float32), (n, 1))
    e = np.tile(np.array([[0.5, -0.5]], dtype=np.float32), (n, 1))
    return {"badge": pyfk.Descriptors([h], [e], same_widths=False)}


def shard(fields: dict, lo: int, hi: int) -> PoolInputs:
    out = {}
    for name, value in fields.items():
        if name == "mc_probs":
            out[name] = value[:, lo:hi]
        elif isinstance(value, pyfk.Descriptors):
            out[name] = value.take(slice(lo, hi))
        else:
            out[name] = value[lo:hi]
    return PoolInputs(**out)


def bounds(sizes, rank):
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return int(offsets[rank]), int(offsets[rank + 1])


def budget_of(budget, labeled, n=N):
    return n - len(labeled) if budget is None else budget


def cases(world):
    """(key, sizes, strategy, labeled, budget, seed, data) of every equality case."""
    out = []
    for sizes in SHARDINGS[world]:
        for labeled, budget, seed in CASES:
            for name in STRATEGIES:
                out.append(((sizes, name, labeled, budget, seed), sizes, name, labeled, budget, seed, "main"))
    for sizes in FLAT_SHARDINGS[world]:
        out.append(((sizes, "badge-flat"), sizes, "badge", (1, 3), 5, 0, "flat"))
    return out


def _outcome(fn, *args, **kwargs):
    """("ok", indices, scores, provenance) of fn(*args, **kwargs), or ("error", type name, message)."""
    try:
        sel = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - compared in the parent
        return ("error", type(exc).__name__, str(exc))
    return ("ok", sel.indices, sel.scores, sel.provenance)


# ----------------------------------------------------------------------------- what each rank runs

def _rank_all(rank, world):
    dacquire = importlib.import_module("pyfk.distributed.acquire")  # the module, whatever the package exports
    acquire = dacquire.acquire

    data = {"main": problem(), "flat": (flat_badge(), None)}
    results = {}
    for key, sizes, name, labeled, budget, seed, which in cases(world):
        fields, val = data[which]
        n = N if which == "main" else 12
        lo, hi = bounds(sizes, rank)
        results[key] = _outcome(acquire, name, shard(fields, lo, hi), budget_of(budget, labeled, n),
                                labeled=list(labeled), seed=seed, val=val)

    # the carried cumulative sum is np.cumsum of the whole vector, bit for bit
    rng = np.random.default_rng(7)
    sizes = SHARDINGS[world][0]
    lo, hi = bounds(sizes, rank)
    w = rng.random(N) * 10.0 ** rng.integers(-12, 12, N)
    sh = dacquire._Shard(group=None, rank=rank, world=world, offsets=np.concatenate([[0], np.cumsum(sizes)]),
                         n=N, lo=lo, hi=hi, labeled=np.zeros(0, dtype=np.int64), budget=1, seed=0, val=None,
                         backend="auto")
    cum, total = dacquire._chained_cumsum(w[lo:hi].copy(), sh)
    results["cumsum"] = (cum.tobytes() == np.cumsum(w)[lo:hi].tobytes(), total == np.cumsum(w)[-1])

    fields, val = data["main"]
    lo, hi = bounds(sizes, rank)
    local = shard(fields, lo, hi)

    # small similarity blocks: several blocks of labeled centres (5 at a time), pool rows in chunks
    saved = engine_search.SIM_BLOCK, engine_search.SIM_SUB
    engine_search.SIM_BLOCK, engine_search.SIM_SUB = SMALL_BLOCKS
    try:
        for name in GREEDY_NAMES:
            results[("small-blocks", name)] = _outcome(acquire, name, local, 9, labeled=LABELED, seed=4)
    finally:
        engine_search.SIM_BLOCK, engine_search.SIM_SUB = saved

    # errors: every rank raises, none hangs; then the group still works
    bad = dict(fields, probs=fields["probs"].copy())
    bad["probs"][hi - 1, 0] = np.nan if rank == world - 1 else bad["probs"][hi - 1, 0]
    results["err-nan"] = _outcome(acquire, "entropy", shard(bad, lo, hi), 3)
    results["err-budget"] = _outcome(acquire, "margin", local, N - 1, labeled=[0, 1])
    results["err-labeled"] = _outcome(acquire, "margin", local, 3, labeled=[0, N])
    results["err-disagree"] = _outcome(acquire, "entropy", local, 3 + rank)
    results["err-widths"] = _outcome(
        acquire, "coreset", PoolInputs(features=pyfk.Descriptors([np.zeros((hi - lo, 5 + (rank == 1)), np.float32)])),
        3)
    results["err-unknown"] = _outcome(acquire, "nope", local, 3)
    results["err-torch"] = _outcome(acquire, "coreset", local, 4, backend="torch")
    results["torch-inexact"] = _outcome(acquire, "badge", local, 4, backend="torch", exact=False, seed=2)
    results["after-errors"] = _outcome(acquire, "bald", local, 5, labeled=[3])
    return results


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def ranks(request):
    world = request.param
    return world, run_ranks(_rank_all, world, timeout=240.0)


# ----------------------------------------------------------------------------- the checks

def _reference(sizes, name, labeled, budget, seed, which):
    fields, val = problem() if which == "main" else (flat_badge(), None)
    n = N if which == "main" else 12
    return _outcome(select, name, PoolInputs(**fields), budget_of(budget, labeled, n), labeled=list(labeled),
                    seed=seed, val=val)


def _same(got, want, key):
    assert got[0] == want[0] == "ok", (key, got, want)
    _, indices, scores, prov = got
    assert indices.dtype == np.int64 and scores.dtype == np.float64
    np.testing.assert_array_equal(indices, want[1], err_msg=str(key))
    assert scores.tobytes() == want[2].tobytes(), (key, scores, want[2])
    drop = {"seconds", "world"}
    assert {k: v for k, v in prov.items() if k not in drop} == {k: v for k, v in want[3].items() if k not in drop}, key


def _check(world, results, names):
    checked = 0
    for key, sizes, name, labeled, budget, seed, which in cases(world):
        if name not in names:
            continue
        want = _reference(sizes, name, labeled, budget, seed, which)
        for rank in range(world):
            got = results[rank][key]
            _same(got, want, (rank,) + key)
            assert got[3]["world"] == world
        checked += 1
    return checked


def test_every_score_random_and_greedy_strategy_equals_one_process(ranks):
    world, results = ranks
    names = [name for name in STRATEGIES if name not in PFK]
    assert _check(world, results, names) == len(SHARDINGS[world]) * len(CASES) * len(names) + len(FLAT_SHARDINGS[world])
    # every rank returns the same Selection, seconds included
    for key in results[0]:
        if results[0][key][0] == "ok" and key != "cumsum":
            for rank in range(1, world):
                assert results[rank][key][3]["seconds"] == results[0][key][3]["seconds"]


def test_pfk_family_equals_one_process(ranks):
    world, results = ranks
    assert _check(world, results, PFK) == len(SHARDINGS[world]) * len(CASES) * len(PFK)


def test_several_centre_blocks_and_pool_chunks(ranks, monkeypatch):
    world, results = ranks
    monkeypatch.setattr(engine_search, "SIM_BLOCK", SMALL_BLOCKS[0])
    monkeypatch.setattr(engine_search, "SIM_SUB", SMALL_BLOCKS[1])
    pool, _ = problem()
    for name in GREEDY_NAMES:
        want = _outcome(select, name, PoolInputs(**pool), 9, labeled=LABELED, seed=4)
        for r in results:
            _same(r[("small-blocks", name)], want, name)


def test_the_carried_cumulative_sum_is_numpys(ranks):
    world, results = ranks
    assert all(r["cumsum"] == (True, True) for r in results)


def test_bad_input_raises_the_same_error_on_every_rank(ranks):
    world, results = ranks
    last = world - 1
    for rank, r in enumerate(results):
        kind, typ, msg = r["err-nan"]
        assert kind == "error" and typ == "ValueError" and "pool.probs: contains NaN or Inf" in msg
        hi = int(np.sum(SHARDINGS[world][0]))
        assert f"first at ({hi - 1}, 0)" in msg  # a global row
        assert (f"rank {last} of {world}" in msg) == (rank != last)
        assert r["err-budget"] == ("error", "ValueError", f"budget: expected an integer in [1, {N - 2}] "
                                   f"(the {N - 2} unlabeled pool rows), got {N - 1}")
        assert r["err-labeled"] == ("error", "ValueError", f"labeled: expected indices in [0, {N}), got [{N}]")
        assert r["err-disagree"][:2] == ("error", "ValueError") and "budget" in r["err-disagree"][2]
        assert r["err-widths"][:2] == ("error", "ValueError") and "shard shapes" in r["err-widths"][2]
        assert r["err-unknown"][:2] == ("error", "ValueError") and "strategy: expected one of" in r["err-unknown"][2]
        assert r["err-torch"][:2] == ("error", "NotImplementedError") and "exact=False" in r["err-torch"][2]
        kind, indices, scores, prov = r["torch-inexact"]
        assert kind == "ok" and len(np.unique(indices)) == 4 and prov["backend"] == "torch"
        np.testing.assert_array_equal(indices, results[0]["torch-inexact"][1])
    pool, _ = problem()
    want = select("bald", PoolInputs(mc_probs=pool["mc_probs"]), 5, labeled=[3])
    for r in results:
        _same(r["after-errors"], ("ok", want.indices, want.scores, want.provenance), "after-errors")
