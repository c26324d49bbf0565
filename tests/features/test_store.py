import json
import os

import numpy as np
import pytest

import pyfk
from pyfk.features.store import DescriptorStore
from tests.features.helpers import WIDTHS
from tests.features.helpers import store_batch as _batch
from tests.features.helpers import store_spec as _spec


def _concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _manifest(path):
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def test_round_trip(tmp_path, rng):
    path = tmp_path / "pool"
    n = 50
    store = DescriptorStore.create(path, n, _spec(), meta={"model": "resnet18", "layers": ["a", "b"]})
    assert (store.n, store.rows_done, store.complete, len(store)) == (n, 0, False, 0)
    b1, b2 = _batch(rng, 30), _batch(rng, 20, start=30)
    assert store.write(0, b1) == 30
    store.commit(30)
    store.write(30, b2)
    store.commit(50)
    assert store.complete
    store.finalize()
    store.close()

    m = _manifest(path)
    assert m["format"] == "pyfk-store" and m["version"] == 1
    assert (m["n"], m["rows_done"], m["complete"]) == (n, n, True)
    assert m["arrays"]["z0"] == {"file": "z0.npy", "shape": [n, 16], "dtype": "float16"}
    assert m["arrays"]["labels"] == {"file": "labels.npy", "shape": [n], "dtype": "int64"}

    r = DescriptorStore.open(path)
    assert r.meta == {"model": "resnet18", "layers": ["a", "b"]}
    assert r.names == ["z0", "g0", "z1", "g1", "labels"]
    assert (r.n, r.rows_done, r.complete, len(r)) == (n, n, True, n)
    assert "rows_done=50" in repr(r)
    want = _concat([b1, b2])
    d = r.descriptors()
    assert isinstance(d, pyfk.Descriptors)
    assert (d.n, d.widths, d.has_g) == (n, list(WIDTHS), True)
    for j in range(len(WIDTHS)):
        assert isinstance(d.z[j], np.memmap) and d.z[j].dtype == np.float16
        np.testing.assert_array_equal(d.z[j], want[f"z{j}"].astype(np.float16))
        np.testing.assert_array_equal(d.g[j], want[f"g{j}"].astype(np.float16))
    np.testing.assert_array_equal(r.rows("labels"), np.arange(n))
    assert r.array("z0").shape == (n, 16)
    with pytest.raises(ValueError, match="read-only"):
        r.write(0, b1)


def test_float32_storage_is_exact(tmp_path, rng):
    store = DescriptorStore.create(tmp_path / "s", 10, _spec(dtype="float32"))
    b = _batch(rng, 10)
    store.write(0, b)
    store.commit(10)
    d = DescriptorStore.open(tmp_path / "s").descriptors()
    np.testing.assert_array_equal(d.z[1], b["z1"])
    assert d.z[1].dtype == np.float32


def test_resume_only_committed_rows_visible(tmp_path, rng):
    path = tmp_path / "pool"
    store = DescriptorStore.create(path, 30, _spec())
    batches = [_batch(rng, 10, start=10 * i) for i in range(3)]
    store.write(0, batches[0])
    store.write(10, batches[1])
    store.commit(20)
    store.write(20, batches[2])  # written, never committed: a crash here
    del store

    r = DescriptorStore.open(path, mode="r+")
    assert (r.rows_done, r.complete, len(r)) == (20, False, 20)
    d = r.descriptors()
    assert d.n == 20
    want = _concat(batches[:2])
    np.testing.assert_array_equal(d.z[0], want["z0"].astype(np.float16))
    np.testing.assert_array_equal(r.rows("labels"), np.arange(20))

    with pytest.raises(ValueError, match="committed rows cannot be rewritten"):
        r.write(10, batches[1])
    with pytest.raises(ValueError, match="finalize"):
        r.finalize()
    redo = _batch(rng, 10, start=20)  # the resumed run rewrites the uncommitted rows
    r.write(20, redo)
    r.commit(30)
    r.finalize()
    final = DescriptorStore.open(path)
    assert final.complete and final.rows_done == 30
    np.testing.assert_array_equal(final.descriptors().g[1][20:], redo["g1"].astype(np.float16))


def test_write_without_commit_keeps_old_rows_done(tmp_path, rng):
    path = tmp_path / "pool"
    store = DescriptorStore.create(path, 20, _spec())
    store.write(0, _batch(rng, 10))
    store.commit(10)
    store.write(10, _batch(rng, 10, start=10))
    store.close()
    r = DescriptorStore.open(path)
    assert r.rows_done == 10 and not r.complete
    assert r.descriptors().n == 10


