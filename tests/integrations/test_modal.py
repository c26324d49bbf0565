"""pyfk.integrations.modal: pyfk strategies inside modAL's DeepActiveLearner loop."""

import numpy as np
import pytest
import torch

pytest.importorskip("modAL")

from modAL.models import ActiveLearner, DeepActiveLearner  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

import pyfk  # noqa: E402
from pyfk.al.inputs import holdout, model_inputs  # noqa: E402
from pyfk.integrations import TorchClassifier  # noqa: E402
from pyfk.integrations.modal import pyfk_query_strategy  # noqa: E402

SEED = 11
PROBS_ONLY = ("entropy", "margin", "least_confidence")


@pytest.fixture(scope="module")
def digits():
    """Rows: validation (100), initial labeled (40), pool (600)."""
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    return dict(x_val=x[:100], y_val=y[:100], x_init=x[100:140], y_init=y[100:140], x_pool=x[140:740],
                y_pool=y[140:740])


def _clf(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 10))
    return TorchClassifier(net, epochs=15, lr=1e-2, seed=seed)


def _learner(d, qs, seed=0):
    learner = DeepActiveLearner(estimator=_clf(seed), query_strategy=qs)
    learner.teach(d["x_init"], d["y_init"])
    return learner


def _reference(strategy, clf, x_pool, n, seed, val=None, **options):
    """pyfk.acquire on inputs built independently of the adapter, from the classifier as it is now."""
    if strategy in PROBS_ONLY:
        return pyfk.acquire(strategy, pyfk.PoolInputs(probs=clf.predict_proba(x_pool)), n, seed=seed)
    module = options.pop("module", None) or clf.module_
    pool, val_inputs = model_inputs(strategy, module, x_pool, val=val, seed=seed, **options)
    return pyfk.acquire(strategy, pool, n, seed=seed, val=val_inputs)


LOOP = {"entropy": {}, "margin": {}, "bald": {"mc_passes": 5}, "badge": {}, "coreset": {}, "pfk": {}}


@pytest.mark.parametrize("strategy", list(LOOP))
def test_three_round_loop_matches_pyfk_acquire(digits, strategy):
    options = dict(LOOP[strategy])
    val = (digits["x_val"], digits["y_val"]) if pyfk.STRATEGIES[strategy].needs.val else None
    if val is not None:
        options["validation"] = val
    qs = pyfk_query_strategy(strategy, seed=SEED, **options)
    learner = _learner(digits, qs)
    x_pool, y_pool, n = digits["x_pool"], digits["y_pool"], 10
    labeled = len(digits["y_init"])
    for r in range(3):
        seed = SEED + r  # DeepActiveLearner keeps no labeled rows: base seed + queries answered
        ref = _reference(strategy, learner.estimator, x_pool, n, seed, val=val,
                         mc_passes=options.get("mc_passes", 10))
        idx, rows = learner.query(x_pool, n_instances=n)
        assert idx.dtype == np.int64 and idx.shape == (n,) and len(np.unique(idx)) == n
        assert idx.min() >= 0 and idx.max() < len(x_pool)
        np.testing.assert_array_equal(rows, x_pool[idx])
        np.testing.assert_array_equal(idx, ref.indices)
        np.testing.assert_allclose(qs.last.scores, ref.scores)
        assert qs.last.provenance["strategy"] == strategy and qs.last.provenance["seed"] == seed
        # a different strategy on the same inputs picks other rows: the adapter ran the one named
        other = pyfk.acquire("random", pyfk.PoolInputs(n=len(x_pool)), n, seed=seed)
        assert not np.array_equal(idx, other.indices)
        learner.teach(x_pool[idx], y_pool[idx])
        labeled += n
        x_pool, y_pool = np.delete(x_pool, idx, 0), np.delete(y_pool, idx)
    assert len(x_pool) == 600 - 30 and labeled == 70 and qs.calls == 3


