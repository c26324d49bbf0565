"""faiss backends: exact Kronecker-feature search and sketched ANN with exact re-ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from oracle import assert_valid_topk, similarity64  # noqa: E402

import pyfk  # noqa: E402
from pyfk.engine.descriptors import normalized_block, segments  # noqa: E402
from pyfk.engine.kernels import faiss as fb  # noqa: E402

ANN_RECALL_FLOOR = 0.9  # recall@10 of faiss_ann on the clustered set below (measured ~0.99)


def _desc(n, widths, seed, gwidths=None, clusters=None, sigma=0.5):
    rng = np.random.default_rng(seed)
    gwidths = gwidths or widths
    if clusters is None:
        z = [rng.standard_normal((n, w)).astype(np.float32) for w in widths]
        g = [rng.standard_normal((n, w)).astype(np.float32) for w in gwidths]
    else:
        centres = np.random.default_rng(1234)
        lab = rng.integers(0, clusters, n)
        z = [(centres.standard_normal((clusters, w))[lab] + sigma * rng.standard_normal((n, w))).astype(np.float32)
             for w in widths]
        g = [(centres.standard_normal((clusters, w))[lab] + sigma * rng.standard_normal((n, w))).astype(np.float32)
             for w in gwidths]
    return pyfk.Descriptors(z=z, g=g, same_widths=gwidths == widths)


def _run(update, q, p, k, combine, normalize, offset=0):
    """Drive a backend's topk_update over the whole pool, as the api does (one chunk)."""
    q_parts, widths, product = segments(q, combine)
    p_parts, _, _ = segments(p, combine)
    qn = normalized_block(q_parts, slice(None), normalize)
    m = qn.shape[0]
    s0 = torch.full((m, k), float("-inf"))
    i0 = torch.full((m, k), -1, dtype=torch.int64)
    s, i = update(qn, p_parts, slice(0, p.n), normalize, widths, product, k, offset, s0, i0)
    return s.numpy(), i.numpy()


def _oracle(q, p, combine, normalize):
    return similarity64(q.z, q.g, p.z, p.g, combine, normalize)


@pytest.mark.parametrize("combine", ["product", "sum", "features"])
@pytest.mark.parametrize("normalize", ["pcc", "l2", "none"])
def test_exact_matches_oracle(combine, normalize):
    q, p = _desc(7, [5, 3], 0), _desc(300, [5, 3], 1)
    S = _oracle(q, p, combine, normalize)
    k = 9
    s, i = _run(fb.exact_topk_update, q, p, k, combine, normalize)
    tol = 1e-4 * max(1.0, float(np.abs(S).max()))
    assert_valid_topk(s, i, S, k, tol)


@pytest.mark.parametrize("m,n,k", [(1, 50, 1), (1, 50, 50), (4, 13, 13), (3, 40, 1)])
def test_exact_edge_sizes(m, n, k):
    q, p = _desc(m, [7], 2), _desc(n, [7], 3)
    S = _oracle(q, p, "product", "pcc")
    s, i = _run(fb.exact_topk_update, q, p, k, "product", "pcc")
    assert_valid_topk(s, i, S, k, 1e-4 * float(np.abs(S).max()))


def test_exact_odd_gradient_widths_and_offset():
    q, p = _desc(5, [3, 6], 4, gwidths=[5, 2]), _desc(120, [3, 6], 5, gwidths=[5, 2])
    S = _oracle(q, p, "product", "l2")
    s, i = _run(fb.exact_topk_update, q, p, 6, "product", "l2", offset=1000)
    assert (i >= 1000).all()
    assert_valid_topk(s, i - 1000, S, 6, 1e-5)


def test_exact_ties_go_to_smaller_index():
    base = _desc(1, [4], 6)
    z = np.repeat(base.z[0], 20, axis=0)
    g = np.repeat(base.g[0], 20, axis=0)
    p = pyfk.Descriptors(z=[z], g=[g])
    s, i = _run(fb.exact_topk_update, base, p, 5, "product", "pcc")
    assert i.tolist() == [[0, 1, 2, 3, 4]]


