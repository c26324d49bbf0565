"""TorchClassifier: a torch module as a scikit-learn classifier, for AL libraries whose loops take
an sklearn estimator (small-text's SklearnClassifierFactory, scikit-activeml's SklearnClassifier,
modAL's ActiveLearner and DeepActiveLearner).

    clf = TorchClassifier(torch.nn.Sequential(...), epochs=30, lr=1e-2, seed=0)
    clf.fit(X, y); clf.predict_proba(X); clf.module_      # the trained nn.Module, for pyfk.extract

It exists so that those loops and pyfk see the same nn.Module: the adapters find it at `module_`.
skorch's NeuralNetClassifier plays the same part where it installs (skorch >= 1.0; the skorch 0.9.0
that modAL-python 0.4.2.1 pins imports pkg_resources, which current setuptools no longer ships).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from pyfk.errors import check_int

__all__ = ["TorchClassifier"]


class TorchClassifier(ClassifierMixin, BaseEstimator):
    """A classifier returning logits (B, C) trained with Adam on the cross-entropy.

    module: the nn.Module at its initial weights; it is never trained itself: `fit` trains a
        deep copy, `module_` (so sklearn.clone and every refit start from the same weights).
    epochs, lr, batch_size, weight_decay: the training loop (`epochs` passes over the rows given).
    seed: seeds the minibatch order and the dropout masks of training (a refit on the same data
        gives the same weights, bit for bit on the same machine and thread count).
    classes_ is 0..C-1 where C is the out_features of the module's last nn.Linear (labels outside it
        raise ValueError):
        in AL the first labeled rows rarely cover every class, and probability columns must not move.
    """

    def __init__(self, module: torch.nn.Module, *, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64,
                 weight_decay: float = 0.0, seed: int = 0):
        self.module = module
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.seed = seed

    # -- skorch's names, which modAL's DeepActiveLearner calls
    def initialize(self):
        """Start over from `module`'s weights (module_ = a fresh copy)."""
        if not isinstance(self.module, torch.nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(self.module).__name__}")
        self.module_ = copy.deepcopy(self.module)
        self.module_.eval()
        heads = [m for m in self.module_.modules() if isinstance(m, torch.nn.Linear)]
        if not heads:
            raise ValueError("module: expected a classifier ending in an nn.Linear (its out_features are the "
                             "classes), found no nn.Linear")
        self.classes_ = np.arange(heads[-1].out_features)
        self.fits_ = 0
        return self

    def fit(self, X, y, sample_weight=None):
        """Train a fresh copy of `module` on (X, y); returns self. sample_weight: None only (small-text
        passes it)."""
        if sample_weight is not None:
            raise ValueError("sample_weight: TorchClassifier trains unweighted; expected None, got weights")
        self.initialize()
        return self.partial_fit(X, y)

    def partial_fit(self, X, y, classes=None):
        """Continue training module_ (initialised first if needed) on (X, y); returns self."""
        if not hasattr(self, "module_"):
            self.initialize()
        x = self._x(X)
        labels = np.asarray(y)
        if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
            raise ValueError(f"y: expected {x.shape[0]} labels (one per row of X), got shape {labels.shape}")
        if labels.dtype.kind == "f":
            if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
                raise ValueError("y: expected integer class labels, got non-integer or missing values")
        elif labels.dtype.kind not in "iu":
            raise TypeError(f"y: expected integer class labels, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.classes_)):
            raise ValueError(f"y: expected labels in [0, {len(self.classes_)}) (the module's output width), "
                             f"got range [{labels.min()}, {labels.max()}]")
        epochs = check_int(self.epochs, "epochs", 0, 2**31 - 1)
        batch = check_int(self.batch_size, "batch_size", 1, 2**31 - 1)
        seed = check_int(self.seed, "seed", 0, 2**63 - 1)
        target = torch.from_numpy(labels)
        net = self.module_
        opt = torch.optim.Adam(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
        gen = torch.Generator().manual_seed(seed + self.fits_)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + self.fits_)  # dropout masks
            net.train()
            for _ in range(epochs):
                order = torch.randperm(x.shape[0], generator=gen)
                for i in range(0, x.shape[0], batch):
                    rows = order[i:i + batch]
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(net(x[rows]), target[rows]).backward()
                    opt.step()
        net.eval()
        self.fits_ += 1
        return self

    @torch.no_grad()
    def predict_proba(self, X) -> np.ndarray:
        """(N, C) float64 softmax of module_ in eval mode."""
        if not hasattr(self, "module_"):
            raise ValueError("TorchClassifier: call fit (or initialize) before predict_proba")
        x = self._x(X)
        self.module_.eval()
        out = [torch.softmax(self.module_(x[i:i + 512]), 1) for i in range(0, x.shape[0], 512)]
        return torch.cat(out).double().numpy() if out else np.zeros((0, len(self.classes_)))

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]

    def _x(self, X) -> torch.Tensor:
        x = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(X))
        if not x.is_floating_point():
            raise TypeError(f"X: expected a floating array, got {x.dtype}")
        return x.float()
