"""pyfk.audit against cleanlab's confident learning on injected label noise (issue #14, part 2).

    python benchmarks/audit_vs_cleanlab.py [--datasets digits mnist5k] [--seeds 5] [--json OUT.json]

For each dataset, noise kind (symmetric, class_conditional = pair flips c -> c+1), rate (10%, 20%)
and seed: `pyfk.al.data.inject_label_noise` flips exactly rate x n labels; the same model (the
runner's LeNet, same steps) gives
  - out-of-sample probabilities by K-fold cross-validation on the noisy labels (cleanlab's input);
  - descriptors of every row (layers="auto") from one model trained on all noisy labels
    (in-sample: it has seen the noisy labels; the audit reads only its features, combine="features").
Then cleanlab.filter.find_label_issues(noisy, probs) (its defaults) and pyfk.audit(descriptors,
noisy, probs=probs) with alpha 0.5 (default), 1.0 (kernel votes only) and 0.0 (probabilities only)
flag rows. Metrics against the truly flipped rows: precision, recall, F1 of the flagged set, and
precision@n_noisy of each method's ranking (cleanlab: self-confidence order). Per setting: mean and a
95% t-interval over seeds, and the paired F1 difference pyfk - cleanlab (same seed, same probs).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import pyfk
from pyfk.al.audit import audit
from pyfk.al.data import inject_label_noise, load
from pyfk.al.inputs import seed_for
from pyfk.al.runner import seeded_model, train
from pyfk.al.stats import interval
from pyfk.bench import _cpu_model


def scores(flagged: np.ndarray, ranking: np.ndarray, truth: np.ndarray) -> dict:
    truth_set = set(truth.tolist())
    hit = len(set(flagged.tolist()) & truth_set)
    precision = hit / len(flagged) if len(flagged) else 0.0
    recall = hit / len(truth) if len(truth) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    at_n = len(set(ranking[:len(truth)].tolist()) & truth_set) / max(1, len(truth))
    return {"precision": precision, "recall": recall, "f1": f1, "precision_at_n": at_n, "flagged": int(len(flagged))}


def one_setting(ds, kind: str, rate: float, seed: int, folds: int, steps: int) -> dict:
    import cleanlab.filter

    x = torch.from_numpy(ds.x)
    n = len(ds.y)
    noise_seed = seed_for(seed, kind, int(rate * 100))
    noisy, flipped = inject_label_noise(ds.y, rate, kind, classes=ds.classes, seed=noise_seed)
    y_noisy = torch.from_numpy(noisy)
    shape = (ds.x.shape[1], ds.classes, ds.x.shape[-1])
    probs = np.zeros((n, ds.classes))
    order = np.random.default_rng(seed_for(seed, "folds")).permutation(n)
    for f in range(folds):
        held = order[f::folds]
        fit_rows = np.setdiff1d(order, held)
        model = seeded_model("lenet", *shape, seed_for(seed, "fold", f))
        train(model, x[fit_rows], y_noisy[fit_rows], steps, 64, 1e-3, seed_for(seed, "fold-train", f))
        with torch.no_grad():
            probs[held] = torch.softmax(model(x[held]), 1).double().numpy()
    model = seeded_model("lenet", *shape, seed_for(seed, "all"))
    train(model, x, y_noisy, steps, 64, 1e-3, seed_for(seed, "all-train"))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=512)
    desc = pyfk.extract(model, loader, progress=False).descriptors

    out = {"dataset": ds.name, "kind": kind, "rate": rate, "seed": seed, "n": n, "noisy": int(len(flipped))}
    t0 = time.perf_counter()
    flagged = np.asarray(cleanlab.filter.find_label_issues(noisy, probs, return_indices_ranked_by="self_confidence"))
    self_conf = probs[np.arange(n), noisy]
    cl_rank = np.lexsort((np.arange(n), self_conf))
    out["cleanlab"] = dict(scores(flagged, cl_rank, flipped), seconds=time.perf_counter() - t0)
    for alpha in (0.5, 1.0, 0.0):
        t0 = time.perf_counter()
        rep = audit(desc, noisy, probs=probs, alpha=alpha, k=32)
        out[f"pyfk_alpha{alpha}"] = dict(scores(rep.suspects, rep.indices, flipped),
                                         seconds=time.perf_counter() - t0)
    return out


def summarise(rows: list[dict]) -> list[dict]:
    methods = ["cleanlab"] + [k for k in rows[0] if k.startswith("pyfk_")]
    table = []
    for key in sorted({(r["dataset"], r["kind"], r["rate"]) for r in rows}):
        group = [r for r in rows if (r["dataset"], r["kind"], r["rate"]) == key]
        entry = {"dataset": key[0], "kind": key[1], "rate": key[2], "seeds": len(group)}
        for m in methods:
            for metric in ("precision", "recall", "f1", "precision_at_n"):
                entry[f"{m}.{metric}"] = interval([r[m][metric] for r in group])
        for m in methods[1:]:
            entry[f"{m}.f1_minus_cleanlab"] = interval([r[m]["f1"] - r["cleanlab"]["f1"] for r in group])
        table.append(entry)
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| dataset | noise | rate | seeds | method | precision | recall | F1 | prec@n_noisy "
             "| F1 - cleanlab (paired) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        for m in ("cleanlab", "pyfk_alpha0.5", "pyfk_alpha1.0", "pyfk_alpha0.0"):
            cells = [f"{e[f'{m}.{k}'][0]:.3f} ± {e[f'{m}.{k}'][1]:.3f}"
                     for k in ("precision", "recall", "f1", "precision_at_n")]
            diff = e.get(f"{m}.f1_minus_cleanlab")
            dcell = "" if diff is None else f"{diff[0]:+.3f} ± {diff[1]:.3f}"
            lines.append(f"| {e['dataset']} | {e['kind']} | {e['rate']:.0%} | {e['seeds']} | {m} | "
                         + " | ".join(cells) + f" | {dcell} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    p.add_argument("--kinds", nargs="+", default=["symmetric", "class_conditional"])
    p.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.2])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--steps", type=int, default=500, help="Adam steps per model (batch 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # small models: more threads than free cores only slows training
    rows = []
    start = time.time()
    for name in args.datasets:
        ds = load(name)
        for kind in args.kinds:
            for rate in args.rates:
                for seed in range(args.seeds):
                    rows.append(one_setting(ds, kind, rate, seed, args.folds, args.steps))
                    r = rows[-1]
                    print(f"{name} {kind} {rate:.0%} seed {seed}: cleanlab F1 {r['cleanlab']['f1']:.3f}  "
                          f"pyfk F1 {r['pyfk_alpha0.5']['f1']:.3f}  ({time.time() - start:.0f} s)", flush=True)
    table = summarise(rows)
    print(markdown(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cpu": _cpu_model(), "date": time.strftime("%Y-%m-%d"), "rows": rows,
                       "summary": table}, f, indent=1)


if __name__ == "__main__":
    main()
