"""pytest-benchmark suite for pyfk.topk: `pytest benchmarks/` (add `-m "not large"` for the quick size).

Each case checks the backend's scores against the torch backend on a slice, then
times three rounds of one call; GFLOP/s (DESIGN.md section 6 flop count) goes
into the benchmark's extra_info, so `--benchmark-json` carries it. The tests after
it hold the harness (pyfk.bench) to what `pyfk bench` and benchmarks/gpu_suite.py
rely on; every input is seeded.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

import pyfk
from pyfk import bench
from pyfk.bench import BASELINE, check_scores, make_descriptors, topk_flops, topk_runner
from pyfk.engine import registry

K = 32
COMBINE = "product"
SIZES = {
    "small": {"M": 200, "N": 10000, "widths": (32, 64)},
    "issue": {"M": 1000, "N": 50000, "widths": (64, 128, 256, 512)},
}
AVAILABLE = {r["name"] for r in pyfk.backends() if r["available"]}
TINY = {"M": 12, "N": 500, "widths": [4, 6], "k": 5, "repeats": 1}
needs_cpu = pytest.mark.skipif("cpu" not in AVAILABLE, reason="the cpu backend (pyfk._C) is not built here")


@functools.lru_cache(maxsize=2)  # one entry per size; the issue size takes ~0.4 GB
def _inputs(size: str):
    s = SIZES[size]
    return make_descriptors(s["M"], s["widths"], seed=0), make_descriptors(s["N"], s["widths"], seed=1)


@pytest.mark.parametrize("size", [
    pytest.param("small"),
    pytest.param("issue", marks=pytest.mark.large),
])
@pytest.mark.parametrize("backend", ["cpu", "torch", BASELINE])
def test_topk(benchmark, backend, size):
    if backend not in AVAILABLE and backend != BASELINE:
        pytest.skip(f"backend {backend!r} is not available here")
    q, p = _inputs(size)
    s = SIZES[size]
    check_scores(backend, q, p, K, COMBINE)  # raises AssertionError on a mismatch, before any timing
    run = topk_runner(backend, q, p, K, COMBINE)  # pyfk.topk exactly as a user calls it (or the baseline)

    benchmark.group = f"topk-{size}"
    scores, index = benchmark.pedantic(run, rounds=3, iterations=1)
    assert tuple(scores.shape) == (s["M"], K) and tuple(index.shape) == (s["M"], K)

    flops = topk_flops(s["M"], s["N"], s["widths"], COMBINE)
    benchmark.extra_info.update({"M": s["M"], "N": s["N"], "widths": list(s["widths"]), "k": K,
                                 "combine": COMBINE, "gflop": flops / 1e9})
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops_median"] = flops / benchmark.stats.stats.median / 1e9


# ----------------------------------------------------------------------------- the harness itself

def test_flops_follow_design_section_6():
    M, N = 7, 11
    assert topk_flops(M, N, [3, 5], "product") == 4 * (3 + 5) * M * N
    assert topk_flops(M, N, [3, 5], "sum") == 2 * (2 * (3 + 5)) * M * N  # D = sum of z and g widths
    assert topk_flops(M, N, [3, 5], "features") == 2 * (3 + 5) * M * N


def test_descriptors_are_seeded():
    a, b, c = (make_descriptors(5, [3, 4], seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(a.z + a.g, b.z + b.g))
    assert not np.array_equal(a.z[0], c.z[0])
    t = make_descriptors(5, [3], dtype="bfloat16", seed=3)
    assert t.kind == "torch" and t.z[0].dtype == torch.bfloat16
    assert torch.equal(t.z[0], make_descriptors(5, [3], dtype="bfloat16", seed=3).z[0])


def test_auto_is_the_registry_choice():
    result = bench.run_bench(**TINY, backends=["auto"], baseline=False, peak=False, seed=1)
    (row,) = result["rows"]
    assert row["backend"] == "auto" and row["resolved"] == registry.auto_choice("cpu")
    assert row["seconds"] > 0 and row["max_abs_diff"] is not None


@needs_cpu
def test_options_reach_pyfk_topk(monkeypatch):
    calls = []
    real = pyfk.topk

    def spy(*args, **kwargs):
        calls.append((kwargs["backend"], kwargs.get("options")))
        return real(*args, **kwargs)

    monkeypatch.setattr(pyfk, "topk", spy)
    result = bench.run_bench(**TINY, backends=["cpu", "torch"], baseline=False, peak=False, seed=2,
                             options={"isa": "generic", "cpu.threads": 1})
    by = {r["backend"]: r for r in result["rows"]}
    assert by["cpu"]["options"] == {"isa": "generic", "threads": 1} and by["torch"]["options"] == {}
    assert by["cpu"]["isa"] == "generic" and by["cpu"]["threads"] == 1
    assert ("cpu", {"isa": "generic", "threads": 1}) in calls  # checked and timed with the options
    assert ("torch", None) in calls  # a backend without options is called as a user would
    assert result["args"]["options"] == {"isa": "generic", "cpu.threads": 1}
    assert "cpu [isa=generic, threads=1]" in bench.format_table(result)


def test_option_parsing_and_routing():
    assert bench.parse_options(["threads=2", "cpu.isa=avx2", "triton.allow_tf32=true", "x=none", "f=0.5"]) == {
        "threads": 2, "cpu.isa": "avx2", "triton.allow_tf32": True, "x": None, "f": 0.5}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        bench.parse_options(["threads"])
    routed = bench.backend_options({"isa": "avx2"}, {"auto": "cpu", "torch": "torch"})
    assert routed == {"auto": {"isa": "avx2"}, "torch": {}}
    with pytest.raises(ValueError, match="no benchmarked backend accepts 'nope'"):
        bench.backend_options({"nope": 1}, {"cpu": "cpu", "torch": "torch"})
    with pytest.raises(ValueError, match="not among the benchmarked"):
        bench.backend_options({"triton.splits": 2}, {"cpu": "cpu"})


def test_check_scores_catches_a_wrong_backend(monkeypatch):
    q, p = make_descriptors(6, [4], seed=5), make_descriptors(300, [4], seed=6)
    assert check_scores("torch", q, p, 4, COMBINE) == 0.0
    real = pyfk.topk

    def off_by_one(*args, **kwargs):  # every backend but the reference answers with shifted scores
        s, i = real(*args, **kwargs)
        return (s, i) if kwargs["backend"] == "torch" else (s + 1.0, i)

    monkeypatch.setattr(pyfk, "topk", off_by_one)
    with pytest.raises(AssertionError, match="differ from the torch backend"):
        check_scores("auto", q, p, 4, COMBINE)


def test_json_keeps_its_fields(tmp_path):
    result = bench.run_bench(**TINY, backends=["torch"], seed=3)
    path = bench.write_json(tmp_path / "sub" / "r.json", result)
    data = json.loads(path.read_text())
    for key in ("args", "argv", "date", "machine", "flops", "mn_matrix_mib", "gemm", "rows"):
        assert key in data
    for key in ("cpu", "cpu_count", "torch_threads", "torch", "pyfk", "isa", "loadavg_1min"):
        assert key in data["machine"]
    assert data["gemm"]["gflops"] > 0
    assert [r["backend"] for r in data["rows"]] == ["torch", BASELINE]
    for row in data["rows"]:
        for key in ("backend", "resolved", "seconds", "times", "gflops", "pct_gemm", "speedup", "peak_mib",
                    "max_abs_diff", "recall", "note"):
            assert key in row
        assert row["gflops"] == pytest.approx(data["flops"] / row["seconds"] / 1e9)
    assert data["rows"][1]["speedup"] == pytest.approx(1.0)


def test_budget_mode_scales_a_slice():
    result = bench.run_bench(300, 2000, [8], k=4, backends=["torch"], baseline=False, peak=False, seed=4,
                             repeats=2, budget=1e-6)
    (row,) = result["rows"]
    assert row["scaled"] and row["measured_m"] == 256
    assert row["seconds"] == pytest.approx(row["times"][0] * 300 / 256)
    assert "est." in bench.format_table(result)


def test_unavailable_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ValueError, match="CUDA is not available"):
        bench.run_bench(**TINY, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_is_synchronised_and_checked():
    result = bench.run_bench(64, 4096, [16, 32], k=8, dtype="bfloat16", device="cuda", repeats=2, seed=5)
    assert result["machine"]["gpu"]["name"] and result["gemm"]["dtype"] == "bfloat16"
    for row in result["rows"]:
        assert row["seconds"] > 0 and row["peak_mib"] is not None
