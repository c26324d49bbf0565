"""pyfk.select: the paper's acquisition rule against an independent implementation."""

import numpy as np
import pytest

import pyfk
from tests.conftest import make_arrays
from tests.oracle import similarity64, topk64


def rank_major_oracle(S, centres_rows, k, budget):
    """Rank-major rule written directly: rank by rank, best score first, ties to the
    smaller pool index then the earlier centre; first `budget` distinct indices."""
    best, order = topk64(S[centres_rows], k)
    seen, out = set(), []
    for r in range(k):
        cands = sorted((-best[c, r], order[c, r], c) for c in range(len(centres_rows)))
        for _, idx, _ in cands:
            if idx not in seen:
                seen.add(idx)
                out.append(int(idx))
                if len(out) == budget:
                    return np.array(out)
    return np.array(out)


def integer_problem(rng, n_val=40, n_pool=600, widths=(3, 4)):
    """Small-integer descriptors + normalize='none': every score exact, ties everywhere."""
    vz, vg = make_arrays(rng, n_val, widths, integer=True)
    pz, pg = make_arrays(rng, n_pool, widths, integer=True)
    y = rng.integers(0, 3, n_val)
    y_hat = np.where(rng.random(n_val) < 0.3, (y + 1) % 3, y)
    return vz, vg, pz, pg, y, y_hat


@pytest.mark.parametrize("combine", ["product", "sum", "features"])
def test_rank_major_matches_oracle_when_all_errors_are_centres(rng, backend, combine):
    vz, vg, pz, pg, y, y_hat = integer_problem(rng)
    errors = np.flatnonzero(y != y_hat)
    exclude = rng.choice(600, size=50, replace=False)
    budget = max(len(errors), 30)  # budget >= #errors: every error is a centre
    chosen = pyfk.select(pyfk.Descriptors(pz, pg), pyfk.Descriptors(vz, vg), budget=budget, val_labels=y,
                         val_pred=y_hat, k=4, combine=combine, normalize="none", exclude=exclude,
                         backend=backend)
    S = similarity64(vz, vg, pz, pg, combine, "none")
    S[:, exclude] = -np.inf
    k = 4
    expected = rank_major_oracle(S, errors, k, budget)
    while len(expected) < budget:  # the rule grows K until enough distinct indices
        k *= 2
        expected = rank_major_oracle(S, errors, k, budget)
    np.testing.assert_array_equal(chosen, expected)


def test_select_with_k_centre_reduction(rng, backend):
    vz, vg = make_arrays(rng, 200, [7, 33])
    pz, pg = make_arrays(rng, 2000, [7, 33])
    y = rng.integers(0, 10, 200)
    y_hat = np.where(rng.random(200) < 0.5, (y + 3) % 10, y)
    pool, val = pyfk.Descriptors(pz, pg), pyfk.Descriptors(vz, vg)
    exclude = rng.choice(2000, size=300, replace=False)
    kw = dict(val_labels=y, val_pred=y_hat, k=8, exclude=exclude, backend=backend)
    a = pyfk.select(pool, val, budget=25, seed=3, **kw)
    b = pyfk.select(pool, val, budget=25, seed=3, **kw)
    assert a.dtype == np.int64 and len(a) == 25 and len(set(a.tolist())) == 25
    assert not np.isin(a, exclude).any() and ((a >= 0) & (a < 2000)).all()
    np.testing.assert_array_equal(a, b)  # deterministic for a seed
    details = pyfk.select(pool, val, budget=25, seed=3, return_details=True, **kw)
    np.testing.assert_array_equal(details["indices"], a)
    errors = set(np.flatnonzero(y != y_hat).tolist())
    assert len(details["centres"]) == 25 and set(details["centres"].tolist()) <= errors
    assert set(details["centre"].tolist()) <= set(details["centres"].tolist())
    others = {tuple(pyfk.select(pool, val, budget=25, seed=s, return_details=True, **kw)["centres"][:3])
              for s in range(6)}
    assert len(others) > 1  # the seed picks the start centre


