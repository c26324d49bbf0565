"""baal adapter: any pyfk strategy as a baal heuristic, inside baal's own ActiveLearningLoop.

    from baal.active import ActiveLearningDataset, ActiveLearningLoop
    from baal.modelwrapper import ModelWrapper, TrainingArgs
    from pyfk.integrations.baal import PyfkHeuristic

    wrapper = ModelWrapper(net, TrainingArgs(optimizer=opt, criterion=nn.CrossEntropyLoss(), epoch=10))
    heuristic = PyfkHeuristic("pfk", query_size=10, model=wrapper, validation=(x_val, y_val))
    loop = ActiveLearningLoop(al_dataset, heuristic.get_probabilities, heuristic, query_size=10)
    for _ in range(rounds):
        wrapper.train_on_dataset(al_dataset)
        loop.step()

Why this shape. baal's extension point is a pair: `ActiveLearningLoop(dataset, get_probabilities,
heuristic, query_size)` calls `get_probabilities(dataset.pool, **kwargs)` and hands whatever it
returns, untouched, to `heuristic.get_ranks(...)`, then labels the first `query_size` ranks. baal
assumes that object is an array of predictions and that the heuristic scores rows one by one; pyfk's
strategies read more (descriptors, BADGE factors, penultimate features, a validation set) and some
pick a batch jointly (coreset, badge, the PFK family), so no per-row score can stand in for them.
PyfkHeuristic therefore supplies both halves of the pair:

- `heuristic.get_probabilities(pool)` (the loop's get_probabilities) reads the torch model over the
  pool (pyfk.al.inputs.model_inputs, through pyfk.integrations._inputs.AdapterInputs) and returns a
  `PyfkInputs`: the PoolInputs/ValInputs the strategy needs and the round's seed, with `len()` = the
  pool size (baal checks `len(probs) > 0`);
- `heuristic.get_ranks(inputs)` runs `pyfk.acquire(strategy, ...)` and returns `(indices, scores)`:
  the picks, positions in the pool in pick order (baal labels `indices[:query_size]`, and maps them
  itself when it subsamples the pool with max_sample), and pyfk's score of each pick (baal logs
  their mean/std/median). Unlike baal's heuristics, only the `query_size` picks are ranked.
  baal hands get_probabilities the pool only; with `dataset=` the heuristic also sees the labelled
  rows (coreset's initial centres, a validation fraction, the round seed).

It also drops into existing baal code that keeps `wrapper.predict_on_dataset` as get_probabilities:
given baal's predictions ([N, C] or [N, C, K] logits or probabilities; a generator or tensor too),
`get_ranks` runs the strategies those can feed -- random (the row count), entropy, margin and
least_confidence (baal's `to_prob`, averaged over the K passes) and the MC-dropout / ensemble
strategies (bald, var_ratio, std, ensemble_*: the K passes or members as pyfk's (K, N, C) mc_probs).
The others need `heuristic.get_probabilities` as the loop's get_probabilities (ValueError otherwise).

A model patched with baal's MC dropout (`patch_module`, `MCDropoutModule`, the consistent variants)
reads as the unpatched model: baal's dropout layers drop in eval mode too, so while pyfk reads the
model they are swapped for torch's Dropout (same p) and put back after; pyfk's MC-dropout strategies
then draw their own seeded masks. baal's DropConnect (`MCDropoutConnectModule`) is not undone: its
weight dropout makes every read stochastic; use Dropout layers, or baal's predictions, with pyfk.

The round seed is `seed + the number of labelled rows` (`dataset.n_labelled`) when `dataset=` (the
ActiveLearningDataset) is given, else `seed + the number of rounds ranked so far`: rounds differ and
a rerun of the same loop (same seeds, a fresh heuristic) picks the same rows. It seeds the MC
perturbations of the extraction, the MC-dropout masks, the fractional validation split and
pyfk.acquire.

Importing this module imports baal (not a pyfk dependency: `pip install baal`).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import numpy as np
import torch
from baal.active.dataset import ActiveLearningDataset
from baal.active.heuristics import AbstractHeuristic
from baal.bayesian.consistent_dropout import ConsistentDropout, ConsistentDropout2d
from baal.bayesian.dropout import Dropout as MCDropout
from baal.bayesian.dropout import Dropout2d as MCDropout2d
from baal.utils.array_utils import to_prob
from torch.utils.data import ConcatDataset, Dataset

from pyfk.al.strategies import STRATEGIES, PoolInputs, Selection, ValInputs, select
from pyfk.al.strategies.base import check_strategy
from pyfk.errors import check_int
from pyfk.integrations._inputs import AdapterInputs, _is_fraction, find_module

__all__ = ["PyfkHeuristic", "PyfkInputs"]

# what a strategy can be fed from baal's prediction arrays alone (see get_ranks)
_FROM_PREDICTIONS = {(): "nothing", ("probs",): "probs", ("mc_probs",): "mc_probs"}
# strategies that read the labelled rows (as initial centres), not only exclude them
_CENTRES = {"coreset"}
# baal's MC-dropout layers, which ignore eval mode (see _torch_dropout)
_BAAL_DROPOUT = {MCDropout: torch.nn.Dropout, MCDropout2d: torch.nn.Dropout2d, ConsistentDropout: torch.nn.Dropout,
                 ConsistentDropout2d: torch.nn.Dropout2d}


@dataclass
class PyfkInputs:
    """What `PyfkHeuristic.get_probabilities` hands (through baal's loop) to `get_ranks`: the pool's
    PoolInputs, the ValInputs (PFK family) and the round's seed. len() is the pool size n; `pool` may
    hold more rows after the n of the pool (coreset's labelled centres), listed in `labeled`."""

    pool: PoolInputs
    val: ValInputs | None
    seed: int
    n: int
    labeled: np.ndarray

    def __len__(self) -> int:
        return self.n


class PyfkHeuristic(AbstractHeuristic):
    """A baal heuristic that picks with `pyfk.acquire(strategy, ...)` (see the module docstring).

    strategy: a key of pyfk.STRATEGIES ("pfk" by default).
    query_size: the picks per round, as the loop's query_size (pyfk picks a batch jointly; a pool
        smaller than query_size gives all its rows).
    seed: the base seed, an integer in [0, 2**62]; round seed as in the module docstring.
    model: where `get_probabilities` reads the torch model: the baal ModelWrapper (its `.model`, looked
        up each round, so a wrapper whose model is replaced still works), an nn.Module, any object
        holding one (pyfk.integrations._inputs.find_module), or for ensemble_* a list of nn.Modules
        (the first is the model, the rest its members). None: only baal's predictions can be ranked
        (random, entropy, margin, least_confidence, bald, var_ratio, std, ensemble_*).
    validation: the validation set of the PFK family (pfk, pfk_sum, pcc): a pyfk.ValInputs; (inputs,
        labels); a torch Dataset/DataLoader of (x, y); a fraction in (0, 1) of the labelled rows (needs
        dataset=; held out per round from the round's seed out of the rows `dataset` yields -- baal
        trains on them too, see AdapterInputs -- so give the pool's transforms to the dataset itself
        if it augments); or a callable (model) -> one of these. Required iff the strategy reads one.
    dataset: the loop's ActiveLearningDataset (optional): the round seed counts its labelled rows, a
        fractional validation is drawn from its labelled part, and coreset takes the labelled rows it
        yields as its initial centres (without dataset=, coreset sees only the pool and starts from a
        seeded random pick).
    layers, mc_passes, batch_size: how the model is read (pyfk.al.inputs.model_inputs); mc_passes is
        K for the MC-dropout strategies.
    params: the strategy's parameters (STRATEGIES[strategy].params), e.g. k= for pfk.

    Everything is checked here (ValueError/TypeError name the argument). The last Selection (indices,
    scores, provenance) is kept on `.last`; `.calls` counts the rounds ranked.
    """

    def __init__(self, strategy: str = "pfk", *, query_size: int, seed: int = 0, model=None, validation=None,
                 dataset: ActiveLearningDataset | None = None, layers="auto", mc_passes: int = 10,
                 batch_size: int = 256, **params):
        super().__init__()
        spec = check_strategy(strategy, params)
        self.query_size = check_int(query_size, "query_size", 1, 2**62)
        self.seed = check_int(seed, "seed", 0, 2**62)
        if dataset is not None and not isinstance(dataset, ActiveLearningDataset):
            raise TypeError(f"dataset: expected None or a baal ActiveLearningDataset, got {type(dataset).__name__}")
        needs = spec.needs
        if model is None and (needs.pool not in _FROM_PREDICTIONS or needs.val):
            raise ValueError(f"model: strategy {strategy!r} reads the torch model ({', '.join(needs.pool)}); pass "
                             f"model=<the baal ModelWrapper or the nn.Module>, got None")
        source_model = model
        if model is not None and not isinstance(model, (list, tuple)):
            find_module(model)  # a TypeError naming `model` now rather than at the first round
            source_model = find_module  # the module inside `model`, looked up each round
        self._source = None
        if model is not None or not needs.pool:  # model=None + a strategy reading probs: predictions only
            self._source = AdapterInputs(strategy, model=source_model, validation=validation, layers=layers,
                                         mc_passes=mc_passes, batch_size=batch_size)
        if _is_fraction(validation) and dataset is None:
            raise ValueError(f"validation: a fraction ({validation!r}) of the labelled rows needs dataset=<the "
                             f"loop's ActiveLearningDataset>; pass it, or validation=(inputs, labels)")
        self.strategy, self.model, self.validation, self.dataset = strategy, model, validation, dataset
        self.params = params
        self.calls = 0
        self.last: Selection | None = None

    def round_seed(self) -> int:
        """The seed of the next round: seed + labelled rows of `dataset`, else seed + rounds ranked."""
        return self.seed + (int(self.dataset.n_labelled) if self.dataset is not None else self.calls)

    def get_probabilities(self, pool, **kwargs) -> PyfkInputs:
        """The loop's get_probabilities: what the strategy reads about `pool` (the loop passes
        `dataset.pool`, a Dataset of (x, y); the labels are not read) under the current model."""
        if kwargs:
            raise TypeError(f"get_probabilities: unexpected keyword argument(s) {sorted(kwargs)} (ActiveLearningLoop "
                            f"forwards its extra keyword arguments here); PyfkHeuristic reads the model itself: set "
                            f"mc_passes=/batch_size= on PyfkHeuristic and drop them from the loop")
        if self._source is None:
            raise ValueError(f"model: get_probabilities reads the torch model; pass PyfkHeuristic({self.strategy!r}, "
                             f"model=<the baal ModelWrapper or nn.Module>, ...), or keep baal's predictions (e.g. "
                             f"wrapper.predict_on_dataset) as the loop's get_probabilities")
        seed = self.round_seed()
        labeled = None
        if self.dataset is not None:
            al = self.dataset

            def labeled():
                return al  # the labelled rows as a Dataset of (x, y): the fraction is a Subset of it
        n, rows, centres = len(pool), pool, 0
        if self.strategy in _CENTRES and self.dataset is not None and isinstance(pool, Dataset):
            # coreset's initial centres are the labelled rows: read them after the pool's, pyfk never picks them
            rows, centres = ConcatDataset([pool, self.dataset]), len(self.dataset)
        modules = self._source.modules(self.model) if self.model is not None else []
        with _torch_dropout(modules):
            pool_inputs, val = self._source(self.model, rows, seed=seed, labeled=labeled)
        return PyfkInputs(pool=pool_inputs, val=val, seed=seed, n=n, labeled=np.arange(n, n + centres))

    def get_ranks(self, predictions, target_predictions=None) -> tuple[np.ndarray, np.ndarray]:
        """(indices, scores): the strategy's picks (int64 positions in the pool, in pick order) and their
        pyfk scores. predictions: a PyfkInputs from `get_probabilities`, or baal's predictions for the
        strategies that read only them (module docstring). target_predictions (EPIG's) is not read."""
        labeled = None
        if isinstance(predictions, PyfkInputs):
            pool, val, seed, n = predictions.pool, predictions.val, predictions.seed, len(predictions)
            labeled = predictions.labeled if len(predictions.labeled) else None
        else:
            (pool, n), val, seed = self._from_predictions(predictions), None, self.round_seed()
        if n == 0:
            raise ValueError("predictions: expected a non-empty pool, got 0 rows")
        self.last = select(self.strategy, pool, min(self.query_size, n), labeled=labeled, seed=seed, val=val,
                           **self.params)
        self.calls += 1
        return self.last.indices, self.last.scores

    def compute_score(self, predictions, target_predictions=None):
        raise NotImplementedError(f"PyfkHeuristic({self.strategy!r}) picks a batch with get_ranks and scores only "
                                  f"its picks; it has no per-row score (baal's CombineHeuristics cannot use it)")

    def _from_predictions(self, predictions) -> tuple[PoolInputs, int]:
        """(PoolInputs, N) from baal's prediction array [N, C] or [N, C, K] (logits or probabilities)."""
        kind = _FROM_PREDICTIONS.get(STRATEGIES[self.strategy].needs.pool)
        if kind is None or STRATEGIES[self.strategy].needs.val:
            raise ValueError(f"predictions: strategy {self.strategy!r} reads the torch model "
                             f"({', '.join(STRATEGIES[self.strategy].needs.pool)}), not baal's predictions; pass "
                             f"heuristic.get_probabilities as the ActiveLearningLoop's get_probabilities (with "
                             f"PyfkHeuristic(..., model=<the ModelWrapper>)), got {type(predictions).__name__}")
        arr = _as_array(predictions).astype(np.float64)  # softmax in float64: pyfk checks rows sum to 1
        n = int(arr.shape[0])
        if kind == "nothing":
            return PoolInputs(n=n), n
        if kind == "mc_probs":
            if arr.ndim != 3:
                raise ValueError(f"predictions: strategy {self.strategy!r} reads K stochastic passes or ensemble "
                                 f"members; expected [N, C, K] (e.g. wrapper.predict_on_dataset(pool, iterations=K) "
                                 f"with ActiveLearningLoop(..., iterations=K)), got shape {arr.shape}")
            mc = np.moveaxis(to_prob(arr), -1, 0)
            return PoolInputs(mc_probs=np.ascontiguousarray(mc)), n
        probs = to_prob(arr)
        return PoolInputs(probs=probs.mean(-1) if probs.ndim == 3 else probs), n


@contextlib.contextmanager
def _torch_dropout(modules):
    """baal's MC-dropout layers (patch_module, MCDropoutModule, and the consistent variants) drop in eval
    mode too; pyfk reads the model in eval mode (probs, descriptors, BADGE factors, features) and draws
    its own seeded MC-dropout masks with only the Dropout modules in train mode. While pyfk reads, each
    such layer is swapped for torch's Dropout with the same p; the original layer objects are put back."""
    swapped = []
    try:
        for module in modules:
            for parent in list(module.modules()):
                for name, child in list(parent.named_children()):
                    plain = next((t for b, t in _BAAL_DROPOUT.items() if isinstance(child, b)), None)
                    if plain is not None:
                        setattr(parent, name, plain(p=child.p, inplace=child.inplace))
                        swapped.append((parent, name, child))
        yield
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


def _as_array(predictions) -> np.ndarray:
    if isinstance(predictions, types.GeneratorType):  # baal's predict_on_dataset_generator
        predictions = [_as_array(p) for p in predictions]
        if not predictions:
            raise ValueError("predictions: expected at least one batch, got an empty generator")
        return np.concatenate(predictions)
    if isinstance(predictions, torch.Tensor):
        predictions = predictions.detach().cpu().numpy()
    if isinstance(predictions, (list, tuple)):
        raise ValueError(f"predictions: expected one array [N, C] or [N, C, K]; got a {type(predictions).__name__} "
                         f"of {len(predictions)} (a multi-output model): pyfk reads one classification head")
    arr = np.asarray(predictions)
    if arr.ndim not in (2, 3) or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"predictions: expected a floating array [N, C] or [N, C, K] of logits or probabilities, "
                         f"got dtype {arr.dtype}, shape {arr.shape}")
    return arr

