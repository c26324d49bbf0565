"""Every CPU backend against the float64 NumPy oracle and the torch reference.

The computation is written once (`run_case`) and run through each backend,
over combine x normalize x dtype x shapes, on fresh random inputs.
"""

import numpy as np
import pytest
import torch

import pyfk
from pyfk.engine import registry
from pyfk.engine.layout import Layout
from pyfk.engine.topk_state import TopK
from tests.conftest import as_float64, make_arrays, make_descriptors
from tests.oracle import assert_valid_topk, similarity64, tolerance, topk64

SHAPES = [
    # (M, N, widths, k)
    (1, 57, [7], 1),          # M = 1, k = 1, one scale
    (5, 40, [3, 5], 40),      # k = N
    (13, 1001, [7, 33], 8),   # odd widths, N not a multiple of any tile
    (37, 5003, [16, 16], 32), # several pool blocks per thread
    (9, 211, [1, 2, 64], 17), # width-1 scale
]


def run_case(rng, backend, M, N, widths, k, combine, normalize, dtype=np.float32, kind="numpy",
             torch_dtype=None):
    qz, qg = make_arrays(rng, M, widths, dtype)
    pz, pg = make_arrays(rng, N, widths, dtype)
    q = make_descriptors(qz, qg, kind, torch_dtype)
    p = make_descriptors(pz, pg, kind, torch_dtype)
    scores, index = pyfk.topk(q, p, k=k, combine=combine, normalize=normalize, backend=backend)
    # the oracle sees exactly the (possibly rounded) values the kernels saw
    qz64, qg64, pz64, pg64 = (as_float64(x) for x in (q.z, q.g, p.z, p.g))
    S = similarity64(qz64, qg64, pz64, pg64, combine, normalize)
    return scores, index, S, tolerance(qz64, qg64, pz64, pg64, combine, normalize)


@pytest.mark.parametrize("combine", ["product", "sum", "features"])
@pytest.mark.parametrize("normalize", ["pcc", "l2", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}N{s[1]}L{'-'.join(map(str, s[2]))}k{s[3]}")
def test_topk_matches_oracle(rng, backend, combine, normalize, shape):
    M, N, widths, k = shape
    scores, index, S, tol = run_case(rng, backend, M, N, widths, k, combine, normalize)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32
    assert_valid_topk(scores, index, S, k, tol)


@pytest.mark.parametrize("combine", ["product", "sum", "features"])
def test_cpu_every_isa(rng, cpu_isa, combine):
    for M, N, widths, k in SHAPES:
        scores, index, S, tol = run_case(rng, "cpu", M, N, widths, k, combine, "pcc")
        assert_valid_topk(scores, index, S, k, tol)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_numpy_dtypes(rng, backend, dtype):
    scores, index, S, tol = run_case(rng, backend, 11, 300, [7, 33], 9, "product", "pcc", dtype=dtype)
    assert scores.dtype == np.float32 and index.dtype == np.int64
    assert_valid_topk(scores, index, S, 9, tol)


@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_in_torch_out(rng, backend, torch_dtype):
    scores, index, S, tol = run_case(rng, backend, 6, 150, [5, 9], 4, "product", "pcc", kind="torch",
                                     torch_dtype=torch_dtype)
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32
    assert isinstance(index, torch.Tensor) and index.dtype == torch.int64
    assert_valid_topk(scores.numpy(), index.numpy(), S, 4, tol)


@pytest.mark.parametrize("normalize", ["pcc", "l2"])
def test_large_offset_activations(rng, backend, normalize):
    """Post-ReLU-like features with a mean far above their spread: the normalisation
    must not lose the signal to cancellation."""
    if backend == "faiss":
        pytest.skip("33^2 + 1024^2 explicit Kronecker columns exceed faiss.KRON_MAX_WIDTH (by design)")
    z = [(rng.standard_normal((300, L)) * 0.5 + 1000).astype(np.float32) for L in (33, 1024)]
    g = [rng.standard_normal((300, L)).astype(np.float32) for L in (33, 1024)]
    q, p = pyfk.Descriptors([a[:6] for a in z], [a[:6] for a in g]), pyfk.Descriptors(z, g)
    scores, index = pyfk.topk(q, p, k=12, normalize=normalize, backend=backend)
    S = similarity64(q.z, q.g, p.z, p.g, "product", normalize)
    assert_valid_topk(scores, index, S, 12, tolerance(q.z, q.g, p.z, p.g, "product", normalize))


def test_backends_agree_with_reference(rng):
    """Same-precision comparison: fused cpu kernel vs torch reference on one input."""
    qz, qg = make_arrays(rng, 64, [64, 128])
    pz, pg = make_arrays(rng, 3000, [64, 128])
    q, p = pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg)
    ref_s, _ = pyfk.topk(q, p, k=32, backend="torch")
    for b in ("cpu", "torch"):
        s, _ = pyfk.topk(q, p, k=32, backend=b)
        np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("combine", ["product", "sum", "features"])
