"""The active-learning experiment runner (`pyfk run CONFIG`, `pyfk demo`).

A run compares acquisition strategies on a biased pool (pyfk.al.data.biased_split):
for every strategy and seed, rounds of
    train from scratch on the labeled set -> evaluate on the balanced test split ->
    compute what the strategy reads (STRATEGIES[name].needs: probabilities, MC-dropout
    passes or ensemble members, descriptors, BADGE factors, features, the validation
    set; see `strategy_inputs`) -> select `budget` pool items -> label them.
A run directory holds config.json, state.json (every finished round, committed
atomically: an interrupted run resumes at the next round and, for the same
config, reproduces an uninterrupted run exactly), results.csv / results.json and
curve.png (mean over seeds with a min-max band).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from pyfk.al import data as datasets
from pyfk.al import models, strategies
from pyfk.al.strategies import Needs, PoolInputs, Strategy, ValInputs
from pyfk.engine.descriptors import Descriptors
from pyfk.features.extract import extract

DEFAULT_STRATEGIES = ["random", "entropy", "var_ratio", "coreset", "badge", "pfk"]


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

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; expected some of {sorted(names)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        bad = [s for s in self.strategies if s not in strategies.STRATEGIES]
        if bad:
            raise ValueError(f"strategies: unknown {bad}; expected some of {sorted(strategies.STRATEGIES)}")
        for name in ("initial", "budget", "train_steps", "batch_size", "mc_passes", "k", "ensemble_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"rounds: expected a non-negative integer, got {self.rounds!r}")
        if not self.seeds or not all(isinstance(s, int) and s >= 0 for s in self.seeds):
            raise ValueError(f"seeds: expected a non-empty list of non-negative integers, got {self.seeds!r}")


# ----------------------------------------------------------------------------- model + training

def build_model(name: str, in_channels: int, classes: int, size: int) -> torch.nn.Module:
    if name not in models.MODELS:
        raise ValueError(f"model: expected one of {sorted(models.MODELS)}, got {name!r}")
    if name == "lenet":  # the paper's unpadded LeNet where the images allow it
        return models.LeNet(classes=classes, in_channels=in_channels, padding=0 if size >= 28 else 2)
    return models.MODELS[name](classes=classes, in_channels=in_channels)


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def train(model, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int):
    """`steps` Adam steps on minibatches drawn with a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = x.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    return model


def rotation_pretrain(cfg: Config, x: torch.Tensor, classes: int, seed: int) -> dict:
    """Self-supervised init (Gidaris et al. 2018): predict which of 4 rotations was applied,
    on unlabeled pool images; returns the state dict of every layer but the classifier."""
    torch.manual_seed(_seed_for(seed, 7))
    model = build_model(cfg.model, x.shape[1], 4, x.shape[-1])
    rotated = torch.cat([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])
    labels = torch.arange(4).repeat_interleave(x.shape[0])
    train(model, rotated, labels, cfg.pretrain_steps, 2 * cfg.batch_size, cfg.lr, _seed_for(seed, 8))
    head = _classifier_name(model)
    return {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}


def _classifier_name(model) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]


@torch.no_grad()
def predict(model, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.softmax(model(x[i:i + batch]), 1) for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def mc_dropout(model, x: torch.Tensor, passes: int, seed: int, batch: int = 512) -> np.ndarray:
    """(K, N, C) softmax with only the Dropout modules in train mode."""
    drops = _dropouts(model)
    if not drops:
        raise ValueError("MC dropout: the model has no Dropout module")
    torch.manual_seed(seed)
    model.eval()
    for m in drops:
        m.train()
    try:
        return np.stack([predict_dropout(model, x, batch) for _ in range(passes)])
    finally:
        model.eval()


def _dropouts(model) -> list:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]


def predict_dropout(model, x, batch):
    return torch.cat([torch.softmax(model(x[i:i + batch]), 1) for i in range(0, x.shape[0], batch)]).numpy()


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

def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Run:
    """A run directory: config, per-(strategy, seed) committed rounds, results."""

    def __init__(self, path: str, cfg: Config):
        self.path = path
        self.cfg = cfg
        os.makedirs(path, exist_ok=True)
        cfg_file = os.path.join(path, "config.json")
        cfg_dict = dataclasses.asdict(cfg)
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                old = json.load(f)
            if old != json.loads(json.dumps(cfg_dict)):
                diff = sorted(k for k in cfg_dict if old.get(k) != json.loads(json.dumps(cfg_dict[k])))
                raise ValueError(f"run: {path} holds a run with a different config (keys {diff}); "
                                 "use another directory or delete it")
        else:
            _atomic_json(cfg_file, cfg_dict)
        self.state_file = os.path.join(path, "state.json")
        self.state = {"runs": {}}
        if os.path.exists(self.state_file):
            with open(self.state_file) as f:
                self.state = json.load(f)

    def rounds(self, key: str) -> list:
        return self.state["runs"].setdefault(key, [])

    def commit(self, key: str, record: dict) -> None:
        self.rounds(key).append(record)
        _atomic_json(self.state_file, self.state)


