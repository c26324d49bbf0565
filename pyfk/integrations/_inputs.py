"""What every adapter shares: which nn.Module to read inside the peer's classifier, the validation
set, and the PoolInputs/ValInputs a pyfk strategy needs from them (pyfk.al.inputs.model_inputs)."""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pyfk.al.inputs import holdout, model_inputs
from pyfk.al.strategies import PoolInputs, ValInputs
from pyfk.al.strategies.base import check_strategy
from pyfk.errors import check_int

# where peers keep the torch module, tried in this order: skorch and pyfk.integrations.TorchClassifier
# (module_), small-text's PytorchClassifier and baal's ModelWrapper (model), scikit-activeml's
# SklearnClassifier (estimator_ once fitted, estimator), modAL's learners (estimator)
MODULE_ATTRS = ("module_", "model", "estimator_", "estimator", "module")

VALIDATION_FORMS = ("a pyfk.ValInputs", "(inputs, labels)", "a torch Dataset/DataLoader of (x, y)",
                    "a fraction in (0, 1) of the labeled rows", "a callable (clf) -> one of these")


def find_module(obj, depth: int = 4) -> torch.nn.Module:
    """The torch.nn.Module inside a peer's classifier or learner (`obj` itself if it is one)."""
    seen = obj
    for _ in range(depth + 1):
        if isinstance(obj, torch.nn.Module):
            return obj
        inner = next((getattr(obj, a) for a in MODULE_ATTRS if getattr(obj, a, None) is not None), None)
        if inner is None:
            break
        obj = inner
    raise TypeError(f"model: found no torch.nn.Module inside {type(seen).__name__} (looked at the attributes "
                    f"{list(MODULE_ATTRS)}); pass model=<the nn.Module> or model=callable(clf) -> nn.Module")