def test_commit_rows_only_grow(tmp_path, rng):
    store = DescriptorStore.create(tmp_path / "s", 20, _spec())
    store.write(0, _batch(rng, 10))
    store.commit(10)
    with pytest.raises(ValueError, match="only grow"):
        store.commit(5)
    with pytest.raises(ValueError, match="past the end"):
        store.commit(21)
    store.commit(10, meta={"epoch": 3})  # same count: allowed, updates meta
    assert DescriptorStore.open(tmp_path / "s").meta == {"epoch": 3}


def test_manifest_never_half_written(tmp_path, rng, monkeypatch):
    path = tmp_path / "pool"
    store = DescriptorStore.create(path, 20, _spec())
    store.write(0, _batch(rng, 10))
    store.commit(10)
    before = (path / "manifest.json").read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    store.write(10, _batch(rng, 10, start=10))
    with pytest.raises(OSError, match="disk on fire"):
        store.commit(20)
    monkeypatch.undo()

    assert (path / "manifest.json").read_bytes() == before
    assert _manifest(path)["rows_done"] == 10
    assert store.rows_done == 10 and not store.complete  # in-memory state unchanged too
    assert sorted(p.name for p in path.iterdir()) == sorted(  # no temp file left; the writer's lock while open
        ["manifest.json", "z0.npy", "g0.npy", "z1.npy", "g1.npy", "labels.npy", ".pyfk.lock"])
    assert DescriptorStore.open(path).rows_done == 10
    store.commit(20)  # and it works once replace does
    assert DescriptorStore.open(path).complete


def _complete_store(path, rng, n=12, widths=WIDTHS, dtype="float16"):
    store = DescriptorStore.create(path, n, _spec(widths, dtype))
    b = _batch(rng, n, widths)
    store.write(0, b)
    store.commit(n)
    store.close()
    return b


def _edit_manifest(path, fn):
    m = _manifest(path)
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


@pytest.mark.parametrize("case", ["truncated", "empty", "not_json", "list", "binary"])
def test_corrupted_manifest(tmp_path, rng, case):
    path = tmp_path / "pool"
    _complete_store(path, rng)
    mf = path / "manifest.json"
    text = mf.read_text(encoding="utf-8")
    if case == "truncated":
        mf.write_text(text[: len(text) // 2], encoding="utf-8")
    elif case == "empty":
        mf.write_text("", encoding="utf-8")
    elif case == "not_json":
        mf.write_text("rows_done = 12\n", encoding="utf-8")
    elif case == "list":
        mf.write_text("[1, 2, 3]", encoding="utf-8")
    else:
        mf.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="manifest.json"):
        DescriptorStore.open(path)


@pytest.mark.parametrize("edit, what", [
    (lambda m: m.update(version=2), "version"),
    (lambda m: m.update(format="something-else"), "format"),
    (lambda m: m.pop("rows_done"), "missing key"),
    (lambda m: m.pop("arrays"), "missing key"),
    (lambda m: m.pop("n"), "missing key"),
    (lambda m: m.update(rows_done=13), "rows_done"),
    (lambda m: m.update(rows_done=-1), "rows_done"),
    (lambda m: m.update(rows_done="12"), "rows_done"),
    (lambda m: m.update(rows_done=5), "complete is true"),
    (lambda m: m["arrays"]["z0"].pop("dtype"), "z0"),
    (lambda m: m["arrays"]["z0"].update(file="../z0.npy"), "z0"),
    (lambda m: m["arrays"]["z0"].update(shape=[11, 16]), "z0"),
    (lambda m: m["arrays"]["z0"].update(dtype="object"), "z0"),
])
def test_bad_manifest_content(tmp_path, rng, edit, what):
    path = tmp_path / "pool"
    _complete_store(path, rng)
    _edit_manifest(path, edit)
    with pytest.raises(ValueError, match="manifest.json") as info:
        DescriptorStore.open(path)
    assert what in str(info.value)


@pytest.mark.parametrize("replacement, holds", [
    (np.zeros((12, 15), np.float16), "shape (12, 15)"),
    (np.zeros((11, 16), np.float16), "shape (11, 16)"),
    (np.zeros((12, 16), np.float32), "dtype float32"),
    (np.zeros(12 * 16, np.float16), "shape (192,)"),
])
def test_array_file_mismatch(tmp_path, rng, replacement, holds):
    path = tmp_path / "pool"
    _complete_store(path, rng)
    np.save(path / "z0.npy", replacement)
    with pytest.raises(ValueError, match="'z0'") as info:
        DescriptorStore.open(path)
    msg = str(info.value)
    assert "shape (12, 16) dtype float16" in msg  # what the manifest says
    assert holds in msg  # what the file holds


def test_array_file_missing_truncated_or_garbage(tmp_path, rng):
    path = tmp_path / "pool"
    _complete_store(path, rng)
    data = (path / "g1.npy").read_bytes()
    (path / "g1.npy").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="'g1'.*truncated"):
        DescriptorStore.open(path)
    (path / "g1.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(ValueError, match="'g1'"):
        DescriptorStore.open(path)
    os.remove(path / "g1.npy")
    with pytest.raises(ValueError, match="'g1'.*missing"):
        DescriptorStore.open(path, mode="r+")


def test_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        DescriptorStore.open(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="mode"):
        DescriptorStore.open(tmp_path, mode="w")


def test_create_over_existing_store(tmp_path, rng):
    path = tmp_path / "pool"
    _complete_store(path, rng)
    with pytest.raises(FileExistsError, match="pool"):
        DescriptorStore.create(path, 5, {"z0": ((4,), "float16")})
    assert DescriptorStore.open(path).rows_done == 12  # unchanged
    store = DescriptorStore.create(path, 5, {"z0": ((4,), "float32")}, overwrite=True)
    assert store.rows_done == 0
    # old arrays removed (.pyfk.lock: the write lock, held until the store is closed)
    assert sorted(p.name for p in path.iterdir()) == [".pyfk.lock", "manifest.json", "z0.npy"]
    store.close()
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "z0.npy"]
    r = DescriptorStore.open(path)
    assert (r.n, r.names, r.descriptors().g) == (5, ["z0"], None)


