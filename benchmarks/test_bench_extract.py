"""pytest-benchmark suite for descriptor extraction: `pytest benchmarks/test_bench_extract.py`
(add `-m "not large"` to skip the ResNet-18 cases).

For each model, the same in-memory DataLoader of random images goes through
`pyfk.extract` (argmax pseudo labels, in memory), a plain forward + summed
cross-entropy backward with weight gradients (a training step without the
optimizer) and a no_grad forward; images/s goes into extra_info. DESIGN.md
section 6 asks extract >= 0.85x the plain forward+backward (see
`pyfk bench-extract` for the ratio in one table).
"""

from __future__ import annotations

import functools

import pytest
import torch

from pyfk.al.models import default_layers
from pyfk.bench_extract import CONFIGS, _Setup, make_loader, make_model, run_extract, run_forward, run_plain

BATCH = 128
SEED = 0  # the weights and the images (and their labels) are seeded


@functools.lru_cache(maxsize=2)
def _case(model: str):
    net = make_model(model, seed=SEED)
    loader = make_loader(model, CONFIGS[model]["n"], BATCH, seed=SEED)
    return net, loader


@pytest.mark.parametrize("model", [
    pytest.param("lenet"),
    pytest.param("resnet18", marks=pytest.mark.large),
])
@pytest.mark.parametrize("method", ["extract", "plain", "forward"])
def test_extract_vs_plain(benchmark, model, method):
    net, loader = _case(model)
    setup = _Setup(torch.device("cpu"))
    layers = default_layers(model)
    run = {
        "extract": lambda: run_extract(net, loader, layers, setup),
        "plain": lambda: run_plain(net, loader, setup),
        "forward": lambda: run_forward(net, loader, setup),
    }[method]
    benchmark.group = f"extract-{model}"
    result = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    n = len(loader.dataset)
    if method == "extract":
        assert len(result) == n and [z.shape[1] for z in result.descriptors.z]
    benchmark.extra_info.update({"model": model, "n": n, "batch_size": BATCH, "method": method,
                                 "threads": torch.get_num_threads()})
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = n / benchmark.stats.stats.median
