"""`pyfk extract` and `pyfk select` inside a process group (what torchrun runs): each rank writes
its shard, and the picks of 2 ranks equal those of one process on the same sharded store."""

import csv

import pytest
import torch
from harness import run_ranks

from pyfk.al.models import LeNet
from pyfk.cli import main


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _rank_extract_and_select(rank, world, ckpt, data, store, val, exclude, outs):
    rc_extract = main(["extract", "--model", ckpt, "--arch", "lenet", "--data", data, "--out", store,
                       "--layers", "conv1,fc1", "--projection", "8", "--dtype", "float32", "--badge",
                       "--batch-size", "8", "--device", "cpu"])
    results = {"extract": rc_extract}
    for strategy, out in outs.items():
        argv = ["select", "--pool", store, "--budget", "6", "--strategy", strategy, "--exclude", exclude,
                "--out", out]
        if strategy == "pfk":
            argv += ["--val", val]
        results[strategy] = main(argv)
    return results


@pytest.mark.parametrize("world", [2])
def test_extract_and_select_under_a_group_equal_one_process(world, tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "lenet.pt"
    torch.save(LeNet(classes=3, in_channels=1).state_dict(), ckpt)
    gen = torch.Generator().manual_seed(5)
    torch.save({"x": torch.rand(23, 1, 8, 8, generator=gen), "ids": torch.arange(700, 723)}, tmp_path / "pool.pt")
    torch.save({"x": torch.rand(9, 1, 8, 8, generator=gen), "y": torch.randint(0, 3, (9,), generator=gen)},
               tmp_path / "val.pt")
    val = tmp_path / "val"
    assert main(["extract", "--model", str(ckpt), "--arch", "lenet", "--data", str(tmp_path / "val.pt"), "--out",
                 str(val), "--layers", "conv1,fc1", "--projection", "8", "--dtype", "float32", "--with-true",
                 "--device", "cpu"]) == 0
    exclude = tmp_path / "labeled.txt"
    exclude.write_text("0\n11\n12\n22\n")  # on both sides of the shard boundary (12 | 11 rows)
    store = tmp_path / "pool"
    strategies = ["pfk", "entropy", "badge"]
    outs = {s: str(tmp_path / f"{s}-ranks.csv") for s in strategies}
    results = run_ranks(_rank_extract_and_select, world,
                        (str(ckpt), str(tmp_path / "pool.pt"), str(store), str(val), str(exclude), outs))
    assert all(r == {"extract": 0, **{s: 0 for s in strategies}} for r in results), results
    assert (store / "sharded.json").is_file() and (store / f"shard-00001-of-{world:05d}").is_dir()
    capsys.readouterr()
    for s in strategies:
        single = tmp_path / f"{s}-one.csv"
        argv = ["select", "--pool", str(store), "--budget", "6", "--strategy", s, "--exclude", str(exclude),
                "--out", str(single)]
        assert main(argv + (["--val", str(val)] if s == "pfk" else [])) == 0
        got, want = _read(outs[s]), _read(single)
        assert got == want, s
        assert {int(r["row"]) for r in got}.isdisjoint({0, 11, 12, 22})
        assert [int(r["id"]) for r in got] == [700 + int(r["row"]) for r in got]
