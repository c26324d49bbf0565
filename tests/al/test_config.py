"""`pyfk run` configs are checked whole before any work or any file: every problem is one line
naming its key, all of them in one ValueError, and the run directory is not created."""

import json
import re

import pytest

from pyfk import al, cli
from pyfk.al.runner import ConfigError

GOOD = dict(dataset="digits", val_per_class=10, test_per_class=30, imbalance=20, initial=12, budget=6,
            rounds=1, seeds=[0], train_steps=5, batch_size=16, mc_passes=3, k=4, strategies=["random", "pfk"])
NAN = float("nan")

# (changes to GOOD, the key the message must name). json.dumps writes NaN as the NaN that json.load reads.
BAD = [
    ({"lr": -0.1}, "lr"),
    ({"lr": 0}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"lr": NAN}, "lr"),
    ({"lr": True}, "lr"),
    ({"model": "vgg16"}, "model"),
    ({"model": None}, "model"),
    ({"pseudo_label": "oracle"}, "pseudo_label"),
    ({"layers": ["conv1", "conv9"]}, "layers"),
    ({"layers": []}, "layers"),
    ({"layers": "conv1"}, "layers"),
    ({"layers": ["conv1", "conv1"]}, "layers"),
    ({"model": "resnet18", "strategies": ["random"], "layers": ["conv2"]}, "layers"),
    ({"initial": 100000}, "initial"),
    ({"initial": 0}, "initial"),
    ({"seeds": [True]}, "seeds"),
    ({"seeds": [0, 1, 0]}, "seeds"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [-1]}, "seeds"),
    ({"seeds": 0}, "seeds"),
    ({"seeds": [1.5]}, "seeds"),
    ({"budget": 200, "rounds": 10}, "budget"),
    ({"budget": 2.5}, "budget"),
    ({"rounds": -1}, "rounds"),
    ({"imbalance": "100"}, "imbalance"),
    ({"imbalance": NAN}, "imbalance"),
    ({"imbalance": float("inf")}, "imbalance"),
    ({"imbalance": 0.5}, "imbalance"),
    ({"label_noise": "x"}, "label_noise"),
    ({"label_noise": 1.0}, "label_noise"),
    ({"label_noise": -0.1}, "label_noise"),
    ({"label_noise_kind": "pairwise"}, "label_noise_kind"),
    ({"label_noise_kind": None}, "label_noise_kind"),
    ({"relabel_share": 0.0, "strategies": ["pfk+audit"]}, "relabel_share"),
    ({"relabel_share": 1.0}, "relabel_share"),
    ({"relabel_share": "half"}, "relabel_share"),
    ({"relabel_share": 0.01, "strategies": ["entropy+audit"]}, "relabel_share"),  # rounds to 0 labels
    ({"relabel_share": 0.99, "strategies": ["entropy+audit"]}, "relabel_share"),  # rounds to the whole budget
    ({"strategies": ["pfk+audti"]}, "strategies"),
    ({"strategies": ["foo+audit"]}, "strategies"),
    ({"strategies": ["random+audit"], "initial": 1}, "initial"),
    ({"split_seed": -1}, "split_seed"),
    ({"split_seed": "0"}, "split_seed"),
    ({"val_per_class": 0}, "val_per_class"),
    ({"test_per_class": 500}, "test_per_class"),
    ({"strategies": []}, "strategies"),
    ({"strategies": ["pfk", "random", "pfk"]}, "strategies"),
    ({"strategies": ["uncertainty"]}, "strategies"),
    ({"strategies": "pfk"}, "strategies"),
    ({"minority": list(range(10))}, "minority"),
    ({"minority": [5, 12]}, "minority"),
    ({"minority": []}, "minority"),
    ({"minority": [5, 5]}, "minority"),
    ({"minority": [True]}, "minority"),
    ({"pretrain_rotation": "no"}, "pretrain_rotation"),
    ({"pretrain_rotation": 1}, "pretrain_rotation"),
    ({"calibrate": "yes"}, "calibrate"),
    ({"calibrate": 1}, "calibrate"),
    ({"model": "resnet18", "strategies": ["entropy", "bald"]}, "strategies"),
    ({"k": 10000}, "k"),
    ({"k": 0}, "k"),
    ({"train_steps": 0}, "train_steps"),
    ({"batch_size": "16"}, "batch_size"),
    ({"pretrain_steps": -5}, "pretrain_steps"),
    ({"mc_passes": 0}, "mc_passes"),
    ({"ensemble_size": 0}, "ensemble_size"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"dataset": "mnist"}, "root"),
    ({"dataset": "mnist", "root": "/nonexistent/pyfk-test"}, "root"),
    ({"root": 3}, "root"),
    ({"budjet": 3}, "config"),
]


