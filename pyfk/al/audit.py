"""Which labels are probably wrong: confident learning on kernel-smoothed class probabilities.

    report = pyfk.audit(descriptors, labels, probs=oos_probs, k=32)
    report.indices[:20]      # the 20 most suspect labeled rows
    report.suggested[:20]    # the label each probably has

For each labeled row i (n rows, labels y_i in [0, C)):

1. neighbours: its top-k rows among the *other* labeled rows under the PFK similarity R
   (pyfk.topk over the labeled set, combine/normalize as there; the fused kernels, never the
   n x n matrix; row i itself is dropped from its own list);
2. neighbour vote: v_i[c] = sum_{m in N(i), y_m = c} w_m / sum_{m in N(i)} w_m, w_m = max(R(i, m), 0)
   (uniform 1/C where every weight is 0) -- how the row's look-alikes are labeled;
3. q_i = alpha * v_i + (1 - alpha) * p_i, where p_i are the model's class probabilities for row i,
   ideally out-of-sample (cross-validated, as cleanlab asks); without probs, q_i = v_i. Both are
   estimates of p(true class | x_i): the vote from the kernel geometry, p_i from the classifier,
   and a convex mix keeps q a distribution;
4. flag row i when another class is more probable than its given label under q:
   max_{c != y_i} q_i[c] > q_i[y_i] (cleanlab's filter_by="predicted_neq_given" applied to q);
5. rank every row by self-confidence q_i[y_i], lowest first (ties: lower row first);
   score_i = 1 - q_i[y_i]; suggested_i = argmax of q_i over the other classes for a flagged row,
   argmax of q_i for the rest.
Confident learning's statistics on q are kept as provenance: per class c the threshold t_c = mean
q_i[c] over rows labeled c, each row's confident class (the most probable class at or above its
threshold) and the calibrated confident-joint estimate of how many labels are wrong (n_issues, as
cleanlab.count.num_label_issues(estimation_method="off_diagonal_calibrated") up to its per-cell
rounding). Flagging by the argmax of q rather than by that count: on injected noise
(benchmarks/audit_vs_cleanlab.py) the count under-shoots once the vote sharpens q, while the
argmax rule followed the ranking's quality across noise kinds, rates and alpha.

Shapes: descriptors n rows (Descriptors, DescriptorStore or Extraction); labels (n,) ints;
probs None or (n, C) rows summing to 1. Everything returned is in rank order.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from pyfk.engine.descriptors import as_descriptors
from pyfk.engine.search import topk
from pyfk.errors import check_int, check_labels

__all__ = ["Audit", "audit"]


@dataclass
class Audit:
    """pyfk.audit's report, every array in rank order (most suspect first).

    indices (n,) int64 labeled rows; scores (n,) float64 = 1 - q[i, given]; given (n,) the labels
    as given; suggested (n,) int64; flagged (n,) bool (another class beats the given one); q (n, C) the
    smoothed class probabilities; neighbours (n, k') int64 rows (k' = min(k, n - 1)) and
    neighbour_scores (n, k') float32 R, best first; provenance: k, alpha, combine, normalize,
    backend, thresholds (C,), n_issues and confident_class (n,) (-1: none; rank order).
    """

    indices: np.ndarray
    scores: np.ndarray
    given: np.ndarray
    suggested: np.ndarray
    flagged: np.ndarray
    q: np.ndarray
    neighbours: np.ndarray
    neighbour_scores: np.ndarray
    provenance: dict = field(default_factory=dict)

    @property
    def suspects(self) -> np.ndarray:
        """The flagged rows, most suspect first."""
        return self.indices[self.flagged]

    def disagreeing(self, r: int) -> np.ndarray:
        """The neighbours of the r-th ranked row whose label differs from its given label."""
        return self.neighbours[r][self._labels[self.neighbours[r]] != self.given[r]]

    _labels: np.ndarray = field(default=None, repr=False)


def audit(descriptors, labels, *, probs=None, k: int = 32, alpha: float = 0.5, classes: int | None = None,
          combine: str = "features", normalize: str = "pcc", backend: str = "auto", progress=None,
          options=None) -> Audit:
    """Rank labeled rows by how likely their given label is wrong (see the module docstring).

    descriptors: the labeled rows' descriptors (n rows). labels: (n,) the given labels.
    probs: None or (n, C) class probabilities (out-of-sample ones for a fair audit).
    k: neighbours per row, 1 <= k (capped at n - 1). alpha: weight of the neighbour vote in [0, 1]
    (1 = neighbours only; forced to 1 without probs). classes: C (default: probs' width, else
    max(labels) + 1, at least 2). combine, normalize, backend, progress, options: as in pyfk.topk
    (combine="features" by default: neighbours by the pooled activations z, which do not carry
    the given label; "product"/"sum" also use the gradients g).
    Returns an Audit. Raises ValueError/TypeError naming the argument.
    """
    desc = as_descriptors(descriptors, "descriptors")
    n = desc.n
    if n < 2:
        raise ValueError(f"descriptors: expected at least 2 labeled rows (each is judged by the others), got {n}")
    k = check_int(k, "k", 1, 2**31 - 1)
    check_alpha(alpha)
    y_raw = np.asarray(labels)
    if probs is not None:
        p = np.asarray(probs, dtype=np.float64)
        check_prob_rows(p, n, "probs")
    if classes is None:
        if probs is not None:
            classes = p.shape[1]
        elif y_raw.dtype.kind in "iu" and y_raw.size:
            classes = max(2, int(y_raw.max()) + 1)
        else:
            classes = 2
    classes = check_int(classes, "classes", 2, 2**31 - 1)
    if probs is not None and p.shape[1] != classes:
        raise ValueError(f"probs: expected {classes} columns (classes), got {p.shape[1]}")
    y = check_labels(labels, "labels", n, "descriptors").astype(np.int64)
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"labels: expected classes in [0, {classes}), got range [{y.min()}, {y.max()}]")
    alpha = float(alpha) if probs is not None else 1.0

    k_eff = min(k, n - 1)
    scores, index = topk(desc, desc, k=k_eff + 1, combine=combine, normalize=normalize, backend=backend,
                         progress=progress, options=options)
    nb, nb_scores = _drop_self(np.asarray(index), np.asarray(scores))
    prov = {"k": k_eff, "alpha": alpha, "combine": combine, "normalize": normalize, "backend": backend}
    return _report(y, nb, nb_scores, classes, p if probs is not None else None, alpha, prov)


def _report(y: np.ndarray, nb: np.ndarray, nb_scores: np.ndarray, classes: int, probs, alpha: float,
            prov: dict) -> Audit:
    """The Audit from every row's labels, neighbour lists (self dropped) and probabilities: steps 2-5
    of the module docstring (vote, mixture, thresholds, flag, ranking); shared with
    pyfk.distributed.audit, which calls it on the gathered lists."""
    n = len(y)
    rows = np.arange(n)
    q = _smoothed(y, nb, nb_scores, classes, probs, alpha)
    thresholds, confident = _confident_class(q, y, classes)
    n_issues = _issue_count(y, confident, classes)
    self_conf = q[rows, y]
    order = np.lexsort((rows, self_conf))
    other = q.copy()
    other[rows, y] = -np.inf
    flagged = other.max(1) > self_conf
    suggested = np.where(flagged, other.argmax(1), q.argmax(1))
    prov = {**prov, "thresholds": thresholds, "classes": classes, "n_issues": n_issues,
            "confident_class": confident[order]}
    return Audit(indices=order.astype(np.int64), scores=1.0 - self_conf[order], given=y[order],
                 suggested=suggested[order].astype(np.int64), flagged=flagged[order], q=q[order],
                 neighbours=nb[order], neighbour_scores=nb_scores[order], provenance=prov, _labels=y)


def check_alpha(alpha) -> float:
    """alpha as a float; ValueError unless a real weight in [0, 1] (booleans refused)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha!r}")
    return float(alpha)


