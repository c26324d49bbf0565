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

Safety (DESIGN.md section 7):
- Space: `create` reserves every array file at its full size (posix_fallocate, or
  zeros where that is unsupported) after checking the free space, so a full disk
  is a clear OSError ("store at PATH needs N, M free") before any row is written,
  never a SIGBUS from a memory-mapped write into a sparse file. `open(mode="r+")`
  reserves any holes left by an older pyfk before resuming.
- One writer: `create` and `open(mode="r+")` take an exclusive lock (flock on
  ``.pyfk.lock`` in the store, holding the pid and host) until `close`; a second
  writer gets `StoreLockedError` naming the holder. The OS drops the lock when the
  process dies. Readers (mode "r") take no lock and never write.
- Symlinks: store files (manifest, arrays, lock) that are symbolic links are
  refused, never read or written through; `overwrite=True` removes such a link,
  never its target. `create` refuses a directory holding files that are not a
  store's (naming them) unless `overwrite=True`.
- The manifest is checked on open: every array has its own plain ``.npy`` file in
  the store directory (no shared files, no hard links, no paths that leave it), and
  no scale array file on disk (``g1.npy`` next to ``g0``) is missing from it.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
import tokenize

import numpy as np
from numpy.lib import format as npy_format

from pyfk.engine.descriptors import Descriptors
from pyfk.fileio import fsync_dir

try:
    import fcntl
except ImportError:  # not POSIX: no advisory lock (single-writer use is then the caller's duty)
    fcntl = None

FORMAT = "pyfk-store"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".pyfk.lock"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KINDS = "biuf"  # bool, signed/unsigned integers, floats
_REQUIRED = ("format", "version", "n", "rows_done", "complete", "arrays")
_WRITABLE = ("r+", "w+")
_TMP = re.compile(r"\.manifest\.json\.[0-9]+\.tmp\Z")  # a manifest being written (left over after a kill)
_ARRAY_FILE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.npy\Z")
_SCALE = re.compile(r"(.*?)([0-9]+)\Z")
# what numpy's .npy header reader raises on a corrupt header (it parses the header with
# ast.literal_eval, after tokenize-based filtering for old headers): never let these escape
_HEADER_ERRORS = (ValueError, OSError, SyntaxError, EOFError, TypeError, KeyError, tokenize.TokenError,
                  OverflowError, MemoryError, RecursionError)
_MAX_BYTES = sys.maxsize  # the largest array (in bytes) NumPy can map
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class StoreLockedError(RuntimeError):
    """Another writer holds the store's lock (see `DescriptorStore.create` / `open(mode="r+")`)."""


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_path(path, name: str = "path") -> str:
    """A store directory path as a str: TypeError naming `name` for anything but a str or an
    os.PathLike (bytes paths are decoded), ValueError for an empty one."""
    if isinstance(path, (str, bytes, os.PathLike)):
        try:
            path = os.fsdecode(os.fspath(path))
        except (TypeError, ValueError, UnicodeError) as exc:
            raise TypeError(f"{name}: expected a directory path (str or os.PathLike), got {path!r} ({exc})") from None
        if not path:
            raise ValueError(f"{name}: expected a store directory path, got an empty string")
        if "\x00" in path:
            raise ValueError(f"{name}: expected a store directory path, got {path!r} (a NUL character)")
        return path
    raise TypeError(f"{name}: expected a store directory path (str or os.PathLike), got {type(path).__name__} "
                    f"{path!r}")


