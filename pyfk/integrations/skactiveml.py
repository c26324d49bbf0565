"""scikit-activeml adapter: pyfk's strategies as a `SingleAnnotatorPoolQueryStrategy`.

    from skactiveml.classifier import SklearnClassifier
    from pyfk.integrations.skactiveml import PyfkQueryStrategy

    clf = SklearnClassifier(LogisticRegression(), classes=range(10))   # y: float, NaN = unlabeled
    qs = PyfkQueryStrategy("margin", random_state=0)
    idx = qs.query(X, y, clf=clf, batch_size=10)                       # indices into X

Where the inputs come from (first that applies):

- `pool=` a pyfk.PoolInputs the caller built (e.g. `pyfk.extract` on a torch model: descriptors,
  badge factors, MC-dropout probabilities); `clf` is then ignored and X only sets the pool size.
- `clf=` a skactiveml `SkactivemlClassifier`: `probs = clf.predict_proba(X)` on every row of X,
  after fitting a clone on (X, y) when `fit_clf` (as skactiveml's own strategies do; the caller's
  clf is left untouched). Only strategies that read `probs` (entropy, margin, least_confidence)
  or nothing (random) can run this way.
- neither: `PoolInputs(n=len(X))`, for strategies that read nothing (random).

Importing this module imports scikit-activeml (not a pyfk dependency: `pip install scikit-activeml`).
"""
from __future__ import annotations

import numpy as np
from skactiveml.base import SingleAnnotatorPoolQueryStrategy, SkactivemlClassifier
from skactiveml.utils import MISSING_LABEL, check_equal_missing_label, unlabeled_indices
from sklearn.base import clone

from pyfk.al.strategies import STRATEGIES, PoolInputs, select
from pyfk.al.strategies.base import check_call

__all__ = ["PyfkQueryStrategy"]