def test_seed_is_base_seed_plus_round(digits):
    """Round r uses seed + r with a DeepActiveLearner; a rerun of the same loop picks the same rows."""
    def loop(seed, strategy):
        qs = pyfk_query_strategy(strategy, seed=seed)
        learner = _learner(digits, qs)
        x_pool, picks = digits["x_pool"], []
        for _ in range(3):
            idx, _ = learner.query(x_pool, n_instances=5)
            picks.append(idx)
            x_pool = np.delete(x_pool, idx, 0)
        return picks

    for strategy in ("random", "coreset"):
        a, b, c = loop(SEED, strategy), loop(SEED, strategy), loop(SEED + 1, strategy)
        for r in range(3):
            np.testing.assert_array_equal(a[r], b[r])
        assert any(not np.array_equal(a[r], c[r]) for r in range(3))
    x_pool = digits["x_pool"]
    for r, idx in enumerate(loop(SEED, "random")):
        np.testing.assert_array_equal(idx, pyfk.acquire("random", pyfk.PoolInputs(n=len(x_pool)), 5,
                                                        seed=SEED + r).indices)
        x_pool = np.delete(x_pool, idx, 0)


def test_strategy_called_once_per_query(digits):
    qs = pyfk_query_strategy("margin", seed=SEED)
    calls = []

    def counting(learner, x_pool, **kwargs):
        calls.append(kwargs)
        return qs(learner, x_pool, **kwargs)

    learner = _learner(digits, counting)
    idx, rows = learner.query(digits["x_pool"], n_instances=4)
    assert calls == [{"n_instances": 4}] and qs.calls == 1
    idx2, _, metrics = learner.query(digits["x_pool"], n_instances=4, return_metrics=True)
    assert len(calls) == 2 and qs.calls == 2
    np.testing.assert_array_equal(idx2, idx)  # margin reads no seed: the same model picks the same rows
    np.testing.assert_array_equal(metrics, qs.last.scores)


def test_every_strategy_answers_one_query(digits):
    x_pool = digits["x_pool"][:200]
    learner = _learner(digits, pyfk_query_strategy("random"))
    member = _clf(1).fit(digits["x_init"], digits["y_init"]).module_
    for strategy, spec in pyfk.STRATEGIES.items():
        options = {}
        if spec.needs.val:
            options["validation"] = (digits["x_val"], digits["y_val"])
        if spec.needs.passes == "ensemble":
            options["model"] = [learner.estimator.module_, member]
        learner.query_strategy = pyfk_query_strategy(strategy, seed=SEED, mc_passes=3, **options)
        idx, _ = learner.query(x_pool, n_instances=6)
        assert idx.dtype == np.int64 and len(np.unique(idx)) == 6 and idx.max() < len(x_pool), strategy


def test_ensemble_model_list(digits):
    x_pool = digits["x_pool"]
    learner = _learner(digits, pyfk_query_strategy("random"))
    m1 = learner.estimator.module_
    m2 = _clf(1).fit(digits["x_init"], digits["y_init"]).module_
    learner.query_strategy = qs = pyfk_query_strategy("ensemble_bald", seed=SEED, model=[m1, m2])
    idx, _ = learner.query(x_pool, n_instances=8)
    ref = _reference("ensemble_bald", None, x_pool, 8, SEED, module=m1, members=[m2])
    np.testing.assert_array_equal(idx, ref.indices)
    assert qs.last.provenance["strategy"] == "ensemble_bald"


def test_strategy_params_reach_pyfk(digits):
    val = (digits["x_val"], digits["y_val"])
    qs = pyfk_query_strategy("pfk", seed=SEED, validation=val, k=4, normalize="none")
    learner = _learner(digits, qs)
    pool, val_inputs = model_inputs("pfk", learner.estimator.module_, digits["x_pool"], val=val, seed=SEED)
    ref = pyfk.acquire("pfk", pool, 6, seed=SEED, val=val_inputs, k=4, normalize="none")
    idx, _ = learner.query(digits["x_pool"], n_instances=6)
    np.testing.assert_array_equal(idx, ref.indices)
    assert qs.last.provenance["params"] == {"k": 4, "normalize": "none", "use_all": False}


def test_probability_strategy_with_any_estimator(digits):
    """entropy/margin/least_confidence read learner.predict_proba only: no torch model needed."""
    clf = LogisticRegression(max_iter=300).fit(digits["x_init"], digits["y_init"])
    learner = ActiveLearner(estimator=clf, query_strategy=pyfk_query_strategy("least_confidence", seed=SEED))
    idx, _ = learner.query(digits["x_pool"], n_instances=7)
    ref = pyfk.acquire("least_confidence", pyfk.PoolInputs(probs=clf.predict_proba(digits["x_pool"])), 7, seed=SEED)
    np.testing.assert_array_equal(idx, ref.indices)


