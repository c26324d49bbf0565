"""DescriptorStore hardening (issue 9 items 3, 4, 7, 8, 13; DESIGN.md section 7): a full disk is a
clear error and never a signal, symlinks are never followed, one writer at a time, a manifest that
does not describe its directory is refused, and a complete store needs no write access."""

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyfk
from pyfk.features import store as store_mod
from pyfk.features.store import DescriptorStore
from tests.features.helpers import FailingLoader
from tests.features.helpers import store_batch as _batch
from tests.features.helpers import store_spec as _spec

ROOT = str(Path(pyfk.__file__).resolve().parents[1])  # the checkout under test (children import it too)

LOCK = ".pyfk.lock"


def _partial_store(path, rng, n=20, done=10):
    store = DescriptorStore.create(path, n, _spec())
    store.write(0, _batch(rng, done))
    store.commit(done)
    store.close()


def _manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))


def _edit_manifest(path, fn):
    m = _manifest(path)
    fn(m)
    (Path(path) / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


def _snapshot(path):
    """{name: bytes} of a directory's regular files (the lock file left out)."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.name != LOCK and p.is_file()}


def _python(code, *args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def _mlp_case(n, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 9), torch.nn.Tanh(),
                                torch.nn.Linear(9, 5))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 12, generator=gen)
    y = torch.randint(0, 5, (n,), generator=gen)
    return model, x, y, ["0", "2", "4"]


def _loader(x, y, batch_size=4):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@contextlib.contextmanager
def _tmpfs(path, size):
    """A tmpfs of `size` at `path` (root only; the test is skipped where mounting is not permitted)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield Path(path)
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ----------------------------------------------------------------------------- 3: a full disk

def test_create_larger_than_the_free_space_is_a_clear_error(tmp_path):
    with _tmpfs(tmp_path / "disk", "2m") as disk:
        spec = {"z0": ((64,), "float16"), "g0": ((64,), "float16")}  # 40,000 rows: 10 MiB
        with pytest.raises(OSError, match=r"store at .*disk/s needs 9\.77 MiB, [0-9.]+ (MiB|KiB) free") as info:
            DescriptorStore.create(disk / "s", 40_000, spec)
        assert info.value.errno == errno.ENOSPC
        assert not (disk / "s").exists()  # nothing half-made
        # with overwrite, over an old store: the old store is only removed once the new one fits
        _partial_store(disk / "old", np.random.default_rng(0))
        before = _snapshot(disk / "old")
        with pytest.raises(OSError, match="needs"):
            DescriptorStore.create(disk / "old", 40_000, spec, overwrite=True)
        assert _snapshot(disk / "old") == before and DescriptorStore.open(disk / "old").rows_done == 10
        # a store that fits is created in the same place: the full size is allocated, not sparse
        store = DescriptorStore.create(disk / "s", 4_000, spec)
        st = os.stat(disk / "s" / "z0.npy")
        assert st.st_blocks * 512 >= st.st_size >= 4_000 * 64 * 2
        store.close()


_EXTRACT_CHILD = """
import sys, torch
from torch.utils.data import DataLoader, TensorDataset
import pyfk
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 9), torch.nn.Tanh(),
                            torch.nn.Linear(9, 5))
x, y = torch.randn(20_000, 12), torch.randint(0, 5, (20_000,))
try:
    pyfk.extract(model, DataLoader(TensorDataset(x, y), batch_size=2_000), ["0", "2", "4"], store=sys.argv[1])
except OSError as exc:
    print("ERROR", exc)
"""


def test_extract_onto_a_disk_too_small_errors_and_never_signals(tmp_path):
    with _tmpfs(tmp_path / "disk", "2m") as disk:
        done = _python(_EXTRACT_CHILD, disk / "s")  # 20,000 rows: 3.4 MiB
        assert done.returncode != -signal.SIGBUS, "pyfk.extract was killed by SIGBUS (memmap write, disk full)"
        assert done.returncode == 0, done.stderr[-3000:]
        assert "ERROR" in done.stdout and "needs" in done.stdout and "free" in done.stdout, done.stdout
        assert f"store at {disk / 's'}" in done.stdout
        assert not (disk / "s").exists() or not any((disk / "s").iterdir())


_FILL_CHILD = """
import os, sys
import numpy as np
from pyfk.features.store import DescriptorStore
disk = sys.argv[1]
store = DescriptorStore.create(os.path.join(disk, "s"), 20_000, {"z0": ((32,), "float16")})
store.write(0, {"z0": np.full((100, 32), 1.5)})
store.commit(100)
fd = os.open(os.path.join(disk, "filler"), os.O_CREAT | os.O_WRONLY)
try:
    while True:
        os.write(fd, bytes(4096))
except OSError:
    pass
os.close(fd)
store.write(100, {"z0": np.full((19_900, 32), 2.5)})  # into the reserved space: no SIGBUS
print("WROTE", flush=True)
try:
    store.commit(20_000)
    print("COMMITTED")
except OSError as exc:
    print("ERROR", exc)
"""


def test_disk_filling_up_after_create_never_signals_and_committed_rows_resume(tmp_path):
    with _tmpfs(tmp_path / "disk", "2m") as disk:
        done = _python(_FILL_CHILD, disk)
        assert done.returncode != -signal.SIGBUS, "a memmap write into a full disk raised SIGBUS"
        assert done.returncode == 0, done.stderr[-3000:]
        assert "WROTE" in done.stdout
        if "ERROR" in done.stdout:  # no room for the manifest: a clear error, the commit did not happen
            assert "no space left" in done.stdout and "rows_done stays 100" in done.stdout
            assert not [p for p in (disk / "s").iterdir() if p.name.endswith(".tmp")]
            os.remove(disk / "filler")
            store = DescriptorStore.open(disk / "s", "r+")
            assert store.rows_done == 100
            np.testing.assert_array_equal(store.rows("z0"), np.full((100, 32), 1.5, np.float16))
            store.write(100, {"z0": np.full((19_900, 32), 2.5)})
            store.commit(20_000)
            store.close()
        final = DescriptorStore.open(disk / "s")
        assert final.complete
        np.testing.assert_array_equal(final.rows("z0")[:100], np.full((100, 32), 1.5, np.float16))
        np.testing.assert_array_equal(final.rows("z0")[100:], np.full((19_900, 32), 2.5, np.float16))


def test_resume_reserves_a_sparse_store_from_an_older_pyfk(tmp_path, rng):
    path = tmp_path / "s"
    _partial_store(path, rng, n=4096, done=10)
    # what pyfk before 9 made: sparse array files (rebuild z0.npy as one, keeping its committed rows)
    data = (path / "z0.npy").read_bytes()
    keep = len(data) - 4086 * 16 * 2
    os.remove(path / "z0.npy")
    with open(path / "z0.npy", "wb") as f:
        f.write(data[:keep])
        f.truncate(len(data))
    assert os.stat(path / "z0.npy").st_blocks * 512 < len(data)
    store = DescriptorStore.open(path, "r+")
    st = os.stat(path / "z0.npy")
    assert st.st_blocks * 512 >= st.st_size == len(data)
    assert (path / "z0.npy").read_bytes() == data
    store.close()


def test_the_file_format_is_unchanged(tmp_path):
    """The reserved arrays are byte for byte the .npy files numpy's open_memmap makes (what pyfk
    wrote before): stores made before open now, and stores made now open in an older pyfk."""
    from numpy.lib import format as npy_format

    spec = {"z0": ((3,), "float16"), "labels": ((), "int64"), "wide": ((1, 2), "float32")}
    DescriptorStore.create(tmp_path / "s", 5, spec).close()
    for name, (tail, dtype) in spec.items():
        ref = npy_format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=dtype, shape=(5, *tail))
        ref.flush()
        del ref
        assert (tmp_path / "s" / f"{name}.npy").read_bytes() == (tmp_path / f"{name}.npy").read_bytes()


