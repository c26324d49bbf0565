"""The registry of backends: what can run here, and which one `backend="auto"` takes.

Importing this module imports pyfk.engine.kernels, whose modules register their
backends (pyfk.engine.backend.register). `resolve("auto", device)` takes the
available exact backend with the lowest `auto_priority` for the device type (the
fixed order). On CUDA, given the problem's shape (`resolve("auto", device, problem)`,
as pyfk.topk/search/similarity/select pass it), it takes instead the backend that was
fastest for the nearest measured problem on this GPU (pyfk.engine.measured), among the
available exact backends that declare an `auto_priority` for CUDA (so not faiss, whose
exact mode refuses wide problems); with no usable measurement, the fixed order.
`auto_reason` says why.
"""

from __future__ import annotations

import logging

import torch

import pyfk.engine.kernels  # noqa: F401  (registers the built-in backends)
from pyfk.engine import measured
from pyfk.engine.backend import REGISTRY, Backend, BackendUnavailable

log = logging.getLogger("pyfk")

__all__ = ["Backend", "BackendUnavailable", "auto_choice", "auto_decision", "auto_reason", "backends", "get",
           "resolve"]


def backends() -> list[dict]:
    """Every backend with whether it can run here and, if not, why."""
    return [b.info() for b in REGISTRY.values()]


def get(name: str) -> Backend:
    """The registered backend called `name` (available or not)."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a backend name string, got {type(name).__name__}")
    if name not in REGISTRY:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def auto_decision(device, problem=None) -> tuple[str, str]:
    """(name, reason): the backend "auto" takes for tensors on `device` (a torch.device or a
    type string) and why. problem: None, or a pyfk.engine.measured.Problem (or a dict of its
    fields) -- used on CUDA only; the CPU always takes the fixed order."""
    dev = torch.device(device)
    if problem is not None:
        problem = measured.as_problem(problem)  # checked on every device: one error wherever it runs
    ranked = sorted((b for b in REGISTRY.values() if b.exact and dev.type in b.devices),
                    key=lambda b: getattr(b, "auto_priority", {}).get(dev.type, 100))
    why = "fixed order"
    if dev.type == "cuda" and problem is None:
        why = "no problem shape given: fixed order"
    elif dev.type == "cuda":
        # measured choices only among backends meant for auto (an auto_priority for CUDA)
        candidates = [b.name for b in ranked if dev.type in getattr(b, "auto_priority", {})
                      and b.unavailable_reason() is None]
        if candidates:
            gpu, capability = measured.current_gpu(dev)
            return measured.choose_backend(measured.table_entries(), gpu, capability, problem, candidates)
        why = "none of the backends meant for auto is available: fixed order"
    for b in ranked:  # lazily: a backend's availability check may import its library
        if b.unavailable_reason() is None:
            return b.name, why
    raise BackendUnavailable(f"backend: no backend available for {dev.type} tensors")


def auto_choice(device, problem=None) -> str:
    """The backend "auto" takes for tensors on `device` (see `auto_decision`)."""
    return auto_decision(device, problem)[0]


def auto_reason(device, problem=None) -> str:
    """Why "auto" takes `auto_choice(device, problem)`: the measurement it went by, or the fixed order."""
    return auto_decision(device, problem)[1]


def resolve(name: str, device, problem=None) -> Backend:
    """The backend called `name` (or the best one for `device` and `problem` if "auto", see
    `auto_decision`), checked to run here."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a backend name string, got {type(name).__name__}")
    dev = torch.device(device).type
    if name == "auto":
        chosen, reason = auto_decision(device, problem)
        b = REGISTRY[chosen]
        log.info("pyfk: backend='auto' chose %r for %s tensors (%s)", b.name, dev, reason)
        return b
    b = get(name)
    reason = b.unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"backend: {name!r} is not available here: {reason}")
    if not b.accepts(dev):
        raise ValueError(f"backend: {name!r} expected tensors on {list(b.devices)}, got tensors on {dev}")
    return b