# ----------------------------------------------------------------------------- the loop

def strategy_inputs(needs: Needs, model, cfg: Config, layers, pool_x, val_x, val_y, seed: int,
                    members=()) -> tuple[PoolInputs, ValInputs | None]:
    """Exactly what a strategy declares it reads (`Needs`), computed from the current model:

      probs, descriptors, badge, features   one pyfk.extract pass over the pool: its softmax,
          its z/g descriptors (pseudo-labels cfg.pseudo_label; only when descriptors are read,
          else the prediction, which needs no reference), its BADGE factors, and for
          `features` the penultimate features h (the BADGE factor without its bias column);
      mc_probs   passes="mc_dropout": cfg.mc_passes dropout passes of the model (K, N, C);
                 passes="ensemble": the model's softmax and each member's, (1 + len(members), N, C);
      val        the validation set extracted with true-label gradients (also the reference of
                 pseudo_label="map" when descriptors are read).
    PoolInputs.n is always the pool size (all that `random` reads).
    """
    fields = set(needs.pool)
    pseudo = cfg.pseudo_label if "descriptors" in fields else "argmax"
    val_ext = None
    if needs.val or pseudo == "map":
        val_ext = extract(model, DataLoader(TensorDataset(val_x, torch.from_numpy(val_y)), batch_size=256),
                          layers, with_true=True, progress=False)
    inputs = {}
    if fields & {"probs", "descriptors", "badge", "features"}:
        with_badge = bool(fields & {"badge", "features"})
        ext = extract(model, DataLoader(TensorDataset(pool_x), batch_size=256), layers,
                      pseudo_label=pseudo, badge=with_badge, seed=seed, mc_passes=cfg.mc_passes,
                      map_reference=(val_ext.descriptors, val_y) if pseudo == "map" else None, progress=False)
        inputs.update(probs=ext.probs, descriptors=ext.descriptors, badge=ext.badge)
        if "features" in fields:
            inputs["features"] = Descriptors([np.ascontiguousarray(np.asarray(ext.badge.z[0])[:, :-1])])
    if needs.passes == "mc_dropout":
        inputs["mc_probs"] = mc_dropout(model, pool_x, cfg.mc_passes, _seed_for(seed, 11))
    elif needs.passes == "ensemble":
        inputs["mc_probs"] = np.stack([predict(m, pool_x).numpy() for m in (model, *members)])
    pool = PoolInputs(**{name: inputs[name] for name in needs.pool}, n=int(pool_x.shape[0]))
    val = ValInputs.from_extraction(val_ext) if needs.val else None
    return pool, val


