"""The active-learning experiment runner (`pyfk run CONFIG`, `pyfk demo`).

A run compares acquisition strategies on a biased pool (pyfk.al.data.biased_split):
for every strategy and seed, rounds of
    train from scratch on the labeled set -> evaluate on the balanced test split ->
    compute what the strategy reads (STRATEGIES[name].needs: probabilities, MC-dropout
    passes or ensemble members, descriptors, BADGE factors, features, the validation
    set; see `strategy_inputs`) -> select `budget` pool items -> label them.
A run directory holds config.json, state.json (every finished round, committed
atomically: an interrupted run resumes at the next round and, for the same
config, reproduces an uninterrupted run exactly), pretrain-seed<S>.pt (the rotation
pretraining of seed S, when enabled; written atomically, a cache only), results.csv /
results.json and curve.png (mean over seeds with its 95% t-interval), and in results.json
"paired": pfk (when run) minus every other strategy, paired by seed, per round and over the
mean of the rounds (`compare`, pyfk.al.stats).

Label noise: `label_noise` is the rate at which the annotator's first answer for a pool item is
wrong, `label_noise_kind` how (data.biased_split: "symmetric" -- exactly round(rate x pool) wrong
labels, each a uniform other class; "class_conditional" -- as many, each c -> c + 1; "bernoulli"
-- per-item coins, what runs made before the key drew). Validation and test labels are clean.
With noise, every round records `wrong_labels`: the labeled rows whose held label is wrong.
A strategy named "<name>+audit" (e.g. "pfk+audit") is <name> that first spends
round(relabel_share x budget) of each round's budget re-asking the labels pyfk.audit ranks most
suspect among those held (rows not asked before; `relabel`), then picks the rest of the budget
with <name>. Re-asking consults the same annotator again: its second answer for each pool row is
drawn once per seed (data.annotate_again from (seed, "second-answer"): wrong with probability
label_noise, independently of the first), so every '+audit' strategy of a seed gets the same
answer for the same row, and a re-asked label can stay or become wrong. Which first answers are
wrong is fixed by split_seed, not by the run seed: intervals over seeds hold for that one noise
pattern. Its
records add `relabeled` / `relabels` (rows, new answers), `audit` (flagged, n_issues,
asked_wrong, changed, fixed) and `queries` (labeled rows + labels re-asked so far: its
annotation cost, equal to `labels` of the plain strategies at the same round).

Validation: `run` checks the whole config -- types and ranges of every key, then what
needs the data (classes, pool size against initial + budget x rounds, layer names,
Dropout for MC-dropout strategies) -- before any work or any file is written, and
raises one ConfigError (a ValueError) with one line per problem, each naming the key.

Randomness: every random draw of a round comes from a seed derived, with
np.random.SeedSequence, from (seed, round, purpose[, member]) -- model init, minibatch
order, dropout during training, ensemble members, MC-dropout passes, extraction and
selection -- and the rotation pretraining from (seed, purpose). torch's global RNG is
only used inside `torch.random.fork_rng` scopes seeded that way, so nothing carries
from one round (or one pretraining) to the next: a round computes the same whether
earlier rounds, or the pretraining, ran in this process, in another one, or were read
back from disk. The strategy is deliberately not mixed into the seeds: strategies share
their random numbers at the same (seed, round) (round 0 is one model for all of them),
so they differ only through what they selected. Same machine and thread count: a
resumed run is bit-identical to an uninterrupted one.

Calibration (`calibrate: true`): every round, after the test evaluation, a temperature T is
fitted on the validation split (pyfk.al.calibration.calibrate: the T minimising the NLL of
softmax(logits / T) on the model's logits of val_x, read in float64, against val_y; deterministic, it
draws no random number, so resumes stay bit-identical) and the round's record gains
`temperature`, `ece_before` / `ece_after` (top-label ECE, 15 bins, on the validation split at
T = 1 and at T) and `nll_before` / `nll_after` (the mean NLL there: the objective, so after <=
before). ECE/NLL are measured on the split T was fitted on: in-sample. Where the round selects,
T is applied to what the strategy reads as probabilities (`calibrated_inputs`): PoolInputs.probs
(entropy, margin, least_confidence) and PoolInputs.mc_probs, every MC-dropout pass (var_ratio,
bald, std) and every ensemble member (ensemble_*), each as softmax(log p / T) = softmax(l / T).
T is fitted on the model with dropout off and applied as is to the dropout passes and to the
other ensemble members. What T cannot change: any argmax -- predictions, test accuracy, the
"argmax" pseudo-labels, var_ratio's votes (so var_ratio and ensemble_var_ratio pick the same
rows); "map" and "true" pseudo-labels do not read probabilities at all. Not recomputed (they
stay at T = 1): the descriptors g (loss gradients) and BADGE factors (p - onehot) of pyfk.extract,
and "mc" pseudo-labels (argmax of a mean of perturbed softmaxes, which T could change; they are
computed inside the extraction). So coreset, badge and the PFK family pick exactly what they
pick without calibration. `calibrate: false` (the default) computes none of this: its records,
results and config.json are those of a pyfk without the key (config.json leaves it out while it
is false, so older run directories resume and match).

Test-only hook: PYFK_RUN_TEST_PAUSE="<point>:<n>" makes the n-th arrival (in this
process) at <point> print "pyfk run: test pause at <point> #<n>" to stderr and sleep,
so that a test can kill the process exactly there. Points: "pretrain" (half-way through
a rotation pretraining), "pretrain-save" (its cache file written, not yet renamed into
place), "train" (half-way through a round's training) and "commit" (state.json's new
version written and synced, not yet renamed into place). Not for normal use.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import io
import json
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pyfk.al import calibration, models, stats, strategies
from pyfk.al import data as datasets
from pyfk.al.inputs import _dropouts, model_inputs, model_logits, predict
from pyfk.al.inputs import seed_for as _seed_for
from pyfk.al.inputs import torch_seeded as _torch_seeded
from pyfk.al.strategies import Needs, PoolInputs, Strategy, ValInputs
from pyfk.features.extract import PSEUDO_LABELS
from pyfk.fileio import fsync_dir

DEFAULT_STRATEGIES = ["random", "entropy", "var_ratio", "coreset", "badge", "pfk"]
DATASETS = ("mnist5k", "digits", "mnist", "cifar10", "svhn", "folder")  # see pyfk.al.data.load
LOCAL_DATASETS = ("mnist", "cifar10", "svhn", "folder")                 # read from files under `root`
SEEDING = 2  # state.json "seeding": how round seeds are derived (rounds of another scheme cannot be resumed)
_MAX_SEED = 2**63 - 1
AUDIT_SUFFIX = "+audit"  # "<strategy>+audit": part of each round's budget re-asks pyfk.audit's top suspects


def base_strategy(name: str) -> str:
    """The registered strategy behind a run's strategy name ("pfk+audit" -> "pfk")."""
    return name[:-len(AUDIT_SUFFIX)] if name.endswith(AUDIT_SUFFIX) else name