# ----------------------------------------------------------------------------- 4: symbolic links

def test_resume_refuses_a_planted_symlink_and_leaves_its_target(tmp_path, rng):
    path = tmp_path / "pool"
    _partial_store(path, rng)
    elsewhere = tmp_path / "elsewhere.npy"
    shutil.move(path / "g0.npy", elsewhere)
    os.symlink(elsewhere, path / "g0.npy")
    before = elsewhere.read_bytes()
    for mode in ("r", "r+"):
        with pytest.raises(ValueError, match=r"array 'g0': .*g0\.npy is a symbolic link"):
            DescriptorStore.open(path, mode)
    assert elsewhere.read_bytes() == before
    assert not (path / LOCK).exists()  # the refused writer left nothing behind


def test_extract_resume_refuses_a_planted_symlink(tmp_path):
    model, x, y, layers = _mlp_case(12)
    path = tmp_path / "pool"
    with pytest.raises(RuntimeError, match="loader died"):
        pyfk.extract(model, FailingLoader(_loader(x, y), 1), layers, store=path)
    elsewhere = tmp_path / "elsewhere.npy"
    shutil.move(path / "g1.npy", elsewhere)
    os.symlink(elsewhere, path / "g1.npy")
    before = elsewhere.read_bytes()
    with pytest.raises(ValueError, match=r"array 'g1': .*symbolic link"):
        pyfk.extract(model, _loader(x, y), layers, store=path)
    assert elsewhere.read_bytes() == before


