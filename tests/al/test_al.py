"""The AL runner: resume equals an uninterrupted run; configs are validated; outputs are written."""

import json

import numpy as np
import pytest

from pyfk import al, cli
from tests.al.runs import interrupted_run

SMALL = dict(dataset="digits", val_per_class=10, test_per_class=30, imbalance=20, initial=12, budget=6,
             rounds=2, seeds=[0, 1], train_steps=15, batch_size=16, mc_passes=3, k=4,
             strategies=["random", "entropy", "var_ratio", "coreset", "badge", "pfk"])


def _comparable(state):
    """Round records without wall-clock fields."""
    out = {}
    for key, rounds in state["runs"].items():
        out[key] = [{k: v for k, v in r.items() if k not in ("train_seconds", "selection_seconds", "provenance")}
                    for r in rounds]
    return out


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = al.Config.from_dict(SMALL)
    whole = al.run(cfg, str(tmp_path / "whole"), progress=False, log=lambda *a: None)
    # killed while working on the 6th round
    interrupted_run(monkeypatch, cfg, tmp_path / "cut", 5, progress=False, log=lambda *a: None)
    partial = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert sum(len(r) for r in partial["runs"].values()) == 5
    resumed = al.run(cfg, str(tmp_path / "cut"), progress=False, log=lambda *a: None)
    a = json.loads((tmp_path / "whole" / "state.json").read_text())
    b = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert _comparable(a) == _comparable(b)
    assert len(whole["rows"]) == len(resumed["rows"]) == 6 * 2 * 3
    for name in ("results.csv", "results.json", "curve.png"):
        assert (tmp_path / "cut" / name).stat().st_size > 0


def test_rounds_grow_the_labeled_set_without_repeats(tmp_path):
    cfg = al.Config.from_dict(dict(SMALL, seeds=[0], strategies=["pfk", "badge"]))
    al.run(cfg, str(tmp_path / "r"), progress=False, log=lambda *a: None)
    state = json.loads((tmp_path / "r" / "state.json").read_text())
    for rounds in state["runs"].values():
        assert [r["labels"] for r in rounds] == [12, 18, 24]
        picked = [i for r in rounds for i in r["selected"]]
        assert len(picked) == len(set(picked)) == 12
        assert rounds[-1]["selected"] == []
        conf = np.array(rounds[0]["confusion"])
        assert conf.sum() == 300 and abs(np.trace(conf) / 300 - rounds[0]["accuracy"]) < 1e-9
    assert state["runs"]["pfk/seed0"][0]["provenance"]["strategy"] == "pfk"


def test_ensemble_strategies_get_member_probabilities(tmp_path, monkeypatch):
    from pyfk.al import strategies

    seen = []
    real = strategies.select

    def spy(name, pool, *a, **kw):
        seen.append(pool.mc_probs)
        return real(name, pool, *a, **kw)

    monkeypatch.setattr(strategies, "select", spy)
    cfg = al.Config.from_dict(dict(SMALL, seeds=[0], rounds=1, strategies=["ensemble_var_ratio", "ensemble_bald"],
                                   ensemble_size=3, pretrain_rotation=True, pretrain_steps=5))
    res = al.run(cfg, str(tmp_path / "e"), progress=False, log=lambda *a: None)
    assert [m.shape[0] for m in seen] == [3, 3]
    assert not np.allclose(seen[0][0], seen[0][1])  # members differ (other seeds)
    state = json.loads((tmp_path / "e" / "state.json").read_text())
    for key in ("ensemble_var_ratio/seed0", "ensemble_bald/seed0"):
        first = state["runs"][key][0]
        assert len(first["selected"]) == 6 and first["provenance"]["strategy"] == key.split("/")[0]
    assert len(res["rows"]) == 4


