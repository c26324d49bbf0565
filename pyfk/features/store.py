"""On-disk, memory-mapped, resumable descriptor store for pools larger than RAM.

A store is a directory holding ``manifest.json`` and one ``.npy`` file per array:

    {"format": "pyfk-store", "version": 1, "n": 1281167, "rows_done": 40960, "complete": false,
     "arrays": {"z0": {"file": "z0.npy", "shape": [1281167, 64], "dtype": "float16"}, ...},
     "meta": {"model": "resnet50", ...}}

Every array is preallocated at its full size (n rows) when the store is created.
A writer fills rows in batches with `DescriptorStore.write` and records progress
with `DescriptorStore.commit`, which flushes the arrays and then atomically replaces
the manifest; rows at or beyond ``rows_done`` are ignored by readers and rewritten
on resume, so a batch is either fully recorded or not at all.

    store = DescriptorStore.create("pool.pfk", n, {"z0": ((64,), "float16"), "g0": ((64,), "float16"),
                                                   "labels": ((), "int64")})
    for start, batch in batches(from_row=store.rows_done):
        store.write(start, batch)             # {"z0": (b, 64), "g0": (b, 64), "labels": (b,)}
        store.commit(start + len(batch["z0"]))
    pool = DescriptorStore.open("pool.pfk").descriptors()  # memmap views, no copy
    scores, index = pyfk.topk(queries, pool, k=32)

float16 storage is the suggested default for descriptors (the kernels read it
directly, at half the disk and page-cache footprint); float32 on request.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from numpy.lib import format as npy_format

from pyfk.engine.descriptors import Descriptors

FORMAT = "pyfk-store"
VERSION = 1
MANIFEST = "manifest.json"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KINDS = "biuf"  # bool, signed/unsigned integers, floats
_REQUIRED = ("format", "version", "n", "rows_done", "complete", "arrays")
_WRITABLE = ("r+", "w+")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"arrays: array names must be simple identifiers ([A-Za-z_][A-Za-z0-9_]*), got {name!r}")
    return name


def _check_dtype(dtype, what: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{what}: not a NumPy dtype: {dtype!r} ({exc})") from None
    if dt.kind not in _KINDS or dt.fields is not None or dt.subdtype is not None:
        raise TypeError(f"{what}: expected a bool, integer or float dtype, got {dt}")
    if not dt.isnative:
        raise TypeError(f"{what}: expected native byte order, got {dt.str}")
    return dt


def _check_tail(tail, what: str) -> tuple[int, ...]:
    if _is_int(tail):
        tail = (tail,)
    try:
        tail = tuple(tail)
    except TypeError:
        raise TypeError(f"{what}: expected a shape tuple (the dimensions after the row), got {tail!r}") from None
    if not all(_is_int(d) and d >= 0 for d in tail):
        raise ValueError(f"{what}: expected non-negative integer dimensions, got {tail!r}")
    return tuple(int(d) for d in tail)


def _as_numpy(value) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _check_meta(meta) -> dict:
    """A JSON round-tripped copy of `meta` (a dict of JSON-serialisable values)."""
    if not isinstance(meta, dict):
        raise TypeError(f"meta: expected a dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"meta: must be JSON-serialisable ({exc})") from None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_header(file: str):
    """(shape, fortran_order, dtype, data_offset) of a .npy file, without reading its data."""
    with open(file, "rb") as f:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f)
        else:
            raise ValueError(f".npy format version {version} is not supported")
        return shape, fortran, dtype, f.tell()


class DescriptorStore:
    """A directory of memory-mapped arrays with a manifest; see the module docstring.

    Use `DescriptorStore.create` (new store, opened for writing) or
    `DescriptorStore.open` (existing store, "r" read-only or "r+" to resume).
    """

    def __init__(self, path, manifest: dict, arrays: dict, mode: str):
        # internal: use create() / open()
        self._path = os.fspath(path)
        self._manifest = manifest
        self._arrays = arrays
        self._mode = mode

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(cls, path, n: int, arrays: dict, meta: dict | None = None, overwrite: bool = False) -> DescriptorStore:
        """Create a store of `n` rows and open it for writing (mode "w+").

        Args:
            path: the store directory (created if missing).
            n: number of rows (pool size), >= 0.
            arrays: name -> (shape_tail, dtype), e.g. {"z0": ((64,), "float16"), "labels": ((), "int64")};
                each array gets shape (n, *shape_tail). Names are simple identifiers.
            meta: free JSON-serialisable dict kept in the manifest.
            overwrite: replace an existing store at `path` (otherwise FileExistsError).
        """
        path = os.fspath(path)
        if not _is_int(n) or n < 0:
            raise ValueError(f"n: expected a non-negative integer row count, got {n!r}")
        n = int(n)
        if not isinstance(arrays, dict) or not arrays:
            raise ValueError(f"arrays: expected a non-empty dict name -> (shape_tail, dtype), got {arrays!r}")
        meta = _check_meta({} if meta is None else meta)
        specs = {}
        for name, spec in arrays.items():
            _check_name(name)
            try:
                tail, dtype = spec
            except (TypeError, ValueError):
                raise ValueError(f"arrays[{name!r}]: expected (shape_tail, dtype), got {spec!r}") from None
            tail = _check_tail(tail, f"arrays[{name!r}] shape")
            dt = _check_dtype(dtype, f"arrays[{name!r}] dtype")
            specs[name] = {"file": f"{name}.npy", "shape": [n, *tail], "dtype": dt.name}

        manifest_file = os.path.join(path, MANIFEST)
        if os.path.exists(manifest_file):
            if not overwrite:
                raise FileExistsError(f"{path}: a store already exists here (found {MANIFEST}); "
                                      "pass overwrite=True to replace it")
            old_files = []
            try:
                with open(manifest_file, encoding="utf-8") as f:
                    old = json.load(f)
                old_files = [a["file"] for a in old["arrays"].values()]
            except Exception:  # an unreadable old manifest: just replace it
                old_files = []
            os.remove(manifest_file)  # from here on the directory is not a store until the new manifest lands
            new_files = {s["file"] for s in specs.values()}
            for file in old_files:
                if (isinstance(file, str) and file not in new_files and os.path.basename(file) == file
                        and file.endswith(".npy")):
                    try:
                        os.remove(os.path.join(path, file))
                    except FileNotFoundError:
                        pass
        os.makedirs(path, exist_ok=True)

        mms = {}
        for name, spec in specs.items():
            mms[name] = npy_format.open_memmap(os.path.join(path, spec["file"]), mode="w+",
                                               dtype=np.dtype(spec["dtype"]), shape=tuple(spec["shape"]))
        manifest = {"format": FORMAT, "version": VERSION, "n": n, "rows_done": 0, "complete": n == 0,
                    "arrays": specs, "meta": meta}
        store = cls(path, manifest, mms, "w+")
        for mm in mms.values():
            mm.flush()
        store._write_manifest(manifest)
        return store

    @classmethod
    def open(cls, path, mode: str = "r") -> DescriptorStore:
        """Open an existing store: mode "r" (read-only memmaps) or "r+" (append / resume).

        The manifest and every array file are validated (format, version, keys,
        file presence, header shape and dtype); any mismatch raises ValueError naming
        the manifest or the array. A directory without a manifest raises FileNotFoundError.
        """
        path = os.fspath(path)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode: expected 'r' or 'r+', got {mode!r}")
        manifest_file = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_file):
            raise FileNotFoundError(f"{path}: not a pyfk store ({MANIFEST} not found)")
        manifest = cls._read_manifest(manifest_file)
        arrays = {}
        for name, spec in manifest["arrays"].items():
            arrays[name] = cls._open_array(path, name, spec, mode)
        return cls(path, manifest, arrays, mode)

    @staticmethod
    def _read_manifest(manifest_file: str) -> dict:
        def bad(what):
            return ValueError(f"{manifest_file}: {what}")

        try:
            with open(manifest_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise bad(f"not valid UTF-8 text ({exc})") from None
        try:
            m = json.loads(text)
        except json.JSONDecodeError as exc:
            raise bad(f"not valid JSON, the file may be truncated or corrupted ({exc})") from None
        if not isinstance(m, dict):
            raise bad(f"expected a JSON object, got {type(m).__name__}")
        missing = [k for k in _REQUIRED if k not in m]
        if missing:
            raise bad(f"missing key(s) {missing}")
        if m["format"] != FORMAT:
            raise bad(f"format is {m['format']!r}, expected {FORMAT!r}")
        if not _is_int(m["version"]) or m["version"] != VERSION:
            raise bad(f"version is {m['version']!r}, this pyfk reads version {VERSION}")
        n, rows_done = m["n"], m["rows_done"]
        if not _is_int(n) or n < 0:
            raise bad(f"n is {n!r}, expected a non-negative integer")
        if not _is_int(rows_done) or not 0 <= rows_done <= n:
            raise bad(f"rows_done is {rows_done!r}, expected an integer in [0, n={n}]")
        if not isinstance(m["complete"], bool):
            raise bad(f"complete is {m['complete']!r}, expected true or false")
        if m["complete"] and rows_done != n:
            raise bad(f"complete is true but rows_done={rows_done} != n={n}")
        meta = m.setdefault("meta", {})
        if not isinstance(meta, dict):
            raise bad(f"meta is {type(meta).__name__}, expected an object")
        arrays = m["arrays"]
        if not isinstance(arrays, dict) or not arrays:
            raise bad("arrays is empty or not an object")
        for name, spec in arrays.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise bad(f"array name {name!r} is not a simple identifier")
            if not isinstance(spec, dict) or any(k not in spec for k in ("file", "shape", "dtype")):
                raise bad(f"arrays[{name!r}] must be an object with keys 'file', 'shape', 'dtype', got {spec!r}")
            file, shape, dtype = spec["file"], spec["shape"], spec["dtype"]
            if (not isinstance(file, str) or not file or os.path.basename(file) != file
                    or file in (".", "..") or file == MANIFEST):
                raise bad(f"arrays[{name!r}].file is {file!r}, expected a plain file name in the store directory")
            if (not isinstance(shape, list) or not shape or not all(_is_int(d) and d >= 0 for d in shape)):
                raise bad(f"arrays[{name!r}].shape is {shape!r}, expected a list of non-negative integers")
            if shape[0] != n:
                raise bad(f"arrays[{name!r}].shape is {shape} but n is {n}; the first dimension must be n")
            try:
                _check_dtype(dtype, "")
            except TypeError:
                raise bad(f"arrays[{name!r}].dtype is {dtype!r}, expected a bool, integer or float dtype name") \
                    from None
        return m

    @staticmethod
    def _open_array(path: str, name: str, spec: dict, mode: str):
        file = os.path.join(path, spec["file"])
        want_shape, want_dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
        says = f"the manifest says shape {want_shape} dtype {want_dtype}"
        if not os.path.isfile(file):
            raise ValueError(f"array {name!r}: file {file} is missing ({says})")
        try:
            shape, fortran, dtype, offset = _read_header(file)
        except (ValueError, OSError, SyntaxError, EOFError) as exc:
            raise ValueError(f"array {name!r}: {file} is not a readable .npy file ({exc}); {says}") from None
        if tuple(shape) != want_shape or dtype != want_dtype:
            raise ValueError(f"array {name!r}: {says}, but {file} holds shape {tuple(shape)} dtype {dtype}")
        if fortran:
            raise ValueError(f"array {name!r}: {file} is stored in Fortran order; a store holds C-order arrays")
        need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = os.path.getsize(file)
        if size < need:
            raise ValueError(f"array {name!r}: {file} is truncated ({size} bytes, its header needs {need}); {says}")
        return np.load(file, mmap_mode=mode, allow_pickle=False)

    # ------------------------------------------------------------------ writing
    def _require_writable(self, what: str) -> None:
        if self._mode not in _WRITABLE:
            raise ValueError(f"{what}: the store at {self._path} is open read-only (mode {self._mode!r}); "
                             "open it with mode='r+'")
        if self._arrays is None:
            raise ValueError(f"{what}: the store at {self._path} is closed")

    def write(self, start: int, batch: dict) -> int:
        """Write rows [start, start + b) of every array; returns start + b.

        `batch` maps every array name of the store to an array (b, *shape_tail)
        (NumPy, torch or anything np.asarray takes), cast to the store dtype.
        Rows are not visible to readers until `commit`. Committed rows
        (< rows_done) cannot be rewritten. All checks run before anything is written.
        """
        self._require_writable("write")
        if not _is_int(start):
            raise TypeError(f"start: expected an integer row index, got {start!r}")
        start = int(start)
        if not isinstance(batch, dict):
            raise TypeError(f"batch: expected a dict name -> array, got {type(batch).__name__}")
        missing = [name for name in self._arrays if name not in batch]
        extra = [name for name in batch if name not in self._arrays]
        if missing:
            raise ValueError(f"batch: missing array(s) {missing}; every array of the store ({self.names}) "
                             "must be written together")
        if extra:
            raise ValueError(f"batch: unknown array(s) {extra}; the store holds {self.names}")
        converted, rows = {}, None
        for name, mm in self._arrays.items():
            a = _as_numpy(batch[name])
            tail = mm.shape[1:]
            if a.ndim != len(tail) + 1 or a.shape[1:] != tail:
                want = "(rows" + "".join(f", {d}" for d in tail) + ")"
                raise ValueError(f"batch[{name!r}]: expected shape {want}, got {a.shape}")
            if rows is None:
                rows = a.shape[0]
            elif a.shape[0] != rows:
                raise ValueError(f"batch[{name!r}]: has {a.shape[0]} rows, expected {rows} like the other arrays")
            converted[name] = self._cast(name, a, mm.dtype)
        n, done = self.n, self.rows_done
        if start < done:
            raise ValueError(f"write: start={start} is below rows_done={done}; committed rows cannot be rewritten")
        if start + rows > n:
            raise ValueError(f"write: rows [{start}, {start + rows}) go past the end of the store (n={n})")
        for name, a in converted.items():
            self._arrays[name][start:start + rows] = a
        return start + rows

    @staticmethod
    def _cast(name: str, a: np.ndarray, dtype: np.dtype) -> np.ndarray:
        if a.dtype == dtype:
            return a
        if a.dtype.kind not in _KINDS or not np.can_cast(a.dtype, dtype, casting="same_kind"):
            raise TypeError(f"batch[{name!r}]: cannot store dtype {a.dtype} in a {dtype} array")
        if dtype.kind in "iu" and a.size and not np.can_cast(a.dtype, dtype, casting="safe"):
            info = np.iinfo(dtype)
            lo, hi = a.min(), a.max()
            if lo < info.min or hi > info.max:
                raise ValueError(f"batch[{name!r}]: values in [{lo}, {hi}] do not fit {dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            out = a.astype(dtype)
            overflow = (dtype.kind == "f" and out.size and not np.isfinite(out.sum(dtype=np.float64))
                        and bool((~np.isfinite(out) & np.isfinite(a)).any()))
        if overflow:
            raise ValueError(f"batch[{name!r}]: values overflow {dtype} (max {np.finfo(dtype).max:g}); "
                             "rescale them or store float32")
        return out

    def commit(self, rows_done: int, meta: dict | None = None) -> None:
        """Record that rows [0, rows_done) are written: flush every array, then
        atomically replace the manifest. `complete` becomes true at rows_done == n.
        `meta`, if given, replaces the manifest's meta dict in the same step.
        """
        self._require_writable("commit")
        if not _is_int(rows_done):
            raise TypeError(f"rows_done: expected an integer, got {rows_done!r}")
        rows_done = int(rows_done)
        if rows_done < self.rows_done:
            raise ValueError(f"commit: rows_done can only grow; the store has {self.rows_done}, got {rows_done}")
        if rows_done > self.n:
            raise ValueError(f"commit: rows_done={rows_done} is past the end of the store (n={self.n})")
        if meta is not None:
            meta = _check_meta(meta)
        for mm in self._arrays.values():
            mm.flush()
        manifest = dict(self._manifest, rows_done=rows_done, complete=rows_done == self.n)
        if meta is not None:
            manifest["meta"] = meta
        self._write_manifest(manifest)

    def finalize(self) -> None:
        """Mark the store complete; requires every row committed (rows_done == n)."""
        self._require_writable("finalize")
        if self.rows_done != self.n:
            raise ValueError(f"finalize: only {self.rows_done} of {self.n} rows are committed")
        if not self.complete:
            self.commit(self.n)

    def _write_manifest(self, manifest: dict) -> None:
        """Write to a temp file in the store directory, fsync, then os.replace (atomic)."""
        text = json.dumps(manifest, indent=1, allow_nan=False) + "\n"
        final = os.path.join(self._path, MANIFEST)
        tmp = os.path.join(self._path, f".{MANIFEST}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
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
        _fsync_dir(self._path)
        self._manifest = manifest  # only once the new manifest is in place

    def close(self) -> None:
        """Flush (if writable) and drop the memory maps. Does not commit."""
        if self._arrays is not None:
            if self._mode in _WRITABLE:
                for mm in self._arrays.values():
                    mm.flush()
            self._arrays = None

    def __enter__(self) -> DescriptorStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    @property
    def path(self) -> str:
        return self._path

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def n(self) -> int:
        return int(self._manifest["n"])

    @property
    def rows_done(self) -> int:
        return int(self._manifest["rows_done"])

    @property
    def complete(self) -> bool:
        return bool(self._manifest["complete"])

    @property
    def meta(self) -> dict:
        """A copy of the manifest's meta dict (update it with `commit(..., meta=...)`)."""
        return json.loads(json.dumps(self._manifest["meta"]))

    @property
    def names(self) -> list[str]:
        return list(self._manifest["arrays"])

    def _get(self, name: str):
        if self._arrays is None:
            raise ValueError(f"the store at {self._path} is closed")
        if name not in self._arrays:
            raise KeyError(f"array {name!r} is not in the store at {self._path} (it holds {self.names})")
        return self._arrays[name]

    def array(self, name: str) -> np.memmap:
        """The full (n, ...) memmap of `name`; rows at or beyond rows_done are not committed."""
        return self._get(name)

    def rows(self, name: str) -> np.memmap:
        """The committed rows of `name`: a view of its first rows_done rows (no copy)."""
        return self._get(name)[:self.rows_done]

    def to_descriptors(self) -> Descriptors:
        """What pyfk.topk / select / acquire read when given a store: its committed z/g rows."""
        return self.descriptors()

    def descriptors(self, rows="done", z_prefix: str = "z", g_prefix: str | None = "g", *,
                    same_widths: bool = True) -> Descriptors:
        """A `pyfk.Descriptors` over the committed rows (memmap views, no copy).

        Scales are the arrays {z_prefix}0, {z_prefix}1, ... and, if present,
        {g_prefix}0, ... (same count); g_prefix=None leaves g out.
        rows: "done" (the first rows_done rows) or an int count <= rows_done.
        same_widths=False allows g widths that differ from z (BADGE factors).
        """
        if isinstance(rows, str) and rows == "done":
            count = self.rows_done
        elif _is_int(rows) and 0 <= rows <= self.rows_done:
            count = int(rows)
        else:
            raise ValueError(f"rows: expected 'done' or an integer in [0, rows_done={self.rows_done}], got {rows!r}")
        z = self._scales(z_prefix)
        if not z:
            raise ValueError(f"descriptors: the store at {self._path} has no array {z_prefix}0 "
                             f"(it holds {self.names})")
        g = self._scales(g_prefix) if g_prefix is not None else []
        if g and len(g) != len(z):
            raise ValueError(f"descriptors: {len(z)} scales of {z_prefix!r} ({z}) but {len(g)} of {g_prefix!r} ({g})")
        for name in z + g:
            spec = self._manifest["arrays"][name]
            if len(spec["shape"]) != 2 or np.dtype(spec["dtype"]).kind != "f":
                raise ValueError(f"descriptors: array {name!r} has shape {tuple(spec['shape'])} dtype "
                                 f"{spec['dtype']}; descriptor arrays must be 2-D float (n, L)")
        zs = [self._get(name)[:count] for name in z]
        gs = [self._get(name)[:count] for name in g] if g else None
        return Descriptors(zs, gs, same_widths=same_widths)

    def _scales(self, prefix: str) -> list[str]:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a string, got {prefix!r}")
        found = {}
        pattern = re.compile(re.escape(prefix) + r"(0|[1-9][0-9]*)\Z")
        for name in self.names:
            m = pattern.match(name)
            if m:
                found[int(m.group(1))] = name
        if not found:
            return []
        if sorted(found) != list(range(len(found))):
            raise ValueError(f"descriptors: arrays {sorted(found.values())} do not number scales 0..S-1 "
                             f"without gaps")
        return [found[j] for j in range(len(found))]

    def __len__(self) -> int:
        return self.rows_done

    def __repr__(self) -> str:
        arrays = ", ".join(f"{k}: {tuple(v['shape'])} {v['dtype']}" for k, v in self._manifest["arrays"].items())
        return (f"DescriptorStore(path={self._path!r}, n={self.n}, rows_done={self.rows_done}, "
                f"complete={self.complete}, mode={self._mode!r}, arrays={{{arrays}}})")
