"""Issue #9 items 5, 6, 10, 11, 12 on the engine side: values near the float32 range,
tensors that require grad, masked arrays, the default k of select, wrapped indices and
a k whose state cannot fit in memory."""

import numpy as np
import pytest
import torch

import pyfk
from tests.conftest import make_arrays
from tests.oracle import assert_valid_topk, similarity64, tolerance


@pytest.mark.parametrize("normalize", ["pcc", "l2"])
@pytest.mark.parametrize("scale", [3e19, 1e30, 1e37])
def test_values_whose_squares_overflow_are_normalised_exactly(rng, backend, cpu_isa, normalize, scale):
    """|x| > ~1.8e19: x*x overflows float32. pcc/l2 are scale-invariant, so the answer must be
    the oracle's on the unscaled values (before: whole scales zeroed, wrong neighbours)."""
    qz, qg = make_arrays(rng, 6, [9, 33])
    pz, pg = make_arrays(rng, 400, [9, 33])
    big = [(a * scale).astype(np.float32) for a in pz]  # only z is huge: g stays ordinary
    qbig = [(a * scale).astype(np.float32) for a in qz]
    scores, index = pyfk.topk(pyfk.Descriptors(qbig, qg), pyfk.Descriptors(big, pg), k=7, normalize=normalize,
                              backend=backend)
    S = similarity64(qz, qg, pz, pg, "product", normalize)
    assert np.isfinite(scores).all() and (index >= 0).all()
    assert_valid_topk(scores, index, S, 7, 2 * tolerance(qz, qg, pz, pg, "product", normalize))


@pytest.mark.parametrize("combine", ["product", "sum", "features"])
def test_none_mode_rejects_unrepresentable_products(rng, combine):
    qz, qg = make_arrays(rng, 3, [4, 5])
    pz, pg = make_arrays(rng, 30, [4, 5])
    pz[1] = pz[1] * 1e20  # scale 1's z: z.z' up to ~1e20 x |q| -> R beyond float32
    pz[1] = pz[1].astype(np.float32)
    p = pyfk.Descriptors(pz, pg)
    qz2 = [a * 1e19 for a in qz]
    q2 = pyfk.Descriptors([a.astype(np.float32) for a in qz2], qg)
    for call in (lambda: pyfk.topk(q2, p, k=3, combine=combine, normalize="none"),
                 lambda: pyfk.similarity(q2, p, combine=combine, normalize="none"),
                 lambda: pyfk.select(p, q2, budget=2, combine=combine, normalize="none")):
        with pytest.raises(ValueError, match=r"(queries|pool|val): with normalize='none', the values of scale 1 "
                                             r"\(z\[1\]\) give similarities up to .* beyond the float32 range"):
            call()
    # large but representable values pass, exactly as before
    ok = pyfk.Descriptors([(a * 1e8).astype(np.float32) for a in qz], qg)
    s, _ = pyfk.topk(ok, pyfk.Descriptors([(a * 1e8).astype(np.float32) for a in make_arrays(rng, 30, [4, 5])[0]],
                                          pg), k=3, combine=combine, normalize="none")
    assert np.isfinite(s).all()


def test_tensors_that_require_grad_are_accepted(rng, backend):
    qz, qg = make_arrays(rng, 5, [6, 7])
    pz, pg = make_arrays(rng, 90, [6, 7])
    grad = [[torch.from_numpy(a).requires_grad_() for a in arrays] for arrays in (qz, qg, pz, pg)]
    q, p = pyfk.Descriptors(grad[0], grad[1]), pyfk.Descriptors(grad[2], grad[3])
    s, i = pyfk.topk(q, p, k=4, backend=backend)
    s_ref, i_ref = pyfk.topk(pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg), k=4, backend=backend)
    np.testing.assert_array_equal(i.numpy(), i_ref)
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-6, atol=1e-6)
    R = pyfk.similarity(q, p, backend=backend)
    assert not R.requires_grad
    chosen = pyfk.select(p, q, budget=3, backend=backend)
    assert len(chosen) == 3
    assert all(t.requires_grad and t.grad is None for arrays in grad for t in arrays)  # inputs untouched


def test_masked_arrays_are_refused(rng):
    z = rng.standard_normal((10, 4))
    masked = np.ma.masked_array(z, mask=np.zeros_like(z, dtype=bool))
    masked[3, 1] = np.ma.masked
    with pytest.raises(TypeError, match=r"z\[0\]: expected a plain NumPy array or torch tensor, got a NumPy masked"):
        pyfk.Descriptors([masked])
    d = pyfk.Descriptors([z])
    with pytest.raises(TypeError, match="exclude: expected a plain array, got a NumPy masked array"):
        pyfk.topk(d, d, k=2, combine="features", exclude=np.ma.masked_array([1, 2], mask=[False, True]))
    probs = np.full((10, 3), 1 / 3)
    with pytest.raises(TypeError, match="pool.probs: expected a plain array, got a NumPy masked array"):
        pyfk.acquire("entropy", pyfk.PoolInputs(probs=np.ma.masked_array(probs)), budget=2)
    with pytest.raises(TypeError, match="val_labels: expected a plain array, got a NumPy masked array"):
        pyfk.select(d, d, budget=2, combine="features", val_labels=np.ma.masked_array(np.zeros(10, int)),
                    val_pred=np.ones(10, int))