def check_prob_rows(p: np.ndarray, n: int, name: str, note: str = "") -> None:
    """p (float64) must be (n, C >= 2) class probabilities: finite, non-negative, rows summing to 1.
    `note` follows the expected shape in the message (e.g. " (this rank's rows)")."""
    if p.ndim != 2 or p.shape[0] != n or p.shape[1] < 2:
        raise ValueError(f"{name}: expected an array of shape ({n}, C) with C >= 2{note}, got shape {p.shape}")
    if n and (not np.all(np.isfinite(p)) or p.min() < 0 or not np.allclose(p.sum(1), 1.0, atol=1e-4)):
        raise ValueError(f"{name}: expected finite non-negative rows summing to 1 (class probabilities)")


def _drop_self(index: np.ndarray, scores: np.ndarray):
    """(n, k+1) neighbour lists -> (n, k) without row i itself (or without the last entry where
    row i is absent, e.g. under exact ties)."""
    n, width = index.shape
    is_self = index == np.arange(n)[:, None]
    absent = ~is_self.any(1)
    is_self[absent, width - 1] = True
    keep = ~is_self
    return index[keep].reshape(n, width - 1), scores[keep].reshape(n, width - 1)


def _smoothed(y, nb, nb_scores, classes: int, probs, alpha: float) -> np.ndarray:
    n = len(y)
    w = np.maximum(nb_scores.astype(np.float64), 0.0)
    votes = np.zeros((n, classes))
    np.add.at(votes, (np.repeat(np.arange(n), nb.shape[1]), y[nb].reshape(-1)), w.reshape(-1))
    total = votes.sum(1, keepdims=True)
    votes = np.divide(votes, total, out=np.full_like(votes, 1.0 / classes), where=total > 0)
    return votes if probs is None else alpha * votes + (1.0 - alpha) * probs


def _issue_count(y: np.ndarray, confident: np.ndarray, classes: int) -> int:
    """Rows whose label is estimated wrong: the calibrated confident joint's off-diagonal mass."""
    joint = np.zeros((classes, classes))
    has = confident >= 0
    np.add.at(joint, (y[has], confident[has]), 1.0)
    counts = np.bincount(y, minlength=classes).astype(np.float64)
    rows = joint.sum(1)
    diag_share = np.divide(np.diag(joint), rows, out=np.ones(classes), where=rows > 0)
    return int(np.rint(np.sum(counts * (1.0 - diag_share))))


def _confident_class(q: np.ndarray, y: np.ndarray, classes: int):
    """Per-class thresholds t_c (mean q[:, c] over rows labeled c; +inf for a class with no row)
    and each row's confident class (argmax over classes at or above threshold; -1 if none)."""
    counts = np.bincount(y, minlength=classes)
    sums = np.zeros(classes)
    np.add.at(sums, y, q[np.arange(len(y)), y])
    thresholds = np.full(classes, np.inf)
    np.divide(sums, counts, out=thresholds, where=counts > 0)
    above = q >= thresholds[None, :] - 1e-6  # as cleanlab: a vote at the class mean counts despite rounding
    masked = np.where(above, q, -np.inf)
    confident = np.where(above.any(1), masked.argmax(1), -1)
    return thresholds, confident
