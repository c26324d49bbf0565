"""Temperature scaling (Guo et al., 2017) and the expected calibration error.

    T = pyfk.calibrate(val_logits, val_labels)              # fitted on a held-out set
    p = apply_temperature(logits, T)                        # softmax(logits / T)
    p = temper_probs(probs, T)                              # the same, from softmax probabilities
    pyfk.expected_calibration_error(p, labels, bins=15)     # top-label ECE

One scalar T > 0 divides every logit. It changes no prediction (argmax(l / T) = argmax(l))
but every confidence: T > 1 softens an over-confident model, T < 1 sharpens an
under-confident one. Softmax is shift-invariant, so when only probabilities p = softmax(l)
exist, softmax(log(p) / T) = softmax((l - LSE(l)) / T) = softmax(l / T): `temper_probs`
applies a temperature without the logits. Everything is computed in float64 with NumPy
(torch tensors are accepted and read on the CPU); nothing here is random.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from pyfk.errors import check_int, check_not_masked

__all__ = ["calibrate", "expected_calibration_error", "apply_temperature", "temper_probs", "nll"]

BOUNDS = (1e-2, 1e2)  # the temperatures `calibrate` searches by default
_SUM_TOL = 1e-3        # probability rows must sum to 1 within this (as the uncertainty strategies check)
_LOGITS = "a finite float array of shape (N, C) with N >= 1 and C >= 2"


# ----------------------------------------------------------------------------- validation

def _numpy(a, name: str):
    """A NumPy view of `a` (torch tensors detached and read on the CPU; bfloat16 widened)."""
    check_not_masked(a, name)
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # a torch tensor, without importing torch here
        a = a.detach().cpu()
        if a.is_floating_point():
            a = a.double()
        a = a.numpy()
    try:
        return np.asarray(a)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected an array, got {type(a).__name__} ({exc})") from None


def _real_matrix(a, name: str, expected: str) -> np.ndarray:
    """(N, C) float64 of a real (not bool) numeric array, N >= 1, C >= 2, every entry finite."""
    arr = _numpy(a, name)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name}: expected {expected}, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2:
        raise ValueError(f"{name}: expected {expected}, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        row, col = np.argwhere(~finite)[0].tolist()
        raise ValueError(f"{name}: expected {expected}, got {arr[row, col]} at row {row}, column {col}")
    return arr


def _labels(y, n: int, classes: int) -> np.ndarray:
    """(n,) int64 class labels in [0, classes)."""
    expected = f"integer class labels in [0, {classes}) of shape ({n},)"
    arr = _numpy(y, "labels")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels: expected {expected}, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"labels: expected {expected} (one per row), got shape {arr.shape}")
    bad = np.flatnonzero((arr < 0) | (arr >= classes))
    if bad.size:
        raise ValueError(f"labels: expected {expected}, got {int(arr[bad[0]])} at row {int(bad[0])}")
    return arr.astype(np.int64)


def _temperature(t, name: str = "temperature") -> float:
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {t!r}")
    return float(t)


def _bounds(bounds) -> tuple[float, float]:
    ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2
    if ok:
        try:
            lo, hi = (_temperature(b, "bounds") for b in bounds)
        except ValueError:
            ok = False
    if not ok or not lo < hi:
        raise ValueError(f"bounds: expected (lowest, highest) temperatures with 0 < lowest < highest, "
                         f"got {bounds!r}")
    return lo, hi


def _softmax(z: np.ndarray) -> np.ndarray:
    """softmax over the last axis, float64; -inf entries give 0."""
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- temperature

def _centred(logits) -> np.ndarray:
    """logits minus their row maximum: every entry <= 0, the maximum 0 (softmax is shift-invariant)."""
    return logits - logits.max(1, keepdims=True)


def _nll_terms(d: np.ndarray, d_true: np.ndarray, beta: float, order: int):
    """For the centred logits d, the true-class column d_true and beta = 1/T: the mean NLL
    f(beta) = mean_i [LSE(beta d_i) - beta d_iy], its derivative f'(beta) = mean_i [E_p d_i - d_iy]
    and f''(beta) = mean_i Var_p d_i (p = softmax(beta d_i)), up to `order`."""
    e = np.exp(beta * d)
    s = e.sum(1)
    if order == 0:
        return float(np.mean(np.log(s) - beta * d_true))
    p = e / s[:, None]
    mean = (p * d).sum(1)
    grad = float(np.mean(mean - d_true))
    var = np.maximum((p * (d - mean[:, None]) ** 2).sum(1), 0.0)
    return grad, float(var.mean())


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood -1/N sum_i log softmax(logits_i / T)[labels_i], in float64.

    logits (N, C) finite reals, N >= 1, C >= 2; labels (N,) integers in [0, C); temperature T > 0."""
    logits = _real_matrix(logits, "logits", _LOGITS)
    labels = _labels(labels, *logits.shape)
    t = _temperature(temperature)
    d = _centred(logits)
    return _nll_terms(d, d[np.arange(d.shape[0]), labels], 1.0 / t, 0)