def test_select_default_k_is_clamped_to_a_small_pool(rng):
    vz, vg = make_arrays(rng, 8, [3, 5])
    pz, pg = make_arrays(rng, 20, [3, 5])
    pool, val = pyfk.Descriptors(pz, pg), pyfk.Descriptors(vz, vg)
    chosen = pyfk.select(pool, val, budget=3)  # default k: 32 > 20 rows
    assert len(set(chosen.tolist())) == 3
    chosen = pyfk.select(pool, val, budget=3, exclude=np.arange(10))  # 10 left
    assert len(chosen) == 3 and chosen.min() >= 10
    sel = pyfk.acquire("pfk", pyfk.PoolInputs(descriptors=pool), budget=3, val=pyfk.ValInputs(descriptors=val))
    assert len(sel.indices) == 3
    with pytest.raises(ValueError, match=r"k: expected an integer in \[1, 20\]"):
        pyfk.select(pool, val, budget=3, k=32)  # an explicit k is not clamped


def test_uint64_indices_are_reported_unwrapped():
    d = pyfk.Descriptors([np.eye(4)])
    with pytest.raises(ValueError, match=r"exclude: expected indices in \[0, 4\), got \[9223372036854775811\]"):
        pyfk.topk(d, d, k=1, combine="features", exclude=np.array([2**63 + 3], dtype=np.uint64))
    s, i = pyfk.topk(d, d, k=1, combine="features", normalize="none", exclude=np.array([0], dtype=np.uint64))
    assert 0 not in i


def test_k_whose_state_cannot_fit_in_memory(rng):
    q = pyfk.Descriptors([rng.standard_normal((2000, 1)).astype(np.float32)])
    p = pyfk.Descriptors([np.zeros((4_000_000, 1), np.float32)])
    with pytest.raises(ValueError, match=r"k: expected a k whose \(2000 x k\) top-k state fits in memory"):
        pyfk.topk(q, p, k=4_000_000, combine="features")


def test_one_row_and_one_column_views_with_negative_strides(rng, backend):
    """NumPy flags a one-row view with a negative stride contiguous; torch and the C++ kernel
    refused it. Such views are valid input and must give the oracle's answer."""
    x = rng.standard_normal((1, 5)).astype(np.float32)
    one_row = x[::-1].copy()[::-1]  # shape (1, 5), row stride negative
    assert one_row.strides[0] < 0
    col = rng.standard_normal((40, 1)).astype(np.float32)[:, ::-1]  # one column, negative column stride
    pool = rng.standard_normal((30, 5)).astype(np.float32)
    q = pyfk.Descriptors([one_row], [one_row])
    s, i = pyfk.topk(q, pyfk.Descriptors([pool], [pool]), k=3, backend=backend)
    S = similarity64([x], [x], [pool], [pool])
    assert_valid_topk(s, i, S, 3, tolerance([x], [x], [pool], [pool], "product", "pcc"))
    s, i = pyfk.topk(pyfk.Descriptors([pool[:2]]), pyfk.Descriptors([one_row]), k=1, combine="features",
                     backend=backend)
    assert i.tolist() == [[0], [0]]
    R = pyfk.similarity(pyfk.Descriptors([col[:3]]), pyfk.Descriptors([col]), combine="features",
                        normalize="none", backend=backend)
    np.testing.assert_allclose(R, col[:3].astype(np.float64) @ col.T.astype(np.float64), rtol=1e-6)


def test_select_k_centre_on_values_beyond_float32_is_refused(rng):
    vz, vg = make_arrays(rng, 10, [4])
    pz, pg = make_arrays(rng, 50, [4])
    val = pyfk.Descriptors([(vz[0] * 1e30).astype(np.float32)], vg)
    pool = pyfk.Descriptors([(pz[0] * 1e-30).astype(np.float32)], pg)  # val x pool representable, val x val not
    with pytest.raises(ValueError, match=r"val: with normalize='none', the values of scale 0 \(z\[0\]\)"):
        pyfk.select(pool, val, budget=2, normalize="none", use_all=True)


@pytest.mark.parametrize("bad", [-1, 0, "2", 2.5, True, [2]])
def test_cpu_threads_option_is_checked(rng, bad):
    d = pyfk.Descriptors([rng.standard_normal((5, 3))])
    with pytest.raises(ValueError, match="options: 'threads' expected None or a positive integer"):
        pyfk.topk(d, d, k=2, combine="features", backend="cpu", options={"threads": bad})


def test_sparse_tensors_and_non_bool_flags_are_refused(rng):
    z = torch.from_numpy(rng.standard_normal((6, 3)))
    with pytest.raises(TypeError, match=r"z\[0\]: expected a dense \(strided\) torch tensor, got layout"):
        pyfk.Descriptors([z.to_sparse()])
    d = pyfk.Descriptors([z], [z])
    with pytest.raises(TypeError, match="use_all: expected True or False, got str 'no'"):
        pyfk.select(d, d, budget=2, use_all="no")
    with pytest.raises(TypeError, match="use_all: expected True or False"):
        pyfk.acquire("pfk", pyfk.PoolInputs(descriptors=d), budget=2, val=pyfk.ValInputs(descriptors=d),
                     use_all="no")
