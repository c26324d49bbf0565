"""pyfk.integrations.small_text: a small-text PoolBasedActiveLearner driven by pyfk strategies."""

import numpy as np
import pytest

pytest.importorskip("small_text")

from sklearn.datasets import load_digits  # noqa: E402
from small_text import (  # noqa: E402
    ConfidenceEnhancedLinearSVC,
    PoolBasedActiveLearner,
    SklearnClassifierFactory,
    SklearnDataset,
)

import pyfk  # noqa: E402
from pyfk.integrations.small_text import PyfkQueryStrategy  # noqa: E402

SEED = 7
IGNORED = np.array([30, 41, 500])


class Recording(PyfkQueryStrategy):
    """Keeps what small-text passed to each query, and the pool probabilities then."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def query(self, clf, dataset, indices_unlabeled, indices_labeled, y, n=10):
        picks = super().query(clf, dataset, indices_unlabeled, indices_labeled, y, n=n)
        self.calls.append((clf.predict_proba(dataset), np.array(indices_unlabeled), np.array(indices_labeled), picks))
        return picks


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return x[:600] / 16.0, y[:600]


def _learner(x, y, qs):
    factory = SklearnClassifierFactory(ConfidenceEnhancedLinearSVC(), 10)
    learner = PoolBasedActiveLearner(factory, qs, SklearnDataset(x, y, target_labels=np.arange(10)))
    init = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(10)])
    assert not np.isin(IGNORED, init).any()
    learner.initialize_data(init, y[init], indices_ignored=IGNORED)
    return learner


@pytest.mark.parametrize("strategy", ["entropy", "margin", "random"])
def test_loop_matches_acquire(digits, strategy):
    x, y = digits
    qs = Recording(strategy, seed=SEED)
    learner = _learner(x, y, qs)
    n = 10
    for _ in range(3):
        picks = learner.query(num_samples=n)
        assert picks.dtype == np.int64 and len(picks) == n and len(set(picks.tolist())) == n
        assert not np.isin(picks, learner.indices_labeled).any()
        assert not np.isin(picks, IGNORED).any()
        learner.update(y[picks])
    assert len(qs.calls) == 3 and len(learner.indices_labeled) == 20 + 3 * n

    for probs, unlabeled, labeled, picks in qs.calls:
        blocked = np.setdiff1d(np.arange(len(x)), unlabeled)
        assert np.isin(IGNORED, blocked).all() and np.isin(labeled, blocked).all()
        want = pyfk.acquire(strategy, pyfk.PoolInputs(probs=probs), n, labeled=blocked, seed=SEED + len(labeled))
        np.testing.assert_array_equal(picks, want.indices)
    assert qs.last.strategy == strategy and qs.last.provenance["seed"] == SEED + 20 + 2 * n
    assert len(qs.last.scores) == n


def test_rounds_use_different_seeds(digits):
    x, y = digits
    qs = Recording("random", seed=SEED)
    learner = _learner(x, y, qs)
    seeds = []
    for _ in range(2):
        picks = learner.query(num_samples=5)
        seeds.append(qs.last.provenance["seed"])
        learner.update(y[picks])
    assert seeds == [SEED + 20, SEED + 25]


def test_errors():
    with pytest.raises(ValueError, match="validation: strategy 'pfk' reads a validation set"):
        PyfkQueryStrategy()
    with pytest.raises(ValueError, match="validation: strategy 'pcc' reads"):
        PyfkQueryStrategy("pcc", inputs=lambda clf, ds, s: None)
    with pytest.raises(ValueError, match="strategy: expected one of"):
        PyfkQueryStrategy("nope")
    with pytest.raises(ValueError, match="unknown parameter"):
        PyfkQueryStrategy("entropy", bogus=1)
    with pytest.raises(TypeError, match="seed"):
        PyfkQueryStrategy("entropy", seed=1.5)
    with pytest.raises(TypeError, match="validation: expected"):
        PyfkQueryStrategy("pfk", validation="val.npz")
    with pytest.raises(ValueError, match="validation: expected a fraction in"):
        PyfkQueryStrategy("pfk", validation=1.5)
    with pytest.raises(TypeError, match="inputs: expected"):
        PyfkQueryStrategy("entropy", inputs="probs")
    with pytest.raises(TypeError, match="model: expected"):
        PyfkQueryStrategy("badge", model="resnet18")
    with pytest.raises(ValueError, match="model: strategy 'ensemble_bald' reads an ensemble"):
        PyfkQueryStrategy("ensemble_bald")


def test_descriptor_strategy_without_a_torch_model_names_model(digits):
    x, y = digits
    learner = _learner(x, y, PyfkQueryStrategy("badge"))  # a LinearSVC: nothing for pyfk to read
    with pytest.raises(TypeError, match="model: found no torch.nn.Module inside SklearnClassifier"):
        learner.query(num_samples=5)


def test_inputs_must_return_pool_inputs(digits):
    x, y = digits
    qs = PyfkQueryStrategy("badge", inputs=lambda clf, ds, strategy: {"probs": None})
    learner = _learner(x, y, qs)
    with pytest.raises(TypeError, match="inputs: the callable must return a pyfk.PoolInputs"):
        learner.query(num_samples=5)


def test_pool_exhausted_is_small_texts_error(digits):
    from small_text import PoolExhaustedException

    x, y = digits
    learner = _learner(x, y, PyfkQueryStrategy("random"))
    with pytest.raises(PoolExhaustedException):
        learner.query(num_samples=len(x))


@pytest.mark.parametrize("strategy", ["badge", "pfk"])
def test_inputs_from_torch_descriptors(strategy):
    """Descriptors from a torch model via pyfk.extract, fed in through inputs= (and val= for pfk)."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    x_all, y_all = load_digits(return_X_y=True)
    x_all = (x_all / 16.0).astype(np.float32)
    x, y, xv, yv = x_all[:600], y_all[:600], x_all[600:700], y_all[600:700]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x[:50])), torch.from_numpy(y[:50])).backward()
        opt.step()
    model.eval()

    def loader(xs, ys):
        return DataLoader(TensorDataset(torch.from_numpy(xs), torch.from_numpy(ys)), batch_size=64)

    def inputs(clf, dataset, strategy):
        xs = np.asarray(dataset.x, dtype=np.float32)
        ext = pyfk.extract(model, loader(xs, np.asarray(dataset.y)), badge=(strategy == "badge"), progress=False)
        return pyfk.PoolInputs.from_extraction(ext)

    def val(clf):
        return pyfk.ValInputs.from_extraction(pyfk.extract(model, loader(xv, yv), with_true=True, progress=False))

    qs = PyfkQueryStrategy(strategy, seed=SEED, inputs=inputs, validation=val if strategy == "pfk" else None)
    learner = _learner(x, y, qs)
    picks = learner.query(num_samples=8)
    assert len(picks) == 8 and len(set(picks.tolist())) == 8
    assert not np.isin(picks, learner.indices_labeled).any() and not np.isin(picks, IGNORED).any()
    assert qs.last.strategy == strategy and np.isfinite(qs.last.scores).all()


