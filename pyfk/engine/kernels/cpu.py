"""Backend `cpu`: launcher for the fused C++ CPU kernels in `pyfk._C` (csrc/cpu).

Queries arrive normalised (M, D) float32; the pool arrives raw -- the user's own
per-scale arrays, float32 or float16, with a row slice or a row list -- and the
kernel gathers, converts and normalises rows while packing them, so the pool is
never copied. Other dtypes (float64, bfloat16) or strided columns are converted
one chunk at a time here.

The kernel tests every raw pool row it reads for NaN/Inf while converting it (before
normalising) and returns the first offending position per segment; the backend raises
after the pass (`checks_finite`), so the pool is not scanned beforehand.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pyfk.engine.backend import Backend, load_extension, raise_non_finite, register
from pyfk.engine.topk_state import TopK

_C, IMPORT_ERROR = load_extension("pyfk._C", "C++ extension")

ISA_ENV = "PYFK_CPU_ISA"  # process-wide default instruction set, read at every call

_NATIVE = (np.float32, np.float16)
_CALL_FLOPS = 1 << 36  # pool rows per call: ~0.1-0.5 s of work, so Ctrl-C and progress stay live


def isa() -> str:
    """The instruction set a call without an `isa` option uses here."""
    if _C is None:
        return "none"
    forced = default_isa()
    return _C.isa_default() if forced == "auto" else forced


def default_isa() -> str:
    """PYFK_CPU_ISA ("avx512", "avx2", "generic"; default "auto": the best this CPU runs)."""
    return os.environ.get(ISA_ENV, "auto") or "auto"


def _threads(threads):
    return int(threads) if threads else torch.get_num_threads()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _as_numpy(a):
    """A zero-copy NumPy view of torch CPU float32/float16; other tensors as they are."""
    if isinstance(a, torch.Tensor) and a.dtype in (torch.float32, torch.float16):
        return a.detach().numpy()
    return a


def _chunk_float32(a, sel) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        if not isinstance(sel, slice):
            sel = torch.as_tensor(sel)
        return a[sel].detach().float().contiguous().numpy()
    out = np.ascontiguousarray(a[sel], dtype=np.float32)
    return out.copy() if any(st < 0 for st in out.strides) else out  # one-row views keep a negative stride


def _native(a) -> bool:
    return (isinstance(a, np.ndarray) and a.dtype.type in _NATIVE
            and (a.shape[1] <= 1 or a.strides[1] == a.itemsize) and a.strides[0] >= 0)


def pool_segments(parts, sel):
    """(segments, rows) for _C: views and a row list, or converted chunk copies."""
    arrays = [_as_numpy(a) for a in parts]
    if not all(isinstance(a, (np.ndarray, torch.Tensor)) for a in arrays):
        # a row source (a sharded store's shards): just this chunk's rows, views where they lie in one shard
        arrays, sel = [np.asarray(a[sel]) for a in arrays], slice(None)
    if all(_native(a) for a in arrays):
        if isinstance(sel, slice):
            return [a[sel] for a in arrays], None
        return arrays, np.ascontiguousarray(sel, dtype=np.int64)
    return [_chunk_float32(a, sel) for a in arrays], None  # only this chunk is converted


def chunk_rows(m: int, width: int) -> int:
    return max(16384, _CALL_FLOPS // max(1, 2 * m * width))


def _rows_of(positions, sel, n: int) -> list[int]:
    """The kernel's per-segment first bad positions (-1: none) as pool rows of `sel`."""
    rows = range(*sel.indices(n)) if isinstance(sel, slice) else sel
    return [int(rows[p]) if p >= 0 else -1 for p in positions]


def topk_update(q, parts, sel, normalize, widths, product, k, index_offset, scores, index, *,
                threads=None, isa=None, split=None):
    """Fused top-k over the pool rows `sel` of the raw `parts`: (updated scores, index, first
    non-finite pool row per segment or -1). Where a row is not -1 the state is not valid."""
    segs, rows = pool_segments(parts, sel)
    s, ix = _np(scores), _np(index)
    bad = _C.topk_update(_np(q), segs, rows, normalize, bool(product), int(index_offset), s, ix,
                         _threads(threads), isa or default_isa(), split or "auto")
    return torch.from_numpy(s), torch.from_numpy(ix), _rows_of(bad, sel, int(parts[0].shape[0]))


