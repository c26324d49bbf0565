"""Noisy annotators in the runner (label_noise, label_noise_kind) and '<strategy>+audit', which
spends part of each round's budget re-asking the labels pyfk.audit suspects."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pyfk import al
from pyfk.al import data, runner
from tests.al.runs import interrupted_run, untimed

NOISY = dict(dataset="digits", val_per_class=10, test_per_class=30, imbalance=20, initial=12, budget=8,
             rounds=2, seeds=[0, 1], train_steps=15, batch_size=16, k=4, label_noise=0.3,
             strategies=["entropy", "entropy+audit", "pfk+audit"], relabel_share=0.25)


# ----------------------------------------------------------------------------- the annotator

@pytest.mark.parametrize("kind", ["symmetric", "class_conditional"])
def test_split_noise_is_exact_seeded_and_listed(rng, kind):
    y = np.repeat(np.arange(10), 300)
    rng.shuffle(y)
    seed, rate = int(rng.integers(1000)), float(rng.uniform(0.05, 0.4))
    s = data.biased_split(y, imbalance=10, val_per_class=20, test_per_class=50, label_noise=rate,
                          noise_kind=kind, seed=seed)
    wrong = np.flatnonzero(s.pool_labels != y[s.pool])
    assert len(wrong) == round(rate * len(s.pool))
    np.testing.assert_array_equal(s.noisy, wrong)
    if kind == "class_conditional":
        np.testing.assert_array_equal(s.pool_labels[wrong], (y[s.pool][wrong] + 1) % 10)
    clean = data.biased_split(y, imbalance=10, val_per_class=20, test_per_class=50, seed=seed)
    np.testing.assert_array_equal(clean.pool, s.pool)  # the noise draws come after the split's
    again = data.biased_split(y, imbalance=10, val_per_class=20, test_per_class=50, label_noise=rate,
                              noise_kind=kind, seed=seed)
    np.testing.assert_array_equal(again.pool_labels, s.pool_labels)


def test_split_noise_keeps_class_values_that_are_not_positions():
    y = np.repeat(np.array([3, 7, 11]), 200)
    s = data.biased_split(y, imbalance=1, minority=[11], val_per_class=10, test_per_class=10, label_noise=0.2,
                          noise_kind="class_conditional", seed=0)
    wrong = s.noisy
    nxt = {3: 7, 7: 11, 11: 3}
    assert [nxt[v] for v in y[s.pool][wrong]] == s.pool_labels[wrong].tolist()


def test_bernoulli_noise_is_the_older_draw():
    """noise_kind="bernoulli" (the default of biased_split) draws what pyfk drew before the kinds."""
    y = np.repeat(np.arange(10), 500)
    s = data.biased_split(y, imbalance=1, val_per_class=20, test_per_class=100, label_noise=0.3, seed=1)
    rng = np.random.default_rng(1)  # the older code, replayed: the split's permutations, then the coins
    for c in range(10):
        rng.permutation(np.flatnonzero(y == c))
    flip = rng.random(len(s.pool)) < 0.3
    shift = rng.integers(1, 10, size=len(s.pool))
    np.testing.assert_array_equal(s.pool_labels, np.where(flip, (y[s.pool] + shift) % 10, y[s.pool]))
    np.testing.assert_array_equal(s.noisy, np.flatnonzero(flip))


@pytest.mark.parametrize("kind", ["symmetric", "class_conditional", "bernoulli"])
def test_annotate_again(kind):
    truth = np.tile(np.arange(5), 4000)
    answers = data.annotate_again(truth, 0.25, kind, classes=5, seed=3)
    wrong = answers != truth
    assert abs(wrong.mean() - 0.25) < 0.02  # 20,000 coins: 6 standard deviations
    assert ((answers >= 0) & (answers < 5)).all()
    if kind == "class_conditional":
        np.testing.assert_array_equal(answers[wrong], (truth[wrong] + 1) % 5)
    np.testing.assert_array_equal(answers, data.annotate_again(truth, 0.25, kind, classes=5, seed=3))
    np.testing.assert_array_equal(data.annotate_again(truth, 0.0, kind, classes=5, seed=3), truth)
    with pytest.raises(ValueError, match="kind"):
        data.annotate_again(truth, 0.1, "pairs", classes=5, seed=0)


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy") / "run"
    result = al.run(NOISY, str(out), progress=False, log=lambda *a: None)
    return out, result, json.loads((out / "state.json").read_text())


def test_audit_rounds_split_the_budget_and_replay(noisy_run):
    out, result, state = noisy_run
    cfg, ds, split = runner.prepare(NOISY)
    truth = ds.y[split.pool]
    assert len(split.noisy) == round(0.3 * len(split.pool))
    for key, rounds in state["runs"].items():
        strategy, seed = key.split("/seed")
        audited = strategy.endswith("+audit")
        labeled = np.sort(np.random.default_rng(runner._seed_for(int(seed), "initial")).choice(
            len(split.pool), cfg.initial, replace=False))
        labels = split.pool_labels.copy()
        asked = []
        for rec in rounds:
            # what the record says about the labels held when the round's model was trained
            assert rec["labels"] == len(labeled)
            assert rec["wrong_labels"] == int((labels[labeled] != truth[labeled]).sum())
            assert ("queries" in rec) == audited
            if audited:
                assert rec["queries"] == len(labeled) + len(asked)
            if rec["round"] == cfg.rounds:
                assert rec["selected"] == [] and "relabeled" not in rec
                continue
            if audited:
                rows, answers = rec["relabeled"], rec["relabels"]
                assert len(rows) == runner.relabel_count(cfg, strategy) == 2
                assert set(rows) <= set(labeled.tolist()) and not set(rows) & set(asked)  # held, never re-asked
                assert len(rec["selected"]) == cfg.budget - len(rows)
                assert rec["audit"]["asked_wrong"] == int((labels[rows] != truth[rows]).sum())
                assert rec["audit"]["fixed"] == int(((labels[rows] != truth[rows])
                                                     & (np.array(answers) == truth[rows])).sum())
                second = data.annotate_again(truth, cfg.label_noise, cfg.label_noise_kind, classes=ds.classes,
                                             seed=runner._seed_for(int(seed), "second-answer"))
                np.testing.assert_array_equal(answers, second[rows])  # the seed's second answer for each row
                labels[rows] = answers
                asked += rows
            else:
                assert "relabeled" not in rec and len(rec["selected"]) == cfg.budget
            assert not set(rec["selected"]) & set(labeled.tolist())
            labeled = np.sort(np.concatenate([labeled, rec["selected"]]))
    table = al.format_table(result["summary"], result["paired"])
    assert "wrong" in table and "queries" in table


def test_relabel_asks_the_audits_top_suspects(monkeypatch):
    """relabel() re-asks the audit's ranking in order, skipping rows asked before."""
    import pyfk.al.audit as audit_module

    cfg, ds, split = runner.prepare(NOISY)
    model = runner.seeded_model(cfg.model, ds.x.shape[1], ds.classes, ds.x.shape[-1], 0)
    pool_x = torch.from_numpy(ds.x[split.pool])
    labeled = np.array([3, 10, 20, 40, 50, 60], dtype=np.int64)
    labels = torch.from_numpy(split.pool_labels.copy())
    seen = {}

    class Report:  # ranks labeled positions 4, 1, 5, 0, 2, 3
        indices = np.array([4, 1, 5, 0, 2, 3])
        flagged = np.array([True, True, False, False, False, False])
        provenance = {"n_issues": 2}

    def fake_audit(descriptors, given, **kw):
        seen["given"], seen["n"], seen["kw"] = np.asarray(given), descriptors.n, kw
        return Report()

    monkeypatch.setattr(audit_module, "audit", fake_audit)
    layers = runner.models.default_layers(cfg.model)
    rows, info = runner.relabel(model, cfg, layers, pool_x, labeled, labels, np.array([10]), 3, ds.classes, 0)
    assert rows.tolist() == [50, 60, 3]  # 10 (rank 2) was asked before
    assert seen["n"] == 6 and seen["given"].tolist() == split.pool_labels[labeled].tolist()
    assert seen["kw"]["k"] == min(cfg.k, 5) and "probs" not in seen["kw"]
    assert info["flagged"] == 2 and info["n_issues"] == 2


