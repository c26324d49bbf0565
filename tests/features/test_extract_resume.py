"""pyfk.extract into a store: killed with SIGKILL at random points (during create, writes and
commits) and resumed, the store is byte-identical to an uninterrupted run; bad batches (NaN/Inf,
labels outside the class range, values float16 cannot hold) raise naming the example ids and
commit nothing (issue 9 items 9, 12 and the SIGKILL test)."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyfk
from pyfk.features.store import DescriptorStore

ROOT = str(Path(pyfk.__file__).resolve().parents[1])  # the checkout under test (the children import it)
LOCK = ".pyfk.lock"
N, BATCH = 96, 8

# A zygote: one interpreter imports torch and pyfk once (2+ s) and forks a fresh process per run, so
# that six runs fit in a few seconds. Each run is its own process (own files, own lock), killed with
# SIGKILL by the test. A run does one deterministic extraction; "slow" runs announce and stretch the
# steps a kill should land in: array allocation (create), memmap writes, and commits (before and after
# the manifest is replaced).
_ZYGOTE = textwrap.dedent(f"""
    import json, os, sys, time, traceback
    import torch
    torch.set_num_threads(1)
    from torch.utils.data import DataLoader, TensorDataset
    import pyfk
    from pyfk.features import store as store_mod
    from pyfk.features.store import DescriptorStore

    def say(*words):
        print(*words, flush=True)

    def slow_down():
        if hasattr(store_mod, "_allocate"):
            real_allocate = store_mod._allocate
            def allocate(file, spec):
                say("alloc")
                time.sleep(0.01)
                return real_allocate(file, spec)
            store_mod._allocate = allocate
        real_write = DescriptorStore.write
        def write(self, start, batch):
            say("write", start)
            out = real_write(self, start, batch)
            time.sleep(0.01)
            say("written", start)
            return out
        DescriptorStore.write = write
        real_replace = os.replace
        def replace(src, dst, *args, **kwargs):
            if os.path.basename(str(dst)) != "manifest.json":
                return real_replace(src, dst, *args, **kwargs)
            with open(src, encoding="utf-8") as f:
                m = json.load(f)
            say("commit", m["rows_done"])
            time.sleep(0.02)
            real_replace(src, dst, *args, **kwargs)
            say("committed", m["rows_done"])
            time.sleep(0.02)
        os.replace = replace

    def run(path, mode):
        if mode == "slow":
            slow_down()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 9),
                                    torch.nn.Tanh(), torch.nn.Linear(9, 5))
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn({N}, 12, generator=gen), torch.randint(0, 5, ({N},), generator=gen)
        loader = DataLoader(TensorDataset(x, y), batch_size={BATCH})
        say("start")
        pyfk.extract(model, loader, ["0", "2", "4"], pseudo_label="true", with_true=True, badge=True,
                     projection={{"0": 8}}, store=path)
        say("done")

    say("ready")
    for line in sys.stdin:
        path, mode = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(path, mode)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        say("child", pid)
        _, status = os.waitpid(pid, 0)
        say("exit", -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
""")


class _Zygote:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert self.proc.stdout.readline().strip() == "ready", self.proc.stderr.read()[-3000:]

    def run(self, path, mode, kill_when=None):
        """One run in a fresh process; SIGKILL it at the first announced event for which
        kill_when(event, args, counts) is true, or `kill_when` seconds after it starts (a float).
        Returns (exit status, events)."""
        self.proc.stdin.write(f"{path} {mode}\n")
        self.proc.stdin.flush()
        head = self.proc.stdout.readline().split()
        assert head[:1] == ["child"], (head, self.proc.stderr.read()[-3000:] if self.proc.poll() is not None else "")
        pid, events, counts = int(head[1]), [], {}
        for line in self.proc.stdout:
            word, *args = line.split()
            if word == "exit":
                return int(args[0]), events
            counts[word] = counts.get(word, 0) + 1
            events.append((word, *args))
            if isinstance(kill_when, float):
                if word == "start":
                    time.sleep(kill_when)
                    _kill(pid)
            elif kill_when is not None and kill_when(word, args, counts):
                _kill(pid)
        raise AssertionError(f"the zygote died: {self.proc.stderr.read()[-3000:]}")

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it had finished already
        pass


def _files(path):
    """{name: bytes} of the store's files: arrays and manifest (the lock file, which holds a pid, left out)."""
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir()) if p.name != LOCK}


