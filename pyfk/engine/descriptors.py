"""Multi-scale descriptors (z_j, g_j) and their normalisation.

A `Descriptors` holds, for n examples and S scales, feature matrices z_j and
(optionally) gradient matrices g_j, each of shape (n, L_j). Arrays are kept as
given (NumPy or torch, any float dtype); kernels receive normalised float32
copies of row chunks, so a pool is never duplicated as a whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from pyfk.engine.layout import COMBINES  # noqa: F401  (re-exported)

NORMALIZES = ("pcc", "l2", "none")
EPS = 1e-10

_NUMPY_FLOATS = (np.float16, np.float32, np.float64)
_TORCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(a) -> str:
    return f"{type(a).__name__} of shape {tuple(getattr(a, 'shape', ()))} and dtype {getattr(a, 'dtype', '?')}"


def is_row_source(a) -> bool:
    """A read-only row source (`__pyfk_rows__`, e.g. pyfk.features.sharded.ConcatRows: a sharded
    store's shards as one array): shape, dtype and ndim like a NumPy array, and a[slice] /
    a[int64 array] return NumPy arrays of just those rows. The engine reads it by row blocks and
    never converts it as a whole."""
    return not isinstance(a, (np.ndarray, torch.Tensor)) and bool(getattr(type(a), "__pyfk_rows__", False))


def _check_array(a, name: str):
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected a plain NumPy array or torch tensor, got a NumPy masked array "
                        "(np.ma.MaskedArray); fill or drop the masked entries first")
    if isinstance(a, np.ndarray):
        if a.dtype.type not in _NUMPY_FLOATS:
            raise TypeError(f"{name}: expected a float16/float32/float64 array, got dtype {a.dtype}")
        kind = "numpy"
    elif isinstance(a, torch.Tensor):
        if a.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) torch tensor, got layout {a.layout}; "
                            "call .to_dense() first")
        if a.dtype not in _TORCH_FLOATS:
            raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got dtype {a.dtype}")
        kind = "torch"
    elif is_row_source(a):
        if np.dtype(a.dtype).type not in _NUMPY_FLOATS:
            raise TypeError(f"{name}: expected a float16/float32/float64 array, got dtype {a.dtype}")
        kind = "numpy"
    else:
        raise TypeError(f"{name}: expected a NumPy array or torch tensor, got {type(a).__name__}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (n, L), got {_describe(a)}")
    if a.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one column, got {_describe(a)}")
    return kind


class Descriptors:
    """Per-example multi-scale descriptors.

    Args:
        z: sequence of S arrays (n, L_j) -- pooled activations per scale (a single
           2-D array is taken as one scale).
        g: None or a sequence of S arrays (n, L_j) -- pooled loss gradients, same
           widths as z. Needed for combine="product"/"sum".

    All arrays are NumPy or all are torch tensors on one device; float16, float32,
    float64 (and bfloat16 for torch) are accepted. Kernels compute in float32.
    same_widths=False lets g_j have its own width (two-factor kernels such as the
    BADGE embedding (p - onehot) x [h, 1], whose widths are C and H + 1).
    """

    def __init__(self, z, g=None, *, same_widths: bool = True):
        z = self._as_list(z, "z")
        if not z:
            raise ValueError("z: expected at least one scale, got an empty sequence")
        g = None if g is None else self._as_list(g, "g")
        kinds = {_check_array(a, f"z[{j}]") for j, a in enumerate(z)}
        if g is not None:
            if len(g) != len(z):
                raise ValueError(f"g: expected {len(z)} scales to match z, got {len(g)}")
            kinds |= {_check_array(a, f"g[{j}]") for j, a in enumerate(g)}
        if len(kinds) != 1:
            raise TypeError("z/g: expected all NumPy arrays or all torch tensors, got a mix")
        self.kind = kinds.pop()
        n = z[0].shape[0]
        for name, arrays in (("z", z), ("g", g or [])):
            for j, a in enumerate(arrays):
                if a.shape[0] != n:
                    raise ValueError(f"{name}[{j}]: expected {n} rows like z[0], got {a.shape[0]}")
        if g is not None and same_widths:
            for j, (a, b) in enumerate(zip(z, g)):
                if a.shape[1] != b.shape[1]:
                    raise ValueError(f"g[{j}]: expected width {a.shape[1]} to match z[{j}], got {b.shape[1]}")
        if self.kind == "torch":
            # Activations straight from a model may require grad; the search is not
            # differentiable, so it reads detached views (no copy).
            z = [a.detach() for a in z]
            g = None if g is None else [a.detach() for a in g]
            devices = {a.device for a in z + (g or [])}
            if len(devices) != 1:
                raise ValueError(f"z/g: expected all tensors on one device, got {sorted(map(str, devices))}")
            self.device = devices.pop()
        else:
            self.device = torch.device("cpu")
        self.z = z
        self.g = g

    @staticmethod
    def _as_list(x, name):
        if isinstance(x, (np.ndarray, torch.Tensor)):
            return [x]
        if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
            return list(x)
        raise TypeError(f"{name}: expected a sequence of 2-D arrays, got {type(x).__name__}")

    @property
    def n(self) -> int:
        return int(self.z[0].shape[0])

    def __len__(self) -> int:
        return self.n

    @property
    def widths(self) -> list[int]:
        return [int(a.shape[1]) for a in self.z]

    @property
    def g_widths(self) -> list[int] | None:
        return None if self.g is None else [int(a.shape[1]) for a in self.g]

    @property
    def num_scales(self) -> int:
        return len(self.z)

    @property
    def has_g(self) -> bool:
        return self.g is not None

    def __repr__(self) -> str:
        return (f"Descriptors(n={self.n}, widths={self.widths}, g={'yes' if self.has_g else 'no'}, "
                f"kind={self.kind}, device={self.device})")

    def take(self, rows) -> Descriptors:
        """The descriptors of the given rows (an index array or a slice), same kind."""
        def pick(a):
            if isinstance(a, torch.Tensor) and not isinstance(rows, slice):
                return a[torch.as_tensor(np.asarray(rows), device=a.device)]
            return a[rows]
        return Descriptors([pick(a) for a in self.z], None if self.g is None else [pick(a) for a in self.g],
                           same_widths=False)

    def check_finite(self, name: str, *, float64_only: bool = False) -> None:
        """Raise ValueError naming `name`, the array and the first row if any value is NaN or
        Inf, or if a float64 array holds values beyond the float32 range the kernels compute in.

        "First": the smallest row holding NaN or Inf in any array, then the first array
        (z[0], z[1], ..., g[0], g[1], ...) non-finite at that row -- the rule a backend that
        checks the pool during its own pass follows too (`pyfk.engine.backend.raise_non_finite`).
        float64_only: check only the float64 arrays, for such a backend (Backend.checks_finite):
        it tests float16/bfloat16/float32 rows while reading them, but whether float64 values
        fit float32 is decided here, before they are cast.
        """
        arrays = [(part, j, a) for part, group in (("z", self.z), ("g", self.g or []))
                  for j, a in enumerate(group) if not float64_only or a.dtype in (np.float64, torch.float64)]
        bad = []
        for order, (part, j, a) in enumerate(arrays):
            row = first_non_finite_row(a)
            if row is not None:
                bad.append((row, order, part, j))
        if bad:
            row, _, part, j = min(bad)
            raise ValueError(non_finite_message(name, part, j, row))
        for part, j, a in arrays:
            if a.dtype in (np.float64, torch.float64) and _max_abs(a) > F32_MAX:
                raise ValueError(f"{name}: {part}[{j}] holds values beyond the float32 range "
                                 f"(|x| > {F32_MAX:.3g}) that the kernels compute in")

    def max_row_norms(self) -> dict:
        """{("z"|"g", j): the largest L2 row norm of that array, float64}, read in row blocks.
        Rows holding NaN or Inf are left out (the finiteness check reports them)."""
        out = {}
        for part, arrays in (("z", self.z), ("g", self.g or [])):
            for j, a in enumerate(arrays):
                step = max(1, (1 << 22) // max(1, a.shape[1]))
                best = 0.0
                for i in range(0, a.shape[0], step):
                    block = a[i:i + step]
                    if isinstance(block, torch.Tensor):
                        sq = block.to(torch.float64).square().sum(1)
                        sq = sq[torch.isfinite(sq)]
                        best = max(best, float(sq.max()) if sq.numel() else 0.0)
                    else:
                        b64 = np.asarray(block, dtype=np.float64)
                        sq = np.einsum("ij,ij->i", b64, b64)
                        sq = sq[np.isfinite(sq)]
                        best = max(best, float(sq.max()) if sq.size else 0.0)
                out[(part, j)] = float(np.sqrt(best))
        return out


F32_MAX = float(np.finfo(np.float32).max)


def _max_abs(a) -> float:
    if is_row_source(a):
        step = max(1, (1 << 22) // max(1, a.shape[1]))
        return max((_max_abs(a[i:i + step]) for i in range(0, a.shape[0], step)), default=0.0)
    if isinstance(a, torch.Tensor):
        return float(a.abs().max()) if a.numel() else 0.0
    return float(np.abs(a).max()) if a.size else 0.0


def non_finite_message(name: str, part: str, j: int, row: int) -> str:
    """The one wording of a NaN/Inf error, from Descriptors.check_finite or a backend's own check."""
    return f"{name}: {part}[{j}] contains NaN or Inf values (first at row {row})"


def first_non_finite_row(a) -> int | None:
    """The first row of `a` holding NaN or Inf, or None; exact, without an n x L boolean temporary.

    One vectorised float32 sum (float64 for float64 data): NaN or Inf anywhere makes it
    non-finite; only then (or if finite values overflowed the sum) are rows tested in blocks.
    """
    step = max(1, (1 << 22) // max(1, a.shape[1]))
    if is_row_source(a):  # block by block (each an ndarray)
        for i in range(0, a.shape[0], step):
            row = first_non_finite_row(a[i:i + step])
            if row is not None:
                return i + row
        return None
    if isinstance(a, torch.Tensor):
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        if bool(torch.isfinite(a.sum(dtype=acc))):
            return None
        for i in range(0, a.shape[0], step):
            ok = torch.isfinite(a[i:i + step]).all(dim=1)
            if not bool(ok.all()):
                return i + int(torch.argmin(ok.to(torch.uint8)))
        return None
    acc = np.float64 if a.dtype == np.float64 else np.float32
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(a.sum(dtype=acc)):
            return None
    for i in range(0, a.shape[0], step):
        ok = np.isfinite(a[i:i + step]).all(axis=1)
        if not ok.all():
            return i + int(np.argmin(ok))
    return None


def as_descriptors(d, name: str) -> Descriptors:
    """`d` if it is Descriptors, else what its `to_descriptors()` returns (a DescriptorStore's
    memmaps, an Extraction's descriptors, ...); anything else raises TypeError naming `name`."""
    if isinstance(d, Descriptors):
        return d
    convert = getattr(d, "to_descriptors", None)
    if callable(convert):
        out = convert()
        if isinstance(out, Descriptors):
            return out
    raise TypeError(f"{name}: expected pyfk.Descriptors, a DescriptorStore or an Extraction, got {type(d).__name__}")


def _positive_strides(a: np.ndarray) -> np.ndarray:
    """`a`, or a C-contiguous copy if a stride is negative: NumPy calls a one-row or
    one-column view with a negative stride contiguous, but torch.from_numpy refuses it."""
    a = np.ascontiguousarray(a)
    return a.copy(order="C") if any(st < 0 for st in a.strides) else a


def _as_tensor(a, device) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        a = _positive_strides(a)
        if not a.flags.writeable:  # read-only memmap (a store): torch warns, but we only read it
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(a).to(device=device, non_blocking=True)
        a = torch.from_numpy(a)
    return a.to(device=device, non_blocking=True)


# Rows whose largest |x| exceeds this are scaled by a power of two before normalising:
# their squares (and sums) would overflow float32. pcc and l2 do not change under such a
# scaling (beyond the 1e-10 epsilon, negligible at that size), and a power of two is exact.
TAME_ABOVE = 2.0 ** 60


def _tame(x: torch.Tensor) -> torch.Tensor:
    """x with each row whose max |x| > TAME_ABOVE scaled by 2**-exponent(max |x|) (exact)."""
    amax = x.abs().amax(dim=1, keepdim=True)
    big = amax > TAME_ABOVE
    if not bool(big.any()):
        return x
    _, exponent = torch.frexp(amax)
    return x * torch.where(big, torch.ldexp(torch.ones_like(amax), -exponent), torch.ones_like(amax))


def normalized_block(parts: list, rows, normalize: str, device=None) -> torch.Tensor:
    """Normalise `rows` of every segment and concatenate them: (n_rows, D) float32.

    pcc:  x <- (x - mean(x)) / (std(x) + 1e-10)  per row and segment (population std),
          so a dot product of two segments is L_j times their Pearson correlation;
    l2:   x <- x / (||x||_2 + 1e-10);   none: x unchanged.
    Overflow-safe: rows with max |x| > 2**60 are first scaled by an exact power of two.
    `rows` is a slice or a sorted int64 index array; `device` defaults to the data's.
    """
    first = parts[0]
    device = device or (first.device if isinstance(first, torch.Tensor) else torch.device("cpu"))
    if isinstance(rows, slice):
        n_rows = len(range(*rows.indices(first.shape[0])))
    else:
        n_rows = len(rows)
    width = sum(int(p.shape[1]) for p in parts)
    out = torch.empty((n_rows, width), dtype=torch.float32, device=device)
    col = 0
    index_t = None
    for part in parts:
        if isinstance(rows, slice) or not isinstance(part, torch.Tensor):
            block = part[rows]  # NumPy, or a row source: just these rows
        else:
            if index_t is None or index_t.device != part.device:
                index_t = torch.as_tensor(rows, device=part.device)
            block = part.index_select(0, index_t)
        x = _as_tensor(block, device).to(torch.float32)
        w = x.shape[1]
        dst = out[:, col:col + w]
        if normalize != "none":
            x = _tame(x)
        if normalize == "pcc":
            mean = x.mean(dim=1, keepdim=True)
            torch.sub(x, mean, out=dst)
            std = dst.square().mean(dim=1, keepdim=True).sqrt_().add_(EPS)
            dst.div_(std)
        elif normalize == "l2":
            torch.div(x, x.norm(dim=1, keepdim=True).add_(EPS), out=dst)
        else:
            dst.copy_(x)
        col += w
    return out
