"""Sharded descriptor stores: one DescriptorStore per rank of a process group, read as one pool
(DESIGN.md section 9).

A sharded store is a directory DIR holding

    DIR/sharded.json                 the top-level manifest, written only once every shard is complete
    DIR/shard-00000-of-00003/        rank 0's rows [offsets[0], offsets[1]): a plain DescriptorStore
    DIR/shard-00001-of-00003/        rank 1's rows [offsets[1], offsets[2]), ...

    {"format": "pyfk-sharded-store", "version": 1, "world": 3, "n": 11, "offsets": [0, 4, 8, 11],
     "rows": [4, 4, 3], "shards": ["shard-00000-of-00003", ...], "dtype": "float16", "widths": [16, 9, 5],
     "arrays": {"z0": {"shape": [16], "dtype": "float16"}, ...}, "meta": {"config": {...}, "extract": {...}}}

(`arrays` gives every array's per-row shape and dtype, the same in every shard; `meta` the extraction
settings and meta every shard carries).

Writing. `pyfk.extract(model, loader, layers, store=DIR)` called on every rank of an initialised
torch.distributed group of W > 1 ranks runs `extract_sharded`: the loader's dataset (N rows) is cut
into W contiguous parts (`split_rows`: sizes as equal as possible, the first N % W ranks one row
more), rank r extracts rows [offsets[r], offsets[r+1]) -- through a DataLoader over a Subset, batched
like the user's -- into its shard (resumable on its own, like any store; example ids default to the
global row), and sharded.json is written (temp file, fsync, rename) only after every shard is
complete. Each step ends with a collective check: an error on one rank (a bad argument, a failing
batch, a full disk) is raised on every rank -- that rank's own exception where it failed, the first
failing rank's message elsewhere (ValueError/TypeError kept, else `RankFailed`) -- so none hangs and
nothing half-written is recorded as complete. Rerunning the same call resumes each unfinished shard
and leaves the finished ones as they are; the result equals an uninterrupted run. Every rank writes
sharded.json into its own DIR (identical bytes), so a DIR on a shared file system gets one and
node-local DIRs each get one.

Reading. `ShardedStore.open(DIR)` outside a process group (or in a group of one rank) opens every
shard read-only (memory-mapped) and reads them as ONE pool, in shard order: `to_descriptors()` gives
Descriptors whose arrays are `ConcatRows` -- read-only row concatenations of the shards' memmaps
that return only the rows asked for (a view where they lie in one shard) -- so `pyfk.topk`,
`pyfk.select` and the strategies read it chunk by chunk, never copying the pool. Inside a group of
W > 1 ranks, `open` (collective) opens only this rank's shard: `local()` (a DescriptorStore) and
`offset` are what `pyfk.distributed.*` take. Anything missing or inconsistent (no directory, no
sharded.json, a shard missing or incomplete, another world size, widths or settings that differ)
raises ValueError naming the path and what was expected.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import stat
from typing import Callable

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler, Subset

from pyfk.engine.collectives import RankFailed, collective, rank_and_world  # noqa: F401 - RankFailed re-exported
from pyfk.engine.descriptors import Descriptors
from pyfk.features.extraction import Extraction
from pyfk.features.store import DescriptorStore, check_store_target
from pyfk.features.writer import StoreWriter, extraction_from_store
from pyfk.fileio import fsync_dir

FORMAT = "pyfk-sharded-store"
VERSION = 1
MANIFEST = "sharded.json"
STORE_MANIFEST = "manifest.json"  # a plain DescriptorStore's (pyfk.features.store.MANIFEST)

_SHARD = re.compile(r"shard-([0-9]{5,})-of-([0-9]{5,})\Z")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


# ----------------------------------------------------------------------------- layout of a sharded store

def shard_name(rank: int, world: int) -> str:
    """The directory name of rank `rank`'s shard among `world`: shard-RRRRR-of-WWWWW."""
    return f"shard-{rank:05d}-of-{world:05d}"


