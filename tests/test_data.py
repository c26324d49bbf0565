"""The biased split builder and the embedded datasets."""

import numpy as np
import pytest

from pyfk import data


@pytest.mark.parametrize("imbalance, expected_minority", [(100, 4), (10, 38), (1, 380), (1000, 1)])
def test_biased_split_exact_counts(imbalance, expected_minority):
    y = np.repeat(np.arange(10), 500)
    np.random.default_rng().shuffle(y)
    seed = int(np.random.default_rng().integers(1000))
    s = data.biased_split(y, imbalance=imbalance, minority=[5, 6, 7, 8, 9], val_per_class=20,
                          test_per_class=100, seed=seed)
    counts = np.bincount(y[s.pool], minlength=10)
    assert counts[:5].tolist() == [380] * 5
    assert counts[5:].tolist() == [expected_minority] * 5
    assert np.bincount(y[s.val], minlength=10).tolist() == [20] * 10
    assert np.bincount(y[s.test], minlength=10).tolist() == [100] * 10
    assert len(np.intersect1d(s.pool, s.val)) == 0 and len(np.intersect1d(s.pool, s.test)) == 0
    assert len(np.intersect1d(s.val, s.test)) == 0
    again = data.biased_split(y, imbalance=imbalance, minority=[5, 6, 7, 8, 9], val_per_class=20,
                              test_per_class=100, seed=seed)
    np.testing.assert_array_equal(again.pool, s.pool)
    other = data.biased_split(y, imbalance=imbalance, minority=[5, 6, 7, 8, 9], val_per_class=20,
                              test_per_class=100, seed=seed + 1)
    assert not np.array_equal(other.val, s.val)


def test_label_noise_rate_and_only_in_pool():
    y = np.repeat(np.arange(10), 500)
    s = data.biased_split(y, imbalance=1, val_per_class=20, test_per_class=100, label_noise=0.3, seed=1)
    flipped = s.pool_labels != y[s.pool]
    assert 0.25 < flipped.mean() < 0.35
    assert (s.pool_labels >= 0).all() and (s.pool_labels < 10).all()


def test_split_errors():
    y = np.repeat(np.arange(3), 50)
    with pytest.raises(ValueError, match="minority: classes \\[7\\] do not occur"):
        data.biased_split(y, minority=[7], val_per_class=5, test_per_class=5)
    with pytest.raises(ValueError, match="class 0: 50 examples, not enough"):
        data.biased_split(y, minority=[1], val_per_class=20, test_per_class=30)
    with pytest.raises(ValueError, match="imbalance: expected a ratio >= 1"):
        data.biased_split(y, minority=[1], imbalance=0.5, val_per_class=5, test_per_class=5)


def test_embedded_mnist5k_is_real_mnist():
    ds = data.load("mnist5k")
    assert ds.x.shape == (5000, 1, 28, 28) and ds.x.dtype == np.float32
    assert np.bincount(ds.y).tolist() == [500] * 10
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert 0.1 < ds.x.mean() < 0.2  # MNIST's mean intensity is about 0.13


def test_unknown_dataset():
    with pytest.raises(ValueError, match="dataset: expected one of"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="pass root="):
        data.load("cifar10")
