"""Issue 10 items 2 and 3 on the `cpu` backend.

Item 2: fp16 pool rows are converted with F16C (vcvtph2ps) in the avx2/avx512 variants and
by the exact software conversion in `generic`; both must equal NumPy's float16 -> float32
for every finite half, on the packed (GEMM) path and on the row-wise (M <= MR/2) path.

Item 3: the kernel tests every raw pool row for NaN/Inf while packing it and the backend
raises after its pass (Backend.checks_finite), so the engine does not pre-scan the pool.
The error is the one Descriptors.check_finite gives (the torch backend): the smallest
offending row, then the first array at that row (z before g).
"""

import numpy as np
import pytest
import torch

import pyfk
from pyfk.engine import descriptors as descriptors_module
from pyfk.engine.registry import resolve
from tests.conftest import make_arrays
from tests.oracle import similarity64, topk64

# Every finite binary16 bit pattern: +-0, subnormals, normals up to +-65504.
ALL_HALVES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
FINITE_HALVES = ALL_HALVES[np.isfinite(ALL_HALVES)]
W = 19  # two 8-wide / one 16-wide vector plus a scalar tail per row


def _half_pool():
    n = -(-FINITE_HALVES.size // W)
    flat = np.zeros(n * W, dtype=np.float16)
    flat[:FINITE_HALVES.size] = FINITE_HALVES
    return flat.reshape(n, W)


def test_every_finite_half_converts_exactly_packed_path(cpu_isa):
    """Queries = identity (M = 19 > MR/2: packed path): R = P.T, each entry one converted half."""
    p16 = _half_pool()
    assert FINITE_HALVES.size == 63488 and np.float16(65504) in FINITE_HALVES
    eye = np.eye(W, dtype=np.float32)
    R = pyfk.similarity(pyfk.Descriptors([eye]), pyfk.Descriptors([p16]), combine="features", normalize="none",
                        backend="cpu")
    np.testing.assert_array_equal(R, p16.astype(np.float32).T)  # exact (a sum cannot keep the sign of a zero)


def test_every_finite_half_converts_exactly_row_path(cpu_isa):
    """Three unit queries at a time (M <= MR/2: the row-wise GEMV path)."""
    p16 = _half_pool()
    want = p16.astype(np.float32)
    eye = np.eye(W, dtype=np.float32)
    for c in range(0, W, 3):
        q = eye[c:c + 3]
        R = pyfk.similarity(pyfk.Descriptors([q]), pyfk.Descriptors([p16]), combine="features", normalize="none",
                            backend="cpu", options={"threads": 2})
        np.testing.assert_array_equal(R, want[:, c:c + 3].T)


@pytest.mark.parametrize("m", [2, 40])
@pytest.mark.parametrize("normalize", ["none", "pcc"])
def test_fp16_pool_equals_its_float32_conversion(rng, cpu_isa, m, normalize):
    """The fp16 pool and the same pool converted by NumPy give identical scores and indices (the
    conversion is exact, the rest of the kernel is the same arithmetic); on integer data with
    normalize='none' they are also the float64 oracle's, exactly."""
    integer = normalize == "none"
    qz, qg = make_arrays(rng, m, [5, 24], integer=integer)
    pz, pg = make_arrays(rng, 2500, [5, 24], dtype=np.float16, integer=integer)
    if not integer:  # extremes: subnormal, largest finite and tiny values in the rows
        pz[1][3, :4] = np.array([6e-8, -6e-8, 65504, -65504], dtype=np.float16)
        pg[0][7, :3] = np.array([np.float16(2.0 ** -24), -0.0, 0.0], dtype=np.float16)
    q = pyfk.Descriptors(qz, qg)
    p16 = pyfk.Descriptors(pz, pg)
    p32 = pyfk.Descriptors([a.astype(np.float32) for a in pz], [a.astype(np.float32) for a in pg])
    exclude = rng.choice(2500, size=100, replace=False)
    for threads in (1, 3):
        opts = {"threads": threads}
        s16, i16 = pyfk.topk(q, p16, k=25, normalize=normalize, backend="cpu", exclude=exclude, options=opts)
        s32, i32 = pyfk.topk(q, p32, k=25, normalize=normalize, backend="cpu", exclude=exclude, options=opts)
        np.testing.assert_array_equal(s16, s32)
        np.testing.assert_array_equal(i16, i32)
        if integer:
            S = similarity64(qz, qg, pz, pg, "product", "none")
            S[:, exclude] = -np.inf
            best, order = topk64(S, 25)
            np.testing.assert_array_equal(s16, best)
            np.testing.assert_array_equal(i16, order)
    R16 = pyfk.similarity(q, p16, normalize=normalize, backend="cpu")
    R32 = pyfk.similarity(q, p32, normalize=normalize, backend="cpu")
    np.testing.assert_array_equal(R16, R32)


# ----------------------------------------------------------------------------- NaN/Inf in the kernel's pass

N = 5000


def _pool(rng, dtype, n=N):
    pz, pg = make_arrays(rng, n, [6, 17], dtype=dtype)
    return pz, pg


def _both_messages(call):
    """The ValueError message of `call(backend)` for cpu and for torch (the Python pre-scan)."""
    out = []
    for backend in ("cpu", "torch"):
        with pytest.raises(ValueError) as info:
            call(backend)
        out.append(str(info.value))
    return out


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("part", ["z", "g"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("m", [2, 9])  # row-wise path, packed path
def test_non_finite_pool_row_raises_after_the_pass(rng, cpu_isa, dtype, part, where, m):
    row = {"first": 0, "middle": N // 2 + 17, "last": N - 1}[where]
    qz, qg = make_arrays(rng, m, [6, 17])
    q = pyfk.Descriptors(qz, qg)
    for threads in (1, 3):
        for bad in (np.nan, np.inf, -np.inf):
            pz, pg = _pool(rng, dtype)
            arrays = {"z": pz, "g": pg}[part]
            arrays[1][row, 5] = bad
            before = [a.copy() for a in pz + pg]
            p = pyfk.Descriptors(pz, pg)
            want = f"pool: {part}[1] contains NaN or Inf values (first at row {row})"
            opts = {"threads": threads}
            with pytest.raises(ValueError) as info:
                pyfk.topk(q, p, k=4, backend="cpu", options=opts)
            assert str(info.value) == want
            with pytest.raises(ValueError, match=rf"^pool: {part}\[1\] contains NaN or Inf values \(first at row "):
                pyfk.select(p, q, budget=3, k=4, backend="cpu", options=opts)
            with pytest.raises(ValueError) as info:
                pyfk.similarity(q, p, backend="cpu", options=opts)
            assert str(info.value) == want
            with pytest.raises(ValueError) as info:
                pyfk.topk(q, p, k=4, normalize="none", backend="cpu", options=opts)  # not the range error
            assert str(info.value) == want
            for a, b in zip(pz + pg, before):
                np.testing.assert_array_equal(a, b)
    # the same message as the torch backend's Python scan
    cpu_msg, torch_msg = _both_messages(lambda b: pyfk.topk(q, p, k=4, backend=b))
    assert cpu_msg == torch_msg == want


@pytest.mark.parametrize("threads", [1, 3])
def test_first_offending_row_across_arrays_threads_and_chunks(rng, cpu_isa, threads):
    """Several bad values: the smallest row wins, then z before g, then the scale; across the
    threads' ranges and across the engine's pool chunks (>= 16384 rows each)."""
    qz, qg = make_arrays(rng, 7, [3, 4])
    n = 40000
    pz, pg = make_arrays(rng, n, [3, 4], dtype=np.float16)
    p = pyfk.Descriptors(pz, pg)
    opts = {"threads": threads}
    cases = [
        ([("z", 0, 39000), ("g", 1, 30000)], "g[1]", 30000),      # second chunk, the later array
        ([("g", 0, 20000), ("z", 1, 20000)], "z[1]", 20000),       # same row: z before g
        ([("z", 1, 12), ("z", 0, 12), ("g", 0, 3)], "g[0]", 3),    # smallest row, whatever the array
        ([("z", 1, n - 1)], "z[1]", n - 1),                         # last row of the last chunk
    ]
    for hits, name, row in cases:
        pz2, pg2 = [a.copy() for a in pz], [a.copy() for a in pg]
        for part, j, r in hits:
            ({"z": pz2, "g": pg2}[part])[j][r, 0] = np.nan
        p2 = pyfk.Descriptors(pz2, pg2)
        want = f"pool: {name} contains NaN or Inf values (first at row {row})"
        for m in (2, 7):
            q = pyfk.Descriptors([a[:m] for a in qz], [a[:m] for a in qg])
            cpu_msg, torch_msg = _both_messages(
                lambda b, q=q, p2=p2: pyfk.topk(q, p2, k=3, backend=b, options=opts if b == "cpu" else None))
            assert cpu_msg == torch_msg == want
    s, i = pyfk.topk(pyfk.Descriptors(qz, qg), p, k=3, backend="cpu", options=opts)  # the clean pool still works
    assert (i >= 0).all()


def test_row_list_and_excluded_rows(rng, cpu_isa):
    """With `exclude` the kernel reads a row list: the reported row is the pool row. A NaN in an
    excluded row is never read by the cpu kernel; it is checked in Python instead, so the cpu
    backend refuses exactly what the torch backend refuses."""
    qz, qg = make_arrays(rng, 8, [6, 17])
    q = pyfk.Descriptors(qz, qg)
    pz, pg = _pool(rng, np.float32)
    pz[0][2222, 3] = np.nan
    pg[1][10, 0] = np.inf
    p = pyfk.Descriptors(pz, pg)
    for threads in (1, 3):
        for b in ("cpu", "torch"):
            with pytest.raises(ValueError, match=r"pool: g\[1\] contains NaN or Inf values \(first at row 10\)"):
                pyfk.topk(q, p, k=5, backend=b, exclude=[10, 2222, 4999], options={"threads": threads}
                          if b == "cpu" else None)
    pg[1][10, 0] = 0.0  # now the only bad row is searched: the kernel reports it through the row list
    for b in ("cpu", "torch"):
        with pytest.raises(ValueError, match=r"^pool: z\[0\] contains NaN or Inf values \(first at row 2222\)$"):
            pyfk.topk(q, p, k=5, backend=b, exclude=[10, 4999])


@pytest.mark.parametrize("kind", ["float64", "torch_bf16", "torch_f16", "torch_f32"])
def test_other_dtypes(rng, kind):
    """float64 is still scanned in Python (its float32 range is decided there); bfloat16 chunks
    are converted by the launcher and checked by the kernel; torch fp16/fp32 are read in place."""
    qz, qg = make_arrays(rng, 5, [6, 17])
    pz, pg = _pool(rng, np.float64)
    pg[0][3100, 2] = -np.inf
    conv = {"float64": lambda a: a, "torch_bf16": lambda a: torch.from_numpy(a).to(torch.bfloat16),
            "torch_f16": lambda a: torch.from_numpy(a).to(torch.float16),
            "torch_f32": lambda a: torch.from_numpy(a).to(torch.float32)}[kind]
    q = pyfk.Descriptors([conv(a) for a in qz], [conv(a) for a in qg])
    p = pyfk.Descriptors([conv(a) for a in pz], [conv(a) for a in pg])
    cpu_msg, torch_msg = _both_messages(lambda b: pyfk.topk(q, p, k=3, backend=b))
    assert cpu_msg == torch_msg == "pool: g[0] contains NaN or Inf values (first at row 3100)"
    if kind == "float64":
        big = [a.copy() for a in pz]
        big[1][5, 0] = 1e300
        pg[0][3100, 2] = 0.0
        with pytest.raises(ValueError, match=r"pool: z\[1\] holds values beyond the float32 range"):
            pyfk.topk(q, pyfk.Descriptors(big, pg), k=3, backend="cpu")


class _ScanCounter:
    """Records which arrays Descriptors.check_finite scans (by identity)."""

    def __init__(self, monkeypatch):
        self.ids = []
        original = descriptors_module.first_non_finite_row

        def spy(a):
            self.ids.append(id(a))
            return original(a)

        monkeypatch.setattr(descriptors_module, "first_non_finite_row", spy)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_cpu_backend_does_not_prescan_the_pool(rng, monkeypatch, dtype):
    counter = _ScanCounter(monkeypatch)
    qz, qg = make_arrays(rng, 6, [6, 17])
    pz, pg = _pool(rng, dtype)
    q, p = pyfk.Descriptors(qz, qg), pyfk.Descriptors(pz, pg)
    pool_ids = {id(a) for a in pz + pg}
    query_ids = {id(a) for a in qz + qg}
    assert resolve("cpu", p.device).checks_finite and not resolve("torch", p.device).checks_finite
    for call in (lambda b: pyfk.topk(q, p, k=3, backend=b),
                 lambda b: pyfk.similarity(q, p, backend=b),
                 lambda b: pyfk.select(p, q, budget=3, k=3, backend=b)):
        counter.ids.clear()
        call("cpu")
        assert not pool_ids & set(counter.ids), "the cpu backend pre-scanned the pool"
        assert query_ids <= set(counter.ids), "queries are still checked in Python"
        counter.ids.clear()
        call("torch")
        assert pool_ids <= set(counter.ids), "the torch backend must still scan the pool"
    # float64 pools are scanned even for cpu (the float32 range check)
    p64 = pyfk.Descriptors([a.astype(np.float64) for a in pz], [a.astype(np.float64) for a in pg])
    counter.ids.clear()
    pyfk.topk(q, p64, k=3, backend="cpu")
    assert {id(a) for a in p64.z + p64.g} <= set(counter.ids)


def test_memory_mapped_fp16_pool(rng, tmp_path, monkeypatch):
    """Read-only memory-mapped fp16 arrays (how a DescriptorStore hands its pool over): read in
    place by the kernel only; a NaN is found in its pass."""
    qz, qg = make_arrays(rng, 4, [6, 17])
    pz, pg = _pool(rng, np.float16, n=3000)
    pg[1][2999, 16] = np.nan
    maps = []
    for name, a in zip(("z0", "z1", "g0", "g1"), pz + pg):
        np.save(tmp_path / f"{name}.npy", a)
        maps.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    counter = _ScanCounter(monkeypatch)
    q, p = pyfk.Descriptors(qz, qg), pyfk.Descriptors(maps[:2], maps[2:])
    with pytest.raises(ValueError, match=r"^pool: g\[1\] contains NaN or Inf values \(first at row 2999\)$"):
        pyfk.topk(q, p, k=3, backend="cpu")
    assert not {id(a) for a in maps} & set(counter.ids)
    # excluding the bad row does not hide it: unread rows are checked (like every backend does)
    with pytest.raises(ValueError, match=r"^pool: g\[1\] contains NaN or Inf values \(first at row 2999\)$"):
        pyfk.topk(q, p, k=3, backend="cpu", exclude=[2999])


@pytest.mark.parametrize("backend_name", ["cpu", "torch"])
def test_unread_rows_are_checked_the_same_for_every_backend(rng, backend_name):
    """The cpu kernel checks what it reads; excluded rows and g under combine="features" are
    checked in Python, so cpu and torch refuse the same inputs with the same message."""
    z = [rng.standard_normal((100, 4)).astype(np.float32)]
    g = [rng.standard_normal((100, 4)).astype(np.float32)]
    q = pyfk.Descriptors([rng.standard_normal((3, 4)).astype(np.float32)],
                         [rng.standard_normal((3, 4)).astype(np.float32)])
    z[0][17, 2] = np.nan
    with pytest.raises(ValueError, match=r"^pool: z\[0\] contains NaN or Inf values \(first at row 17\)"):
        pyfk.topk(q, pyfk.Descriptors(z, g), k=2, backend=backend_name, exclude=[17, 40])
    with pytest.raises(ValueError, match=r"^pool: z\[0\] contains NaN or Inf values \(first at row 17\)"):
        pyfk.select(pyfk.Descriptors(z, g), q, budget=2, backend=backend_name, exclude=[17, 40])
    z[0][17, 2] = 0.0
    g[0][60, 1] = np.inf
    with pytest.raises(ValueError, match=r"^pool: g\[0\] contains NaN or Inf values \(first at row 60\)"):
        pyfk.topk(q, pyfk.Descriptors(z, g), k=2, backend=backend_name, combine="features")
