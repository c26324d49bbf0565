"""The CUDA backend on a machine without a GPU: the sources compile (when nvcc is on
PATH), the binding loads and validates its arguments, the host-side helpers and NumPy
models of the selection and merge kernels agree with the key spec, the backend's
options are checked, and the GPU suite's --dry-run works. The key constants and bit
logic of csrc/cuda against pyfk.engine.topk_state: tests/engine/test_key_spec.py.
Running the kernels needs a GPU: benchmarks/gpu_suite.py checks them there.
"""

import ctypes
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from pyfk.engine import registry
from pyfk.engine.kernels import cuda as cs
from pyfk.engine.kernels import torch as reference
from pyfk.engine.topk_state import EMPTY_KEY, pack_keys, unpack_keys

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def _pybind_includes() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pybind11", "--includes"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("pybind11 is not importable")
    return out.stdout.split()


def _nvcc(*args, cwd=None):
    res = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "-O2", *map(str, args)], capture_output=True, text=True,
                         cwd=cwd, timeout=300)
    assert res.returncode == 0, f"nvcc {' '.join(map(str, args))} failed:\n{res.stdout}\n{res.stderr}"
    return res


@needs_nvcc
def test_kselect_compiles(tmp_path):
    res = _nvcc("-c", "-Xptxas", "-v", CUDA_DIR / "kselect.cu", "-o", tmp_path / "kselect.o")
    assert (tmp_path / "kselect.o").stat().st_size > 0
    # No kernel spills registers or uses a stack frame (local memory).
    assert "spill stores" in res.stderr
    for line in res.stderr.splitlines():
        if "spill" in line:
            assert " 0 bytes spill stores, 0 bytes spill loads" in line, line


@needs_nvcc
def test_bindings_compile(tmp_path):
    _nvcc("-c", *_pybind_includes(), "-Xcompiler", "-fPIC", CUDA_DIR / "bindings_cuda.cpp", "-o", tmp_path / "b.o")
    assert (tmp_path / "b.o").stat().st_size > 0


@pytest.fixture(scope="module")
def built_module(tmp_path_factory):
    """pyfk._C_cuda built with nvcc into a temp dir and imported (it loads without a GPU)."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    d = tmp_path_factory.mktemp("c_cuda")
    inc = _pybind_includes()
    _nvcc("-c", *inc, "-Xcompiler", "-fPIC", CUDA_DIR / "bindings_cuda.cpp", "-o", d / "b.o")
    _nvcc("-c", "-Xcompiler", "-fPIC", CUDA_DIR / "kselect.cu", "-o", d / "k.o")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    _nvcc("-shared", d / "b.o", d / "k.o", "-o", d / f"_C_cuda{suffix}")
    sys.path.insert(0, str(d))
    try:
        import _C_cuda
    finally:
        sys.path.remove(str(d))
    return _C_cuda


def test_binding_constants_and_validation(built_module):
    m = built_module
    assert m.MAX_K == cs.MAX_K == 1024
    assert m.MAX_INDEX == cs.MAX_INDEX
    assert m.EMPTY_KEY == EMPTY_KEY == cs.EMPTY_KEY
    assert m.select_shared_bytes(32) <= 48 * 1024 and m.select_shared_bytes(1024) <= 48 * 1024
    with pytest.raises(ValueError, match="k: expected 1 <= k <= 1024"):
        m.select_topk(1, 1, 1, 0, 1, 0)
    with pytest.raises(ValueError, match="k: expected"):
        m.merge_keys(1, 1, 1, 1025, 1, 0)
    with pytest.raises(ValueError, match="out_keys_ptr"):
        m.select_topk(1, 1, 1, 5, 0, 0)
    with pytest.raises(ValueError, match="scores_ptr"):
        m.select_topk(0, 1, 1, 5, 8, 0)
    with pytest.raises(ValueError, match="ld"):
        m.select_topk(8, 1, 10, 5, 8, 0, ld=9)
    with pytest.raises(ValueError, match="index_offset"):
        m.select_topk(8, 1, 10, 5, 8, 0, index_offset=(1 << 32) - 10)
    with pytest.raises(ValueError, match="rows"):
        m.merge_keys(8, 8, -1, 4, 8, 0)
    with pytest.raises(ValueError, match="b_ptr"):
        m.merge_keys(8, 0, 1, 4, 8, 0)
    with pytest.raises(ValueError, match="count"):
        m.unpack_keys(8, -1, 8, 8, 0)
    # Nothing to do: no launch, no error, even without a GPU.
    m.select_topk(0, 0, 0, 5, 0, 0)
    m.merge_keys(0, 0, 0, 5, 0, 0)
    # device_count() answers without a GPU or driver (0 then, not an error) and sees what torch sees
    count = m.device_count()
    assert isinstance(count, int)
    if torch.version.cuda is not None:  # a CUDA build of torch counts the same visible devices
        assert count == torch.cuda.device_count()
    elif not list(Path("/dev").glob("nvidia[0-9]*")):  # no GPU device node here
        assert count == 0


def _select_model(keys: np.ndarray, k: int, init=None, threads=256, items=4) -> np.ndarray:
    """The select kernel's algorithm in NumPy (rounds, threshold filter, buffer flushes)."""
    rnd = threads * items
    cap = 1 << (k + 2 * rnd - 1).bit_length()
    sentinel = np.iinfo(np.int64).min
    top = np.full(k, sentinel, np.int64) if init is None else init.copy()
    buf = []

    def flush():
        nonlocal top, buf
        top = np.sort(np.concatenate([top, np.array(buf, np.int64)]))[::-1][:k]
        buf = []
    for base in range(0, len(keys), rnd):
        thr = top[k - 1]
        buf += [x for x in keys[base:base + rnd] if x > thr]
        assert len(buf) <= cap - k
        if len(buf) > cap - k - rnd:
            flush()
    if buf:
        flush()
    return np.where(top == sentinel, np.int64(cs.EMPTY_KEY), top)


