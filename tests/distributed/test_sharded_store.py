"""Sharded extraction and pyfk.ShardedStore (issue #11, part 3; DESIGN.md section 9).

pyfk.extract(..., store=DIR) on 2 and 3 gloo ranks writes DIR/shard-RRRRR-of-WWWWW/ and
DIR/sharded.json; ShardedStore.open(DIR) in one process reads them as one pool that equals a
single-process extraction row for row, and pyfk.topk / pyfk.select / pyfk.acquire on it equal the
same calls on the single-process store. Uneven splits and ranks without rows; a rank failing
mid-extraction raises on every rank and a rerun resumes only its shard; errors name the path and
what was expected; the one-pool view reads a chunk at a time (memory O(chunk), not O(N x D)).

The rank functions are module-level (the harness spawns fresh processes that import this module)
and each run_ranks call does several checks: starting a rank costs seconds on 2 vCPUs.
"""

import json
import multiprocessing as mp
import os
import queue
import shutil
import time
import tracemalloc

import harness
import numpy as np
import pytest
import torch
from harness import run_ranks

import pyfk
from pyfk.features.sharded import MANIFEST, ConcatRows, ShardedStore, shard_name, split_rows
from pyfk.features.store import DescriptorStore

LAYERS = ["0", "2", "4"]
SETTINGS = dict(with_true=True, badge=True)  # every kind of array a store holds: g_true, BADGE factors


class Rows(torch.utils.data.Dataset):
    """n seeded (x, y) rows; reading row `fail_at` raises (a rank dying mid-extraction); counts reads."""

    def __init__(self, n, fail_at=None, die=False):
        gen = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 12, generator=gen), torch.randint(0, 5, (n,), generator=gen)
        self.fail_at, self.die, self.reads = fail_at, die, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.fail_at:
            if self.die:
                os._exit(9)  # the process dies (like SIGKILL): no exception, no cleanup
            raise RuntimeError(f"example {i} cannot be read")
        self.reads += 1
        return self.x[i], self.y[i]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 5))


def _loader(dataset, batch, **kwargs):
    return torch.utils.data.DataLoader(dataset, batch_size=batch, **kwargs)


