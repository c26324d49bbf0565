"""What a strategy reads, computed from a torch model: one function shared by the AL runner and
the adapters in pyfk.integrations.

    pool, val = model_inputs("pfk", model, pool_x, val=(val_x, val_y), seed=3)
    pyfk.acquire("pfk", pool, 10, val=val, seed=3)

`model_inputs` computes exactly the fields `STRATEGIES[strategy].needs` names (see its docstring);
`holdout` is the seeded validation split of labeled rows for frameworks that keep none.
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pyfk.al.strategies import STRATEGIES, Needs, PoolInputs, ValInputs
from pyfk.engine.descriptors import Descriptors
from pyfk.errors import check_int
from pyfk.features.extract import extract

__all__ = ["model_inputs", "holdout", "mc_dropout", "predict", "model_logits", "seed_for", "torch_seeded"]


def seed_for(*parts: int | str) -> int:
    """A 32-bit seed from a tuple of non-negative ints and names (names hashed, not Python's hash())."""
    words = []
    for p in parts:
        if isinstance(p, str):
            words.append(int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little"))
        else:
            words.append(int(p))
    return int(np.random.SeedSequence(words).generate_state(1)[0])


@contextlib.contextmanager
def torch_seeded(seed: int):
    """torch's global CPU RNG seeded with `seed` inside, restored to what it was on exit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- forward passes

def _batches(x, batch: int):
    """The input tensors of `x`: a tensor cut in `batch` rows, or a loader's batches (first element)."""
    if isinstance(x, torch.Tensor):
        for i in range(0, x.shape[0], batch):
            yield x[i:i + batch]
    else:
        with torch.random.fork_rng(devices=[]):  # a DataLoader iterator draws a base seed from the global RNG,
            batches = iter(x)                    # which would shift the MC-dropout masks
        for b in batches:
            yield b[0] if isinstance(b, (tuple, list)) else b


def _device(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _softmax_rows(model, x, batch: int) -> np.ndarray:
    dev = _device(model)
    return torch.cat([torch.softmax(model(b.to(dev)), 1).float().cpu() for b in _batches(x, batch)]).numpy()


@torch.no_grad()
def predict(model, x, batch: int = 512) -> torch.Tensor:
    """(N, C) softmax of `model` in eval mode over x (a tensor, or a loader of x / (x, ...) batches)."""
    model.eval()
    return torch.from_numpy(_softmax_rows(model, x, batch))


@torch.no_grad()
def model_logits(model, x, batch: int = 512) -> np.ndarray:
    """(N, C) float64 logits of `model` in eval mode over x (a tensor, or a loader, as in `predict`)."""
    model.eval()
    dev = _device(model)
    return torch.cat([model(b.to(dev)).double().cpu() for b in _batches(x, batch)]).numpy()


def _dropouts(model) -> list:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]


@torch.no_grad()
def mc_dropout(model, x, passes: int, seed: int, batch: int = 512) -> np.ndarray:
    """(K, N, C) softmax with only the Dropout modules in train mode; the masks are drawn from
    `seed` alone (the global RNG is left as it was). x: a tensor or a loader, as in `predict`."""
    drops = _dropouts(model)
    if not drops:
        raise ValueError("MC dropout: the model has no Dropout module")
    was_training = model.training
    model.eval()
    for m in drops:
        m.train()
    try:
        with torch_seeded(seed):
            return np.stack([_softmax_rows(model, x, batch) for _ in range(passes)])
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- inputs

def _as_tensor(x, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype == torch.float64:
        t = t.float()  # sklearn-style float64 arrays feed float32 models
    if not (t.is_floating_point() and t.ndim >= 1):
        raise TypeError(f"{name}: expected a floating array/tensor of shape (N, ...), got {t.dtype} of shape "
                        f"{tuple(t.shape)}")
    return t


def _loader(data, name: str, batch: int, labels=None):
    """A DataLoader (in order) over `data`: an array/tensor (N, ...) (with `labels`), a map-style
    Dataset yielding x or (x, y, ...), or a DataLoader (used as given)."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        x = _as_tensor(data, name)
        if labels is None:
            return DataLoader(TensorDataset(x), batch_size=batch)
        y = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: expected {x.shape[0]} labels (one per row), got {y.shape[0]}")
        return DataLoader(TensorDataset(x, y), batch_size=batch)
    raise TypeError(f"{name}: expected an array or tensor (N, ...), a torch Dataset or a DataLoader, "
                    f"got {type(data).__name__}")


def _val_loader(val, batch: int):
    if isinstance(val, tuple) and len(val) == 2:
        return _loader(val[0], "val", batch, labels=val[1])
    if isinstance(val, (Dataset, DataLoader)):
        return _loader(val, "val", batch)
    raise TypeError(f"val: expected (inputs, labels), a torch Dataset or DataLoader of (x, y) batches, or None, "
                    f"got {type(val).__name__}")


def model_inputs(strategy: str | Needs, model: torch.nn.Module, pool, *, val=None, layers="auto",
                 seed: int = 0, pseudo_label: str = "argmax", mc_passes: int = 10, members=(),
                 batch_size: int = 256) -> tuple[PoolInputs, ValInputs | None]:
    """Exactly what `strategy` (a key of STRATEGIES, or its Needs) reads, from the current model:

      probs, descriptors, badge, features   one pyfk.extract pass over the pool: its softmax, its
          z/g descriptors at `layers` (pseudo-labels `pseudo_label`, only when descriptors are
          read; else the prediction, which needs no reference), its BADGE factors, and for
          `features` the penultimate features h (the BADGE factor without its bias column);
      mc_probs   passes="mc_dropout": `mc_passes` passes with only the Dropout modules in train mode
                 (K, N, C); passes="ensemble": the softmax of `model` and of each of `members`
                 (1 + len(members), N, C);
      val        the validation set extracted with true-label gradients (also the reference of
                 pseudo_label="map" when descriptors are read).
    PoolInputs.n is always the pool size (all that `random` reads).

    pool: the pool's inputs: an array/tensor (N, ...) (float64 is read as float32), a map-style torch
        Dataset yielding x or (x, y, ...) (labels are not read), or a DataLoader over one, in order.
    val: (inputs, labels) arrays/tensors, or a Dataset/DataLoader of (x, y); needed iff the strategy
        reads a validation set or pseudo_label="map" with descriptors; else ignored.
    seed: seeds the extraction's MC perturbations and the MC-dropout masks (nothing else is random).
        The masks also depend on how rows are batched: an array pool is cut in 2 x batch_size rows per
        pass, a Dataset in batch_size, a DataLoader as it batches.
    Returns (PoolInputs, ValInputs or None).
    """
    needs = STRATEGIES[strategy].needs if isinstance(strategy, str) and strategy in STRATEGIES else strategy
    if not isinstance(needs, Needs):
        raise ValueError(f"strategy: expected one of {sorted(STRATEGIES)} or a Needs, got {strategy!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    seed = check_int(seed, "seed", 0, 2**63 - 1)
    batch_size = check_int(batch_size, "batch_size", 1, 2**31 - 1)
    fields = set(needs.pool)
    pseudo = pseudo_label if "descriptors" in fields else "argmax"
    tensor_pool = isinstance(pool, (np.ndarray, torch.Tensor))
    pool_x = _as_tensor(pool, "pool") if tensor_pool else pool
    pool_loader = _loader(pool_x, "pool", batch_size)
    val_ext = None
    if needs.val or pseudo == "map":
        if val is None:
            raise ValueError("val: strategy reads a validation set (or pseudo_label='map'); expected (inputs, "
                             "labels) or a Dataset/DataLoader of (x, y), got None")
        val_ext = extract(model, _val_loader(val, batch_size), layers, with_true=True, progress=False)
    inputs = {}
    if fields & {"probs", "descriptors", "badge", "features"}:
        with_badge = bool(fields & {"badge", "features"})
        ext = extract(model, pool_loader, layers, pseudo_label=pseudo, badge=with_badge,
                      seed=seed_for(seed, "extract"), mc_passes=mc_passes,
                      map_reference=(val_ext.descriptors, val_ext.labels) if pseudo == "map" else None,
                      progress=False)
        inputs.update(probs=ext.probs, descriptors=ext.descriptors, badge=ext.badge)
        if "features" in fields:
            inputs["features"] = Descriptors([np.ascontiguousarray(np.asarray(ext.badge.z[0])[:, :-1])])
    # an array pool is cut in 2 x batch_size rows for the passes (the runner's batching, kept so its
    # rounds reproduce); a Dataset/DataLoader pool keeps its loader's batches
    passes_x = pool_x if tensor_pool else pool_loader
    if needs.passes == "mc_dropout":
        inputs["mc_probs"] = mc_dropout(model, passes_x, mc_passes, seed_for(seed, "mc_dropout"), 2 * batch_size)
    elif needs.passes == "ensemble":
        inputs["mc_probs"] = np.stack([predict(m, passes_x, 2 * batch_size).numpy() for m in (model, *members)])
    n = _pool_size(pool_x, pool_loader, inputs)
    pool_inputs = PoolInputs(**{name: inputs[name] for name in needs.pool}, n=n)
    return pool_inputs, (ValInputs.from_extraction(val_ext) if needs.val else None)


def _pool_size(pool_x, loader, inputs) -> int:
    if isinstance(pool_x, torch.Tensor):
        return int(pool_x.shape[0])
    if "probs" in inputs:
        return int(len(inputs["probs"]))
    if "mc_probs" in inputs:
        return int(inputs["mc_probs"].shape[1])
    return int(len(loader.dataset))


def holdout(labeled, fraction: float, seed: int) -> np.ndarray:
    """A seeded validation split of labeled rows: round(fraction * len(labeled)) of them (at least 1),
    drawn without replacement from `seed`, returned sorted. fraction in (0, 1)."""
    labeled = np.asarray(labeled, dtype=np.int64).reshape(-1)
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < float(fraction) < 1:
        raise ValueError(f"validation: expected a fraction in (0, 1) of the labeled rows, got {fraction!r}")
    if labeled.size == 0:
        raise ValueError("validation: a held-out fraction needs labeled rows, got none")
    count = max(1, int(round(float(fraction) * labeled.size)))
    rng = np.random.default_rng(seed_for(seed, "validation"))
    return np.sort(rng.choice(labeled, size=count, replace=False))