def test_sigkill_at_random_points_then_resume_is_byte_identical(tmp_path, rng):
    zygote = _Zygote()
    try:
        status, _ = zygote.run(tmp_path / "reference", "plain")  # uninterrupted
        assert status == 0, zygote.proc.stderr.read()[-3000:]
        path = tmp_path / "killed"
        arrays = 3 * 3 + 5 + 2  # z, g, g_true per layer; probs, pred, pseudo, labels, ids; BADGE factors
        k_alloc, k_commit, k_written = (int(k) for k in rng.integers(1, [arrays, 4, 4]))
        plan = [
            # during create: some array files allocated, no manifest yet (a pyfk without an
            # allocation step: at the first write)
            lambda w, a, c: (w == "alloc" and c[w] == k_alloc) or (w == "write" and "alloc" not in c),
            # a commit whose manifest is in its temp file but not yet in place
            lambda w, a, c: w == "commit" and c[w] == k_commit,
            # between the memmap write of a batch and its commit
            lambda w, a, c: w == "written" and c[w] == k_written,
            # anywhere
            float(rng.uniform(0.0, 0.3)),
            # right after the commit that completes the store
            lambda w, a, c: w == "committed" and int(a[0]) == N,
        ]
        done_before = []
        for kill_when in plan:
            status, events = zygote.run(path, "slow", kill_when)
            assert status in (0, -signal.SIGKILL), (events, zygote.proc.stderr.read()[-3000:])
            if (path / "manifest.json").exists():
                store = DescriptorStore.open(path)  # whatever the kill point: a valid store
                done_before.append(store.rows_done)
                assert store.rows_done % BATCH == 0
                del store
        assert done_before == sorted(done_before)  # committed rows never go backwards
        status, events = zygote.run(path, "slow")  # the last run completes it (or finds it complete)
        assert status == 0 and ("done",) in events, zygote.proc.stderr.read()[-3000:]
    finally:
        zygote.close()

    want, got = _files(tmp_path / "reference"), _files(path)
    assert sorted(got) == sorted(want)  # no temp manifest or other leftover either
    manifest = json.loads(got["manifest.json"])
    assert manifest["complete"] and manifest["meta"]["extract"]["layers"] == ["0", "2", "4"]
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run (last run: {events})"


# ----------------------------------------------------------------------------- bad batches

def _case(n=12, classes=5, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 9), torch.nn.Tanh(),
                                torch.nn.Linear(9, classes))
    gen = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(n, 12, generator=gen), torch.randint(0, classes, (n,), generator=gen), ["0", "2", "4"]


def _loader(x, y, ids=None, batch_size=4):
    tensors = (x, y) if ids is None else (x, y, ids)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["memory", "store"])
def test_non_finite_values_raise_naming_the_example_ids(tmp_path, bad, where):
    model, x, y, layers = _case()
    ids = torch.arange(100, 112)
    x_bad = x.clone()
    x_bad[9, 3] = bad  # batch 2 (rows 8..11), example id 109
    kw = {} if where == "memory" else {"store": tmp_path / "s"}
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or Inf\) in z0 \(layer '0'\), g0 \(layer '0'\)"
                                         r".* for example ids \[109\] \(batch 2\)"):
        pyfk.extract(model, _loader(x_bad, y, ids), layers, with_true=True, **kw)
    if where == "store":
        store = DescriptorStore.open(tmp_path / "s")
        assert store.rows_done == 8 and not store.complete  # nothing of batch 2 committed
        assert np.isfinite(store.rows("z0")).all()
        del store
        # resumable at the previous batch: with the input fixed, it completes like a clean run
        resumed = pyfk.extract(model, _loader(x, y, ids), layers, with_true=True, **kw)
        clean = pyfk.extract(model, _loader(x, y, ids), layers, with_true=True, store=tmp_path / "clean")
        for j in range(3):
            np.testing.assert_array_equal(resumed.descriptors.g[j], clean.descriptors.g[j])
        np.testing.assert_array_equal(resumed.ids, np.arange(100, 112))