@pytest.mark.parametrize("name", ["a-b", "1z", "", "z 0", "../x", "z.0"])
def test_create_rejects_bad_names(tmp_path, name):
    with pytest.raises(ValueError, match="identifier"):
        DescriptorStore.create(tmp_path / "s", 4, {name: ((2,), "float16")})
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_create_rejects_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="n"):
        DescriptorStore.create(tmp_path / "s", -1, {"z0": ((2,), "float16")})
    with pytest.raises(ValueError, match="arrays"):
        DescriptorStore.create(tmp_path / "s", 4, {})
    with pytest.raises(TypeError, match="dtype"):
        DescriptorStore.create(tmp_path / "s", 4, {"z0": ((2,), object)})
    with pytest.raises(TypeError, match="meta"):
        DescriptorStore.create(tmp_path / "s", 4, {"z0": ((2,), "float16")}, meta={"x": object()})


def test_write_errors_change_nothing(tmp_path, rng):
    store = DescriptorStore.create(tmp_path / "s", 20, _spec())
    good = _batch(rng, 10)
    before = {k: np.array(store.array(k)) for k in store.names}

    bad = dict(good, z1=good["z1"][:, :7])
    with pytest.raises(ValueError, match="'z1'.*expected shape \\(rows, 8\\)"):
        store.write(0, bad)
    bad = dict(good, labels=good["labels"][:, None])
    with pytest.raises(ValueError, match="'labels'"):
        store.write(0, bad)
    bad = {k: v for k, v in good.items() if k != "g0"}
    with pytest.raises(ValueError, match="missing.*g0"):
        store.write(0, bad)
    with pytest.raises(ValueError, match="unknown.*extra"):
        store.write(0, dict(good, extra=good["z0"]))
    bad = dict(good, g1=good["g1"][:9])
    with pytest.raises(ValueError, match="'g1'.*9 rows"):
        store.write(0, bad)
    with pytest.raises(ValueError, match="past the end"):
        store.write(11, good)
    with pytest.raises(TypeError, match="'labels'"):
        store.write(0, dict(good, labels=good["labels"].astype(np.float32)))
    with pytest.raises(ValueError, match="'z0'.*overflow float16"):
        store.write(0, dict(good, z0=good["z0"] * 1e6))
    for k in store.names:
        np.testing.assert_array_equal(store.array(k), before[k])

    assert store.write(10, good) == 20  # exactly up to n is fine
    store.commit(20)
    with pytest.raises(ValueError):
        store.write(20, _batch(rng, 1))


