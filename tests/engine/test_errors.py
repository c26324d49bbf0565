"""DESIGN.md section 7: bad inputs raise ValueError/TypeError naming the argument,
and change nothing."""

import numpy as np
import pytest
import torch

import pyfk
from tests.conftest import make_arrays


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    qz, qg = make_arrays(rng, 4, [5, 6])
    pz, pg = make_arrays(rng, 30, [5, 6])
    return pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg)


def test_nan_and_inf_rejected_without_mutation(data, backend):
    q, p = data
    for bad in (np.nan, np.inf, -np.inf):
        z = [a.copy() for a in p.z]
        g = [a.copy() for a in p.g]
        g[1][7, 2] = bad
        before = [a.copy() for a in z + g]
        with pytest.raises(ValueError, match=r"pool: g\[1\] contains NaN or Inf"):
            pyfk.topk(q, pyfk.Descriptors(z, g), k=3, backend=backend)
        for a, b in zip(z + g, before):
            np.testing.assert_array_equal(a, b)
    qz = [a.copy() for a in q.z]
    qz[0][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"queries: z\[0\]"):
        pyfk.topk(pyfk.Descriptors(qz, q.g), p, k=3, backend=backend)
    with pytest.raises(ValueError, match=r"val: z\[0\]"):
        pyfk.select(p, pyfk.Descriptors(qz, q.g), budget=2, k=3, backend=backend)


def test_mismatched_scales_and_widths(data):
    q, p = data
    with pytest.raises(ValueError, match="pool: expected 2 scales"):
        pyfk.topk(q, pyfk.Descriptors(p.z[:1], p.g[:1]), k=3)
    with pytest.raises(ValueError, match=r"pool: expected scale widths \[5, 6\]"):
        pyfk.topk(q, pyfk.Descriptors([p.z[0], p.z[0]], [p.g[0], p.g[0]]), k=3)
    with pytest.raises(ValueError, match=r"g\[0\]: expected width 5"):
        pyfk.Descriptors([np.zeros((3, 5), np.float32)], [np.zeros((3, 4), np.float32)])
    with pytest.raises(ValueError, match=r"g\[0\]: expected 3 rows"):
        pyfk.Descriptors([np.zeros((3, 5), np.float32)], [np.zeros((2, 5), np.float32)])
    with pytest.raises(ValueError, match="g: expected 1 scales"):
        pyfk.Descriptors([np.zeros((3, 5), np.float32)], [np.zeros((3, 5), np.float32)] * 2)


def test_empty_pool_and_queries(data):
    q, p = data
    empty = pyfk.Descriptors([a[:0] for a in p.z], [a[:0] for a in p.g])
    with pytest.raises(ValueError, match="pool: expected a non-empty pool"):
        pyfk.topk(q, empty, k=1)
    with pytest.raises(ValueError, match="pool: expected a non-empty pool"):
        pyfk.select(empty, q, budget=1, k=1)
    with pytest.raises(ValueError, match="queries: expected at least one row"):
        pyfk.topk(pyfk.Descriptors([a[:0] for a in q.z], [a[:0] for a in q.g]), p, k=1)
    with pytest.raises(ValueError, match="z: expected at least one scale"):
        pyfk.Descriptors([])


@pytest.mark.parametrize("k, exc, msg", [
    (31, ValueError, r"k: expected an integer in \[1, 30\]"),
    (0, ValueError, r"k: expected an integer in \[1, 30\]"),
    (-2, ValueError, r"k: expected an integer in \[1, 30\]"),
    (2.5, TypeError, "k: expected an integer, got float"),
    ("3", TypeError, "k: expected an integer, got str"),
    (True, TypeError, "k: expected an integer, got bool"),
    (None, TypeError, "k: expected an integer"),
])
def test_bad_k(data, k, exc, msg):
    q, p = data
    with pytest.raises(exc, match=msg):
        pyfk.topk(q, p, k=k)


def test_k_numpy_integer_accepted(data):
    q, p = data
    s, i = pyfk.topk(q, p, k=np.int64(30))  # k == N is allowed
    assert s.shape == (4, 30)


def test_k_larger_than_pool_after_exclusion(data):
    q, p = data
    with pytest.raises(ValueError, match=r"k: expected an integer in \[1, 20\] \(the available pool size\)"):
        pyfk.topk(q, p, k=21, exclude=np.arange(10))


def test_budget(data):
    q, p = data
    with pytest.raises(ValueError, match=r"budget: expected an integer in \[1, 25\]"):
        pyfk.select(p, q, budget=26, k=3, exclude=np.arange(5))
    with pytest.raises(ValueError, match=r"budget: expected an integer in \[1, 30\]"):
        pyfk.select(p, q, budget=0, k=3)
    with pytest.raises(TypeError, match="budget: expected an integer"):
        pyfk.select(p, q, budget=2.0, k=3)


