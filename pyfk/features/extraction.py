"""The Extraction record: what `pyfk.extract` returns (a leaf module: data only)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pyfk.engine.descriptors import Descriptors


@dataclass
class Extraction:
    """What `extract` returns. Arrays are NumPy (or store memmaps), rows in loader order.

    descriptors: z_j and g_j, g w.r.t. the label estimate `pseudo`.
    probs (n, C) float32 softmax; pred (n,) argmax; labels (n,) or None; ids (n,);
    pseudo (n,) the labels the gradients used;
    grad_true: Descriptors (same z) with g w.r.t. the true labels, when asked (validation);
    badge: the BADGE factors Descriptors(z=[[h, 1]], g=[p - onehot(pred)]), when asked;
    meta: layers, widths, projection, pseudo_label, seed.
    """

    descriptors: Descriptors
    probs: np.ndarray
    pred: np.ndarray
    labels: np.ndarray | None
    ids: np.ndarray
    pseudo: np.ndarray
    grad_true: Descriptors | None = None
    badge: Descriptors | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.pred.shape[0])

    def to_descriptors(self) -> Descriptors:
        """What pyfk.topk / select / acquire read when given an Extraction."""
        return self.descriptors