def strategy_params(spec: Strategy, cfg: Config) -> dict:
    """The strategy parameters set by the config: those named like a Config field (e.g. `k`)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return {name: getattr(cfg, name) for name in spec.params if name in names}


def _check_model_for(cfg: Config, in_channels: int, classes: int, size: int) -> None:
    """Strategies that read MC-dropout passes need a model with a Dropout module."""
    mc = [s for s in cfg.strategies if strategies.STRATEGIES[s].needs.passes == "mc_dropout"]
    if not mc:
        return
    with torch.random.fork_rng(devices=[]):  # the probe model leaves the global RNG as it was
        probe = build_model(cfg.model, in_channels, classes, size)
    if not _dropouts(probe):
        raise ValueError(f"strategies: {mc} read MC-dropout passes, but model {cfg.model!r} has no Dropout "
                         "module; use another model or strategy")


def run(cfg: Config, path: str, *, log=print, progress: bool = True) -> dict:
    """Run (or resume) every strategy x seed; returns the results dict also saved as JSON."""
    cfg.validate()
    ds = datasets.load(cfg.dataset, cfg.root)
    _check_model_for(cfg, ds.x.shape[1], ds.classes, ds.x.shape[-1])
    split = datasets.biased_split(ds.y, imbalance=cfg.imbalance, minority=cfg.minority,
                                  val_per_class=cfg.val_per_class, test_per_class=cfg.test_per_class,
                                  label_noise=cfg.label_noise, seed=cfg.split_seed)
    state = Run(path, cfg)
    x_all = torch.from_numpy(ds.x)
    pool_x, val_x, test_x = x_all[split.pool], x_all[split.val], x_all[split.test]
    pool_y = torch.from_numpy(split.pool_labels)  # what the annotator returns (noise applied)
    val_y, test_y = ds.y[split.val], ds.y[split.test]
    layers = cfg.layers or models.default_layers(cfg.model)
    log(f"pyfk run: {cfg.dataset}, pool {len(split.pool)} (per class {split.counts}), val {len(split.val)}, "
        f"test {len(split.test)}; minority {split.minority} at {cfg.imbalance:g}x; -> {path}")
    total = len(cfg.strategies) * len(cfg.seeds) * (cfg.rounds + 1)
    done = sum(len(state.rounds(f"{s}/seed{seed}")) for s in cfg.strategies for seed in cfg.seeds)
    bar = tqdm(total=total, initial=done, unit="round", desc="pyfk run", disable=not progress)
    pretrained = {}

    def pretrained_init(seed):
        if seed not in pretrained:
            pretrained[seed] = rotation_pretrain(cfg, pool_x, ds.classes, seed)
        return pretrained[seed]

    first_round = {}  # seed -> round-0 model: the same for every strategy (same labels, same seeds)
    for seed in cfg.seeds:
        for strategy in cfg.strategies:
            key = f"{strategy}/seed{seed}"
            rounds = state.rounds(key)
            labeled = np.sort(np.random.default_rng(_seed_for(seed, 1)).choice(len(split.pool), cfg.initial,
                                                                                 replace=False))
            for rec in rounds:
                labeled = np.sort(np.concatenate([labeled, np.asarray(rec["selected"], dtype=np.int64)]))
            for r in range(len(rounds), cfg.rounds + 1):
                torch.manual_seed(_seed_for(seed, r, 2))
                model = build_model(cfg.model, ds.x.shape[1], ds.classes, ds.x.shape[-1])
                t0 = time.perf_counter()
                if r == 0 and seed in first_round:
                    model.load_state_dict(first_round[seed])
                else:
                    if cfg.pretrain_rotation:
                        model.load_state_dict(pretrained_init(seed), strict=False)
                    train(model, pool_x[labeled], pool_y[labeled], cfg.train_steps, cfg.batch_size, cfg.lr,
                          _seed_for(seed, r, 3))
                    if r == 0:
                        first_round[seed] = copy.deepcopy(model.state_dict())
                train_s = time.perf_counter() - t0
                metrics = evaluate(model, test_x, test_y, ds.classes, split.minority)
                record = {"round": r, "labels": int(len(labeled)), **metrics, "train_seconds": round(train_s, 3),
                          "selected": [], "selection_seconds": 0.0}
                if r < cfg.rounds:
                    t0 = time.perf_counter()
                    spec = strategies.STRATEGIES[strategy]
                    members = []
                    if spec.needs.passes == "ensemble":  # extra members: same labels, other seeds
                        for e in range(1, cfg.ensemble_size):
                            torch.manual_seed(_seed_for(seed, r, 5, e))
                            member = build_model(cfg.model, ds.x.shape[1], ds.classes, ds.x.shape[-1])
                            if cfg.pretrain_rotation:
                                member.load_state_dict(pretrained_init(seed), strict=False)
                            members.append(train(member, pool_x[labeled], pool_y[labeled], cfg.train_steps,
                                                 cfg.batch_size, cfg.lr, _seed_for(seed, r, 6, e)))
                    inputs, val = strategy_inputs(spec.needs, model, cfg, layers, pool_x, val_x, val_y, seed,
                                                  members)
                    sel = strategies.select(strategy, inputs, cfg.budget, labeled=labeled,
                                            seed=_seed_for(seed, r, 4), val=val, **strategy_params(spec, cfg))
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
                         "selection_seconds": rec["selection_seconds"]})
    with open(os.path.join(state.path, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["strategy"])
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows)
    _atomic_json(os.path.join(state.path, "results.json"), {"rows": rows, "summary": summary})
    plot(summary, os.path.join(state.path, "curve.png"))
    return {"rows": rows, "summary": summary, "path": state.path}


def summarise(rows: list) -> dict:
    """strategy -> round -> mean/min/max over seeds."""
    out: dict = {}
    for row in rows:
        out.setdefault(row["strategy"], {}).setdefault(row["round"], []).append(row)
    summary = {}
    for strategy, by_round in out.items():
        summary[strategy] = []
        for r in sorted(by_round):
            rs = by_round[r]
            entry = {"round": r, "labels": rs[0]["labels"], "seeds": len(rs)}
            for m in ("accuracy", "minority_accuracy", "selection_seconds", "selected_minority"):
                vals = np.array([x[m] for x in rs], dtype=np.float64)
                entry[m] = float(vals.mean())
                entry[m + "_min"], entry[m + "_max"] = float(vals.min()), float(vals.max())
            summary[strategy].append(entry)
    return summary


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for strategy, entries in summary.items():
        labels = [e["labels"] for e in entries]
        for ax, metric in zip(axes, ("accuracy", "minority_accuracy")):
            mean = [e[metric] for e in entries]
            ax.plot(labels, mean, marker="o", label=strategy)
            ax.fill_between(labels, [e[metric + "_min"] for e in entries], [e[metric + "_max"] for e in entries],
                            alpha=0.15)
    for ax, title in zip(axes, ("test accuracy", "minority-group test accuracy")):
        ax.set_xlabel("labels used")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("mean over seeds; bands: min-max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(summary: dict) -> str:
    lines = []
    for strategy, entries in summary.items():
        lines.append(f"\n{strategy}")
        lines.append(f"  {'round':>5} {'labels':>6} {'accuracy':>9} {'minority':>9} {'picked-min':>10} {'select s':>9}")
        for e in entries:
            lines.append(f"  {e['round']:>5} {e['labels']:>6} {e['accuracy']:>9.3f} {e['minority_accuracy']:>9.3f} "
                         f"{e['selected_minority']:>10.1f} {e['selection_seconds']:>9.2f}")
    return "\n".join(lines)