def test_fresh_extract_refuses_a_directory_holding_a_symlink(tmp_path):
    model, x, y, layers = _mlp_case(8)
    path = tmp_path / "pool"
    path.mkdir()
    precious = tmp_path / "precious.bin"
    precious.write_bytes(b"not yours" * 100)
    os.symlink(precious, path / "z0.npy")
    with pytest.raises(ValueError, match=r"symbolic link.*z0\.npy -> .*precious\.bin"):
        pyfk.extract(model, _loader(x, y), layers, store=path)
    assert precious.read_bytes() == b"not yours" * 100
    assert sorted(p.name for p in path.iterdir()) == ["z0.npy"]
    with pytest.raises(ValueError, match="symbolic link"):
        DescriptorStore.create(path, 4, _spec())
    # overwrite=True removes the link, never its target
    result = pyfk.extract(model, _loader(x, y), layers, store=path, overwrite=True)
    assert not (path / "z0.npy").is_symlink() and (path / "z0.npy").is_file()
    assert precious.read_bytes() == b"not yours" * 100
    assert len(result) == 8 and DescriptorStore.open(path).complete


def test_manifest_and_lock_symlinks_are_refused(tmp_path, rng):
    path = tmp_path / "pool"
    _partial_store(path, rng)
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    os.symlink(target, path / LOCK)
    with pytest.raises(ValueError, match=r"\.pyfk\.lock is a symbolic link"):
        DescriptorStore.open(path, "r+")
    assert DescriptorStore.open(path, "r").rows_done == 10  # a reader takes no lock
    assert target.read_bytes() == b"keep me"
    os.remove(path / LOCK)

    shutil.move(path / "manifest.json", tmp_path / "manifest.json")
    os.symlink(tmp_path / "manifest.json", path / "manifest.json")
    before = (tmp_path / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match=r"manifest\.json is a symbolic link"):
        DescriptorStore.open(path)
    # replacing the store removes the link (not the file it points to)
    DescriptorStore.create(path, 4, _spec(), overwrite=True).close()
    assert not (path / "manifest.json").is_symlink()
    assert (tmp_path / "manifest.json").read_bytes() == before


def test_a_planted_temp_manifest_link_is_never_written_through(tmp_path, rng):
    path = tmp_path / "pool"
    store = DescriptorStore.create(path, 20, _spec())
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    os.symlink(target, path / f".manifest.json.{os.getpid()}.tmp")
    store.write(0, _batch(rng, 10))
    store.commit(10)
    store.close()
    assert target.read_bytes() == b"keep me"
    assert DescriptorStore.open(path).rows_done == 10


