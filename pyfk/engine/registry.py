"""The registry of backends: what can run here, and which one `backend="auto"` takes.

Importing this module imports pyfk.engine.kernels, whose modules register their
backends (pyfk.engine.backend.register). `resolve("auto", device)` takes the
available exact backend with the lowest `auto_priority` for the device type.
"""

from __future__ import annotations

import logging

import torch

import pyfk.engine.kernels  # noqa: F401  (registers the built-in backends)
from pyfk.engine.backend import REGISTRY, Backend, BackendUnavailable

log = logging.getLogger("pyfk")

__all__ = ["Backend", "BackendUnavailable", "auto_choice", "backends", "get", "resolve"]


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


def auto_choice(device) -> str:
    """The backend "auto" takes for tensors on `device` (a torch.device or a type string)."""
    dev = torch.device(device).type
    ranked = sorted((b for b in REGISTRY.values() if b.exact and dev in b.devices),
                    key=lambda b: getattr(b, "auto_priority", {}).get(dev, 100))
    for b in ranked:
        if b.unavailable_reason() is None:
            return b.name
    raise BackendUnavailable(f"backend: no backend available for {dev} tensors")


def resolve(name: str, device) -> Backend:
    """The backend called `name` (or the best one for `device` if "auto"), checked to run here."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a backend name string, got {type(name).__name__}")
    dev = torch.device(device).type
    if name == "auto":
        b = REGISTRY[auto_choice(dev)]
        log.info("pyfk: backend='auto' chose %r for %s tensors", b.name, dev)
        return b
    b = get(name)
    reason = b.unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"backend: {name!r} is not available here: {reason}")
    if not b.accepts(dev):
        raise ValueError(f"backend: {name!r} expected tensors on {list(b.devices)}, got tensors on {dev}")
    return b