def _net(seed=0):
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(32, 10))


class RecordingInputs(PyfkQueryStrategy):
    """Computes, at each query, the expected picks independently: pyfk.al.inputs.model_inputs on the
    classifier's module and the same seed, then pyfk.acquire."""

    def __init__(self, *args, expect_val=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.expect_val, self.checked = expect_val, 0

    def query(self, clf, dataset, indices_unlabeled, indices_labeled, y, n=10):
        from pyfk.al.inputs import holdout, model_inputs

        seed = SEED + len(indices_labeled)
        val = self.expect_val
        if isinstance(val, float):
            rows = holdout(np.arange(len(y)), val, seed)
            val = (dataset.x[np.asarray(indices_labeled)[rows]], np.asarray(y)[rows])
        pool, val_inputs = model_inputs(self.strategy, clf.model.module_, dataset.x, val=val, seed=seed)
        want = pyfk.acquire(self.strategy, pool, n, labeled=indices_labeled, ignored=IGNORED, seed=seed,
                            val=val_inputs, **self.params)
        picks = super().query(clf, dataset, indices_unlabeled, indices_labeled, y, n=n)
        np.testing.assert_array_equal(picks, want.indices)
        self.checked += 1
        return picks


@pytest.mark.parametrize("strategy,validation", [("bald", None), ("badge", None), ("coreset", None),
                                                 ("pfk", "split"), ("pfk", 0.25), ("pfk_sum", "split")])
def test_torch_classifier_loop_reads_the_module(digits, strategy, validation):
    """A TorchClassifier behind small-text's SklearnClassifier: pyfk finds its module and every round's
    picks equal pyfk.acquire on inputs computed independently from that module."""
    from pyfk.integrations import TorchClassifier

    x_all, y_all = load_digits(return_X_y=True)
    x, y = x_all[:600] / 16.0, y_all[:600]
    split = (x_all[600:700] / 16.0, y_all[600:700])
    val = split if validation == "split" else validation
    qs = RecordingInputs(strategy, seed=SEED, validation=val, expect_val=val)
    factory = SklearnClassifierFactory(TorchClassifier(_net(), epochs=15, lr=1e-2, seed=0), 10)
    learner = PoolBasedActiveLearner(factory, qs, SklearnDataset(x, y, target_labels=np.arange(10)))
    init = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(10)])
    learner.initialize_data(init, y[init], indices_ignored=IGNORED)
    for _ in range(2):
        picks = learner.query(num_samples=8)
        assert len(picks) == 8 and len(set(picks.tolist())) == 8
        assert not np.isin(picks, learner.indices_labeled).any() and not np.isin(picks, IGNORED).any()
        learner.update(y[picks])
    assert qs.checked == 2 and qs.last.strategy == strategy


def test_ensemble_through_model_list(digits):
    x, y = digits
    members = [_net(0), _net(1), _net(2)]
    qs = PyfkQueryStrategy("ensemble_entropy", seed=SEED, model=members)
    learner = _learner(x, y, qs)
    picks = learner.query(num_samples=6)
    assert len(set(picks.tolist())) == 6 and qs.last.strategy == "ensemble_entropy"
