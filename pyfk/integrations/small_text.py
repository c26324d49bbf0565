"""pyfk's acquisition strategies as a small-text QueryStrategy.

    from pyfk.integrations import TorchClassifier
    from pyfk.integrations.small_text import PyfkQueryStrategy
    factory = SklearnClassifierFactory(TorchClassifier(net, epochs=30, lr=1e-2), 10)
    learner = PoolBasedActiveLearner(factory, PyfkQueryStrategy("pfk", validation=0.2), train)

Requires small-text (>= 1.4); pyfk does not depend on it. Where the inputs come from:

- strategies that read only `probs` (entropy, margin, least_confidence) or nothing (random) work
  with any small-text classifier: `clf.predict_proba(dataset)`;
- the others (MC dropout, ensembles, coreset, badge, the PFK family) read the torch model: the
  nn.Module found inside the classifier (`TorchClassifier.module_` behind small-text's
  SklearnClassifier, small-text's PytorchClassifier `.model`), or `model=`; the pool rows are
  `dataset.x` (an array) or the dataset itself if it is a torch Dataset;
- or an `inputs=` callable that builds the PoolInputs itself (e.g. for text datasets).
The PFK family (pfk, pfk_sum, pcc) also needs `validation=`.
"""

from __future__ import annotations

import numpy as np
from small_text.query_strategies import QueryStrategy
from torch.utils.data import Dataset

from pyfk.al.strategies.base import PoolInputs, Selection, select
from pyfk.errors import check_int
from pyfk.integrations._inputs import AdapterInputs

__all__ = ["PyfkQueryStrategy"]


class PyfkQueryStrategy(QueryStrategy):
    """A small-text QueryStrategy that picks with `pyfk.acquire(strategy, ...)`.

    strategy: a key of pyfk.STRATEGIES ("pfk" by default).
    seed: the base seed (an integer in [0, 2**62]). Round r uses seed + the number of labeled rows
        at that round, so rounds differ but a rerun of the same loop picks the same rows.
    model: None (the nn.Module inside the classifier), an nn.Module, a callable (clf) -> nn.Module,
        or a list of nn.Modules for the ensemble strategies.
    validation: the validation set of the PFK family: a pyfk.ValInputs; (inputs, labels); a torch
        Dataset of (x, y); a fraction in (0, 1) of the labeled rows, held out per round from the
        round's seed (small-text trains on them too: see pyfk.integrations._inputs.AdapterInputs);
        or a callable (clf) -> one of these. Required iff the strategy reads one.
    inputs: optional callable `inputs(clf, dataset, strategy) -> pyfk.PoolInputs` over the whole
        `dataset` (row i = dataset row i), instead of reading the model; `validation` must then be a
        ValInputs or a callable returning one.
    layers, mc_passes, batch_size: how the model is read (pyfk.al.inputs.model_inputs).
    params: the strategy's keyword parameters (see STRATEGIES[strategy].params).

    `query` returns the picked indices (int64, relative to `dataset`, in pick order); every row not
    in `indices_unlabeled` is excluded: the labeled rows as pyfk's `labeled` (coreset's centres), the
    rows small-text ignores as `ignored` (neither picked nor centres). The Selection of the
    last query (scores, provenance) is kept on `self.last`.
    """

    def __init__(self, strategy: str = "pfk", *, seed: int = 0, model=None, validation=None, inputs=None,
                 layers="auto", mc_passes: int = 10, batch_size: int = 256, **params):
        self.source = AdapterInputs(strategy, model=model, validation=validation, layers=layers,
                                    mc_passes=mc_passes, batch_size=batch_size, params=params)
        seed = check_int(seed, "seed", 0, 2**62)
        if inputs is not None and not callable(inputs):
            raise TypeError(f"inputs: expected a callable (clf, dataset, strategy) -> PoolInputs or None, "
                            f"got {type(inputs).__name__}")
        self.strategy, self.seed, self.inputs, self.params = strategy, int(seed), inputs, params
        self.last: Selection | None = None

    def query(self, clf, dataset, indices_unlabeled, indices_labeled, y, n=10):
        """Pick `n` rows of `dataset` among `indices_unlabeled` (see the class docstring)."""
        self._validate_query_input(indices_unlabeled, n)
        size = len(dataset)
        seed = self.seed + len(indices_labeled)
        if self.inputs is not None:
            pool, val = self._custom_inputs(clf, dataset)
        else:
            rows = _rows(dataset) if self.source.reads_model else dataset
            labeled = np.asarray(indices_labeled, dtype=np.int64)
            pool, val = self.source(clf, rows, seed=seed, labeled=lambda: (_take(rows, labeled), np.asarray(y)),
                                    probs=lambda: clf.predict_proba(dataset))
        unlabeled = np.asarray(indices_unlabeled, dtype=np.int64).reshape(-1)
        labeled = np.unique(np.asarray(indices_labeled, dtype=np.int64).reshape(-1))
        # small-text's ignored rows: never picked, and not coreset centres as the labeled rows are
        ignored = np.setdiff1d(np.arange(size, dtype=np.int64), np.union1d(unlabeled, labeled))
        self.last = select(self.strategy, pool, n, labeled=labeled, ignored=ignored, seed=seed, val=val,
                           **self.params)
        return self.last.indices

    def _custom_inputs(self, clf, dataset):
        pool = self.inputs(clf, dataset, self.strategy)
        if not isinstance(pool, PoolInputs):
            raise TypeError(f"inputs: the callable must return a pyfk.PoolInputs, got {type(pool).__name__}")
        return pool, self.source.ready_validation(clf, "inputs=")

    def __str__(self):
        return f"PyfkQueryStrategy(strategy={self.strategy!r}, seed={self.seed}, params={self.params})"


def _rows(dataset):
    """The pool rows pyfk reads: a torch Dataset as is, else the dataset's feature array `x`."""
    if isinstance(dataset, Dataset):
        return dataset
    x = getattr(dataset, "x", None)
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"dataset: expected a small-text dataset whose .x is a dense array (e.g. SklearnDataset) or a "
                    f"torch Dataset, got {type(dataset).__name__} with x of type {type(x).__name__}; pass inputs= "
                    f"to build the PoolInputs yourself")


def _take(rows, index: np.ndarray):
    if isinstance(rows, Dataset):
        from torch.utils.data import Subset
        return Subset(rows, index.tolist())
    return rows[index]
