"""pyfk.integrations.skactiveml: PyfkQueryStrategy inside a scikit-activeml loop."""
import warnings

import numpy as np
import pytest

pytest.importorskip("skactiveml")

from skactiveml.classifier import SklearnClassifier  # noqa: E402
from skactiveml.utils import MISSING_LABEL, is_labeled, labeled_indices  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

import pyfk  # noqa: E402
from pyfk.integrations.skactiveml import PyfkQueryStrategy  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    X, y_true = load_digits(return_X_y=True)
    X, y_true = X[:600] / 16.0, y_true[:600]
    y = np.full(len(X), MISSING_LABEL)
    init = np.random.default_rng(0).choice(len(X), 30, replace=False)
    y[init] = y_true[init]
    return X, y_true, y


def _clf():
    return SklearnClassifier(LogisticRegression(max_iter=200), classes=range(10))


@pytest.mark.parametrize("strategy", ["entropy", "margin", "random"])
def test_three_rounds_match_pyfk_acquire(digits, strategy):
    X, y_true, y = digits
    y = y.copy()
    clf = _clf()
    for random_state in range(3):
        qs = PyfkQueryStrategy(strategy, random_state=random_state)
        mirror = clone(qs)  # same random_state: the same seed stream as qs
        idx = qs.query(X, y, clf=clf, batch_size=8)
        assert idx.shape == (8,) and len(np.unique(idx)) == 8
        assert not is_labeled(y[idx]).any()

        # the same call through pyfk directly: probs from a clone fitted on (X, y), the seed drawn
        # from the RandomState skactiveml's _validate_data sets
        mirror._validate_data(X, y, None, 8, False)
        seed = int(mirror.random_state_.randint(2**31 - 1))
        pool = pyfk.PoolInputs(n=len(X)) if strategy == "random" else \
            pyfk.PoolInputs(probs=clone(clf).fit(X, y).predict_proba(X))
        ref = pyfk.acquire(strategy, pool, 8, labeled=labeled_indices(y), seed=seed)
        np.testing.assert_array_equal(idx, ref.indices)

        assert not hasattr(clf, "classes_")  # the caller's classifier stays unfitted (a clone is fitted)
        y[idx] = y_true[idx]
    assert int(is_labeled(y).sum()) == 30 + 3 * 8


def test_same_random_state_same_picks(digits):
    X, _, y = digits
    a = PyfkQueryStrategy("random", random_state=7).query(X, y, batch_size=5)
    b = PyfkQueryStrategy("random", random_state=7).query(X, y, batch_size=5)
    np.testing.assert_array_equal(a, b)


def test_candidates_index_subset(digits):
    X, _, y = digits
    cand = np.flatnonzero(~is_labeled(y))[::7][:40]
    for strategy in ("entropy", "random"):
        idx = PyfkQueryStrategy(strategy, random_state=0).query(X, y, clf=_clf(), candidates=cand, batch_size=6)
        assert set(idx) <= set(cand) and len(np.unique(idx)) == 6


def test_return_utilities_layout(digits):
    X, _, y = digits
    idx, util = PyfkQueryStrategy("margin", random_state=0).query(X, y, clf=_clf(), batch_size=4,
                                                                   return_utilities=True)
    assert util.shape == (4, len(X))
    for b in range(4):
        row = util[b]
        assert set(np.flatnonzero(~np.isnan(row))) == set(idx[b:])  # picks b, b+1, ... only
        assert np.isnan(row[labeled_indices(y)]).all()


def test_precomputed_pool_inputs(digits):
    X, _, y = digits
    probs = _clf().fit(X, y).predict_proba(X)
    idx = PyfkQueryStrategy("least_confidence", random_state=0).query(X, y, pool=pyfk.PoolInputs(probs=probs),
                                                                       batch_size=5)
    assert not is_labeled(y[idx]).any()
    with pytest.raises(ValueError, match="pool: expected PoolInputs over the 600 rows"):
        PyfkQueryStrategy("entropy").query(X, y, pool=pyfk.PoolInputs(probs=probs[:100]))


