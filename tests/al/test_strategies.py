"""pyfk.strategies: every acquisition strategy against a direct NumPy version written here."""

import json

import numpy as np
import pytest
import torch

import pyfk
from pyfk.al import strategies as st
from pyfk.al.strategies import PoolInputs, ValInputs, select
from pyfk.engine import backend as engine_backend
from pyfk.engine import search as engine_search
from pyfk.features.store import DescriptorStore
from tests.conftest import make_arrays
from tests.oracle import normalize64

PROVENANCE_KEYS = {"strategy", "budget", "seed", "params", "seconds", "available"}


# ----------------------------------------------------------------------------- direct formulas

def entropy_ref(p):
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(-1)


def margin_ref(p):
    s = np.sort(np.asarray(p, dtype=np.float64), axis=1)
    return -(s[:, -1] - s[:, -2])


def least_confidence_ref(p):
    return 1.0 - np.asarray(p, dtype=np.float64).max(1)


def var_ratio_ref(mc):
    k, n, c = mc.shape
    votes = mc.argmax(-1)
    return np.array([1.0 - np.bincount(votes[:, i], minlength=c).max() / k for i in range(n)])


def bald_ref(mc):
    mean = mc.mean(0)
    return entropy_ref(mean) - np.mean([entropy_ref(mc[j]) for j in range(mc.shape[0])], axis=0)


def std_ref(mc):
    k = mc.shape[0]
    mu = mc.mean(0)
    return np.sqrt(((mc - mu) ** 2).sum(0) / k).mean(-1)


PROB_REFS = {"entropy": entropy_ref, "margin": margin_ref, "least_confidence": least_confidence_ref}
MC_REFS = {"var_ratio": var_ratio_ref, "bald": bald_ref, "std": std_ref,
           "ensemble_entropy": lambda mc: entropy_ref(mc.mean(0)), "ensemble_var_ratio": var_ratio_ref,
           "ensemble_bald": bald_ref}


def expected_top(scores, labeled, budget):
    """Top-budget pool indices by score, ties to the smaller index, labeled left out."""
    rows = np.setdiff1d(np.arange(len(scores)), labeled)
    order = np.lexsort((rows, -scores[rows]))
    return rows[order[:budget]]


# ----------------------------------------------------------------------------- inputs with ties

def tied_probs(rng, n=80, c=4):
    p = rng.dirichlet(np.ones(c) * 0.7, n)
    p[[3, 22, 40, 7]] = 1.0 / c                       # maximal uncertainty, tied four ways
    p[[11, 12, 60]] = p[5]                             # plain duplicates: equal scores
    p[[30, 31]] = np.array([0.45, 0.45] + [0.1 / (c - 2)] * (c - 2))  # margin 0, tied
    return p


def tied_mc(rng, k=5, n=70, c=3):
    mc = rng.dirichlet(np.ones(c) * 0.5, (k, n))
    mc[:, [9, 2, 33]] = mc[:, [17]]                    # identical across all passes: tied scores
    mc[:, 50] = 1.0 / c                                # flat in every pass
    mc[:, 51] = 1.0 / c
    return mc


@pytest.mark.parametrize("name", sorted(PROB_REFS))
def test_probability_strategies_match_formula_and_tie_order(name, rng):
    p = tied_probs(rng)
    ref = PROB_REFS[name](p)
    labeled = np.array([7, 12, 0])
    budget = 15
    sel = select(name, PoolInputs(probs=p), budget, labeled=labeled, seed=1)
    want = expected_top(ref, labeled, budget)
    np.testing.assert_array_equal(sel.indices, want)
    np.testing.assert_allclose(sel.scores, ref[want], rtol=1e-12, atol=1e-12)
    assert sel.indices.dtype == np.int64 and sel.scores.dtype == np.float64
    assert not np.isin(sel.indices, labeled).any()
    # the four flat rows tie at the top for every uncertainty score (7 is labeled); for margin
    # the two rows with top-1 == top-2 (30, 31) tie with them at margin 0
    top = [3, 22, 30, 31, 40] if name == "margin" else [3, 22, 40]
    np.testing.assert_array_equal(sel.indices[:len(top)], top)
    # float32 probabilities (sums off by ~1e-7) and torch input give the same answer: the formula
    # on the float32 values, the same tied top in index order, scores within float32 rounding
    p32 = p.astype(np.float32)
    sel32 = select(name, PoolInputs(probs=torch.from_numpy(p32)), budget, labeled=labeled)
    ref32 = PROB_REFS[name](p32)
    want32 = expected_top(ref32, labeled, budget)
    np.testing.assert_array_equal(sel32.indices, want32)
    np.testing.assert_allclose(sel32.scores, ref32[want32], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(sel32.indices[:len(top)], top)
    np.testing.assert_allclose(sel32.scores, sel.scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MC_REFS))