def calibrate(logits, labels, *, bounds=BOUNDS, max_iter: int = 100) -> float:
    """The temperature T that minimises the mean negative log-likelihood on (logits, labels):

        T = argmin_{T in bounds}  -1/N sum_i log softmax(logits_i / T)[labels_i]

    logits: (N, C) the model's logits (not probabilities) on a held-out set, finite reals
        (NumPy array or torch tensor), N >= 1 rows, C >= 2 classes; computed in float64.
    labels: (N,) integer true classes in [0, C).
    bounds: (lowest, highest) temperatures searched, default (0.01, 100).
    max_iter: the most Newton/bisection steps (each one pass over the logits); 100 is far more
        than needed -- the bisection alone narrows the bracket to float64 resolution in ~60.
    Returns T as a Python float: apply it as softmax(logits / T) (`apply_temperature`), or to
    probabilities as softmax(log(p) / T) (`temper_probs`).

    Method: with beta = 1/T the objective f(beta) = mean_i [LSE(beta l_i) - beta l_iy] is convex
    (f'' = mean_i Var_{softmax(beta l_i)}(l_i) >= 0), so its minimiser is the root of the monotone
    f'(beta) = mean_i [E_p l_i - l_iy], found by safeguarded Newton steps inside a bracket that every
    step shrinks (bisection, in log beta, whenever Newton would leave it or stall). Deterministic.
    Where the objective keeps decreasing up to a bound, that bound is returned: lowest when every
    row is classified correctly (the NLL falls towards 0 as T -> 0: such data cannot fix a finite
    temperature), highest when the labels sit below the average logit (the NLL falls as T -> inf).
    When every row's logits are all equal the NLL does not depend on T and 1.0 is returned.
    """
    logits = _real_matrix(logits, "logits", _LOGITS)
    labels = _labels(labels, *logits.shape)
    t_lo, t_hi = _bounds(bounds)
    max_iter = check_int(max_iter, "max_iter", 1, 10_000)
    d = _centred(logits)
    if not (d < 0).any():  # every row constant: f is flat
        return 1.0
    d_true = d[np.arange(d.shape[0]), labels]
    lo, hi = 1.0 / t_hi, 1.0 / t_lo  # the bracket, in beta = 1/T
    g_lo, _ = _nll_terms(d, d_true, lo, 1)
    if g_lo >= 0:
        return t_hi
    g_hi, _ = _nll_terms(d, d_true, hi, 1)
    if g_hi <= 0:
        return t_lo
    beta = min(max(1.0, lo), hi)  # start at T = 1
    step_before = hi - lo
    for _ in range(max_iter):
        g, h = _nll_terms(d, d_true, beta, 1)
        if g == 0:
            break
        if g < 0:
            lo = beta
        else:
            hi = beta
        newton = beta - g / h if h > 0 else math.nan
        if lo < newton < hi and abs(newton - beta) < 0.5 * step_before:
            nxt = newton
        else:  # Newton leaves the bracket or stalls: bisect it (geometrically: beta spans decades)
            nxt = math.sqrt(lo * hi)
        step_before = abs(nxt - beta)
        beta = nxt
        if step_before <= 1e-14 * beta or hi - lo <= 1e-14 * lo:
            break
    return float(min(max(1.0 / beta, t_lo), t_hi))


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """softmax(logits / T) over the last axis, float64. logits (..., C): finite reals."""
    t = _temperature(temperature)
    arr = _numpy(logits, "logits")
    if (arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer))
            or arr.ndim < 1 or arr.shape[-1] < 1 or not np.isfinite(arr).all()):
        raise ValueError(f"logits: expected a finite real array of shape (..., C), got dtype {arr.dtype}, "
                         f"shape {arr.shape}")
    return _softmax(arr.astype(np.float64) / t)


