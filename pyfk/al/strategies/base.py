"""The strategy registry and its one signature: inputs, requirements, results, `select`.

    sel = select("entropy", PoolInputs(probs=P), budget=100, labeled=L, seed=0)
    sel.indices, sel.scores, sel.provenance

A strategy is `fn(pool: PoolInputs, req: Request, **params) -> (indices, scores, extras)`,
registered with

    @register(name, needs="mc_probs", passes="mc_dropout", val=False, params={...})

which records what it reads (`Needs`): the PoolInputs fields (all required), how its
`mc_probs` are made (MC-dropout passes of one model or ensemble members) and whether it
reads a validation set (`ValInputs`). `select` checks those inputs are given, validates
the budget and the labeled set, fills in default params, times the call and checks the
result: `budget` distinct pool indices, none labeled, in pick order, one float64 score
per pick ("higher = picked first" unless the family says otherwise; ties go to the
smaller pool index) and a JSON-serialisable provenance. A caller that computes the
inputs (the AL runner) reads `STRATEGIES[name].needs` and computes exactly those.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from pyfk.engine.descriptors import Descriptors, as_descriptors
from pyfk.errors import check_index_set, check_int

if TYPE_CHECKING:
    from pyfk.features.extraction import Extraction
    from pyfk.features.store import DescriptorStore


# ----------------------------------------------------------------------------- inputs and outputs

@dataclass
class PoolInputs:
    """What strategies read about the pool; any field may be None if a strategy does not need it.

    probs: (N, C) softmax of the pool under the current model.
    mc_probs: (K, N, C) -- K MC-dropout passes or K ensemble members.
    descriptors: PFK z/g descriptors of the pool (Descriptors, DescriptorStore or Extraction).
    badge: BADGE factors Descriptors(z=[[h, 1]], g=[p - onehot(pred)]) (see pyfk.extract).
    features: embedding for coreset (e.g. the penultimate layer), used with combine="features".
    n: the pool size N, for strategies that read no field (random); every given field must agree.
    NumPy arrays (memmaps too) or torch tensors.
    """

    probs: np.ndarray | None = None
    mc_probs: np.ndarray | None = None
    descriptors: Descriptors | DescriptorStore | Extraction | None = None
    badge: Descriptors | DescriptorStore | None = None
    features: Descriptors | DescriptorStore | None = None
    n: int | None = None

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
    float64 acquisition value per pick (see the family modules); provenance: a
    JSON-serialisable record (strategy, budget, seed, params, seconds, available, ...)."""

    strategy: str
    indices: np.ndarray
    scores: np.ndarray
    provenance: dict


@dataclass(frozen=True)
class Request:
    """What a strategy gets besides the pool inputs. rows: the available pool indices (neither
    labeled nor ignored), sorted; labeled: the labeled pool indices, sorted (coreset's initial
    centres); ignored: rows never picked and not centres either, sorted; excluded: both."""

    n: int
    budget: int
    labeled: np.ndarray
    rows: np.ndarray
    seed: int
    val: ValInputs | None
    backend: str
    progress: bool | None = None  # a progress bar on long searches (None: on a terminal only)
    ignored: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def excluded(self) -> np.ndarray:
        return np.union1d(self.labeled, self.ignored) if len(self.ignored) else self.labeled


# ----------------------------------------------------------------------------- requirements and registry

# The PoolInputs fields a strategy may read.
POOL_FIELDS = ("probs", "mc_probs", "descriptors", "badge", "features")
# How `mc_probs` is made: K MC-dropout passes of one model, or K ensemble members.
PASSES = ("mc_dropout", "ensemble")


@dataclass(frozen=True)
class Needs:
    """What a strategy reads, as declared at registration.

    pool: the PoolInputs fields it reads, every one required (() = none: only the pool size);
    passes: how its `mc_probs` are made -- "mc_dropout" (K passes of the one model with
        dropout on) or "ensemble" (K independently trained members); None iff it does not
        read mc_probs;
    val: whether it reads a ValInputs (validation descriptors, labels and predictions).
    """

    pool: tuple[str, ...] = ()
    passes: str | None = None
    val: bool = False

    def __post_init__(self):
        pool = (self.pool,) if isinstance(self.pool, str) else tuple(self.pool)
        object.__setattr__(self, "pool", pool)
        bad = [f for f in pool if f not in POOL_FIELDS]
        if bad or len(set(pool)) != len(pool):
            raise ValueError(f"needs: expected distinct fields of {list(POOL_FIELDS)}, got {list(pool)}")
        if ("mc_probs" in pool) != (self.passes is not None):
            raise ValueError(f"passes: expected one of {list(PASSES)} exactly when needs includes 'mc_probs', "
                             f"got passes={self.passes!r} with needs={list(pool)}")
        if self.passes is not None and self.passes not in PASSES:
            raise ValueError(f"passes: expected one of {list(PASSES)} or None, got {self.passes!r}")
        if not isinstance(self.val, bool):
            raise TypeError(f"val: expected a bool, got {type(self.val).__name__}")