class PyfkQueryStrategy(SingleAnnotatorPoolQueryStrategy):
    """Any pyfk strategy (a key of pyfk.STRATEGIES) behind skactiveml's pool query interface.

    strategy: the pyfk strategy name; **params: its parameters (e.g. k=, normalize= for pfk),
    checked by pyfk at query time. missing_label: the value of y marking an unlabeled row
    (skactiveml's convention; NaN needs a float y). random_state: None, an int or a
    np.random.RandomState; each query draws pyfk's seed from `self.random_state_`, which
    `_validate_data` derives from random_state and the number of unlabeled rows, so an int
    random_state gives the same picks for the same (X, y), as in skactiveml's strategies.
    """

    def __init__(self, strategy="entropy", missing_label=MISSING_LABEL, random_state=None, **params):
        super().__init__(missing_label=missing_label, random_state=random_state)
        self.strategy = strategy
        self.params = params

    # sklearn's get_params only sees named __init__ arguments; keep **params visible to clone().
    def get_params(self, deep=True):
        return {**super().get_params(deep=deep), **self.params}

    def set_params(self, **params):
        own = {k: params.pop(k) for k in list(params) if k in self.params}
        self.params.update(own)
        return super().set_params(**params) if params else self

    def query(self, X, y, clf=None, fit_clf=True, pool=None, val=None, candidates=None, batch_size=1,
              return_utilities=False):
        """Select `batch_size` rows of X to label next.

        X: (n_samples, ...) the whole pool, labeled rows included (numeric, finite). y: (n_samples,)
        labels, `missing_label` for the unlabeled rows. clf: a SkactivemlClassifier giving `probs`
        (fitted on a clone when fit_clf). pool: a pyfk.PoolInputs over the same n_samples rows
        (takes precedence over clf). val: a pyfk.ValInputs for the strategies that read one.
        candidates: None (every unlabeled row) or a 1-D int array of row indices into X; rows that
        are not candidates are never picked (sample arrays are refused: pyfk selects pool rows).

        Returns query_indices (batch_size,) indexing X, in pick order. With return_utilities, also
        utilities (batch_size, n_samples): row b is NaN except at the picks b, b+1, ... which hold
        their pyfk scores (Selection.scores); skactiveml's layout "row b = utilities before pick b,
        earlier picks NaN", but only the picked rows carry a value, since a pyfk Selection scores
        its picks only. Raises ValueError for an unknown strategy, missing inputs (naming `pool` or
        `clf`), sample-array candidates, an integer y with a NaN missing_label, a pool whose size
        is not n_samples, and whatever pyfk.acquire refuses; TypeError for a clf or pool of the
        wrong type.
        """
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {sorted(STRATEGIES)}, got {self.strategy!r}")
        y_arr = np.asarray(y)
        if _is_nan(self.missing_label) and np.issubdtype(y_arr.dtype, np.integer):
            raise ValueError(f"y: expected a float array (NaN marks unlabeled rows, missing_label=nan), got "
                             f"dtype {y_arr.dtype}, in which every row counts as labeled; use y.astype(float) "
                             f"with NaN for the unlabeled rows, or missing_label=-1 (or another unused label)")
        if candidates is not None and np.ndim(candidates) != 1:
            raise ValueError(f"candidates: expected None or a 1-D array of row indices into X (pyfk selects pool "
                             f"rows), got an array of shape {np.shape(candidates)} (sample arrays are not supported)")
        X, y, candidates, batch_size, return_utilities = self._validate_data(
            X, y, candidates, batch_size, return_utilities, reset=True)
        n = len(X)

        inputs = self._pool_inputs(X, y, clf, fit_clf, pool, val, n)
        cand = (unlabeled_indices(y, self.missing_label_) if candidates is None
                else np.unique(np.asarray(candidates, dtype=np.int64)))
        blocked = np.setdiff1d(np.arange(n, dtype=np.int64), cand, assume_unique=True)
        seed = int(self.random_state_.randint(2**31 - 1))
        sel = select(self.strategy, inputs, batch_size, labeled=blocked, seed=seed, val=val, **self.params)
        if not return_utilities:
            return sel.indices
        utilities = np.full((len(sel.indices), n), np.nan)
        for b in range(len(sel.indices)):
            utilities[b, sel.indices[b:]] = sel.scores[b:]
        return sel.indices, utilities

    def _pool_inputs(self, X, y, clf, fit_clf, pool, val, n: int) -> PoolInputs:
        needs = STRATEGIES[self.strategy].needs.pool
        if pool is not None:
            if not isinstance(pool, PoolInputs):
                raise TypeError(f"pool: expected a pyfk.PoolInputs or None, got {type(pool).__name__}")
            size = check_call(self.strategy, pool, val, 0, self.params)[3]
            if size != n:
                raise ValueError(f"pool: expected PoolInputs over the {n} rows of X, got {size} rows")
            return pool
        if any(field != "probs" for field in needs):
            raise ValueError(f"pool: strategy {self.strategy!r} reads PoolInputs.{needs[0]}, which a classifier "
                             f"cannot supply; pass pool=pyfk.PoolInputs({needs[0]}=...) over the {n} rows of X")
        if clf is None:
            if needs:
                raise ValueError(f"clf: strategy {self.strategy!r} needs class probabilities; pass clf= (a "
                                 f"skactiveml SkactivemlClassifier) or pool=pyfk.PoolInputs(probs=...), got neither")
            return PoolInputs(n=n)
        if not isinstance(clf, SkactivemlClassifier):
            raise TypeError(f"clf: expected a skactiveml SkactivemlClassifier (e.g. SklearnClassifier), "
                            f"got {type(clf).__name__}")
        check_equal_missing_label(clf.missing_label, self.missing_label_)
        if not isinstance(fit_clf, bool):
            raise TypeError(f"fit_clf: expected a bool, got {type(fit_clf).__name__}")
        if not needs:
            return PoolInputs(n=n)  # random reads nothing: no need to fit or predict
        if fit_clf:
            clf = clone(clf).fit(X, y)
        probs = np.asarray(clf.predict_proba(X), dtype=np.float64)
        return PoolInputs(probs=probs)


def _is_nan(value) -> bool:
    try:
        return bool(np.isnan(value))
    except TypeError:
        return False
