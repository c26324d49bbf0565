"""pyfk's acquisition strategies as a small-text QueryStrategy.

    from pyfk.integrations.small_text import PyfkQueryStrategy
    learner = PoolBasedActiveLearner(clf_factory, PyfkQueryStrategy("entropy", seed=0), train)

Requires small-text (>= 1.4); pyfk does not depend on it. Strategies that read only
`probs` (entropy, margin, least_confidence) or nothing (random) work with any small-text
classifier that has `predict_proba`; the others (mc_probs, badge, features, descriptors)
need an `inputs=` callable that builds the PoolInputs, e.g. with `pyfk.extract` on a torch
model. The PFK family (pfk, pfk_sum, pcc) also needs `val=`.
"""

from __future__ import annotations

import numpy as np
from small_text.query_strategies import QueryStrategy

from pyfk.al.strategies.base import STRATEGIES, PoolInputs, Selection, ValInputs, select
from pyfk.errors import check_int

__all__ = ["PyfkQueryStrategy"]


class PyfkQueryStrategy(QueryStrategy):
    """A small-text QueryStrategy that picks with `pyfk.acquire(strategy, ...)`.

    strategy: a key of pyfk.STRATEGIES ("pfk" by default).
    seed: the base seed (an integer in [0, 2**62]). Round r uses seed + the number of labeled rows
        at that round, so rounds differ but a rerun of the same loop picks the same rows.
    val: the validation set of the PFK family -- a pyfk.ValInputs, or a callable
        `val(clf) -> ValInputs` called each round with the current classifier (the
        descriptors of a validation set depend on the model). Required iff the strategy
        reads one (pfk, pfk_sum, pcc).
    inputs: optional callable `inputs(clf, dataset, strategy) -> pyfk.PoolInputs` over the
        whole `dataset` (row i = dataset row i). Without it, strategies that read `probs`
        get `clf.predict_proba(dataset)` and strategies that read nothing get the pool size;
        any other strategy raises ValueError.
    params: the strategy's keyword parameters (see STRATEGIES[strategy].params).

    `query` returns the picked indices (int64, relative to `dataset`, in pick order);
    every row not in `indices_unlabeled` -- labeled or ignored by small-text -- is
    excluded. The Selection of the last query (scores, provenance) is kept on `self.last`.
    """

    def __init__(self, strategy: str = "pfk", *, seed: int = 0, val=None, inputs=None, **params):
        if not isinstance(strategy, str) or strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {sorted(STRATEGIES)}, got {strategy!r}")
        spec = STRATEGIES[strategy]
        seed = check_int(seed, "seed", 0, 2**62)
        if val is not None and not (isinstance(val, ValInputs) or callable(val)):
            raise TypeError(f"val: expected a pyfk.ValInputs, a callable (clf) -> ValInputs or None, "
                            f"got {type(val).__name__}")
        if spec.needs.val and val is None:
            raise ValueError(f"val: strategy {strategy!r} needs a validation set; pass val=pyfk.ValInputs(...) "
                             f"or val=callable(clf) -> ValInputs, got None")
        if inputs is not None and not callable(inputs):
            raise TypeError(f"inputs: expected a callable (clf, dataset, strategy) -> PoolInputs or None, "
                            f"got {type(inputs).__name__}")
        fields = spec.needs.pool
        if inputs is None and fields not in ((), ("probs",)):
            raise ValueError(f"inputs: strategy {strategy!r} needs PoolInputs field(s) {list(fields)}, which "
                             f"small-text classifiers do not give; pass inputs=callable(clf, dataset, strategy) "
                             f"-> PoolInputs, got None")
        unknown = sorted(set(params) - set(spec.params))
        if unknown:
            raise ValueError(f"{strategy}: unknown parameter(s) {unknown}; it accepts {sorted(spec.params) or 'none'}")
        self.strategy, self.seed, self.val, self.inputs, self.params = strategy, int(seed), val, inputs, params
        self.last: Selection | None = None

    def query(self, clf, dataset, indices_unlabeled, indices_labeled, y, n=10):
        """Pick `n` rows of `dataset` among `indices_unlabeled` (see the class docstring)."""
        self._validate_query_input(indices_unlabeled, n)
        size = len(dataset)
        pool = self._pool(clf, dataset, size)
        val = self.val(clf) if callable(self.val) else self.val
        if val is not None and not isinstance(val, ValInputs):
            raise TypeError(f"val: the callable must return a pyfk.ValInputs, got {type(val).__name__}")
        unlabeled = np.asarray(indices_unlabeled, dtype=np.int64).reshape(-1)
        blocked = np.setdiff1d(np.arange(size, dtype=np.int64), unlabeled)  # labeled and ignored rows
        seed = self.seed + len(indices_labeled)
        self.last = select(self.strategy, pool, n, labeled=blocked, seed=seed, val=val, **self.params)
        return self.last.indices

    def _pool(self, clf, dataset, size: int) -> PoolInputs:
        if self.inputs is not None:
            pool = self.inputs(clf, dataset, self.strategy)
            if not isinstance(pool, PoolInputs):
                raise TypeError(f"inputs: the callable must return a pyfk.PoolInputs, got {type(pool).__name__}")
            return pool
        if STRATEGIES[self.strategy].needs.pool == ("probs",):
            return PoolInputs(probs=np.asarray(clf.predict_proba(dataset), dtype=np.float64))
        return PoolInputs(n=size)

    def __str__(self):
        return f"PyfkQueryStrategy(strategy={self.strategy!r}, seed={self.seed}, params={self.params})"
