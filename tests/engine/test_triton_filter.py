"""The triton backend's v2 kernel (threshold, filter, re-score: pyfk/engine/kernels/_triton_filter.py),
on CPU under the Triton interpreter, on CUDA compiled.

Every search goes through the backend with its default options (kernel="filter") and is held
to the float64 oracle (tie-tolerant) or, on small-integer data where every score is exact, to
the exact tie-stable answer. The kernel's per-element bounds (`error_table`) are checked against
the float32 re-scores; the overflow and give-up paths are forced by shrinking the candidate buffer.
"""

import os

import torch  # noqa: E402 - does not import triton

if not torch.cuda.is_available():  # CPU: the interpreter; with a GPU: the compiled kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

import pyfk  # noqa: E402
from pyfk.engine import backend as backend_module  # noqa: E402
from pyfk.engine import registry  # noqa: E402
from pyfk.engine.backend import PreparedPool  # noqa: E402
from pyfk.engine.descriptors import normalized_block  # noqa: E402
from pyfk.engine.kernels import _triton_filter as tf  # noqa: E402
from pyfk.engine.kernels import triton as tt  # noqa: E402
from pyfk.engine.layout import Layout  # noqa: E402
from pyfk.engine.topk_state import TopK  # noqa: E402
from tests.conftest import make_arrays  # noqa: E402
from tests.oracle import assert_valid_topk, ordered_pool, similarity64, tolerance, topk64  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if tt.available() is not None:
    pytest.skip(f"triton backend unavailable: {tt.available()}", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
BACKEND = registry.get("triton")
SMALL_TILES = dict(block_m=16, block_n=16, group_m=2, num_warps=4, num_stages=2)  # many tiles on small inputs
SMALL = tf.Config(**SMALL_TILES)


def descriptors(z, g, combine, dtype=torch.float32):
    t = [torch.from_numpy(a).to(dtype).to(DEVICE) for a in z]
    u = None if combine == "features" else [torch.from_numpy(a).to(dtype).to(DEVICE) for a in g]
    return pyfk.Descriptors(z=t, g=u)


def search(qz, qg, pz, pg, k, combine, normalize="pcc", dtype=torch.float32, options=None, exclude=None):
    """pyfk.topk through the triton backend (v2 by default) -> (scores, index) as NumPy, and the
    float64 copies of the inputs the oracle should see."""
    q = descriptors(qz, qg, combine, dtype)
    p = descriptors(pz, pg, combine, dtype)
    s, i = pyfk.topk(q, p, k=k, combine=combine, normalize=normalize, backend="triton", options=options,
                     exclude=exclude)
    as64 = [[a.double().cpu().numpy() for a in arrs] for arrs in (q.z, q.g or q.z, p.z, p.g or p.z)]
    return s.cpu().numpy(), i.cpu().numpy(), as64


def prepared(rng, m, n, widths, combine, normalize="pcc", scale=1.0):
    lay = Layout(tuple(widths) if combine == "features" else tuple(w for w in widths for _ in (0, 1)), combine)
    parts = [torch.from_numpy((scale * rng.standard_normal((n, w))).astype(np.float32)).to(DEVICE)
             for w in lay.widths]
    qparts = [torch.from_numpy((scale * rng.standard_normal((m, w))).astype(np.float32)).to(DEVICE)
              for w in lay.widths]
    return PreparedPool(parts, lay, normalize), normalized_block(qparts, slice(None), normalize)


def test_default_is_v2():
    assert BACKEND.resolve_options(None)["kernel"] == "filter"
    assert BACKEND.chunk_rows(10, 64, BACKEND.resolve_options(None)) >= 1 << 40  # one launch over the pool


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("combine", ["product", "sum", "features"])
@pytest.mark.parametrize("shape", [(7, 150, [7, 33], 8), (1, 57, [7], 1), (5, 40, [3, 5], 40), (9, 300, [1, 2, 16], 17),
                                   (3, 200, [4], 130)],
                         ids=["odd-widths", "M1-k1", "k=N", "3-scales", "k>128"])
def test_matches_oracle(shape, combine, dtype, rng):
    M, N, widths, k = shape
    qz, qg = make_arrays(rng, M, widths)
    pz, pg = make_arrays(rng, N, widths)
    s, i, arrs = search(qz, qg, pz, pg, k, combine, dtype=dtype)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == (M, k)
    S = similarity64(*arrs, combine, "pcc")
    assert_valid_topk(s, i, S, k, tolerance(*arrs, combine, "pcc"))


@pytest.mark.parametrize("precision", [None, "fp16", "fp32"] + ([] if INTERPRET else ["bf16"]))
@pytest.mark.parametrize("combine", ["product", "sum", "features"])
def test_exact_ties_go_to_smaller_index(combine, precision, rng):
    """Small-integer descriptors, normalize='none': every score is exact in every buffer dtype, so
    the answer must be the exact tie-stable top-k, scores included."""
    qz, qg = make_arrays(rng, 6, [3, 4], integer=True)
    pz, pg = make_arrays(rng, 100, [3, 4], integer=True)
    S = similarity64(qz, qg, pz, pg, combine, "none")
    for k in (1, 25, 100):
        s, i, _ = search(qz, qg, pz, pg, k, combine, "none", options={"precision": precision})
        best, order = topk64(S, k)
        np.testing.assert_array_equal(i, order)
        np.testing.assert_array_equal(s, best)


@pytest.mark.parametrize("order", ["all_equal", "ascending", "descending"])
def test_adversarial_orders(order):
    """Every score equal (the candidate buffer overflows and the rows are redone or handed to the
    reference), pool sorted from worst to best and best to worst."""
    N, k = 200, 20
    q, pool = ordered_pool(order, N)
    best, expected = topk64(similarity64([q], None, [pool], None, "features", "none"), k)
    s, i, _ = search([q], [q], [pool], [pool], k, "features", "none")
    np.testing.assert_array_equal(i, expected)
    np.testing.assert_array_equal(s, best)


def test_exclude_searches_a_row_subset(rng):
    qz, qg = make_arrays(rng, 4, [5, 6], integer=True)
    pz, pg = make_arrays(rng, 90, [5, 6], integer=True)
    excluded = np.array([0, 3, 4, 50, 89])
    S = similarity64(qz, qg, pz, pg, "product", "none")
    S[:, excluded] = -np.inf
    best, order = topk64(S, 12)
    s, i, _ = search(qz, qg, pz, pg, 12, "product", "none", exclude=excluded)
    np.testing.assert_array_equal(i, order)
    np.testing.assert_array_equal(s, best)


@pytest.mark.parametrize("combine", ["product", "sum"])
def test_index_offset_and_incoming_state(combine, rng):
    """Two chunks through the backend's topk (offsets, state carried over) give the one-pass
    answer; a global offset past int32 too."""
    qz, qg = make_arrays(rng, 5, [3, 4], integer=True)
    pz, pg = make_arrays(rng, 90, [3, 4], integer=True)
    k = 12
    best, order = topk64(similarity64(qz, qg, pz, pg, combine, "none"), k)
    q_parts, lay = Layout.of(descriptors(qz, qg, combine), combine)
    p_parts, _ = Layout.of(descriptors(pz, pg, combine), combine)
    q = normalized_block(q_parts, slice(None), "none")
    pool = BACKEND.prepare(p_parts, lay, "none")
    opts = BACKEND.resolve_options(None)
    state = BACKEND.topk(q, pool, slice(0, 37), k, TopK.empty(5, k, q.device), 0, opts)
    state = BACKEND.topk(q, pool, slice(37, 90), k, state, 37, opts)
    np.testing.assert_array_equal(state.index.cpu().numpy(), order)
    np.testing.assert_array_equal(state.scores.cpu().numpy(), best)
    big = 3_000_000_000
    far = BACKEND.topk(q, pool, slice(None), k, TopK.empty(5, k, q.device), big, opts)
    np.testing.assert_array_equal(far.index.cpu().numpy(), order + big)
    assert len([key for key in pool.extra if key[0] == "triton-filter"]) == 1  # prepared once, reused


@pytest.mark.parametrize("precision", ["fp16", "fp32"] + ([] if INTERPRET else ["bf16"]))
@pytest.mark.parametrize("combine,widths", [("product", [7, 33, 64]), ("product", [16]), ("sum", [7, 33]),
                                            ("features", [5, 100])])
@pytest.mark.parametrize("normalize,scale", [("pcc", 1.0), ("l2", 1.0), ("none", 1e-3), ("none", 30.0)])
def test_bounds_hold_for_every_element(combine, widths, precision, normalize, scale, rng):
    """lower <= s_f <= upper for every (query, pool row): the kernel's DENSE bounds s_hat -/+ e
    from the rounded buffers, s_f the float32 re-score. Small values (float16 subnormals) and
    large ones; and the bound is not absurdly loose."""
    pool, q32 = prepared(rng, 20, 300, widths, combine, normalize, scale)
    fpool = tf.FilterPool.of(pool, precision)
    lay = fpool.layout
    qb, qn, qr = tf.pad_rows(q32, lay, fpool.dtype, SMALL.block_m)
    table, cross = tf.error_table(qn, qr, fpool.norm_max, fpool.resid_max, lay.widths, lay.product, fpool.dtype,
                                  tf32=precision == "fp32")
    err = tf.device_error_table(table, qb.shape[0])
    lower = torch.empty((qb.shape[0], pool.n), dtype=torch.float32, device=q32.device)
    upper = torch.empty_like(lower)
    tf.launch(tt.filter_kernel(), qb, fpool.buffer, 0, pool.n, lay, fpool.steps, err, cross, SMALL,
              dense_out=(lower, upper), precision=tf.input_precision(fpool.dtype))
    p32 = pool.block()
    cand = torch.arange(pool.n, device=q32.device).expand(q32.shape[0], -1)
    exact = tf.exact_scores(q32, lambda rows: p32[rows], lay.widths, lay.product, cand)
    lower, upper = lower[:q32.shape[0]], upper[:q32.shape[0]]
    assert (lower <= exact).all() and (exact <= upper).all()
    half = (upper.double() - lower.double()) / 2
    assert (half > 0).all()
    if precision == "fp16" and normalize == "pcc":
        mid = (upper.double() + lower.double()) / 2
        assert ((mid - exact.double()).abs() / half).max() > 1e-3  # the bound is not absurdly loose


def test_per_element_bound_is_tighter_than_norms_alone(rng):
    """On random pcc rows the kernel's |z_j.z_j'| are ~sqrt(width) below the Cauchy-Schwarz
    bound |z_j||z_j'|: the per-element half-width must be far below the norms-only bound."""
    pool, q32 = prepared(rng, 8, 500, [64, 128], "product", "pcc")
    fpool = tf.FilterPool.of(pool, "fp16")
    lay = fpool.layout
    qb, qn, qr = tf.pad_rows(q32, lay, fpool.dtype, SMALL.block_m)
    table, cross = tf.error_table(qn, qr, fpool.norm_max, fpool.resid_max, lay.widths, True, fpool.dtype)
    lower = torch.empty((qb.shape[0], pool.n), dtype=torch.float32, device=q32.device)
    upper = torch.empty_like(lower)
    tf.launch(tt.filter_kernel(), qb, fpool.buffer, 0, pool.n, lay, fpool.steps,
              tf.device_error_table(table, qb.shape[0]), cross, SMALL, dense_out=(lower, upper))
    half = ((upper - lower) / 2)[:8].double()
    # norms only: |zz| <= ||q_z|| max||p_z||, |gg| likewise
    zz_max = [qn[:, j] * fpool.norm_max[j] for j in range(4)]
    norms_only = sum(table[:, 2 * j] * zz_max[2 * j] + table[:, 2 * j + 1] * zz_max[2 * j + 1]
                     + cross * zz_max[2 * j] * zz_max[2 * j + 1] for j in range(2)) + table[:, -1]
    assert (half.median(1).values < norms_only / 4).all(), (half.median(1).values, norms_only)


def test_overflow_redo_and_fallback(rng, monkeypatch):
    """A candidate buffer too small for the sample's estimate: rows overflow and are redone with a
    raised threshold; with no redos allowed, the torch reference finishes them. Same answer."""
    widths = [6, 10]
    qz, qg = make_arrays(rng, 9, widths)
    pz, pg = make_arrays(rng, 400, widths)
    k = 5
    want_s, want_i, arrs = search(qz, qg, pz, pg, k, "product")
    S = similarity64(*arrs, "product", "pcc")
    monkeypatch.setattr(tf, "MAX_CAP", 16)
    monkeypatch.setattr(tf, "MIN_CAP", 16)
    monkeypatch.setattr(tf, "SAMPLE_PER_K", 2)  # a small sample: a low threshold, many hits
    monkeypatch.setattr(tf, "SAMPLE_DIV", 400)
    for redos in (tf.MAX_REDOS, 0):
        monkeypatch.setattr(tf, "MAX_REDOS", redos)
        pool, q32 = prepared_from(qz, qg, pz, pg)
        stats = tf.Stats()
        got = BACKEND._filter_topk(q32, pool, slice(None), k, TopK.empty(9, k, q32.device), 0,
                                   BACKEND.resolve_options(SMALL_TILES), stats=stats)
        assert stats.cap == 16 and stats.sample == 10
        assert (stats.redone if redos else stats.fallback) > 0, stats
        assert_valid_topk(got.scores.cpu().numpy(), got.index.cpu().numpy(), S, k,
                          tolerance(*arrs, "product", "pcc"))
        np.testing.assert_array_equal(got.index.cpu().numpy(), want_i)


def prepared_from(qz, qg, pz, pg):
    q_parts, lay = Layout.of(descriptors(qz, qg, "product"), "product")
    p_parts, _ = Layout.of(descriptors(pz, pg, "product"), "product")
    return BACKEND.prepare(p_parts, lay, "pcc"), normalized_block(q_parts, slice(None), "pcc")


def test_filter_keeps_few_candidates(rng):
    """On clustered data the threshold filters: far fewer candidates than pool rows per query,
    few re-scored, no overflow -- and the exact answer."""
    widths = [16, 32]
    centres = [rng.standard_normal((8, w)) for w in widths for _ in (0, 1)]
    label, qlabel = rng.integers(0, 8, 3000), rng.integers(0, 8, 12)
    pool_parts = [(c[label] + rng.standard_normal((3000, c.shape[1]))).astype(np.float32) for c in centres]
    q_parts = [(c[qlabel] + rng.standard_normal((12, c.shape[1]))).astype(np.float32) for c in centres]
    lay = Layout((16, 16, 32, 32), "product")
    pool = BACKEND.prepare([torch.from_numpy(a).to(DEVICE) for a in pool_parts], lay, "pcc")
    q32 = normalized_block([torch.from_numpy(a).to(DEVICE) for a in q_parts], slice(None), "pcc")
    k = 10
    stats = tf.Stats()
    got = BACKEND._filter_topk(q32, pool, slice(None), k, TopK.empty(12, k, q32.device), 0,
                               BACKEND.resolve_options(None), stats=stats)
    assert stats.redone == stats.fallback == 0
    assert stats.candidates / 12 < 3000 / 4 and stats.rescored / 12 < 100, stats
    S = similarity64(q_parts[0::2], q_parts[1::2], pool_parts[0::2], pool_parts[1::2], "product", "pcc")
    assert_valid_topk(got.scores.cpu().numpy(), got.index.cpu().numpy(), S, k,
                      tolerance(q_parts[0::2], q_parts[1::2], pool_parts[0::2], pool_parts[1::2], "product", "pcc"))


def test_padded_layout():
    lay = tf.PaddedLayout.of((7, 33, 64, 64), True)
    assert lay.padded == (48, 48, 64, 64) and lay.step == 16 and lay.width == 224
    assert lay.offsets == (0, 48, 96, 160)
    assert (lay.n_steps, lay.n_pairs) == (3 + 4, 2)
    steps = lay.steps()  # flat: (z col, g col, 0) per step, then (first, end) step per pair
    assert steps.shape == (3 * 7 + 2 * 2,)
    per_step = steps[:21].reshape(7, 3)
    assert per_step[0].tolist() == [0, 48, 0] and per_step[3].tolist() == [96, 160, 0]
    assert per_step[:, 2].tolist() == [0] * 7 and steps[21:].tolist() == [0, 3, 3, 7]
    suite = tf.PaddedLayout.of(tuple(w for w in (64, 128, 256, 512) for _ in (0, 1)), True)
    assert suite.step == 64 and suite.width == 1920 and (suite.n_steps, suite.n_pairs) == (15, 4)
    assert suite.steps()[-8:].tolist() == [0, 1, 1, 3, 3, 7, 7, 15]
    dot = tf.PaddedLayout.of((7, 33), False)
    assert dot.padded == (16, 48) and dot.step == 32 and dot.width == 64
    assert (dot.n_steps, dot.n_pairs) == (2, 0) and dot.steps().reshape(-1, 3)[:, 0].tolist() == [0, 32]


def test_precision_choice_and_options():
    assert tf.choose_dtype(None, 3.0) == torch.float16
    assert tf.choose_dtype(None, 1e6) == torch.bfloat16  # float16 would overflow
    assert tf.choose_dtype("fp32", 3.0) == torch.float32
    opts = BACKEND.resolve_options({"kernel": "merge", "precision": "bf16"})
    assert opts["kernel"] == "merge" and opts["precision"] == "bf16"
    with pytest.raises(ValueError, match="kernel: expected one of"):
        BACKEND.resolve_options({"kernel": "v3"})
    with pytest.raises(ValueError, match="precision: expected None or one of"):
        BACKEND.resolve_options({"precision": "fp8"})
    for bad in (dict(block_m=48), dict(block_n=256), dict(num_warps=0), dict(group_m=True), dict(programs=-1),
                dict(num_stages=2.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tf.Config(**bad).check()
        with pytest.raises(ValueError, match=next(iter(bad))):  # the same check behind the backend options
            BACKEND.resolve_options(bad)
    with pytest.raises(ValueError, match="block_n.*kernel='filter'.*'merge'"):
        BACKEND.resolve_options({"kernel": "merge", "block_n": 32})
    assert tt.tile_config(BACKEND.resolve_options(None)) == tf.Config()
    assert tt.tile_config(BACKEND.resolve_options({"block_n": 32, "num_stages": 4})) == \
        tf.Config(block_n=32, num_stages=4)


@pytest.mark.parametrize("tiles", [SMALL_TILES, dict(block_m=32, block_n=64, group_m=1, programs=3),
                                   dict(block_m=64, block_n=32, num_warps=4, num_stages=1)],
                         ids=["16x16", "32x64-3-programs", "64x32-1-stage"])
def test_tile_options_give_the_same_answer(tiles, rng):
    """The launch options (what the GPU suite sweeps) change the tiling, never the answer."""
    qz, qg = make_arrays(rng, 21, [5, 9], integer=True)
    pz, pg = make_arrays(rng, 333, [5, 9], integer=True)
    best, order = topk64(similarity64(qz, qg, pz, pg, "product", "none"), 9)
    s, i, _ = search(qz, qg, pz, pg, 9, "product", "none", options=tiles)
    np.testing.assert_array_equal(i, order)
    np.testing.assert_array_equal(s, best)


def test_profile_times_every_stage(rng, monkeypatch):
    qz, qg = make_arrays(rng, 5, [4, 6])
    pz, pg = make_arrays(rng, 200, [4, 6])
    search(qz, qg, pz, pg, 4, "product", options=SMALL_TILES)
    assert tf.LAST.seconds == {}  # PROFILE off: nothing timed, nothing synchronised
    monkeypatch.setattr(tf, "PROFILE", True)
    search(qz, qg, pz, pg, 4, "product", options=SMALL_TILES)
    seconds = tf.LAST.seconds
    assert set(seconds) == {"prepare", "queries", "sample", "threshold", "filter", "select"}, seconds
    assert all(t >= 0 for t in seconds.values()) and seconds["filter"] > 0


def test_v1_still_selectable(rng):
    qz, qg = make_arrays(rng, 4, [3, 4], integer=True)
    pz, pg = make_arrays(rng, 60, [3, 4], integer=True)
    best, order = topk64(similarity64(qz, qg, pz, pg, "product", "none"), 7)
    s, i, _ = search(qz, qg, pz, pg, 7, "product", "none", options={"kernel": "merge"})
    np.testing.assert_array_equal(i, order)
    np.testing.assert_array_equal(s, best)


def test_query_chunks(rng, monkeypatch):
    """Queries in several chunks (a small work budget): the dense sample pass and the filter walk
    them a chunk at a time; the answer is the one-chunk answer."""
    widths = [5, 9]
    qz, qg = make_arrays(rng, 40, widths, integer=True)
    pz, pg = make_arrays(rng, 150, widths, integer=True)
    best, order = topk64(similarity64(qz, qg, pz, pg, "product", "none"), 6)
    q_parts, lay = Layout.of(descriptors(qz, qg, "product"), "product")
    p_parts, _ = Layout.of(descriptors(pz, pg, "product"), "product")
    q = normalized_block(q_parts, slice(None), "none")
    pool = BACKEND.prepare(p_parts, lay, "none")
    monkeypatch.setattr(tf, "WORK_BYTES", 1)  # one block of SMALL.block_m = 16 queries per chunk
    got = BACKEND._filter_topk(q, pool, slice(None), 6, TopK.empty(40, 6, q.device), 0,
                               BACKEND.resolve_options(SMALL_TILES))
    np.testing.assert_array_equal(got.index.cpu().numpy(), order)
    np.testing.assert_array_equal(got.scores.cpu().numpy(), best)


def test_buffer_dtype_follows_the_values(rng, monkeypatch):
    """precision None: float16 while every normalised value is below FP16_SAFE; one value beyond it
    (in the last block read) and the buffer is rebuilt as bfloat16 -- rows, norms and residuals of
    that dtype."""
    pool, _ = prepared(rng, 2, 300, [8], "product", "none")
    assert tf.FilterPool.of(pool, None).dtype == torch.float16
    big, _ = prepared(rng, 2, 300, [8], "product", "none")
    big.parts[0][-1, 0] = 4 * tf.FP16_SAFE
    monkeypatch.setattr(backend_module, "STREAM_BYTES", 4 * 16 * 64)  # 64-row blocks: found in the last one
    assert big.stream_rows == 64
    fp = tf.FilterPool.of(big, None)
    assert fp.dtype == torch.bfloat16 and fp.buffer.dtype == torch.bfloat16
    want = big.block().to(torch.bfloat16)
    z, g = fp.layout.offsets  # z and g padded to 16 columns each
    assert torch.equal(fp.buffer[:big.n, z:z + 8], want[:, :8]) and torch.equal(fp.buffer[:big.n, g:g + 8], want[:, 8:])
    assert not fp.buffer[:big.n, z + 8:g].any()  # padding stays zero
    assert float(fp.norm_max[0]) >= 4 * tf.FP16_SAFE
