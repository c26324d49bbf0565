"""`pyfk select`: from descriptor stores to the picks to label, with their provenance.

    pyfk select --pool POOL_STORE [--val VAL_STORE] --budget B [--strategy pfk]
                [--exclude labeled.txt] --out picks.csv

The pool store is one written by `pyfk extract` (or a sharded one, DIR/shard-*-of-*/);
the validation store, needed by the PFK family (pfk, pfk_sum, pcc), must hold the
true-label gradients (`pyfk extract --with-true` on labelled data). `--exclude` names a
text file of pool rows already labelled (one global row index per line; blank lines and
`#` comments ignored). Writes PICKS.csv (one row per pick, in pick order) and PICKS.json
(the same plus the strategy's full provenance, the backend and the inputs), each
atomically. Under `torchrun` with a sharded pool store, every rank searches its own
shard and rank 0 writes the files; the picks equal a single-process run's.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time

import numpy as np

# Strategies a store can feed: what each reads from the pool extraction.
_FROM_STORE = {"descriptors", "probs", "badge"}


def add_parser(sub, positive) -> None:
    from pyfk.al.strategies import STRATEGIES

    p = sub.add_parser(
        "select", help="pick the next pool rows to label from descriptor stores (CSV + JSON with provenance)",
        description="Run an acquisition strategy on a pool store written by `pyfk extract` (and, for the PFK "
                    "family, a validation store extracted with --with-true) and write the picks in pick order "
                    "to PICKS.csv and PICKS.json, with their provenance. Under torchrun with a sharded store, "
                    "each rank searches its shard; the picks equal a single-process run's.")
    p.add_argument("--pool", required=True, metavar="STORE", help="pool descriptor store (or sharded store) directory")
    p.add_argument("--val", default=None, metavar="STORE",
                   help="validation store with true-label gradients (needed by pfk, pfk_sum, pcc)")
    p.add_argument("--budget", type=positive, required=True, help="how many pool rows to pick")
    p.add_argument("--strategy", default="pfk", metavar="NAME",
                   help=f"acquisition strategy (default pfk; one of {', '.join(sorted(STRATEGIES))})")
    p.add_argument("--exclude", default=None, metavar="FILE",
                   help="text file of already-labelled pool rows, one global row index per line")
    p.add_argument("--k", type=positive, default=None, help="PFK family: neighbours per validation centre")
    p.add_argument("--normalize", choices=("pcc", "l2", "none"), default=None,
                   help="PFK family: per-scale row normalisation (default pcc)")
    p.add_argument("--use-all", action="store_true", help="PFK family: query with every validation row")
    p.add_argument("--seed", type=int, default=0, help="seed of the strategy (default 0)")
    p.add_argument("--backend", default="auto", help="engine backend (default auto; see `pyfk backends`)")
    p.add_argument("--out", required=True, metavar="PICKS.csv",
                   help="CSV to write; the JSON goes beside it with the suffix .json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


class UserError(Exception):
    """A problem with the command's input: one line on stderr, exit status 2."""


def read_exclude(path: str) -> np.ndarray:
    """Global row indices from a text file: one integer per line, blank lines and # comments ignored."""
    return read_ints(path, "--exclude", "a row index")