def test_write_accepts_torch_and_casts(tmp_path):
    torch = pytest.importorskip("torch")
    store = DescriptorStore.create(tmp_path / "s", 4, {"z0": ((3,), "float16"), "labels": ((), "int64")})
    z = torch.randn(4, 3, dtype=torch.float64)
    store.write(0, {"z0": z, "labels": torch.arange(4, dtype=torch.int32)})
    store.commit(4)
    np.testing.assert_array_equal(store.rows("z0"), z.numpy().astype(np.float16))
    assert store.rows("labels").dtype == np.int64


def test_descriptors_prefixes_and_errors(tmp_path, rng):
    n = 6
    spec = {"z0": ((4,), "float16"), "z1": ((2,), "float16"),
            "g_true0": ((4,), "float32"), "g_true1": ((2,), "float32"),
            "g0": ((4,), "float16"), "g1": ((2,), "float16")}
    store = DescriptorStore.create(tmp_path / "s", n, spec)
    batch = {k: rng.standard_normal((n, *tail)).astype(np.float32) for k, (tail, _) in spec.items()}
    store.write(0, batch)
    store.commit(n)
    d = store.descriptors(z_prefix="z", g_prefix="g_true")
    np.testing.assert_array_equal(d.g[1], batch["g_true1"])
    d = store.descriptors()
    np.testing.assert_array_equal(d.g[0], batch["g0"].astype(np.float16))
    assert store.descriptors(g_prefix=None).g is None
    assert store.descriptors(rows=3).n == 3
    with pytest.raises(ValueError, match="rows"):
        store.descriptors(rows=n + 1)
    with pytest.raises(ValueError, match="no array x0"):
        store.descriptors(z_prefix="x")

    s2 = DescriptorStore.create(tmp_path / "s2", 3, {"z0": ((2,), "float16"), "z1": ((2,), "float16"),
                                                     "g0": ((2,), "float16")})
    with pytest.raises(ValueError, match="scales"):
        s2.descriptors()
    s3 = DescriptorStore.create(tmp_path / "s3", 3, {"z0": ((2,), "float16"), "z2": ((2,), "float16")})
    with pytest.raises(ValueError, match="gaps"):
        s3.descriptors()


@pytest.mark.filterwarnings("error:The given NumPy array is not writable")  # pyfk must not leak it
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_topk_from_store_matches_in_memory(tmp_path, rng, backend):
    if not any(b["name"] == backend and b["available"] for b in pyfk.backends()):
        pytest.skip(f"backend {backend} unavailable")
    path = tmp_path / "pool"
    n, widths = 300, (32, 16, 8)
    store = DescriptorStore.create(path, n, _spec(widths))
    for start in range(0, n, 128):
        rows = min(128, n - start)
        store.write(start, _batch(rng, rows, widths, start=start))
        store.commit(start + rows)
    assert store.complete
    store.close()

    pool = DescriptorStore.open(path).descriptors()
    in_memory = pyfk.Descriptors([np.array(a, dtype=np.float32) for a in pool.z],
                                 [np.array(a, dtype=np.float32) for a in pool.g])
    q = pyfk.Descriptors([rng.standard_normal((9, L)).astype(np.float32) for L in widths],
                         [rng.standard_normal((9, L)).astype(np.float32) for L in widths])
    s_store, i_store = pyfk.topk(q, pool, k=5, backend=backend)
    s_mem, i_mem = pyfk.topk(q, in_memory, k=5, backend=backend)
    np.testing.assert_allclose(s_store, s_mem, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(i_store, i_mem)


def test_partial_store_topk(tmp_path, rng):
    """A reader of an unfinished store searches only the committed rows."""
    path = tmp_path / "pool"
    store = DescriptorStore.create(path, 40, _spec())
    store.write(0, _batch(rng, 25))
    store.commit(25)
    store.write(25, _batch(rng, 15, start=25))
    pool = DescriptorStore.open(path).descriptors()
    q = pyfk.Descriptors([rng.standard_normal((3, L)).astype(np.float32) for L in WIDTHS],
                         [rng.standard_normal((3, L)).astype(np.float32) for L in WIDTHS])
    _, index = pyfk.topk(q, pool, k=25, backend="cpu")
    assert sorted(np.asarray(index[0]).tolist()) == list(range(25))