def relabel_count(cfg: Config, name: str) -> int:
    """Labels re-asked per round by strategy `name`: relabel_share x budget rounded half up for
    '+audit', else 0."""
    return int(math.floor(cfg.relabel_share * cfg.budget + 0.5)) if name.endswith(AUDIT_SUFFIX) else 0


class ConfigError(ValueError):
    """An invalid run config: `problems` holds one line per problem, each starting with the key."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"invalid config ({len(self.problems)} problems):\n" + "\n".join(self.problems)
        super().__init__(message)


@dataclass
class Config:
    """An experiment. `k` (and any other strategy parameter named like a field here) is
    passed to every strategy that accepts it; `mc_passes` is K for the MC-dropout
    strategies (and for pseudo_label="mc"); `ensemble_size` is K for the ensemble ones."""

    dataset: str = "mnist5k"
    root: str | None = None
    imbalance: float = 100.0
    minority: list = field(default_factory=lambda: [5, 6, 7, 8, 9])
    label_noise: float = 0.0
    label_noise_kind: str = "symmetric"  # exact count (data.biased_split); "bernoulli": per-label coins (older runs)
    val_per_class: int = 20
    test_per_class: int = 100
    initial: int = 20
    budget: int = 20
    rounds: int = 4
    strategies: list = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    model: str = "lenet"
    train_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    pretrain_rotation: bool = False
    pretrain_steps: int = 400
    layers: list | None = None
    pseudo_label: str = "map"  # the paper's S = p(y|z): label of the most similar validation example
    k: int = 32
    mc_passes: int = 10
    ensemble_size: int = 3  # members trained per round for the ensemble_* strategies (the first is the model)
    split_seed: int = 0
    calibrate: bool = False  # fit a temperature on the validation split every round (module docstring)
    relabel_share: float = 0.25  # of each round's budget, re-asked labels for "<strategy>+audit" (module docstring)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        """A Config from a dict (e.g. a JSON config); raises ConfigError listing every unknown key
        and every value of the wrong type or range (what needs the data is checked by `run`)."""
        cfg, problems = cls._parse(d)
        problems += cfg.problems()
        if problems:
            raise ConfigError(problems)
        return cfg

    @classmethod
    def _parse(cls, d) -> tuple[Config, list[str]]:
        if not isinstance(d, dict):
            raise ConfigError([f"config: expected a dict (a JSON object) of Config keys, got {type(d).__name__}"])
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted((k for k in d if k not in names), key=str)
        problems = [f"config: unknown keys {unknown}; expected some of {sorted(names)}"] if unknown else []
        return cls(**{k: v for k, v in d.items() if k in names}), problems

    def validate(self) -> None:
        """Raise ConfigError listing every key whose value has the wrong type or range."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        """One line per key whose value has the wrong type or range ("key: expected X, got Y")."""
        return [line for _, line in _static_problems(self)]


# ----------------------------------------------------------------------------- validation

def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _static_problems(cfg: Config) -> list[tuple[str, str]]:
    """(key, line) for every value of the wrong type or range; needs no data."""
    out = []

    def bad(key, expected):
        out.append((key, f"{key}: expected {expected}, got {getattr(cfg, key)!r}"))

    if not isinstance(cfg.dataset, str) or cfg.dataset not in DATASETS:
        bad("dataset", f"one of {list(DATASETS)}")
    if cfg.root is not None and (not isinstance(cfg.root, str) or not cfg.root):
        bad("root", "null or the path of a folder")
    elif cfg.root is None and cfg.dataset in LOCAL_DATASETS:
        bad("root", f"the folder holding the files of dataset {cfg.dataset!r} (it reads local files)")
    if not _is_real(cfg.imbalance) or not math.isfinite(cfg.imbalance) or cfg.imbalance < 1:
        bad("imbalance", "a number >= 1 (pool ratio of majority to minority class size)")
    if (not isinstance(cfg.minority, (list, tuple)) or not cfg.minority
            or not all(_is_int(c) and c >= 0 for c in cfg.minority)):
        bad("minority", "a non-empty list of class labels (non-negative integers)")
    elif len(set(cfg.minority)) != len(cfg.minority):
        bad("minority", "distinct class labels")
    if not _is_real(cfg.label_noise) or not math.isfinite(cfg.label_noise) or not 0 <= cfg.label_noise < 1:
        bad("label_noise", "a fraction in [0, 1)")
    if not isinstance(cfg.label_noise_kind, str) or cfg.label_noise_kind not in datasets.SPLIT_NOISE_KINDS:
        bad("label_noise_kind", f"one of {list(datasets.SPLIT_NOISE_KINDS)}")
    if (not _is_real(cfg.relabel_share) or not math.isfinite(cfg.relabel_share)
            or not 0 < cfg.relabel_share < 1):
        bad("relabel_share", "a fraction in (0, 1) of each round's budget (re-asked labels of '+audit' strategies)")
    for key in ("val_per_class", "test_per_class", "initial", "budget", "train_steps", "batch_size",
                "pretrain_steps", "mc_passes", "k", "ensemble_size"):
        v = getattr(cfg, key)
        if not _is_int(v) or v < 1:
            bad(key, "a positive integer")
    if not _is_int(cfg.rounds) or cfg.rounds < 0:
        bad("rounds", "a non-negative integer")
    if (not isinstance(cfg.strategies, (list, tuple)) or not cfg.strategies
            or not all(isinstance(s, str) for s in cfg.strategies)):
        bad("strategies", f"a non-empty list of strategy names, some of {sorted(strategies.STRATEGIES)}")
    else:
        unknown = [s for s in cfg.strategies if base_strategy(s) not in strategies.STRATEGIES]
        if unknown:
            out.append(("strategies", f"strategies: unknown {unknown}; expected some of "
                                      f"{sorted(strategies.STRATEGIES)}, each optionally with '{AUDIT_SUFFIX}' "
                                      f"(re-ask the labels pyfk.audit suspects), got {cfg.strategies!r}"))
        dup = sorted({s for s in cfg.strategies if cfg.strategies.count(s) > 1})
        if dup:
            out.append(("strategies", f"strategies: expected distinct names, got {dup} more than once"))
    if (not isinstance(cfg.seeds, (list, tuple)) or not cfg.seeds
            or not all(_is_int(s) and 0 <= s <= _MAX_SEED for s in cfg.seeds)):
        bad("seeds", f"a non-empty list of integers in [0, {_MAX_SEED}] (not booleans)")
    else:
        dup = sorted({int(s) for s in cfg.seeds if list(cfg.seeds).count(s) > 1})
        if dup:
            out.append(("seeds", f"seeds: expected distinct seeds, got {dup} more than once"))
    if not isinstance(cfg.model, str) or cfg.model not in models.MODELS:
        bad("model", f"one of {sorted(models.MODELS)}")
    if not _is_real(cfg.lr) or not math.isfinite(cfg.lr) or cfg.lr <= 0:
        bad("lr", "a positive number (the Adam learning rate)")
    if not isinstance(cfg.pretrain_rotation, bool):
        bad("pretrain_rotation", "true or false")
    if cfg.layers is not None:
        if (not isinstance(cfg.layers, (list, tuple)) or not cfg.layers
                or not all(isinstance(n, str) and n for n in cfg.layers)):
            bad("layers", "null (the model's default layers) or a non-empty list of module names")
        elif len(set(cfg.layers)) != len(cfg.layers):
            bad("layers", "distinct module names")
    if not isinstance(cfg.pseudo_label, str) or cfg.pseudo_label not in PSEUDO_LABELS:
        bad("pseudo_label", f"one of {list(PSEUDO_LABELS)}")
    if not _is_int(cfg.split_seed) or not 0 <= cfg.split_seed <= _MAX_SEED:
        bad("split_seed", f"an integer in [0, {_MAX_SEED}]")
    if not isinstance(cfg.calibrate, bool):
        bad("calibrate", "true or false (fit a temperature on the validation split every round)")
    keys = {key for key, _ in out}
    audited = [] if "strategies" in keys else [s for s in cfg.strategies if s.endswith(AUDIT_SUFFIX)]
    if audited and "budget" not in keys and cfg.budget < 2:
        out.append(("budget", f"budget: expected at least 2 for {audited} (a re-asked label and a new one per "
                              f"round), got {cfg.budget}"))
    elif audited and not keys & {"relabel_share", "budget"} and not 1 <= relabel_count(cfg, audited[0]) < cfg.budget:
        out.append(("relabel_share", f"relabel_share: expected a share of budget {cfg.budget} that rounds to "
                                     f"between 1 and {cfg.budget - 1} re-asked labels per round for {audited}, "
                                     f"got {cfg.relabel_share!r} ({cfg.relabel_share * cfg.budget:g} labels)"))
    if audited and "initial" not in keys and cfg.initial < 2:
        out.append(("initial", f"initial: expected at least 2 for {audited} (pyfk.audit judges each label by the "
                               f"others), got {cfg.initial}"))
    return out


def _data_problems(cfg: Config, bad: set, ds: datasets.Dataset):
    """(problems, split) for what needs the data; keys in `bad` (already reported) are not read."""
    out, split = [], None
    classes = np.unique(ds.y)
    shape = ds.x.shape
    if "minority" not in bad:
        missing = [c for c in cfg.minority if c not in set(classes.tolist())]
        if missing:
            out.append(("minority", f"minority: expected classes of dataset {cfg.dataset!r} "
                                    f"(labels {classes.min()}..{classes.max()}), got {missing} among {cfg.minority}"))
        elif len(set(cfg.minority)) >= len(classes):
            out.append(("minority", f"minority: expected some but not all of the {len(classes)} classes of "
                                    f"dataset {cfg.dataset!r}, got all of them: {cfg.minority}"))
    if not bad & {"val_per_class", "test_per_class"}:
        smallest = int(np.bincount(np.searchsorted(classes, ds.y)).min())
        if cfg.val_per_class + cfg.test_per_class >= smallest:
            out.append(("val_per_class", f"val_per_class/test_per_class: expected val_per_class + test_per_class "
                                         f"below {smallest} (the smallest class of dataset {cfg.dataset!r}, which "
                                         f"also needs pool images), got {cfg.val_per_class} + {cfg.test_per_class}"))
    split_keys = {"imbalance", "minority", "val_per_class", "test_per_class", "label_noise", "label_noise_kind",
                  "split_seed"}
    if not out and not bad & split_keys:
        split = datasets.biased_split(ds.y, imbalance=cfg.imbalance, minority=cfg.minority,
                                      val_per_class=cfg.val_per_class, test_per_class=cfg.test_per_class,
                                      label_noise=cfg.label_noise, noise_kind=cfg.label_noise_kind,
                                      seed=cfg.split_seed)
        n = len(split.pool)
        if "initial" not in bad and cfg.initial > n:
            out.append(("initial", f"initial: expected at most the pool size {n}, got {cfg.initial}"))
        elif not bad & {"initial", "budget", "rounds"} and cfg.initial + cfg.budget * cfg.rounds > n:
            out.append(("budget", f"budget: expected initial + budget x rounds at most the pool size {n}, got "
                                  f"{cfg.initial} + {cfg.budget} x {cfg.rounds} = "
                                  f"{cfg.initial + cfg.budget * cfg.rounds}"))
        elif not bad & {"initial", "budget", "rounds", "k", "strategies"} and cfg.rounds > 0:
            takes_k = [s for s in cfg.strategies if "k" in strategies.STRATEGIES[base_strategy(s)].params]
            left = n - cfg.initial - cfg.budget * (cfg.rounds - 1)  # unlabeled pool at the last selection
            if takes_k and cfg.k > left:
                out.append(("k", f"k: expected at most {left} (the unlabeled pool left at the last round, "
                                 f"which {takes_k} search), got {cfg.k}"))
    if "model" not in bad:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # no memory, no RNG
            probe = build_model(cfg.model, shape[1], len(classes), shape[-1])
        if cfg.layers is not None and "layers" not in bad:
            named = [n for n, _ in probe.named_modules() if n]
            missing = [n for n in cfg.layers if n not in named]
            if missing:
                close = sorted({c for n in missing for c in difflib.get_close_matches(n, named, n=4, cutoff=0.5)})
                out.append(("layers", f"layers: expected module names of model {cfg.model!r} (such as "
                                      f"{[n for n, _ in probe.named_children()]}"
                                      f"{f'; close matches: {close}' if close else ''}), got {missing}"))
        if "strategies" not in bad:
            mc = [s for s in cfg.strategies if strategies.STRATEGIES[base_strategy(s)].needs.passes == "mc_dropout"]
            if mc and not _dropouts(probe):
                out.append(("strategies", f"strategies: {mc} read MC-dropout passes, but model {cfg.model!r} has "
                                          "no Dropout module; use another model or strategy"))
    return out, split


def prepare(cfg: Config | dict) -> tuple[Config, datasets.Dataset, datasets.Split]:
    """Check the whole config (a Config or a dict of Config keys) and load its data: returns
    (config, dataset, split), or raises one ConfigError listing every problem. Writes nothing."""
    if isinstance(cfg, Config):
        problems = []
    else:
        cfg, problems = Config._parse(cfg)
    static = _static_problems(cfg)
    problems += [line for _, line in static]
    bad = {key for key, _ in static}
    ds = split = None
    if not bad & {"dataset", "root"}:
        try:
            ds = datasets.load(cfg.dataset, cfg.root)
        except (ValueError, TypeError, OSError, ImportError) as exc:
            key = "root" if cfg.dataset in LOCAL_DATASETS else "dataset"
            problems.append(f"{key}: cannot load dataset {cfg.dataset!r}"
                            f"{f' from {cfg.root!r}' if cfg.root else ''}: {' '.join(str(exc).split())}")
    if ds is not None:
        more, split = _data_problems(cfg, bad, ds)
        problems += [line for _, line in more]
    if problems:
        raise ConfigError(problems)
    return cfg, ds, split


_pauses: dict = {}


def _test_pause(point: str) -> None:
    """The test-only hook PYFK_RUN_TEST_PAUSE="<point>:<n>" (see the module docstring)."""
    spec = os.environ.get("PYFK_RUN_TEST_PAUSE")
    if not spec:
        return
    _pauses[point] = _pauses.get(point, 0) + 1
    name, _, n = spec.rpartition(":")
    if name == point and n.isdigit() and int(n) == _pauses[point]:
        print(f"pyfk run: test pause at {point} #{n}", file=sys.stderr, flush=True)
        time.sleep(600)


# ----------------------------------------------------------------------------- model + training

def build_model(name: str, in_channels: int, classes: int, size: int) -> torch.nn.Module:
    if name not in models.MODELS:
        raise ValueError(f"model: expected one of {sorted(models.MODELS)}, got {name!r}")
    if name == "lenet":  # the paper's unpadded LeNet where the images allow it
        return models.LeNet(classes=classes, in_channels=in_channels, padding=0 if size >= 28 else 2)
    return models.MODELS[name](classes=classes, in_channels=in_channels)


def seeded_model(name: str, in_channels: int, classes: int, size: int, seed: int) -> torch.nn.Module:
    """build_model with its initial weights drawn from `seed` (the global RNG is left as it was)."""
    with _torch_seeded(seed):
        return build_model(name, in_channels, classes, size)


def train(model, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int, *,
          pause: str | None = None):
    """`steps` Adam steps on minibatches; the minibatch order and the dropout masks are drawn
    from `seed` alone (the global RNG is left as it was)."""
    gen = torch.Generator().manual_seed(_seed_for(seed, "order"))
    with _torch_seeded(_seed_for(seed, "dropout")):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        n = x.shape[0]
        for step in range(steps):
            if pause is not None and step == steps // 2:
                _test_pause(pause)
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


def rotation_pretrain(cfg: Config, x: torch.Tensor, classes: int, seed: int) -> dict:
    """Self-supervised init (Gidaris et al. 2018): predict which of 4 rotations was applied,
    on unlabeled pool images; returns the state dict of every layer but the classifier.
    A function of (cfg, x, seed) alone."""
    model = seeded_model(cfg.model, x.shape[1], 4, x.shape[-1], _seed_for(seed, "pretrain", "init"))
    rotated = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])
    labels = torch.arange(4).repeat_interleave(x.shape[0])
    train(model, rotated, labels, cfg.pretrain_steps, 2 * cfg.batch_size, cfg.lr, _seed_for(seed, "pretrain", "train"),
          pause="pretrain")
    head = _classifier_name(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}


def _classifier_name(model) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]


def evaluate(model, x: torch.Tensor, y: np.ndarray, classes: int, minority) -> dict:
    pred = predict(model, x).argmax(1).numpy()
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    minority_mask = np.isin(y, minority)
    return {"accuracy": float((pred == y).mean()),
            "minority_accuracy": float((pred[minority_mask] == y[minority_mask]).mean()),
            "majority_accuracy": float((pred[~minority_mask] == y[~minority_mask]).mean()),
            "per_class": per_class.round(4).tolist(), "confusion": confusion.tolist()}


# ----------------------------------------------------------------------------- state

def _atomic_write(path: str, write, pause: str | None = None) -> None:
    """write(file) into path + ".tmp", sync it, then rename it over `path`: readers (and a
    resumed run) see the old or the new content, never a part."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if pause is not None:
        _test_pause(pause)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _atomic_json(path: str, obj, pause: str | None = None) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()), pause)


