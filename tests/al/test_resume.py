"""`pyfk run` killed with SIGKILL and resumed (what a user does) reproduces an uninterrupted run
exactly, with rotation pretraining on; and a run's randomness is its own.

The kills land at random times and, through the runner's test-only hook
PYFK_RUN_TEST_PAUSE="<point>:<n>" (pyfk.al.runner's docstring), inside a rotation pretraining,
while its cache file is being saved, inside a round's training and inside a commit of
state.json (its new version written, not yet renamed into place).
"""

import csv
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from pyfk import al
from tests.al.runs import TIMING, interrupted_run, untimed

# 2 strategies (MC dropout and pfk) x 2 seeds x 3 rounds with rotation pretraining, on small synthetic
# images in MNIST's file format (written by _mnist_files): a few seconds of work.
CONFIG = dict(dataset="mnist", val_per_class=5, test_per_class=10, imbalance=10, initial=10, budget=5,
              rounds=3, seeds=[0, 1], train_steps=10, batch_size=16, mc_passes=3, k=4,
              strategies=["bald", "pfk"], pretrain_rotation=True, pretrain_steps=20)
WAIT = 300  # seconds to wait for a process to reach a point (a loaded machine is slow)


class _Pyfk:
    """`python -m pyfk run CONFIG --out OUT --no-progress` with its output read line by line."""

    def __init__(self, config, out, pause=None):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYFK_RUN_TEST_PAUSE", None)
        if pause:
            env["PYFK_RUN_TEST_PAUSE"] = pause
        self.proc = subprocess.Popen([sys.executable, "-m", "pyfk", "run", str(config), "--out", str(out),
                                      "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, text=True, cwd=str(config.parent))
        self.lines, self.seen = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text):
        """True once a line containing `text` is printed; False if the process ends first."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                return False
            self.seen.append(line)
            if text in line:
                return True
        self.kill()
        raise AssertionError(f"pyfk run printed no {text!r} within {WAIT} s; output: {''.join(self.seen)[-2000:]}")

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=60)

    def finish(self):
        rc = self.proc.wait(timeout=WAIT)
        self.wait_for("\0")  # no such line: collects the rest of the output into self.seen
        return rc


def _mnist_files(root, rng, per_class=60, size=12):
    """train/t10k idx files (torchvision's MNIST layout) of noisy class-dependent 12x12 images."""
    n = 10 * per_class
    y = np.repeat(np.arange(10, dtype=np.uint8), per_class)
    pattern = rng.random((10, size, size))
    x = np.clip(255 * (0.7 * pattern[y] + 0.3 * rng.random((n, size, size))), 0, 255).astype(np.uint8)
    root.mkdir()
    for split, part in (("train", slice(0, n - 10)), ("t10k", slice(n - 10, n))):
        xs, ys = x[part], y[part]
        (root / f"{split}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in xs.shape) + xs.tobytes())
        (root / f"{split}-labels-idx1-ubyte").write_bytes(
            bytes([0, 0, 8, 1]) + len(ys).to_bytes(4, "big") + ys.tobytes())


def _committed(out):
    path = out / "state.json"
    return sum(len(r) for r in json.loads(path.read_text())["runs"].values()) if path.exists() else 0


def test_sigkill_and_resume_equals_uninterrupted_with_pretraining(tmp_path, rng):
    _mnist_files(tmp_path / "data", rng)
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(dict(CONFIG, root=str(tmp_path / "data"))))
    total = len(CONFIG["strategies"]) * len(CONFIG["seeds"]) * (CONFIG["rounds"] + 1)

    whole = _Pyfk(config, tmp_path / "whole")  # the uninterrupted run, alongside the interrupted one

    out = tmp_path / "cut"
    # (pause point or None for a kill at a random time, what to do after the kill)
    plan = [("pretrain:1", None),        # inside seed 0's rotation pretraining: nothing committed
            ("commit:2", None),          # inside the commit of bald/seed0 round 1
            ("train:2", "drop-cache"),   # inside a round's training; then the pretraining cache is lost:
            ("commit:3", None),          # ... the next process pretrains again in the middle of seed 0
            (None, None), ("pretrain:1", None), (None, None)]
    landed = []
    for pause, then in plan:
        if pause == "pretrain:1" and (out / "pretrain-seed1.pt").exists():
            continue  # seed 1's pretraining is done already (seed 0's too)
        before = _committed(out)
        p = _Pyfk(config, out, pause)
        if pause is None:  # a random time once the config is checked and the data loaded
            if not p.wait_for("pyfk run: mnist"):
                break
            time.sleep(float(rng.uniform(0.0, 4.0)))
            if p.proc.poll() is not None:
                assert p.finish() == 0, "".join(p.seen)
                break
            p.kill()
            landed.append(f"random ({before} -> {_committed(out)} rounds committed)")
            continue
        if not p.wait_for(f"test pause at {pause.replace(':', ' #')}"):
            assert p.finish() == 0, "".join(p.seen)
            break
        p.kill()
        landed.append(pause)
        if pause.startswith("commit"):  # killed between writing state.json.tmp and renaming it
            tmp = json.loads((out / "state.json.tmp").read_text())
            assert sum(len(r) for r in tmp["runs"].values()) == _committed(out) + 1
        if then == "drop-cache":
            for f in out.glob("pretrain-seed*.pt"):
                f.unlink()
    else:
        p = _Pyfk(config, out)
        assert p.finish() == 0, "".join(p.seen)
    assert {"pretrain:1", "commit:2", "train:2", "commit:3"} <= set(landed), landed
    assert _committed(out) == total
    assert whole.finish() == 0, "".join(whole.seen)

    a = json.loads((tmp_path / "whole" / "state.json").read_text())
    b = json.loads((out / "state.json").read_text())
    assert a.keys() == b.keys()
    assert a["runs"].keys() == b["runs"].keys()
    for key in a["runs"]:
        assert len(a["runs"][key]) == len(b["runs"][key]) == CONFIG["rounds"] + 1
        for ra, rb in zip(a["runs"][key], b["runs"][key]):
            assert ra.keys() == rb.keys()
            for field in ra:
                if field.startswith(TIMING):
                    continue
                assert untimed(ra[field]) == untimed(rb[field]), (key, ra["round"], field, landed)
    assert untimed(a) == untimed(b)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "whole", out))
    assert untimed(ra) == untimed(rb)
    ca, cb = (list(csv.DictReader(io.StringIO((d / "results.csv").read_text()))) for d in (tmp_path / "whole", out))
    assert untimed(ca) == untimed(cb)
    assert (tmp_path / "whole" / "config.json").read_text() == (out / "config.json").read_text()
    for seed in CONFIG["seeds"]:  # the cached pretraining: recomputed after the loss, the same weights
        wa = torch.load(tmp_path / "whole" / f"pretrain-seed{seed}.pt", weights_only=True)
        wb = torch.load(out / f"pretrain-seed{seed}.pt", weights_only=True)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


