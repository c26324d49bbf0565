"""Backend registry: one math, several engines.

Each backend offers `topk_update` (merge one pool block into a running (M, k)
state) and `similarity` (dense block) on normalised float32 torch tensors.
`resolve("auto", device)` picks the fastest available backend for a device.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from pyfk.engine.descriptors import normalized_block
from pyfk.engine.kernels import cpu as _cpu
from pyfk.engine.kernels import cuda as _cuda
from pyfk.engine.kernels import faiss as _faiss  # imports faiss itself only on first use
from pyfk.engine.kernels import torch as _reference
from pyfk.engine.kernels import triton as _triton

log = logging.getLogger("pyfk")


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says what is missing."""


@dataclass(frozen=True)
class Backend:
    """A search engine. Its callables:

    topk_update(q, parts, sel, normalize, widths, product, k, offset, scores, index)
        -> (scores, index): merge the top-k of normalised queries q (M, D) float32
        against pool rows `sel` (slice or sorted positions) of the raw per-segment
        arrays `parts` into the sorted (M, k) state; result index = offset + position.
    similarity(q, p, widths, product) -> (M, N): both sides normalised.
    chunk_rows(m, width) -> pool rows per topk_update call.
    """

    name: str
    devices: tuple[str, ...]
    description: str
    probe: Callable[[], str | None]  # None when available, else why not
    topk_update: Callable | None = None
    similarity: Callable | None = None
    chunk_rows: Callable[[int, int], int] | None = None
    exact: bool = True  # False: an approximate top-k (recall@k < 1); never chosen by "auto"

    def unavailable_reason(self) -> str | None:
        return self.probe()


def _always() -> None:
    return None


def _probe_cpu() -> str | None:
    return _cpu.IMPORT_ERROR


def _planned(piece: str) -> Callable[[], str]:
    def probe() -> str:
        return f"not implemented in this version of pyfk ({piece})"
    return probe


def _probe_module(module: str, then: Callable[[], str]) -> Callable[[], str]:
    def probe() -> str:
        if importlib.util.find_spec(module) is None:
            return f"the Python package '{module}' is not installed"
        return then()
    return probe


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def _torch_topk_update(q, parts, sel, normalize, widths, product, k, offset, scores, index):
    p = normalized_block(parts, sel, normalize, device=q.device)
    return _reference.topk_update(q, p, widths, product, k, offset, scores, index)


def _torch_chunk_rows(m: int, width: int) -> int:
    return max(1024, (256 << 20) // (4 * max(width, 1)))  # a ~256 MiB normalised float32 copy


register(Backend("cpu", ("cpu",), "fused C++ kernel (AVX-512/AVX2/SSE2), running top-k, std::thread",
                 _probe_cpu, _cpu.topk_update, _cpu.similarity, _cpu.chunk_rows))
register(Backend("torch", ("cpu", "cuda"), "reference: chunked torch GEMMs + exact running top-k merge",
                 _always, _torch_topk_update, _reference.similarity, _torch_chunk_rows))
register(Backend("triton", ("cuda",), "fused Triton Hadamard-Gram top-k (tl.dot, in-register bitonic top-k)",
                 _triton.available, _triton.backend_topk_update, _triton.similarity, _triton.chunk_rows))
register(Backend("cuda", ("cuda",), "torch GEMMs (Hadamard product of per-scale Grams) + CUDA k-selection "
                 "(pyfk._C_cuda: exact block select fused with the running top-k merge)",
                 _cuda.available, _cuda.registry_topk_update, _reference.similarity, _cuda.chunk_rows))
register(Backend("faiss", ("cpu", "cuda"),
                 f"exact: IndexFlatIP over explicit Kronecker features (up to {_faiss.KRON_MAX_WIDTH} columns), "
                 "exact re-ranking", _faiss.available, _faiss.exact_topk_update, _faiss.similarity,
                 _faiss.exact_chunk_rows))
register(Backend("faiss_ann", ("cpu", "cuda"),
                 "APPROXIMATE: TensorSketch + IVF/HNSW candidates, exact re-ranking (recall@k < 1; see AnnParams)",
                 _faiss.available, _faiss.ann_topk_update, _faiss.similarity, _faiss.ann_chunk_rows,
                 exact=False))

# Preference order for backend="auto", per device type.
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


def backends() -> list[dict]:
    """Every backend with whether it can run here and, if not, why."""
    rows = []
    for b in _REGISTRY.values():
        reason = b.unavailable_reason()
        rows.append({"name": b.name, "available": reason is None, "devices": list(b.devices),
                     "description": b.description, "reason": reason or "", "exact": b.exact})
    return rows


def resolve(name: str, device: torch.device) -> Backend:
    """The backend called `name` (or the best one for `device` if "auto")."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a backend name string, got {type(name).__name__}")
    dev = device.type
    if name == "auto":
        for candidate in _AUTO_ORDER.get(dev, ("torch",)):
            b = _REGISTRY[candidate]
            if b.unavailable_reason() is None:
                log.info("pyfk: backend='auto' chose %r for %s tensors", b.name, dev)
                return b
        raise BackendUnavailable(f"backend: no backend available for {dev} tensors")
    if name not in _REGISTRY:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    b = _REGISTRY[name]
    reason = b.unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
    if dev not in b.devices:
        raise ValueError(f"backend {name!r} runs on {list(b.devices)} tensors, got tensors on {dev}")
    return b