def temper_probs(probs, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T) over the last axis: the temperature applied to probabilities.

    For probs = softmax(l) this is softmax(l / T) exactly (softmax is shift-invariant); rows
    need not be normalised (any positive multiple of softmax(l) gives the same). An entry that
    is 0 (underflowed) stays 0, where softmax(l / T) with T > 1 might be tiny but positive.
    probs (..., C): finite, non-negative, every row with a positive entry; e.g. (N, C) softmax or
    (K, N, C) MC-dropout passes / ensemble members. Computed in float64; returned in the dtype of
    `probs` when that is a float NumPy dtype (float32 in, float32 out), else float64.
    """
    t = _temperature(temperature)
    arr = _numpy(probs, "probs")
    if (not np.issubdtype(arr.dtype, np.floating) or arr.ndim < 1 or arr.shape[-1] < 1
            or not np.isfinite(arr).all() or (arr < 0).any() or not (arr.max(-1) > 0).all()):
        raise ValueError(f"probs: expected finite non-negative float probabilities of shape (..., C), every row "
                         f"with a positive entry, got dtype {arr.dtype}, shape {arr.shape}")
    x = arr.astype(np.float64)
    if t == 1.0:
        out = x / x.sum(-1, keepdims=True)
    else:
        with np.errstate(divide="ignore"):
            out = _softmax(np.log(x) / t)  # log 0 = -inf -> 0
    return out.astype(arr.dtype, copy=False)


# ----------------------------------------------------------------------------- ECE

def expected_calibration_error(probs, labels, *, bins: int = 15) -> float:
    """Top-label expected calibration error with `bins` equal-width confidence bins:

        ECE = sum_b (n_b / N) |acc_b - conf_b|

    where each row i has confidence c_i = max_c probs[i, c] and prediction argmax_c probs[i, c]
    (ties: the smallest class), acc_b is the fraction of correct predictions among the n_b rows
    whose confidence falls in bin b, and conf_b their mean confidence. Bin edges are
    np.linspace(0, 1, bins + 1); bin b holds (edge_b, edge_b+1], the first bin also 0: a confidence
    exactly on an edge belongs to the lower bin. Empty bins add nothing. Range [0, 1].

    probs: (N, C) probabilities, N >= 1, C >= 2: finite, in [0, 1], each row summing to 1 within 1e-3.
    labels: (N,) integer true classes in [0, C). bins: an integer >= 1.
    """
    expected = "finite probabilities of shape (N, C) with N >= 1 and C >= 2, each row summing to 1"
    p = _real_matrix(probs, "probs", expected)
    labels = _labels(labels, *p.shape)
    bins = check_int(bins, "bins", 1, 1 << 20)
    if (p < 0).any() or (p > 1).any():
        bad = np.argwhere((p < 0) | (p > 1))[0].tolist()
        raise ValueError(f"probs: expected {expected}, got {p[tuple(bad)]} at row {bad[0]}, column {bad[1]}")
    dev = np.abs(p.sum(1) - 1.0)
    if (dev > _SUM_TOL).any():
        row = int(np.argmax(dev > _SUM_TOL))
        raise ValueError(f"probs: expected {expected} (within {_SUM_TOL}), got row {row} summing to "
                         f"{p[row].sum():.6g}")
    conf = p.max(1)
    correct = (p.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    acc_sum = np.bincount(which, weights=correct, minlength=bins)
    return float(np.abs(acc_sum - conf_sum).sum() / p.shape[0])