def test_mc_and_ensemble_strategies_match_formula_and_tie_order(name, rng):
    mc = tied_mc(rng)
    ref = MC_REFS[name](mc)
    labeled = np.array([2, 69])
    budget = 20
    sel = select(name, PoolInputs(mc_probs=mc), budget, labeled=labeled)
    want = expected_top(ref, labeled, budget)
    np.testing.assert_allclose(sel.scores, ref[want], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(sel.indices, want)
    assert not np.isin(sel.indices, labeled).any()
    again = select(name, PoolInputs(mc_probs=mc), budget, labeled=labeled)
    np.testing.assert_array_equal(again.indices, sel.indices)


def test_var_ratio_ties_resolve_to_smaller_index(rng):
    # K = 4 passes, three classes: vote patterns give var_ratio 0, 1/4 or 1/2, many ties.
    k, n, c = 4, 40, 3
    votes = rng.integers(0, c, (k, n))
    mc = np.full((k, n, c), 0.1)
    np.put_along_axis(mc, votes[..., None], 0.8, axis=-1)
    ref = var_ratio_ref(mc)
    sel = select("var_ratio", PoolInputs(mc_probs=mc), 25)
    np.testing.assert_array_equal(sel.indices, expected_top(ref, [], 25))
    for a, b in zip(sel.scores[:-1], sel.scores[1:]):
        assert a >= b
    same = sel.scores[:-1] == sel.scores[1:]
    assert (np.diff(sel.indices)[same] > 0).all(), "equal scores must come in index order"


def test_random_strategy(rng):
    n = 500
    p = rng.dirichlet(np.ones(3), n)
    labeled = rng.choice(n, 100, replace=False)
    seed = int(rng.integers(1 << 30))
    a = select("random", PoolInputs(probs=p), 60, labeled=labeled, seed=seed)
    b = select("random", PoolInputs(probs=p), 60, labeled=labeled, seed=seed)
    c = select("random", PoolInputs(probs=p), 60, labeled=labeled, seed=seed + 1)
    assert len(set(a.indices.tolist())) == 60
    assert not np.isin(a.indices, labeled).any()
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    assert (a.scores == 0).all()
    rows = np.setdiff1d(np.arange(n), labeled)
    np.testing.assert_array_equal(a.indices, np.random.default_rng(seed).choice(rows, 60, replace=False))
    # whole available pool: a permutation of it
    full = select("random", PoolInputs(probs=p), n - 100, labeled=labeled, seed=seed)
    np.testing.assert_array_equal(np.sort(full.indices), rows)


# ----------------------------------------------------------------------------- coreset

def coreset_bruteforce(x, labeled, budget, seed, ignored=()):
    x = np.asarray(x, dtype=np.float64)
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    n = len(x)
    picked, scores = [], []
    blocked = list(labeled) + list(ignored)
    if len(labeled):
        min_d2 = d2[labeled].min(0)
    else:
        rng = np.random.default_rng(seed)
        free = [i for i in range(n) if i not in set(blocked)]
        first = int(free[rng.integers(len(free))]) if len(ignored) else int(rng.integers(n))
        picked, scores = [first], [np.inf]
        min_d2 = d2[first].copy()
    min_d2 = min_d2.copy()
    min_d2[blocked + picked] = -np.inf
    while len(picked) < budget:
        c = int(np.argmax(min_d2))
        picked.append(c)
        scores.append(min_d2[c])
        min_d2 = np.minimum(min_d2, d2[c])
        min_d2[picked] = -np.inf
        min_d2[blocked] = -np.inf
    return np.array(picked), np.array(scores)


@pytest.mark.parametrize("with_labeled", [False, True])
def test_coreset_matches_bruteforce_on_integer_features(backend, with_labeled, rng):
    n = 150
    feats, _ = make_arrays(rng, n, (3, 4), integer=True)   # two scales, summed dot products
    feats[0][[20, 21, 90]] = feats[0][5]                    # duplicate rows: exact distance ties
    feats[1][[20, 21, 90]] = feats[1][5]
    labeled = rng.choice(n, 12, replace=False) if with_labeled else np.zeros(0, dtype=np.int64)
    seed = int(rng.integers(1 << 20))
    budget = 25
    sel = select("coreset", PoolInputs(features=pyfk.Descriptors(feats)), budget,
                 labeled=labeled if with_labeled else None, seed=seed, backend=backend, normalize="none")
    want, want_scores = coreset_bruteforce(np.concatenate(feats, 1), labeled, budget, seed)
    np.testing.assert_array_equal(sel.indices, want)
    np.testing.assert_array_equal(sel.scores, want_scores)
    assert not np.isin(sel.indices, labeled).any()
    assert sel.provenance["params"] == {"normalize": "none"}


@pytest.mark.parametrize("with_labeled", [False, True])
def test_coreset_ignored_rows_are_neither_picked_nor_centres(with_labeled, rng):
    n = 120
    feats, _ = make_arrays(rng, n, (3, 4), integer=True)
    order = rng.permutation(n)
    labeled = np.sort(order[:10]) if with_labeled else np.zeros(0, dtype=np.int64)
    ignored = np.sort(order[10:25])
    seed = int(rng.integers(1 << 20))
    sel = select("coreset", PoolInputs(features=pyfk.Descriptors(feats)), 20, labeled=labeled, ignored=ignored,
                 seed=seed, normalize="none")
    want, want_scores = coreset_bruteforce(np.concatenate(feats, 1), labeled, 20, seed, ignored)
    np.testing.assert_array_equal(sel.indices, want)
    np.testing.assert_array_equal(sel.scores, want_scores)
    assert sel.provenance["labeled"] == len(labeled) and sel.provenance["ignored"] == 15
    as_centres = select("coreset", PoolInputs(features=pyfk.Descriptors(feats)), 20,
                        labeled=np.union1d(labeled, ignored), seed=seed, normalize="none")
    assert not np.array_equal(as_centres.scores, sel.scores)  # ignored rows as centres would change the distances


def test_every_strategy_honours_ignored(rng):
    n = 90
    pool, val, y, y_hat = every_input(rng, n)
    labeled, ignored = np.arange(0, 30, 3), np.arange(31, 70, 2)
    for name in st.STRATEGIES:
        sel = select(name, pool, 40, labeled=labeled, ignored=ignored, seed=3, val=ValInputs(val, y, y_hat))
        assert not np.isin(sel.indices, np.union1d(labeled, ignored)).any(), name
        assert sel.provenance["available"] == n - len(np.union1d(labeled, ignored))
        if name not in ("coreset",):  # only coreset reads labeled rows beyond excluding them
            same = select(name, pool, 40, labeled=np.union1d(labeled, ignored), seed=3, val=ValInputs(val, y, y_hat))
            np.testing.assert_array_equal(sel.indices, same.indices, err_msg=name)
    with pytest.raises(ValueError, match="ignored: expected rows disjoint from labeled"):
        select("random", pool, 3, labeled=[1, 2], ignored=[2, 3])
    with pytest.raises(ValueError, match="ignored"):
        select("random", pool, 3, ignored=[n + 4])
    with pytest.raises(ValueError, match="budget"):
        select("random", pool, n - 3, labeled=[1, 2], ignored=[4, 5])


def test_coreset_streamed_store_equals_in_memory(tmp_path, monkeypatch, rng):
    n = 120
    feats, _ = make_arrays(rng, n, (5,), integer=True)
    labeled = rng.choice(n, 7, replace=False)
    store = DescriptorStore.create(tmp_path / "pool", n, {"z0": ((5,), "float32")})
    store.write(0, {"z0": feats[0]})
    store.commit(n)
    in_memory = select("coreset", PoolInputs(features=pyfk.Descriptors(feats)), 20, labeled=labeled,
                       normalize="none")
    monkeypatch.setattr(engine_backend, "CACHE_BYTES", 0)           # no normalised copy: re-read chunk by chunk
    monkeypatch.setattr(engine_backend, "STREAM_BYTES", 4 * 5 * 17)  # ... 17 rows at a time
    monkeypatch.setattr(engine_search, "SIM_BLOCK", 3 * n)           # 3 labeled centres per similarity block
    monkeypatch.setattr(engine_search, "SIM_SUB", 40)                # ... reduced two centre rows at a time
    blocks = []
    real_block = engine_backend.normalized_block

    def counting_block(parts, rows, *a, **kw):
        blocks.append(rows)
        return real_block(parts, rows, *a, **kw)

    monkeypatch.setattr(engine_backend, "normalized_block", counting_block)
    streamed = select("coreset", PoolInputs(features=store), 20, labeled=labeled, normalize="none")
    # the patched sizes took effect: no kept copy, every pool walk re-normalised in 17-row chunks
    assert len(blocks) > 10 * (n // 17)
    assert max(len(range(n)[r]) if isinstance(r, slice) else len(r) for r in blocks) <= 17
    np.testing.assert_array_equal(streamed.indices, in_memory.indices)
    np.testing.assert_array_equal(streamed.scores, in_memory.scores)


def test_coreset_l2_is_greedy_within_tolerance(rng):
    n = 200
    x = rng.standard_normal((n, 16))
    labeled = rng.choice(n, 5, replace=False)
    sel = select("coreset", PoolInputs(features=pyfk.Descriptors([x.astype(np.float32)])), 15, labeled=labeled)
    xn = normalize64(x, "l2")
    d2 = 2.0 - 2.0 * xn @ xn.T
    centres = list(labeled)
    for idx, score in zip(sel.indices, sel.scores):
        min_d2 = d2[centres].min(0)
        min_d2[centres] = -np.inf
        assert abs(min_d2[idx] - score) < 1e-5
        assert min_d2.max() - min_d2[idx] < 1e-5, "each pick is the farthest point (up to float32 rounding)"
        centres.append(int(idx))


# ----------------------------------------------------------------------------- badge

def badge_bruteforce(h_aug, e, labeled, budget, seed):
    emb = (e[:, :, None] * h_aug[:, None, :]).reshape(len(e), -1).astype(np.float64)  # (p - onehot) x [h, 1]
    sq = (emb * emb).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T, 0.0)
    n = len(e)
    rng = np.random.default_rng(seed)
    unavailable = np.zeros(n, dtype=bool)
    unavailable[labeled] = True
    first = int(np.argmax(np.where(unavailable, -np.inf, sq)))
    picked, scores = [first], [sq[first]]
    unavailable[first] = True
    min_d2 = d2[first].copy()
    while len(picked) < budget:
        w = np.where(unavailable, 0.0, min_d2)
        if w.sum() > 0:
            cum = np.cumsum(w)
            c = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
        else:
            c = int(np.flatnonzero(~unavailable)[0])
        picked.append(c)
        scores.append(min_d2[c])
        unavailable[c] = True
        min_d2 = np.minimum(min_d2, d2[c])
    return np.array(picked), np.array(scores), sq


@pytest.mark.parametrize("with_labeled", [False, True])
def test_badge_matches_bruteforce_kmeanspp(backend, with_labeled, rng):
    n, hidden, classes = 160, 5, 3
    h_aug = np.c_[rng.integers(-2, 3, (n, hidden)), np.ones(n)].astype(np.float32)
    e = rng.integers(-2, 3, (n, classes)).astype(np.float32)
    labeled = rng.choice(n, 10, replace=False) if with_labeled else np.zeros(0, dtype=np.int64)
    seed = int(rng.integers(1 << 20))
    budget = 30
    factors = pyfk.Descriptors([h_aug], [e], same_widths=False)
    sel = select("badge", PoolInputs(badge=factors), budget, labeled=labeled, seed=seed, backend=backend)
    want, want_scores, sq = badge_bruteforce(h_aug, e, labeled, budget, seed)
    np.testing.assert_array_equal(sel.indices, want)
    np.testing.assert_array_equal(sel.scores, want_scores)
    # the first pick has the largest embedding norm among unlabeled rows
    free = np.setdiff1d(np.arange(n), labeled)
    assert sel.scores[0] == sq[free].max() == sq[sel.indices[0]]
    assert sel.indices[0] == free[np.argmax(sq[free])]
    assert not np.isin(sel.indices, labeled).any()


def test_badge_falls_back_to_smallest_index_when_all_distances_vanish():
    n = 12
    h_aug = np.tile(np.array([[1.0, 2.0, 1.0]], dtype=np.float32), (n, 1))
    e = np.tile(np.array([[0.5, -0.5]], dtype=np.float32), (n, 1))
    sel = select("badge", PoolInputs(badge=pyfk.Descriptors([h_aug], [e], same_widths=False)), 5, labeled=[1, 3])
    np.testing.assert_array_equal(sel.indices, [0, 2, 4, 5, 6])
    assert sel.provenance["zero_fallbacks"] == 4


# ----------------------------------------------------------------------------- PFK family

def pfk_problem(rng, n_val=50, n_pool=400, widths=(6, 9)):
    vz, vg = make_arrays(rng, n_val, widths)
    pz, pg = make_arrays(rng, n_pool, widths)
    y = rng.integers(0, 4, n_val)
    y_hat = np.where(rng.random(n_val) < 0.3, (y + 1) % 4, y)
    return pyfk.Descriptors(vz, vg), pyfk.Descriptors(pz, pg), y, y_hat, (vz, vg, pz, pg)


@pytest.mark.parametrize("name,combine", [("pfk", "product"), ("pcc", "features"), ("pfk_sum", "sum")])
def test_pfk_family_equals_select_with_provenance(name, combine, rng):
    val, pool, y, y_hat, (vz, vg, pz, pg) = pfk_problem(rng)
    labeled = rng.choice(pool.n, 30, replace=False)
    budget, k, seed = 40, 8, int(rng.integers(1000))
    sel = select(name, PoolInputs(descriptors=pool), budget, labeled=labeled, seed=seed,
                 val=ValInputs(val, y, y_hat), k=k)
    want = pyfk.select(pool, val, budget, y, y_hat, k=k, combine=combine, normalize="pcc", seed=seed,
                       exclude=labeled)
    np.testing.assert_array_equal(sel.indices, want)
    prov = sel.provenance
    errors = set(np.flatnonzero(y != y_hat).tolist())
    assert len(prov["centre"]) == len(prov["rank"]) == len(prov["score"]) == len(prov["scale_share"]) == budget
    assert set(prov["centre"]) <= errors
    np.testing.assert_allclose(prov["score"], sel.scores)
    terms = np.array(prov["scale_terms"])
    assert terms.shape == (budget, 2)
    np.testing.assert_allclose(terms.sum(1), sel.scores, rtol=1e-4, atol=1e-4)
    shares = np.array(prov["scale_share"], dtype=np.float64)
    np.testing.assert_allclose(shares.sum(1), 1.0, rtol=0, atol=1e-9)
    # the per-scale terms, from an independent float64 normalisation
    for i, (c, p) in enumerate(zip(prov["centre"], sel.indices)):
        for j in range(2):
            zz = normalize64(vz[j][[c]], "pcc") @ normalize64(pz[j][[p]], "pcc").T
            gg = normalize64(vg[j][[c]], "pcc") @ normalize64(pg[j][[p]], "pcc").T
            t = {"product": zz * gg, "sum": zz + gg, "features": zz}[combine].item()
            assert abs(t - terms[i, j]) <= 1e-4 * max(1.0, abs(t))
    assert prov["params"] == {"k": k, "normalize": "pcc", "use_all": False}


def every_input(rng, n, c=4):
    """A PoolInputs with every field (n rows, c classes) and a PFK validation set (val, y, y_hat)."""
    p = rng.dirichlet(np.ones(c), n)
    val, pool_desc, y, y_hat, _ = pfk_problem(rng, n_val=20, n_pool=n, widths=(4, 5))
    h = rng.standard_normal((n, 6)).astype(np.float32)
    pool = PoolInputs(probs=p, mc_probs=rng.dirichlet(np.ones(c), (3, n)), descriptors=pool_desc,
                      badge=pyfk.Descriptors([np.c_[h, np.ones(n, np.float32)]],
                                             [(p - np.eye(c)[p.argmax(1)]).astype(np.float32)], same_widths=False),
                      features=pyfk.Descriptors([h]))
    return pool, val, y, y_hat


def test_every_strategy_records_json_provenance(rng):
    n = 90
    pool, val, y, y_hat = every_input(rng, n)
    assert set(st.STRATEGIES) >= {"random", "entropy", "margin", "least_confidence", "var_ratio", "bald", "std",
                                  "ensemble_entropy", "ensemble_var_ratio", "ensemble_bald", "coreset", "badge",
                                  "pcc", "pfk", "pfk_sum"}
    for name in st.STRATEGIES:
        sel = select(name, pool, 7, labeled=[0, 5], seed=3, val=ValInputs(val, y, y_hat))
        assert sel.strategy == name and sel.indices.shape == (7,) and sel.scores.shape == (7,)
        assert PROVENANCE_KEYS <= set(sel.provenance)
        assert sel.provenance["strategy"] == name and sel.provenance["available"] == n - 2
        json.dumps(sel.provenance, allow_nan=False)


DECLARED = {"random": st.Needs(),
            **{name: st.Needs("probs") for name in ("entropy", "margin", "least_confidence")},
            **{name: st.Needs("mc_probs", passes="mc_dropout") for name in ("var_ratio", "bald", "std")},
            **{name: st.Needs("mc_probs", passes="ensemble")
               for name in ("ensemble_entropy", "ensemble_var_ratio", "ensemble_bald")},
            "coreset": st.Needs("features"), "badge": st.Needs("badge"),
            **{name: st.Needs("descriptors", val=True) for name in ("pcc", "pfk", "pfk_sum")}}


def test_each_strategy_runs_on_exactly_what_it_declares(rng):
    """The registry's Needs is what a runner computes: every strategy gives the same picks on
    its declared inputs alone as on all of them, and refuses to run with one of them missing."""
    assert {name: spec.needs for name, spec in st.STRATEGIES.items()} == DECLARED
    n, c = 60, 3
    p = rng.dirichlet(np.ones(c), n)
    val, pool_desc, y, y_hat, _ = pfk_problem(rng, n_val=15, n_pool=n, widths=(4, 3))
    h = rng.standard_normal((n, 5)).astype(np.float32)
    every = dict(probs=p, mc_probs=rng.dirichlet(np.ones(c), (4, n)), descriptors=pool_desc,
                 badge=pyfk.Descriptors([np.c_[h, np.ones(n, np.float32)]],
                                        [(p - np.eye(c)[p.argmax(1)]).astype(np.float32)], same_widths=False),
                 features=pyfk.Descriptors([h]))
    labeled = [1, 7, 30]
    for name, spec in st.STRATEGIES.items():
        want = select(name, PoolInputs(**every), 9, labeled=labeled, seed=5, val=ValInputs(val, y, y_hat))
        declared = PoolInputs(**{f: every[f] for f in spec.needs.pool}, n=n)
        got = select(name, declared, 9, labeled=labeled, seed=5,
                     val=ValInputs(val, y, y_hat) if spec.needs.val else None)
        np.testing.assert_array_equal(got.indices, want.indices, err_msg=name)
        np.testing.assert_array_equal(got.scores, want.scores, err_msg=name)
        for f in spec.needs.pool:
            with pytest.raises(ValueError, match=f"pool.{f}: strategy '{name}' needs it"):
                select(name, PoolInputs(**{g: every[g] for g in spec.needs.pool if g != f}, n=n), 9,
                       val=ValInputs(val, y, y_hat))
        if spec.needs.val:
            with pytest.raises(ValueError, match="val.descriptors"):
                select(name, declared, 9)
            with pytest.raises(ValueError, match="val.descriptors"):
                select(name, declared, 9, val=ValInputs(labels=y, pred=y_hat))


def test_register_checks_the_declaration():
    def fn(pool, req):
        return req.rows[:req.budget], np.zeros(req.budget), {}

    with pytest.raises(ValueError, match="needs: expected distinct fields"):
        st.register("x_bad", needs="logits")
    with pytest.raises(ValueError, match="needs: expected distinct fields"):
        st.register("x_bad", needs=("probs", "probs"))
    with pytest.raises(ValueError, match="passes: expected one of"):
        st.register("x_bad", needs="mc_probs")               # how are the passes made?
    with pytest.raises(ValueError, match="passes: expected one of"):
        st.register("x_bad", needs="probs", passes="ensemble")
    with pytest.raises(ValueError, match="passes: expected one of"):
        st.register("x_bad", needs="mc_probs", passes="bootstrap")
    with pytest.raises(TypeError, match="val: expected a bool"):
        st.register("x_bad", needs=None, val="yes")
    assert "x_bad" not in st.STRATEGIES
    try:
        assert st.register("x_first", needs=("probs", "features"), params={"t": 1})(fn) is fn
        spec = st.STRATEGIES["x_first"]
        assert spec.needs == st.Needs(("probs", "features")) and dict(spec.params) == {"t": 1}
        with pytest.raises(ValueError, match="pool.features: strategy 'x_first' needs it"):
            select("x_first", PoolInputs(probs=np.full((4, 2), 0.5)), 2)
    finally:
        st.STRATEGIES.pop("x_first", None)


def test_pool_size_alone_is_enough_for_random(rng):
    sel = select("random", PoolInputs(n=50), 10, labeled=[3, 4], seed=9)
    np.testing.assert_array_equal(sel.indices, select("random", PoolInputs(probs=rng.dirichlet(np.ones(2), 50)), 10,
                                                      labeled=[3, 4], seed=9).indices)
    with pytest.raises(ValueError, match="disagree"):
        select("random", PoolInputs(probs=rng.dirichlet(np.ones(2), 50), n=49), 10)
    with pytest.raises(ValueError, match="non-empty"):
        select("random", PoolInputs(n=0), 1)
    with pytest.raises(TypeError, match="pool.n"):
        select("random", PoolInputs(n=5.0), 1)
    with pytest.raises(ValueError, match="pool.probs"):
        select("entropy", PoolInputs(n=50), 1)


# ----------------------------------------------------------------------------- errors

def test_errors(rng):
    p = rng.dirichlet(np.ones(3), 20)
    pool = PoolInputs(probs=p)
    with pytest.raises(ValueError, match="strategy.*entropy.*pfk"):
        select("entropyy", pool, 3)
    with pytest.raises(ValueError, match="budget"):
        select("entropy", pool, 19, labeled=[0, 1])
    with pytest.raises(ValueError, match="budget"):
        select("random", pool, 21)
    with pytest.raises(ValueError, match="pool.probs"):
        select("entropy", PoolInputs(mc_probs=np.stack([p, p])), 3)
    with pytest.raises(ValueError, match="pool.mc_probs"):
        select("bald", pool, 3)
    with pytest.raises(ValueError, match="pool.descriptors"):
        select("pfk", pool, 3)
    with pytest.raises(ValueError, match="pool.features"):
        select("coreset", pool, 3)
    with pytest.raises(ValueError, match="pool.badge"):
        select("badge", pool, 3)
    with pytest.raises(ValueError, match="pool"):
        select("random", PoolInputs(), 3)
    val, desc, y, y_hat, _ = pfk_problem(rng, n_val=10, n_pool=20, widths=(3,))
    with pytest.raises(ValueError, match="val.descriptors"):
        select("pfk", PoolInputs(descriptors=desc), 3)
    bad = p.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        select("entropy", PoolInputs(probs=bad), 3)
    bad_mc = np.stack([p, p])
    bad_mc[1, 7, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        select("bald", PoolInputs(mc_probs=bad_mc), 3)
    with pytest.raises(ValueError, match="sum to 1"):
        select("margin", PoolInputs(probs=p * 1.01), 3)
    with pytest.raises(ValueError, match="sum to 1"):
        select("std", PoolInputs(mc_probs=np.stack([p, p * 0.9])), 3)
    neg = p.copy()
    neg[2] = [1.5, -0.5, 0.0]
    with pytest.raises(ValueError, match="non-negative"):
        select("least_confidence", PoolInputs(probs=neg), 3)
    with pytest.raises(ValueError, match="labeled"):
        select("entropy", pool, 3, labeled=[0, 20])
    with pytest.raises(ValueError, match="labeled"):
        select("entropy", pool, 3, labeled=[-1])
    with pytest.raises(ValueError, match="labeled"):
        select("entropy", pool, 3, labeled=[4, 4])
    with pytest.raises(ValueError, match="unknown parameter"):
        select("entropy", pool, 3, k=4)
    with pytest.raises(ValueError, match="disagree"):
        select("entropy", PoolInputs(probs=p, mc_probs=np.stack([p[:10]])), 3)
    with pytest.raises(ValueError, match="budget"):
        select("entropy", pool, 0)
    with pytest.raises(ValueError, match="every one"):
        select("entropy", pool, 1, labeled=np.arange(20))