def test_fraction_validation_with_a_learner_keeping_labeled_rows(digits):
    """An ActiveLearner keeps X_training/y_training: the seed is base + their count, and validation=0.25
    holds out a seeded quarter of them. (ActiveLearner's own fit is broken on scikit-learn >= 1.8 in
    modAL 0.4.2.1, so the labeled rows are set directly and the classifier is fitted outside.)"""
    x_lab, y_lab = digits["x_init"], digits["y_init"]
    clf = _clf().fit(x_lab, y_lab)
    learner = ActiveLearner(estimator=clf, query_strategy=pyfk_query_strategy("pfk", seed=SEED, validation=0.25))
    learner.X_training, learner.y_training = x_lab, y_lab
    idx, _ = learner.query(digits["x_pool"], n_instances=6)
    seed = SEED + len(y_lab)
    rows = holdout(np.arange(len(y_lab)), 0.25, seed)
    ref = _reference("pfk", clf, digits["x_pool"], 6, seed, val=(x_lab[rows], y_lab[rows]))
    np.testing.assert_array_equal(idx, ref.indices)
    assert learner.query_strategy.last.provenance["seed"] == seed


def test_fraction_validation_without_labeled_rows_names_validation(digits):
    learner = _learner(digits, pyfk_query_strategy("pfk", validation=0.2))
    with pytest.raises(ValueError, match="validation: a fraction of the labeled rows needs a learner"):
        learner.query(digits["x_pool"], n_instances=3)


def test_construction_errors(digits):
    with pytest.raises(ValueError, match="strategy: expected one of"):
        pyfk_query_strategy("nope")
    with pytest.raises(ValueError, match=r"pfk: unknown parameter\(s\) \['kk'\]"):
        pyfk_query_strategy("pfk", validation=(digits["x_val"], digits["y_val"]), kk=3)
    with pytest.raises(ValueError, match=r"entropy: unknown parameter\(s\) \['k'\]"):
        pyfk_query_strategy("entropy", k=3)
    with pytest.raises(ValueError, match="validation: strategy 'pfk' reads a validation set"):
        pyfk_query_strategy("pfk")
    with pytest.raises(ValueError, match="seed: expected an integer in"):
        pyfk_query_strategy("random", seed=-1)
    with pytest.raises(TypeError, match="seed: expected an integer"):
        pyfk_query_strategy("random", seed=1.5)
    with pytest.raises(ValueError, match="model: strategy 'ensemble_bald' reads an ensemble"):
        pyfk_query_strategy("ensemble_bald")
    with pytest.raises(TypeError, match="model: expected None"):
        pyfk_query_strategy("badge", model="net")
    with pytest.raises(TypeError, match="mc_passes: expected an integer"):
        pyfk_query_strategy("bald", mc_passes=2.5)


def test_query_errors(digits):
    x_pool = digits["x_pool"][:50]
    qs = pyfk_query_strategy("entropy")
    learner = _learner(digits, qs)
    with pytest.raises(ValueError, match=r"n_instances: expected an integer in \[1, 50\]"):
        learner.query(x_pool, n_instances=51)
    with pytest.raises(ValueError, match="n_instances"):
        learner.query(x_pool, n_instances=0)
    with pytest.raises(TypeError, match="n_instances: expected an integer"):
        learner.query(x_pool, n_instances=2.0)
    with pytest.raises(ValueError, match="X_pool: expected at least one row"):
        learner.query(x_pool[:0], n_instances=1)
    assert qs.calls == 0 and qs.last is None  # a refused query counts nothing (the seed does not move)

    sk = ActiveLearner(estimator=LogisticRegression().fit(digits["x_init"], digits["y_init"]),
                       query_strategy=pyfk_query_strategy("badge"))
    with pytest.raises(TypeError, match="model: found no torch.nn.Module inside LogisticRegression"):
        sk.query(x_pool, n_instances=3)