def test_exact_ties_go_to_smaller_index(rng, backend, combine):
    """Small-integer descriptors with normalize='none' make every score exact in
    float32, so the answer must equal the oracle's lexicographic order exactly."""
    qz, qg = make_arrays(rng, 17, [3, 4], integer=True)
    pz, pg = make_arrays(rng, 700, [3, 4], integer=True)
    q, p = pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg)
    for k in (1, 25, 700):
        scores, index = pyfk.topk(q, p, k=k, combine=combine, normalize="none", backend=backend)
        S = similarity64(qz, qg, pz, pg, combine, "none")
        best, order = topk64(S, k)
        np.testing.assert_array_equal(scores, best)
        np.testing.assert_array_equal(index, order)


@pytest.mark.parametrize("order", ["all_equal", "ascending", "descending"])
def test_adversarial_orders(backend, order):
    """Pool orders that stress the running top-k: every score equal, pool sorted
    from worst to best (each item evicts the last), and best to worst."""
    N, k = 1500, 40
    q = np.ones((3, 4), np.float32)
    if order == "all_equal":
        pool = np.ones((N, 4), np.float32)
    else:
        scale = np.arange(N, dtype=np.float32)[:, None] / N
        pool = np.ones((N, 4), np.float32) * (scale if order == "ascending" else scale[::-1])
    scores, index = pyfk.topk(pyfk.Descriptors([q]), pyfk.Descriptors([pool]), k=k, combine="features",
                              normalize="none", backend=backend)
    S = similarity64([q], None, [pool], None, "features", "none")
    best, expected = topk64(S, k)
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_allclose(scores, best, rtol=1e-6)


def test_chunked_pool_and_exclude(rng, backend, monkeypatch):
    """Many pool chunks (running state merged across calls) and excluded rows."""
    b = registry.get(backend)
    monkeypatch.setattr(b, "chunk_rows", lambda m, width, options: 1000)  # 5 chunks, one state merged across them
    qz, qg = make_arrays(rng, 7, [5, 11])
    pz, pg = make_arrays(rng, 4500, [5, 11])
    q, p = pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg)
    exclude = rng.choice(4500, size=900, replace=False)
    scores, index = pyfk.topk(q, p, k=50, backend=backend, exclude=exclude)
    S = similarity64(qz, qg, pz, pg)
    S[:, exclude] = -np.inf
    assert not np.isin(index, exclude).any()
    tol = tolerance(qz, qg, pz, pg, "product", "pcc")
    assert_valid_topk(scores, index, S, 50, tol)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_cpu_thread_split_is_exact(rng, threads):
    """The per-thread heaps merge to the same answer whatever the split."""
    from pyfk.engine.kernels import cpu as cpu_kernels

    q = torch.from_numpy(rng.standard_normal((23, 24)).astype(np.float32))
    p = torch.from_numpy(rng.standard_normal((9000, 24)).astype(np.float32))
    widths, k = [8, 8, 4, 4], 20
    parts = [p[:, 0:8], p[:, 8:16], p[:, 16:20], p[:, 20:24]]  # strided column views
    s0 = torch.full((23, k), float("-inf"))
    i0 = torch.full((23, k), -1, dtype=torch.int64)
    ref_s, ref_i = pyfk.engine.kernels.torch.topk_update(q, p, widths, True, k, 0, s0.clone(), i0.clone())
    s, i, bad = cpu_kernels.topk_update(q, parts, slice(None), "none", widths, True, k, 0, s0.clone(),
                                        i0.clone(), threads=threads)
    assert bad == [-1] * 4  # no NaN/Inf found in any segment
    np.testing.assert_allclose(s.numpy(), ref_s.numpy(), rtol=1e-5, atol=1e-4)
    # identical scores => identical indices (ties resolve the same way)
    same = s.numpy() == ref_s.numpy()
    assert (i.numpy()[same] == ref_i.numpy()[same]).all()


