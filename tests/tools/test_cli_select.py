"""`pyfk select`: stores in, picks.csv / picks.json out, equal to pyfk.acquire on the same stores."""

import csv
import json

import numpy as np
import pytest
import torch

import pyfk
from pyfk.al.models import LeNet
from pyfk.cli import main
from pyfk.features.store import DescriptorStore
from pyfk.features.writer import extraction_from_store


def run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A 40-row pool store (with BADGE factors) and a 12-row labelled validation store with
    true-label gradients, from a 3-class 1-channel LeNet; plus one with other layers."""
    d = tmp_path_factory.mktemp("select")
    torch.manual_seed(0)
    ckpt = d / "lenet.pt"
    torch.save(LeNet(classes=3, in_channels=1).state_dict(), ckpt)
    gen = torch.Generator().manual_seed(3)
    torch.save({"x": torch.rand(40, 1, 8, 8, generator=gen), "ids": torch.arange(1000, 1040)}, d / "pool.pt")
    torch.save({"x": torch.rand(12, 1, 8, 8, generator=gen), "y": torch.randint(0, 3, (12,), generator=gen),
                "ids": torch.arange(500, 512)}, d / "val.pt")
    common = ["--model", ckpt, "--arch", "lenet", "--projection", 8, "--dtype", "float32", "--batch-size", 16,
              "--device", "cpu"]
    out = {}
    for name, data, extra in (("pool", "pool.pt", ["--badge", "--layers", "conv1,fc1"]),
                              ("val", "val.pt", ["--with-true", "--layers", "conv1,fc1"]),
                              ("val_other", "val.pt", ["--with-true", "--layers", "fc1"])):
        rc = main([str(a) for a in ["extract", *common, *extra, "--data", d / data, "--out", d / name]])
        assert rc == 0
        out[name] = d / name
    return out


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_pfk_picks_equal_acquire_with_provenance(stores, tmp_path, capsys):
    labeled = tmp_path / "labeled.txt"
    labeled.write_text("# already labelled\n3\n\n17  # a comment\n39\n")
    out = tmp_path / "picks.csv"
    rc, stdout, err = run(["select", "--pool", stores["pool"], "--val", stores["val"], "--budget", 7,
                           "--exclude", labeled, "--out", out, "--no-progress"], capsys)
    assert rc == 0, err
    assert "7 picks by pfk" in stdout and "backend cpu" in stdout

    pool = extraction_from_store(DescriptorStore.open(str(stores["pool"])))
    val = extraction_from_store(DescriptorStore.open(str(stores["val"])))
    want = pyfk.acquire("pfk", pyfk.PoolInputs(descriptors=pool.descriptors), 7, labeled=[3, 17, 39],
                        val=pyfk.ValInputs.from_extraction(val))
    rows = _read_csv(out)
    assert [int(r["row"]) for r in rows] == want.indices.tolist()
    assert [int(r["pick"]) for r in rows] == list(range(7))
    assert [int(r["id"]) for r in rows] == (1000 + want.indices).tolist()
    assert [float(r["score"]) for r in rows] == want.scores.tolist()
    assert [int(r["centre_id"]) for r in rows] == (500 + np.asarray(want.provenance["centre"])).tolist()
    assert [int(r["rank"]) for r in rows] == list(want.provenance["rank"])
    shares = np.array([[float(r["share_0"]), float(r["share_1"])] for r in rows])
    np.testing.assert_allclose(shares.sum(1), 1.0, rtol=1e-9)

    record = json.loads((tmp_path / "picks.json").read_text())
    assert record["strategy"] == "pfk" and record["backend"] == "cpu" and record["world_size"] == 1
    assert [p["row"] for p in record["picks"]] == want.indices.tolist()
    assert record["provenance"]["labeled"] == 3
    assert not list(tmp_path.glob("*.tmp-*"))  # written atomically, nothing left behind


@pytest.mark.parametrize("strategy", ["entropy", "badge", "random"])
def test_other_strategies_from_a_store(strategy, stores, tmp_path, capsys):
    out = tmp_path / "p.csv"
    rc, _, err = run(["select", "--pool", stores["pool"], "--budget", 5, "--strategy", strategy, "--seed", 4,
                      "--out", out], capsys)
    assert rc == 0, err
    ext = extraction_from_store(DescriptorStore.open(str(stores["pool"])))
    fields = {"entropy": {"probs": ext.probs}, "badge": {"badge": ext.badge}, "random": {"n": len(ext.ids)}}
    want = pyfk.acquire(strategy, pyfk.PoolInputs(**fields[strategy]), 5, seed=4)
    assert [int(r["row"]) for r in _read_csv(out)] == want.indices.tolist()


@pytest.mark.parametrize("case", ["missing_pool", "missing_val", "no_val", "widths", "budget", "exclude_line",
                                  "exclude_range", "strategy", "param", "features"])
def test_bad_input_one_line_exit_2(case, stores, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1\ntwo\n")
    far = tmp_path / "far.txt"
    far.write_text("40\n")
    base = ["select", "--pool", stores["pool"], "--val", stores["val"], "--budget", 3, "--out", tmp_path / "p.csv"]
    argv, expect = {
        "missing_pool": (["select", "--pool", tmp_path / "nope", "--val", stores["val"], "--budget", 3, "--out",
                          tmp_path / "p.csv"], "--pool"),
        "missing_val": (["select", "--pool", stores["pool"], "--val", tmp_path / "nope", "--budget", 3, "--out",
                         tmp_path / "p.csv"], "--val"),
        "no_val": (["select", "--pool", stores["pool"], "--budget", 3, "--out", tmp_path / "p.csv"],
                   "needs a validation store"),
        "widths": (["select", "--pool", stores["pool"], "--val", stores["val_other"], "--budget", 3, "--out",
                    tmp_path / "p.csv"], "scales"),
        "budget": ([*base[:5], "--budget", 41, "--out", tmp_path / "p.csv"], "budget"),
        "exclude_line": ([*base, "--exclude", bad], "line 2"),
        "exclude_range": ([*base, "--exclude", far], "labeled"),
        "strategy": ([*base, "--strategy", "nonsense"], "--strategy"),
        "param": ([*base, "--strategy", "entropy", "--k", 3], "--k"),
        "features": ([*base, "--strategy", "coreset"], "features"),
    }[case]
    rc, out, err = run(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyfk select: error:") and expect in lines[0], err
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.json").exists()


def test_select_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["select", "--help"])
    assert exc.value.code == 0
    assert "usage: pyfk select" in capsys.readouterr().out


@pytest.mark.parametrize("progress", [True, False])
def test_progress_reaches_the_pfk_search(progress, stores, capsys):
    """pyfk.acquire(progress=...) (what `pyfk select` passes; --no-progress gives False) drives
    the search's progress bar."""
    pool = extraction_from_store(DescriptorStore.open(str(stores["pool"])))
    val = extraction_from_store(DescriptorStore.open(str(stores["val"])))
    capsys.readouterr()
    pyfk.acquire("pfk", pyfk.PoolInputs(descriptors=pool.descriptors), 4, val=pyfk.ValInputs.from_extraction(val),
                 progress=progress)
    err = capsys.readouterr().err
    assert ("pool rows" in err or "%|" in err) == progress, err
