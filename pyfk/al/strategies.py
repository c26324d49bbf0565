"""Acquisition strategies: one registry, one signature (DESIGN.md section 4).

    sel = select("entropy", PoolInputs(probs=P), budget=100, labeled=L, seed=0)
    sel.indices, sel.scores, sel.provenance

Every strategy reads a `PoolInputs` (softmax probabilities, MC/ensemble
probabilities, PFK descriptors, BADGE factors or a coreset embedding; the
descriptor fields may be memory-mapped `DescriptorStore`s) and returns
`budget` distinct pool indices that are not in `labeled`, in pick order, with
one float64 acquisition value per pick and a JSON-serialisable provenance.

Scores ("higher = picked first" unless stated; ties go to the smaller pool index):

  random            0 for every pick (seeded uniform choice without replacement).
  entropy           H(p) = -sum_c p_c log p_c  (0 log 0 = 0).
  margin            -(p_top1 - p_top2).
  least_confidence  1 - max_c p_c.
  var_ratio         1 - (count of the modal argmax class over the K passes) / K.
  bald              H(mean_k p_k) - mean_k H(p_k)   (mutual information).
  std               mean over classes of the population std over the K passes.
  ensemble_entropy, ensemble_var_ratio, ensemble_bald
                    the same formulas with `mc_probs` read as K ensemble members
                    (entropy: of the member mean).
  coreset           greedy k-centre under d(a,b)^2 = R(a,a) + R(b,b) - 2 R(a,b) on
                    `features` (combine="features", normalize="l2" by default); score =
                    the pick's min d^2 to the centres at pick time (the random first
                    pick when nothing is labeled: +inf, the min over no centres).
  badge             k-means++ seeding on the BADGE gradient embeddings (p - onehot) x [h, 1]
                    (combine="product", normalize="none": R is their exact inner product);
                    score = min d^2 to the chosen centres at pick time; the first pick
                    (largest embedding norm) scores its squared norm R(x, x).
  pcc, pfk, pfk_sum pyfk.select with combine "features", "product", "sum"; score = the
                    similarity between the pick and the validation centre that pulled it in.

A strategy is `fn(pool: PoolInputs, req: Request, **params) -> (indices, scores, extras)`,
registered with `@register(name, needs=field, params=defaults)`; `select` validates
the inputs, the budget and the labeled set, fills in default params, times the call
and checks the result.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from pyfk import api
from pyfk.engine.descriptors import NORMALIZES, Descriptors, normalized_block, segments
from pyfk.engine.registry import resolve

if TYPE_CHECKING:
    from pyfk.features.extract import Extraction
    from pyfk.features.store import DescriptorStore

# Rows x columns processed at once when streaming probabilities (float64 temporaries).
_PROB_CHUNK = 1 << 22
# Elements of one (centres x pool rows) similarity block.
_SIM_BLOCK = 1 << 26
# Elements of one float64 temporary when reducing such a block on the CPU.
_SIM_SUB = 1 << 21
# A normalised pool up to this size is kept (on its device) for the greedy strategies;
# a larger one is re-normalised chunk by chunk at every pick (streamed from a store).
_CACHE_BYTES = 1 << 30
# Pool rows per streamed chunk: about this many bytes of normalised float32.
_STREAM_BYTES = 256 << 20
# Probabilities: rows must sum to 1 within this, and no entry may be below -_NEG_TOL.
_SUM_TOL = 1e-3
_NEG_TOL = 1e-6


# ----------------------------------------------------------------------------- inputs and outputs

@dataclass
class PoolInputs:
    """What strategies read about the pool; any field may be None if a strategy does not need it.

    probs: (N, C) softmax of the pool under the current model.
    mc_probs: (K, N, C) -- K MC-dropout passes or K ensemble members.
    descriptors: PFK z/g descriptors of the pool (Descriptors, DescriptorStore or Extraction).
    badge: BADGE factors Descriptors(z=[[h, 1]], g=[p - onehot(pred)]) (see pyfk.extract).
    features: embedding for coreset (e.g. the penultimate layer), used with combine="features".
    NumPy arrays (memmaps too) or torch tensors.
    """

    probs: np.ndarray | None = None
    mc_probs: np.ndarray | None = None
    descriptors: Descriptors | DescriptorStore | Extraction | None = None
    badge: Descriptors | DescriptorStore | None = None
    features: Descriptors | DescriptorStore | None = None

    @classmethod
    def from_extraction(cls, ext, *, mc_probs=None, features=None) -> PoolInputs:
        """Probabilities, descriptors and (if extracted) BADGE factors of a pyfk.Extraction."""
        return cls(probs=ext.probs, mc_probs=mc_probs, descriptors=ext.descriptors, badge=ext.badge,
                   features=features)


@dataclass
class ValInputs:
    """The validation set for the PFK family: descriptors (g w.r.t. the true labels),
    labels and the model's predictions (the misclassified rows are the queries)."""

    descriptors: Descriptors | DescriptorStore | None = None
    labels: np.ndarray | None = None
    pred: np.ndarray | None = None

    @classmethod
    def from_extraction(cls, ext) -> ValInputs:
        """Uses the true-label gradients (`extract(..., with_true=True)`)."""
        if ext.grad_true is None:
            raise ValueError("val: the extraction has no true-label gradients; extract the validation set "
                             "with with_true=True")
        return cls(descriptors=ext.grad_true, labels=ext.labels, pred=ext.pred)