def test_exact_merges_into_state_across_chunks():
    q, p = _desc(4, [6, 4], 7), _desc(200, [6, 4], 8)
    S = _oracle(q, p, "product", "pcc")
    q_parts, widths, product = segments(q, "product")
    p_parts, _, _ = segments(p, "product")
    qn = normalized_block(q_parts, slice(None), "pcc")
    s = torch.full((4, 10), float("-inf"))
    i = torch.full((4, 10), -1, dtype=torch.int64)
    for a in range(0, 200, 64):
        b = min(200, a + 64)
        s, i = fb.exact_topk_update(qn, p_parts, slice(a, b), "pcc", widths, product, 10, a, s, i)
    assert_valid_topk(s.numpy(), i.numpy(), S, 10, 1e-4 * float(np.abs(S).max()))
    # a row list instead of a slice: positions are relative to the list
    rows = np.arange(1, 200, 2, dtype=np.int64)
    s0 = torch.full((4, 5), float("-inf"))
    i0 = torch.full((4, 5), -1, dtype=torch.int64)
    s2, i2 = fb.exact_topk_update(qn, p_parts, rows, "pcc", widths, product, 5, 0, s0, i0)
    assert_valid_topk(s2.numpy(), i2.numpy(), S[:, rows], 5, 1e-4 * float(np.abs(S).max()))


def test_exact_width_limit():
    q, p = _desc(2, [128], 0), _desc(10, [128], 1)  # 128 * 128 = 16384 Kronecker columns
    with pytest.raises(ValueError, match=r"KRON_MAX_WIDTH.*backend='cpu'.*faiss_ann"):
        _run(fb.exact_topk_update, q, p, 2, "product", "pcc")
    s, i = _run(fb.exact_topk_update, q, p, 2, "sum", "pcc")  # 256 columns: fine
    assert i.shape == (2, 2)


def test_explicit_features_inner_product_is_kernel():
    q, p = _desc(3, [4, 5], 9), _desc(6, [4, 5], 10)
    q_parts, widths, product = segments(q, "product")
    p_parts, _, _ = segments(p, "product")
    qn = normalized_block(q_parts, slice(None), "pcc")
    pn = normalized_block(p_parts, slice(None), "pcc")
    fq, fp = fb.explicit_features(qn, widths, product), fb.explicit_features(pn, widths, product)
    assert fq.shape[1] == fb.explicit_width(widths, product) == 16 + 25
    np.testing.assert_allclose((fq @ fp.T).numpy(), _oracle(q, p, "product", "pcc"), rtol=1e-4, atol=1e-3)


def test_tensor_sketch_is_unbiased():
    x = torch.randn(1, 12)
    y = torch.randn(1, 12)
    want = float((x[:, :6] @ y[:, :6].T) * (x[:, 6:] @ y[:, 6:].T))
    est = [float(fb.tensor_sketch(x, [6, 6], True, 16, s) @ fb.tensor_sketch(y, [6, 6], True, 16, s).T)
           for s in range(400)]
    assert abs(np.mean(est) - want) < 4 * np.std(est) / np.sqrt(len(est)) + 1e-3


@pytest.fixture(scope="module")
def clustered():
    widths = [8, 16]
    return _desc(200, widths, 11, clusters=20), _desc(5000, widths, 12, clusters=20)


def test_ann_recall_and_exact_scores(clustered):
    q, p = clustered
    k = 10
    S = _oracle(q, p, "product", "pcc")
    best = np.argsort(-S, axis=1, kind="stable")[:, :k]
    with fb.ann_params(width=256, nprobe=16, seed=3):
        s, i = _run(fb.ann_topk_update, q, p, k, "product", "pcc")
    assert ((i >= 0) & (i < p.n)).all()
    for row in i:
        assert len(set(row.tolist())) == k
    np.testing.assert_allclose(np.take_along_axis(S, i, 1), s, rtol=0, atol=1e-4 * float(np.abs(S).max()))
    assert (np.diff(s, axis=1) <= 0).all()
    recall = fb.recall_at_k(i, best)
    assert recall >= ANN_RECALL_FLOOR, recall