def _nbytes(shape, itemsize: int) -> int:
    """Exact byte size of an array (Python ints: no int64 wrap-around)."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def _check_name(name) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"arrays: array names must be simple identifiers ([A-Za-z_][A-Za-z0-9_]*), got {name!r}")
    return name


def _check_dtype(dtype, what: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError) as exc:  # e.g. a dict spec numpy rejects with a ValueError
        raise TypeError(f"{what}: not a NumPy dtype: {dtype!r:.80} ({exc})") from None
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


def _read_header(f):
    """(shape, fortran_order, dtype, data_offset) of an open .npy file, without reading its data."""
    f.seek(0)
    version = npy_format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npy_format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = npy_format.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    return shape, fortran, dtype, f.tell()


def _nofollow(file: str, flags: int) -> int:
    """os.open opener that never follows a symbolic link (ELOOP instead)."""
    return os.open(file, flags | _NOFOLLOW | _CLOEXEC)


def _lstat(file: str):
    try:
        return os.lstat(file)
    except FileNotFoundError:
        return None


def _link_error(file: str, what: str) -> ValueError:
    try:
        target = f" (to {os.readlink(file)!r})"
    except OSError:
        target = ""
    return ValueError(f"{what}: {file} is a symbolic link{target}; a store's files must be regular files in its "
                      "directory, pyfk does not read or write through links")


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} bytes"


def _no_space(path: str, need: int, free: int, cause: OSError | None = None) -> OSError:
    why = f" ({cause.strerror})" if cause is not None and cause.strerror else ""
    return OSError(errno.ENOSPC, f"store at {path} needs {_size(need)}, {_size(free)} free{why}; free some space "
                                 "or choose another directory")


def _free_bytes(path: str) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _reserve(fd: int, offset: int, length: int, zero_fill: bool) -> None:
    """Allocate bytes [offset, offset + length) of an open file so that memory-mapped writes
    into them never need new blocks (a full disk would then be SIGBUS). posix_fallocate (glibc
    emulates it where the filesystem cannot); elsewhere zeros are written if `zero_fill`."""
    if length <= 0:
        return
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
                                 errno.ENOSYS):
                raise
    if not zero_fill:
        return
    chunk = bytes(1 << 20)
    pos, end = offset, offset + length
    os.lseek(fd, offset, os.SEEK_SET)
    while pos < end:
        pos += os.write(fd, chunk[:min(len(chunk), end - pos)])


def _array_bytes(spec: dict) -> tuple[dict, int]:
    """(npy header dict, total file size) of an array spec, header as numpy's open_memmap writes it."""
    dtype = np.dtype(spec["dtype"])
    d = {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(spec["shape"])}
    header = _header_bytes(d)
    return d, len(header) + _nbytes(spec["shape"], dtype.itemsize)


def _header_bytes(d: dict) -> bytes:
    buf = io.BytesIO()
    try:
        npy_format.write_array_header_1_0(buf, d)
    except ValueError:  # a header too long for format 1.0
        buf = io.BytesIO()
        npy_format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def _allocate(file: str, spec: dict) -> None:
    """Create `file` (which must not exist) as a .npy of the spec's shape/dtype, zero-filled and
    fully allocated on disk."""
    d, total = _array_bytes(spec)
    header = _header_bytes(d)
    fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
    try:
        os.write(fd, header)
        _reserve(fd, len(header), total - len(header), zero_fill=True)
        if os.fstat(fd).st_size < total:
            os.ftruncate(fd, total)
    finally:
        os.close(fd)


def _on_disk(st) -> int:
    """Bytes allocated to a file (its size where the platform does not say)."""
    blocks = getattr(st, "st_blocks", None)
    return st.st_size if blocks is None else blocks * 512


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode("utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


class _WriteLock:
    """An exclusive, non-blocking flock on <store>/.pyfk.lock, which holds {"pid", "host"} of the
    writer. Per open file description: a second open in the same process conflicts too. The OS
    releases it when the process dies; `release` also removes the file (a taker checks that the
    file it locked is still the one at the path, so removing it is safe)."""

    def __init__(self, directory: str, replace_link: bool = False):
        self.file = os.path.join(directory, LOCK)
        self.fd = None
        for _ in range(50):
            fd = self._open(replace_link)
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise self._locked(directory, _read_holder(fd)) from None
                mine, now = os.fstat(fd), _lstat(self.file)
                if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                    os.close(fd)  # released and removed by its holder meanwhile: take the new file
                    continue
                text = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n"
                try:  # who holds it, for the error a second writer gets (the lock holds without it)
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.write(fd, text.encode("utf-8"))
                except OSError:
                    pass
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return
        raise StoreLockedError(f"store: could not take the write lock {self.file} (it keeps being replaced)")

    def _open(self, replace_link: bool) -> int:
        st = _lstat(self.file)
        if st is not None and stat.S_ISLNK(st.st_mode):
            if not replace_link:
                raise _link_error(self.file, "store")
            os.unlink(self.file)  # the link, never its target
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _link_error(self.file, "store") from None
            if exc.errno == errno.EISDIR:
                raise ValueError(f"store: {self.file} is a directory; it must be the store's lock file") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"store: {self.file} is not a regular file; it must be the store's lock file")
        return fd

    @staticmethod
    def _locked(directory: str, holder: dict) -> StoreLockedError:
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        me = " (this process: close the other handle first)" if (pid == os.getpid()
                                                                and host == socket.gethostname()) else ""
        return StoreLockedError(f"store: {directory} is being written by another writer, pid {pid} on host "
                                f"{host!r}{me} (lock file {os.path.join(directory, LOCK)}); two writers would "
                                "corrupt it: wait for that one to finish or stop it")

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            mine, now = os.fstat(fd), _lstat(self.file)
            if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.file)
        except OSError:
            pass
        finally:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children sharing the descriptor
                except OSError:
                    pass
            os.close(fd)

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def _entries(path: str) -> dict:
    """name -> os.DirEntry of a directory ({} if it does not exist)."""
    try:
        with os.scandir(path) as it:
            return {e.name: e for e in it}
    except FileNotFoundError:
        return {}
    except NotADirectoryError:
        raise NotADirectoryError(f"store: {path} is not a directory") from None


