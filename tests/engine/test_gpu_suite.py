"""benchmarks/gpu_suite.py's tuning phases on the CPU: the Triton kernel under the interpreter, the
suite's DEVICE set to "cpu" and its problems shrunk. What runs here is what runs on the GPU machine
(its timings mean nothing here); the checks the phases make (same answer across launch options,
recall 1.0 against the float32 reference) are real and must pass.
"""

import os

import torch  # noqa: E402 - does not import triton

if not torch.cuda.is_available():  # CPU: the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import tarfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pyfk.engine.kernels import _triton_filter as tf  # noqa: E402
from pyfk.engine.kernels import triton as tt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if tt.available() is not None:
    pytest.skip(f"triton backend unavailable: {tt.available()}", allow_module_level=True)


@pytest.fixture
def suite(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", ROOT / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not torch.cuda.is_available():
        monkeypatch.setattr(module, "DEVICE", "cpu")
    monkeypatch.setattr(module, "WIDTHS", (5, 16))  # product pairs of odd and aligned widths
    monkeypatch.setattr(module, "K", 6)
    monkeypatch.setattr(module, "CLASSES", 7)
    monkeypatch.setattr(module, "RECALL_QUERIES", 9)
    monkeypatch.setattr(module, "log", lambda msg="": None)
    return module


CASES = [("tiny", 20, 700, 5.0)]


def gemm(suite):
    from pyfk import bench as harness

    return harness.gemm_rate(64, 64, 64, device=suite.DEVICE)


def test_phase_list(suite):
    assert suite.phase_list("core") == list(suite.PHASE_GROUPS["core"])
    assert suite.phase_list("sweep") == ["gemm", "sweep"]  # the sweep reports % of the GEMM rate
    assert suite.phase_list("tests") == ["tests"]
    assert suite.phase_list("tests,kernels") == ["kernels", "tests"]  # PHASES order
    assert suite.phase_list("all", no_timing=True) == ["kernels", "correctness", "gemm", "tests"]
    with pytest.raises(ValueError, match="--phases: expected phases .* got 'speed'"):
        suite.phase_list("core,speed")
    with pytest.raises(ValueError, match="nothing to run"):
        suite.phase_list("sweep,profile", no_timing=True)


def test_sweep_checks_every_config_against_the_default(suite, monkeypatch):
    monkeypatch.setattr(suite, "SWEEP", [{}, {"block_m": 16, "block_n": 32, "num_stages": 2},
                                         {"block_n": 16, "group_m": 1, "programs": 3}])
    monkeypatch.setattr(suite, "SWEEP_REPEATS", 1)
    failures = []
    rows = suite.sweep_phase(["triton"], CASES, gemm(suite), failures, suite.Clock(600))
    assert failures == [] and len(rows) == 3
    for row in rows:
        assert row["same_answer"] is True and row["seconds"] > 0 and row["first_call_s"] > 0, row
        assert row["filter_stats"]["queries"] == 20 and row["filter_stats"]["pool_rows"] == 700

    # a configuration whose answer differs is a failure of the suite
    real = suite.timed

    def off_by_one(name, q, p, opts, g, repeats):
        row, (s, i) = real(name, q, p, opts, g, repeats)
        return row, (s, i if not opts else i.flip(1))

    monkeypatch.setattr(suite, "timed", off_by_one)
    failures = []
    rows = suite.sweep_phase(["triton"], CASES, gemm(suite), failures, suite.Clock(600))
    assert [r["same_answer"] for r in rows] == [True, False, False] and len(failures) == 2


def test_inputs_phase_times_and_checks_recall(suite, monkeypatch):
    monkeypatch.setattr(suite, "INPUTS", [("float16", "float16", "random"), ("classes-sorted", "float32", "sorted")])
    monkeypatch.setattr(suite, "TIMING_REPEATS", 1)
    failures = []
    rows = suite.inputs_phase(["triton", "torch"], CASES, gemm(suite), failures, suite.Clock(600))
    assert failures == []
    timed = [r for r in rows if "seconds" in r]
    assert [(r["input"], r["backend"]) for r in timed] == [("float16", "triton"), ("classes-sorted", "triton")]
    checked = [r for r in rows if "recall" in r]
    assert [r["recall"] for r in checked] == [1.0, 1.0] and all(r["queries"] == 9 for r in checked)


def test_class_descriptors_sorted_pool(suite):
    q, p = suite.make_inputs(20, 300, "float32", "sorted")
    assert (q.n, p.n) == (20, 300) and [a.shape[1] for a in p.z] == [5, 16]
    # sorted by class: consecutive rows share centres, so neighbouring rows correlate far more
    # than rows drawn at random do
    z = p.z[1]
    near = torch.nn.functional.cosine_similarity(z[:-1], z[1:]).mean()
    far = torch.nn.functional.cosine_similarity(z, z[torch.randperm(300)]).mean()
    assert near > far + 0.2, (near, far)
    with pytest.raises(ValueError, match="kind: expected"):
        suite.make_inputs(2, 3, "float32", "shuffled")


def test_profile_phase_records_every_stage(suite):
    rows = suite.profile_phase(["triton"], CASES, suite.Clock(600))
    assert [r["input"] for r in rows] == ["bf16", "bf16-classes-sorted"]
    for row in rows:
        assert "error" not in row, row
        assert set(row["seconds"]) == {"prepare", "queries", "sample", "threshold", "filter", "select"}
        assert row["queries"] == 20 and row["candidates"] >= 20 * 6
    assert tf.PROFILE is False  # switched off again
    assert suite.profile_phase(["torch"], CASES, suite.Clock(600)) == [{"skipped": "triton unavailable"}]


def test_time_guard_skips(suite):
    clock = suite.Clock(10)  # less left than any phase starts with
    assert all(r.get("skipped") == "time guard" for r in suite.sweep_phase(["triton"], CASES, gemm(suite), [], clock))
    assert all(r.get("skipped") == "time guard" for r in suite.inputs_phase(["triton"], CASES, gemm(suite), [], clock))


def test_tests_phase_counts_and_fails(suite, monkeypatch, tmp_path):
    (tmp_path / "test_two.py").write_text("def test_ok():\n    pass\n\n\ndef test_bad():\n    assert False\n")
    monkeypatch.setattr(suite, "GPU_TESTS", (str(tmp_path / "test_two.py"),))
    failures = []
    out = suite.tests_phase(tmp_path, failures, suite.Clock(600))
    assert (out["tests"], out["failures"], out["errors"]) == (2, 1, 0) and out["returncode"] == 1
    assert len(failures) == 1 and "1 failed" in failures[0]


def test_triton_cache_round_trip(suite, monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "unchanged")
    assert suite.triton_cache_in(None) is None and os.environ["TRITON_CACHE_DIR"] == "unchanged"
    folder = suite.triton_cache_in(str(tmp_path / "missing.tar.gz"))  # starts empty
    assert os.environ["TRITON_CACHE_DIR"] == folder and not any(Path(folder).iterdir())
    (Path(folder) / "abc").mkdir()
    (Path(folder) / "abc" / "kernel.cubin").write_bytes(b"\x00cubin")
    packed = Path(suite.triton_cache_out(folder, tmp_path))
    assert packed.name == "triton_cache.tar.gz"
    again = suite.triton_cache_in(str(packed))
    assert (Path(again) / "abc" / "kernel.cubin").read_bytes() == b"\x00cubin"

    evil = tmp_path / "evil.tar"  # a member outside the folder is refused, nothing written outside
    with tarfile.open(evil, "w") as tar:
        tar.add(Path(folder) / "abc" / "kernel.cubin", arcname="../escaped.cubin")
    with pytest.raises(tarfile.TarError):
        suite.triton_cache_in(str(evil))
    assert not (Path(folder).parent / "escaped.cubin").exists()