def test_create_refuses_a_directory_holding_other_files(tmp_path):
    path = tmp_path / "mine"
    path.mkdir()
    (path / "notes.txt").write_text("my notes")
    np.save(path / "data.npy", np.arange(3))
    before = _snapshot(path)
    with pytest.raises(FileExistsError, match=r"not a pyfk store's: \['data\.npy', 'notes\.txt'\]"):
        DescriptorStore.create(path, 4, _spec())
    assert _snapshot(path) == before and sorted(p.name for p in path.iterdir()) == ["data.npy", "notes.txt"]
    model, x, y, layers = _mlp_case(8)
    with pytest.raises(FileExistsError, match="notes.txt"):
        pyfk.extract(model, _loader(x, y), layers, store=path)
    assert _snapshot(path) == before
    # overwrite=True: the store is made; files that are not in its way are kept
    pyfk.extract(model, _loader(x, y), layers, store=path, overwrite=True)
    assert (path / "notes.txt").read_text() == "my notes"
    np.testing.assert_array_equal(np.load(path / "data.npy"), np.arange(3))
    assert DescriptorStore.open(path).complete


def test_an_interrupted_create_is_recreated_without_overwrite(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    (path / LOCK).write_text('{"pid": 1, "host": "gone"}')  # what a writer killed during create leaves
    (path / "z0.npy").write_bytes(b"\x93NUMPY half")
    (path / ".manifest.json.999999.tmp").write_text("{")
    store = DescriptorStore.create(path, 4, {"z0": ((2,), "float16")})
    store.close()
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "z0.npy"]


# ----------------------------------------------------------------------------- 7: one writer

def test_second_writer_in_the_same_process_is_refused(tmp_path, rng):
    path = tmp_path / "pool"
    store = DescriptorStore.create(path, 20, _spec())
    store.write(0, _batch(rng, 10))
    store.commit(10)
    before = _snapshot(path)
    holder = re.escape(f"pid {os.getpid()} on host '{socket.gethostname()}'")
    with pytest.raises(store_mod.StoreLockedError, match=holder):
        DescriptorStore.open(path, "r+")
    with pytest.raises(store_mod.StoreLockedError, match=holder):
        DescriptorStore.create(path, 5, _spec(), overwrite=True)
    assert _snapshot(path) == before  # the refused writers changed nothing
    assert DescriptorStore.open(path, "r").rows_done == 10  # readers need no lock
    store.write(10, _batch(rng, 10, start=10))
    store.commit(20)  # the holder carries on
    store.close()
    again = DescriptorStore.open(path, "r+")  # released by close
    assert again.complete
    again.close()
    assert not (path / LOCK).exists()


_HOLDER_CHILD = """
import sys, time
from pyfk.features.store import DescriptorStore
store = DescriptorStore.open(sys.argv[1], "r+")
print("LOCKED", flush=True)
time.sleep(120)
"""


def test_second_writer_in_another_process_is_refused_until_it_dies(tmp_path):
    model, x, y, layers = _mlp_case(12)
    path = tmp_path / "pool"
    with pytest.raises(RuntimeError, match="loader died"):
        pyfk.extract(model, FailingLoader(_loader(x, y), 1), layers, store=path)
    before = _snapshot(path)
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, "-c", _HOLDER_CHILD, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "LOCKED", child.stderr.read()
        holder = re.escape(f"pid {child.pid} on host '{socket.gethostname()}'")
        with pytest.raises(store_mod.StoreLockedError, match=holder):
            DescriptorStore.open(path, "r+")
        with pytest.raises(store_mod.StoreLockedError, match=holder):
            pyfk.extract(model, _loader(x, y), layers, store=path)
        with pytest.raises(store_mod.StoreLockedError, match=holder):
            pyfk.extract(model, _loader(x, y), layers, store=path, overwrite=True)
        assert _snapshot(path) == before
        assert DescriptorStore.open(path).rows_done == 4
    finally:
        child.kill()  # SIGKILL: the OS drops its lock
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    result = pyfk.extract(model, _loader(x, y), layers, store=path)
    assert len(result) == 12 and DescriptorStore.open(path).complete


# ----------------------------------------------------------------------------- 8: manifest vs directory