def split_rows(n: int, world: int) -> np.ndarray:
    """(world + 1,) int64 offsets of the contiguous split of n rows over `world` ranks: rank r holds
    rows [offsets[r], offsets[r+1]); sizes differ by at most one, the first n % world ranks larger."""
    n, world = int(n), int(world)
    if n < 0 or world < 1:
        raise ValueError(f"split_rows: expected n >= 0 and world >= 1, got n={n}, world={world}")
    sizes = [n // world + (1 if r < n % world else 0) for r in range(world)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


# ----------------------------------------------------------------------------- collectives (torch.distributed)

# rank_and_world, collective and RankFailed: pyfk.engine.collectives (shared with pyfk.distributed).


# ----------------------------------------------------------------------------- sharded extraction

def check_shardable(loader, world: int) -> int:
    """The loader a sharded extraction can split: a DataLoader over a sized map-style dataset,
    batch_size set, in order (no shuffle, no sampler of its own), drop_last off. Returns N."""
    where = f"sharded extraction (a process group of {world} ranks)"
    if not isinstance(loader, DataLoader):
        raise ValueError(f"loader: {where} needs a torch.utils.data.DataLoader over the whole dataset, which it "
                         f"splits across the ranks itself; got {type(loader).__name__}")
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError(f"loader: {where} needs a map-style dataset (len and indexing) to split across the "
                         f"ranks, got the IterableDataset {type(dataset).__name__}")
    try:
        n = len(dataset)
    except TypeError as exc:
        raise ValueError(f"loader: {where} needs a dataset with a length, got {type(dataset).__name__} "
                         f"({exc})") from None
    if loader.batch_size is None:
        raise ValueError(f"loader: {where} batches each rank's part with the loader's batch_size; a DataLoader "
                         "built from a batch_sampler has none: pass batch_size= instead")
    if not isinstance(loader.sampler, SequentialSampler):
        raise ValueError(f"loader: {where} needs the examples in a fixed order (shuffle=False, no sampler such as "
                         f"a DistributedSampler: pyfk gives each rank a contiguous part of the dataset itself), "
                         f"got sampler {type(loader.sampler).__name__}")
    if loader.drop_last:
        raise ValueError(f"loader: {where} extracts every row; drop_last=True would leave some out")
    if n == 0:
        raise ValueError("loader: the dataset is empty (len(loader.dataset) == 0); nothing to extract")
    return int(n)


def shard_loader(loader: DataLoader, start: int, stop: int) -> DataLoader:
    """Rows [start, stop) of `loader`'s dataset, batched like `loader` (same batch_size, collate_fn,
    workers, pinning), in order."""
    kwargs = dict(batch_size=loader.batch_size, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                  pin_memory=loader.pin_memory, drop_last=False, timeout=loader.timeout,
                  worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                  generator=loader.generator)
    if getattr(loader, "pin_memory_device", ""):
        kwargs["pin_memory_device"] = loader.pin_memory_device
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    return DataLoader(Subset(loader.dataset, range(int(start), int(stop))), **kwargs)


def _shard_dirs(path: str) -> list[tuple[str, int, int]]:
    """(name, rank, world) of the shard directories in `path`."""
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in sorted(names):
        m = _SHARD.match(name)
        if m:
            out.append((name, int(m.group(1)), int(m.group(2))))
    return out


def _remove(file: str) -> None:
    try:
        os.unlink(file)  # a link itself, never its target
    except FileNotFoundError:
        pass


def prepare_directory(path: str, world: int, overwrite: bool) -> None:
    """Before a sharded extraction by `world` ranks into `path`: refuse a plain store there, and the
    shards or manifest of another world size (unless overwrite, which removes sharded.json: it is
    written again once every shard is complete)."""
    if os.path.lexists(os.path.join(path, STORE_MANIFEST)):
        raise ValueError(f"store: {path} is a DescriptorStore written by one process (it holds {STORE_MANIFEST}); "
                         f"a sharded extraction by {world} ranks writes shard directories and {MANIFEST} instead: "
                         "choose another directory")
    manifest_file = os.path.join(path, MANIFEST)
    if os.path.lexists(manifest_file):
        if overwrite:
            _remove(manifest_file)
            return
        written = read_manifest(path)["world"]
        if written != world:
            raise ValueError(f"store: {path} holds a sharded store written by {written} ranks ({manifest_file}); "
                             f"this process group has {world}: rerun with {written} ranks, pass overwrite=True to "
                             "start over, or choose another directory")
        return
    if overwrite:
        return
    others = [(name, w) for name, _, w in _shard_dirs(path) if w != world]
    if others:
        shown = [name for name, _ in others[:4]] + (["..."] if len(others) > 4 else [])
        worlds = sorted({w for _, w in others})
        raise ValueError(f"store: {path} holds shards {shown} of an unfinished extraction by {worlds} ranks; this "
                         f"process group has {world}: rerun with that many ranks to resume, pass overwrite=True to "
                         "start over (those shards are then left as they are), or choose another directory")


def _summary(shard_path: str) -> dict:
    """What the manifest and the other ranks need of a complete shard: rows, arrays, settings."""
    with DescriptorStore.open(shard_path, "r") as store:
        meta = store.meta
        config = dict(meta.get("config", {}))
        config.pop("shard", None)
        arrays = {name: {"shape": [int(d) for d in store.array(name).shape[1:]],
                         "dtype": store.array(name).dtype.name} for name in store.names}
        return {"rows": store.n, "arrays": arrays, "config": config, "extract": meta.get("extract", {})}


def _make_empty_shard(shard_path: str, loader: DataLoader, template: dict, shard: dict, overwrite: bool) -> None:
    """The shard of a rank without rows (N < W): an empty, complete store with the arrays and
    settings the other shards have (an existing one is checked as a resumed store would be)."""
    writer = StoreWriter(shard_path, loader, dict(template["config"], shard=shard), overwrite)
    try:
        if writer.complete:
            return
        arrays = {name: (tuple(spec["shape"]), spec["dtype"]) for name, spec in template["arrays"].items()}
        DescriptorStore.create(shard_path, 0, arrays, meta={"config": writer.config, "extract": template["extract"]},
                               overwrite=overwrite).close()
    finally:
        writer.close()


def _describe_difference(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:6])


