"""The triton backend's v1 kernel (kernel="merge": running top-k merged in registers): on CPU
under the Triton interpreter, on CUDA compiled. The v2 kernel (the default): test_triton_filter.py.

TRITON_INTERPRET=1 must be set before triton is first imported (it is, here,
when no CUDA device is present). The interpreter
runs the xor-reductions inside tl.sort element by element in Python; a fixture
swaps in a NumPy reduction (same result; test_key_spec.fast_interpreter_xor) so
the file stays fast. Shapes are small. The kernel's keys against the key spec:
test_key_spec.py.
"""

import os

import torch  # noqa: E402 - does not import triton

if not torch.cuda.is_available():  # CPU: the interpreter; with a GPU: the compiled kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from pyfk.engine import registry  # noqa: E402
from pyfk.engine.descriptors import normalized_block  # noqa: E402
from pyfk.engine.kernels import torch as reference  # noqa: E402
from pyfk.engine.kernels import triton as tt  # noqa: E402
from pyfk.engine.layout import Layout  # noqa: E402
from pyfk.engine.topk_state import EMPTY_KEY, TopK, pack_keys  # noqa: E402
from tests.conftest import make_arrays  # noqa: E402
from tests.engine.test_key_spec import fast_interpreter_xor  # noqa: E402
from tests.oracle import assert_valid_topk, ordered_pool, similarity64, tolerance, topk64  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if tt.available() is not None:
    pytest.skip(f"triton backend unavailable: {tt.available()}", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
BACKEND = registry.get("triton")


@pytest.fixture(autouse=True, scope="module")
def fast_interpreter_xor_sum():
    """NumPy xor-reduce for the interpreter (its generic reduce loops in Python)."""
    with fast_interpreter_xor():
        yield


def empty_state(m, k):
    return (torch.full((m, k), float("-inf"), device=DEVICE),
            torch.full((m, k), -1, dtype=torch.int64, device=DEVICE))


def segments(z, g, combine):
    if combine == "features":
        return list(z), [a.shape[1] for a in z], False
    parts, widths = [], []
    for a, b in zip(z, g):
        parts += [a, b]
        widths += [a.shape[1], b.shape[1]]
    return parts, widths, combine == "product"


def run_backend(qz, qg, pz, pg, k, combine, normalize="pcc", dtype=torch.float32, splits=None, offset=0,
                state=None, via=None, options=None, **kw):
    """via="backend" (the default when splits is None): the backend's `topk` on a pool of
    torch parts of `dtype` prepared by the backend, with `options` (and `splits`); via=
    "launcher": `topk_update` on normalised tensors. The oracle sees the same rounded values."""
    def to(arrays):
        return [torch.from_numpy(a).to(dtype) for a in arrays]
    qp, widths, product = segments(to(qz), to(qg), combine)
    pp, _, _ = segments(to(pz), to(pg), combine)
    q = normalized_block(qp, slice(None), normalize, device=torch.device(DEVICE))
    s0, i0 = state if state is not None else empty_state(len(qz[0]), k)
    if (via or ("backend" if splits is None else "launcher")) == "backend":
        assert not kw, "tuning arguments go to the launcher only"
        # this file is about the v1 kernel ("merge"); v2 has tests/engine/test_triton_filter.py
        opts = BACKEND.resolve_options({"kernel": "merge", **({"splits": splits} if splits else {}), **(options or {})})
        pool = BACKEND.prepare(pp, Layout(tuple(widths), combine), normalize, device=DEVICE)
        got = BACKEND.topk(q, pool, slice(None), k, TopK(s0, i0), offset, opts)
        s, i = got.scores, got.index
    else:
        p = normalized_block(pp, slice(None), normalize, device=torch.device(DEVICE))
        low = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
        s, i = tt.topk_update(q.to(low), p.to(low), widths, product, k, offset, s0, i0, splits=splits,
                              q_exact=q, p_exact=p, **kw)
    as64 = [[a.double().numpy() for a in to(arrs)] for arrs in (qz, qg, pz, pg)]
    return s.cpu(), i.cpu(), as64


def test_available():
    assert tt.available() is None


@pytest.mark.parametrize("via", ["launcher", "backend"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("combine", ["product", "sum", "features"])
def test_matches_oracle(combine, dtype, via, rng):
    M, N, widths, k = 7, 150, [7, 33], 8  # odd widths; N not a multiple of the tile
    qz, qg = make_arrays(rng, M, widths)
    pz, pg = make_arrays(rng, N, widths)
    s, i, (qz64, qg64, pz64, pg64) = run_backend(qz, qg, pz, pg, k, combine, dtype=dtype, splits=3, via=via)
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    S = similarity64(qz64, qg64, pz64, pg64, combine, "pcc")
    assert_valid_topk(s.numpy(), i.numpy(), S, k, tolerance(qz64, qg64, pz64, pg64, combine, "pcc"))


@pytest.mark.parametrize("shape", [(1, 57, [7], 1, None), (5, 40, [3, 5], 40, 2), (9, 100, [1, 2, 16], 17, 1),
                                   (3, 130, [4], 130, 3)],
                         ids=["M1k1", "k=N", "k17", "k=N>128-fallback"])
def test_shapes(shape, rng):
    M, N, widths, k, splits = shape
    qz, qg = make_arrays(rng, M, widths)
    pz, pg = make_arrays(rng, N, widths)
    s, i, arrs = run_backend(qz, qg, pz, pg, k, "product", splits=splits)
    S = similarity64(*arrs, "product", "pcc")
    assert_valid_topk(s.numpy(), i.numpy(), S, k, tolerance(*arrs, "product", "pcc"))


def test_agrees_with_reference_fp32(rng):
    q = torch.from_numpy(rng.standard_normal((6, 40)).astype(np.float32))
    p = torch.from_numpy(rng.standard_normal((200, 40)).astype(np.float32))
    widths, k = [8, 8, 12, 12], 20
    ref = reference.topk_update(q, p, widths, True, k, 0, *empty_state(6, k))
    got = tt.topk_update(q.to(DEVICE), p.to(DEVICE), widths, True, k, 0, *empty_state(6, k), splits=4)
    np.testing.assert_allclose(got[0].cpu().numpy(), ref[0].numpy(), rtol=1e-5, atol=1e-4)
    same = got[0].cpu().numpy() == ref[0].numpy()
    assert (got[1].cpu().numpy()[same] == ref[1].numpy()[same]).all()


def test_fp16_rerank_returns_exact_fp32_scores(rng):
    """fp16 ranking + fp32 re-ranking equals the fp32 reference on the fp32 rows."""
    q = torch.from_numpy(rng.standard_normal((4, 24)).astype(np.float32))
    p = torch.from_numpy(rng.standard_normal((120, 24)).astype(np.float32))
    widths, k = [12, 12], 6
    ref = reference.topk_update(q, p, widths, True, k, 0, *empty_state(4, k))
    qd, pd = q.to(DEVICE), p.to(DEVICE)
    got = tt.topk_update(qd.half(), pd.half(), widths, True, k, 0, *empty_state(4, k), splits=2,
                         q_exact=qd, p_exact=pd)
    np.testing.assert_allclose(got[0].cpu().numpy(), ref[0].numpy(), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[1].cpu().numpy(), ref[1].numpy())


@pytest.mark.skipif(INTERPRET, reason="the Triton interpreter's tl.dot mishandles bfloat16 operands")
def test_bf16(rng):
    qz, qg = make_arrays(rng, 5, [7, 33])
    pz, pg = make_arrays(rng, 150, [7, 33])
    s, i, arrs = run_backend(qz, qg, pz, pg, 8, "product", dtype=torch.bfloat16)
    S = similarity64(*arrs, "product", "pcc")
    assert_valid_topk(s.numpy(), i.numpy(), S, 8, tolerance(*arrs, "product", "pcc"))


@pytest.mark.parametrize("tile_r", [1, 2])
@pytest.mark.parametrize("combine", ["product", "sum", "features"])
def test_exact_ties_go_to_smaller_index(combine, tile_r, rng):
    """Small-integer descriptors, normalize='none': every score exact in float32."""
    qz, qg = make_arrays(rng, 6, [3, 4], integer=True)
    pz, pg = make_arrays(rng, 100, [3, 4], integer=True)
    S = similarity64(qz, qg, pz, pg, combine, "none")
    for k, splits in ((1, 3), (25, 2), (100, 1)):
        s, i, _ = run_backend(qz, qg, pz, pg, k, combine, normalize="none", splits=splits, tile_r=tile_r)
        best, order = topk64(S, k)
        np.testing.assert_array_equal(s.numpy(), best)
        np.testing.assert_array_equal(i.numpy(), order)


@pytest.mark.parametrize("tile_r", [1, 2])
@pytest.mark.parametrize("order", ["all_equal", "ascending", "descending"])
def test_adversarial_orders(order, tile_r):
    """Every score equal (ties to the smaller index, across splits), pool sorted from
    worst to best (every tile evicts) and best to worst."""
    N, k = 200, 20
    q, pool = ordered_pool(order, N)
    S = similarity64([q], None, [pool], None, "features", "none")
    best, expected = topk64(S, k)
    for splits in (1, 3):
        s, i, _ = run_backend([q], [q], [pool], [pool], k, "features", normalize="none", splits=splits,
                              tile_r=tile_r)
        np.testing.assert_array_equal(i.numpy(), expected)
        np.testing.assert_array_equal(s.numpy(), best)


@pytest.mark.parametrize("via", ["launcher", "backend"])
def test_index_offset_and_incoming_state(via, rng):
    """Two halves with an offset merge into one pass; a huge offset (past int32) too."""
    qz, qg = make_arrays(rng, 5, [3, 4], integer=True)
    pz, pg = make_arrays(rng, 90, [3, 4], integer=True)
    k = 12
    S = similarity64(qz, qg, pz, pg, "product", "none")
    best, order = topk64(S, k)
    first = run_backend(qz, qg, [a[:37] for a in pz], [a[:37] for a in pg], k, "product", "none", splits=2,
                        via=via)
    both = run_backend(qz, qg, [a[37:] for a in pz], [a[37:] for a in pg], k, "product", "none", splits=2,
                       offset=37, state=(first[0].to(DEVICE), first[1].to(DEVICE)), via=via)
    np.testing.assert_array_equal(both[0].numpy(), best)
    np.testing.assert_array_equal(both[1].numpy(), order)
    big = 3_000_000_000
    s, i, _ = run_backend(qz, qg, pz, pg, k, "product", "none", splits=2, offset=big, via=via)
    np.testing.assert_array_equal(i.numpy(), order + big)
    np.testing.assert_array_equal(s.numpy(), best)


def test_fewer_pool_rows_than_k_leaves_empty_slots(rng):
    qz, qg = make_arrays(rng, 2, [5])
    pz, pg = make_arrays(rng, 3, [5])
    s, i, _ = run_backend(qz, qg, pz, pg, 6, "product", splits=1)
    assert (i[:, :3] >= 0).all() and (i[:, 3:] == -1).all()
    assert torch.isinf(s[:, 3:]).all()


def test_similarity_and_chunk_rows(rng):
    q = torch.from_numpy(rng.standard_normal((3, 10)).astype(np.float32))
    p = torch.from_numpy(rng.standard_normal((7, 10)).astype(np.float32))
    np.testing.assert_allclose(tt.similarity(q, p, [5, 5], True).numpy(),
                               reference.similarity(q, p, [5, 5], True).numpy())
    assert tt.chunk_rows(10, 100) >= 4096


def test_backend_options():
    """kernel / precision / splits / allow_tf32 and v2's launch options are backend options
    (pyfk.topk(..., options=...)), checked up front (kernel, precision and the launch options:
    tests/engine/test_triton_filter.py)."""
    defaults = {"kernel": "filter", "precision": None, "splits": None, "allow_tf32": False, "block_m": None,
                "block_n": None, "group_m": None, "num_warps": None, "num_stages": None, "programs": None}
    assert BACKEND.options == defaults
    assert BACKEND.resolve_options(None) == defaults
    assert BACKEND.resolve_options({"splits": 4}) == {**defaults, "splits": 4}
    with pytest.raises(ValueError, match="unknown.*'tile'"):
        BACKEND.resolve_options({"tile": 3})
    for bad in (0, -2, 1.5, "4", True):
        with pytest.raises(ValueError, match="splits: expected None or a positive integer"):
            BACKEND.resolve_options({"splits": bad})
    with pytest.raises(ValueError, match="allow_tf32: expected True or False"):
        BACKEND.resolve_options({"allow_tf32": "yes"})


@pytest.mark.parametrize("options", [{"kernel": "filter"}, {}, {"splits": 1}, {"splits": 5}, {"allow_tf32": True},
                                     {"kernel": "filter", "allow_tf32": True}],
                         ids=["v2", "v1", "v1-splits1", "v1-splits5", "v1-tf32", "v2-tf32"])
def test_backend_options_keep_the_exact_answer(options, rng):
    """Small-integer data is exact in float32 and in TF32 (<= 11 significant bits): every
    option setting gives the one tie-stable answer, through the backend's topk."""
    qz, qg = make_arrays(rng, 4, [3, 4], integer=True)
    pz, pg = make_arrays(rng, 120, [3, 4], integer=True)
    S = similarity64(qz, qg, pz, pg, "product", "none")
    best, order = topk64(S, 10)
    s, i, _ = run_backend(qz, qg, pz, pg, 10, "product", "none", via="backend", options=options)
    np.testing.assert_array_equal(i.numpy(), order)
    np.testing.assert_array_equal(s.numpy(), best)


def test_kernel_keys_are_sorted_split_top_lists(rng):
    """The raw kernel output: per split, the K_PAD best keys of its pool tiles, sorted
    descending, EMPTY_KEY-padded; merged over splits, the exact top-k keys."""
    q = torch.from_numpy(rng.integers(-2, 3, (3, 8)).astype(np.float32)).to(DEVICE)
    p = torch.from_numpy(rng.integers(-2, 3, (70, 8)).astype(np.float32)).to(DEVICE)
    widths, k = [4, 4], 5
    keys = tt.kernel_keys(q, p, widths, True, k, 100, splits=3).cpu()
    assert keys.dtype == torch.int64 and keys.shape[0] == 3 and keys.shape[2] == 16 and keys.shape[1] <= 3
    assert (keys[..., :-1] >= keys[..., 1:]).all()
    S = reference.similarity(q.cpu().double(), p.cpu().double(), widths, True).float()
    want = pack_keys(S, torch.arange(100, 170).expand(3, -1)).topk(k, dim=1).values
    assert torch.equal(keys.reshape(3, -1).topk(k, dim=1).values, want)
    empty = tt.kernel_keys(q, p[:0], widths, True, k, 0)
    assert empty.shape == (3, 1, 16) and (empty == EMPTY_KEY).all()


@pytest.mark.parametrize("combine", ["product", "sum", "features"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(1, 57, [7], 1), (4, 41, [3, 5], 41), (6, 90, [1, 2, 9], 5)],
                         ids=["M1-1scale-k1", "k=N-odd", "3scales"])
def test_public_api(shape, dtype, combine, rng):
    """pyfk.topk / pyfk.select with backend="triton" -- on CPU tensors under the interpreter, on
    CUDA compiled -- against the float64 oracle (ties tolerated), the same call users make."""
    import pyfk

    M, N, widths, k = shape
    qz, qg = make_arrays(rng, M, widths)
    pz, pg = make_arrays(rng, N, widths)
    cast = [[torch.from_numpy(a.astype(dtype)).to(DEVICE) for a in arrs] for arrs in (qz, qg, pz, pg)]
    q = pyfk.Descriptors(z=cast[0], g=None if combine == "features" else cast[1])
    p = pyfk.Descriptors(z=cast[2], g=None if combine == "features" else cast[3])
    s, i = pyfk.topk(q, p, k=k, combine=combine, backend="triton")
    as64 = [[a.double().cpu().numpy() for a in arrs] for arrs in cast]
    S = similarity64(*as64, combine, "pcc")
    assert_valid_topk(np.asarray(s), np.asarray(i), S, k, tolerance(*as64, combine, "pcc"))
    ref_s, ref_i = pyfk.topk(q, p, k=k, combine=combine, backend="torch")
    np.testing.assert_allclose(np.asarray(s), np.asarray(ref_s), rtol=1e-5, atol=1e-5)


def test_public_api_device_rules():
    """"auto" never picks the interpreter for CPU tensors, and CPU stays out of the backend's
    `devices` (the every-CPU-backend tests do not run the interpreter)."""
    import pyfk

    assert "cpu" not in BACKEND.devices and BACKEND.accepts("cuda")
    assert BACKEND.accepts("cpu") == INTERPRET
    assert registry.auto_choice("cpu") != "triton"
    info = next(b for b in pyfk.backends() if b["name"] == "triton")
    assert info["interpreter"] == INTERPRET


def test_runtime_ints_are_not_specialised():
    """The integers that change between calls on one pool are kernel arguments by those names, and
    the compiled kernel does not specialise on them (no recompiles inside timed loops)."""
    import inspect

    names = list(inspect.signature(tt._fk_topk_kernel).parameters)
    assert set(tt.RUNTIME_INTS) <= set(names)
    assert not {"D", "stride_qm", "stride_pn"} & set(tt.RUNTIME_INTS)  # fixed per pool: kept specialised
    if not INTERPRET:
        flagged = {p.name for p in tt._kernel().params if p.do_not_specialize}
        assert flagged == set(tt.RUNTIME_INTS)
