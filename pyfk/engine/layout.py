"""Layout: the segment structure every backend and strategy reads.

A search sees each example as one row of S segments (columns), in this order:
    combine="product":  [z_1, g_1, z_2, g_2, ...]   R = sum_j (z_j.z_j') * (g_j.g_j')
    combine="sum":      [z_1, g_1, z_2, g_2, ...]   R = sum_j  z_j.z_j' + g_j.g_j'  (one dot product)
    combine="features": [z_1, z_2, ...]             R = sum_j  z_j.z_j'            (one dot product)
`Layout` holds the widths, the column offsets and which segments pair up; its
`similarity` is the pure-torch reference of R on normalised rows, its
`self_similarity` is R(x, x) and `scale_terms` splits R(a_i, b_i) per scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COMBINES = ("product", "sum", "features")


@dataclass(frozen=True)
class Layout:
    """widths: per-segment widths (z_1, g_1, ... or z_1, z_2, ...); combine: see the module docstring."""

    widths: tuple[int, ...]
    combine: str = "product"

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.combine not in COMBINES:
            raise ValueError(f"combine: expected one of {list(COMBINES)}, got {self.combine!r}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths: expected positive segment widths, got {list(self.widths)}")
        if self.paired and len(self.widths) % 2:
            raise ValueError(f"widths: combine={self.combine!r} needs (z, g) pairs, got {len(self.widths)} segments")

    @classmethod
    def of(cls, desc, combine: str) -> tuple[list, Layout]:
        """The raw segment arrays of Descriptors `desc`, in layout order, and their Layout."""
        if combine == "features":
            return list(desc.z), cls(tuple(desc.widths), combine)
        parts = [a for zj, gj in zip(desc.z, desc.g) for a in (zj, gj)]
        return parts, cls(tuple(int(a.shape[1]) for a in parts), combine)

    @property
    def product(self) -> bool:
        """Whether (z_j, g_j) pairs multiply (else R is one plain dot product over all columns)."""
        return self.combine == "product"

    @property
    def paired(self) -> bool:
        return self.combine != "features"

    @property
    def width(self) -> int:
        """D = sum of the segment widths: the row length the kernels see."""
        return sum(self.widths)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.cumsum((0,) + self.widths[:-1]))

    @property
    def scales(self) -> int:
        return len(self.widths) // 2 if self.paired else len(self.widths)

    def segment_parts(self) -> list[tuple[str, int]]:
        """("z" or "g", scale j) of every segment, in layout order: which Descriptors array it is."""
        if self.paired:
            return [(part, j) for j in range(self.scales) for part in ("z", "g")]
        return [("z", j) for j in range(self.scales)]

    def columns(self) -> list[slice]:
        """One column slice per segment."""
        return [slice(o, o + w) for o, w in zip(self.offsets, self.widths)]

    def pairs(self) -> list[tuple[slice, slice]]:
        """(z_j, g_j) column slices per scale; combine="features" has none."""
        cols = self.columns()
        return list(zip(cols[0::2], cols[1::2])) if self.paired else []

    def similarity(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Dense (M, N) R of normalised rows q (M, D) and p (N, D): the reference formula."""
        if not self.product:
            return q @ p.T
        out = None
        for z, g in self.pairs():
            zz = q[:, z] @ p[:, z].T
            zz.mul_(q[:, g] @ p[:, g].T)
            out = zz if out is None else out.add_(zz)
        return out

    def self_similarity(self, x: torch.Tensor) -> torch.Tensor:
        """(n,) R(x_i, x_i) of normalised rows x (n, D)."""
        if not self.product:
            return (x * x).sum(1)
        out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for z, g in self.pairs():
            out += (x[:, z] ** 2).sum(1) * (x[:, g] ** 2).sum(1)
        return out

    def scale_terms(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(n, S) float64 per-scale terms of R(a_i, b_i) for normalised rows a, b (n, D):
        product (z.z')(g.g'), sum z.z' + g.g', features z.z'. Their row sum is R."""
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        dots = [(a[:, c] * b[:, c]).sum(1) for c in self.columns()]
        if not self.paired:
            return np.stack(dots, 1)
        zz, gg = np.stack(dots[0::2], 1), np.stack(dots[1::2], 1)
        return zz * gg if self.product else zz + gg