def _build_manifest(world: int, offsets: np.ndarray, template: dict) -> dict:
    widths = template["extract"].get("widths", [])
    return {"format": FORMAT, "version": VERSION, "world": int(world), "n": int(offsets[-1]),
            "offsets": [int(o) for o in offsets], "rows": [int(b - a) for a, b in zip(offsets[:-1], offsets[1:])],
            "shards": [shard_name(r, world) for r in range(world)],
            "dtype": template["config"].get("dtype"), "widths": [int(w) for w in widths],
            "arrays": template["arrays"], "meta": {"config": template["config"], "extract": template["extract"]}}


def write_manifest(path: str, manifest: dict, tag: str = "") -> None:
    """Write `path`/sharded.json atomically: a temp file in `path`, fsync, rename, fsync the directory."""
    text = json.dumps(manifest, indent=1, allow_nan=False) + "\n"
    final = os.path.join(path, MANIFEST)
    tmp = os.path.join(path, f".{MANIFEST}.{tag}{os.getpid()}.tmp")
    os.makedirs(path, exist_ok=True)
    try:
        _remove(tmp)  # a stale one (a killed writer with this pid), or a planted link: never write through it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path)


def extract_sharded(run: Callable[[DataLoader, str, dict], Extraction], loader, store, overwrite: bool,
                    group=None) -> Extraction:
    """The in-group branch of `pyfk.extract(..., store=DIR)` (see the module docstring); every rank
    of `group` (W > 1) calls it with the same loader length and settings.

    run(shard_loader, shard_path, shard) extracts `shard_loader` (this rank's rows) into the
    DescriptorStore at `shard_path`, resumably, with shard = {"rank", "world", "offset", "total"}
    kept in the store's settings and example ids (when the loader gives none) offset + row.
    Returns this rank's Extraction (its shard's memmaps) with meta["shard"] = {"rank", "world",
    "offset", "rows", "n", "offsets", "dir"}.
    """
    rank, world = rank_and_world(group)

    paths: list = []

    def setup():
        paths.append(check_store_target(store, "store"))
        n = check_shardable(loader, world)
        prepare_directory(paths[0], world, bool(overwrite))
        return n

    totals = collective(setup, group, gather=True)
    if len(set(totals)) != 1:
        raise ValueError(f"loader: every rank must pass the same dataset, but len(loader.dataset) differs across "
                         f"the ranks: {totals}")
    path, n = paths[0], totals[0]
    offsets = split_rows(n, world)
    start, stop = int(offsets[rank]), int(offsets[rank + 1])
    shard_path = os.path.join(path, shard_name(rank, world))
    shard = {"rank": rank, "world": world, "offset": start, "total": n}
    local = shard_loader(loader, start, stop)
    result: list = []

    def extract_local():
        if stop == start:
            return None
        result.append(run(local, shard_path, shard))
        return _summary(shard_path)

    summaries = collective(extract_local, group, gather=True)
    template = next(s for s in summaries if s is not None)  # n > 0: some rank has rows
    for q, s in enumerate(summaries):
        if s is None:
            continue
        for key in ("config", "arrays", "extract"):
            if s[key] != template[key]:
                raise ValueError(f"store: the shards of {path} disagree: {shard_name(q, world)} was written with "
                                 f"other {key} than the first ({_describe_difference(s[key], template[key])}); "
                                 "every rank must call pyfk.extract with the same model and settings")
    collective(lambda: None if stop > start else _make_empty_shard(shard_path, local, template, shard, overwrite),
               group)
    manifest = _build_manifest(world, offsets, template)
    collective(lambda: write_manifest(path, manifest, f"{rank}."), group)
    ext = result[0] if result else extraction_from_store(DescriptorStore.open(shard_path, "r"))
    ext.meta["shard"] = {"rank": rank, "world": world, "offset": start, "rows": stop - start, "n": n,
                         "offsets": [int(o) for o in offsets], "dir": path}
    return ext


