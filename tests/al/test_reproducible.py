"""What is reproducible: on one machine (same torch build and thread count) a run is a pure function
of its config -- the same bit for bit whichever process computes it. Across CPU models it is not
(float rounding in training differs); there the claims are the intervals of `pyfk demo --full`."""

import json
import os
import subprocess
import sys

from pyfk import al, cli
from tests.al.runs import untimed

CONFIG = dict(dataset="digits", val_per_class=10, test_per_class=30, imbalance=20, initial=12, budget=6,
              rounds=2, seeds=[0, 1], train_steps=20, batch_size=16, mc_passes=3, k=4,
              pretrain_rotation=True, pretrain_steps=10, strategies=["var_ratio", "pfk"])


def test_a_run_is_bit_identical_in_any_process(tmp_path):
    """Two fresh `pyfk run` processes (other working directory, other hash seed) and this process
    give the same state.json and results.json, wall-clock fields aside."""
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(CONFIG))
    outs = []
    for i, hashseed in enumerate(("0", "12345")):
        out = tmp_path / f"proc{i}"
        work = tmp_path / f"cwd{i}"
        work.mkdir()
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        proc = subprocess.run([sys.executable, "-m", "pyfk", "run", str(config), "--out", str(out), "--no-progress"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    al.run(CONFIG, str(tmp_path / "here"), progress=False, log=lambda *a: None)
    outs.append(tmp_path / "here")
    states = [untimed(json.loads((d / "state.json").read_text())) for d in outs]
    results = [untimed(json.loads((d / "results.json").read_text())) for d in outs]
    assert states[0] == states[1] == states[2]
    assert results[0] == results[1] == results[2]
    assert results[0]["paired"]["reference"] == "pfk"
    picks = [r["selected"] for rounds in states[0]["runs"].values() for r in rounds]
    assert sum(map(len, picks)) == len(CONFIG["strategies"]) * len(CONFIG["seeds"]) * CONFIG["rounds"] * 6


def test_demo_seed_options(monkeypatch, capsys):
    """--full runs DEMO_FULL_SEEDS seeds in runs/demo-full; --seeds N seeds 0..N-1; fewer seeds than
    the full claim say so."""
    calls = []
    monkeypatch.setattr(cli, "_run_config", lambda cfg, out, progress: calls.append((cfg, out)) or 0)
    for argv in (["demo"], ["demo", "--full"], ["demo", "--seeds", "5"], ["demo", "--quick"],
                 ["demo", "--seeds", "4", "--out", "elsewhere"]):
        assert cli.main(argv) == 0
    (c0, o0), (c1, o1), (c2, o2), (c3, o3), (c4, o4) = calls
    assert c0 == cli.DEMO and o0 == "runs/demo"
    assert c1 == dict(cli.DEMO, seeds=list(range(cli.DEMO_FULL_SEEDS))) and o1 == "runs/demo-full"
    assert cli.DEMO_FULL_SEEDS >= 10
    assert c2["seeds"] == [0, 1, 2, 3, 4] and o2 == "runs/demo-seeds5"
    assert c3["seeds"] == [0] and c3["rounds"] == 2 and o3 == "runs/demo-quick"
    assert c4["seeds"] == [0, 1, 2, 3] and o4 == "elsewhere"
    out = capsys.readouterr().out
    assert out.count("not the claim") == 4 and "pyfk demo --full" in out
