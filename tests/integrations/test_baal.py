"""pyfk.integrations.baal: pyfk strategies inside baal's own ActiveLearningLoop."""

import copy
import logging

import numpy as np
import pytest

pytest.importorskip("baal")

import structlog  # noqa: E402  (baal's logger)
import torch  # noqa: E402
from baal.active import ActiveLearningDataset, ActiveLearningLoop  # noqa: E402
from baal.bayesian.dropout import MCDropoutModule  # noqa: E402
from baal.modelwrapper import ModelWrapper, TrainingArgs  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import pyfk  # noqa: E402
from pyfk.al.inputs import holdout, model_inputs  # noqa: E402
from pyfk.integrations.baal import PyfkHeuristic, PyfkInputs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True:UserWarning")  # baal's

# baal logs every training run and step at info level (structlog, to stdout): keep warnings only
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

SEED = 11
N = 15          # picks per round
N_POOL = 1200   # digits rows in the active-learning dataset; the rest is the validation set
INIT = 40       # initially labelled rows


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 64)
    return x, y.astype(np.int64)


def _setup(digits, torch_seed=0):
    """(x, y, ActiveLearningDataset, ModelWrapper, net): INIT seeded rows labelled, an MLP with Dropout."""
    x, y = digits
    torch.manual_seed(torch_seed)
    al = ActiveLearningDataset(TensorDataset(torch.from_numpy(x[:N_POOL]), torch.from_numpy(y[:N_POOL])))
    al.label(np.random.default_rng(torch_seed).choice(N_POOL, INIT, replace=False).tolist())
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))
    args = TrainingArgs(optimizer=torch.optim.Adam(net.parameters(), lr=1e-2), criterion=nn.CrossEntropyLoss(),
                        epoch=8, batch_size=32, workers=0, use_cuda=False)
    return x, y, al, ModelWrapper(net, args), net


def _val(digits):
    x, y = digits
    return x[N_POOL:], y[N_POOL:]


def _reference(strategy, net, pool_x, seed, val=None, centres=None):
    """pyfk.acquire on inputs computed here from the pool rows as an array (not through the adapter);
    coreset: the labelled rows `centres` after them, as its initial centres."""
    labeled = None
    if centres is not None:
        labeled = np.arange(len(pool_x), len(pool_x) + len(centres))
        pool_x = np.concatenate([pool_x, centres])
    pool, val_inputs = model_inputs(strategy, net, pool_x, val=val, seed=seed)
    return pyfk.acquire(strategy, pool, N, labeled=labeled, seed=seed, val=val_inputs).indices


@pytest.mark.parametrize("strategy", ["entropy", "bald", "badge", "coreset", "pfk"])
def test_loop_rounds_match_acquire(digits, strategy):
    x, _, al, wrapper, net = _setup(digits)
    val = _val(digits) if strategy == "pfk" else None
    heuristic = PyfkHeuristic(strategy, query_size=N, seed=SEED, model=wrapper, validation=val, dataset=al)
    loop = ActiveLearningLoop(al, heuristic.get_probabilities, heuristic, query_size=N)
    for r in range(3):
        wrapper.train_on_dataset(al)
        before = al.labelled.copy()
        pool_rows = np.flatnonzero(~before)
        seed = SEED + INIT + r * N
        centres = x[:N_POOL][before] if strategy == "coreset" else None
        want = _reference(strategy, net, x[:N_POOL][pool_rows], seed, val=val, centres=centres)

        assert loop.step() is True
        after = al.labelled
        new = np.flatnonzero(after & ~before)
        assert len(al) == INIT + (r + 1) * N and after.sum() == before.sum() + N
        assert not (before & ~after).any()                      # nothing unlabelled
        sel = heuristic.last
        assert sel.provenance["seed"] == seed and sel.strategy == strategy
        assert len(set(sel.indices.tolist())) == N
        np.testing.assert_array_equal(np.sort(pool_rows[sel.indices]), new)   # pool positions -> dataset rows
        np.testing.assert_array_equal(sel.indices, want)                       # same picks, same order
        if strategy in ("bald", "badge", "pfk"):                               # the seed reaches the strategy
            assert not np.array_equal(want, _reference(strategy, net, x[:N_POOL][pool_rows], seed + 1, val=val))
        if strategy == "coreset":                                              # labelled rows are the centres
            assert sel.provenance["initial_centres"] == len(al) - N and np.isfinite(sel.scores).all()
            assert not np.array_equal(want, _reference(strategy, net, x[:N_POOL][pool_rows], seed))
    assert heuristic.calls == 3