SMALL = dict(CONFIG, dataset="digits", val_per_class=10, test_per_class=30, imbalance=20, seeds=[3], rounds=1,
             strategies=["var_ratio", "ensemble_bald"], ensemble_size=2)


def test_a_run_draws_no_number_from_the_global_rngs_and_leaves_them_as_found(tmp_path):
    """Whatever the global torch / NumPy RNGs hold, the results are the same, and the caller's
    torch RNG state is what it was."""
    states = []
    for i, seed in enumerate((0, 12345)):
        torch.manual_seed(seed)
        np.random.seed(seed)  # noqa: NPY002 -- the legacy global RNG is what must not matter
        torch.rand(7 + i)  # different positions in the stream too
        before = torch.get_rng_state()
        al.run(al.Config.from_dict(SMALL), str(tmp_path / f"r{i}"), progress=False, log=lambda *a: None)
        assert torch.equal(torch.get_rng_state(), before)
        states.append(untimed(json.loads((tmp_path / f"r{i}" / "state.json").read_text())))
    assert states[0] == states[1]


def test_pretraining_cache_is_only_a_cache(tmp_path, monkeypatch):
    """A run whose pretraining cache was deleted (or replaced by something else) before a resume
    recomputes the same weights: the results do not depend on the cache."""
    cfg = al.Config.from_dict(dict(SMALL, rounds=2))
    al.run(cfg, str(tmp_path / "a"), progress=False, log=lambda *a: None)
    (tmp_path / "b").mkdir()
    interrupted_run(monkeypatch, cfg, tmp_path / "b", 2, progress=False, log=lambda *a: None)
    cache = tmp_path / "b" / "pretrain-seed3.pt"
    torch.save({"conv1.weight": torch.zeros(3)}, cache)  # not the pretraining: ignored and recomputed
    al.run(cfg, str(tmp_path / "b"), progress=False, log=lambda *a: None)
    a, b = (untimed(json.loads((tmp_path / d / "state.json").read_text())) for d in ("a", "b"))
    assert a == b


def test_a_half_done_run_of_an_older_seeding_is_not_resumed(tmp_path):
    """Rounds committed by a pyfk that derived its seeds differently cannot be continued
    identically: refused (naming the directory), nothing written; a complete one still reports."""
    cfg = al.Config.from_dict(dict(SMALL, strategies=["random"]))
    al.run(cfg, str(tmp_path / "r"), progress=False, log=lambda *a: None)
    state_file = tmp_path / "r" / "state.json"
    state = json.loads(state_file.read_text())
    del state["seeding"]
    state_file.write_text(json.dumps(state))
    al.run(cfg, str(tmp_path / "r"), progress=False, log=lambda *a: None)  # complete: nothing to resume
    state["runs"]["random/seed3"].pop()
    state_file.write_text(json.dumps(state))
    before = state_file.read_text()
    with pytest.raises(ValueError, match=r"run: .*/r was started by an older pyfk"):
        al.run(cfg, str(tmp_path / "r"), progress=False, log=lambda *a: None)
    assert state_file.read_text() == before
