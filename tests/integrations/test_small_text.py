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
    with pytest.raises(ValueError, match="inputs: strategy 'badge' needs"):
        PyfkQueryStrategy("badge")
    with pytest.raises(ValueError, match="inputs: strategy 'bald' needs"):
        PyfkQueryStrategy("bald")
    with pytest.raises(ValueError, match="val: strategy 'pfk' needs"):
        PyfkQueryStrategy("pfk", inputs=lambda clf, ds, s: None)
    with pytest.raises(ValueError, match="val: strategy 'pfk' needs"):
        PyfkQueryStrategy()
    with pytest.raises(ValueError, match="strategy: expected one of"):
        PyfkQueryStrategy("nope")
    with pytest.raises(ValueError, match="unknown parameter"):
        PyfkQueryStrategy("entropy", bogus=1)
    with pytest.raises(TypeError, match="seed"):
        PyfkQueryStrategy("entropy", seed=1.5)
    with pytest.raises(TypeError, match="val: expected"):
        PyfkQueryStrategy("entropy", val=3)
    with pytest.raises(TypeError, match="inputs: expected"):
        PyfkQueryStrategy("entropy", inputs="probs")


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

    qs = PyfkQueryStrategy(strategy, seed=SEED, inputs=inputs, val=val if strategy == "pfk" else None)
    learner = _learner(x, y, qs)
    picks = learner.query(num_samples=8)
    assert len(picks) == 8 and len(set(picks.tolist())) == 8
    assert not np.isin(picks, learner.indices_labeled).any() and not np.isin(picks, IGNORED).any()
    assert qs.last.strategy == strategy and np.isfinite(qs.last.scores).all()
