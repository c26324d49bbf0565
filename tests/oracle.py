"""Float64 NumPy oracle, written independently of pyfk's kernels."""

import numpy as np

from pyfk.testing import assert_topk_valid


def normalize64(x, mode):
    x = np.asarray(x, dtype=np.float64)
    if mode == "pcc":
        c = x - x.mean(axis=1, keepdims=True)
        return c / (np.sqrt((c * c).mean(axis=1, keepdims=True)) + 1e-10)
    if mode == "l2":
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)
    return x


def similarity64(qz, qg, pz, pg, combine="product", normalize="pcc"):
    """R (M, N) in float64 from lists of per-scale arrays."""
    total = 0.0
    for j in range(len(qz)):
        zz = normalize64(qz[j], normalize) @ normalize64(pz[j], normalize).T
        if combine == "features":
            total = total + zz
            continue
        gg = normalize64(qg[j], normalize) @ normalize64(pg[j], normalize).T
        total = total + (zz * gg if combine == "product" else zz + gg)
    return total


def topk64(S, k):
    """Exact top-k per row: score descending, ties to the smaller column."""
    cols = np.broadcast_to(np.arange(S.shape[1]), S.shape)
    order = np.lexsort((cols, -S), axis=-1)[:, :k]
    return np.take_along_axis(S, order, 1), order


def ordered_pool(order, n, width=4):
    """(queries (3, width), pool (n, width)) of ones, float32: pool rows all equal ("all_equal":
    every score ties), or scaled by 0..n-1 ("ascending": worst to best) or n-1..0 ("descending")."""
    q = np.ones((3, width), np.float32)
    if order == "all_equal":
        return q, np.ones((n, width), np.float32)
    val = np.arange(n, dtype=np.float32)[:, None]
    return q, np.ones((n, width), np.float32) * (val if order == "ascending" else val[::-1])


def assert_valid_topk(scores, index, S, k, tol):
    """Tie-tolerant check of a top-k answer against the float64 matrix S: the
    library's own checker (tested against wrong answers in tests/engine/test_testing.py)."""
    assert_topk_valid(scores, index, S, k, tol)


def tolerance(qz, qg, pz, pg, combine, normalize):
    """Float32 error budget for R: 2e-5 x the largest possible sum of |R| terms."""
    def biggest(a, b):
        return (np.linalg.norm(normalize64(a, normalize), axis=1).max()
                * np.linalg.norm(normalize64(b, normalize), axis=1).max())
    total = 0.0
    for j in range(len(qz)):
        zz = biggest(qz[j], pz[j])
        if combine == "features":
            total += zz
        else:
            gg = biggest(qg[j], pg[j])
            total += zz * gg if combine == "product" else zz + gg
    return 2e-5 * total + 1e-6
