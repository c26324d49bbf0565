"""scikit-activeml adapter: pyfk's strategies as a `SingleAnnotatorPoolQueryStrategy`.

    from skactiveml.classifier import SklearnClassifier
    from pyfk.integrations.skactiveml import PyfkQueryStrategy

    clf = SklearnClassifier(LogisticRegression(), classes=range(10))   # y: float, NaN = unlabeled
    qs = PyfkQueryStrategy("margin", random_state=0)
    idx = qs.query(X, y, clf=clf, batch_size=10)                       # indices into X

Where the inputs come from (first that applies):

- `pool=` a pyfk.PoolInputs the caller built; `clf` is then ignored and X only sets the pool size.
- `clf=` a skactiveml `SkactivemlClassifier`, fitted on a clone on (X, y) first when `fit_clf` (as
  skactiveml's own strategies do; the caller's clf is left untouched): strategies that read only
  `probs` (entropy, margin, least_confidence) use `clf.predict_proba(X)`; the others (MC dropout,
  ensembles, coreset, badge, the PFK family) read the torch model -- the nn.Module inside the
  classifier (e.g. `SklearnClassifier(pyfk.integrations.TorchClassifier(net))`) or `model=` --
  over the rows of X (pyfk.al.inputs.model_inputs).
- neither: `PoolInputs(n=len(X))`, for strategies that read nothing (random).
The PFK family also needs `validation=` (e.g. 0.2: a seeded fifth of the labeled rows).

Importing this module imports scikit-activeml (not a pyfk dependency: `pip install scikit-activeml`).
"""
from __future__ import annotations

import numpy as np
from skactiveml.base import SingleAnnotatorPoolQueryStrategy, SkactivemlClassifier
from skactiveml.utils import MISSING_LABEL, check_equal_missing_label, labeled_indices, unlabeled_indices
from sklearn.base import clone

from pyfk.al.strategies import PoolInputs, select
from pyfk.al.strategies.base import check_call
from pyfk.integrations._inputs import AdapterInputs

__all__ = ["PyfkQueryStrategy"]