def read_ints(path: str, flag: str, what: str) -> np.ndarray:
    """int64 values of a text file given as `flag`: one per line, blank lines and # comments ignored;
    a line that is not an integer raises UserError naming the flag, the line and `what` was expected."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    values = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                values.append(int(text))
            except ValueError:
                raise UserError(f"{flag} {path}, line {number}: expected {what}, got {text!r}") from None
    return np.asarray(values, dtype=np.int64)


class _PoolView:
    """What the strategies read of a pool store: descriptors, probs, badge, ids (NumPy/memmaps)."""

    def __init__(self, descriptors, probs, badge, ids):
        self.descriptors, self.probs, self.badge, self.ids = descriptors, probs, badge, ids


def _view_of_store(store) -> _PoolView:
    from pyfk.features.writer import extraction_from_store

    ext = extraction_from_store(store)
    return _PoolView(ext.descriptors, ext.probs, ext.badge, np.asarray(ext.ids))


def _open_pool(path: str, world: int, flag: str = "--pool"):
    """(pool view of this process's rows, global ids of every row or None, global offset of the rows)
    of a plain or sharded store given as `flag`."""
    from pyfk.features.store import DescriptorStore

    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such directory")
    if not os.path.isfile(os.path.join(path, "sharded.json")):
        if world > 1:
            raise UserError(f"{flag} {path}: under torchrun (world size {world}) the pool must be a sharded store "
                            "(DIR/shard-RRRRR-of-WWWWW/, written by `pyfk extract` under torchrun)")
        view = _view_of_store(DescriptorStore.open(path))
        return view, view.ids, 0
    from pyfk.features.sharded import ShardedStore

    store = ShardedStore.open(path)
    if world > 1:  # this rank's shard; its rows are offset + i
        return _view_of_store(store.local()), None, store.offset
    badge = None
    if "badge_h0" in store.names:
        badge = store.descriptors(z_prefix="badge_h", g_prefix="badge_e", same_widths=False)
    ids = np.asarray(store.rows("ids"))
    return _PoolView(store.to_descriptors(), np.asarray(store.rows("probs")), badge, ids), ids, 0


def _global_ids(view: _PoolView, offset: int, rows: np.ndarray) -> np.ndarray:
    """The ids of global pool rows `rows`, each from the rank that holds it (collective)."""
    import torch

    from pyfk.distributed import comm

    local = np.full(len(rows), np.iinfo(np.int64).min, dtype=np.int64)
    mine = (rows >= offset) & (rows < offset + len(view.ids))
    local[mine] = view.ids[rows[mine] - offset]
    gathered = comm.all_gather_tensor(torch.from_numpy(local))
    return torch.stack(gathered).max(0).values.numpy()


def _open_val(path: str | None, strategy: str):
    from pyfk.al.strategies import ValInputs
    from pyfk.features.store import DescriptorStore
    from pyfk.features.writer import extraction_from_store

    if path is None:
        raise UserError(f"--val: strategy {strategy!r} needs a validation store (extracted with --with-true)")
    if not os.path.exists(path):
        raise UserError(f"--val {path}: no such directory")
    ext = extraction_from_store(DescriptorStore.open(path))
    return ValInputs.from_extraction(ext), np.asarray(ext.ids)


def _check_needs(needs) -> None:
    missing = [name for name in needs.pool if name not in _FROM_STORE]
    if missing:
        raise UserError(f"--strategy: needs pool.{missing[0]}, which a descriptor store does not hold; "
                        f"use a strategy reading {sorted(_FROM_STORE)}")


def _pool_inputs(view: _PoolView, needs):
    from pyfk.al.strategies import PoolInputs

    fields = {name: getattr(view, name) for name in needs.pool}
    if "badge" in fields and fields["badge"] is None:
        raise UserError("--strategy badge: the pool store has no BADGE factors (extract with --badge)")
    return PoolInputs(n=len(view.ids), **fields)


def pick_rows(sel, pick_ids: np.ndarray, val_ids: np.ndarray | None) -> list[dict]:
    """One dict per pick, in pick order: pick, row, id, score and, for the PFK family, the
    validation centre (row and id), the neighbour rank and each scale's share of the score."""
    prov = sel.provenance
    rows = []
    for j, (row, score) in enumerate(zip(sel.indices.tolist(), sel.scores.tolist())):
        out = {"pick": j, "row": int(row), "id": int(pick_ids[j]), "score": float(score)}
        if "centre" in prov:
            centre = int(prov["centre"][j])
            out["centre"] = centre
            out["centre_id"] = int(val_ids[centre]) if val_ids is not None else centre
            out["rank"] = int(prov["rank"][j])
            share = prov["scale_share"][j]
            out["scale_share"] = None if share is None else [float(s) for s in share]
        rows.append(out)
    return rows


def _write_atomic(path: str, text: str) -> None:
    from pyfk.fileio import fsync_dir

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(folder)


def write_picks(out: str, rows: list[dict], record: dict) -> tuple[str, str]:
    """PICKS.csv and PICKS.json (atomic each); the scale shares become columns share_0..share_{S-1}."""
    scales = max((len(r["scale_share"]) for r in rows if r.get("scale_share")), default=0)
    columns = ["pick", "row", "id", "score"] + (["centre", "centre_id", "rank"] if rows and "centre" in rows[0]
                                               else [])
    columns += [f"share_{s}" for s in range(scales)]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        share = r.get("scale_share") or [None] * scales
        writer.writerow([r.get(c) for c in columns[:len(columns) - scales]]
                        + ["" if s is None else repr(s) for s in share])
    base = out[:-4] if out.endswith(".csv") else out
    json_path = base + ".json"
    _write_atomic(out, buf.getvalue())
    _write_atomic(json_path, json.dumps(dict(record, picks=rows), indent=1, default=_jsonable) + "\n")
    return out, json_path


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _select(args) -> int:
    import pyfk
    from pyfk.al.strategies import STRATEGIES
    from pyfk.distributed import comm
    from pyfk.engine.registry import resolve

    if args.strategy not in STRATEGIES:
        raise UserError(f"--strategy: expected one of {', '.join(sorted(STRATEGIES))}, got {args.strategy!r}")
    spec = STRATEGIES[args.strategy]
    params = {}
    for flag, name, value in (("--k", "k", args.k), ("--normalize", "normalize", args.normalize),
                              ("--use-all", "use_all", args.use_all or None)):
        if value is not None:
            if name not in spec.params:
                raise UserError(f"{flag}: strategy {args.strategy!r} takes no {name!r} parameter")
            params[name] = value
    _check_needs(spec.needs)
    comm.init()  # under torchrun: joins the group (gloo on CPU, NCCL on GPUs); else one process
    rank, world = comm.rank_and_world()
    exclude = read_exclude(args.exclude) if args.exclude else None
    view, ids, offset = _open_pool(args.pool, world)
    val, val_ids = _open_val(args.val, args.strategy) if spec.needs.val else (None, None)
    inputs = _pool_inputs(view, spec.needs)
    backend = resolve(args.backend, "cpu")
    progress = False if args.no_progress else None  # None: a bar for long searches on a terminal
    t0 = time.perf_counter()
    if world > 1:
        from pyfk.distributed.acquire import acquire as distributed_acquire

        sel = distributed_acquire(args.strategy, inputs, args.budget, labeled=exclude, seed=args.seed, val=val,
                                  backend=args.backend, progress=progress, **params)
        pick_ids = _global_ids(view, offset, sel.indices)
        n_total = int(sel.provenance.get("n", 0))
    else:
        sel = pyfk.acquire(args.strategy, inputs, args.budget, labeled=exclude, seed=args.seed, val=val,
                           backend=args.backend, progress=progress, **params)
        pick_ids = ids[sel.indices]
        n_total = len(ids)
    seconds = time.perf_counter() - t0
    if rank != 0:
        return 0
    rows = pick_rows(sel, pick_ids, val_ids)
    record = {"command": ["pyfk", *sys.argv[1:]], "pool": os.path.abspath(args.pool),
              "val": os.path.abspath(args.val) if args.val else None, "strategy": args.strategy,
              "budget": args.budget, "seed": args.seed, "backend": backend.name, "world_size": world,
              "seconds": seconds, "provenance": sel.provenance}
    csv_path, json_path = write_picks(args.out, rows, record)
    print(f"pyfk select: {len(rows)} picks by {args.strategy} from {n_total} pool rows "
          f"({0 if exclude is None else len(exclude)} excluded) in {seconds:.2f} s on backend {backend.name}"
          + (f", {world} ranks" if world > 1 else ""))
    print(f"wrote {csv_path} and {json_path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from pyfk import BackendUnavailable

    try:
        return _select(args)
    except (UserError, FileNotFoundError, ValueError, TypeError, BackendUnavailable, OSError) as exc:
        if os.environ.get("PYFK_DEBUG"):
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"pyfk select: error: {text}", file=sys.stderr)
        return 2
