"""The backend contract: one protocol every engine implements, and self-registration.

A backend is one module in pyfk/engine/kernels/ (named after it) holding a subclass
of `Backend` and a `register(...)` call. The search loop (pyfk.engine.search) only
ever calls:

    reason = b.unavailable_reason()                  # None, or why it cannot run here
    opts   = b.resolve_options(options)              # defaults + the caller's, unknown keys rejected
    pool   = b.prepare(parts, layout, normalize)     # once per pool; reusable across calls
    state  = b.topk(queries, pool, rows, k, state, offset, opts)   # merge one chunk into a TopK
    R      = b.similarity(queries, block, layout, opts)            # dense, both sides normalised
    R      = b.pool_similarity(queries, pool, opts)                 # dense, against a whole raw pool

`queries` are normalised float32 (M, D) rows in `layout` order on the pool's
device; `rows` is a slice or a sorted int64 array of pool positions; the i-th of
those rows gets index `offset + i` in the returned state (the caller maps it back
to a pool index). The M x N matrix is never required: a backend holds at most
one chunk's worth of scores.

NaN/Inf in the pool: by default the engine scans the pool (`Descriptors.check_finite`)
before a backend sees it. A backend with `checks_finite = True` tests the raw pool rows
itself while it reads them in `topk` and `pool_similarity` (before normalising) and calls
`raise_non_finite` after its pass, so a memory-mapped pool is read once per call; the
engine then scans only float64 arrays (whose float32 range is known only from the values).
Such a backend checks the rows it reads: excluded rows, and g under combine="features",
are not looked at.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pyfk.engine.descriptors import non_finite_message, normalized_block
from pyfk.engine.layout import Layout
from pyfk.engine.topk_state import TopK

# A normalised pool up to this many bytes may be kept (on its device) by PreparedPool.keep().
CACHE_BYTES = 1 << 30
# Rows per normalised chunk when the pool is not kept: about this many bytes of float32.
STREAM_BYTES = 256 << 20


def load_extension(module: str, what: str):
    """(module, None) if the compiled extension imports, else (None, why not) -- so `import pyfk`
    survives a missing build and pyfk.backends() can say why. importlib, not `from pyfk import`:
    a missing module then reads "No module named ...", not "partially initialized module"."""
    try:
        return importlib.import_module(module), None
    except ImportError as exc:
        return None, f"the {what} {module} is not built or failed to load ({exc})"


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says what is missing."""