# Config keys added after run directories were made, with the value that reproduces the runs made
# before them. config.json leaves a key out while it has that value, and a config.json without it
# reads as that value: older run directories resume, and an older pyfk refuses (as a different
# config) only the directories that use the key.
_ADDED_KEYS = {"calibrate": False, "relabel_share": 0.25}


def _config_record(cfg_dict: dict) -> dict:
    """A config dict (as JSON) without the added keys that hold their old-behaviour value.

    label_noise_kind is added differently: its default ("symmetric", an exact count) is not what
    runs made before it did ("bernoulli"). It is left out where there is no noise (it changes
    nothing there), and a noisy config.json without it reads as "bernoulli": such a directory
    resumes with label_noise_kind: "bernoulli" and is refused (a different config) without."""
    out = {k: v for k, v in cfg_dict.items()
           if not (k in _ADDED_KEYS and type(v) is type(_ADDED_KEYS[k]) and v == _ADDED_KEYS[k])}
    if not any(isinstance(s, str) and s.endswith(AUDIT_SUFFIX) for s in out.get("strategies") or ()):
        out.pop("relabel_share", None)  # read by '+audit' strategies only
    if not out.get("label_noise"):
        out.pop("label_noise_kind", None)
    elif "label_noise_kind" not in out:
        out["label_noise_kind"] = "bernoulli"
    return out