@dataclass
class Selection:
    """strategy name; indices (budget,) int64 pool indices in pick order; scores (budget,)
    float64 acquisition value per pick (see the module docstring); provenance: a
    JSON-serialisable record (strategy, budget, seed, params, seconds, available, ...)."""

    strategy: str
    indices: np.ndarray
    scores: np.ndarray
    provenance: dict


@dataclass(frozen=True)
class Request:
    """What a strategy gets besides the pool inputs. rows: the available (not labeled)
    pool indices, sorted; labeled: the labeled pool indices, sorted."""

    n: int
    budget: int
    labeled: np.ndarray
    rows: np.ndarray
    seed: int
    val: ValInputs | None
    backend: str


# ----------------------------------------------------------------------------- registry

STRATEGIES: dict[str, Callable] = {}

_FIELDS = ("probs", "mc_probs", "descriptors", "badge", "features")


def register(name: str, *, needs: str | None, params: dict | None = None):
    """Decorator: register `fn(pool, req, **params) -> (indices, scores, extras)` as `name`.

    needs: the PoolInputs field that defines the pool (None: any given field);
    params: the accepted keyword parameters and their defaults.
    """
    if needs is not None and needs not in _FIELDS:
        raise ValueError(f"needs: expected one of {list(_FIELDS)} or None, got {needs!r}")

    def deco(fn):
        fn.needs = needs
        fn.params = dict(params or {})
        STRATEGIES[name] = fn
        return fn
    return deco


def select(strategy: str, pool: PoolInputs, budget: int, *, labeled=None, seed: int = 0,
           val: ValInputs | None = None, backend: str = "auto", **params) -> Selection:
    """Run acquisition strategy `strategy` (a key of STRATEGIES) on `pool`.

    Returns a Selection of `budget` distinct pool indices, none in `labeled`, in pick
    order. Raises ValueError for an unknown strategy or parameter, a missing input
    field, a budget larger than the unlabeled pool, a labeled set with duplicates or
    out-of-range indices, and NaN/Inf or unnormalised probabilities.
    """
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {sorted(STRATEGIES)}, got {strategy!r}")
    fn = STRATEGIES[strategy]
    if not isinstance(pool, PoolInputs):
        raise TypeError(f"pool: expected a pyfk.strategies.PoolInputs, got {type(pool).__name__}")
    if val is not None and not isinstance(val, ValInputs):
        raise TypeError(f"val: expected a pyfk.strategies.ValInputs or None, got {type(val).__name__}")
    unknown = sorted(set(params) - set(fn.params))
    if unknown:
        raise ValueError(f"{strategy}: unknown parameter(s) {unknown}; it accepts {sorted(fn.params) or 'none'}")
    merged = {**fn.params, **params}
    seed = api._check_int(seed, "seed", 0, 2**63 - 1)

    n = _pool_size(pool, fn.needs, strategy)
    labeled_arr = (np.zeros(0, dtype=np.int64) if labeled is None
                   else api._check_index_set(labeled, "labeled", n))
    rows = np.setdiff1d(np.arange(n, dtype=np.int64), labeled_arr, assume_unique=True)
    available = int(len(rows))
    if available == 0:
        raise ValueError(f"labeled: every one of the {n} pool rows is labeled; nothing left to select")
    budget = api._check_int(budget, "budget", 1, available, f" (the {available} unlabeled pool rows)")
    req = Request(n=n, budget=budget, labeled=labeled_arr, rows=rows, seed=seed, val=val, backend=backend)

    start = time.perf_counter()
    indices, scores, extras = fn(pool, req, **merged)
    seconds = time.perf_counter() - start

    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    _check_result(strategy, indices, scores, budget, n, labeled_arr)
    provenance = {"strategy": strategy, "budget": budget, "seed": seed, "params": _jsonable(merged),
                  "seconds": seconds, "available": available, "n": n, "labeled": int(len(labeled_arr))}
    provenance.update(_jsonable(extras or {}))
    return Selection(strategy=strategy, indices=indices, scores=scores, provenance=provenance)