@pytest.mark.parametrize("bad, exc, msg", [
    ([1, 1, 2], ValueError, r"exclude: expected distinct indices, got duplicates \[1\]"),
    ([3, 30], ValueError, r"exclude: expected indices in \[0, 30\), got \[30\]"),
    ([-1], ValueError, r"exclude: expected indices in \[0, 30\), got \[-1\]"),
    ([0.5], TypeError, "exclude: expected a 1-D array of integer indices"),
    ([[1, 2]], TypeError, "exclude: expected a 1-D array of integer indices"),
])
def test_bad_exclude(data, bad, exc, msg):
    q, p = data
    with pytest.raises(exc, match=msg):
        pyfk.topk(q, p, k=2, exclude=bad)
    with pytest.raises(exc, match=msg):
        pyfk.select(p, q, budget=2, k=2, exclude=bad)


def test_everything_excluded(data):
    q, p = data
    with pytest.raises(ValueError, match="exclude: every pool row is excluded"):
        pyfk.topk(q, p, k=1, exclude=np.arange(30))


@pytest.mark.parametrize("arr, exc, msg", [
    (np.zeros((3, 4), np.int64), TypeError, r"z\[0\]: expected a float16/float32/float64 array, got dtype int64"),
    (np.zeros((3, 4), bool), TypeError, r"z\[0\]: expected a float16/float32/float64 array, got dtype bool"),
    (np.zeros((3, 4), np.complex64), TypeError, r"z\[0\]: expected a float16/float32/float64 array"),
    (torch.zeros((3, 4), dtype=torch.int32), TypeError, r"z\[0\]: expected a float16/bfloat16/float32/float64"),
    (np.zeros(4, np.float32), ValueError, r"z\[0\]: expected a 2-D array"),
    ([[1.0, 2.0]], TypeError, r"z\[0\]: expected a NumPy array or torch tensor, got list"),
])
def test_wrong_dtypes_and_shapes(arr, exc, msg):
    with pytest.raises(exc, match=msg):
        pyfk.Descriptors([arr])


def test_mixed_kinds(data):
    q, p = data
    tp = pyfk.Descriptors([torch.from_numpy(a) for a in p.z], [torch.from_numpy(a) for a in p.g])
    with pytest.raises(TypeError, match="queries/pool: expected both NumPy or both torch"):
        pyfk.topk(q, tp, k=2)
    with pytest.raises(TypeError, match="z/g: expected all NumPy arrays or all torch tensors"):
        pyfk.Descriptors([p.z[0]], [torch.from_numpy(p.g[0])])


def test_missing_gradients(data):
    q, p = data
    features_only = pyfk.Descriptors(p.z)
    with pytest.raises(ValueError, match="pool: combine='product' needs gradients g"):
        pyfk.topk(q, features_only, k=2)
    s, _ = pyfk.topk(pyfk.Descriptors(q.z), features_only, k=2, combine="features")
    assert s.shape == (4, 2)


def test_bad_modes_and_backends(data):
    q, p = data
    with pytest.raises(ValueError, match="combine: expected one of"):
        pyfk.topk(q, p, k=2, combine="hadamard")
    with pytest.raises(ValueError, match="normalize: expected one of"):
        pyfk.topk(q, p, k=2, normalize="zscore")
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        pyfk.topk(q, p, k=2, backend="gpu")
    with pytest.raises(TypeError, match="backend: expected a backend name"):
        pyfk.topk(q, p, k=2, backend=3)


def test_unavailable_backend_names_the_missing_piece(data, monkeypatch):
    from pyfk.engine import backend

    class Missing(backend.Backend):
        name, devices, description = "missing_piece", ("cpu",), "test double"

        def unavailable_reason(self):
            return "the test double's library is not installed"

        def topk(self, queries, pool, rows, k, state, offset, options):
            raise AssertionError("never called")

    monkeypatch.setitem(backend.REGISTRY, "missing_piece", Missing())
    q, p = data
    listed = {b["name"]: b for b in pyfk.backends()}
    assert listed["missing_piece"]["available"] is False
    assert listed["missing_piece"]["reason"] == "the test double's library is not installed"
    with pytest.raises(pyfk.BackendUnavailable, match="backend: 'missing_piece' is not available here: the test"):
        pyfk.topk(q, p, k=2, backend="missing_piece")
    # the real backends missing on this machine (none on a fully equipped one) say why, too
    for b in [b for b in pyfk.backends() if not b["available"]]:
        with pytest.raises(pyfk.BackendUnavailable, match=f"backend: '{b['name']}' is not available here: .+"):
            pyfk.topk(q, p, k=2, backend=b["name"])


