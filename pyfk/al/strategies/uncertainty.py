"""Uncertainty strategies: scores of the pool's softmax probabilities, top `budget` taken.

Scores (higher = picked first; ties go to the smaller pool index), from
probs (N, C) or mc_probs (K, N, C), computed in float64:

  random            0 for every pick (seeded uniform choice without replacement); reads no field.
  entropy           H(p) = -sum_c p_c log p_c  (0 log 0 = 0).
  margin            -(p_top1 - p_top2).
  least_confidence  1 - max_c p_c.
  var_ratio         1 - (count of the modal argmax class over the K passes) / K.
  bald              H(mean_k p_k) - mean_k H(p_k)   (mutual information).
  std               mean over classes of the population std over the K passes.
  ensemble_entropy, ensemble_var_ratio, ensemble_bald
                    the same formulas with `mc_probs` read as K ensemble members
                    (entropy: of the member mean).

var_ratio / bald / std declare passes="mc_dropout" (K stochastic passes of one model),
the ensemble_* strategies passes="ensemble" (K independently trained members).
Probabilities are streamed in chunks of about 2**22 float64 values and validated on
the way: finite, non-negative (to -1e-6), every distribution summing to 1 within 1e-3.
"""

from __future__ import annotations

import numpy as np
import torch

from pyfk.al.strategies.base import PoolInputs, Request, register, top_budget
from pyfk.errors import check_not_masked

# Rows x columns processed at once when streaming probabilities (float64 temporaries).
_PROB_CHUNK = 1 << 22
# Probabilities: rows must sum to 1 within this, and no entry may be below -_NEG_TOL.
_SUM_TOL = 1e-3
_NEG_TOL = 1e-6


# ----------------------------------------------------------------------------- streaming and validation

def _as_numpy(a, name: str) -> np.ndarray:
    check_not_masked(a, name)
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.float()
        a = a.numpy()
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name}: expected floating-point probabilities, got dtype {a.dtype}")
    return a


def _prob_chunks(a, name: str, mc: bool, offset: int = 0):
    """Yield (start, stop, float64 chunk) over the pool rows, validating each chunk:
    finite, non-negative (to -1e-6), every distribution summing to 1 within 1e-3.
    probs chunks are (rows, C); mc_probs chunks are (K, rows, C). Errors name row
    `offset` + local row (the global row of a shard starting at `offset`)."""
    a = _as_numpy(a, name)
    if a.shape[-1] < 1 or (mc and a.shape[0] < 1):
        raise ValueError(f"{name}: expected at least one class{' and one pass' if mc else ''}, got shape {a.shape}")
    n = a.shape[1] if mc else a.shape[0]
    per_row = a.shape[-1] * (a.shape[0] if mc else 1)
    step = max(1, _PROB_CHUNK // per_row)
    for start in range(0, n, step):
        stop = min(n, start + step)
        x = np.asarray(a[:, start:stop] if mc else a[start:stop], dtype=np.float64)
        first = offset + start
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0].tolist()
            raise ValueError(f"{name}: contains NaN or Inf (first at {_where(bad, first, mc)})")
        if (x < -_NEG_TOL).any():
            bad = np.argwhere(x < -_NEG_TOL)[0].tolist()
            raise ValueError(f"{name}: probabilities must be non-negative (first negative at {_where(bad, first, mc)})")
        dev = np.abs(x.sum(-1) - 1.0)
        if (dev > _SUM_TOL).any():
            bad = np.argwhere(dev > _SUM_TOL)[0].tolist()
            raise ValueError(f"{name}: probabilities must sum to 1 over classes (tolerance {_SUM_TOL}); "
                             f"distribution {_where(bad, first, mc)} sums to "
                             f"{x.sum(-1)[tuple(bad)]:.6g}")
        np.maximum(x, 0.0, out=x)
        yield start, stop, x


def _where(bad, start, mc):
    bad = list(bad)
    bad[1 if mc else 0] += start
    return tuple(bad)


def row_scores(pool: PoolInputs, name: str, score_fn, offset: int = 0) -> np.ndarray:
    """(n,) float64: score_fn over the validated chunks of pool.`name` ("probs" or "mc_probs").
    offset: the global row of the first row, for error messages (a shard of a sharded pool)."""
    mc = name == "mc_probs"
    values = getattr(pool, name)
    scores = np.empty(int(values.shape[1] if mc else values.shape[0]), dtype=np.float64)
    for start, stop, x in _prob_chunks(values, f"pool.{name}", mc, offset):
        scores[start:stop] = score_fn(x)
    return scores


def _prob_scores(pool: PoolInputs, req: Request, name: str, score_fn) -> tuple:
    """score_fn over the chunks of pool.`name` ("probs" or "mc_probs"), then the top `budget`."""
    idx, s = top_budget(row_scores(pool, name, score_fn), req.rows, req.budget)
    return idx, s, {}


# ----------------------------------------------------------------------------- scores

def _entropy(p: np.ndarray) -> np.ndarray:
    """-sum p log p over the last axis, 0 log 0 = 0."""
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def _margin(p):
    if p.shape[1] < 2:
        raise ValueError(f"pool.probs: margin needs at least 2 classes, got {p.shape[1]}")
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return -(top2[:, 1] - top2[:, 0])


def _least_confidence(p):
    return 1.0 - p.max(1)


def _var_ratio(x):
    """x (K, n, C): 1 - (count of the modal argmax class over K) / K."""
    k, n, c = x.shape
    votes = x.argmax(-1)  # (K, n)
    counts = np.zeros((n, c), dtype=np.int64)
    cols = np.arange(n)
    for j in range(k):  # a loop over passes, vectorised over examples
        counts[cols, votes[j]] += 1
    return 1.0 - counts.max(1) / k


def _bald(x):
    return _entropy(x.mean(0)) - _entropy(x).mean(0)


def _std(x):
    return x.std(0).mean(-1)


def _mean_entropy(x):
    return _entropy(x.mean(0))


# ----------------------------------------------------------------------------- strategies

@register("random", needs=None)
def _random(pool, req):
    rng = np.random.default_rng(req.seed)
    idx = rng.choice(req.rows, size=req.budget, replace=False)
    return idx, np.zeros(req.budget), {}


# The strategies that rank rows by a per-row score: name -> (the field read, its score).
# Each is registered below; pyfk.distributed.acquire scores every shard with the same function.
ROW_SCORES = {
    "entropy": ("probs", _entropy),
    "margin": ("probs", _margin),
    "least_confidence": ("probs", _least_confidence),
    "var_ratio": ("mc_probs", _var_ratio),
    "bald": ("mc_probs", _bald),
    "std": ("mc_probs", _std),
    "ensemble_entropy": ("mc_probs", _mean_entropy),
    "ensemble_var_ratio": ("mc_probs", _var_ratio),
    "ensemble_bald": ("mc_probs", _bald),
}


def _register_scored(name: str, field: str, score_fn) -> None:
    passes = None if field == "probs" else "ensemble" if name.startswith("ensemble_") else "mc_dropout"

    def strategy(pool, req):
        return _prob_scores(pool, req, field, score_fn)

    strategy.__name__ = strategy.__qualname__ = f"_{name}_strategy"
    register(name, needs=field, passes=passes)(strategy)


for _name, (_field, _fn) in ROW_SCORES.items():
    _register_scored(_name, _field, _fn)
