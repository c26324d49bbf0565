"""Launcher for the fused C++ CPU kernels in `pyfk._C` (csrc/cpu)."""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    from pyfk import _C
    IMPORT_ERROR = None
except ImportError as exc:  # the package still imports; backends() says why
    _C = None
    IMPORT_ERROR = f"the C++ extension pyfk._C is not built or failed to load ({exc})"


# Instruction set used when a call does not name one: "auto" picks the best the
# CPU runs; tests set "avx2"/"generic" to exercise every variant on one machine.
DEFAULT_ISA = os.environ.get("PYFK_CPU_ISA", "auto")


def isa() -> str:
    return _C.isa_default() if _C is not None else "none"


def _threads(threads):
    return int(threads) if threads else torch.get_num_threads()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def topk_update(q, p, widths, product, k, index_offset, scores, index, *, threads=None, isa=None):
    """Fused top-k over one pool block; updates and returns the (M, k) state."""
    s, ix = _np(scores), _np(index)
    _C.topk_update(_np(q), _np(p), list(widths), bool(product), int(index_offset), s, ix,
                   _threads(threads), isa or DEFAULT_ISA)
    return torch.from_numpy(s), torch.from_numpy(ix)


def similarity(q, p, widths, product, *, threads=None, isa=None):
    out = np.empty((q.shape[0], p.shape[0]), dtype=np.float32)
    _C.similarity(_np(q), _np(p), list(widths), bool(product), out, _threads(threads), isa or DEFAULT_ISA)
    return torch.from_numpy(out)