class Run:
    """A run directory: config, per-(strategy, seed) committed rounds, results."""

    def __init__(self, path: str, cfg: Config):
        self.path = path
        self.cfg = cfg
        cfg_file = os.path.join(path, "config.json")
        cfg_dict = _config_record(json.loads(json.dumps(dataclasses.asdict(cfg))))
        self.state_file = os.path.join(path, "state.json")
        self.state = {"seeding": SEEDING, "runs": {}}
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                old = json.load(f)
            old = _config_record(old) if isinstance(old, dict) else old
            if old != cfg_dict:
                diff = sorted(k for k in set(cfg_dict) | set(old) if old.get(k) != cfg_dict.get(k))
                hint = (' (set "label_noise_kind": "bernoulli" to resume a noisy run made before that key existed)'
                        if diff == ["label_noise_kind"] and old.get("label_noise_kind") == "bernoulli" else "")
                raise ValueError(f"run: {path} holds a run with a different config (keys {diff}){hint}; "
                                 "use another directory or delete it")
        if os.path.exists(self.state_file):
            with open(self.state_file) as f:
                self.state = json.load(f)
            done = sum(len(r) for r in self.state["runs"].values())
            total = len(cfg.strategies) * len(cfg.seeds) * (cfg.rounds + 1)
            if self.state.get("seeding") != SEEDING and 0 < done < total:
                raise ValueError(f"run: {path} was started by an older pyfk that drew its random numbers "
                                 "differently; resuming it would not reproduce an uninterrupted run. Use another "
                                 "directory or delete it")
        os.makedirs(path, exist_ok=True)
        if not os.path.exists(cfg_file):
            _atomic_json(cfg_file, cfg_dict)

    def rounds(self, key: str) -> list:
        return self.state["runs"].setdefault(key, [])

    def commit(self, key: str, record: dict) -> None:
        self.rounds(key).append(record)
        _atomic_json(self.state_file, self.state, pause="commit")

    def pretrained(self, seed: int, compute, like: dict) -> dict:
        """The rotation pretraining of `seed`: read from pretrain-seed<seed>.pt if it is there and
        holds tensors shaped like `like`, else compute() and save it atomically (a cache: the
        computation is a pure function of the config and the seed)."""
        path = os.path.join(self.path, f"pretrain-seed{seed}.pt")
        if os.path.exists(path):
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
                if (isinstance(sd, dict) and set(sd) == set(like)
                        and all(isinstance(v, torch.Tensor) and v.shape == like[k].shape and v.dtype == like[k].dtype
                                for k, v in sd.items())):
                    return sd
            except Exception:  # noqa: BLE001 -- an unreadable cache is recomputed
                pass
        sd = compute()
        _atomic_write(path, lambda f: torch.save(sd, f), pause="pretrain-save")
        return sd