def test_runner_computes_exactly_what_the_registry_declares(tmp_path, monkeypatch):
    """Per strategy, the runner hands select exactly the declared PoolInputs fields (plus the pool
    size), a ValInputs only where declared, K passes of the declared kind, the config's params,
    and extracts only what those need (no pool extraction for random or MC/ensemble strategies;
    the validation set only for the PFK family)."""
    from pyfk.al import inputs, strategies

    extractions, seen = [], {}
    real_extract, real_select = inputs.extract, strategies.select

    def counting_extract(model, loader, layers, *a, **kw):
        extractions.append("val" if kw.get("with_true") else "pool")
        return real_extract(model, loader, layers, *a, **kw)

    def spy(name, pool, *a, **kw):
        seen[name] = (pool, kw.get("val"), {k: v for k, v in kw.items() if k not in ("labeled", "seed", "val")},
                      list(extractions))
        extractions.clear()
        return real_select(name, pool, *a, **kw)

    monkeypatch.setattr(inputs, "extract", counting_extract)
    monkeypatch.setattr(strategies, "select", spy)
    cfg = al.Config.from_dict(dict(SMALL, seeds=[0], rounds=1, ensemble_size=2, train_steps=5,
                                   strategies=sorted(strategies.STRATEGIES)))
    al.run(cfg, str(tmp_path / "all"), progress=False, log=lambda *a: None)
    assert set(seen) == set(strategies.STRATEGIES)
    pool_size = None
    for name, (pool, val, params, extracted) in seen.items():
        needs = strategies.STRATEGIES[name].needs
        given = {f for f in strategies.POOL_FIELDS if getattr(pool, f) is not None}
        assert given == set(needs.pool), name
        pool_size = pool_size or pool.n
        assert pool.n == pool_size > 0
        assert (val is not None) == needs.val, name
        if needs.val:
            assert val.descriptors is not None and val.labels is not None and val.pred is not None
        if needs.passes is not None:
            want_k = {"mc_dropout": cfg.mc_passes, "ensemble": cfg.ensemble_size}[needs.passes]
            assert pool.mc_probs.shape == (want_k, pool_size, 10), name
        assert params == ({"k": cfg.k} if "k" in strategies.STRATEGIES[name].params else {}), name
        wants_pool = bool(set(needs.pool) & {"probs", "descriptors", "badge", "features"})
        wants_val = needs.val or ("descriptors" in needs.pool and cfg.pseudo_label == "map")
        assert extracted == ["val"] * wants_val + ["pool"] * wants_pool, name
        if "features" in needs.pool:  # the penultimate features h: the BADGE factor without its bias column
            assert pool.features.num_scales == 1 and not pool.features.has_g


def test_mc_dropout_strategies_need_a_dropout_model(tmp_path):
    cfg = al.Config.from_dict(dict(SMALL, seeds=[0], model="resnet18", strategies=["entropy", "bald", "std"]))
    with pytest.raises(ValueError, match=r"strategies: \['bald', 'std'\] read MC-dropout passes, but model "
                                         r"'resnet18' has no Dropout"):
        al.run(cfg, str(tmp_path / "r"), progress=False, log=lambda *a: None)
    assert not (tmp_path / "r").exists()  # rejected before any file


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="config: unknown keys \\['budjet'\\]"):
        al.Config.from_dict({"budjet": 3})
    with pytest.raises(ValueError, match="strategies: unknown \\['uncertainty'\\]"):
        al.Config.from_dict({"strategies": ["uncertainty"]})
    with pytest.raises(ValueError, match="budget: expected a positive integer"):
        al.Config.from_dict({"budget": 0})
    cfg = al.Config.from_dict(dict(SMALL, rounds=0, seeds=[0], strategies=["random"]))
    al.run(cfg, str(tmp_path / "x"), progress=False, log=lambda *a: None)
    other = al.Config.from_dict(dict(SMALL, rounds=0, seeds=[0], strategies=["random"], budget=7))
    with pytest.raises(ValueError, match="run: .* holds a run with a different config \\(keys \\['budget'\\]\\)"):
        al.run(other, str(tmp_path / "x"), progress=False, log=lambda *a: None)


def test_cli_run_and_errors(tmp_path, capsys):
    config = tmp_path / "exp.json"
    config.write_text(json.dumps(dict(SMALL, rounds=1, seeds=[0], strategies=["random", "pfk"])))
    assert cli.main(["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pfk" in out and "minority" in out and "curve.png" in out
    bad = tmp_path / "bad.json"
    bad.write_text('{"strategies": ["nope"]}')
    assert cli.main(["run", str(bad), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "strategies: unknown ['nope']" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "missing.json"), "--no-progress"]) == 2