def test_a_diverged_model_is_named_too():
    model, x, y, layers = _case()
    with torch.no_grad():
        model[4].weight[2, 0] = float("nan")  # every logit row is NaN from here on
    with pytest.raises(ValueError, match=r"in g0 \(layer '0'\).*probs for example ids \[0, 1, 2, 3\] \(batch 0\)"):
        pyfk.extract(model, _loader(x, y), layers)


@pytest.mark.parametrize("label", [99, 5, -1, -7])
@pytest.mark.parametrize("how", [dict(pseudo_label="true"), dict(with_true=True)])
@pytest.mark.parametrize("where", ["memory", "store"])
def test_labels_outside_the_class_range_are_a_value_error(tmp_path, label, how, where):
    model, x, y, layers = _case(classes=5)
    y_bad = y.clone()
    y_bad[6] = label  # batch 1, example id 6
    kw = dict(how) if where == "memory" else dict(how, store=tmp_path / "s")
    msg = rf"labels: expected class indices in \[0, 5\) \(the model returns 5 classes\), got \[{label}\] " \
          r"for example ids \[6\] \(batch 1\)"
    with pytest.raises(ValueError, match=msg):
        pyfk.extract(model, _loader(x, y_bad), layers, **kw)
    if where == "store":
        store = DescriptorStore.open(tmp_path / "s")
        assert store.rows_done == 4 and not store.complete
        del store
        assert len(pyfk.extract(model, _loader(x, y), layers, **kw)) == 12


def test_labels_unused_by_the_gradients_are_not_range_checked():
    """An unlabeled pool marked -1 (torchvision's STL-10) with argmax pseudo-labels is fine."""
    model, x, _, layers = _case()
    out = pyfk.extract(model, _loader(x, torch.full((12,), -1)), layers)
    assert len(out) == 12


def test_values_float16_cannot_hold_are_named_by_example_id(tmp_path):
    model, x, y, layers = _case()
    x_big = x.clone()
    x_big[5] *= 1e6  # example id 5: finite, but z0 = x W^T + b far beyond 65504
    with pytest.raises(ValueError, match=r"store: values of z0 overflow float16 .* example ids \[5\]"):
        pyfk.extract(model, _loader(x_big, y), layers, store=tmp_path / "s")
    assert DescriptorStore.open(tmp_path / "s").rows_done == 4
    assert len(pyfk.extract(model, _loader(x_big, y), layers, store=tmp_path / "f32", dtype="float32")) == 12


def test_the_lock_is_released_when_extraction_fails(tmp_path):
    """A failed extract releases the store's write lock at once (not when its traceback is
    dropped): the same process resumes right away, another writer is not locked out."""
    model, x, y, layers = _case()
    y_bad = y.clone()
    y_bad[9] = 42
    try:
        pyfk.extract(model, _loader(x, y_bad), layers, pseudo_label="true", store=tmp_path / "s")
    except ValueError as exc:
        kept = exc  # the traceback (and every frame in it) stays alive
    assert re.search("got \\[42\\]", str(kept))
    assert not (tmp_path / "s" / LOCK).exists()
    store = DescriptorStore.open(tmp_path / "s", "r+")
    store.close()
    assert len(pyfk.extract(model, _loader(x, y), layers, pseudo_label="true", store=tmp_path / "s")) == 12
