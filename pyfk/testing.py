"""Checks for people who write their own backends (or call pyfk from their tests).

    pyfk.testing.assert_topk_valid(scores, index, dense_R, k, tol=None)

A top-k answer is valid when it is *a* correct top-k, whatever tie order produced
it: faiss's `contrib.evaluation` checks results the same tie-tolerant way. Exact
tie order (ties to the smaller index) is pyfk's own promise and is tested
separately, on integer data whose scores are exact.
"""

from __future__ import annotations

import numpy as np

__all__ = ["assert_topk_valid"]


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch.Tensor, without importing torch here
        a = a.detach().cpu().float().numpy() if a.dtype.is_floating_point else a.detach().cpu().numpy()
    return np.asarray(a)


def assert_topk_valid(scores, index, dense_R, k: int, tol: float | None = None) -> None:
    """Raise AssertionError unless (scores, index) is a valid top-k of every row of dense_R.

    scores (M, k) and index (M, k) (NumPy or torch); dense_R (M, N) the true scores
    (ideally float64). Valid means, per row: indices are int64, in [0, N) and distinct;
    scores descend (to within tol); the true score of every returned index equals the
    reported score; and the reported scores equal the k best true scores -- so any
    choice among tied items is accepted. tol: absolute tolerance (default
    1e-5 * max|R| + 1e-6, float32 rounding of scores of that size).
    """
    scores = _np(scores).astype(np.float64)
    index = _np(index)
    R = np.asarray(_np(dense_R), dtype=np.float64)
    if R.ndim != 2:
        raise ValueError(f"dense_R: expected an (M, N) matrix, got shape {R.shape}")
    m, n = R.shape
    if not 1 <= k <= n:
        raise ValueError(f"k: expected an integer in [1, {n}], got {k}")
    if tol is None:
        finite = R[np.isfinite(R)]
        tol = 1e-5 * (float(np.abs(finite).max()) if finite.size else 0.0) + 1e-6
    assert scores.shape == (m, k), f"scores: expected shape {(m, k)}, got {scores.shape}"
    assert index.shape == (m, k), f"index: expected shape {(m, k)}, got {index.shape}"
    assert index.dtype == np.int64, f"index: expected int64, got {index.dtype}"
    bad = (index < 0) | (index >= n)
    assert not bad.any(), f"index: out of range [0, {n}) at (row, slot) {np.argwhere(bad)[0].tolist()}"
    for r, row in enumerate(index):
        assert len(np.unique(row)) == k, f"index: row {r} repeats an index: {row.tolist()}"
    rise = np.diff(scores, axis=1) > tol
    assert not rise.any(), f"scores: not descending in row {int(np.argwhere(rise)[0][0])}"
    true = np.take_along_axis(R, index, 1)
    wrong = ~np.isclose(true, scores, rtol=0, atol=tol) & ~(np.isneginf(true) & np.isneginf(scores))
    assert not wrong.any(), (f"scores: the reported score of index {index[tuple(np.argwhere(wrong)[0])]} in row "
                             f"{int(np.argwhere(wrong)[0][0])} is not its true score")
    best = -np.sort(-R, axis=1)[:, :k]
    short = ~np.isclose(best, scores, rtol=0, atol=tol) & ~(np.isneginf(best) & np.isneginf(scores))
    assert not short.any(), (f"scores: row {int(np.argwhere(short)[0][0])} misses a better item "
                             f"(k-best true scores {best[np.argwhere(short)[0][0]][:5].tolist()}...)")