def raw_similarity(q, parts, normalize, product, *, threads=None, isa=None):
    """Dense (M, N) scores of normalised q (M, D) against every raw pool row of `parts`,
    normalised while packed: (scores, first non-finite pool row per segment or -1)."""
    segs, _ = pool_segments(parts, slice(None))
    out = np.empty((q.shape[0], segs[0].shape[0]), dtype=np.float32)
    bad = _C.similarity(_np(q), segs, normalize, bool(product), out, _threads(threads), isa or default_isa())
    return torch.from_numpy(out), [int(b) for b in bad]


def similarity(q, p, widths, product, *, threads=None, isa=None):
    """Dense (M, N) scores of normalised q (M, D) against normalised p (N, D)."""
    p_np = _np(p)
    cols = np.cumsum([0, *widths])
    segs = [p_np[:, a:b] for a, b in zip(cols[:-1], cols[1:])]
    out = np.empty((q.shape[0], p.shape[0]), dtype=np.float32)
    # The kernel's NaN/Inf report is not needed here: p is a normalised copy of rows the
    # caller checked (KernelDistances over checked descriptors).
    _C.similarity(_np(q), segs, "none", bool(product), out, _threads(threads), isa or default_isa())
    return torch.from_numpy(out)


SPLITS = ("auto", "pool", "queries")


class CpuBackend(Backend):
    """Options: threads (None: torch.get_num_threads()), isa (None: $PYFK_CPU_ISA or "auto"),
    split (None/"auto": by size; "pool": threads take pool ranges and merge their heaps;
    "queries": threads take query panels, each packing the whole pool -- better for small pools).

    Threads come from a persistent pool inside pyfk._C (started on first use, grown to the
    largest count asked for), so small calls do not pay for thread creation."""

    name = "cpu"
    devices = ("cpu",)
    description = "fused C++ kernel (AVX-512/AVX2/SSE2), running top-k, persistent thread pool"
    options = {"threads": None, "isa": None, "split": None}
    auto_priority = {"cpu": 0}
    checks_finite = True  # the kernel tests raw pool rows while packing them

    def unavailable_reason(self):
        return IMPORT_ERROR

    def resolve_options(self, options):
        opts = super().resolve_options(options)
        threads, isa_name, split = opts["threads"], opts["isa"], opts["split"]
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 1):
            raise ValueError(f"options: 'threads' expected None or a positive integer, got {threads!r}")
        if isa_name is not None and not isinstance(isa_name, str):
            raise ValueError(f"options: 'isa' expected None or one of 'auto', 'avx512', 'avx2', 'generic', "
                             f"got {isa_name!r}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"options: 'split' expected None or one of {', '.join(map(repr, SPLITS))}, "
                             f"got {split!r}")
        return opts

    def chunk_rows(self, m, width, options):
        return chunk_rows(m, width)

    def topk(self, queries, pool, rows, k, state, offset, options):
        s, i, bad = topk_update(queries, pool.parts, rows, pool.normalize, pool.layout.widths,
                                pool.layout.product, k, offset, state.scores.clone(), state.index.clone(),
                                threads=options["threads"], isa=options["isa"], split=options["split"])
        raise_non_finite(pool.layout, bad)  # before anything is returned
        return TopK(s, i)

    def pool_similarity(self, queries, pool, options):
        out, bad = raw_similarity(queries, pool.parts, pool.normalize, pool.layout.product,
                                   threads=options["threads"], isa=options["isa"])
        raise_non_finite(pool.layout, bad)
        return out

    def similarity(self, queries, block, layout, options):
        return similarity(queries, block, layout.widths, layout.product, threads=options["threads"],
                          isa=options["isa"])


register(CpuBackend())