# ----------------------------------------------------------------------------- the loop

def strategy_inputs(needs: Needs, model, cfg: Config, layers, pool_x, val_x, val_y, seed: int,
                    members=()) -> tuple[PoolInputs, ValInputs | None]:
    """What the strategy reads (`Needs`) from the current model: pyfk.al.inputs.model_inputs with
    the config's pseudo_label and mc_passes and the validation split (val_x, val_y)."""
    return model_inputs(needs, model, pool_x, val=(val_x, val_y), layers=layers, seed=seed,
                        pseudo_label=cfg.pseudo_label, mc_passes=cfg.mc_passes, members=members)


def calibrated_inputs(pool: PoolInputs, temperature: float) -> PoolInputs:
    """`pool` with temperature T applied to its probabilities: probs (N, C) and mc_probs (K, N, C)
    (every MC-dropout pass / ensemble member) become softmax(log p / T), which is softmax(l / T) for
    p = softmax(l) (pyfk.al.calibration.temper_probs). The other fields are passed on unchanged."""
    changes = {name: calibration.temper_probs(getattr(pool, name), temperature)
               for name in ("probs", "mc_probs") if getattr(pool, name) is not None}
    return dataclasses.replace(pool, **changes)


def calibration_record(model, val_x: torch.Tensor, val_y: np.ndarray, bins: int = 15) -> dict:
    """The temperature fitted on the validation split and what it does there: {"temperature",
    "ece_before", "ece_after", "nll_before", "nll_after"} (ECE: top-label, `bins` equal-width bins)."""
    val_logits = model_logits(model, val_x)  # eval mode: no random number is drawn
    t = calibration.calibrate(val_logits, val_y)
    ece = calibration.expected_calibration_error
    return {"temperature": t,
            "ece_before": ece(calibration.apply_temperature(val_logits, 1.0), val_y, bins=bins),
            "ece_after": ece(calibration.apply_temperature(val_logits, t), val_y, bins=bins),
            "nll_before": calibration.nll(val_logits, val_y), "nll_after": calibration.nll(val_logits, val_y, t)}


CALIBRATION_KEYS = ("temperature", "ece_before", "ece_after", "nll_before", "nll_after")
NOISE_KEYS = ("wrong_labels", "queries")  # label_noise > 0; '+audit' strategies (labels + re-asked labels)