def test_cuda_only_backend_on_cpu_tensors_when_available(data, monkeypatch):
    from pyfk.engine import backend

    class FakeGpu(backend.Backend):
        name, devices, description = "fake_gpu", ("cuda",), "test double"

        def unavailable_reason(self):
            return None

        def topk(self, queries, pool, rows, k, state, offset, options):
            raise AssertionError("never called: the device check comes first")

    q, p = data
    monkeypatch.setitem(backend.REGISTRY, "fake_gpu", FakeGpu())
    with pytest.raises(ValueError, match=r"backend: 'fake_gpu' expected tensors on \['cuda'\], got tensors on cpu"):
        pyfk.topk(q, p, k=2, backend="fake_gpu")


def test_backend_options_are_checked(data):
    q, p = data
    with pytest.raises(ValueError, match=r"options: backend 'torch' accepts no options, got unknown \['threads'\]"):
        pyfk.topk(q, p, k=2, backend="torch", options={"threads": 2})
    with pytest.raises(ValueError,
                       match=r"options: backend 'cpu' accepts \['isa', 'split', 'threads'\], got unknown \['isas'\]"):
        pyfk.topk(q, p, k=2, backend="cpu", options={"isas": "avx2"})
    with pytest.raises(TypeError, match="options: expected a dict of backend options, got list"):
        pyfk.topk(q, p, k=2, backend="cpu", options=["threads"])
    with pytest.raises(ValueError, match="isa: expected 'auto', 'avx512', 'avx2' or 'generic', got 'neon'"):
        pyfk.topk(q, p, k=2, backend="cpu", options={"isa": "neon"})


def test_labels_shape_and_dtype(data):
    q, p = data
    with pytest.raises(ValueError, match=r"val_labels: expected shape \(4,\)"):
        pyfk.select(p, q, budget=2, k=3, val_labels=np.zeros(3, int), val_pred=np.zeros(4, int))
    with pytest.raises(TypeError, match="val_pred: expected integer class labels"):
        pyfk.select(p, q, budget=2, k=3, val_labels=np.zeros(4, int), val_pred=np.zeros(4))
    with pytest.raises(ValueError, match="val_labels/val_pred: give both"):
        pyfk.select(p, q, budget=2, k=3, val_labels=np.zeros(4, int))


def test_not_descriptors():
    with pytest.raises(TypeError, match="queries: expected pyfk.Descriptors, a DescriptorStore or an Extraction, got "
                                        "ndarray"):
        pyfk.topk(np.zeros((2, 3)), np.zeros((4, 3)), k=1)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, "torch32", "torch_bf16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_every_dtype(dtype, bad):
    a = np.ones((50, 9))
    a[37, 4] = bad
    if dtype == "torch32":
        arr = torch.from_numpy(a.astype(np.float32))
    elif dtype == "torch_bf16":
        arr = torch.from_numpy(a).to(torch.bfloat16)
    else:
        arr = a.astype(dtype)
    q = pyfk.Descriptors([arr[:2]])
    with pytest.raises(ValueError, match=r"pool: z\[0\] contains NaN or Inf"):
        pyfk.topk(q, pyfk.Descriptors([arr]), k=2, combine="features")


def test_float64_beyond_float32_range():
    a = np.full((4, 3), 1e300)  # finite in float64, inf once the kernels cast to float32
    with pytest.raises(ValueError, match=r"queries: z\[0\] holds values beyond the float32 range"):
        pyfk.topk(pyfk.Descriptors([a]), pyfk.Descriptors([a]), k=2, combine="features")


def test_large_float64_within_float32_range_is_fine(rng):
    a = rng.standard_normal((6, 3)) * 1e30  # float64 sum is fine, values fit in float32
    s, _ = pyfk.topk(pyfk.Descriptors([a]), pyfk.Descriptors([a]), k=2, combine="features")
    assert np.isfinite(s).all()


def test_huge_finite_float32_values_are_not_flagged():
    """The fast check's float32 sum overflows here; the exact fallback must accept the data."""
    a = np.full((8, 3), 3e38, np.float32)
    a[::2] *= -1
    pyfk.Descriptors([a]).check_finite("pool")
    b = a.copy()
    b[5, 1] = np.inf
    with pytest.raises(ValueError, match=r"pool: z\[0\] contains NaN or Inf"):
        pyfk.Descriptors([b]).check_finite("pool")
