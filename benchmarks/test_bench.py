"""pytest-benchmark suite for pyfk.topk: `pytest benchmarks/` (add `-m "not large"` for the quick size).

Each case checks the backend's scores against the torch backend on a slice, then
times three rounds of one call; GFLOP/s (DESIGN.md section 6 flop count) goes
into the benchmark's extra_info, so `--benchmark-json` carries it.
"""

from __future__ import annotations

import functools

import pytest

import pyfk
from pyfk.bench import BASELINE, check_scores, make_descriptors, materialise_topk, topk_flops

K = 32
COMBINE = "product"
SIZES = {
    "small": {"M": 200, "N": 10000, "widths": (32, 64)},
    "issue": {"M": 1000, "N": 50000, "widths": (64, 128, 256, 512)},
}
AVAILABLE = {r["name"] for r in pyfk.backends() if r["available"]}


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

    if backend == BASELINE:
        def run():
            return materialise_topk(q, p, K, COMBINE)
    else:
        def run():
            return pyfk.topk(q, p, K, combine=COMBINE, normalize="pcc", backend=backend)

    benchmark.group = f"topk-{size}"
    scores, index = benchmark.pedantic(run, rounds=3, iterations=1)
    assert tuple(scores.shape) == (s["M"], K) and tuple(index.shape) == (s["M"], K)

    flops = topk_flops(s["M"], s["N"], s["widths"], COMBINE)
    benchmark.extra_info.update({"M": s["M"], "N": s["N"], "widths": list(s["widths"]), "k": K,
                                 "combine": COMBINE, "gflop": flops / 1e9})
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops_median"] = flops / benchmark.stats.stats.median / 1e9