@pytest.mark.parametrize("cut", [4, 8])
def test_interrupted_audit_run_resumes_identically(tmp_path, monkeypatch, noisy_run, cut):
    """Killed at the 5th commit (entropy+audit/seed0 round 1: the resumed process replays a round of
    re-asked labels, then re-asks again, skipping those rows) or the 9th (pfk+audit/seed0 round 2:
    replayed labels reach the last round's training)."""
    _, whole, state = noisy_run
    interrupted_run(monkeypatch, NOISY, tmp_path / "cut", cut, progress=False, log=lambda *a: None)
    al.run(NOISY, str(tmp_path / "cut"), progress=False, log=lambda *a: None)
    cut = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert untimed(cut) == untimed(state)


def test_noise_kind_of_older_run_directories(tmp_path):
    """A noisy config.json written before label_noise_kind existed reads as "bernoulli"; a clean one
    is unaffected by the key."""
    base = dict(NOISY, strategies=["random"], rounds=0, seeds=[0])
    old = tmp_path / "old"
    al.run(dict(base, label_noise_kind="bernoulli"), str(old), progress=False, log=lambda *a: None)
    cfg = json.loads((old / "config.json").read_text())
    assert "relabel_share" not in cfg  # at its default: written only when set otherwise
    del cfg["label_noise_kind"]  # as an older pyfk wrote it
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='label_noise_kind.*set "label_noise_kind": "bernoulli" to resume'):
        al.run(base, str(old), progress=False, log=lambda *a: None)  # now "symmetric": another split
    al.run(dict(base, label_noise_kind="bernoulli"), str(old), progress=False, log=lambda *a: None)
    clean = tmp_path / "clean"
    al.run(dict(base, label_noise=0.0), str(clean), progress=False, log=lambda *a: None)
    written = json.loads((clean / "config.json").read_text())
    assert "label_noise_kind" not in written and "relabel_share" not in written
    # relabel_share is read by '+audit' strategies only: without one, any value is the same run
    al.run(dict(base, label_noise=0.0, relabel_share=0.5), str(clean), progress=False, log=lambda *a: None)
    al.run(dict(base, label_noise=0.0, label_noise_kind="bernoulli"), str(clean), progress=False,
           log=lambda *a: None)