@pytest.mark.parametrize("file, what", [
    ("z0.npy", r"arrays\['g0'\]\.file is 'z0\.npy', the file of arrays\['z0'\] too"),
    ("../g0.npy", r"arrays\['g0'\]\.file is '\.\./g0\.npy'"),
    ("/tmp/g0.npy", r"arrays\['g0'\]\.file is '/tmp/g0\.npy'"),
    ("sub/g0.npy", r"arrays\['g0'\]\.file is 'sub/g0\.npy'"),
    ("manifest.json", r"arrays\['g0'\]\.file is 'manifest\.json'"),
    (LOCK, r"arrays\['g0'\]\.file is '\.pyfk\.lock'"),
])
def test_manifest_entries_must_each_name_their_own_file_in_the_store(tmp_path, rng, file, what):
    path = tmp_path / "pool"
    _partial_store(path, rng)
    _edit_manifest(path, lambda m: m["arrays"]["g0"].update(file=file))
    for mode in ("r", "r+"):
        with pytest.raises(ValueError, match="manifest.json: " + what):
            DescriptorStore.open(path, mode)


def test_arrays_that_are_one_file_through_a_hard_link_are_refused(tmp_path, rng):
    path = tmp_path / "pool"
    _partial_store(path, rng)  # z0 and g0 have the same shape and dtype
    os.remove(path / "g0.npy")
    os.link(path / "z0.npy", path / "g0.npy")
    with pytest.raises(ValueError, match=r"arrays\['g0'\] and arrays\['z0'\] are the same file"):
        DescriptorStore.open(path, "r+")


def test_an_array_dropped_from_the_manifest_is_named_on_open(tmp_path, rng):
    path = tmp_path / "pool"
    _partial_store(path, rng)
    _edit_manifest(path, lambda m: m["arrays"].pop("g1"))
    for mode in ("r", "r+"):
        with pytest.raises(ValueError, match=r"manifest\.json: arrays has no entry for \['g1\.npy'\]"):
            DescriptorStore.open(path, mode)


def test_extract_names_an_array_dropped_from_the_manifest(tmp_path):
    model, x, y, layers = _mlp_case(12)
    path = tmp_path / "pool"
    with pytest.raises(RuntimeError, match="loader died"):
        pyfk.extract(model, FailingLoader(_loader(x, y), 1), layers, store=path)
    _edit_manifest(path, lambda m: m["arrays"].pop("probs"))
    with pytest.raises(ValueError, match=r"store: .*manifest\.json has no entry for \['probs'\]"):
        pyfk.extract(model, _loader(x, y), layers, store=path)
    _edit_manifest(path, lambda m: m["arrays"].update(extra={"file": "extra.npy", "shape": [12], "dtype": "int64"}))
    np.save(path / "extra.npy", np.zeros(12, np.int64))
    with pytest.raises(ValueError, match=r"store: .*manifest\.json has no entry for \['probs'\]"):
        pyfk.extract(model, _loader(x, y), layers, store=path)


# ----------------------------------------------------------------------------- 13: a complete store, read-only

def test_complete_store_is_reopened_read_only_without_the_lock(tmp_path, monkeypatch):
    model, x, y, layers = _mlp_case(12)
    path = tmp_path / "pool"
    first = pyfk.extract(model, _loader(x, y), layers, store=path)
    for p in path.iterdir():
        p.chmod(0o444)
    path.chmod(0o555)
    modes = []
    real_open = DescriptorStore.open.__func__

    def recording_open(cls, p, mode="r"):
        modes.append(mode)
        return real_open(cls, p, mode)

    def no_create(*args, **kwargs):
        raise AssertionError("a complete store must not be recreated")

    monkeypatch.setattr(DescriptorStore, "open", classmethod(recording_open))
    monkeypatch.setattr(DescriptorStore, "create", no_create)
    if hasattr(store_mod, "_WriteLock"):
        monkeypatch.setattr(store_mod, "_WriteLock", no_create)
    try:
        again = pyfk.extract(model, _loader(x, y), layers, store=path)
    finally:
        path.chmod(0o755)
    assert modes and set(modes) == {"r"}, modes
    np.testing.assert_array_equal(again.descriptors.g[1], first.descriptors.g[1])
    assert again.meta["layers"] == layers