def _is_fraction(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class AdapterInputs:
    """Builds (PoolInputs, ValInputs or None) for `strategy` each round.

    model: None (found inside the peer's classifier by `find_module`), an nn.Module, a callable
        (clf) -> nn.Module, or a list of nn.Modules (ensemble strategies: the first is the model,
        the rest its members).
    validation: for the PFK family (pfk, pfk_sum, pcc), one of VALIDATION_FORMS. A fraction holds
        out round(fraction x labeled) labeled rows, drawn from the round's seed; they stay labeled
        (never picked). The peer trains on every labeled row, so they are not held out from
        training: PFK then queries the labeled rows the model still gets wrong (every row, with
        pyfk's warning, if it gets none wrong). A separate labeled split is the paper's setting.
    layers, mc_passes, batch_size, pseudo_label: as in pyfk.al.inputs.model_inputs.
    params: the strategy's parameters, checked against STRATEGIES[strategy].params (None: none).
    """

    def __init__(self, strategy: str, *, model=None, validation=None, layers="auto", mc_passes: int = 10,
                 batch_size: int = 256, pseudo_label: str = "argmax", params=None):
        self.needs = check_strategy(strategy, params or {}).needs
        if not (model is None or callable(model) or
                (isinstance(model, (list, tuple)) and model and all(isinstance(m, torch.nn.Module) for m in model))):
            raise TypeError(f"model: expected None, a torch.nn.Module, a callable (clf) -> nn.Module or a list of "
                            f"nn.Modules, got {type(model).__name__}")
        if self.needs.passes == "ensemble" and not (isinstance(model, (list, tuple)) and len(model) >= 2):
            raise ValueError(f"model: strategy {strategy!r} reads an ensemble; pass model=[model, member, ...] "
                             f"(at least 2 nn.Modules), got {type(model).__name__}")
        if validation is not None:
            if _is_fraction(validation):
                if not 0 < float(validation) < 1:
                    raise ValueError(f"validation: expected a fraction in (0, 1) of the labeled rows, "
                                     f"got {validation!r}")
            elif not (isinstance(validation, (ValInputs, Dataset, DataLoader)) or callable(validation) or
                      (isinstance(validation, tuple) and len(validation) == 2)):
                raise TypeError(f"validation: expected {', '.join(VALIDATION_FORMS)}, got {type(validation).__name__}")
        if self.needs.val and validation is None:
            raise ValueError(f"validation: strategy {strategy!r} reads a validation set (labeled rows with their "
                             f"true labels); pass validation= {' or '.join(VALIDATION_FORMS)}, got None")
        self.strategy, self.model, self.validation = strategy, model, validation
        self.layers, self.pseudo_label = layers, pseudo_label
        self.mc_passes = check_int(mc_passes, "mc_passes", 1, 2**31 - 1)
        self.batch_size = check_int(batch_size, "batch_size", 1, 2**31 - 1)

    @property
    def reads_model(self) -> bool:
        """Whether the strategy reads more than probabilities (or the caller named a model)."""
        return self.model is not None or self.needs.pool not in ((), ("probs",)) or self.needs.val

    def modules(self, clf) -> list:
        model = self.model
        if model is None:
            return [find_module(clf)]
        if isinstance(model, (list, tuple)):
            return list(model)
        if not isinstance(model, torch.nn.Module):
            model = model(clf)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: the callable must return a torch.nn.Module, got {type(model).__name__}")
        return [model]

    def __call__(self, clf, pool, *, seed: int, labeled=None, probs=None) -> tuple[PoolInputs, ValInputs | None]:
        """pool: the pool rows (array (N, ...) or torch Dataset). labeled: a callable () -> (inputs,
        labels) of the labeled rows, or () -> a torch Dataset of their (x, y), read only for a
        fractional validation. probs: a callable () ->
        (N, C) probabilities, used (without a model) when the strategy reads only probabilities."""
        n = len(pool)
        if not self.reads_model:
            if not self.needs.pool:
                return PoolInputs(n=n), None
            if probs is None:
                raise ValueError(f"model: strategy {self.strategy!r} reads class probabilities and the classifier "
                                 f"gives none; pass model=<the nn.Module>")
            return PoolInputs(probs=np.asarray(probs(), dtype=np.float64), n=n), None
        model, *members = self.modules(clf)
        val = self._validation(clf, seed, labeled) if self.needs.val or self.pseudo_label == "map" else None
        options = dict(layers=self.layers, seed=seed, pseudo_label=self.pseudo_label, mc_passes=self.mc_passes,
                       members=members, batch_size=self.batch_size)
        if isinstance(val, ValInputs):  # built by the caller: extract the pool only
            if self.pseudo_label == "map":
                raise ValueError("pseudo_label: 'map' extracts the validation set itself; give validation as "
                                 "inputs and labels (not a ValInputs)")
            pool_inputs, _ = model_inputs(dataclasses.replace(self.needs, val=False), model, pool, **options)
            return pool_inputs, val
        return model_inputs(self.needs, model, pool, val=val, **options)

    def ready_validation(self, clf, where: str) -> ValInputs | None:
        """The ValInputs to use beside PoolInputs the caller built (`where`: the argument that
        carried them): `validation` must be a ValInputs or a callable (clf) -> ValInputs."""
        if not self.needs.val:
            return None
        val = self.validation
        val = val(clf) if callable(val) and not isinstance(val, ValInputs) else val
        if not isinstance(val, ValInputs):
            raise TypeError(f"validation: with {where}, expected a pyfk.ValInputs or a callable (clf) -> ValInputs, "
                            f"got {type(val).__name__}")
        return val

    def _validation(self, clf, seed: int, labeled):
        v = self.validation
        if callable(v) and not isinstance(v, (Dataset, DataLoader, ValInputs)):
            v = v(clf)
        if _is_fraction(v):
            if labeled is None:
                raise ValueError("validation: a fraction of the labeled rows needs a learner that keeps them "
                                 "(this one does not); pass validation=(inputs, labels) instead")
            data = labeled()
            if isinstance(data, Dataset):  # yields (x, y) of the labeled rows
                return Subset(data, holdout(np.arange(len(data)), float(v), seed).tolist())
            x, y = data
            rows = holdout(np.arange(len(y)), float(v), seed)
            return x[rows], np.asarray(y)[rows]
        return v