@dataclass(frozen=True, eq=False)
class Strategy:
    """One registered strategy: `fn(pool, req, **params)`, what it reads, its parameters
    and their defaults. Calling it calls `fn`."""

    name: str
    fn: Callable
    needs: Needs
    params: Mapping = field(default_factory=dict)

    def __call__(self, pool: PoolInputs, req: Request, **params):
        return self.fn(pool, req, **params)


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, *, needs: str | Sequence[str] | None, passes: str | None = None, val: bool = False,
             params: dict | None = None):
    """Decorator: register `fn(pool, req, **params) -> (indices, scores, extras)` as `name`.

    needs: the PoolInputs field(s) it reads, all required (None: none, only the pool size);
    passes: how its mc_probs are made ("mc_dropout" or "ensemble"; exactly when it reads mc_probs);
    val: whether it reads a ValInputs; params: the accepted keyword parameters and their defaults.
    Returns `fn` unchanged; STRATEGIES[name] is its `Strategy` record.
    """
    spec = Needs(pool=() if needs is None else needs, passes=passes, val=val)
    if params is not None and not isinstance(params, Mapping):
        raise TypeError(f"params: expected a dict of parameter defaults, got {type(params).__name__}")

    def deco(fn):
        STRATEGIES[name] = Strategy(name, fn, spec, MappingProxyType(dict(params or {})))
        return fn
    return deco


# ----------------------------------------------------------------------------- select

def select(strategy: str, pool: PoolInputs, budget: int, *, labeled=None, seed: int = 0,
           val: ValInputs | None = None, backend: str = "auto", progress: bool | None = None,
           ignored=None, **params) -> Selection:
    """Run acquisition strategy `strategy` (a key of STRATEGIES) on `pool`.

    Returns a Selection of `budget` distinct pool indices, none in `labeled` or `ignored`, in pick
    order. labeled: rows already labeled (never picked; coreset starts from them as centres).
    ignored: rows never picked that are not centres either (e.g. small-text's ignored rows,
    scikit-activeml's non-candidates); disjoint from labeled.
    Raises ValueError for an unknown strategy or parameter, a missing input
    (a PoolInputs field or the ValInputs the strategy needs), a budget larger than the
    unlabeled pool, a labeled set with duplicates or out-of-range indices, and NaN/Inf
    or unnormalised probabilities. progress: a progress bar on the long searches of the
    PFK family (None: only on a terminal, for long searches; False: never).
    """
    spec, merged, seed, n = check_call(strategy, pool, val, seed, params)
    ignored_arr = np.zeros(0, dtype=np.int64) if ignored is None else check_index_set(ignored, "ignored", n)
    if ignored is None:
        labeled_arr, budget, available = check_budget(labeled, budget, n)
    else:
        labeled_arr = np.zeros(0, dtype=np.int64) if labeled is None else check_index_set(labeled, "labeled", n)
        both = np.intersect1d(labeled_arr, ignored_arr)
        if len(both):
            raise ValueError(f"ignored: expected rows disjoint from labeled, got {len(both)} in both "
                             f"(e.g. {both[:5].tolist()})")
        _, budget, available = check_budget(np.union1d(labeled_arr, ignored_arr), budget, n)
    excluded = np.union1d(labeled_arr, ignored_arr) if len(ignored_arr) else labeled_arr
    rows = np.setdiff1d(np.arange(n, dtype=np.int64), excluded, assume_unique=True)
    req = Request(n=n, budget=budget, labeled=labeled_arr, rows=rows, seed=seed, val=val, backend=backend,
                  progress=progress, ignored=ignored_arr)

    start = time.perf_counter()
    indices, scores, extras = spec.fn(pool, req, **merged)
    seconds = time.perf_counter() - start
    sel = make_selection(strategy, indices, scores, extras, budget=budget, n=n, labeled=req.excluded, seed=seed,
                         params=merged, seconds=seconds, available=available)
    if ignored is not None:  # without it, the provenance stays what pyfk.distributed's acquire records
        sel.provenance["labeled"], sel.provenance["ignored"] = int(len(labeled_arr)), int(len(ignored_arr))
    return sel