@pytest.mark.parametrize("strategy", sorted(pyfk.STRATEGIES))
def test_every_strategy_one_step(digits, strategy):
    _, _, al, wrapper, net = _setup(digits)
    wrapper.train_on_dataset(al)
    model = [net, nn.Sequential(nn.Linear(64, 10))] if strategy.startswith("ensemble_") else wrapper
    needs_val = pyfk.STRATEGIES[strategy].needs.val
    heuristic = PyfkHeuristic(strategy, query_size=N, seed=SEED, model=model, dataset=al,
                              validation=_val(digits) if needs_val else None)
    before = al.labelled.copy()
    assert ActiveLearningLoop(al, heuristic.get_probabilities, heuristic, query_size=N).step() is True
    assert heuristic.last.strategy == strategy and len(heuristic.last.indices) == N
    np.testing.assert_array_equal(np.sort(np.flatnonzero(~before)[heuristic.last.indices]),
                                  np.flatnonzero(al.labelled & ~before))


def test_rerun_picks_the_same_rows(digits):
    runs = []
    for _ in range(2):
        _, _, al, wrapper, _ = _setup(digits)
        heuristic = PyfkHeuristic("pfk", query_size=N, seed=SEED, model=wrapper, validation=_val(digits), dataset=al)
        loop = ActiveLearningLoop(al, heuristic.get_probabilities, heuristic, query_size=N)
        for _ in range(2):
            wrapper.train_on_dataset(al)
            loop.step()
        runs.append(al.labelled_map.copy())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_strategy_reaches_pyfk(digits):
    """entropy and margin rank the same pool differently: the adapter runs the strategy it was given."""
    _, _, al, wrapper, _ = _setup(digits)
    wrapper.train_on_dataset(al)
    picks = {}
    for strategy in ("entropy", "margin"):
        h = PyfkHeuristic(strategy, query_size=N, seed=SEED, model=wrapper, dataset=al)
        picks[strategy] = h.get_ranks(h.get_probabilities(al.pool))[0]
    assert not np.array_equal(picks["entropy"], picks["margin"])


@pytest.mark.parametrize("strategy", ["bald", "entropy", "random"])
def test_plain_predictions_path(digits, strategy):
    """Existing baal code: wrapper.predict_on_dataset as get_probabilities, PyfkHeuristic as heuristic."""
    _, _, al, wrapper, net = _setup(digits)
    wrapper.model = MCDropoutModule(net)          # baal's MC dropout: Dropout stays on in predict_on_dataset
    seen = []

    def predict(pool, **kwargs):
        seen.append(wrapper.predict_on_dataset(pool, **kwargs))
        return seen[-1]

    heuristic = PyfkHeuristic(strategy, query_size=N, seed=SEED)          # no model: reads baal's arrays
    loop = ActiveLearningLoop(al, predict, heuristic, query_size=N, iterations=6, verbose=False)
    for r in range(2):
        wrapper.train_on_dataset(al)
        before = al.labelled.copy()
        assert loop.step() is True
        logits = torch.from_numpy(seen[-1])                               # [N, C, K] logits
        assert logits.ndim == 3 and logits.shape[1:] == (10, 6)
        probs = torch.softmax(logits.double(), 1).numpy()
        if strategy == "bald":
            pool = pyfk.PoolInputs(mc_probs=np.moveaxis(probs, -1, 0))    # (K, N, C)
        elif strategy == "entropy":
            pool = pyfk.PoolInputs(probs=probs.mean(-1))
        else:
            pool = pyfk.PoolInputs(n=len(probs))
        want = pyfk.acquire(strategy, pool, N, seed=SEED + r).indices     # no dataset=: seed + rounds ranked
        np.testing.assert_array_equal(heuristic.last.indices, want)
        np.testing.assert_array_equal(np.sort(np.flatnonzero(~before)[want]),
                                      np.flatnonzero(al.labelled & ~before))


