"""pyfk.integrations.TorchClassifier (a torch module as an sklearn classifier) and find_module."""

import numpy as np
import pytest
import torch
from sklearn.base import clone

from pyfk.integrations import TorchClassifier
from pyfk.integrations._inputs import AdapterInputs, find_module


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(8, 4))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((80, 6))
    return x, (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0)


def test_fit_is_deterministic_and_leaves_module_untouched(data):
    x, y = data
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    a = TorchClassifier(net, epochs=60, lr=1e-2).fit(x, y)
    b = clone(a).fit(x, y)
    np.testing.assert_array_equal(a.predict_proba(x), b.predict_proba(x))
    assert all(torch.equal(p, q) for p, q in zip(before, net.parameters()))  # trained a copy
    assert a.module_ is not net and a.classes_.tolist() == [0, 1, 2, 3]
    assert a.predict_proba(x).shape == (80, 4) and np.allclose(a.predict_proba(x).sum(1), 1)
    assert (a.predict(x) == y).mean() > 0.6  # it learned something


def test_partial_fit_continues_and_initialize_resets(data):
    x, y = data
    clf = TorchClassifier(_net(), epochs=2, lr=1e-2).fit(x[:40], y[:40])
    p0 = clf.predict_proba(x)
    clf.partial_fit(x[40:], y[40:])
    assert not np.array_equal(p0, clf.predict_proba(x))
    clf.initialize()
    fresh = TorchClassifier(_net(), epochs=2, lr=1e-2).initialize()
    np.testing.assert_array_equal(clf.predict_proba(x), fresh.predict_proba(x))


def test_classes_cover_the_head_even_if_y_does_not(data):
    x, _ = data
    clf = TorchClassifier(_net(), epochs=1).fit(x[:5], np.zeros(5, dtype=int))
    assert clf.predict_proba(x).shape[1] == 4  # columns never move between AL rounds


def test_errors(data):
    x, y = data
    with pytest.raises(ValueError, match=r"y: expected labels in \[0, 4\)"):
        TorchClassifier(_net()).fit(x, y + 1)
    with pytest.raises(ValueError, match="y: expected 80 labels"):
        TorchClassifier(_net()).fit(x, y[:10])
    with pytest.raises(ValueError, match="y: expected integer class labels"):
        TorchClassifier(_net()).fit(x, y + 0.5)
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module"):
        TorchClassifier("resnet").fit(x, y)
    with pytest.raises(ValueError, match="module: expected a classifier ending in an nn.Linear"):
        TorchClassifier(torch.nn.ReLU()).fit(x, y)
    with pytest.raises(ValueError, match="call fit"):
        TorchClassifier(_net()).predict_proba(x)
    with pytest.raises(ValueError, match="sample_weight"):
        TorchClassifier(_net()).fit(x, y, sample_weight=np.ones(len(y)))
    with pytest.raises(TypeError, match="epochs"):
        TorchClassifier(_net(), epochs=1.5).fit(x, y)


def test_find_module_unwraps_peers_wrappers(data):
    x, y = data
    clf = TorchClassifier(_net(), epochs=1).fit(x, y)

    class Wrapper:  # e.g. small-text's SklearnClassifier (.model) or modAL's learner (.estimator)
        def __init__(self, inner):
            self.model = inner

    assert find_module(Wrapper(Wrapper(clf))) is clf.module_
    assert find_module(clf.module_) is clf.module_
    with pytest.raises(TypeError, match="model: found no torch.nn.Module inside Wrapper"):
        find_module(Wrapper(object()))


def test_adapter_inputs_errors():
    with pytest.raises(ValueError, match="validation: strategy 'pfk' reads a validation set"):
        AdapterInputs("pfk")
    with pytest.raises(TypeError, match="validation: expected"):
        AdapterInputs("pfk", validation="val.npz")
    with pytest.raises(ValueError, match="validation: expected a fraction in"):
        AdapterInputs("pfk", validation=0.0)
    with pytest.raises(ValueError, match="model: strategy 'ensemble_entropy' reads an ensemble"):
        AdapterInputs("ensemble_entropy", model=_net())
    with pytest.raises(TypeError, match="model: expected None"):
        AdapterInputs("badge", model=3)
    ai = AdapterInputs("pfk", validation=0.5)
    with pytest.raises(ValueError, match="validation: a fraction of the labeled rows needs a learner"):
        ai(_net(), np.zeros((10, 6)), seed=0)
    with pytest.raises(TypeError, match="model: the callable must return a torch.nn.Module"):
        AdapterInputs("badge", model=lambda clf: "net")(None, np.zeros((10, 6)), seed=0)
    with pytest.raises(ValueError, match="model: strategy 'entropy' reads class probabilities"):
        AdapterInputs("entropy")(None, np.zeros((10, 6)), seed=0)