def _problem_lines(exc) -> list[str]:
    return exc.problems if isinstance(exc, ConfigError) else str(exc).splitlines()


@pytest.mark.parametrize("change,key", BAD, ids=[f"{k}-{i}" for i, (_, k) in enumerate(BAD)])
def test_bad_config_is_rejected_before_any_file(tmp_path, change, key):
    out = tmp_path / "run"
    with pytest.raises(ValueError) as info:
        al.run(dict(GOOD, **change), str(out), progress=False, log=lambda *a: None)
    lines = _problem_lines(info.value)
    assert len(lines) == 1, lines  # exactly the one problem, in one line
    assert re.match(rf"(\w+/)?{key}(/\w+)?: ", lines[0]) and "\n" not in lines[0], lines[0]
    assert any(w in lines[0] for w in ("expected", "cannot load", "no Dropout module")), lines[0]
    assert not out.exists()
    with pytest.raises(ValueError) as info:  # the same through Config.from_dict / a Config
        if key == "config":
            al.Config.from_dict(dict(GOOD, **change))
        al.run(al.Config(**dict(GOOD, **change)), str(out), progress=False, log=lambda *a: None)
    assert _problem_lines(info.value) == lines
    assert not out.exists()


def test_every_problem_is_listed_at_once_one_line_each(tmp_path, rng, capsys):
    """Several problems (a random pick of the table's, one per key) come in one error, one line
    each -- from the API and from `pyfk run`, which also writes nothing."""
    by_key = {}  # the cases found without the data (independent of each other), by key
    for change, key in BAD:
        if set(change) == {key} and key != "config" and al.Config(**dict(GOOD, **change)).problems():
            by_key.setdefault(key, []).append(change)
    keys = sorted(rng.choice(sorted(by_key), size=4, replace=False).tolist())
    cfg = dict(GOOD)
    for key in keys:
        cfg.update(by_key[key][int(rng.integers(len(by_key[key])))])
    # and one found on the model -- only checked once the data (dataset, root) can be loaded
    if not {"model", "layers", "dataset", "root"} & set(keys):
        cfg["layers"] = ["conv1", "conv9"]
        keys = sorted(keys + ["layers"])
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        al.run(cfg, str(out), progress=False, log=lambda *a: None)
    assert sorted(line.split(":")[0].split("/")[0] for line in info.value.problems) == keys, info.value.problems
    assert str(info.value).splitlines()[1:] == info.value.problems
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(cfg))
    assert cli.main(["run", str(config), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"pyfk run: error: invalid config ({len(keys)} problems):"
    assert [line.strip() for line in err[1:]] == info.value.problems
    assert not out.exists()


def test_static_problems_also_from_config_from_dict():
    with pytest.raises(ValueError) as info:
        al.Config.from_dict(dict(GOOD, lr="x", seeds=[True], strategies=[], pretrain_rotation="no", bogus=1))
    assert [line.split(":")[0] for line in info.value.problems] == [
        "config", "strategies", "seeds", "lr", "pretrain_rotation"]


def test_good_config_runs_where_a_bad_one_was_refused(tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(dict(GOOD, lr=-1)))
    assert cli.main(["run", str(config), "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == "pyfk run: error: lr: expected a positive number (the Adam learning " \
                                              "rate), got -1"
    assert not out.exists()
    config.write_text(json.dumps(GOOD))  # fixed: runs in the same directory, nothing half-made in the way
    assert cli.main(["run", str(config), "--out", str(out), "--no-progress"]) == 0
    state = json.loads((out / "state.json").read_text())
    assert sorted(state["runs"]) == ["pfk/seed0", "random/seed0"]
    assert all(len(r) == 2 for r in state["runs"].values())
