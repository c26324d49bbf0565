"""faiss backends: exact Kronecker-feature search (`faiss`) and sketched ANN with exact
re-ranking (`faiss_ann`), driven through their Backend objects and pyfk.topk."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

import pyfk  # noqa: E402
from pyfk.engine import registry  # noqa: E402
from pyfk.engine.descriptors import normalized_block  # noqa: E402
from pyfk.engine.kernels import faiss as fb  # noqa: E402
from pyfk.engine.kernels import faiss_ann as fa  # noqa: E402
from pyfk.engine.layout import Layout  # noqa: E402
from pyfk.engine.topk_state import TopK  # noqa: E402
from tests.oracle import assert_valid_topk, similarity64  # noqa: E402

ANN_RECALL_FLOOR = 0.9  # recall@10 of faiss_ann on the clustered set below (measured ~0.99)


def _desc(rng, n, widths, gwidths=None, clusters=None, sigma=0.5, centres=None):
    """n random rows, or rows around `clusters` Gaussian centres (the same centres for every
    call given the same `centres` seed: queries and pool share their clusters)."""
    gwidths = gwidths or widths
    if clusters is None:
        z = [rng.standard_normal((n, w)).astype(np.float32) for w in widths]
        g = [rng.standard_normal((n, w)).astype(np.float32) for w in gwidths]
    else:
        shared = np.random.default_rng(centres)  # seeded by the caller from the test's rng
        lab = rng.integers(0, clusters, n)
        z = [(shared.standard_normal((clusters, w))[lab] + sigma * rng.standard_normal((n, w))).astype(np.float32)
             for w in widths]
        g = [(shared.standard_normal((clusters, w))[lab] + sigma * rng.standard_normal((n, w))).astype(np.float32)
             for w in gwidths]
    return pyfk.Descriptors(z=z, g=g, same_widths=gwidths == widths)


def _pair(rng, m, n, widths, **kw):
    """Queries and pool; clustered ones share their centres."""
    if kw.get("clusters") is not None:
        kw["centres"] = int(rng.integers(2**31))
    return _desc(rng, m, widths, **kw), _desc(rng, n, widths, **kw)


def _prepare(name, q, p, combine, normalize):
    b = registry.get(name)
    q_parts, layout = Layout.of(q, combine)
    p_parts, _ = Layout.of(p, combine)
    return b, normalized_block(q_parts, slice(None), normalize), b.prepare(p_parts, layout, normalize)


def _run(name, q, p, k, combine, normalize, offset=0, rows=None, options=None):
    """One call of backend `name`'s topk over the whole pool (or `rows`) from an empty state,
    the way the search loop makes it (one chunk). Returns NumPy (scores, index)."""
    b, qn, prepared = _prepare(name, q, p, combine, normalize)
    state = b.topk(qn, prepared, slice(0, p.n) if rows is None else rows, k, TopK.empty(qn.shape[0], k), offset,
                   b.resolve_options(options))
    return state.scores.numpy(), state.index.numpy()


def _oracle(q, p, combine, normalize):
    return similarity64(q.z, q.g, p.z, p.g, combine, normalize)


# ----------------------------------------------------------------------------- faiss (exact)

@pytest.mark.parametrize("combine", ["product", "sum", "features"])
@pytest.mark.parametrize("normalize", ["pcc", "l2", "none"])
def test_exact_matches_oracle(combine, normalize, rng):
    q, p = _pair(rng, 7, 300, [5, 3])
    S = _oracle(q, p, combine, normalize)
    k = 9
    s, i = _run("faiss", q, p, k, combine, normalize)
    tol = 1e-4 * max(1.0, float(np.abs(S).max()))
    assert_valid_topk(s, i, S, k, tol)


@pytest.mark.parametrize("m,n,k", [(1, 50, 1), (1, 50, 50), (4, 13, 13), (3, 40, 1)])
def test_exact_edge_sizes(m, n, k, rng):
    q, p = _desc(rng, m, [7]), _desc(rng, n, [7])
    S = _oracle(q, p, "product", "pcc")
    s, i = _run("faiss", q, p, k, "product", "pcc")
    assert_valid_topk(s, i, S, k, 1e-4 * float(np.abs(S).max()))


def test_exact_odd_gradient_widths_and_offset(rng):
    q, p = _pair(rng, 5, 120, [3, 6], gwidths=[5, 2])
    S = _oracle(q, p, "product", "l2")
    s, i = _run("faiss", q, p, 6, "product", "l2", offset=1000)
    assert (i >= 1000).all()
    assert_valid_topk(s, i - 1000, S, 6, 1e-5)


def test_exact_ties_go_to_smaller_index(rng):
    base = _desc(rng, 1, [4])
    z = np.repeat(base.z[0], 20, axis=0)
    g = np.repeat(base.g[0], 20, axis=0)
    p = pyfk.Descriptors(z=[z], g=[g])
    s, i = _run("faiss", base, p, 5, "product", "pcc")
    assert i.tolist() == [[0, 1, 2, 3, 4]]


def test_exact_integer_ties_equal_the_torch_answer(rng):
    """Tie-heavy integer data (the redo path): the exact tie-stable answer, bit for bit."""
    z = [rng.integers(-2, 3, (300, 4)).astype(np.float32)]
    g = [rng.integers(-2, 3, (300, 4)).astype(np.float32)]
    q = pyfk.Descriptors(z=[a[:6] for a in z], g=[a[:6] for a in g])
    p = pyfk.Descriptors(z=z, g=g)
    want = pyfk.topk(q, p, 12, normalize="none", backend="torch")
    got = pyfk.topk(q, p, 12, normalize="none", backend="faiss")
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_exact_merges_into_state_across_chunks(rng):
    q, p = _pair(rng, 4, 200, [6, 4])
    S = _oracle(q, p, "product", "pcc")
    b, qn, pool = _prepare("faiss", q, p, "product", "pcc")
    opts = b.resolve_options(None)
    state = TopK.empty(4, 10)
    for a in range(0, 200, 64):
        state = b.topk(qn, pool, slice(a, min(200, a + 64)), 10, state, a, opts)
    assert_valid_topk(state.scores.numpy(), state.index.numpy(), S, 10, 1e-4 * float(np.abs(S).max()))
    # a row list instead of a slice: positions are relative to the list
    rows = np.arange(1, 200, 2, dtype=np.int64)
    got = b.topk(qn, pool, rows, 5, TopK.empty(4, 5), 0, opts)
    assert_valid_topk(got.scores.numpy(), got.index.numpy(), S[:, rows], 5, 1e-4 * float(np.abs(S).max()))
    # and through pyfk.topk, whose search loop does the chunking and the row mapping
    s, i = pyfk.topk(q, p, 10, backend="faiss", exclude=np.arange(0, 200, 2))
    assert (i % 2 == 1).all()
    assert_valid_topk(s, (i - 1) // 2, S[:, 1::2], 10, 1e-4 * float(np.abs(S).max()))


def test_exact_width_limit(rng):
    q, p = _desc(rng, 2, [128]), _desc(rng, 10, [128])  # 128 * 128 = 16384 Kronecker columns
    with pytest.raises(ValueError, match=r"KRON_MAX_WIDTH.*backend='cpu'.*faiss_ann"):
        _run("faiss", q, p, 2, "product", "pcc")
    s, i = _run("faiss", q, p, 2, "sum", "pcc")  # 256 columns: fine
    assert i.shape == (2, 2)


def test_exact_has_no_options():
    b = registry.get("faiss")
    assert b.exact and b.options == {} and b.resolve_options(None) == {}
    with pytest.raises(ValueError, match="unknown.*'nprobe'"):
        b.resolve_options({"nprobe": 4})


def test_explicit_features_inner_product_is_kernel(rng):
    q, p = _pair(rng, 3, 6, [4, 5])
    q_parts, layout = Layout.of(q, "product")
    p_parts, _ = Layout.of(p, "product")
    qn = normalized_block(q_parts, slice(None), "pcc")
    pn = normalized_block(p_parts, slice(None), "pcc")
    fq, fp = fb.explicit_features(qn, layout.widths, True), fb.explicit_features(pn, layout.widths, True)
    assert fq.shape[1] == fb.explicit_width(layout.widths, True) == 16 + 25
    np.testing.assert_allclose((fq @ fp.T).numpy(), _oracle(q, p, "product", "pcc"), rtol=1e-4, atol=1e-3)


# ----------------------------------------------------------------------------- faiss_ann

def test_tensor_sketch_is_unbiased(rng):
    x = torch.from_numpy(rng.standard_normal((1, 12)).astype(np.float32))
    y = torch.from_numpy(rng.standard_normal((1, 12)).astype(np.float32))
    want = float((x[:, :6] @ y[:, :6].T) * (x[:, 6:] @ y[:, 6:].T))
    first = int(rng.integers(10**6))
    est = [float(fa.tensor_sketch(x, [6, 6], True, 16, s) @ fa.tensor_sketch(y, [6, 6], True, 16, s).T)
           for s in range(first, first + 400)]
    assert abs(np.mean(est) - want) < 4 * np.std(est) / np.sqrt(len(est)) + 1e-3


@pytest.fixture
def clustered(rng):
    return _pair(rng, 200, 5000, [8, 16], clusters=20)


def test_ann_recall_and_exact_scores(clustered):
    q, p = clustered
    k = 10
    S = _oracle(q, p, "product", "pcc")
    best = np.argsort(-S, axis=1, kind="stable")[:, :k]
    s, i = _run("faiss_ann", q, p, k, "product", "pcc", options={"width": 256, "nprobe": 16, "seed": 3})
    assert ((i >= 0) & (i < p.n)).all()
    for row in i:
        assert len(set(row.tolist())) == k
    np.testing.assert_allclose(np.take_along_axis(S, i, 1), s, rtol=0, atol=1e-4 * float(np.abs(S).max()))
    assert (np.diff(s, axis=1) <= 0).all()
    recall = fb.recall_at_k(i, best)
    assert recall >= ANN_RECALL_FLOOR, recall


def test_ann_deterministic_for_seed(clustered):
    q, p = clustered
    options = {"seed": 5, "nprobe": 4, "candidates": 32}
    a = _run("faiss_ann", q, p, 10, "product", "pcc", options=options)
    b = _run("faiss_ann", q, p, 10, "product", "pcc", options=options)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("combine", ["sum", "features"])
def test_ann_other_combines_exact_scores(clustered, combine):
    q, p = clustered
    S = _oracle(q, p, combine, "l2")
    # width 16 < 48 / 24 columns: count sketch path
    s, i = _run("faiss_ann", q, p, 5, combine, "l2", options={"width": 16, "nprobe": 8})
    np.testing.assert_allclose(np.take_along_axis(S, i, 1), s, rtol=0, atol=1e-5)
    assert fb.recall_at_k(i, np.argsort(-S, axis=1, kind="stable")[:, :5]) >= 0.5


def test_ann_hnsw_and_short_candidate_fallback(rng):
    q, p = _pair(rng, 6, 400, [4, 4], clusters=3)
    S = _oracle(q, p, "product", "pcc")
    s, i = _run("faiss_ann", q, p, 8, "product", "pcc", options={"index": "hnsw", "ef_search": 64})
    np.testing.assert_allclose(np.take_along_axis(S, i, 1), s, rtol=0, atol=1e-3)
    # nprobe=1 over many tiny lists leaves some queries short of k: they fall back to the exact search
    s, i = _run("faiss_ann", q, p, 8, "product", "pcc", options={"nlist": 200, "nprobe": 1, "candidates": 8})
    # every row full (k distinct real indices, scores exact for them); which ones is up to the
    # approximate search for the rows that were not short, so no exact top-k is asserted here
    assert (i >= 0).all() and all(len(set(row)) == 8 for row in i.tolist())
    np.testing.assert_allclose(np.take_along_axis(S, i, 1), s, rtol=0, atol=1e-4 * float(np.abs(S).max()))
    assert (np.diff(s, axis=1) <= 1e-6).all()


def test_ann_k_equals_n_is_exact(rng):
    q, p = _desc(rng, 3, [5]), _desc(rng, 40, [5])
    S = _oracle(q, p, "product", "pcc")
    s, i = _run("faiss_ann", q, p, 40, "product", "pcc")
    assert_valid_topk(s, i, S, 40, 1e-4 * float(np.abs(S).max()))


def test_ann_params_validation():
    with pytest.raises(ValueError, match="index"):
        fa.AnnParams(index="lsh")
    with pytest.raises(ValueError, match="nprobe"):
        fa.AnnParams(nprobe=0)
    for field, bad in (("width", 2.5), ("nlist", 0), ("candidates", -1), ("seed", -1), ("cache", "yes"),
                       ("keep_rows", 1), ("search_threads", True)):
        with pytest.raises(ValueError, match=f"AnnParams.{field}: expected"):
            fa.AnnParams(**{field: bad})


def test_ann_options_are_annparams_fields():
    """The options of `faiss_ann` are AnnParams' fields with AnnParams' defaults, validated up front."""
    b = registry.get("faiss_ann")
    assert not b.exact
    assert b.options == dataclasses.asdict(fa.AnnParams())
    assert b.resolve_options(None) == dataclasses.asdict(fa.AnnParams())
    assert b.resolve_options({"nprobe": 8})["nprobe"] == 8
    info = {r["name"]: r for r in pyfk.backends()}["faiss_ann"]
    assert info["options"] == dataclasses.asdict(fa.AnnParams())
    with pytest.raises(ValueError, match="unknown.*'n_probe'"):
        b.resolve_options({"n_probe": 8})
    with pytest.raises(ValueError, match="AnnParams.nprobe"):
        b.resolve_options({"nprobe": 0})
    with pytest.raises(ValueError, match="unknown.*'bogus'"):
        fa.AnnParams.from_options({"bogus": 1})


def test_ann_options_through_pyfk_topk(clustered):
    """pyfk.topk(..., backend="faiss_ann", options=...) reaches the index: the same answer as
    the backend driven by hand with those options; bad options fail before any work."""
    q, p = clustered
    options = {"nprobe": 8, "width": 128, "seed": 7, "candidates": 64}
    s, i = pyfk.topk(q, p, 10, backend="faiss_ann", options=options)
    want = _run("faiss_ann", q, p, 10, "product", "pcc", options=options)
    np.testing.assert_array_equal(i, want[1])
    np.testing.assert_array_equal(s, want[0])
    with pytest.raises(ValueError, match="nprobe"):
        pyfk.topk(q, p, 10, backend="faiss_ann", options={"nprobe": -1})
    with pytest.raises(ValueError, match="unknown"):
        pyfk.topk(q, p, 10, backend="faiss_ann", options={"probes": 8})


def test_recall_at_k():
    assert fb.recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 1]])) == 1.0
    assert fb.recall_at_k(np.array([[1, 2, -1], [4, 5, 6]]), np.array([[1, 9, 8], [6, 5, 7]])) == pytest.approx(0.5)
    assert fa.recall_at_k is fb.recall_at_k


def test_ann_cache_reuses_index(clustered):
    q, p = clustered
    fa.clear_cache()
    try:
        a = _run("faiss_ann", q, p, 5, "product", "pcc", options={"cache": True})
        entry = fa.cached_index()
        assert entry is not None
        b = _run("faiss_ann", q, p, 5, "product", "pcc", options={"cache": True})
        assert fa.cached_index() is entry
    finally:
        fa.clear_cache()
    assert fa.cached_index() is None
    np.testing.assert_array_equal(a[1], b[1])


def test_ann_prepared_pool_builds_each_chunk_index_once(clustered):
    """Repeated searches of one prepared pool (select growing k) reuse the chunk's index."""
    q, p = clustered
    b, qn, pool = _prepare("faiss_ann", q, p, "product", "pcc")
    opts = b.resolve_options({"nprobe": 4})
    first = b.topk(qn, pool, slice(0, p.n), 5, TopK.empty(qn.shape[0], 5), 0, opts)
    index = b.chunk_index(pool, slice(0, p.n), fa.AnnParams(**opts), qn.device)
    again = b.topk(qn, pool, slice(0, p.n), 5, TopK.empty(qn.shape[0], 5), 0, opts)
    assert b.chunk_index(pool, slice(0, p.n), fa.AnnParams(**opts), qn.device) is index
    assert torch.equal(first.index, again.index) and torch.equal(first.scores, again.scores)
    other = b.chunk_index(pool, slice(0, p.n), fa.AnnParams(**{**opts, "nprobe": 8}), qn.device)
    assert other is not index  # other options: another index, and only the last one is kept
    assert len(pool.extra) == 1


def test_ann_row_list_positions_and_offset(rng):
    q, p = _pair(rng, 4, 600, [6, 6], clusters=4)
    S = _oracle(q, p, "product", "pcc")
    rows = np.arange(3, 600, 3, dtype=np.int64)
    # keep_rows=False: the gather-and-normalise re-ranking path
    s, i = _run("faiss_ann", q, p, 7, "product", "pcc", offset=500, rows=rows, options={"keep_rows": False})
    pos = i - 500
    assert ((pos >= 0) & (pos < len(rows))).all()
    np.testing.assert_allclose(np.take_along_axis(S[:, rows], pos, 1), s, rtol=0, atol=1e-3)