def _error(fn):
    """(exception type name, message) of fn(), or None."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test compares them
        return type(exc).__name__, str(exc)
    return None


# ----------------------------------------------------------------------------- on the ranks

def _extract_on_ranks(rank, world, root, problems, other, hide_shard):
    """Sharded extractions of (name, n, batch) problems under root; returns what the parent checks."""
    out = {}
    for name, n, batch in problems:
        path = os.path.join(root, name)
        ext = pyfk.extract(_model(), _loader(Rows(n), batch), LAYERS, store=path, **SETTINGS)
        rerun = Rows(n)
        pyfk.extract(_model(), _loader(rerun, batch), LAYERS, store=path, **SETTINGS)  # complete: nothing to do
        with ShardedStore.open(path) as opened:
            local = opened.local()
            out[name] = {"shard": ext.meta["shard"], "len": len(ext), "ids": np.asarray(ext.ids),
                         "rerun_reads": rerun.reads, "offset": opened.offset, "offsets": opened.offsets,
                         "local_n": local.n, "local_z0": np.array(local.rows("z0")),
                         "whole": _error(lambda e=ext, s=opened: pyfk.topk(e.descriptors, s, k=1))}
    if other is not None:  # a store written by another number of ranks
        out["other_world"] = _error(lambda: ShardedStore.open(other))
    if hide_shard is not None:  # the last rank's shard goes missing: every rank raises
        path = os.path.join(root, hide_shard)
        mine = os.path.join(path, shard_name(rank, world))
        if rank == world - 1:
            os.rename(mine, mine + ".away")
        out["missing"] = _error(lambda: ShardedStore.open(path))
        if rank == world - 1:
            os.rename(mine + ".away", mine)
    return out


def _fail_then_resume(rank, world, root, n, batch, fail_at):
    """Rank 1 fails reading row `fail_at` (after committing a batch); every rank must raise, nothing
    is recorded complete; the rerun resumes only the unfinished shard. Also: a shuffling loader and
    a bad argument on one rank raise on every rank."""
    out = {}
    path = os.path.join(root, "resumed")
    out["failed"] = _error(lambda: pyfk.extract(_model(), _loader(Rows(n, fail_at), batch), LAYERS, store=path,
                                                **SETTINGS))
    out["manifest_after_failure"] = os.path.exists(os.path.join(path, MANIFEST))
    with DescriptorStore.open(os.path.join(path, shard_name(rank, world))) as shard:
        out["after_failure"] = (shard.rows_done, shard.n, shard.complete)
    rerun = Rows(n)
    ext = pyfk.extract(_model(), _loader(rerun, batch), LAYERS, store=path, **SETTINGS)
    out["rerun_reads"], out["len"] = rerun.reads, len(ext)

    out["shuffled"] = _error(lambda: pyfk.extract(_model(), _loader(Rows(n), batch, shuffle=True), LAYERS,
                                                  store=os.path.join(root, "shuffled")))
    layers = ["0", "2", "nope"] if rank == 1 else LAYERS
    out["bad_layer"] = _error(lambda: pyfk.extract(_model(), _loader(Rows(n), batch), layers,
                                                   store=os.path.join(root, "bad_layer")))
    out["lengths"] = _error(lambda: pyfk.extract(_model(), _loader(Rows(n + rank), batch), LAYERS,
                                                 store=os.path.join(root, "lengths")))
    return out


def _die_or_resume(rank, world, root, n, batch, die_at):
    """With die_at: rank 1 dies reading row die_at, the others report how they failed; without:
    the rerun, reporting how many rows each rank read."""
    path = os.path.join(root, "died")
    data = Rows(n, die_at if rank == 1 else None, die=True)
    start = time.monotonic()
    error = _error(lambda: pyfk.extract(_model(), _loader(data, batch), LAYERS, store=path, **SETTINGS))
    return {"error": error, "seconds": time.monotonic() - start, "reads": data.reads}


def _run_ranks_one_dies(fn, world, args, timeout=60.0):
    """Like harness.run_ranks, for a run in which some rank dies: {rank: result} of the ranks that
    reported within `timeout`, and the exit codes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = harness.free_port()
    procs = [ctx.Process(target=harness._rank_main, args=(fn, r, world, port, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    got, deadline = {}, time.monotonic() + timeout
    try:
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, ok, value = results.get(timeout=0.5)
                got[rank] = value if ok else AssertionError(value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    break
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    return got, [p.exitcode for p in procs]


def test_a_rank_that_dies_fails_the_others_at_once_and_a_rerun_resumes(tmp_path):
    got, codes = _run_ranks_one_dies(_die_or_resume, 2, (str(tmp_path), 11, 3, 9))
    assert codes[1] == 9 and set(got) == {0}, (codes, got)
    kind, message = got[0]["error"]  # rank 0 finished its shard, then found rank 1 gone: no hang
    assert kind == "RuntimeError" and got[0]["seconds"] < 30, got[0]
    assert not (tmp_path / "died" / MANIFEST).exists()
    with DescriptorStore.open(tmp_path / "died" / shard_name(1, 2)) as shard:
        assert (shard.rows_done, shard.complete) == (3, False)  # its first batch was committed
    rerun = run_ranks(_die_or_resume, 2, (str(tmp_path), 11, 3, None))
    assert [r["error"] for r in rerun] == [None, None]
    assert [r["reads"] for r in rerun] == [0, 2]  # rank 1 resumed after its committed batch (the dead
    single = _single(str(tmp_path / "single"), 11, 3)  # writer's lock went with it)
    with ShardedStore.open(tmp_path / "died") as sharded:
        _assert_same_rows(sharded, single)


# ----------------------------------------------------------------------------- in this process

def _single(path, n, batch):
    """The single-process extraction of the same problem into a plain store (1 thread, like the ranks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pyfk.extract(_model(), _loader(Rows(n), batch), LAYERS, store=path, **SETTINGS)
    finally:
        torch.set_num_threads(threads)
    return DescriptorStore.open(path)


def _assert_same_rows(sharded: ShardedStore, single: DescriptorStore, exact=True):
    assert sharded.names == single.names and sharded.n == single.n
    for name in single.names:
        got, want = np.asarray(sharded.rows(name)), np.asarray(single.rows(name))
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if exact or want.dtype.kind != "f":
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=2e-3, atol=2e-3,
                                       err_msg=name)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """N = 11 over 2 ranks (6 + 5 rows, batches of 3), written once for the tests below."""
    root = tmp_path_factory.mktemp("two_ranks")
    results = run_ranks(_extract_on_ranks, 2, (str(root), [("pool", 11, 3)], None, None))
    single = _single(str(root / "single"), 11, 3)
    return root, results, single


def test_two_ranks_equal_one_process_row_for_row(two_ranks):
    root, results, single = two_ranks
    path = root / "pool"
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["world"] == 2 and manifest["n"] == 11
    assert manifest["rows"] == [6, 5] and manifest["offsets"] == [0, 6, 11]
    assert manifest["shards"] == ["shard-00000-of-00002", "shard-00001-of-00002"]
    assert manifest["widths"] == [16, 9, 5] and manifest["dtype"] == "float16"
    assert sorted(os.listdir(path)) == sorted([MANIFEST, *manifest["shards"]])  # no temp manifest left behind
    for rank, res in enumerate(results):
        r = res["pool"]
        lo, hi = (0, 6) if rank == 0 else (6, 11)
        assert r["shard"] == {"rank": rank, "world": 2, "offset": lo, "rows": hi - lo, "n": 11,
                              "offsets": [0, 6, 11], "dir": str(path)}
        assert r["len"] == r["local_n"] == hi - lo and r["offset"] == lo
        np.testing.assert_array_equal(r["ids"], np.arange(lo, hi))  # global example ids
        np.testing.assert_array_equal(r["local_z0"], np.asarray(single.rows("z0"))[lo:hi])
        assert r["rerun_reads"] == 0  # a rerun finds its shard complete
        kind, message = r["whole"]  # in a group the store is this rank's shard, not a pool for pyfk.topk
        assert kind == "ValueError" and ".local()" in message and "pyfk.distributed" in message
    with ShardedStore.open(path) as sharded:
        assert sharded.rank is None and sharded.world == 2 and sharded.sizes == [6, 5]
        np.testing.assert_array_equal(sharded.offsets, [0, 6, 11])
        _assert_same_rows(sharded, single)
        assert isinstance(sharded.rows("z0"), ConcatRows)
        assert isinstance(sharded.rows("z0").parts[0], np.memmap)  # the shards' own memmaps, no copy
        badge = sharded.descriptors(z_prefix="badge_h", g_prefix="badge_e", same_widths=False)
        assert badge.n == 11 and badge.widths == [10]


def test_topk_select_acquire_on_the_sharded_pool_equal_the_single_store(two_ranks):
    root, _, single = two_ranks
    val = pyfk.extract(_model(), _loader(Rows(7), 7), LAYERS, with_true=True)
    with ShardedStore.open(root / "pool") as sharded:
        for combine in ("product", "features"):
            got = pyfk.topk(val.grad_true, sharded, k=4, combine=combine)
            want = pyfk.topk(val.grad_true, single, k=4, combine=combine)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])
        for backend in ("cpu", "torch"):
            got = pyfk.topk(val.grad_true, sharded, k=3, exclude=[0, 5, 6, 10], backend=backend)
            want = pyfk.topk(val.grad_true, single, k=3, exclude=[0, 5, 6, 10], backend=backend)
            np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(
            pyfk.select(sharded, val.grad_true, budget=5, val_labels=val.labels, val_pred=val.pred, exclude=[1, 7]),
            pyfk.select(single, val.grad_true, budget=5, val_labels=val.labels, val_pred=val.pred, exclude=[1, 7]))
        val_inputs = pyfk.ValInputs(val.grad_true, val.labels, val.pred)
        inputs = {"pfk": lambda s: pyfk.PoolInputs(descriptors=s),
                  "coreset": lambda s: pyfk.PoolInputs(features=s),
                  "badge": lambda s: pyfk.PoolInputs(badge=s.descriptors(z_prefix="badge_h", g_prefix="badge_e",
                                                                         same_widths=False))}
        for name, pool_inputs in inputs.items():
            got = pyfk.acquire(name, pool_inputs(sharded), 4, labeled=[2, 9], seed=3, val=val_inputs)
            want = pyfk.acquire(name, pool_inputs(single), 4, labeled=[2, 9], seed=3, val=val_inputs)
            np.testing.assert_array_equal(got.indices, want.indices, err_msg=name)
            np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, err_msg=name)


def test_three_ranks_uneven_and_empty_shards_and_group_errors(two_ranks, tmp_path):
    problems = [("uneven", 11, 4), ("tiny", 2, 4)]  # 4 + 4 + 3 rows; 1 + 1 + 0 rows (N < W)
    results = run_ranks(_extract_on_ranks, 3, (str(tmp_path), problems, str(two_ranks[0] / "pool"), "uneven"))
    expect = {"uneven": [0, 4, 8, 11], "tiny": [0, 1, 2, 2]}
    for name, n, batch in problems:
        assert json.loads((tmp_path / name / MANIFEST).read_text())["offsets"] == expect[name]
        for rank, res in enumerate(results):
            lo, hi = expect[name][rank], expect[name][rank + 1]
            assert res[name]["len"] == res[name]["local_n"] == hi - lo
            np.testing.assert_array_equal(res[name]["ids"], np.arange(lo, hi))
        single = _single(str(tmp_path / f"single-{name}"), n, batch)
        with ShardedStore.open(tmp_path / name) as sharded:
            assert sharded.sizes == np.diff(expect[name]).tolist()
            _assert_same_rows(sharded, single, exact=name == "uneven")  # "tiny": other batches than one process
        assert DescriptorStore.open(tmp_path / "tiny" / shard_name(2, 3)).complete  # the empty shard
    for rank, res in enumerate(results):
        kind, message = res["other_world"]
        assert kind == "ValueError" and "written by 2 ranks" in message and "has 3" in message
        kind, message = res["missing"]  # rank 2's shard is missing: every rank raises
        assert kind == "ValueError" and "shard 2 of 3" in message and "is missing" in message
        if rank < 2:
            assert message.startswith("rank 2 of 3: ")


def test_a_failing_rank_raises_everywhere_and_a_rerun_resumes_its_shard(tmp_path):
    # N = 11 over 2 ranks: rank 1 holds rows 6..10 in batches [6, 7, 8], [9, 10]; reading row 9 fails
    results = run_ranks(_fail_then_resume, 2, (str(tmp_path), 11, 3, 9))
    (kind0, message0), (kind1, message1) = results[0]["failed"], results[1]["failed"]
    assert kind1 == "RuntimeError" and "example 9 cannot be read" in message1
    assert kind0 == "RankFailed" and message0.startswith("RuntimeError on rank 1 of 2: ")
    assert not results[0]["manifest_after_failure"] and not results[1]["manifest_after_failure"]
    assert results[0]["after_failure"] == (6, 6, True)  # rank 0 finished its shard
    assert results[1]["after_failure"] == (3, 5, False)  # rank 1 committed its first batch only
    assert results[0]["rerun_reads"] == 0 and results[1]["rerun_reads"] == 2  # rows 9 and 10 only
    single = _single(str(tmp_path / "single"), 11, 3)
    with ShardedStore.open(tmp_path / "resumed") as sharded:
        _assert_same_rows(sharded, single)  # equals an uninterrupted run
    for rank, res in enumerate(results):
        kind, message = res["shuffled"]
        assert kind == "ValueError" and "shuffle=False" in message and "RandomSampler" in message
        kind, message = res["bad_layer"]  # rank 1's argument is bad: rank 0 raises too
        assert kind == "ValueError" and "'nope'" in message
        assert message.startswith("rank 1 of 2: ") == (rank == 0)
        kind, message = res["lengths"]
        assert kind == "ValueError" and "[11, 12]" in message
    assert not (tmp_path / "bad_layer" / MANIFEST).exists()


# ----------------------------------------------------------------------------- errors, in one process

def _copy(two_ranks, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(two_ranks[0] / "pool", dst)
    return dst


def _edit_json(file, **changes):
    m = json.loads(file.read_text())
    m.update(changes)
    file.write_text(json.dumps(m))


def test_errors_name_the_path_and_what_was_expected(two_ranks, tmp_path):
    with pytest.raises(ValueError, match=r"no such directory"):
        ShardedStore.open(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is not a directory"):
        ShardedStore.open(tmp_path / "file")
    with pytest.raises(ValueError, match=r"has no sharded.json \(it holds manifest.json: a DescriptorStore"):
        ShardedStore.open(two_ranks[0] / "single")

    path = _copy(two_ranks, tmp_path)
    (path / MANIFEST).unlink()  # an unfinished extraction
    with pytest.raises(ValueError, match=r"has no sharded.json \(it holds shard directories.*rerun"):
        ShardedStore.open(path)
    shutil.rmtree(path)

    path = _copy(two_ranks, tmp_path)
    shutil.rmtree(path / shard_name(1, 2))
    with pytest.raises(ValueError, match=rf"shard 1 of 2 \({path / shard_name(1, 2)}\) is missing; .* 5 rows"):
        ShardedStore.open(path)
    shutil.rmtree(path)

    path = _copy(two_ranks, tmp_path)
    _edit_json(path / shard_name(0, 2) / "manifest.json", rows_done=3, complete=False)
    with pytest.raises(ValueError, match=r"shard 0 of 2 .* is incomplete: 3 of 6 rows"):
        ShardedStore.open(path)
    shutil.rmtree(path)

    path = _copy(two_ranks, tmp_path)  # shard 1 replaced by a store of other widths
    other = {name: (((8,) if name[0] in "zg" else spec[0]), spec[1]) for name, spec in
             ((k, (tuple(v["shape"]), v["dtype"])) for k, v in
              json.loads((path / MANIFEST).read_text())["arrays"].items())}
    with DescriptorStore.create(path / shard_name(1, 2), 5, other, overwrite=True) as replaced:
        replaced.commit(5)
    with pytest.raises(ValueError, match=r"shard 1 of 2 .* does not match sharded.json \(widths or arrays differ "
                                         r"across the shards\): g0 has rows of shape \(8,\) float16, expected "
                                         r"\(16,\) float16"):
        ShardedStore.open(path)
    shutil.rmtree(path)

    path = _copy(two_ranks, tmp_path)
    _edit_json(path / MANIFEST, rows=[5, 6])
    with pytest.raises(ValueError, match=r"offsets \[0, 6, 11\] must be the running sums of rows \[5, 6\]"):
        ShardedStore.open(path)
    _edit_json(path / MANIFEST, rows=[6, 5], format="something")
    with pytest.raises(ValueError, match=r"not a valid sharded store manifest: format"):
        ShardedStore.open(path)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot be read as JSON"):
        ShardedStore.open(path)
    with pytest.raises(ValueError, match=r"local: True needs an initialised process group"):
        ShardedStore.open(two_ranks[0] / "pool", local=True)


def test_one_process_extraction_refuses_another_world_size_or_a_plain_store(two_ranks, tmp_path):
    path = _copy(two_ranks, tmp_path)
    model, loader = _model(), _loader(Rows(11), 3)
    with pytest.raises(ValueError, match=r"written by 2 ranks .*this process group has 1"):
        pyfk.extract(model, loader, LAYERS, store=path, sharded=True, **SETTINGS)
    with pytest.raises(ValueError, match=r"is a DescriptorStore written by one process"):
        pyfk.extract(model, loader, LAYERS, store=two_ranks[0] / "single", sharded=True, **SETTINGS)
    with pytest.raises(ValueError, match=r"sharded: True .* needs store=DIR"):
        pyfk.extract(model, loader, LAYERS, sharded=True)
    (path / MANIFEST).unlink()  # the shards of an unfinished extraction by 2 ranks
    with pytest.raises(ValueError, match=r"unfinished extraction by \[2\] ranks"):
        pyfk.extract(model, loader, LAYERS, store=path, sharded=True, **SETTINGS)
    ext = pyfk.extract(model, loader, LAYERS, store=path, sharded=True, overwrite=True, **SETTINGS)  # one shard
    assert ext.meta["shard"]["world"] == 1 and len(ext) == 11
    with ShardedStore.open(path) as one:
        assert one.world == 1 and one.sizes == [11]
        _assert_same_rows(one, two_ranks[2])


# ----------------------------------------------------------------------------- the one-pool view

def test_split_rows():
    for n, world in [(11, 2), (11, 3), (2, 3), (0, 4), (12, 4), (1, 1)]:
        offsets = split_rows(n, world)
        sizes = np.diff(offsets)
        assert offsets[0] == 0 and offsets[-1] == n and len(sizes) == world
        assert sizes.max() - sizes.min() <= 1 and (np.diff(sizes) <= 0).all()  # the first n % world one larger


def test_concat_rows_indexes_like_the_concatenated_array(rng):
    parts = [rng.standard_normal((k, 3)).astype(np.float16) for k in (4, 0, 1, 6)]
    a, whole = ConcatRows(parts), np.concatenate(parts)
    assert a.shape == whole.shape and a.dtype == whole.dtype and a.ndim == 2 and len(a) == 11
    keys = [0, 3, 4, -1, -11, np.int64(7), slice(None), slice(2, 9), slice(4, 5), slice(9, 2, -2), slice(None, None, 3),
            slice(20, 30), [10, 0, 4, 4], np.array([5, 6, 7]), np.array([], dtype=np.int64),
            rng.integers(0, 11, size=(2, 3)), rng.random(11) < 0.5, torch.tensor([1, 2]), (slice(3, 7), 1),
            (2, slice(0, 2)), ([1, 9], 2), (np.array([3, 4]), slice(1, None))]
    for key in keys:
        got, want = a[key], whole[key]
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype, key
        np.testing.assert_array_equal(got, want, err_msg=repr(key))
    assert np.shares_memory(a[5:10], parts[3])  # rows inside one part: a view of it
    np.testing.assert_array_equal(np.asarray(a), whole)
    for bad in (11, -12, [0, 11], np.array([0.5]), ([1, 9], [0, 2])):
        with pytest.raises(IndexError):
            a[bad]
    with pytest.raises(TypeError, match="read-only"):
        a[0] = 1


def test_the_pool_is_read_a_chunk_at_a_time(tmp_path, rng, monkeypatch):
    """Memory beyond the mapped files stays O(chunk): the engine never asks the one-pool view for more
    rows than a chunk, never converts it whole, and its peak allocation is far below the pool's size."""
    from pyfk.engine.kernels import cpu as cpu_kernels

    widths, sizes = (48, 40), (3000, 2500, 3500)
    spec = {f"{p}{j}": ((w,), "float16") for j, w in enumerate(widths) for p in "zg"}
    parts = []
    for i, n in enumerate(sizes):
        store = DescriptorStore.create(tmp_path / f"s{i}", n, spec)
        store.write(0, {name: rng.standard_normal((n, w[0])) for name, (w, _) in spec.items()})
        store.commit(n)
        store.close()
        parts.append(DescriptorStore.open(tmp_path / f"s{i}"))
    z = [ConcatRows([p.rows(f"z{j}") for p in parts]) for j in range(2)]
    g = [ConcatRows([p.rows(f"g{j}") for p in parts]) for j in range(2)]
    pool = pyfk.Descriptors(z, g)
    whole = pyfk.Descriptors([np.asarray(a) for a in z], [np.asarray(a) for a in g])
    queries = pyfk.Descriptors([rng.standard_normal((20, w)).astype(np.float32) for w in widths],
                               [rng.standard_normal((20, w)).astype(np.float32) for w in widths])
    chunk = 700
    monkeypatch.setattr(cpu_kernels, "chunk_rows", lambda m, width: chunk)
    largest = []
    real_getitem = ConcatRows.__getitem__

    def getitem(self, key):
        out = real_getitem(self, key)
        largest.append(out.shape[0] if out.ndim == 2 else 1)
        return out

    def whole_copy(self, *args, **kwargs):
        raise AssertionError("the engine converted the whole pool")

    monkeypatch.setattr(ConcatRows, "__getitem__", getitem)
    monkeypatch.setattr(ConcatRows, "__array__", whole_copy)
    tracemalloc.start()
    try:
        got = pyfk.topk(queries, pool, k=5, backend="cpu")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert max(largest) <= chunk
    pool_bytes = sum(sizes) * 2 * sum(widths) * 4  # the pool as float32
    assert peak < pool_bytes / 4, (peak, pool_bytes)
    monkeypatch.undo()
    want = pyfk.topk(queries, whole, k=5, backend="cpu")
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])
    for p in parts:
        p.close()