def k_centre_oracle(R, count, start):
    d2 = np.diag(R)[:, None] + np.diag(R)[None, :] - 2 * R
    chosen = [start]
    mind = d2[start].copy()
    while len(chosen) < count:
        mind[chosen] = -np.inf
        chosen.append(int(np.argmax(mind)))
        mind = np.minimum(mind, d2[chosen[-1]])
    return chosen


def test_k_centre_matches_brute_force(rng, backend):
    from pyfk.engine.search import KernelDistances, greedy_k_centre

    vz, vg = make_arrays(rng, 60, [3, 4], integer=True)
    val = pyfk.Descriptors(vz, vg)
    seed = int(rng.integers(1000))
    dist = KernelDistances(val, "product", "none", backend)
    got, d2 = greedy_k_centre(dist, 12, seed=seed)
    start = int(np.random.default_rng(seed).integers(60))
    R = similarity64(vz, vg, vz, vg, "product", "none")
    assert got.tolist() == k_centre_oracle(R, 12, start)
    # each pick's score is its squared kernel distance to the nearest earlier pick (+inf for the start)
    D2 = np.diag(R)[:, None] + np.diag(R)[None, :] - 2 * R
    assert d2[0] == np.inf
    np.testing.assert_allclose(d2[1:], [D2[c, got[:i]].min() for i, c in enumerate(got[1:], 1)], atol=1e-3)


def test_k_centre_from_initial_centres_never_repicks(rng, backend):
    """With initial centres (coreset's labeled set) the first pick is the farthest row from
    them; initial and excluded rows are never picked."""
    from pyfk.engine.search import KernelDistances, greedy_k_centre

    z = [rng.integers(-3, 4, size=(40, 5)).astype(np.float32)]
    desc = pyfk.Descriptors(z)
    dist = KernelDistances(desc, "features", "none", backend)
    initial, excluded = np.array([3, 17]), np.array([0, 1, 2])
    got, d2 = greedy_k_centre(dist, 10, seed=0, initial=initial, excluded=excluded)
    R = z[0].astype(np.float64) @ z[0].T.astype(np.float64)
    D2 = np.diag(R)[:, None] + np.diag(R)[None, :] - 2 * R
    centres, want = list(initial), []
    for _ in range(10):
        m = D2[:, centres + want].min(1)
        m[centres + want] = -np.inf
        m[excluded] = -np.inf
        want.append(int(np.argmax(m)))
    assert got.tolist() == want
    assert not set(got.tolist()) & (set(initial.tolist()) | set(excluded.tolist()))


def test_select_grows_k_until_budget_met(rng, backend):
    """All centres share the same neighbours, so K must grow past its start."""
    vz, vg = make_arrays(rng, 1, [5, 6])
    val = pyfk.Descriptors([np.repeat(a, 4, 0) for a in vz], [np.repeat(a, 4, 0) for a in vg])
    pz, pg = make_arrays(rng, 100, [5, 6])
    chosen = pyfk.select(pyfk.Descriptors(pz, pg), val, budget=4, k=1, use_all=True, backend=backend)
    assert len(set(chosen.tolist())) == 4
    scores, index = pyfk.topk(val.take(slice(0, 1)), pyfk.Descriptors(pz, pg), k=4, backend=backend)
    assert set(chosen.tolist()) == set(index[0].tolist())


def test_no_errors_falls_back_to_all_with_warning(rng, backend):
    vz, vg = make_arrays(rng, 5, [4])
    pz, pg = make_arrays(rng, 50, [4])
    y = np.arange(5)
    with pytest.warns(UserWarning, match="no error"):
        chosen = pyfk.select(pyfk.Descriptors(pz, pg), pyfk.Descriptors(vz, vg), budget=3, val_labels=y,
                             val_pred=y, backend=backend)
    assert len(chosen) == 3