def check_strategy(strategy, params: dict) -> Strategy:
    """The registered Strategy named `strategy`, after checking that it takes every key of `params`."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {sorted(STRATEGIES)}, got {strategy!r}")
    spec = STRATEGIES[strategy]
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ValueError(f"{strategy}: unknown parameter(s) {unknown}; it accepts {sorted(spec.params) or 'none'}")
    return spec


def check_call(strategy: str, pool: PoolInputs, val: ValInputs | None, seed, params: dict, *,
               allow_empty: bool = False) -> tuple[Strategy, dict, int, int]:
    """The checks of `select` up to the pool size: the strategy, the input types, the params,
    the seed, the pool fields it needs (their size N) and the ValInputs. Returns (spec, params
    with defaults, seed, N). allow_empty: accept N == 0 (one shard of a sharded pool)."""
    spec = check_strategy(strategy, params)
    if not isinstance(pool, PoolInputs):
        raise TypeError(f"pool: expected a pyfk.strategies.PoolInputs, got {type(pool).__name__}")
    if val is not None and not isinstance(val, ValInputs):
        raise TypeError(f"val: expected a pyfk.strategies.ValInputs or None, got {type(val).__name__}")
    merged = {**spec.params, **params}
    seed = check_int(seed, "seed", 0, 2**63 - 1)

    n = _pool_size(pool, spec.needs, strategy, allow_empty=allow_empty)
    if spec.needs.val and (val is None or val.descriptors is None):
        raise ValueError(f"val.descriptors: strategy {strategy!r} needs validation descriptors (ValInputs), "
                         f"but {'val' if val is None else 'val.descriptors'} is None")
    return spec, merged, seed, n


def check_budget(labeled, budget, n: int) -> tuple[np.ndarray, int, int]:
    """The labeled set (sorted distinct indices in [0, n)) and the budget (an integer in
    [1, unlabeled rows]), as `select` checks them. Returns (labeled, budget, unlabeled count)."""
    labeled_arr = (np.zeros(0, dtype=np.int64) if labeled is None
                   else check_index_set(labeled, "labeled", n))
    available = n - int(len(labeled_arr))
    if available == 0:
        raise ValueError(f"labeled: every one of the {n} pool rows is labeled; nothing left to select")
    budget = check_int(budget, "budget", 1, available, f" (the {available} unlabeled pool rows)")
    return labeled_arr, budget, available


def make_selection(strategy: str, indices, scores, extras, *, budget: int, n: int, labeled: np.ndarray, seed: int,
                   params: dict, seconds: float, available: int) -> Selection:
    """A strategy's (indices, scores, extras) checked (see `select`) as a Selection with its provenance."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    _check_result(strategy, indices, scores, budget, n, labeled)
    provenance = {"strategy": strategy, "budget": budget, "seed": seed, "params": _jsonable(params),
                  "seconds": seconds, "available": available, "n": n, "labeled": int(len(labeled))}
    provenance.update(_jsonable(extras or {}))
    return Selection(strategy=strategy, indices=indices, scores=scores, provenance=provenance)


def _pool_size(pool: PoolInputs, needs: Needs, strategy: str, *, allow_empty: bool = False) -> int:
    """N from the given fields (every field the strategy needs must be given); all must agree.
    allow_empty: N == 0 is returned, not refused (one shard of a sharded pool)."""
    sizes = {}
    for name in POOL_FIELDS:
        value = getattr(pool, name)
        if value is not None:
            sizes[name] = _field_size(value, name)
    if pool.n is not None:
        sizes["n"] = check_int(pool.n, "pool.n", 0, 2**63 - 1)
    missing = [name for name in needs.pool if name not in sizes]
    if missing:
        raise ValueError(f"pool.{missing[0]}: strategy {strategy!r} needs it, but it is None")
    if not sizes:
        raise ValueError(f"pool: strategy {strategy!r} needs at least one field of PoolInputs to know the "
                         f"pool size, got none of {[*POOL_FIELDS, 'n']}")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"pool: fields disagree on the pool size: {sizes}")
    first = needs.pool[0] if needs.pool else next(iter(sizes))
    n = sizes[first]
    if n == 0 and not allow_empty:
        raise ValueError(f"pool.{first}: expected a non-empty pool, got 0 rows")
    return n


def _field_size(value, name: str) -> int:
    if name in ("probs", "mc_probs"):
        shape = tuple(getattr(value, "shape", ()))
        ndim = 2 if name == "probs" else 3
        if len(shape) != ndim:
            what = "(N, C)" if name == "probs" else "(K, N, C)"
            raise ValueError(f"pool.{name}: expected a {ndim}-D array {what}, got shape {shape}")
        return int(shape[0] if name == "probs" else shape[1])
    return as_descriptors(value, f"pool.{name}").n


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


# ----------------------------------------------------------------------------- shared by the families

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

