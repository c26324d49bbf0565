"""pytest-benchmark: approximate `faiss_ann` (TensorSketch + IVF, exact re-ranking) against the exact `cpu` top-k.

    pytest benchmarks/test_bench_faiss.py                 # add -m "not large" for the quick size

Cases per size: `cpu` (exact, pyfk.topk), `faiss_ann` (index build + search + re-rank, one
call as pyfk.topk makes it) and `faiss_ann_search` (search + re-rank on a prebuilt index,
what repeated queries against one pool pay). The pool is clustered (Gaussian clusters,
like class-structured descriptors); on unstructured random descriptors no sketch index
has useful recall. recall@k against the exact answer goes into extra_info.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

import pyfk
from pyfk.engine.kernels import faiss_ann

if faiss_ann.FaissAnnBackend().unavailable_reason() is not None:
    pytest.skip(faiss_ann.FaissAnnBackend().unavailable_reason(), allow_module_level=True)

from pyfk.engine.descriptors import normalized_block  # noqa: E402
from pyfk.engine.layout import Layout  # noqa: E402

K = 32
COMBINE = "product"
NORMALIZE = "pcc"
SIZES = {
    "small": {"M": 200, "N": 20000, "widths": (16, 32), "clusters": 200},
    "large": {"M": 1000, "N": 200000, "widths": (16, 32), "clusters": 2000},
}
PARAMS = faiss_ann.AnnParams(width=256, index="ivf", nlist=1024, nprobe=2, candidates=128)
AVAILABLE = {r["name"] for r in pyfk.backends() if r["available"]}


def clustered(n: int, widths, clusters: int, seed: int, sigma: float = 0.3) -> pyfk.Descriptors:
    """n rows drawn around `clusters` shared Gaussian centres (per scale, z and g), NumPy float32."""
    centres = np.random.default_rng(1234)
    rng = np.random.default_rng(seed)
    label = rng.integers(0, clusters, n)
    z, g = [], []
    for w in widths:
        cz = centres.standard_normal((clusters, w), dtype=np.float32)
        cg = centres.standard_normal((clusters, w), dtype=np.float32)
        z.append(cz[label] + sigma * rng.standard_normal((n, w), dtype=np.float32))
        g.append(cg[label] + sigma * rng.standard_normal((n, w), dtype=np.float32))
    return pyfk.Descriptors(z=z, g=g)


@functools.lru_cache(maxsize=1)
def _inputs(size: str):
    s = SIZES[size]
    q = clustered(s["M"], s["widths"], s["clusters"], seed=0)
    p = clustered(s["N"], s["widths"], s["clusters"], seed=1)
    exact = np.asarray(pyfk.topk(q, p, K, combine=COMBINE, normalize=NORMALIZE, backend="cpu")[1])
    return q, p, exact


def _prepared(q, p):
    q_parts, layout = Layout.of(q, COMBINE)
    p_parts, _ = Layout.of(p, COMBINE)
    return normalized_block(q_parts, slice(None), NORMALIZE), p_parts, layout.widths, layout.product


def ann_topk(q, p, k, params=PARAMS):
    """faiss_ann through pyfk.topk, its parameters passed as backend options."""
    return pyfk.topk(q, p, k, combine=COMBINE, normalize=NORMALIZE, backend="faiss_ann",
                     options=dataclasses.asdict(params))


@pytest.mark.parametrize("size", [pytest.param("small"), pytest.param("large", marks=pytest.mark.large)])
@pytest.mark.parametrize("case", ["cpu", "faiss_ann", "faiss_ann_search"])
def test_faiss_ann(benchmark, case, size):
    if case == "cpu" and "cpu" not in AVAILABLE:
        pytest.skip("backend 'cpu' is not available here")
    q, p, exact = _inputs(size)
    s = SIZES[size]
    if case == "cpu":
        def run():
            return pyfk.topk(q, p, K, combine=COMBINE, normalize=NORMALIZE, backend="cpu")
    elif case == "faiss_ann":
        def run():
            return ann_topk(q, p, K)
    else:
        qn, p_parts, widths, product = _prepared(q, p)
        index = faiss_ann.AnnIndex(p_parts, slice(0, p.n), NORMALIZE, widths, product, PARAMS)

        def run():
            return index.search(qn, K)

    benchmark.group = f"faiss-ann-{size}"
    rounds = 1 if case == "faiss_ann" and size == "large" else 3
    scores, index_ = benchmark.pedantic(run, rounds=rounds, iterations=1)
    recall = faiss_ann.recall_at_k(np.asarray(index_), exact)
    benchmark.extra_info.update({"M": s["M"], "N": s["N"], "widths": list(s["widths"]), "k": K,
                                 "combine": COMBINE, "recall_at_k": recall, "params": str(PARAMS)})
    assert tuple(np.asarray(index_).shape) == (s["M"], K)
    if case == "cpu":
        assert recall == 1.0
