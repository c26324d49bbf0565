"""The packed (score, index) key is specified once, in pyfk.engine.topk_state; this file
holds its mirrors to that one spec:

  * the spec itself: pack/unpack round trip, key order == (score descending, index
    ascending) over all non-NaN float32 (-0.0, +-inf, denormals), EMPTY_KEY below every
    entry scored above -inf, TopK.merge == one exact sort;
  * CUDA: the constants and bit operations csrc/cuda/kselect.cuh and kselect.cu
    document, parsed from the sources and replayed in NumPy; the constants of
    pyfk.engine.kernels.cuda and of the built pyfk._C_cuda;
  * Triton: the keys the fused kernel writes (under TRITON_INTERPRET=1 without a GPU);
  * C++: the running heaps of csrc/cpu/topk_heap.hpp (through the `cpu` backend) return
    entries in key order on tie-heavy integer data.

TRITON_INTERPRET=1 must be set before triton is first imported; tests in one process
share that, so this module sets it (as test_triton.py does) when no CUDA device is
present, before anything here imports triton.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch  # noqa: E402 - does not import triton

if not torch.cuda.is_available():  # CPU: the Triton interpreter; with a GPU: the compiled kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import pyfk  # noqa: E402
from pyfk.engine import registry  # noqa: E402
from pyfk.engine.kernels import cuda as cs  # noqa: E402
from pyfk.engine.kernels import triton as tt  # noqa: E402 - imports triton only when first used
from pyfk.engine.layout import Layout  # noqa: E402
from pyfk.engine.topk_state import EMPTY_INDEX, EMPTY_KEY, KEY_LOW, MAX_INDEX, TopK, pack_keys, unpack_keys  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
F32 = np.finfo(np.float32)


def _special_floats() -> np.ndarray:
    """Every float32 class the spec must order: signed zeros, infinities, denormals, extremes."""
    return np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1e-40, -1e-40, F32.tiny, -F32.tiny,
                     F32.max, -F32.max, 1.0, -1.0, np.nextafter(np.float32(1), np.float32(2)),
                     np.nextafter(np.float32(-1), np.float32(-2))], dtype=np.float32)


def _random_floats(rng, n: int) -> np.ndarray:
    """Random non-NaN float32 from random bit patterns (every exponent, denormals included),
    normal draws and the special values, with many exact repeats (ties)."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    bits = np.where(np.isnan(bits), np.float32(0.5), bits)
    normal = rng.standard_normal(n).astype(np.float32)
    pool = np.concatenate([bits, normal, _special_floats()])
    return rng.choice(pool, size=n).astype(np.float32)  # with replacement: ties