@pytest.mark.parametrize("n,k,kind", [(1, 1, "randn"), (5000, 32, "randn"), (3000, 1024, "ascending"),
                                      (2500, 7, "ties"), (10, 64, "randn")])
def test_select_algorithm_model(n, k, kind, rng):
    if kind == "ascending":
        s = np.arange(n, dtype=np.float32)
    elif kind == "ties":
        s = (rng.integers(-5, 6, n) / 3).astype(np.float32)
    else:
        s = rng.standard_normal(n).astype(np.float32)
    keys = pack_keys(torch.from_numpy(s), torch.arange(n)).numpy()
    got = _select_model(keys, k)
    kk = min(k, n)
    want = np.sort(keys)[::-1][:kk]
    assert np.array_equal(got[:kk], want)
    assert (got[kk:] == cs.EMPTY_KEY).all()


def _merge_model(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """merge_kernel's ranks: a[i] lands at i + #(b > a[i]), b[j] at j + #(a >= b[j]); ranks < k kept."""
    k = len(a)
    out = np.full(k, 7, np.int64)
    hit = np.zeros(k, int)
    neg_a, neg_b = -a, -b  # ascending copies for searchsorted
    for i in range(k):
        pa = i + int(np.searchsorted(neg_b, -a[i], side="left"))
        pb = i + int(np.searchsorted(neg_a, -b[i], side="right"))
        for pos, v in ((pa, a[i]), (pb, b[i])):
            if pos < k:
                out[pos] = v
                hit[pos] += 1
    assert (hit == 1).all(), "every output slot is written exactly once"
    return out


@pytest.mark.parametrize("k", [1, 2, 5, 32, 100])
def test_merge_algorithm_model(k, rng):
    for shared in (0, 3):  # equal keys across the lists (e.g. empty slots) too
        a = np.sort(rng.integers(-50, 50, k))[::-1].astype(np.int64)
        b = np.sort(rng.integers(-50, 50, k))[::-1].astype(np.int64)
        if shared:
            b[-min(shared, k):] = cs.EMPTY_KEY
            a[-min(shared, k):] = cs.EMPTY_KEY
            a, b = np.sort(a)[::-1].copy(), np.sort(b)[::-1].copy()
        want = np.sort(np.concatenate([a, b]))[::-1][:k]
        assert np.array_equal(_merge_model(a, b), want)


class _HostLib:
    """pyfk._C_cuda's select_topk / unpack_keys contract on host memory (raw pointers of CPU
    tensors), running the NumPy model of the kernel: checks the topk_update tile loop."""

    EMPTY_KEY = cs.EMPTY_KEY

    @staticmethod
    def _view(ptr, ctype, dtype, rows, cols, ld):
        count = (rows - 1) * ld + cols
        flat = np.ctypeslib.as_array((ctype * count).from_address(ptr))
        item = np.dtype(dtype).itemsize
        return np.lib.stride_tricks.as_strided(flat, (rows, cols), (ld * item, item))

    def select_topk(self, scores_ptr, rows, n, k, out_ptr, stream=0, *, ld=-1, index_offset=0, init_ptr=0):
        ld = n if ld < 0 else ld
        s = self._view(scores_ptr, ctypes.c_float, np.float32, rows, n, ld).copy()
        init = self._view(init_ptr, ctypes.c_int64, np.int64, rows, k, k).copy() if init_ptr else None
        out = self._view(out_ptr, ctypes.c_int64, np.int64, rows, k, k)
        ids = torch.arange(index_offset, index_offset + n)
        for r in range(rows):
            keys = pack_keys(torch.from_numpy(s[r]), ids).numpy()
            out[r] = _select_model(keys, k, None if init is None else init[r])

    def unpack_keys(self, keys_ptr, count, scores_ptr, index_ptr, stream=0):
        keys = self._view(keys_ptr, ctypes.c_int64, np.int64, 1, count, count)[0]
        sc, ix = unpack_keys(torch.from_numpy(keys.copy()))
        self._view(scores_ptr, ctypes.c_float, np.float32, 1, count, count)[0] = sc.numpy()
        self._view(index_ptr, ctypes.c_int64, np.int64, 1, count, count)[0] = ix.numpy()


@pytest.mark.parametrize("product,k,tile", [(True, 5, 128), (False, 9, 300), (True, 40, 128)])
def test_topk_update_loop_with_host_emulation(product, k, tile, rng):
    """cuda_select's tile loop (keys state, offsets, in-place init, unpack) against the reference."""
    widths = [5, 3, 4, 4] if product else [16]
    # Small integers: every GEMM is exact whatever its blocking, so ties are exact too.
    q = torch.from_numpy(rng.integers(-3, 4, (4, 16)).astype(np.float32))
    p = torch.from_numpy(rng.integers(-3, 4, (700, 16)).astype(np.float32))
    p[300:310] = p[0]  # ties across tiles: the smaller index must win
    scores = torch.full((4, k), float("-inf"))
    index = torch.full((4, k), -1, dtype=torch.int64)
    want = reference.topk_update(q, p[:650], widths, product, k, 1000, scores, index)
    want = reference.topk_update(q, p[650:], widths, product, k, 1650, *want)
    got = cs._update(_HostLib(), 0, q, p[:650], widths, product, k, 1000, scores, index, torch.float32, tile)
    got = cs._update(_HostLib(), 0, q, p[650:], widths, product, k, 1650, *got, torch.float32, tile)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_available_reports_a_reason_without_gpu():
    reason = cs.available()
    if torch.cuda.is_available() and cs._C_cuda is not None:
        assert reason is None
    else:
        assert isinstance(reason, str) and reason
        with pytest.raises(RuntimeError, match="cuda backend"):
            cs.topk_update(torch.zeros(2, 4), torch.zeros(3, 4), [2, 2], True, 1, 0,
                           torch.full((2, 1), float("-inf")), torch.full((2, 1), -1))


def test_host_helpers():
    assert cs.tile_columns(50_000, 32) == 2560
    assert cs.tile_columns(1, 32) % 128 == 0
    assert cs.tile_columns(10**9, 1000) == 1000  # at least k
    assert cs.tile_columns(10**9, 1) == 128
    assert cs.resolve_gemm_dtype("auto", torch.bfloat16) is torch.bfloat16
    assert cs.resolve_gemm_dtype("auto", torch.float16) is torch.float16
    assert cs.resolve_gemm_dtype("auto", torch.float64) is torch.float32
    assert cs.resolve_gemm_dtype("auto", None) is torch.float32
    assert cs.resolve_gemm_dtype("tf32") == "tf32"
    assert cs.resolve_gemm_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="gemm_dtype"):
        cs.resolve_gemm_dtype("int8")
    cs.check_args(10, 100, 1024, 0)
    cs.check_args(10, 2, 5, 2**32 - 3)
    with pytest.raises(ValueError, match="k: the cuda backend"):
        cs.check_args(10, 100, 1025, 0)
    with pytest.raises(ValueError, match="index"):
        cs.check_args(10, 3, 5, 2**32 - 3)