def test_the_recorded_experiment_config_is_valid():
    """benchmarks/configs/noisy_audit.json (RESULTS.md: label noise and the audit) passes every check."""
    from pathlib import Path

    cfg = json.loads((Path(__file__).parents[2] / "benchmarks" / "configs" / "noisy_audit.json").read_text())
    config, _, split = runner.prepare(cfg)
    assert config.label_noise == 0.2 and {"pfk+audit", "entropy+audit"} <= set(config.strategies)
    assert len(split.noisy) == round(0.2 * len(split.pool)) and len(config.seeds) >= 5


def test_ensemble_members_train_on_the_labels_the_model_trained_on(monkeypatch):
    """In an '+audit' round of an ensemble strategy, the extra members learn the labels held before
    the round's re-asks, as the round's model did."""
    seen = []
    original = runner.train

    def spy(model, x, y, *args, **kw):
        seen.append(y.clone())
        return original(model, x, y, *args, **kw)

    monkeypatch.setattr(runner, "train", spy)
    cfg = dict(NOISY, strategies=["ensemble_entropy+audit"], seeds=[0], rounds=2, ensemble_size=3, label_noise=0.4)
    result = al.run(cfg, str(Path(tempfile.mkdtemp()) / "run"), progress=False, log=lambda *a: None)
    rows = result["rows"]
    assert len(rows) == 3
    # per selecting round: the model, then 2 members, all on the same labels; the last round: the model
    assert len(seen) == 3 + 3 + 1
    for r in (0, 1):
        model_labels, *member_labels = seen[3 * r: 3 * r + 3]
        for y in member_labels:
            assert torch.equal(y, model_labels)
    assert len(seen[3]) == len(seen[0]) + cfg["budget"] - 2  # round 1: 2 re-asked, 6 new rows


def test_audit_budget_and_annotator_errors():
    with pytest.raises(ValueError, match=r"budget: expected at least 2 for \['pfk\+audit'\]"):
        runner.prepare(dict(NOISY, budget=1, strategies=["pfk+audit"], rounds=1))
    with pytest.raises(TypeError, match="truth"):
        data.annotate_again(np.array([0.5]), 0.1, classes=2, seed=0)
    for truth, rate, classes, name in (([0, 1], 0.1, 1, "classes"), ([0, 1], 1.0, 2, "rate"),
                                       ([0, 3], 0.1, 2, "truth")):
        with pytest.raises(ValueError, match=name):
            data.annotate_again(np.array(truth), rate, classes=classes, seed=0)