def relabel(model, cfg: Config, layers, pool_x, labeled, labels, relabeled, count: int, classes: int,
            seed: int) -> tuple[np.ndarray, dict]:
    """The `count` labeled rows whose held labels pyfk.audit finds most suspect, rows asked again
    before skipped: (pool rows in rank order, {"flagged", "n_issues"} of the audit).

    The audit reads the labeled rows' pooled activations z (combine="features"; extraction seeded
    by `seed`) and the neighbour vote only (alpha=1): the model was trained on these very labels,
    so its probabilities for them are in-sample and echo the given label."""
    from pyfk.al.audit import audit  # the audit runs the engine; only "+audit" strategies need it

    inputs, _ = model_inputs(Needs(pool=("descriptors",)), model, pool_x[labeled], layers=layers, seed=seed)
    report = audit(inputs.descriptors, labels.numpy()[labeled], k=min(cfg.k, len(labeled) - 1), classes=classes)
    order = labeled[report.indices]
    rows = order[~np.isin(order, relabeled)][:count]
    return rows.astype(np.int64), {"flagged": int(report.flagged.sum()), "n_issues": int(report.provenance["n_issues"])}


def strategy_params(spec: Strategy, cfg: Config) -> dict:
    """The strategy parameters set by the config: those named like a Config field (e.g. `k`)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return {name: getattr(cfg, name) for name in spec.params if name in names}


def run(cfg: Config | dict, path: str, *, log=print, progress: bool = True) -> dict:
    """Run (or resume) every strategy x seed; returns the results dict also saved as JSON.

    `cfg`: a Config or a dict of Config keys. The whole config is checked first (`prepare`):
    an invalid one raises one ConfigError (a ValueError) listing every problem, before any
    work or any file is written. The caller's global torch RNG is left as it was."""
    cfg, ds, split = prepare(cfg)
    state = Run(path, cfg)
    with torch.random.fork_rng(devices=[]):
        return _run(cfg, ds, split, state, log, progress)


def _run(cfg: Config, ds: datasets.Dataset, split: datasets.Split, state: Run, log, progress: bool) -> dict:
    x_all = torch.from_numpy(ds.x)
    pool_x, val_x, test_x = x_all[split.pool], x_all[split.val], x_all[split.test]
    pool_y = torch.from_numpy(split.pool_labels)  # what the annotator returns first (noise applied)
    truth = ds.y[split.pool]
    val_y, test_y = ds.y[split.val], ds.y[split.test]
    layers = cfg.layers or models.default_layers(cfg.model)
    shape = (ds.x.shape[1], ds.classes, ds.x.shape[-1])
    log(f"pyfk run: {cfg.dataset}, pool {len(split.pool)} (per class {split.counts}), val {len(split.val)}, "
        f"test {len(split.test)}; minority {split.minority} at {cfg.imbalance:g}x; -> {state.path}")
    total = len(cfg.strategies) * len(cfg.seeds) * (cfg.rounds + 1)
    done = sum(len(state.rounds(f"{s}/seed{seed}")) for s in cfg.strategies for seed in cfg.seeds)
    bar = tqdm(total=total, initial=done, unit="round", desc="pyfk run", disable=not progress)
    pretrained = {}

    def init_weights(seed):
        """The rotation-pretrained weights of `seed` (None without pretraining); computed at most once."""
        if not cfg.pretrain_rotation:
            return None
        if seed not in pretrained:
            with torch.device("meta"):
                like = build_model(cfg.model, shape[0], 4, shape[2])
            head = _classifier_name(like)
            like = {k: v for k, v in like.state_dict().items() if not k.startswith(head + ".")}
            pretrained[seed] = state.pretrained(seed, lambda: rotation_pretrain(cfg, pool_x, ds.classes, seed), like)
        return pretrained[seed]

    def fit(seed, labeled, labels, init_seed, train_seed):
        model = seeded_model(cfg.model, *shape, init_seed)
        init = init_weights(seed)
        if init is not None:
            model.load_state_dict(init, strict=False)
        return train(model, pool_x[labeled], labels[labeled], cfg.train_steps, cfg.batch_size, cfg.lr, train_seed,
                     pause="train")

    first_round = {}  # seed -> round-0 model: the same for every strategy (same labels, same seeds)
    second_answers = {}  # seed -> what the annotator answers when a pool row is asked again ('+audit')
    for seed in cfg.seeds:
        for strategy in cfg.strategies:
            key = f"{strategy}/seed{seed}"
            rounds = state.rounds(key)
            labeled = np.sort(np.random.default_rng(_seed_for(seed, "initial")).choice(
                len(split.pool), cfg.initial, replace=False))
            labels = pool_y.clone()  # the labels held now: the first answers, then any re-asked ones
            relabeled = np.zeros(0, dtype=np.int64)
            for rec in rounds:  # replay the committed rounds
                labeled = np.sort(np.concatenate([labeled, np.asarray(rec["selected"], dtype=np.int64)]))
                if rec.get("relabeled"):
                    labels[rec["relabeled"]] = torch.tensor(rec["relabels"], dtype=labels.dtype)
                    relabeled = np.concatenate([relabeled, rec["relabeled"]])
            for r in range(len(rounds), cfg.rounds + 1):
                t0 = time.perf_counter()
                if r == 0 and seed in first_round:
                    model = seeded_model(cfg.model, *shape, _seed_for(seed, r, "init"))
                    model.load_state_dict(first_round[seed])
                    model.eval()
                else:
                    model = fit(seed, labeled, labels, _seed_for(seed, r, "init"), _seed_for(seed, r, "train"))
                    if r == 0:
                        first_round[seed] = copy.deepcopy(model.state_dict())
                train_s = time.perf_counter() - t0
                metrics = evaluate(model, test_x, test_y, ds.classes, split.minority)
                record = {"round": r, "labels": int(len(labeled)), **metrics, "train_seconds": round(train_s, 3),
                          "selected": [], "selection_seconds": 0.0}
                if cfg.calibrate:
                    record.update(calibration_record(model, val_x, val_y))
                if cfg.label_noise > 0:
                    record["wrong_labels"] = int((labels.numpy()[labeled] != truth[labeled]).sum())
                if strategy.endswith(AUDIT_SUFFIX):
                    record["queries"] = int(len(labeled) + len(relabeled))
                if r < cfg.rounds:
                    t0 = time.perf_counter()
                    name = base_strategy(strategy)
                    spec = strategies.STRATEGIES[name]
                    members = []
                    if spec.needs.passes == "ensemble":  # extra members: same labels, other seeds
                        members = [fit(seed, labeled, labels, _seed_for(seed, r, "member-init", e),
                                       _seed_for(seed, r, "member-train", e)) for e in range(1, cfg.ensemble_size)]
                    inputs, val = strategy_inputs(spec.needs, model, cfg, layers, pool_x, val_x, val_y,
                                                  _seed_for(seed, r, "inputs"), members)
                    if cfg.calibrate:
                        inputs = calibrated_inputs(inputs, record["temperature"])
                    if strategy.endswith(AUDIT_SUFFIX):  # re-ask the most suspect labels held, then pick the rest
                        if seed not in second_answers:
                            second_answers[seed] = datasets.annotate_again(
                                truth, cfg.label_noise, cfg.label_noise_kind, classes=ds.classes,
                                seed=_seed_for(seed, "second-answer"))
                        rows, info = relabel(model, cfg, layers, pool_x, labeled, labels, relabeled,
                                             relabel_count(cfg, strategy), ds.classes, _seed_for(seed, r, "audit"))
                        answers = second_answers[seed][rows]
                        was = labels.numpy()[rows]
                        info.update(asked_wrong=int((was != truth[rows]).sum()), changed=int((answers != was).sum()),
                                    fixed=int(((was != truth[rows]) & (answers == truth[rows])).sum()))
                        labels[rows] = torch.from_numpy(answers).to(labels.dtype)
                        relabeled = np.concatenate([relabeled, rows])
                        record.update(relabeled=rows.tolist(), relabels=answers.tolist(), audit=info)
                    budget = cfg.budget - len(record.get("relabeled", ()))
                    sel = strategies.select(name, inputs, budget, labeled=labeled,
                                            seed=_seed_for(seed, r, "select"), val=val, **strategy_params(spec, cfg))
                    record["selection_seconds"] = round(time.perf_counter() - t0, 3)
                    record["selected"] = sel.indices.tolist()
                    record["selected_minority"] = int(np.isin(ds.y[split.pool[sel.indices]], split.minority).sum())
                    record["provenance"] = sel.provenance
                    labeled = np.sort(np.concatenate([labeled, sel.indices]))
                state.commit(key, record)
                bar.update(1)
    bar.close()
    return write_results(state, split)