def test_ann_deterministic_for_seed(clustered):
    q, p = clustered
    with fb.ann_params(seed=5, nprobe=4, candidates=32):
        a = _run(fb.ann_topk_update, q, p, 10, "product", "pcc")
        b = _run(fb.ann_topk_update, q, p, 10, "product", "pcc")
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


@pytest.mark.parametrize("combine", ["sum", "features"])
def test_ann_other_combines_exact_scores(clustered, combine):
    q, p = clustered
    S = _oracle(q, p, combine, "l2")
    with fb.ann_params(width=16, nprobe=8):  # width 16 < 48 / 24 columns: count sketch path
        s, i = _run(fb.ann_topk_update, q, p, 5, combine, "l2")
    np.testing.assert_allclose(np.take_along_axis(S, i, 1), s, rtol=0, atol=1e-5)
    assert fb.recall_at_k(i, np.argsort(-S, axis=1, kind="stable")[:, :5]) >= 0.5


def test_ann_hnsw_and_short_candidate_fallback():
    q, p = _desc(6, [4, 4], 13, clusters=3), _desc(400, [4, 4], 14, clusters=3)
    S = _oracle(q, p, "product", "pcc")
    with fb.ann_params(index="hnsw", ef_search=64):
        s, i = _run(fb.ann_topk_update, q, p, 8, "product", "pcc")
    np.testing.assert_allclose(np.take_along_axis(S, i, 1), s, rtol=0, atol=1e-3)
    # nprobe=1 over many tiny lists leaves some queries short of k: they fall back to the exact search
    with fb.ann_params(nlist=200, nprobe=1, candidates=8):
        s, i = _run(fb.ann_topk_update, q, p, 8, "product", "pcc")
    assert_valid_topk(s, i, S, 8, 1e-4 * float(np.abs(S).max()))


def test_ann_k_equals_n_is_exact():
    q, p = _desc(3, [5], 15), _desc(40, [5], 16)
    S = _oracle(q, p, "product", "pcc")
    s, i = _run(fb.ann_topk_update, q, p, 40, "product", "pcc")
    assert_valid_topk(s, i, S, 40, 1e-4 * float(np.abs(S).max()))


def test_ann_params_validation():
    with pytest.raises(ValueError, match="index"):
        fb.AnnParams(index="lsh")
    with pytest.raises(ValueError, match="nprobe"):
        fb.AnnParams(nprobe=0)


def test_recall_at_k():
    assert fb.recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 1]])) == 1.0
    assert fb.recall_at_k(np.array([[1, 2, -1], [4, 5, 6]]), np.array([[1, 9, 8], [6, 5, 7]])) == pytest.approx(0.5)


def test_ann_cache_reuses_index(clustered):
    q, p = clustered
    fb.clear_cache()
    with fb.ann_params(cache=True):
        a = _run(fb.ann_topk_update, q, p, 5, "product", "pcc")
        entry = fb._CACHE["entry"][1]
        b = _run(fb.ann_topk_update, q, p, 5, "product", "pcc")
        assert fb._CACHE["entry"][1] is entry
    fb.clear_cache()
    np.testing.assert_array_equal(a[1], b[1])


def test_ann_row_list_positions_and_offset():
    q, p = _desc(4, [6, 6], 17, clusters=4), _desc(600, [6, 6], 18, clusters=4)
    S = _oracle(q, p, "product", "pcc")
    rows = np.arange(3, 600, 3, dtype=np.int64)
    q_parts, widths, product = segments(q, "product")
    p_parts, _, _ = segments(p, "product")
    qn = normalized_block(q_parts, slice(None), "pcc")
    s0 = torch.full((4, 7), float("-inf"))
    i0 = torch.full((4, 7), -1, dtype=torch.int64)
    with fb.ann_params(keep_rows=False):  # the gather-and-normalise re-ranking path
        s, i = fb.ann_topk_update(qn, p_parts, rows, "pcc", widths, product, 7, 500, s0, i0)
    pos = i.numpy() - 500
    assert ((pos >= 0) & (pos < len(rows))).all()
    np.testing.assert_allclose(np.take_along_axis(S[:, rows], pos, 1), s.numpy(), rtol=0, atol=1e-3)