def _pool_size(pool: PoolInputs, needs: str | None, strategy: str) -> int:
    """N from the field the strategy needs (which must be given); every given field must agree."""
    sizes = {}
    for name in _FIELDS:
        value = getattr(pool, name)
        if value is not None:
            sizes[name] = _field_size(value, name)
    if needs is not None and needs not in sizes:
        raise ValueError(f"pool.{needs}: strategy {strategy!r} needs it, but it is None")
    if not sizes:
        raise ValueError(f"pool: strategy {strategy!r} needs at least one field of PoolInputs to know the "
                         f"pool size, got none of {list(_FIELDS)}")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"pool: fields disagree on the pool size: {sizes}")
    n = sizes[needs] if needs is not None else next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"pool.{needs or next(iter(sizes))}: expected a non-empty pool, got 0 rows")
    return n


def _field_size(value, name: str) -> int:
    if name in ("probs", "mc_probs"):
        shape = tuple(getattr(value, "shape", ()))
        ndim = 2 if name == "probs" else 3
        if len(shape) != ndim:
            what = "(N, C)" if name == "probs" else "(K, N, C)"
            raise ValueError(f"pool.{name}: expected a {ndim}-D array {what}, got shape {shape}")
        return int(shape[0] if name == "probs" else shape[1])
    return api._check_descriptors(value, f"pool.{name}").n


