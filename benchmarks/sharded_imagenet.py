"""Build the stores `pyfk select` needs at ImageNet scale, for timing it from the shell.

    python benchmarks/sharded_imagenet.py [--world 2] [--root DIR]

Writes, once (under the cache directory's bench/ folder, next to the `--preset imagenet` store
it copies its descriptors from):
  imagenet-sharded-w{W}/   a sharded pool store laid out as `pyfk extract` under torchrun writes
                           it (shard-RRRRR-of-WWWWW/ + sharded.json): the preset's 1,281,167 fp16
                           rows (z and g at 64/128/256/512) split in W contiguous shards, plus
                           seeded probs (10 classes), pred, pseudo, labels (-1) and ids columns;
  imagenet-val-m1000/      a validation store of 1,000 seeded fp16 rows with true-label
                           gradients, labels and predictions that all differ (1,000 errors).
Then prints the two commands to time (one process; torchrun with W gloo processes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = 10
CHUNK = 65536


def _pool_arrays(widths):
    arrays = {f"{p}{j}": ((w,), "float16") for j, w in enumerate(widths) for p in ("z", "g")}
    arrays.update(probs=((CLASSES,), "float32"), pred=((), "int64"), pseudo=((), "int64"), labels=((), "int64"),
                  ids=((), "int64"))
    return arrays


def build_sharded(root: Path, world: int) -> Path:
    from pyfk.bench import PRESETS, preset_store
    from pyfk.features.sharded import MANIFEST, shard_name, split_rows, write_manifest
    from pyfk.features.store import DescriptorStore

    widths = PRESETS["imagenet"]["widths"]
    path = root / f"imagenet-sharded-w{world}"
    if (path / MANIFEST).exists():
        return path
    src = preset_store("imagenet")
    n = src.n
    offsets = split_rows(n, world)
    arrays = _pool_arrays(widths)
    for r in range(world):
        lo, hi = int(offsets[r]), int(offsets[r + 1])
        shard = {"rank": r, "world": world, "offset": lo, "total": n}
        store = DescriptorStore.create(path / shard_name(r, world), hi - lo, arrays,
                                       meta={"config": {"shard": shard}, "extract": {"widths": widths}},
                                       overwrite=True)
        for a in range(lo, hi, CHUNK):
            b = min(hi, a + CHUNK)
            rng = np.random.default_rng([11, a])
            probs = rng.dirichlet(np.ones(CLASSES), size=b - a).astype(np.float32)
            batch = {name: src.rows(name)[a:b] for name in arrays if name[0] in "zg"}
            batch.update(probs=probs, pred=probs.argmax(1).astype(np.int64), pseudo=probs.argmax(1).astype(np.int64),
                         labels=np.full(b - a, -1, np.int64), ids=np.arange(a, b, dtype=np.int64))
            store.write(a - lo, batch)
            store.commit(b - lo)
        store.close()
    spec = {name: {"shape": list(shape), "dtype": dtype} for name, (shape, dtype) in arrays.items()}
    manifest = {"format": "pyfk-sharded-store", "version": 1, "world": world, "n": n,
                "offsets": [int(o) for o in offsets], "rows": [int(b - a) for a, b in zip(offsets[:-1], offsets[1:])],
                "shards": [shard_name(r, world) for r in range(world)], "dtype": "float16", "widths": widths,
                "arrays": spec, "meta": {"config": {}, "extract": {"widths": widths}}}
    write_manifest(str(path), manifest)
    return path


def build_val(root: Path, m: int = 1000) -> Path:
    from pyfk.bench import PRESETS
    from pyfk.features.store import DescriptorStore

    widths = PRESETS["imagenet"]["widths"]
    path = root / f"imagenet-val-m{m}"
    if (path / "manifest.json").exists():
        return path
    arrays = {f"{p}{j}": ((w,), "float16") for j, w in enumerate(widths) for p in ("z", "g", "g_true")}
    arrays.update(probs=((CLASSES,), "float32"), pred=((), "int64"), pseudo=((), "int64"), labels=((), "int64"),
                  ids=((), "int64"))
    rng = np.random.default_rng(7)
    batch = {name: rng.standard_normal((m, *shape)).astype(dtype) for name, (shape, dtype) in arrays.items()
             if name[0] in "zg"}
    labels = rng.integers(0, CLASSES, m)
    probs = rng.dirichlet(np.ones(CLASSES), size=m).astype(np.float32)
    batch.update(probs=probs, pred=(labels + 1) % CLASSES, pseudo=(labels + 1) % CLASSES, labels=labels,
                 ids=np.arange(m, dtype=np.int64))
    store = DescriptorStore.create(path, m, arrays, meta={"extract": {"widths": widths}}, overwrite=True)
    store.write(0, batch)
    store.commit(m)
    store.close()
    return path


def main() -> None:
    from pyfk.bench import cache_dir
    from pyfk.features.sharded import FORMAT, VERSION

    assert (FORMAT, VERSION) == ("pyfk-sharded-store", 1), "update the manifest written above"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args()
    root = args.root or cache_dir() / "bench"
    pool = build_sharded(root, args.world)
    val = build_val(root)
    print(f"pool: {pool}\nval:  {val}\n")
    common = f"select --pool {pool} --val {val} --budget 1000 --no-progress"
    print(f"OMP_NUM_THREADS=1 /usr/bin/time -v pyfk {common} --out picks-1.csv")
    print(f"/usr/bin/time -v torchrun --nproc-per-node {args.world} -m pyfk {common} --out picks-{args.world}.csv")


if __name__ == "__main__":
    main()