def _refuse_foreign(path: str, was_store: bool) -> None:
    """Before creating a store without overwrite: the directory may hold only what a store
    (or an interrupted creation of one) leaves: its lock, temp manifests and, where a store
    was being made, its .npy arrays. Symbolic links are refused in any case."""
    entries = _entries(path)
    links = sorted(name for name, e in entries.items() if e.is_symlink())
    if links:
        shown = []
        for name in links[:8]:
            try:
                shown.append(f"{name} -> {os.readlink(os.path.join(path, name))}")
            except OSError:
                shown.append(name)
        raise ValueError(f"store: {path} holds symbolic link(s) {shown}; a store's files must be regular files and "
                         "pyfk does not write through links: remove them, or pass overwrite=True (which removes a "
                         "link in the store's way, never its target)")
    foreign = sorted(name for name, e in entries.items()
                     if not (name == LOCK or _TMP.match(name)
                             or (was_store and _ARRAY_FILE.match(name) and e.is_file(follow_symlinks=False))))
    if foreign:
        more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
        raise FileExistsError(f"store: {path} holds files that are not a pyfk store's: {foreign[:8]}{more}; "
                              "choose an empty or new directory, or pass overwrite=True (which replaces only "
                              "the store's own files)")


def _check_store_dir(path: str, name: str = "path") -> None:
    """An existing store must be a directory: FileNotFoundError where nothing is at `path`,
    ValueError naming `name` where a file (or a path through a file) is."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: {path}: not a pyfk store (no such directory, so no {MANIFEST})") \
            from None
    except NotADirectoryError:
        raise ValueError(f"{name}: expected a store directory, got {path}, a path through a file") from None
    except OSError as exc:
        raise ValueError(f"{name}: cannot read the store directory {path} ({exc.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{name}: expected a store directory, got a file ({path})")


def _not_a_dir(path: str) -> str:
    st = _lstat(path)
    if st is not None and stat.S_ISLNK(st.st_mode):
        return "a symbolic link that does not lead to a directory"
    return "a file" if st is not None and stat.S_ISREG(st.st_mode) else "something that is not a directory"


def check_store_target(path, name: str = "store") -> str:
    """Where a store is to be created or resumed: a str path (TypeError naming `name`
    otherwise) that is a directory or can be made one (ValueError naming `name` where a file,
    or a file on the way to it, is in the way). Checks only: nothing is created."""
    path = _check_path(path, name)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{name}: expected a store directory, got {_not_a_dir(path)} ({path})")
        return path
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if os.path.lexists(ancestor) and not os.path.isdir(ancestor):
        raise ValueError(f"{name}: cannot create the store directory {path}: {ancestor} is "
                         f"{_not_a_dir(ancestor)}")
    return path


def _scale_prefixes(names) -> set:
    return {m.group(1) for m in map(_SCALE.match, names) if m}


def _replaced_files(path: str, specs: dict, was_store: bool) -> list:
    """Entries of `path` that creating a store of `specs` there removes, the manifest first:
    the old manifest and the arrays it lists, the new array files' names, temp manifests,
    leftover .npy arrays of an interrupted creation, and scale arrays of the new store's
    families (z5.npy next to a new z0..z2) that would make it fail to open. Directories in
    the way are an error (nothing is removed then)."""
    entries = _entries(path)
    doomed = set()
    manifest_file = os.path.join(path, MANIFEST)
    if MANIFEST in entries:
        if not entries[MANIFEST].is_symlink():
            try:
                with open(manifest_file, encoding="utf-8", opener=_nofollow) as f:
                    old = json.load(f)
                for spec in old["arrays"].values():
                    if isinstance(spec["file"], str) and _ARRAY_FILE.match(spec["file"]):
                        doomed.add(spec["file"])
            except Exception:  # an unreadable old manifest: it is replaced all the same
                pass
    new_files = {spec["file"] for spec in specs.values()}
    prefixes = _scale_prefixes(specs)
    for name, e in entries.items():
        m = _ARRAY_FILE.match(name)
        if name in new_files or _TMP.match(name):
            doomed.add(name)
        elif m and (was_store or ((e.is_symlink() or e.is_file(follow_symlinks=False))
                                  and _scale_prefixes([m.group(1)]) & prefixes)):
            doomed.add(name)
    doomed = sorted(name for name in doomed if name in entries)
    for name in doomed:
        if entries[name].is_dir(follow_symlinks=False):
            raise ValueError(f"store: {os.path.join(path, name)} is a directory in the store's way; remove it first")
    return ([MANIFEST] if MANIFEST in entries else []) + doomed


def _remove(file: str) -> None:
    """Remove a file or a symbolic link (never the link's target)."""
    try:
        os.unlink(file)
    except FileNotFoundError:
        pass


def _allocated(files) -> int:
    total = 0
    for file in files:
        st = _lstat(file)
        if st is not None and stat.S_ISREG(st.st_mode):
            total += _on_disk(st)
    return total


class DescriptorStore:
    """A directory of memory-mapped arrays with a manifest; see the module docstring.

    Use `DescriptorStore.create` (new store, opened for writing) or
    `DescriptorStore.open` (existing store, "r" read-only or "r+" to resume).
    """

    def __init__(self, path, manifest: dict, arrays: dict, mode: str, lock: _WriteLock | None = None):
        # internal: use create() / open()
        self._path = os.fspath(path)
        self._manifest = manifest
        self._arrays = arrays
        self._mode = mode
        self._lock = lock

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
            overwrite: replace an existing store at `path` (otherwise FileExistsError): its
                manifest, its arrays and anything of the new store's names are removed
                (symbolic links themselves, never their targets); other files are kept.
                Without it, a directory holding files that are not a store's is refused
                (FileExistsError naming them) and symbolic links in it too (ValueError).

        Every array file is reserved at its full size after checking the free space
        (OSError "store at PATH needs N, M free", nothing left behind), and the store's
        write lock is taken first (`StoreLockedError` naming the other writer's pid and
        host); `close` releases it.
        """
        path = _check_path(path)
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

        check_store_target(path, "path")
        manifest_file = os.path.join(path, MANIFEST)
        if os.path.lexists(manifest_file) and not overwrite:
            raise FileExistsError(f"{path}: a store already exists here (found {MANIFEST}); "
                                  "pass overwrite=True to replace it")
        was_store = os.path.lexists(manifest_file) or os.path.lexists(os.path.join(path, LOCK))
        if not overwrite:
            _refuse_foreign(path, was_store)
        made_dir = not os.path.lexists(path)
        os.makedirs(path, exist_ok=True)
        lock = _WriteLock(path, replace_link=overwrite)  # before anything is removed or written
        created, mms = [], {}
        try:
            if not overwrite:  # again, now that no other writer can be changing the directory
                if os.path.lexists(manifest_file):
                    raise FileExistsError(f"{path}: a store already exists here (found {MANIFEST}); "
                                          "pass overwrite=True to replace it")
                _refuse_foreign(path, was_store)
            doomed = _replaced_files(path, specs, was_store)
            need = sum(_array_bytes(spec)[1] for spec in specs.values())
            reclaim = 0
            for name in doomed:
                st = _lstat(os.path.join(path, name))
                if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    reclaim += _on_disk(st)
            free = _free_bytes(path)
            if need > free + reclaim:
                raise _no_space(path, need, free + reclaim)
            for name in doomed:  # the manifest first: from here on the directory is not a store until the new one lands
                _remove(os.path.join(path, name))
            for spec in specs.values():
                file = os.path.join(path, spec["file"])
                created.append(file)
                try:
                    _allocate(file, spec)
                except OSError as exc:
                    if _is_no_space(exc):
                        raise _no_space(path, need, _free_bytes(path) + _allocated(created), exc) from None
                    raise
            for name, spec in specs.items():
                mms[name] = cls._open_array(path, name, spec, "r+")
            manifest = {"format": FORMAT, "version": VERSION, "n": n, "rows_done": 0, "complete": n == 0,
                        "arrays": specs, "meta": meta}
            store = cls(path, manifest, mms, "w+", lock)
            store._write_manifest(manifest)
        except BaseException:
            mms.clear()
            for file in created:  # nothing half-made: no array without its manifest
                try:
                    os.unlink(file)
                except OSError:
                    pass
            lock.release()
            if made_dir:
                try:
                    os.rmdir(path)
                except OSError:
                    pass
            raise
        return store

    @classmethod
    def open(cls, path, mode: str = "r") -> DescriptorStore:
        """Open an existing store: mode "r" (read-only memmaps) or "r+" (append / resume).

        The manifest and every array file are validated (format, version, keys,
        file presence, header shape and dtype); any mismatch, an unreadable manifest or a
        corrupt .npy header raises ValueError naming the manifest or the array (and its file).
        A directory without a manifest, or a path where nothing is, raises FileNotFoundError;
        a path that is a file raises ValueError and one that is not a str / os.PathLike
        TypeError, both naming `path`.
        Store files that are symbolic links are refused (ValueError), as are arrays that
        share a file and scale array files on disk that the manifest does not list.

        Mode "r" needs no write access and takes no lock. Mode "r+" takes the store's
        write lock (`StoreLockedError` if another writer holds it; released by `close`)
        and reserves any unallocated part of the array files (an OSError naming the space
        needed if the disk is too full), so resumed writes never hit a full disk.
        """
        path = _check_path(path)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode: expected 'r' or 'r+', got {mode!r}")
        _check_store_dir(path)
        manifest_file = os.path.join(path, MANIFEST)
        st = _lstat(manifest_file)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise _link_error(manifest_file, "store")
        if st is None or not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(f"{path}: not a pyfk store ({MANIFEST} not found)")
        lock = _WriteLock(path) if mode == "r+" else None
        arrays = {}
        try:
            manifest = cls._read_manifest(manifest_file)  # under the lock: the latest commit
            cls._check_directory(path, manifest, manifest_file)
            for name, spec in manifest["arrays"].items():
                arrays[name] = cls._open_array(path, name, spec, mode)
            cls._check_distinct_files(path, arrays, manifest_file)
            if mode == "r+":
                for name in _entries(path):
                    if _TMP.match(name):  # a commit interrupted by a kill: never replaced the manifest
                        _remove(os.path.join(path, name))
        except BaseException:
            arrays.clear()
            if lock is not None:
                lock.release()
            raise
        return cls(path, manifest, arrays, mode, lock)

    @staticmethod
    def _check_directory(path: str, manifest: dict, manifest_file: str) -> None:
        """A scale array file on disk (g1.npy, of a family g0... the manifest lists) that the
        manifest does not list: an entry was dropped (edited or another store's manifest)."""
        listed = {spec["file"] for spec in manifest["arrays"].values()}
        prefixes = _scale_prefixes(manifest["arrays"])
        dropped = sorted(name for name in _entries(path) if name not in listed and _ARRAY_FILE.match(name)
                         and _scale_prefixes([_ARRAY_FILE.match(name).group(1)]) & prefixes)
        if dropped:
            raise ValueError(f"{manifest_file}: arrays has no entry for {dropped}, found in the store directory "
                             f"(the manifest lists {sorted(manifest['arrays'])}); an entry was dropped from the "
                             "manifest or it belongs to another store: recreate the store (overwrite=True)")

    @staticmethod
    def _check_distinct_files(path: str, arrays: dict, manifest_file: str) -> None:
        seen = {}
        for name, mm in arrays.items():
            st = os.stat(mm.filename) if mm.filename is not None else None
            if st is None:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                raise ValueError(f"{manifest_file}: arrays[{name!r}] and arrays[{seen[key]!r}] are the same file "
                                 "(a hard link); every array needs its own file")
            seen[key] = name

    @staticmethod
    def _read_manifest(manifest_file: str) -> dict:
        def bad(what):
            return ValueError(f"{manifest_file}: {what}")

        try:
            with open(manifest_file, encoding="utf-8", opener=_nofollow) as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise bad(f"not valid UTF-8 text ({exc})") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _link_error(manifest_file, "store") from None
            raise
        try:
            m = json.loads(text)
        except json.JSONDecodeError as exc:
            raise bad(f"not valid JSON, the file may be truncated or corrupted ({exc})") from None
        except RecursionError:
            raise bad("not a pyfk manifest: its JSON is nested too deeply to read (corrupted or crafted)") from None
        except (ValueError, MemoryError) as exc:  # e.g. an integer beyond Python's digit limit
            why = str(exc).split(";")[0][:200] or type(exc).__name__  # not "use sys.set_int_max_str_digits()"
            raise bad(f"not a pyfk manifest: its JSON cannot be read ({why}); corrupted or crafted") from None
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
        files = {}
        for name, spec in arrays.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise bad(f"array name {name!r} is not a simple identifier")
            if not isinstance(spec, dict) or any(k not in spec for k in ("file", "shape", "dtype")):
                raise bad(f"arrays[{name!r}] must be an object with keys 'file', 'shape', 'dtype', got {spec!r}")
            file, shape, dtype = spec["file"], spec["shape"], spec["dtype"]
            if not isinstance(file, str) or not _ARRAY_FILE.match(file):
                raise bad(f"arrays[{name!r}].file is {file!r}, expected a plain .npy file name in the store "
                          "directory (no directory part, no absolute path)")
            if file in files:
                raise bad(f"arrays[{name!r}].file is {file!r}, the file of arrays[{files[file]!r}] too; every array "
                          "needs its own file")
            files[file] = name
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
        """The (n, ...) memmap of one array, opened without following links; in mode "r+"
        any unallocated part of the file is reserved first."""
        file = os.path.join(path, spec["file"])
        want_shape, want_dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
        says = f"the manifest says shape {want_shape} dtype {want_dtype}"
        st = _lstat(file)
        if st is None:
            raise ValueError(f"array {name!r}: file {file} is missing ({says})")
        if stat.S_ISLNK(st.st_mode):
            raise _link_error(file, f"array {name!r}")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"array {name!r}: {file} is not a regular file ({says})")
        try:
            f = open(file, "rb" if mode == "r" else "r+b", opener=_nofollow)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _link_error(file, f"array {name!r}") from None
            raise
        with f:
            try:
                shape, fortran, dtype, offset = _read_header(f)
            except _HEADER_ERRORS as exc:
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if len(why) > 300:
                    why = why[:300] + "..."
                raise ValueError(f"array {name!r}: {file} is not a readable .npy file, its header is corrupt "
                                 f"({why}); {says}") from None
            data_bytes = _nbytes(shape, dtype.itemsize)
            if data_bytes > _MAX_BYTES - offset:
                raise ValueError(f"array {name!r}: {file} has a header with shape {tuple(shape)} dtype {dtype}: "
                                 f"{data_bytes} bytes, more than any array can hold ({_MAX_BYTES}); {says}")
            if tuple(shape) != want_shape or dtype != want_dtype:
                raise ValueError(f"array {name!r}: {says}, but {file} holds shape {tuple(shape)} dtype {dtype}")
            if fortran:
                raise ValueError(f"array {name!r}: {file} is stored in Fortran order; a store holds C-order arrays")
            need = offset + data_bytes
            fst = os.fstat(f.fileno())
            if fst.st_size < need:
                raise ValueError(f"array {name!r}: {file} is truncated ({fst.st_size} bytes, its header needs "
                                 f"{need}); {says}")
            if mode != "r" and _on_disk(fst) < need:  # sparse (a store from an older pyfk): reserve it
                try:
                    _reserve(f.fileno(), 0, need, zero_fill=False)
                except OSError as exc:
                    if _is_no_space(exc):
                        raise _no_space(path, need - _on_disk(fst), _free_bytes(path), exc) from None
                    raise
            try:
                return np.memmap(f, dtype=dtype, mode=mode, shape=tuple(shape), order="C", offset=offset)
            except (ValueError, OverflowError, MemoryError) as exc:
                raise ValueError(f"array {name!r}: {file} cannot be mapped ({exc}); {says}") from None

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
            _remove(tmp)  # a stale one (a killed writer with this pid), or a planted link: never write through it
            with open(tmp, "x", encoding="utf-8", opener=_nofollow) as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # replaces a link named manifest.json itself, never its target
        except BaseException as exc:
            try:
                os.remove(tmp)
            except OSError:
                pass
            if _is_no_space(exc):
                raise OSError(exc.errno, f"store at {self._path}: no space left to write {MANIFEST} "
                                         f"({exc.strerror}); rows_done stays {self._manifest.get('rows_done', 0)} "
                                         "and the committed rows are intact: free some space and rerun to "
                                         "resume") from exc
            raise
        fsync_dir(self._path)
        self._manifest = manifest  # only once the new manifest is in place

    def close(self) -> None:
        """Flush (if writable), drop the memory maps and release the write lock. Does not commit."""
        try:
            if self._arrays is not None:
                if self._mode in _WRITABLE:
                    for mm in self._arrays.values():
                        mm.flush()
                self._arrays = None
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

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