def write_results(state: Run, split=None) -> dict:
    """results.csv, results.json and curve.png from the committed rounds."""
    rows = []
    for key, rounds in state.state["runs"].items():
        strategy, seed = key.split("/seed")
        for rec in rounds:
            rows.append({"strategy": strategy, "seed": int(seed), "round": rec["round"], "labels": rec["labels"],
                         "accuracy": rec["accuracy"], "minority_accuracy": rec["minority_accuracy"],
                         "majority_accuracy": rec["majority_accuracy"],
                         "selected_minority": rec.get("selected_minority", 0),
                         "selection_seconds": rec["selection_seconds"],
                         **{k: rec[k] for k in CALIBRATION_KEYS + NOISE_KEYS if k in rec}})  # when recorded
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in rows for k in row)) or ["strategy"])
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(os.path.join(state.path, "results.csv"), lambda f: f.write(text.getvalue().encode()))
    summary, paired = summarise(rows), compare(rows)
    _atomic_json(os.path.join(state.path, "results.json"), {"rows": rows, "summary": summary, "paired": paired})
    plot(summary, os.path.join(state.path, "curve.png"))
    return {"rows": rows, "summary": summary, "paired": paired, "path": state.path}


def summarise(rows: list) -> dict:
    """strategy -> per round: mean/min/max over seeds, and for accuracy, minority_accuracy and
    wrong_labels the 95% t-interval of the mean ([m_lo, m_hi]; None for a single seed; pyfk.al.stats).
    A metric is summarised for a round only where every seed's row has it (e.g. rounds of a resumed
    run made before the key existed lack wrong_labels; format_table then leaves the column out)."""
    out: dict = {}
    for row in rows:
        out.setdefault(row["strategy"], {}).setdefault(row["round"], []).append(row)
    summary = {}
    for strategy, by_round in out.items():
        summary[strategy] = []
        for r in sorted(by_round):
            rs = by_round[r]
            entry = {"round": r, "labels": rs[0]["labels"], "seeds": len(rs)}
            metrics = ["accuracy", "minority_accuracy", "selection_seconds", "selected_minority"]
            metrics = [k for k in metrics + list(CALIBRATION_KEYS + NOISE_KEYS) if all(k in x for x in rs)]
            for m in metrics:
                vals = np.array([x[m] for x in rs], dtype=np.float64)
                entry[m] = float(vals.mean())
                entry[m + "_min"], entry[m + "_max"] = float(vals.min()), float(vals.max())
                if m in PAIRED_METRICS + ("wrong_labels",):
                    mean, half = stats.interval(vals)
                    bounds = (None, None) if math.isnan(half) else (mean - half, mean + half)
                    entry[m + "_lo"], entry[m + "_hi"] = bounds
            summary[strategy].append(entry)
    return summary


PAIRED_METRICS = ("minority_accuracy", "accuracy")


def compare(rows: list, reference: str = "pfk", metrics=PAIRED_METRICS) -> dict:
    """`reference` against every other strategy, paired by seed (pyfk.al.stats.paired).

    For each of `metrics` (row keys; a strategy whose rows lack one is not compared on it) and each
    other strategy: per round r >= 1 (round 0 is one model shared by every strategy, so its
    differences are 0) the reference-minus-other difference over the seeds both ran, with the
    round's labels (and `queries` for a '+audit' reference: its annotation cost), and "mean": the
    same over the per-seed mean of rounds 1..R (R: the last round both finished for every seed; the
    area under the curve, one comparison instead of R). Returns {} when `reference` did not run or
    nothing pairs."""
    table: dict = {}
    for row in rows:
        table.setdefault(row["strategy"], {}).setdefault(row["seed"], {})[row["round"]] = row
    if reference not in table or len(table) < 2:
        return {}
    ref = table[reference]
    result = {"reference": reference, "confidence": stats.CONFIDENCE, "metrics": {}}
    for metric in metrics:
        per_other = {}
        for other, runs in table.items():
            if other == reference or not all(metric in row for t in (ref, runs) for s in t.values()
                                             for row in s.values()):
                continue
            seeds = sorted(set(ref) & set(runs))
            rounds = sorted({r for s in seeds for r in ref[s]} & {r for s in seeds for r in runs[s]} - {0})
            entries = []
            for r in rounds:
                both = [s for s in seeds if r in ref[s] and r in runs[s]]
                if both:
                    p = stats.paired([ref[s][r][metric] for s in both], [runs[s][r][metric] for s in both])
                    cost = {k: ref[both[0]][r][k] for k in ("labels", "queries") if k in ref[both[0]][r]}
                    entries.append({"round": r, **cost, **p.to_dict()})
            last = min((max(set(ref[s]) & set(runs[s]), default=0) for s in seeds), default=0)
            mean = None
            if last >= 1:
                span = range(1, last + 1)
                p = stats.paired([np.mean([ref[s][r][metric] for r in span]) for s in seeds],
                                 [np.mean([runs[s][r][metric] for r in span]) for s in seeds])
                mean = {"rounds": [1, last], **p.to_dict()}
            per_other[other] = {"rounds": entries, "mean": mean}
        if per_other:
            result["metrics"][metric] = per_other
    return result