def test_index_offset_and_seeded_state(rng, backend):
    """Feeding the pool in two halves with an index offset equals one pass (the Backend protocol)."""
    b = registry.resolve(backend, torch.device("cpu"))
    opts = b.resolve_options(None)
    q = torch.from_numpy(rng.standard_normal((5, 12)).astype(np.float32))
    parts = [rng.standard_normal((800, 6)).astype(np.float32) for _ in range(2)]
    k = 30
    pool = b.prepare(parts, Layout((6, 6), "product"), "pcc")
    empty = TopK.empty(5, k)
    whole = b.topk(q, pool, slice(None), k, empty, 0, opts)
    half = b.topk(q, pool, slice(0, 333), k, empty, 0, opts)
    both = b.topk(q, pool, slice(333, 800), k, half, 333, opts)
    assert (empty.index == -1).all(), "a backend must not modify the state it was given"
    rows = np.arange(800)[::-1].copy()  # a row list: positions map to rows 799, 798, ...
    flipped = b.topk(q, pool, rows, k, empty, 0, opts)
    np.testing.assert_allclose(flipped.scores.numpy(), whole.scores.numpy(), rtol=1e-5, atol=1e-4)
    same = flipped.scores.numpy() == whole.scores.numpy()
    assert (799 - flipped.index.numpy()[same] == whole.index.numpy()[same]).all()
    # GEMM blocking may change the last bits between block shapes: compare scores
    # with a tolerance and indices wherever the scores came out identical.
    np.testing.assert_allclose(both.scores.numpy(), whole.scores.numpy(), rtol=1e-5, atol=1e-4)
    same = both.scores.numpy() == whole.scores.numpy()
    assert same.mean() > 0.5
    assert (both.index.numpy()[same] == whole.index.numpy()[same]).all()
    assert (both.index.numpy() >= 0).all()


def test_similarity_dense(rng, backend):
    for combine in ("product", "sum", "features"):
        qz, qg = make_arrays(rng, 9, [7, 33])
        pz, pg = make_arrays(rng, 131, [7, 33])
        R = pyfk.similarity(pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg), combine=combine, backend=backend)
        S = similarity64(qz, qg, pz, pg, combine, "pcc")
        assert R.shape == (9, 131) and R.dtype == np.float32
        np.testing.assert_allclose(R, S, rtol=0, atol=tolerance(qz, qg, pz, pg, combine, "pcc"))


def test_pcc_dot_is_width_times_correlation(rng):
    a, b = rng.standard_normal((1, 50)), rng.standard_normal((1, 50))
    R = pyfk.similarity(pyfk.Descriptors([a]), pyfk.Descriptors([b]), combine="features")
    assert R[0, 0] == pytest.approx(50 * np.corrcoef(a[0], b[0])[0, 1], rel=1e-5)


def test_auto_backend_is_cpu_and_logged(rng, caplog):
    caplog.set_level("INFO", logger="pyfk")
    qz, qg = make_arrays(rng, 2, [4])
    pyfk.topk(pyfk.Descriptors(qz, qg), pyfk.Descriptors(*make_arrays(rng, 10, [4])), k=3)
    assert "chose 'cpu'" in caplog.text


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("combine", ["product", "sum"])
def test_cpu_few_queries_row_path_exact(rng, cpu_isa, m, combine):
    """M <= MR/2 takes the row-wise (GEMV) path of the cpu kernel: exact scores and
    tie order on integer data, fp16 pool rows, a row list, several threads, and the
    dense similarity rows that k-centre / coreset / badge use."""
    from pyfk.engine.kernels import cpu as cpu_kernels

    qz, qg = make_arrays(rng, m, [3, 20], integer=True)
    pz, pg = make_arrays(rng, 3000, [3, 20], dtype=np.float16, integer=True)
    q, p = pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg)
    exclude = rng.choice(3000, size=300, replace=False)
    for threads in (1, 3):
        scores, index = pyfk.topk(q, p, k=40, combine=combine, normalize="none", backend="cpu", exclude=exclude,
                                  options={"threads": threads})
        S = similarity64(qz, qg, pz, pg, combine, "none")
        S[:, exclude] = -np.inf
        best, order = topk64(S, 40)
        np.testing.assert_array_equal(scores, best)
        np.testing.assert_array_equal(index, order)
    R = pyfk.similarity(q, p, combine=combine, normalize="pcc", backend="cpu")
    np.testing.assert_allclose(R, similarity64(qz, qg, pz, pg, combine, "pcc"), rtol=0,
                               atol=tolerance(qz, qg, pz, pg, combine, "pcc"))
    assert cpu_kernels.default_isa() == cpu_isa