# ----------------------------------------------------------------------------- reading

def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_dir(path, name: str = "path") -> str:
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{name}: expected a sharded store directory path (str or os.PathLike), got "
                        f"{type(path).__name__} {path!r:.80}")
    path = os.fsdecode(os.fspath(path))
    if not path:
        raise ValueError(f"{name}: expected a sharded store directory path, got an empty string")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"ShardedStore: {path}: no such directory (expected a sharded store: a directory holding "
                         f"{MANIFEST} and shard-RRRRR-of-WWWWW/ stores)") from None
    except OSError as exc:
        raise ValueError(f"ShardedStore: cannot read {path} ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"ShardedStore: {path} is not a directory (expected a sharded store directory holding "
                         f"{MANIFEST})")
    return path


def read_manifest(path: str) -> dict:
    """`path`/sharded.json, checked: format, version, world, rows and offsets, shard names, arrays."""
    file = os.path.join(path, MANIFEST)
    try:
        st = os.lstat(file)
    except FileNotFoundError:
        st = None
    if st is None:
        if os.path.lexists(os.path.join(path, STORE_MANIFEST)):
            hint = (f"it holds {STORE_MANIFEST}: a DescriptorStore written by one process, open it with "
                    "pyfk.DescriptorStore.open")
        elif _shard_dirs(path):
            hint = (f"it holds shard directories ({_shard_dirs(path)[0][0]}, ...) but the extraction did not finish: "
                    "rerun the same pyfk.extract(..., store=DIR) call on the same number of ranks to resume it")
        else:
            hint = "it is not a sharded store"
        raise ValueError(f"ShardedStore: {path} has no {MANIFEST} ({hint})")
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise ValueError(f"ShardedStore: {file} is not a regular file (a symbolic link or another kind of file); "
                         "pyfk does not read a manifest through links")

    def bad(what: str) -> ValueError:
        return ValueError(f"ShardedStore: {file} is not a valid sharded store manifest: {what}")

    try:
        fd = os.open(file, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        with os.fdopen(fd, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError, UnicodeError) as exc:
        raise bad(f"cannot be read as JSON ({exc})") from None
    if not isinstance(m, dict):
        raise bad(f"expected a JSON object, got {type(m).__name__}")
    missing = [k for k in ("format", "version", "world", "n", "offsets", "rows", "shards", "arrays", "meta")
               if k not in m]
    if missing:
        raise bad(f"missing keys {missing}")
    if m["format"] != FORMAT:
        raise bad(f"format is {m['format']!r}, expected {FORMAT!r}")
    if m["version"] != VERSION:
        raise bad(f"version {m['version']!r} is not supported (this pyfk reads version {VERSION})")
    world, n = m["world"], m["n"]
    if not (_is_int(world) and world >= 1 and _is_int(n) and n >= 0):
        raise bad(f"world {world!r} and n {n!r} must be integers >= 1 and >= 0")
    rows, offsets = m["rows"], m["offsets"]
    if (not isinstance(rows, list) or len(rows) != world or not all(_is_int(r) and r >= 0 for r in rows)
            or sum(rows) != n):
        raise bad(f"rows {rows!r:.200} must be {world} non-negative counts summing to n = {n}")
    if offsets != [int(o) for o in np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])]:
        raise bad(f"offsets {offsets!r:.200} must be the running sums of rows {rows!r:.200}")
    if m["shards"] != [shard_name(r, world) for r in range(world)]:
        raise bad(f"shards must be {[shard_name(r, world) for r in range(min(world, 3))]}..., got "
                  f"{m['shards']!r:.200}")
    arrays = m["arrays"]
    if not isinstance(arrays, dict) or not all(
            isinstance(s, dict) and isinstance(s.get("shape"), list) and isinstance(s.get("dtype"), str)
            for s in arrays.values()):
        raise bad("arrays must map names to {'shape': [...], 'dtype': '...'}")
    if not isinstance(m["meta"], dict):
        raise bad("meta must be an object")
    return m


