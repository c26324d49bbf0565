"""pyfk.al.inputs: model_inputs over every pool form, holdout, and their errors."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pyfk
from pyfk.al.inputs import holdout, model_inputs


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                               torch.nn.Linear(16, 5))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((90, 12))  # float64, as sklearn users have it
    return x, rng.standard_normal((20, 12)).astype(np.float32), rng.integers(0, 5, 20)


@pytest.mark.parametrize("strategy", ["entropy", "bald", "badge", "coreset", "pfk", "random"])
def test_every_pool_form_gives_the_same_picks(data, strategy):
    """An array, a tensor, a DataLoader batched alike and a Dataset of (x, y) give the same picks."""
    x, xv, yv = data
    model = _net()
    t = torch.from_numpy(x).float()
    labels = torch.zeros(len(x), dtype=torch.long)
    forms = [x, t, DataLoader(TensorDataset(t), batch_size=512)]
    if strategy != "bald":  # MC-dropout masks follow the batching: a Dataset is read in batch_size rows
        forms.append(TensorDataset(t, labels))
    picks = []
    for pool in forms:
        inputs, val = model_inputs(strategy, model, pool, val=(xv, yv), seed=9)
        assert inputs.n == len(x) and (val is not None) == (strategy == "pfk")
        picks.append(pyfk.acquire(strategy, inputs, 7, val=val, seed=9, labeled=np.arange(5)).indices)
    for p in picks[1:]:
        np.testing.assert_array_equal(p, picks[0])


def test_reads_only_what_the_strategy_declares(data):
    x, xv, yv = data
    pool, val = model_inputs("entropy", _net(), x)
    assert pool.probs.shape == (90, 5) and pool.descriptors is None and val is None
    pool, _ = model_inputs("bald", _net(), x, mc_passes=4, seed=1)
    assert pool.mc_probs.shape == (4, 90, 5) and pool.probs is None
    again, _ = model_inputs("bald", _net(), x, mc_passes=4, seed=1)
    other, _ = model_inputs("bald", _net(), x, mc_passes=4, seed=2)
    np.testing.assert_array_equal(pool.mc_probs, again.mc_probs)
    assert not np.array_equal(pool.mc_probs, other.mc_probs)
    pool, _ = model_inputs("ensemble_bald", _net(), x, members=[_net(), _net()])
    assert pool.mc_probs.shape == (3, 90, 5)
    pool, _ = model_inputs("coreset", _net(), x)
    assert pool.features.z[0].shape == (90, 16)


def test_model_left_in_its_mode(data):
    x, _, _ = data
    model = _net().train()
    model_inputs("bald", model, x, mc_passes=2)
    assert model.training and all(m.training for m in model.modules())


def test_errors(data):
    x, xv, yv = data
    with pytest.raises(ValueError, match="strategy: expected one of"):
        model_inputs("nope", _net(), x)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        model_inputs("entropy", "resnet", x)
    with pytest.raises(ValueError, match="val: strategy reads a validation set"):
        model_inputs("pfk", _net(), x)
    with pytest.raises(ValueError, match="val: expected 20 labels"):
        model_inputs("pfk", _net(), x, val=(xv, yv[:5]))
    with pytest.raises(TypeError, match="pool: expected an array or tensor"):
        model_inputs("entropy", _net(), [[0.0] * 12])
    with pytest.raises(TypeError, match="pool: expected a floating array"):
        model_inputs("entropy", _net(), np.zeros((3, 12), dtype=np.int64))
    with pytest.raises(TypeError, match="val: expected"):
        model_inputs("pfk", _net(), x, val=xv)
    with pytest.raises(ValueError, match="MC dropout: the model has no Dropout"):
        model_inputs("bald", torch.nn.Linear(12, 5), x)


def test_holdout():
    labeled = np.array([40, 3, 17, 8, 99, 23, 5, 61, 12, 70])
    a = holdout(labeled, 0.3, seed=5)
    assert len(a) == 3 and set(a) <= set(labeled) and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, holdout(labeled, 0.3, seed=5))
    assert any(not np.array_equal(a, holdout(labeled, 0.3, seed=s)) for s in range(6, 12))
    assert len(holdout(labeled, 0.01, seed=0)) == 1  # at least one row
    for bad in (0, 1, 1.5, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="validation: expected a fraction in"):
            holdout(labeled, bad, seed=0)
    with pytest.raises(ValueError, match="needs labeled rows"):
        holdout([], 0.5, seed=0)