def _spec_order(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Positions sorted by (score descending, index ascending); -0.0 == +0.0 (float compare)."""
    return np.lexsort((index, -scores.astype(np.float64)))


# ----------------------------------------------------------------------------- the spec

def test_spec_constants():
    assert KEY_LOW == 2**32 and MAX_INDEX == 2**32 - 2 and EMPTY_INDEX == -1
    assert EMPTY_KEY == int(pack_keys(torch.tensor([float("-inf")]), torch.tensor([-1]))[0])
    assert EMPTY_KEY == -9187343239835811841 == 0x807FFFFFFFFFFFFF - 2**64


def test_round_trip(rng):
    s = np.concatenate([_special_floats(), _random_floats(rng, 20000)])
    idx = rng.integers(-1, MAX_INDEX + 1, size=len(s))
    idx[:3] = [-1, 0, MAX_INDEX]
    keys = pack_keys(torch.from_numpy(s), torch.from_numpy(idx))
    assert keys.dtype == torch.int64
    us, ui = unpack_keys(keys)
    assert us.dtype == torch.float32 and ui.dtype == torch.int64
    np.testing.assert_array_equal(ui.numpy(), idx)
    folded = s + np.float32(0.0)  # -0.0 -> +0.0, the one change the spec makes
    assert np.array_equal(us.numpy().view(np.int32), folded.view(np.int32))  # bit for bit


def test_key_order_is_score_desc_index_asc(rng):
    n = 8000
    s = _random_floats(rng, n)
    idx = rng.choice(np.concatenate([np.arange(0, 5000), MAX_INDEX - np.arange(5000)]), n, replace=False)
    keys = pack_keys(torch.from_numpy(s), torch.from_numpy(idx)).numpy()
    assert len(np.unique(keys)) == n  # distinct indices: distinct keys
    by_key = np.argsort(-keys, kind="stable")
    np.testing.assert_array_equal(by_key, _spec_order(s, idx))


def test_key_comparison_pairwise(rng):
    """key(a) > key(b) exactly when a is the better entry, on pairs rich in equal scores."""
    n = 50000
    sa, sb = _random_floats(rng, n), _random_floats(rng, n)
    sb[: n // 3] = sa[: n // 3]  # equal scores: the index decides
    sb[n // 3: n // 3 + 100] = -sa[n // 3: n // 3 + 100]  # +-0.0, +-inf, ... against each other
    ia, ib = rng.integers(0, MAX_INDEX + 1, n), rng.integers(0, MAX_INDEX + 1, n)
    ka = pack_keys(torch.from_numpy(sa), torch.from_numpy(ia)).numpy()
    kb = pack_keys(torch.from_numpy(sb), torch.from_numpy(ib)).numpy()
    better = (sa > sb) | ((sa == sb) & (ia < ib))
    same = (sa == sb) & (ia == ib)
    np.testing.assert_array_equal(ka > kb, better)
    np.testing.assert_array_equal(ka == kb, same)


def test_empty_key_is_below_every_entry(rng):
    """EMPTY_KEY = pack(-inf, -1) is below every entry whose score is above -inf, so an empty
    slot never displaces a real result. (An entry scored -inf ties with it on the score,
    and index -1 comes first: such entries rank below the empty slot. Scores of finite
    inputs are never -inf.)"""
    s = np.concatenate([_special_floats(), _random_floats(rng, 5000)])
    idx = rng.integers(0, MAX_INDEX + 1, len(s))
    idx[:2] = [0, MAX_INDEX]
    keys = pack_keys(torch.from_numpy(s), torch.from_numpy(idx))
    finite_or_up = torch.from_numpy(s > -np.inf)
    assert bool((keys[finite_or_up] > EMPTY_KEY).all())
    assert bool((keys[~finite_or_up] < EMPTY_KEY).all())
    lowest = int(pack_keys(torch.tensor([-F32.max]), torch.tensor([MAX_INDEX]))[0])
    assert lowest > EMPTY_KEY  # the worst finite entry still beats the empty slot
    es, ei = unpack_keys(torch.tensor([EMPTY_KEY]))
    assert float(es[0]) == float("-inf") and int(ei[0]) == EMPTY_INDEX
    assert bool((TopK.empty(3, 4).keys() == EMPTY_KEY).all())


def test_merge_is_one_exact_sort(rng):
    """TopK.merge / merge_all of chunks, in any order, equal one sort of the union by the spec."""
    m, k, n = 5, 7, 300
    s = rng.integers(-3, 4, (m, n)).astype(np.float32) / 2  # many ties, +-0 via negation below
    s[:, ::5] = -s[:, ::5]
    idx = np.broadcast_to(np.arange(n), (m, n))
    order = np.stack([_spec_order(s[r], idx[r])[:k] for r in range(m)])
    want_s, want_i = np.take_along_axis(s, order, 1), order
    cuts = np.sort(rng.choice(np.arange(1, n), 4, replace=False))
    chunks = [TopK.empty(m, k).merge((torch.from_numpy(s[:, a:b].copy()), torch.from_numpy(idx[:, a:b].copy())))
              for a, b in zip([0, *cuts], [*cuts, n])]
    state = TopK.empty(m, k)
    for c in rng.permutation(len(chunks)):
        state = state.merge(chunks[c])
    for got in (state, TopK.merge_all([chunks[c] for c in rng.permutation(len(chunks))])):
        np.testing.assert_array_equal(got.index.numpy(), want_i)
        np.testing.assert_array_equal(got.scores.numpy(), want_s)


# ----------------------------------------------------------------------------- CUDA mirror

def _c_int(text: str, pattern: str, what: str) -> int:
    found = re.search(pattern, text)
    assert found, f"{what}: no match for {pattern!r} (the CUDA sources changed: update the spec mirror)"
    return int(found.group(1), 0)


def _function_body(text: str, signature: str) -> str:
    found = re.search(re.escape(signature) + r"\s*\{(.*?)\n\}", text, re.S)
    assert found, f"{signature!r} not found in kselect.cu"
    return found.group(1)


def test_cuda_header_constants_match_spec():
    """kselect.cuh's constants and the key formula its comment documents are the spec."""
    text = (CUDA_DIR / "kselect.cuh").read_text()
    empty = _c_int(text, r"kEmptyKey = static_cast<int64_t>\((0x[0-9A-Fa-f]+)ull\)", "kEmptyKey")
    assert empty - (1 << 64 if empty >= 1 << 63 else 0) == EMPTY_KEY
    assert _c_int(text, r"kMaxIndex = (\d+)LL", "kMaxIndex") == MAX_INDEX == cs.MAX_INDEX
    assert _c_int(text, r"kMaxK = (\d+);", "kMaxK") == cs.MAX_K
    formula = re.search(r"key = ordered_float_bits\(score\) \* 2\^(\d+) \+ \(2\^(\d+) - (\d+) - index\)", text)
    assert formula, "kselect.cuh no longer documents the key formula"
    high, low, minus = (int(x) for x in formula.groups())
    assert 2**high == KEY_LOW and 2**low - minus == MAX_INDEX


def _cuda_bit_ops():
    """The bit operations of kselect.cu's pack_key and unpack_kernel, as parsed constants."""
    text = (CUDA_DIR / "kselect.cu").read_text()
    pack = _function_body(text, "__device__ inline int64_t pack_key(float score, int64_t index)")
    unpack = _function_body(text, "__global__ void unpack_kernel(const int64_t* keys, int64_t count, float* scores, "
                                  "int64_t* index)")
    assert re.search(r"if \(score == 0\.0f\) score = 0\.0f;", pack), "pack_key no longer folds -0 into +0"
    assert "kMaxIndex - index" in pack, "pack_key's low word is no longer kMaxIndex - index"
    assert "kMaxIndex - static_cast<int64_t>(key & 0xFFFFFFFFull)" in unpack, "unpack's low word changed"
    return {
        "pack_flip": _c_int(pack, r"if \(bits < 0\) bits \^= (0x[0-9A-Fa-f]+);", "pack_key sign flip"),
        "pack_shift": _c_int(pack, r"<< (\d+);", "pack_key high-word shift"),
        "unpack_flip": _c_int(unpack, r"if \(bits < 0\) bits \^= (0x[0-9A-Fa-f]+);", "unpack sign flip"),
        "unpack_shift": _c_int(unpack, r"key >> (\d+)\)", "unpack high-word shift"),
    }


def _pack_like_cuda(scores: np.ndarray, index: np.ndarray, ops: dict) -> np.ndarray:
    """kselect.cu's pack_key replayed with its own (parsed) constants and unsigned bit operations."""
    s = np.where(scores == 0, np.float32(0), scores).astype(np.float32)
    bits = s.view(np.int32).astype(np.int64)
    bits = np.where(bits < 0, bits ^ ops["pack_flip"], bits)
    hi = (bits & 0xFFFFFFFF).astype(np.uint64) << np.uint64(ops["pack_shift"])
    lo = (cs.MAX_INDEX - index).astype(np.uint64)
    return (hi | lo).view(np.int64)


def _unpack_like_cuda(keys: np.ndarray, ops: dict):
    u = keys.view(np.uint64)
    bits = (u >> np.uint64(ops["unpack_shift"])).astype(np.uint32).view(np.int32)
    bits = np.where(bits < 0, bits ^ ops["unpack_flip"], bits).astype(np.int32)
    return bits.view(np.float32), cs.MAX_INDEX - (u & np.uint64(0xFFFFFFFF)).astype(np.int64)


def test_cuda_key_bit_logic_matches_spec(rng):
    ops = _cuda_bit_ops()
    s = np.concatenate([_special_floats(), _random_floats(rng, 4000)])
    idx = rng.integers(-1, MAX_INDEX + 1, size=len(s))
    idx[:2] = [-1, MAX_INDEX]
    want = pack_keys(torch.from_numpy(s), torch.from_numpy(idx)).numpy()
    got = _pack_like_cuda(s, idx, ops)
    np.testing.assert_array_equal(got, want)
    us, ui = _unpack_like_cuda(got, ops)
    ws, wi = unpack_keys(torch.from_numpy(want))
    assert np.array_equal(us.view(np.int32), ws.numpy().view(np.int32)) and np.array_equal(ui, wi.numpy())


def test_cuda_module_constants_are_the_spec():
    assert cs.EMPTY_KEY == EMPTY_KEY and cs.MAX_INDEX == MAX_INDEX
    cs.check_args(1, 1, 1, MAX_INDEX)  # the last index a key holds is accepted...
    with pytest.raises(ValueError, match="index"):
        cs.check_args(1, 2, 1, MAX_INDEX)  # ...and one past it is not
    if cs._C_cuda is None:
        pytest.skip(f"pyfk._C_cuda is not built: {cs.IMPORT_ERROR}")
    assert cs._C_cuda.EMPTY_KEY == EMPTY_KEY
    assert cs._C_cuda.MAX_INDEX == MAX_INDEX
    assert cs._C_cuda.MAX_K == cs.MAX_K


# ----------------------------------------------------------------------------- Triton mirror

@contextlib.contextmanager
def fast_interpreter_xor():
    """Under the Triton interpreter, a NumPy xor-reduce (the same result) instead of its generic
    reduce, which loops in Python: tl.sort's bitonic network is built of xor-reductions.
    Shared with test_triton.py. A no-op when the interpreter internals are not there."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
        ops = interp.ReduceOps
        xor_combine = tl.standard._xor_combine
    except (ImportError, AttributeError):
        yield
        return
    original = ops.apply_impl

    def apply_impl(self, input):
        if self.combine_fn is xor_combine and self.axis is not None:
            x = input[0]
            data = np.bitwise_xor.reduce(x.handle.data, axis=self.axis, keepdims=self.keep_dims)
            return self.to_tensor(data, x.dtype)
        return original(self, input)

    ops.apply_impl = apply_impl
    try:
        yield
    finally:
        ops.apply_impl = original


@pytest.fixture
def triton_kernel():
    """The Triton backend's module, ready to run here (compiled on a GPU, else interpreted)."""
    reason = tt.available()
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    with fast_interpreter_xor():
        yield tt


def _triton_device() -> str:
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _exact_keys(scores: torch.Tensor, first: int, width: int) -> torch.Tensor:
    """The spec's top-`width` keys per row of exact scores (m, n), global index first + column,
    padded with EMPTY_KEY."""
    m, n = scores.shape
    keys = pack_keys(scores, torch.arange(first, first + n).expand(m, -1))
    top = keys.topk(min(width, n), dim=1).values
    return torch.cat([top, torch.full((m, width - top.shape[1]), EMPTY_KEY, dtype=torch.int64)], dim=1)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # inf x 0 in rows the kernel masks
@pytest.mark.parametrize("tile_r", [1, 2])
def test_triton_kernel_keys_are_spec_keys(triton_kernel, tile_r, rng):
    """Plain-dot mode with D = 1 and queries +1 / -1: the kernel's scores are exactly the pool
    values (or their negations), so its keys must be the spec's keys bit for bit -- ties,
    negative scores, zeros from +0.0 and -0.0 inputs, +-inf, the largest floats, and
    (interpreted) denormals; one split, several splits, and an offset that puts the last
    row at MAX_INDEX. (The kernel's accumulators start at +0.0, so it never forms a -0.0
    score itself: its -0 fold is there to keep the mirror whole, and no input reaches it.)"""
    dev = _triton_device()
    special = _special_floats()
    if dev == "cuda":  # a GPU may flush denormal products to zero: a score change, not a key change
        special = special[np.abs(special) >= F32.tiny]
    vals = np.concatenate([special, special, rng.integers(-3, 4, 60).astype(np.float32) / 4])
    vals = rng.permutation(vals).astype(np.float32)
    p = torch.from_numpy(vals[:, None].copy())
    q = torch.tensor([[1.0], [-1.0]])
    exact = (q.double() @ p.double().T).float()  # the one product per score the kernel makes, exactly
    n, k = len(vals), 16
    for offset in (0, 5, MAX_INDEX - n + 1):
        keys = tt.kernel_keys(q.to(dev), p.to(dev), [1], False, k, offset, splits=1, tile_r=tile_r).cpu()
        assert keys.shape == (2, 1, 16)
        assert torch.equal(keys[:, 0], _exact_keys(exact, offset, 16))
        split = tt.kernel_keys(q.to(dev), p.to(dev), [1], False, k, offset, splits=3, tile_r=tile_r).cpu()
        assert split.shape[1] > 1
        assert torch.equal(split.reshape(2, -1).topk(k, dim=1).values, _exact_keys(exact, offset, k))
        empty = TopK.empty(2, k, dev)
        s, i = tt.topk_update(q.to(dev), p.to(dev), [1], False, k, offset, empty.scores, empty.index, splits=2,
                              tile_r=tile_r)
        assert torch.equal(pack_keys(s.cpu(), i.cpu()), _exact_keys(exact, offset, k))


def test_triton_kernel_keys_product_ties(triton_kernel, rng):
    """Product mode on small integers (exact in float32): sums of (z.z')(g.g') that tie, are
    negative, or are zero (from 0 * negative = -0.0 terms) give the spec's keys."""
    dev = _triton_device()
    widths = [2, 3, 1, 2]
    q = rng.integers(-2, 3, (4, 8)).astype(np.float32)
    p = rng.integers(-2, 3, (90, 8)).astype(np.float32)
    p[40:50] = p[3]  # exact duplicates: ties across tiles
    p[60:64] = -0.0  # zero rows: score +0.0 against every query
    qt, pt = torch.from_numpy(q), torch.from_numpy(p)
    exact = Layout(tuple(widths), "product").similarity(qt.double(), pt.double()).float()
    for k in (3, 20):
        keys = tt.kernel_keys(qt.to(dev), pt.to(dev), widths, True, k, 7, splits=1).cpu()
        width = keys.shape[2]
        assert torch.equal(keys[:, 0], _exact_keys(exact, 7, width))


# ----------------------------------------------------------------------------- C++ heap mirror

@pytest.mark.parametrize("combine", ["product", "sum", "features"])
def test_cpu_heap_order_is_key_order(rng, cpu_isa, combine):
    """csrc/cpu/topk_heap.hpp's `better` (score >, then index <) through the `cpu` backend on
    tie-heavy small integers (exact in float32; zero and negative scores; -0.0 inputs): the
    entries come back in key order, equal to the spec's top-k keys, for one thread or several,
    and when a seeded state is merged chunk by chunk."""
    widths = [3, 2]
    z = [rng.integers(-1, 2, (400, w)).astype(np.float32) for w in widths]
    g = [rng.integers(-1, 2, (400, w)).astype(np.float32) for w in widths]
    z[0][::7] = -0.0
    q = pyfk.Descriptors([a[:9] for a in z], [a[:9] for a in g])
    p = pyfk.Descriptors(z, g)
    parts, layout = Layout.of(p, combine)
    q_parts, _ = Layout.of(q, combine)
    pn = torch.cat([torch.from_numpy(a) for a in parts], dim=1).double()
    qn = torch.cat([torch.from_numpy(a) for a in q_parts], dim=1).double()
    exact = layout.similarity(qn, pn).float()
    for k in (1, 17, 400):
        want = _exact_keys(exact, 0, k)
        for threads in (1, 3):
            s, i = pyfk.topk(q, p, k, combine=combine, normalize="none", backend="cpu", options={"threads": threads})
            assert torch.equal(pack_keys(torch.from_numpy(s), torch.from_numpy(i)), want)
    # chunk by chunk into a seeded state (topk_heap's seed() then push())
    b = registry.get("cpu")
    pool = b.prepare(parts, layout, "none")
    state = TopK.empty(9, 25)
    qf = qn.float()
    for a in range(0, 400, 130):
        state = b.topk(qf, pool, slice(a, min(400, a + 130)), 25, state, a, b.resolve_options({"threads": 2}))
    assert torch.equal(state.keys(), _exact_keys(exact, 0, 25))