class ConcatRows:
    """A read-only row concatenation of arrays with the same row shape and dtype (a sharded store's
    shards, in order), without copying them: `a[i]`, `a[start:stop]`, `a[rows]` (integer or boolean
    arrays) and `a[rows, cols]` return NumPy arrays of just the rows asked for -- views where they lie
    in one part, else a copy of those rows only. `np.asarray(a)` copies everything (explicitly).
    shape, dtype, ndim, len() as for the concatenated array.

    The engine reads pool arrays of this kind (`__pyfk_rows__`) by row blocks, one chunk at a time."""

    __pyfk_rows__ = True  # read by row blocks; never converted as a whole by the engine

    def __init__(self, parts):
        parts = list(parts)
        if not parts:
            raise ValueError("parts: expected at least one array")
        first = parts[0]
        for i, p in enumerate(parts):
            if getattr(p, "ndim", 0) < 1:
                raise ValueError(f"parts[{i}]: expected an array with rows, got {type(p).__name__}")
            if p.dtype != first.dtype or p.shape[1:] != first.shape[1:]:
                raise ValueError(f"parts[{i}]: expected rows of shape {tuple(first.shape[1:])} dtype {first.dtype} "
                                 f"like parts[0], got {tuple(p.shape[1:])} {p.dtype}")
        self._parts = parts
        self._offsets = np.concatenate([[0], np.cumsum([p.shape[0] for p in parts])]).astype(np.int64)
        self.dtype = first.dtype
        self.shape = (int(self._offsets[-1]), *(int(d) for d in first.shape[1:]))
        self.ndim = len(self.shape)

    @property
    def parts(self) -> tuple:
        return tuple(self._parts)

    @property
    def offsets(self) -> np.ndarray:
        """(parts + 1,) int64: part i holds rows [offsets[i], offsets[i+1])."""
        return self._offsets.copy()

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ConcatRows(shape={self.shape}, dtype={self.dtype}, parts={[p.shape[0] for p in self._parts]})"

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("ConcatRows: a concatenation of separate arrays cannot be viewed as one array "
                             "without a copy")
        out = np.concatenate(self._parts) if len(self._parts) > 1 else np.array(self._parts[0])
        return out if dtype is None else out.astype(dtype, copy=False)

    def _empty(self, count: int) -> np.ndarray:
        return np.empty((count, *self.shape[1:]), dtype=self.dtype)

    def _part_of(self, row: int) -> int:
        return int(np.searchsorted(self._offsets, row, side="right")) - 1

    def _span(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) (0 <= start <= stop <= n): a view inside one part, else one copy."""
        if stop <= start:
            return self._empty(0)
        first, last = self._part_of(start), self._part_of(stop - 1)
        o = self._offsets
        if first == last:
            return np.asarray(self._parts[first][start - o[first]:stop - o[first]])
        out = self._empty(stop - start)
        for i in range(first, last + 1):
            lo, hi = max(start, int(o[i])), min(stop, int(o[i + 1]))
            if hi > lo:
                out[lo - start:hi - start] = self._parts[i][lo - o[i]:hi - o[i]]
        return out

    def _gather(self, index: np.ndarray) -> np.ndarray:
        """Rows at the int64 positions `index` (any shape, in range), in that order."""
        flat = index.reshape(-1)
        if flat.size and (np.diff(flat) == 1).all():  # consecutive rows
            out = self._span(int(flat[0]), int(flat[-1]) + 1)
        else:
            out = self._empty(flat.size)
            which = np.searchsorted(self._offsets, flat, side="right") - 1
            for i in np.unique(which):
                sel = which == i
                out[sel] = self._parts[i][flat[sel] - self._offsets[i]]
        return out.reshape(*index.shape, *self.shape[1:])

    def _rows(self, key):
        n = self.shape[0]
        if _is_int(key):
            row = int(key)
            if not -n <= row < n:
                raise IndexError(f"index {row} is out of bounds for axis 0 with size {n}")
            row %= n
            i = self._part_of(row)
            return np.asarray(self._parts[i][row - self._offsets[i]])
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._span(start, max(start, stop))
            return self._gather(np.arange(start, stop, step, dtype=np.int64))
        if key is Ellipsis:
            return self._span(0, n)
        if key is None:
            raise IndexError("ConcatRows: np.newaxis is not supported; index rows, then reshape the result")
        if hasattr(key, "detach") and hasattr(key, "cpu"):  # a torch tensor, without importing torch
            key = key.detach().cpu().numpy()
        index = np.asarray(key)
        if index.dtype == np.bool_:
            if index.shape != (n,):
                raise IndexError(f"boolean index has shape {index.shape}, expected ({n},) for the rows")
            return self._gather(np.flatnonzero(index).astype(np.int64))
        if index.size == 0:
            return self._empty(0).reshape(*index.shape, *self.shape[1:])
        if index.dtype.kind not in "iu":
            raise IndexError(f"ConcatRows: rows must be an int, a slice or an integer or boolean array, got "
                             f"{type(key).__name__} of dtype {index.dtype}")
        bad = (index >= n) | (index < -n)
        if bad.any():
            raise IndexError(f"index {int(index[bad].reshape(-1)[0])} is out of bounds for axis 0 with size {n}")
        index = index.astype(np.int64)
        return self._gather(np.where(index < 0, index + n, index))

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if not key:
                return self._span(0, self.shape[0])
            first, rest = key[0], key[1:]
            if not (_is_int(first) or isinstance(first, slice)) and not all(
                    _is_int(k) or isinstance(k, slice) for k in rest):
                raise IndexError("ConcatRows: an array of rows combines with column slices or integers only; "
                                 "index the rows first, then the result")
            rows = self._rows(first)
            if not rest:
                return rows
            if _is_int(first):
                return rows[rest]
            return rows[(slice(None), *rest)]
        return self._rows(key)

    def __setitem__(self, key, value):
        raise TypeError("ConcatRows is read-only")


def concat_rows(parts):
    """The parts as one row array: the part itself when only one holds rows, else a ConcatRows."""
    parts = list(parts)
    nonempty = [p for p in parts if p.shape[0] > 0]
    if len(nonempty) == 1:
        return nonempty[0]
    if not nonempty:
        return parts[0]
    return ConcatRows(nonempty)


class ShardedStore:
    """The shards of a sharded extraction (see the module docstring), opened read-only.

        pool = ShardedStore.open("pool_dir/")           # outside a group: every shard, one pool
        scores, index = pyfk.topk(val, pool, k=32)     # global indices, shard order
        local = ShardedStore.open("pool_dir/")          # inside a group of W ranks: this rank's shard
        s, i = pyfk.distributed.topk(val, local.local(), k=32)   # global = local.offset + row

    Attributes: path, world, n (all rows), offsets ((world + 1,) int64), sizes (rows per shard),
    rank (this rank in a group, None when every shard is open), names (arrays), widths, dtype,
    meta (the extraction settings and meta).
    """

    def __init__(self, path: str, manifest: dict, shards: dict, rank: int | None):
        # internal: use open()
        self._path = path
        self._manifest = manifest
        self._shards = shards  # rank -> DescriptorStore (all of them, or this rank's)
        self._rank = rank

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path, *, group=None, local: bool | None = None) -> ShardedStore:
        """Open the sharded store at `path`.

        local=None (default): inside an initialised process group of W > 1 ranks (`group`, default
        the world), open this rank's shard only -- collective: every rank calls it, and an error on
        one (its shard missing, incomplete, ...) raises on every rank; the store must have been
        written by W ranks. Otherwise open every shard and read them as one pool. local=False opens
        every shard even inside a group (e.g. on one rank of a shared file system; no collective).
        Raises ValueError naming the path and what was expected.
        """
        path = _check_dir(path)
        if local is not None and not isinstance(local, bool):
            raise TypeError(f"local: expected None, True or False, got {type(local).__name__} {local!r:.80}")
        rank, world = rank_and_world(group) if local is not False else (0, 1)
        if local is None:
            local = world > 1
        if local and world == 1:
            raise ValueError("local: True needs an initialised process group of more than one rank (this process "
                             "is not in one); open the store without local= to read every shard as one pool")
        if not local:
            manifest = read_manifest(path)
            shards = {}
            try:
                for r in range(manifest["world"]):
                    shards[r] = _open_shard(path, manifest, r)
            except BaseException:
                for s in shards.values():
                    s.close()
                raise
            return cls(path, manifest, shards, None)

        opened: list = []

        def open_local():
            manifest = read_manifest(path)
            if manifest["world"] != world:
                raise ValueError(f"ShardedStore: {path} was written by {manifest['world']} ranks ({MANIFEST}), but "
                                 f"this process group has {world}: open it in a group of {manifest['world']} "
                                 "ranks, or with local=False (or outside a group) to read every shard as one pool")
            opened.append(_open_shard(path, manifest, rank))
            return manifest

        try:
            manifest = collective(open_local, group)
        except BaseException:
            for s in opened:  # another rank failed: this rank raises too, holding nothing open
                s.close()
            raise
        return cls(path, manifest, {rank: opened[0]}, rank)

    # ------------------------------------------------------------------ what it holds
    @property
    def path(self) -> str:
        return self._path

    @property
    def world(self) -> int:
        return int(self._manifest["world"])

    @property
    def n(self) -> int:
        return int(self._manifest["n"])

    @property
    def offsets(self) -> np.ndarray:
        return np.asarray(self._manifest["offsets"], dtype=np.int64)

    @property
    def sizes(self) -> list[int]:
        return list(self._manifest["rows"])

    @property
    def rank(self) -> int | None:
        return self._rank

    @property
    def names(self) -> list[str]:
        return list(self._manifest["arrays"])

    @property
    def widths(self) -> list[int]:
        return list(self._manifest.get("widths") or [])

    @property
    def dtype(self) -> str | None:
        return self._manifest.get("dtype")

    @property
    def meta(self) -> dict:
        return json.loads(json.dumps(self._manifest["meta"]))

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        where = "every shard" if self._rank is None else f"rank {self._rank}'s shard"
        return (f"ShardedStore(path={self._path!r}, world={self.world}, n={self.n}, sizes={self.sizes}, "
                f"open={where}, arrays={self.names})")

    def _require(self, whole: bool, what: str) -> None:
        if self._shards is None:
            raise ValueError(f"{what}: the sharded store at {self._path} is closed")
        if whole and self._rank is not None:
            raise ValueError(f"{what}: the sharded store at {self._path} is open on rank {self._rank} of "
                             f"{self.world}, with this rank's shard only: pass .local() (rows offset + i of the "
                             "pool) to pyfk.distributed.topk/select/acquire, or open it outside a process group "
                             "(or with local=False) to read every shard as one pool")
        if not whole and self._rank is None:
            raise ValueError(f"{what}: the sharded store at {self._path} is open as one pool (outside a process "
                             "group or with local=False); use shard(r), rows(), descriptors() or pass the store "
                             "itself where a pool is taken")

    # ------------------------------------------------------------------ inside a group
    def local(self) -> DescriptorStore:
        """This rank's shard (opened inside a group): the local pool for pyfk.distributed.*."""
        self._require(False, "local")
        return self._shards[self._rank]

    @property
    def offset(self) -> int:
        """The global index of this rank's first row (opened inside a group)."""
        self._require(False, "offset")
        return int(self._manifest["offsets"][self._rank])

    # ------------------------------------------------------------------ as one pool
    def shard(self, rank: int) -> DescriptorStore:
        """Shard `rank` (rows offsets[rank] + i); inside a group only this rank's is open."""
        if self._shards is None:
            raise ValueError(f"shard: the sharded store at {self._path} is closed")
        if not _is_int(rank) or rank not in self._shards:
            open_ = sorted(self._shards)
            raise ValueError(f"rank: expected one of the open shards {open_ if len(open_) < 8 else '0..W-1'}, "
                             f"got {rank!r}")
        return self._shards[int(rank)]

    def rows(self, name: str):
        """Array `name` over every shard, in shard order (n rows): a ConcatRows (no copy; np.asarray copies)."""
        self._require(True, "rows")
        if name not in self._manifest["arrays"]:
            raise KeyError(f"array {name!r} is not in the sharded store at {self._path} (it holds {self.names})")
        return concat_rows([self._shards[r].rows(name) for r in range(self.world)])

    def descriptors(self, z_prefix: str = "z", g_prefix: str | None = "g", *, same_widths: bool = True) -> Descriptors:
        """Descriptors over every shard's rows in shard order (see DescriptorStore.descriptors for the
        prefixes): the z/g arrays are ConcatRows of the shards' memmaps, read a chunk at a time."""
        self._require(True, "descriptors")
        per = [self._shards[r].descriptors(z_prefix=z_prefix, g_prefix=g_prefix, same_widths=same_widths)
               for r in range(self.world)]
        z = [concat_rows([d.z[j] for d in per]) for j in range(per[0].num_scales)]
        g = None if per[0].g is None else [concat_rows([d.g[j] for d in per]) for j in range(per[0].num_scales)]
        return Descriptors(z, g, same_widths=same_widths)

    def to_descriptors(self) -> Descriptors:
        """What pyfk.topk / select / acquire read when given the store: every shard's z/g rows as one pool."""
        return self.descriptors()

    def close(self) -> None:
        """Drop the shards' memory maps."""
        shards, self._shards = self._shards, None
        for s in (shards or {}).values():
            s.close()

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_shard(path: str, manifest: dict, rank: int) -> DescriptorStore:
    """Shard `rank` of the manifest, read-only, checked against it: present, complete, its rows,
    its arrays' row shapes and dtypes (widths), and its settings."""
    world = manifest["world"]
    shard_dir = os.path.join(path, manifest["shards"][rank])
    rows = manifest["rows"][rank]
    where = f"ShardedStore: shard {rank} of {world} ({shard_dir})"
    if not os.path.lexists(shard_dir):
        raise ValueError(f"{where} is missing; {os.path.join(path, MANIFEST)} lists it with {rows} rows")
    try:
        store = DescriptorStore.open(shard_dir, "r")
    except FileNotFoundError as exc:
        raise ValueError(f"{where} is not a store ({exc}); {MANIFEST} lists it with {rows} rows") from None
    try:
        if not store.complete:
            raise ValueError(f"{where} is incomplete: {store.rows_done} of {store.n} rows are committed; rerun the "
                             "extraction on the same number of ranks to finish it")
        if store.n != rows:
            raise ValueError(f"{where} holds {store.n} rows, but {MANIFEST} expects {rows}")
        want = manifest["arrays"]
        have = {name: {"shape": [int(d) for d in store.array(name).shape[1:]], "dtype": store.array(name).dtype.name}
                for name in store.names}
        if have != want:
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            differ = [f"{k} has rows of shape {tuple(have[k]['shape'])} {have[k]['dtype']}, expected "
                      f"{tuple(want[k]['shape'])} {want[k]['dtype']}"
                      for k in sorted(set(want) & set(have)) if have[k] != want[k]]
            what = "; ".join(differ + ([f"arrays {missing} are missing"] if missing else [])
                             + ([f"arrays {extra} are not in {MANIFEST}"] if extra else []))
            raise ValueError(f"{where} does not match {MANIFEST} (widths or arrays differ across the shards): {what}")
        config = store.meta.get("config")
        want_config = manifest["meta"].get("config")
        if config is not None and want_config is not None:
            shard = config.get("shard")
            expected = {"rank": rank, "world": world, "offset": manifest["offsets"][rank], "total": manifest["n"]}
            if shard is not None and shard != expected:
                raise ValueError(f"{where} was written as {shard}, expected {expected}")
            config = {k: v for k, v in config.items() if k != "shard"}
            if config != want_config:
                raise ValueError(f"{where} was written with other settings than {MANIFEST} records "
                                 f"({_describe_difference(config, want_config)})")
    except BaseException:
        store.close()
        raise
    return store
