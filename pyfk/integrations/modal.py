"""modAL adapter: any pyfk strategy as a modAL query strategy.

    from modAL.models import DeepActiveLearner
    from pyfk.integrations import TorchClassifier
    from pyfk.integrations.modal import pyfk_query_strategy

    clf = TorchClassifier(net, epochs=20, lr=1e-2, seed=0)              # net: an nn.Module giving logits
    learner = DeepActiveLearner(clf, pyfk_query_strategy("pfk", validation=(x_val, y_val)))
    learner.teach(x_init, y_init)
    for _ in range(rounds):
        idx, _ = learner.query(X_pool, n_instances=10)                  # positions in X_pool
        learner.teach(X_pool[idx], y_pool[idx])
        X_pool, y_pool = np.delete(X_pool, idx, 0), np.delete(y_pool, idx)

Every key of pyfk.STRATEGIES works. Strategies that read only probabilities (entropy, margin,
least_confidence) use `learner.predict_proba(X_pool)`, so any modAL estimator does; the others (MC
dropout, ensembles, coreset, badge, the PFK family) read the torch model: the nn.Module inside the
learner's estimator (`module_` of pyfk.integrations.TorchClassifier or of skorch's
NeuralNetClassifier), or `model=`. The PFK family (pfk, pfk_sum, pcc) also needs `validation=`.

X_pool is the pool as modAL passes it: usually the unlabeled rows only (the caller deletes the picked
rows each round). Every row of X_pool may be picked; pyfk sees no labeled pool rows, so coreset starts
from a seeded random pick rather than from the labeled rows as centres.

What works with modAL-python 0.4.2.1 today:

- DeepActiveLearner (as above): it trains through `initialize`/`partial_fit`/`fit`, which
  TorchClassifier (torch and scikit-learn only) provides.
- ActiveLearner's fit/teach call scikit-learn's check_X_y(force_all_finite=...), removed in
  scikit-learn 1.8: they raise TypeError there. Pin scikit-learn<1.8 to use ActiveLearner.
- skorch: modAL pins skorch==0.9.0, which imports pkg_resources (gone from current setuptools) and
  fails to import; install skorch>=1.0 after modAL to use NeuralNetClassifier. TorchClassifier needs
  neither skorch nor a scikit-learn pin.

This module does not import modAL; it only needs the learner modAL passes (modAL is not a pyfk
dependency: `pip install modAL-python`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from pyfk.al.strategies import Selection, select
from pyfk.errors import check_int
from pyfk.integrations._inputs import AdapterInputs

__all__ = ["PyfkQueryStrategy", "pyfk_query_strategy"]


class PyfkQueryStrategy:
    """A modAL query strategy, `(learner, X_pool, n_instances=1) -> (indices, scores)`, picking with
    `pyfk.acquire(strategy, ...)`. Build it with `pyfk_query_strategy`.

    Returns a 2-tuple, as modAL's BaseLearner.query expects: indices (int64, positions in X_pool, in
    pick order) and their pyfk scores (learner.query(..., return_metrics=True) gives them back as the
    metrics). The last Selection (indices, scores, provenance) is kept on `.last`; `.calls` counts the
    queries answered.

    The seed of a query is `seed + len(learner.X_training)` when the learner keeps its labeled rows
    (ActiveLearner), else `seed + .calls` (DeepActiveLearner keeps none): rounds differ, and a rerun of
    the same loop with a fresh strategy picks the same rows (the same torch thread count included:
    training and MC dropout are bit-reproducible only then). A refused query counts nothing; modAL's
    query catches any error of its strategy and calls it again, so the error is raised by that second
    call.
    """

    def __init__(self, strategy: str = "pfk", *, seed: int = 0, model=None, validation=None, layers="auto",
                 mc_passes: int = 10, batch_size: int = 256, **params):
        self.source = AdapterInputs(strategy, model=model, validation=validation, layers=layers,
                                    mc_passes=mc_passes, batch_size=batch_size, params=params)
        self.seed = check_int(seed, "seed", 0, 2**62)
        self.strategy, self.params = strategy, params
        self.calls = 0
        self.last: Selection | None = None

    def __call__(self, learner, X_pool, n_instances: int = 1) -> tuple[np.ndarray, np.ndarray]:
        n_pool = len(X_pool)
        if n_pool == 0:
            raise ValueError("X_pool: expected at least one row to pick from, got an empty pool")
        n_instances = check_int(n_instances, "n_instances", 1, n_pool, f" (the {n_pool} rows of X_pool)")
        known = _labeled(learner)
        seed = self.seed + (len(known[1]) if known is not None else self.calls)
        clf = getattr(learner, "estimator", learner)
        rows = X_pool if isinstance(X_pool, (np.ndarray, torch.Tensor, Dataset)) else np.asarray(X_pool)
        pool, val = self.source(clf, rows, seed=seed, labeled=(lambda: known) if known is not None else None,
                                probs=lambda: learner.predict_proba(X_pool))
        self.last = select(self.strategy, pool, n_instances, seed=seed, val=val, **self.params)
        self.calls += 1
        return self.last.indices, self.last.scores

    def __repr__(self):
        return f"pyfk_query_strategy({self.strategy!r}, seed={self.seed}, params={self.params})"


def pyfk_query_strategy(strategy: str = "pfk", *, seed: int = 0, model=None, validation=None, layers="auto",
                        mc_passes: int = 10, batch_size: int = 256, **params) -> PyfkQueryStrategy:
    """A modAL query strategy running the pyfk strategy `strategy` (a key of pyfk.STRATEGIES).

    seed: the base seed, an integer in [0, 2**62] (see PyfkQueryStrategy for the seed of each query).
    model: None (the nn.Module inside learner.estimator), an nn.Module, a callable (estimator) ->
        nn.Module, or a list of nn.Modules for the ensemble strategies (the first is the model).
    validation: the PFK family's validation set: a pyfk.ValInputs, (inputs, labels), a torch Dataset
        of (x, y), a callable (estimator) -> one of these, or a fraction in (0, 1) of the labeled rows
        (only with a learner that keeps them, i.e. ActiveLearner's X_training/y_training).
    layers, mc_passes, batch_size: how the model is read (pyfk.al.inputs.model_inputs).
    params: the strategy's parameters (STRATEGIES[strategy].params), e.g. k= for pfk.
    Everything is checked here; ValueError/TypeError name the argument at fault. Each query checks
    n_instances (an integer in [1, len(X_pool)]) and raises what pyfk.acquire raises.
    """
    return PyfkQueryStrategy(strategy, seed=seed, model=model, validation=validation, layers=layers,
                             mc_passes=mc_passes, batch_size=batch_size, **params)


def _labeled(learner):
    """(X_training, y_training) if the learner keeps its labeled rows (ActiveLearner), else None."""
    x, y = getattr(learner, "X_training", None), getattr(learner, "y_training", None)
    if x is None or y is None:
        return None
    return (x if isinstance(x, (np.ndarray, torch.Tensor, Dataset)) else np.asarray(x)), np.asarray(y)