def test_plain_predictions_forms():
    """Probabilities or logits, [N, C] or [N, C, K], tensors and baal's generator give the same picks."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4, 3)).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    h = PyfkHeuristic("margin", query_size=5, seed=1)
    want = pyfk.acquire("margin", pyfk.PoolInputs(probs=probs.astype(np.float64).mean(-1)), 5, seed=1).indices
    for form in (logits, probs, torch.from_numpy(logits), (b for b in np.split(logits, 5))):
        idx, scores = h.get_ranks(form)
        np.testing.assert_array_equal(idx, want)
        assert scores.shape == (5,)
    idx, _ = h.get_ranks(probs.mean(-1))
    np.testing.assert_array_equal(idx, want)
    # an ensemble's members stacked on the last axis (e.g. baal's EnsembleModelWrapper.predict_on_dataset)
    h = PyfkHeuristic("ensemble_bald", query_size=5, seed=1)
    want = pyfk.acquire("ensemble_bald", pyfk.PoolInputs(mc_probs=np.moveaxis(probs, -1, 0).astype(np.float64)), 5,
                        seed=1).indices
    np.testing.assert_array_equal(h.get_ranks(logits)[0], want)
    # a pool smaller than query_size: every row
    assert sorted(PyfkHeuristic("entropy", query_size=10).get_ranks(probs[:4])[0].tolist()) == [0, 1, 2, 3]


def test_fraction_validation(digits):
    x, y, al, wrapper, net = _setup(digits)
    wrapper.args.epoch = 1              # underfit: the held-out labelled rows keep errors for PFK to query with
    heuristic = PyfkHeuristic("pfk", query_size=N, seed=SEED, model=wrapper, validation=0.3, dataset=al)
    loop = ActiveLearningLoop(al, heuristic.get_probabilities, heuristic, query_size=N)
    for r in range(2):
        wrapper.train_on_dataset(al)
        before = al.labelled.copy()
        seed = SEED + INIT + r * N
        labelled_rows = np.flatnonzero(before)                  # the order ActiveLearningDataset yields them
        held = labelled_rows[holdout(np.arange(len(labelled_rows)), 0.3, seed)]
        want = _reference("pfk", net, x[:N_POOL][~before], seed, val=(x[held], y[held]))
        all_labelled = _reference("pfk", net, x[:N_POOL][~before], seed, val=(x[labelled_rows], y[labelled_rows]))
        assert loop.step() is True
        np.testing.assert_array_equal(heuristic.last.indices, want)
        assert not np.array_equal(want, all_labelled)           # the held-out fraction, not every labelled row
        assert not np.isin(held, np.flatnonzero(al.labelled & ~before)).any()


def test_ensemble_from_modules(digits):
    x, _, al, wrapper, net = _setup(digits)
    other = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    heuristic = PyfkHeuristic("ensemble_var_ratio", query_size=N, seed=SEED, model=[net, other], dataset=al)
    inputs = heuristic.get_probabilities(al.pool)
    assert isinstance(inputs, PyfkInputs) and len(inputs) == N_POOL - INIT
    assert inputs.pool.mc_probs.shape == (2, N_POOL - INIT, 10)
    assert ActiveLearningLoop(al, heuristic.get_probabilities, heuristic, query_size=N).step()
    assert len(al) == INIT + N


def test_errors(digits):
    _, _, al, wrapper, net = _setup(digits)
    val = _val(digits)
    with pytest.raises(ValueError, match="strategy: expected one of"):
        PyfkHeuristic("nope", query_size=5, model=wrapper)
    with pytest.raises(ValueError, match=r"pfk: unknown parameter\(s\) \['kk'\]"):
        PyfkHeuristic("pfk", query_size=5, model=wrapper, validation=val, kk=3)
    with pytest.raises(ValueError, match="validation: strategy 'pfk' reads a validation set"):
        PyfkHeuristic("pfk", query_size=5, model=wrapper)
    with pytest.raises(ValueError, match="model: strategy 'pfk' reads the torch model"):
        PyfkHeuristic("pfk", query_size=5, validation=val)
    with pytest.raises(ValueError, match="validation: a fraction"):
        PyfkHeuristic("pfk", query_size=5, model=wrapper, validation=0.2)
    with pytest.raises(ValueError, match="validation: expected a fraction in"):
        PyfkHeuristic("pfk", query_size=5, model=wrapper, validation=1.5, dataset=al)
    for bad, err in ((0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError), (None, TypeError)):
        with pytest.raises(err, match="query_size: expected"):
            PyfkHeuristic("entropy", query_size=bad, model=wrapper)
    with pytest.raises(TypeError, match="query_size"):
        PyfkHeuristic("entropy", model=wrapper)
    with pytest.raises(TypeError, match="model: found no torch.nn.Module"):
        PyfkHeuristic("badge", query_size=5, model=object())
    with pytest.raises(ValueError, match="model: strategy 'ensemble_bald' reads an ensemble"):
        PyfkHeuristic("ensemble_bald", query_size=5, model=wrapper)
    with pytest.raises(TypeError, match="dataset: expected None or a baal ActiveLearningDataset"):
        PyfkHeuristic("entropy", query_size=5, model=wrapper, dataset=al.pool)
    with pytest.raises(TypeError, match="seed: expected an integer"):
        PyfkHeuristic("entropy", query_size=5, model=wrapper, seed=1.5)

    preds = np.full((20, 10, 3), 0.1)
    with pytest.raises(ValueError, match="get_probabilities"):            # descriptors from a plain array
        PyfkHeuristic("badge", query_size=5, model=wrapper).get_ranks(preds)
    with pytest.raises(ValueError, match="get_probabilities"):
        PyfkHeuristic("pfk", query_size=5, model=wrapper, validation=val).get_ranks(preds)
    with pytest.raises(ValueError, match=r"predictions: .*expected \[N, C, K\]"):
        PyfkHeuristic("bald", query_size=5).get_ranks(preds[..., 0])
    with pytest.raises(ValueError, match="predictions: expected one array"):
        PyfkHeuristic("entropy", query_size=5).get_ranks([preds, preds])
    with pytest.raises(ValueError, match="model: get_probabilities reads the torch model"):
        PyfkHeuristic("entropy", query_size=5).get_probabilities(al.pool)
    with pytest.raises(TypeError, match=r"get_probabilities: unexpected keyword argument\(s\) \['iterations'\]"):
        PyfkHeuristic("bald", query_size=5, model=wrapper).get_probabilities(al.pool, iterations=20)
    with pytest.raises(NotImplementedError, match="no per-row score"):
        PyfkHeuristic("entropy", query_size=5).get_uncertainties(preds)


@pytest.mark.parametrize("strategy", ["badge", "bald"])
def test_baal_mc_dropout_model_reads_as_unpatched(digits, strategy):
    """baal's MCDropoutModule drops in eval mode too: pyfk reads it as the plain model, deterministically,
    and leaves baal's layers in place."""
    x, _, al, wrapper, net = _setup(digits)
    wrapper.train_on_dataset(al)
    plain = copy.deepcopy(net)
    wrapper.model = MCDropoutModule(net)
    layers = list(wrapper.model.modules())
    assert any(type(m).__module__ == "baal.bayesian.dropout" for m in layers)
    heuristic = PyfkHeuristic(strategy, query_size=N, seed=SEED, model=wrapper, dataset=al)
    first = heuristic.get_ranks(heuristic.get_probabilities(al.pool))[0]
    again = heuristic.get_ranks(heuristic.get_probabilities(al.pool))[0]
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, _reference(strategy, plain, x[:N_POOL][~al.labelled], SEED + INIT))
    assert list(wrapper.model.modules()) == layers