def _check_result(strategy, indices, scores, budget, n, labeled):
    if indices.shape != (budget,) or scores.shape != (budget,):
        raise RuntimeError(f"{strategy}: returned {indices.shape[0]} indices and {scores.shape[0]} scores "
                           f"for a budget of {budget}")
    if ((indices < 0) | (indices >= n)).any() or len(np.unique(indices)) != budget:
        raise RuntimeError(f"{strategy}: returned out-of-range or repeated pool indices")
    if len(labeled) and np.isin(indices, labeled).any():
        raise RuntimeError(f"{strategy}: returned labeled pool indices")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, torch.Tensor):
        return _jsonable(x.detach().cpu().tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else str(x)  # "inf"/"nan": strict JSON has no such numbers
    if isinstance(x, np.bool_):
        return bool(x)
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return repr(x)


# ----------------------------------------------------------------------------- helpers

def top_budget(scores: np.ndarray, rows: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """The `budget` rows (sorted int64) of largest score, score descending, ties to the
    smaller index; exact under ties (no argpartition boundary effects)."""
    s = np.asarray(scores, dtype=np.float64)[rows]
    if budget < len(s):
        kth = np.partition(s, len(s) - budget)[len(s) - budget]  # the budget-th largest
        above = np.flatnonzero(s > kth)
        ties = np.flatnonzero(s == kth)[:budget - len(above)]
        keep = np.concatenate([above, ties])
    else:
        keep = np.arange(len(s))
    keep = keep[np.lexsort((keep, -s[keep]))]
    return rows[keep], s[keep]


def _as_numpy(a, name: str) -> np.ndarray:
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


def _prob_chunks(a, name: str, mc: bool):
    """Yield (start, stop, float64 chunk) over the pool rows, validating each chunk:
    finite, non-negative (to -1e-6), every distribution summing to 1 within 1e-3.
    probs chunks are (rows, C); mc_probs chunks are (K, rows, C)."""
    a = _as_numpy(a, name)
    if a.shape[-1] < 1 or (mc and a.shape[0] < 1):
        raise ValueError(f"{name}: expected at least one class{' and one pass' if mc else ''}, got shape {a.shape}")
    n = a.shape[1] if mc else a.shape[0]
    per_row = a.shape[-1] * (a.shape[0] if mc else 1)
    step = max(1, _PROB_CHUNK // per_row)
    for start in range(0, n, step):
        stop = min(n, start + step)
        x = np.asarray(a[:, start:stop] if mc else a[start:stop], dtype=np.float64)
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0].tolist()
            raise ValueError(f"{name}: contains NaN or Inf (first at {_where(bad, start, mc)})")
        if (x < -_NEG_TOL).any():
            bad = np.argwhere(x < -_NEG_TOL)[0].tolist()
            raise ValueError(f"{name}: probabilities must be non-negative (first negative at {_where(bad, start, mc)})")
        dev = np.abs(x.sum(-1) - 1.0)
        if (dev > _SUM_TOL).any():
            bad = np.argwhere(dev > _SUM_TOL)[0].tolist()
            raise ValueError(f"{name}: probabilities must sum to 1 over classes (tolerance {_SUM_TOL}); "
                             f"distribution {_where(bad, start, mc)} sums to "
                             f"{x.sum(-1)[tuple(bad)]:.6g}")
        np.maximum(x, 0.0, out=x)
        yield start, stop, x


def _where(bad, start, mc):
    bad = list(bad)
    bad[1 if mc else 0] += start
    return tuple(bad)


def _entropy(p: np.ndarray) -> np.ndarray:
    """-sum p log p over the last axis, 0 log 0 = 0."""
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def _prob_scores(pool: PoolInputs, req: Request, field: str, score_fn) -> tuple:
    mc = field == "mc_probs"
    a = getattr(pool, field)
    scores = np.empty(req.n, dtype=np.float64)
    for start, stop, x in _prob_chunks(a, f"pool.{field}", mc):
        scores[start:stop] = score_fn(x)
    idx, s = top_budget(scores, req.rows, req.budget)
    return idx, s, {}


# ----------------------------------------------------------------------------- uncertainty

@register("random", needs=None)
def _random(pool, req):
    rng = np.random.default_rng(req.seed)
    idx = rng.choice(req.rows, size=req.budget, replace=False)
    return idx, np.zeros(req.budget), {}


@register("entropy", needs="probs")
def _entropy_strategy(pool, req):
    return _prob_scores(pool, req, "probs", _entropy)


def _margin(p):
    if p.shape[1] < 2:
        raise ValueError(f"pool.probs: margin needs at least 2 classes, got {p.shape[1]}")
    top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
    return -(top2[:, 1] - top2[:, 0])


@register("margin", needs="probs")
def _margin_strategy(pool, req):
    return _prob_scores(pool, req, "probs", _margin)


@register("least_confidence", needs="probs")
def _least_confidence(pool, req):
    return _prob_scores(pool, req, "probs", lambda p: 1.0 - p.max(1))


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


@register("var_ratio", needs="mc_probs")
def _mc_var_ratio(pool, req):
    return _prob_scores(pool, req, "mc_probs", _var_ratio)


@register("bald", needs="mc_probs")
def _mc_bald(pool, req):
    return _prob_scores(pool, req, "mc_probs", _bald)


@register("std", needs="mc_probs")
def _mc_std(pool, req):
    return _prob_scores(pool, req, "mc_probs", _std)


@register("ensemble_entropy", needs="mc_probs")
def _ens_entropy(pool, req):
    return _prob_scores(pool, req, "mc_probs", lambda x: _entropy(x.mean(0)))


@register("ensemble_var_ratio", needs="mc_probs")
def _ens_var_ratio(pool, req):
    return _prob_scores(pool, req, "mc_probs", _var_ratio)


@register("ensemble_bald", needs="mc_probs")
def _ens_bald(pool, req):
    return _prob_scores(pool, req, "mc_probs", _bald)


# ----------------------------------------------------------------------------- kernel distances

class _KernelPool:
    """Kernel distances d(a, b)^2 = R(a,a) + R(b,b) - 2 R(a,b) from a pool to centres,
    through a backend's fused similarity kernel; the pool is normalised once and kept
    (on its device) if it is small enough, else normalised chunk by chunk per call."""

    def __init__(self, desc: Descriptors, combine: str, normalize: str, backend: str):
        self.parts, self.widths, self.product = segments(desc, combine)
        self.normalize = normalize
        self.device = desc.device
        self.b = resolve(backend, desc.device)
        self.n = desc.n
        self.width = sum(self.widths)
        self.cache = None
        if self.n * self.width * 4 <= _CACHE_BYTES:
            self.cache = normalized_block(self.parts, slice(None), normalize)
            self.stream_rows = self.n
        else:
            self.stream_rows = max(1, _STREAM_BYTES // (4 * self.width))
        diag = np.empty(self.n, dtype=np.float64)
        for start in range(0, self.n, self.stream_rows):
            stop = min(self.n, start + self.stream_rows)
            block = self._block(slice(start, stop))
            diag[start:stop] = api._self_similarity(block, self.widths, self.product).double().cpu().numpy()
        self.diag = diag

    def _block(self, rows) -> torch.Tensor:
        if self.cache is not None:
            if isinstance(rows, slice):
                return self.cache[rows]
            return self.cache[torch.as_tensor(rows, device=self.cache.device)]
        return normalized_block(self.parts, rows, self.normalize)

    def min_d2(self, centres: np.ndarray) -> np.ndarray:
        """(n,) float64: min over `centres` of d^2 to every pool row, clamped at 0.
        Blocks of centres x pool rows hold at most 2**26 similarities."""
        centres = np.unique(np.asarray(centres, dtype=np.int64))
        out = np.full(self.n, np.inf)
        per_block = max(1, _SIM_BLOCK // self.n)
        for c0 in range(0, len(centres), per_block):
            cb = centres[c0:c0 + per_block]
            q = self._block(cb)
            qdiag_np = self.diag[cb][:, None]
            qdiag = torch.as_tensor(qdiag_np, device=q.device)
            step = max(1, min(self.stream_rows, _SIM_BLOCK // len(cb)))
            for start in range(0, self.n, step):
                stop = min(self.n, start + step)
                s = self.b.similarity(q, self._block(slice(start, stop)), self.widths, self.product)
                if s.device.type == "cpu":  # NumPy (no contention with the kernel's threads), float64
                    s_np = s.numpy()        # temporaries of at most _SIM_SUB elements
                    sub = max(1, _SIM_SUB // s_np.shape[1])
                    m = np.full(s_np.shape[1], np.inf)
                    for r in range(0, s_np.shape[0], sub):
                        part = s_np[r:r + sub].astype(np.float64)
                        part *= -2.0
                        part += qdiag_np[r:r + sub]
                        np.minimum(m, part.min(0), out=m)
                else:  # reduce on the device, bring back one row
                    t = s.to(torch.float64).mul_(-2.0).add_(qdiag)
                    m = t.min(0).values.cpu().numpy()
                m += self.diag[start:stop]
                np.minimum(out[start:stop], m, out=out[start:stop])
        np.maximum(out, 0.0, out=out)
        return out


def _descriptor_field(pool: PoolInputs, field: str, combine: str) -> Descriptors:
    desc = api._check_descriptors(getattr(pool, field), f"pool.{field}")
    if combine != "features" and not desc.has_g:
        raise ValueError(f"pool.{field}: combine={combine!r} needs gradients g, but g is None")
    desc.check_finite(f"pool.{field}")
    return desc


@register("coreset", needs="features", params={"normalize": "l2"})
def _coreset(pool, req, normalize):
    api._check_choice(normalize, "normalize", NORMALIZES)
    desc = _descriptor_field(pool, "features", "features")
    kp = _KernelPool(desc, "features", normalize, req.backend)
    picked, scores = [], []
    if len(req.labeled):
        min_d2 = kp.min_d2(req.labeled)
    else:
        first = int(np.random.default_rng(req.seed).integers(req.n))
        picked.append(first)
        scores.append(np.inf)  # the min over no centres
        min_d2 = kp.min_d2(np.array([first])) if req.budget > 1 else np.zeros(req.n)
    min_d2[req.labeled] = -np.inf
    min_d2[picked] = -np.inf
    while len(picked) < req.budget:
        c = int(np.argmax(min_d2))  # first maximum: ties to the smaller index
        picked.append(c)
        scores.append(float(min_d2[c]))
        min_d2[c] = -np.inf
        if len(picked) < req.budget:
            np.minimum(min_d2, kp.min_d2(np.array([c])), out=min_d2)
    return np.array(picked, dtype=np.int64), np.array(scores), {
        "backend": kp.b.name, "combine": "features", "initial_centres": int(len(req.labeled)),
        "random_start": picked[0] if not len(req.labeled) else None}


@register("badge", needs="badge")
def _badge(pool, req):
    desc = _descriptor_field(pool, "badge", "product")
    kp = _KernelPool(desc, "product", "none", req.backend)
    rng = np.random.default_rng(req.seed)
    norms = kp.diag[req.rows]
    first = int(req.rows[int(np.argmax(norms))])  # largest embedding norm, ties to the smaller index
    picked, scores, fallbacks = [first], [float(kp.diag[first])], 0
    unavailable = np.zeros(req.n, dtype=bool)
    unavailable[req.labeled] = True
    unavailable[first] = True
    min_d2 = kp.min_d2(np.array([first])) if req.budget > 1 else np.zeros(req.n)
    while len(picked) < req.budget:
        w = np.where(unavailable, 0.0, min_d2)
        cum = np.cumsum(w)
        total = cum[-1]
        if total > 0:
            u = rng.random()
            c = int(np.searchsorted(cum, u * total, side="right"))
            if c >= req.n or w[c] <= 0:  # u * total rounded up to total
                c = int(np.flatnonzero(w > 0)[-1])
        else:  # every remaining d^2 is 0: smallest unpicked index
            c = int(np.flatnonzero(~unavailable)[0])
            fallbacks += 1
        picked.append(c)
        scores.append(float(min_d2[c]))
        unavailable[c] = True
        if len(picked) < req.budget:
            np.minimum(min_d2, kp.min_d2(np.array([c])), out=min_d2)
    extras = {"backend": kp.b.name, "combine": "product", "normalize": "none", "zero_fallbacks": fallbacks}
    return np.array(picked, dtype=np.int64), np.array(scores), extras


# ----------------------------------------------------------------------------- PFK family

def _pfk_family(pool, req, combine, k, normalize, use_all):
    api._check_choice(normalize, "normalize", NORMALIZES)
    if pool.descriptors is None:
        raise ValueError("pool.descriptors: the PFK strategies need the pool descriptors, but it is None")
    if req.val is None or req.val.descriptors is None:
        raise ValueError("val.descriptors: the PFK strategies need validation descriptors (ValInputs)")
    val = req.val
    details = api.select(pool.descriptors, val.descriptors, req.budget, val.labels, val.pred, k=k,
                         combine=combine, normalize=normalize, seed=req.seed,
                         exclude=req.labeled if len(req.labeled) else None, backend=req.backend,
                         use_all=use_all, return_details=True)
    idx = np.asarray(details["indices"], dtype=np.int64)
    centre = np.asarray(details["centre"], dtype=np.int64)
    score = np.asarray(details["score"], dtype=np.float64)
    terms = _scale_terms(api._check_descriptors(pool.descriptors, "pool.descriptors"),
                         api._check_descriptors(val.descriptors, "val.descriptors"),
                         idx, centre, combine, normalize)
    total = terms.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = terms / total[:, None]
    share_list = [None if t == 0 else row for t, row in zip(total.tolist(), share.tolist())]
    extras = {"combine": combine, "k_final": int(details["k"]), "centres": details["centres"],
              "centre": centre, "rank": details["rank"], "score": score,
              "scale_terms": terms, "scale_share": share_list}
    return idx, score, extras


def _scale_terms(pool: Descriptors, val: Descriptors, idx, centre, combine, normalize) -> np.ndarray:
    """(budget, S) float64 per-scale terms of R(centre, pick) from normalised rows:
    product (z.z')(g.g'), sum z.z' + g.g', features z.z'."""
    def rows_of(desc, which):
        uniq, inv = np.unique(which, return_inverse=True)
        parts, widths, _ = segments(desc, combine)
        block = normalized_block(parts, uniq, normalize).double().cpu().numpy()
        return block[inv], widths

    p, widths = rows_of(pool, idx)
    v, _ = rows_of(val, centre)
    cols = np.cumsum([0, *widths])
    dots = [(p[:, a:b] * v[:, a:b]).sum(1) for a, b in zip(cols[:-1], cols[1:])]
    if combine == "features":
        return np.stack(dots, 1)
    zz, gg = np.stack(dots[0::2], 1), np.stack(dots[1::2], 1)
    return zz * gg if combine == "product" else zz + gg


_PFK_PARAMS = {"k": 32, "normalize": "pcc", "use_all": False}


@register("pcc", needs="descriptors", params=_PFK_PARAMS)
def _pcc(pool, req, **params):
    return _pfk_family(pool, req, "features", **params)


@register("pfk", needs="descriptors", params=_PFK_PARAMS)
def _pfk(pool, req, **params):
    return _pfk_family(pool, req, "product", **params)


@register("pfk_sum", needs="descriptors", params=_PFK_PARAMS)
def _pfk_sum(pool, req, **params):
    return _pfk_family(pool, req, "sum", **params)