class PreparedPool:
    """A pool as the backends read it: the raw per-segment arrays in layout order (the
    user's own arrays or a store's memmaps; never copied as a whole), the Layout, the
    normalisation, and -- after `keep()` -- a normalised float32 copy on the device.

    `block(rows)` gives normalised float32 rows (from the copy if kept). `diag()` is
    R(x, x) per row, computed once. Backends may cache their own state in `extra`
    (e.g. an index built over the pool), keyed by what it depends on.
    """

    def __init__(self, parts: list, layout: Layout, normalize: str, device: torch.device | None = None):
        if len(parts) != len(layout.widths):
            raise ValueError(f"parts: expected {len(layout.widths)} segments for {layout}, got {len(parts)}")
        self.parts = list(parts)
        self.layout = layout
        self.normalize = normalize
        first = self.parts[0]
        self.device = torch.device(device) if device is not None else (
            first.device if isinstance(first, torch.Tensor) else torch.device("cpu"))
        self.n = int(first.shape[0])
        self.normalized: torch.Tensor | None = None
        self.extra: dict[Any, Any] = {}
        self._diag: np.ndarray | None = None

    def keep(self, max_bytes: int = CACHE_BYTES) -> bool:
        """Keep a normalised float32 copy if it fits in `max_bytes`; returns whether it is kept."""
        if self.normalized is None and self.n * self.layout.width * 4 <= max_bytes:
            self.normalized = normalized_block(self.parts, slice(None), self.normalize, device=self.device)
        return self.normalized is not None

    @property
    def stream_rows(self) -> int:
        """Rows per chunk when walking the whole pool."""
        if self.normalized is not None:
            return max(1, self.n)
        return max(1, STREAM_BYTES // (4 * self.layout.width))

    def block(self, rows=slice(None)) -> torch.Tensor:
        """Normalised float32 rows (a slice or an int64 array of positions), (len(rows), D)."""
        if self.normalized is not None:
            if isinstance(rows, slice):
                return self.normalized[rows]
            return self.normalized[torch.as_tensor(np.asarray(rows), device=self.device)]
        return normalized_block(self.parts, rows, self.normalize, device=self.device)

    def diag(self) -> np.ndarray:
        """(N,) float64 R(x, x) of every pool row."""
        if self._diag is None:
            out = np.empty(self.n, dtype=np.float64)
            step = self.stream_rows
            for start in range(0, self.n, step):
                stop = min(self.n, start + step)
                out[start:stop] = self.layout.self_similarity(self.block(slice(start, stop))).double().cpu().numpy()
            self._diag = out
        return self._diag


def raise_non_finite(layout: Layout, first_rows, name: str = "pool") -> None:
    """For a backend with `checks_finite`: `first_rows[s]` is the first pool row of layout
    segment s in which it found NaN or Inf (-1: none). If any, raise the ValueError
    `Descriptors.check_finite` would: the smallest such row, then the first array at that
    row in Descriptors order (z[0], z[1], ..., g[0], ...)."""
    hits = [(int(row), part == "g", j, part) for (part, j), row in zip(layout.segment_parts(), first_rows)
            if row >= 0]
    if hits:
        row, _, j, part = min(hits)
        raise ValueError(non_finite_message(name, part, j, row))


class Backend(abc.ABC):
    """One search engine. Subclasses set the class attributes and implement the methods."""

    name: str = ""
    devices: tuple[str, ...] = ()
    description: str = ""
    exact: bool = True  # False: an approximate top-k (recall@k < 1); never chosen by "auto"
    # True: topk() and pool_similarity() test every raw pool row they read for NaN/Inf and
    # raise (raise_non_finite) after their pass, returning nothing; the engine then skips its
    # own pre-scan of the pool (float64 arrays excepted; see the module docstring).
    checks_finite: bool = False
    options: Mapping[str, Any] = {}  # option names and defaults, reachable as pyfk.topk(..., options={...})

    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """None when the backend can run here, else a sentence naming what is missing."""

    def resolve_options(self, options: Mapping[str, Any] | None) -> dict:
        """The defaults updated with `options`; an unknown name raises ValueError. A subclass
        may override it to check the values too (call this first), as triton, cuda and
        faiss_ann do."""
        if options is None:
            return dict(self.options)
        if not isinstance(options, Mapping):
            raise TypeError(f"options: expected a dict of backend options, got {type(options).__name__}")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"options: backend {self.name!r} accepts {sorted(self.options) or 'no options'}, "
                             f"got unknown {unknown}")
        return {**self.options, **options}

    def accepts(self, device_type: str) -> bool:
        """Whether pyfk.topk/select may run this backend on tensors of `device_type` ("cpu",
        "cuda"): `devices`, plus what a subclass allows for testing (triton: CPU tensors under the
        Triton interpreter). `devices` alone is what "auto" and the every-backend tests enumerate."""
        return device_type in self.devices

    def prepare(self, parts: list, layout: Layout, normalize: str, device=None) -> PreparedPool:
        """Whatever is done once per pool (normalise, convert, cache); reused across calls."""
        return PreparedPool(parts, layout, normalize, device)

    def chunk_rows(self, m: int, width: int, options: Mapping[str, Any]) -> int:
        """Pool rows per `topk` call (bounds memory and keeps progress and Ctrl-C live)."""
        return max(1024, STREAM_BYTES // (4 * max(width, 1)))

    @abc.abstractmethod
    def topk(self, queries: torch.Tensor, pool: PreparedPool, rows, k: int, state: TopK, offset: int,
             options: Mapping[str, Any]) -> TopK:
        """`state` merged with the top-k of `queries` against pool `rows` (see the module docstring)."""

    def similarity(self, queries: torch.Tensor, block: torch.Tensor, layout: Layout,
                   options: Mapping[str, Any]) -> torch.Tensor:
        """Dense (M, N) float32 R of normalised queries and normalised pool rows (default: the reference)."""
        return layout.similarity(queries.float(), block.float())

    def pool_similarity(self, queries: torch.Tensor, pool: PreparedPool, options: Mapping[str, Any]) -> torch.Tensor:
        """Dense (M, N) float32 R of normalised queries and every row of a prepared pool
        (default: `similarity` of its normalised block). A backend with `checks_finite` reads
        the raw rows here and raises on NaN/Inf."""
        return self.similarity(queries, pool.block(), pool.layout, options)

    def info(self) -> dict:
        reason = self.unavailable_reason()
        return {"name": self.name, "available": reason is None, "devices": list(self.devices),
                "description": self.description, "reason": reason or "", "exact": self.exact,
                "options": dict(self.options)}


REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend instance under its name (a backend module calls this when imported)."""
    if not isinstance(backend, Backend) or not backend.name:
        raise TypeError(f"backend: expected a named pyfk Backend instance, got {backend!r}")
    REGISTRY[backend.name] = backend
    return backend