def test_scores_tile_matches_reference_on_cpu(rng):
    """The GEMM half of the backend (float32 path) is the reference similarity."""
    q = torch.from_numpy(rng.standard_normal((7, 12)).astype(np.float32))
    p = torch.from_numpy(rng.standard_normal((9, 12)).astype(np.float32))
    for widths, product in (([3, 3, 4, 2], True), ([12], False)):
        want = reference.similarity(q, p, widths, product)
        assert torch.allclose(cs.scores_tile(q, p, widths, product), want, atol=1e-5)


def test_gpu_suite_dry_run():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "plan:" in res.stdout and "dry run: imports ok" in res.stdout
    assert "imagenet" in res.stdout
    assert "Python.h: found" in res.stdout and "auto on cuda:" in res.stdout  # checked before any build


def test_gpu_suite_build_checks_headers_and_records_the_commit(monkeypatch, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    commit = suite.commit_id()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert commit.split("+")[0] == head.stdout.strip()
    monkeypatch.setattr(suite, "python_headers", lambda: "no Python.h in /nowhere")
    with pytest.raises(SystemExit, match="cannot build pyfk's extensions: no Python.h"):
        suite.build()
    assert set(suite.OWN_GPU_BACKENDS) <= set(suite.GPU_BACKENDS)


def test_backend_gemm_option(monkeypatch):
    """Option gemm reaches the GEMMs: None means $PYFK_CUDA_GEMM read at the call (else "auto",
    which follows the pool's dtype); a bad mode fails in resolve_options, before any work."""
    from pyfk.engine.layout import Layout
    from pyfk.engine.topk_state import TopK

    b = registry.get("cuda")
    assert b.options == {"gemm": None}
    for mode in (None, *cs.GEMM_MODES):
        assert b.resolve_options({"gemm": mode}) == {"gemm": mode}
    with pytest.raises(ValueError, match="gemm: expected None or one of"):
        b.resolve_options({"gemm": "int8"})
    with pytest.raises(ValueError, match="unknown.*'gemm_dtype'"):
        b.resolve_options({"gemm_dtype": "tf32"})

    seen = []

    def fake_update(q, p, widths, product, k, offset, scores, index, *, gemm_dtype):
        seen.append(gemm_dtype)
        return scores, index

    monkeypatch.setattr(cs, "topk_update", fake_update)
    layout = Layout((2, 2), "product")
    half = b.prepare([torch.ones(3, 2, dtype=torch.bfloat16)] * 2, layout, "none")
    full = b.prepare([torch.ones(3, 2)] * 2, layout, "none")
    q, state = torch.ones(1, 4), TopK.empty(1, 1)
    monkeypatch.delenv(cs.GEMM_ENV, raising=False)
    b.topk(q, half, slice(0, 3), 1, state, 0, b.resolve_options(None))
    b.topk(q, full, slice(0, 3), 1, state, 0, b.resolve_options(None))
    monkeypatch.setenv(cs.GEMM_ENV, "tf32")  # read at the call, not at import
    b.topk(q, full, slice(0, 3), 1, state, 0, b.resolve_options(None))
    b.topk(q, full, slice(0, 3), 1, state, 0, b.resolve_options({"gemm": "float16"}))  # the option wins
    assert seen == [torch.bfloat16, torch.float32, "tf32", torch.float16]


def test_a_failed_build_with_a_compiler_is_reported(tmp_path, monkeypatch):
    """setup.py leaves pyfk/_C_cuda_build_error.txt when a CUDA compiler was found but the build
    failed; the backend's reason then says so instead of a bare 'not built'."""
    assert cs.BUILD_ERROR == ROOT / "pyfk" / "_C_cuda_build_error.txt"  # beside the extension, where setup.py writes
    marker = tmp_path / "_C_cuda_build_error.txt"
    monkeypatch.setattr(cs, "_C_cuda", None)
    monkeypatch.setattr(cs, "IMPORT_ERROR", "the CUDA extension pyfk._C_cuda is not built or failed to load (x)")
    monkeypatch.setattr(cs, "BUILD_ERROR", marker)
    assert cs.available() == cs.IMPORT_ERROR
    marker.write_text("the CUDA module failed to build (exit status 2)\n")
    reason = cs.available()
    assert reason.startswith("pyfk._C_cuda failed to build although a CUDA compiler was found")
    assert "exit status 2" in reason
    assert registry.get("cuda").info()["reason"] == reason
    assert 'out_dir / "_C_cuda_build_error.txt"' in (ROOT / "setup.py").read_text()