def test_errors(digits):
    X, y_true, y = digits
    with pytest.raises(ValueError, match="candidates: expected None or a 1-D array of row indices"):
        PyfkQueryStrategy("entropy").query(X, y, clf=_clf(), candidates=X[:20])
    with pytest.raises(ValueError, match="y: expected a float array"):
        PyfkQueryStrategy("random").query(X, y_true)
    with pytest.raises(ValueError, match="validation: strategy 'pfk' reads a validation set"):
        PyfkQueryStrategy("pfk").query(X, y, clf=_clf())
    with pytest.raises(TypeError, match="model: found no torch.nn.Module inside SklearnClassifier"):
        PyfkQueryStrategy("pfk", validation=0.2).query(X, y, clf=_clf())
    with pytest.raises(TypeError, match="model: found no torch.nn.Module"):
        PyfkQueryStrategy("bald").query(X, y, clf=_clf())
    with pytest.raises(ValueError, match="clf: strategy 'entropy' reads"):
        PyfkQueryStrategy("entropy").query(X, y)
    with pytest.raises(TypeError, match="validation: with pool=, expected a pyfk.ValInputs"):
        PyfkQueryStrategy("pfk", validation=0.2).query(X, y, pool=pyfk.PoolInputs(n=len(X)))
    with pytest.raises(ValueError, match="strategy: expected one of"):
        PyfkQueryStrategy("nope").query(X, y)
    with pytest.raises(TypeError, match="clf: expected a skactiveml SkactivemlClassifier"):
        PyfkQueryStrategy("entropy").query(X, y, clf=LogisticRegression())
    with pytest.raises(ValueError, match="entropy: unknown parameter"):
        PyfkQueryStrategy("entropy", k=3).query(X, y, clf=_clf())


def test_int_y_with_integer_missing_label_is_fine(digits):
    X, y_true, y = digits
    y_int = np.where(is_labeled(y), y_true, -1)
    clf = SklearnClassifier(LogisticRegression(max_iter=200), classes=range(10), missing_label=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx = PyfkQueryStrategy("entropy", missing_label=-1, random_state=0).query(X, y_int, clf=clf, batch_size=3)
    assert (y_int[idx] == -1).all()


def test_params_survive_clone():
    qs = PyfkQueryStrategy("pfk", random_state=1, k=5, normalize="l2")
    c = clone(qs)
    assert c.params == {"k": 5, "normalize": "l2"} and c.strategy == "pfk" and c.random_state == 1
    assert c.validation is None and c.layers == "auto" and c.mc_passes == 10
    c.set_params(k=9, random_state=2)
    assert c.params["k"] == 9 and c.random_state == 2


def _net(seed=0):
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(32, 10))


@pytest.mark.parametrize("strategy,validation", [("bald", None), ("badge", None), ("coreset", None),
                                                 ("pfk", "split"), ("pfk", 0.25)])
def test_torch_classifier_loop_reads_the_module(digits, strategy, validation):
    """SklearnClassifier(TorchClassifier(net)): pyfk reads the module of the clone it fits, and every
    round's picks equal pyfk.acquire on inputs computed independently from that module."""
    from pyfk.al.inputs import holdout, model_inputs
    from pyfk.integrations import TorchClassifier

    X, y_true, y = digits
    y = y.copy()
    x_all, y_all = load_digits(return_X_y=True)
    split = (x_all[600:700] / 16.0, y_all[600:700])
    val = split if validation == "split" else validation
    clf = SklearnClassifier(TorchClassifier(_net(), epochs=15, lr=1e-2), classes=range(10))
    for random_state in range(2):
        qs = PyfkQueryStrategy(strategy, random_state=random_state, validation=val)
        mirror = clone(qs)
        idx = qs.query(X, y, clf=clf, batch_size=8)
        assert idx.shape == (8,) and len(np.unique(idx)) == 8 and not is_labeled(y[idx]).any()

        mirror._validate_data(X, y, None, 8, False)
        seed = int(mirror.random_state_.randint(2**31 - 1))
        fitted = clone(clf).fit(X, y)
        want_val = val
        if isinstance(val, float):
            lab = labeled_indices(y)
            rows = holdout(np.arange(len(lab)), val, seed)
            want_val = (X[lab][rows], y[lab][rows])
        pool, val_inputs = model_inputs(strategy, fitted.estimator_.module_, X, val=want_val, seed=seed)
        ref = pyfk.acquire(strategy, pool, 8, labeled=labeled_indices(y), seed=seed, val=val_inputs)
        np.testing.assert_array_equal(idx, ref.indices)
        y[idx] = y_true[idx]