def test_complete_store_on_a_read_only_filesystem(tmp_path):
    model, x, y, layers = _mlp_case(12)
    with _tmpfs(tmp_path / "disk", "4m") as disk:
        first = pyfk.extract(model, _loader(x, y), layers, store=disk / "pool", with_true=True)
        first_g = np.array(first.grad_true.g[0])
        del first
        remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {remount.stderr.strip()}")
        again = pyfk.extract(model, _loader(x, y), layers, store=disk / "pool", with_true=True)
        assert len(again) == 12 and again.meta["layers"] == layers
        np.testing.assert_array_equal(again.grad_true.g[0], first_g)
        assert DescriptorStore.open(disk / "pool").complete
        with pytest.raises(OSError):  # it is read-only indeed (root included)
            (disk / "pool" / "probe").write_text("x")
        del again


def test_read_only_store_files_open_for_reading_as_another_user(tmp_path):
    """Where a non-root user exists: a complete store of read-only files in a read-only directory
    is returned by pyfk.extract run as that user (no Permission denied)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    base = Path(tempfile.mkdtemp(prefix="pyfk-ro-"))
    try:
        base.chmod(0o755)
        model, x, y, layers = _mlp_case(12)
        torch.save({"model": model.state_dict(), "x": x, "y": y}, base / "case.pt")
        pyfk.extract(model, _loader(x, y), layers, store=base / "pool")
        for p in [*(base / "pool").iterdir(), base / "case.pt"]:
            p.chmod(0o444)
        (base / "pool").chmod(0o555)
        code = f"""
            import os, sys
            os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})
            import torch
            from torch.utils.data import DataLoader, TensorDataset
            import pyfk
            print("IMPORTED", flush=True)
            case = torch.load(sys.argv[1] + "/case.pt", weights_only=True)
            model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 9),
                                        torch.nn.Tanh(), torch.nn.Linear(9, 5))
            model.load_state_dict(case["model"])
            loader = DataLoader(TensorDataset(case["x"], case["y"]), batch_size=4)
            out = pyfk.extract(model, loader, {layers!r}, store=sys.argv[1] + "/pool")
            print("ROWS", len(out))
        """
        done = _python(code, base)
        if "IMPORTED" not in done.stdout:
            pytest.skip(f"python/pyfk cannot be imported as 'nobody' here: {done.stderr[-300:]}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "ROWS 12" in done.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_writer_killed_during_create_leaves_no_store(tmp_path):
    """A writer killed between the arrays and the manifest of a create leaves no store: a reader
    sees 'not a store', a rerun makes it (the lock file of the dead writer is no obstacle)."""
    path = tmp_path / "s"
    code = """
        import os, sys, time
        import numpy as np
        from pyfk.features import store as s
        real = s._allocate
        def slow(file, spec):
            real(file, spec)
            print("ALLOCATED", flush=True)
            time.sleep(60)
        s._allocate = slow
        s.DescriptorStore.create(sys.argv[1], 100, {"z0": ((4,), "float16"), "g0": ((4,), "float16")})
    """
    if not hasattr(store_mod, "_allocate"):
        pytest.skip("no allocation step to interrupt")
    env = dict(os.environ, PYTHONPATH=ROOT)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "ALLOCATED", child.stderr.read()
        with pytest.raises(store_mod.StoreLockedError, match=f"pid {child.pid}"):
            DescriptorStore.create(path, 10, {"z0": ((4,), "float16")}, overwrite=True)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        child.stderr.close()
    with pytest.raises(FileNotFoundError, match="not a pyfk store"):
        DescriptorStore.open(path)
    t0 = time.perf_counter()
    store = DescriptorStore.create(path, 10, {"z0": ((4,), "float16")})
    assert time.perf_counter() - t0 < 10
    store.close()
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "z0.npy"]


@pytest.mark.parametrize("dtype", [{"": []}, {"names": 3}, ["<f4", 2, 1], "not-a-dtype", 7])
def test_a_manifest_dtype_numpy_cannot_parse_is_named(tmp_path, rng, dtype):
    """numpy raises ValueError for some dtype specs (a dict without field tuples), TypeError for
    others: either way the error names the manifest entry (a fuzz counterexample)."""
    path = tmp_path / "s"
    _partial_store(path, rng)
    _edit_manifest(path, lambda m: m["arrays"]["g0"].update(dtype=dtype))
    with pytest.raises((ValueError, TypeError), match=r"arrays\['g0'\]\.dtype"):
        DescriptorStore.open(str(path))
