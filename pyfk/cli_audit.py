"""`pyfk audit`: which labels of a labeled set are probably wrong (pyfk.audit on a descriptor store).

    pyfk audit --store STORE --labels labels.npy [--probs probs.npy | --store-probs]
               [--k 32] [--alpha 0.5] [--all] --out suspects.csv

STORE holds the labeled rows' descriptors (`pyfk extract`, plain or sharded); labels.npy (or a
.txt, one label per line) their given labels, row for row; probs.npy out-of-sample class
probabilities (e.g. cross-validated), or --store-probs for the probabilities the store was
extracted with (in-sample: the model has fitted the given labels, so it flags fewer). .npy files
are read with allow_pickle=False. Writes SUSPECTS.csv (the flagged rows, most suspect first; --all:
every row) and SUSPECTS.json (the same plus the settings and per-class thresholds), atomically.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys

import numpy as np

from pyfk.cli_select import UserError, _jsonable, _open_pool, _write_atomic, read_ints


def add_parser(sub, positive) -> None:
    p = sub.add_parser(
        "audit", help="rank a labeled set's rows by how likely their label is wrong (CSV + JSON)",
        description="Confident learning on kernel-smoothed class probabilities: each labeled row's top-k "
                    "neighbours among the other labeled rows (the fused kernels) vote on its class, mixed with "
                    "the model's probabilities; rows whose confident class differs from the given label are "
                    "flagged. See pyfk.al.audit.")
    p.add_argument("--store", required=True, metavar="STORE", help="descriptor store of the labeled rows")
    p.add_argument("--labels", required=True, metavar="FILE", help="given labels: .npy (ints) or .txt (one per line)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--probs", default=None, metavar="FILE.npy", help="(n, C) out-of-sample class probabilities")
    g.add_argument("--store-probs", action="store_true", help="use the store's own (in-sample) probabilities")
    p.add_argument("--k", type=positive, default=32, help="neighbours per row (default 32)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the neighbour vote in [0, 1] (default 0.5)")
    p.add_argument("--combine", choices=("features", "product", "sum"), default="features",
                   help="similarity (default features: pooled activations only)")
    p.add_argument("--normalize", choices=("pcc", "l2", "none"), default="pcc", help="row normalisation")
    p.add_argument("--backend", default="auto", help="engine backend (default auto; see `pyfk backends`)")
    p.add_argument("--all", action="store_true", help="write every row, not only the flagged ones")
    p.add_argument("--out", required=True, metavar="SUSPECTS.csv", help="CSV to write; the JSON goes beside it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _read_array(path: str, flag: str) -> np.ndarray:
    """A .npy array (no pickle: nothing in a data file is executed) or integers from a text file."""
    if not path.endswith(".npy"):
        return read_ints(path, flag, "an integer label")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise UserError(f"{flag} {path}: not a plain numeric .npy ({e})") from None


def suspect_rows(report, ids: np.ndarray, everything: bool) -> list[dict]:
    """One dict per written row, in rank order."""
    rows = []
    for r in range(len(report.indices)):
        if not (everything or report.flagged[r]):
            continue
        row = int(report.indices[r])
        against = report.disagreeing(r)
        rows.append({"rank": r, "row": row, "id": int(ids[row]), "given": int(report.given[r]),
                     "suggested": int(report.suggested[r]), "score": float(report.scores[r]),
                     "flagged": bool(report.flagged[r]), "disagreeing": len(against),
                     "neighbours": len(report.neighbours[r]),
                     "disagreeing_ids": [int(ids[m]) for m in against[:8]]})
    return rows


def run(args) -> int:
    try:
        return _audit(args)
    except UserError as e:
        print(f"pyfk audit: {e}", file=sys.stderr)
        return 2


def _audit(args) -> int:
    from pyfk.al.audit import audit

    if not os.path.isdir(args.store):
        raise UserError(f"--store {args.store}: no such directory")
    view, ids, _ = _open_pool(args.store, 1, "--store")
    descriptors, store_probs = view.descriptors, view.probs
    labels = _read_array(args.labels, "--labels")
    n = len(ids)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise UserError(f"--labels {args.labels}: expected {n} integer labels (one per store row), "
                        f"got {labels.dtype} of shape {labels.shape}")
    probs = None
    if args.probs is not None:
        probs = _read_array(args.probs, "--probs")
        if probs.ndim != 2 or probs.shape[0] != n:
            raise UserError(f"--probs {args.probs}: expected shape ({n}, C), got {probs.shape}")
    elif args.store_probs:
        probs = store_probs
    try:
        report = audit(descriptors, labels, probs=probs, k=args.k, alpha=args.alpha, combine=args.combine,
                       normalize=args.normalize, backend=args.backend, progress=False if args.no_progress else None)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    rows = suspect_rows(report, ids, args.all)
    columns = ["rank", "row", "id", "given", "suggested", "score", "flagged", "disagreeing", "neighbours"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns + ["disagreeing_ids"])
    for r in rows:
        writer.writerow([r[c] for c in columns] + [" ".join(map(str, r["disagreeing_ids"]))])
    base = args.out[:-4] if args.out.endswith(".csv") else args.out
    record = {"store": os.path.abspath(args.store), "labels": os.path.abspath(args.labels),
              "probs": "store" if args.store_probs else (os.path.abspath(args.probs) if args.probs else None),
              "rows": n, "flagged": int(report.flagged.sum()), **report.provenance,
              "thresholds": [None if not np.isfinite(t) else float(t) for t in report.provenance["thresholds"]],
              "suspects": rows}
    _write_atomic(args.out, buf.getvalue())
    _write_atomic(base + ".json", json.dumps(record, indent=1, default=_jsonable) + "\n")
    print(f"pyfk audit: {int(report.flagged.sum())} of {n} labels flagged -> {args.out}", file=sys.stderr)
    return 0