def plot(summary: dict, path: str) -> None:
    """Mean over seeds per strategy against annotation cost (labels, plus re-asked labels for
    '+audit'); bands: the 95% t-interval of the mean (min-max for one seed). A third panel shows
    the wrong labels held when the run has label noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noisy = bool(summary) and all("wrong_labels" in e for entries in summary.values() for e in entries)
    panels = [("accuracy", "test accuracy"), ("minority_accuracy", "minority-group test accuracy")]
    panels += [("wrong_labels", "wrong labels held")] if noisy else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2))
    seeds = min((e["seeds"] for entries in summary.values() for e in entries), default=1)
    for strategy, entries in summary.items():
        cost = [e.get("queries", e["labels"]) for e in entries]
        for ax, (metric, _) in zip(axes, panels):
            ax.plot(cost, [e[metric] for e in entries], marker="o", label=strategy)
            lo, hi = ("_lo", "_hi") if all(e.get(metric + "_lo") is not None for e in entries) else ("_min", "_max")
            ax.fill_between(cost, [e[metric + lo] for e in entries], [e[metric + hi] for e in entries], alpha=0.15)
    asked = any("queries" in e for entries in summary.values() for e in entries)
    for ax, (_, title) in zip(axes, panels):
        ax.set_xlabel("labels used" + (" (+ labels re-asked, for +audit)" if asked else ""))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    band = "95% t-interval of the mean" if seeds >= 2 else "one seed, no interval"
    fig.suptitle(f"mean over {seeds} seed{'s' if seeds != 1 else ''}; bands: {band}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_ci(e: dict, metric: str) -> str:
    if e.get(metric + "_lo") is None:
        return f"{e[metric]:.3f}" + " " * 8
    return f"{e[metric]:.3f}±{(e[metric + '_hi'] - e[metric + '_lo']) / 2:.3f}"


def format_table(summary: dict, paired: dict | None = None) -> str:
    """Per strategy and round: mean over seeds (± half-width of the 95% t-interval of the mean);
    then, given `compare`'s result, the paired differences reference - other."""
    lines = []
    for strategy, entries in summary.items():
        calibrated = bool(entries) and all("temperature" in e for e in entries)
        noisy = bool(entries) and all("wrong_labels" in e for e in entries)
        asked = bool(entries) and all("queries" in e for e in entries)
        seeds = min(e["seeds"] for e in entries) if entries else 0
        lines.append(f"\n{strategy} ({seeds} seed{'s' if seeds != 1 else ''}; ± half-width of the 95% interval)")
        lines.append(f"  {'round':>5} {'labels':>6} {'accuracy':>13} {'minority':>13} {'picked-min':>10} "
                     f"{'select s':>9}" + (f" {'T':>6} {'val ECE':>15}" if calibrated else "")
                     + (f" {'wrong':>6}" if noisy else "") + (f" {'queries':>7}" if asked else ""))
        for e in entries:
            lines.append(f"  {e['round']:>5} {e['labels']:>6} {_mean_ci(e, 'accuracy'):>13} "
                         f"{_mean_ci(e, 'minority_accuracy'):>13} {e['selected_minority']:>10.1f} "
                         f"{e['selection_seconds']:>9.2f}"
                         + (f" {e['temperature']:>6.3f} {e['ece_before']:>6.3f} -> {e['ece_after']:.3f}"
                            if calibrated else "")
                         + (f" {e['wrong_labels']:>6.1f}" if noisy else "")
                         + (f" {e['queries']:>7.0f}" if asked else ""))
    if paired and paired.get("metrics"):
        lines.append(format_paired(paired))
    return "\n".join(lines)


def format_paired(paired: dict) -> str:
    """`compare`'s result as text: per metric and other strategy, the mean difference, its 95%
    interval and wins-ties-losses per round; '*' marks an interval that excludes 0."""
    ref = paired["reference"]
    lines = [f"\n{ref} minus each other strategy, paired by seed (same initial labels and round-0 model): "
             f"mean difference [95% interval] wins-ties-losses; * = the interval excludes 0"]

    def cell(p):
        if p["lo"] is None:
            return f"{p['diff']:+.3f} (1 seed)"
        return (f"{p['diff']:+.3f} [{p['lo']:+.3f},{p['hi']:+.3f}] {p['wins']}-{p['ties']}-{p['losses']}"
                + ("*" if p["holds"] else ""))

    for metric, others in paired["metrics"].items():
        lines.append(f"  {metric}")
        width = max(map(len, others), default=0)
        for other, res in others.items():
            parts = [(f"{e.get('queries', e['labels'])} labels", cell(e)) for e in res["rounds"]]
            if res["mean"] is not None:
                parts.append(("rounds {}-{}".format(*res["mean"]["rounds"]), cell(res["mean"])))
            head = f"    vs {other:<{width}}"
            for i, (what, text) in enumerate(parts or [("", "nothing to pair")]):
                lines.append(f"{head if i == 0 else ' ' * len(head)} {what:>11}  {text}")
        means = {o: r["mean"] for o, r in others.items() if r["mean"] is not None}
        if means:
            above = [o for o, m in means.items() if m["holds"] and m["diff"] > 0]
            below = [o for o, m in means.items() if m["holds"] and m["diff"] < 0]
            unclear = [o for o in means if o not in above and o not in below]
            lines.append(f"    => over the mean of the rounds, at 95%: {ref} above "
                         f"{', '.join(above) or 'none'}; below {', '.join(below) or 'none'}; "
                         f"not separated from {', '.join(unclear) or 'none'}")
    return "\n".join(lines)