class PyfkQueryStrategy(SingleAnnotatorPoolQueryStrategy):
    """Any pyfk strategy (a key of pyfk.STRATEGIES) behind skactiveml's pool query interface.

    strategy: the pyfk strategy name; **params: its parameters (e.g. k=, normalize= for pfk),
    checked by pyfk at query time. model, validation, layers, mc_passes, batch_size: how the torch
    model is read, as in pyfk.integrations._inputs.AdapterInputs (model=None: the nn.Module inside
    clf; validation: ValInputs, (inputs, labels), a torch Dataset, a fraction in (0, 1) of the
    labeled rows drawn from the query's seed, or a callable (clf) -> one of these).
    missing_label: the value of y marking an unlabeled row
    (skactiveml's convention; NaN needs a float y). random_state: None, an int or a
    np.random.RandomState; each query draws pyfk's seed from `self.random_state_`, which
    `_validate_data` derives from random_state and the number of unlabeled rows, so an int
    random_state gives the same picks for the same (X, y), as in skactiveml's strategies.
    """

    def __init__(self, strategy="entropy", missing_label=MISSING_LABEL, random_state=None, model=None,
                 validation=None, layers="auto", mc_passes=10, batch_size=256, **params):
        super().__init__(missing_label=missing_label, random_state=random_state)
        self.strategy = strategy
        self.model, self.validation, self.layers = model, validation, layers
        self.mc_passes, self.batch_size = mc_passes, batch_size
        self.params = params

    # sklearn's get_params only sees named __init__ arguments; keep **params visible to clone().
    def get_params(self, deep=True):
        return {**super().get_params(deep=deep), **self.params}

    def set_params(self, **params):
        own = {k: params.pop(k) for k in list(params) if k in self.params}
        self.params.update(own)
        return super().set_params(**params) if params else self

    def query(self, X, y, clf=None, fit_clf=True, pool=None, candidates=None, batch_size=1,
              return_utilities=False):
        """Select `batch_size` rows of X to label next.

        X: (n_samples, ...) the whole pool, labeled rows included (numeric, finite). y: (n_samples,)
        labels, `missing_label` for the unlabeled rows. clf: a SkactivemlClassifier giving `probs`
        (fitted on a clone when fit_clf). pool: a pyfk.PoolInputs over the same n_samples rows
        (takes precedence over clf; `validation` must then be a ValInputs or a callable giving one).
        candidates: None (every unlabeled row) or a 1-D int array of row indices into X; rows that
        are not candidates are never picked nor coreset centres (pyfk `ignored=`; sample arrays are refused:
        pyfk selects pool rows).

        Returns query_indices (batch_size,) indexing X, in pick order. With return_utilities, also
        utilities (batch_size, n_samples): row b is NaN except at the picks b, b+1, ... which hold
        their pyfk scores (Selection.scores); skactiveml's layout "row b = utilities before pick b,
        earlier picks NaN", but only the picked rows carry a value, since a pyfk Selection scores
        its picks only. Raises ValueError for an unknown strategy, missing inputs (naming `pool` or
        `clf`), sample-array candidates, an integer y with a NaN missing_label, a pool whose size
        is not n_samples, and whatever pyfk.acquire refuses; TypeError for a clf or pool of the
        wrong type.
        """
        source = AdapterInputs(self.strategy, model=self.model, validation=self.validation, layers=self.layers,
                               mc_passes=self.mc_passes, batch_size=self.batch_size)
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

        seed = int(self.random_state_.randint(2**31 - 1))
        inputs, val = self._inputs(source, X, y, clf, fit_clf, pool, n, seed)
        labeled = labeled_indices(y, self.missing_label_).astype(np.int64)
        cand = (unlabeled_indices(y, self.missing_label_) if candidates is None
                else np.setdiff1d(np.asarray(candidates, dtype=np.int64), labeled))
        # unlabeled rows that are not candidates: never picked, and not coreset centres as labeled rows are
        ignored = np.setdiff1d(np.arange(n, dtype=np.int64), np.union1d(cand, labeled))
        sel = select(self.strategy, inputs, batch_size, labeled=labeled, ignored=ignored, seed=seed, val=val,
                     **self.params)
        if not return_utilities:
            return sel.indices
        utilities = np.full((len(sel.indices), n), np.nan)
        for b in range(len(sel.indices)):
            utilities[b, sel.indices[b:]] = sel.scores[b:]
        return sel.indices, utilities

    def _inputs(self, source, X, y, clf, fit_clf, pool, n: int, seed: int):
        if pool is not None:
            if not isinstance(pool, PoolInputs):
                raise TypeError(f"pool: expected a pyfk.PoolInputs or None, got {type(pool).__name__}")
            val = source.ready_validation(clf, "pool=")
            size = check_call(self.strategy, pool, val, 0, self.params)[3]
            if size != n:
                raise ValueError(f"pool: expected PoolInputs over the {n} rows of X, got {size} rows")
            return pool, val
        if clf is None:
            if source.needs.pool or source.needs.val:
                reads = list(source.needs.pool) or "a validation set"
                raise ValueError(f"clf: strategy {self.strategy!r} reads {reads}; pass clf= (a skactiveml "
                                 f"SkactivemlClassifier) or pool=pyfk.PoolInputs(...), got neither")
            return PoolInputs(n=n), None
        if not isinstance(clf, SkactivemlClassifier):
            raise TypeError(f"clf: expected a skactiveml SkactivemlClassifier (e.g. SklearnClassifier), "
                            f"got {type(clf).__name__}")
        check_equal_missing_label(clf.missing_label, self.missing_label_)
        if not isinstance(fit_clf, bool):
            raise TypeError(f"fit_clf: expected a bool, got {type(fit_clf).__name__}")
        if not source.needs.pool and not source.needs.val:
            return PoolInputs(n=n), None  # random reads nothing: no need to fit or predict
        if fit_clf:
            clf = clone(clf).fit(X, y)
        labeled = labeled_indices(y, self.missing_label_)
        return source(clf, np.asarray(X), seed=seed, labeled=lambda: (np.asarray(X)[labeled], np.asarray(y)[labeled]),
                      probs=lambda: clf.predict_proba(X))


def _is_nan(value) -> bool:
    try:
        return bool(np.isnan(value))
    except TypeError:
        return False
