"""The biased split builder and the embedded datasets."""

import numpy as np
import pytest

from pyfk.al import data


@pytest.mark.parametrize("imbalance, expected_minority", [(100, 4), (10, 38), (1, 380), (1000, 1)])
def test_biased_split_exact_counts(imbalance, expected_minority, rng):
    y = np.repeat(np.arange(10), 500)
    rng.shuffle(y)
    seed = int(rng.integers(1000))
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


def _write_idx(path, arr):
    import gzip
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_local_mnist_cifar_svhn_and_folder_layouts(tmp_path, rng):
    import pickle

    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = {s: rng.integers(0, 256, (n, 28, 28)) for s, n in (("train", 7), ("t10k", 3))}
    labs = {s: rng.integers(0, 10, len(imgs[s])) for s in imgs}
    for s in imgs:
        _write_idx(raw / f"{s}-images-idx3-ubyte.gz", imgs[s])
        _write_idx(raw / f"{s}-labels-idx1-ubyte.gz", labs[s])
    ds = data.load("mnist", root=str(tmp_path / "mnist"))
    assert ds.x.shape == (10, 1, 28, 28)
    np.testing.assert_allclose(ds.x[0, 0], imgs["train"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, np.concatenate([labs["train"], labs["t10k"]]))

    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (2, 3072)).astype(np.uint8), "labels": [1, 2]}, f)
    ds = data.load("cifar10", root=str(tmp_path / "cifar"))
    assert ds.x.shape == (12, 3, 32, 32) and ds.y.tolist() == [1, 2] * 6

    from scipy.io import savemat
    svhn = tmp_path / "svhn"
    svhn.mkdir()
    for name in ("train_32x32.mat", "test_32x32.mat"):
        savemat(svhn / name, {"X": rng.integers(0, 256, (32, 32, 3, 2)).astype(np.uint8), "y": np.array([[10], [3]])})
    ds = data.load("svhn", root=str(svhn))
    assert ds.x.shape == (4, 3, 32, 32) and ds.y.tolist() == [0, 3, 0, 3]

    from PIL import Image
    for c in ("cat", "dog"):
        (tmp_path / "folder" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)).save(tmp_path / "folder" / c / f"{i}.png")
    ds = data.load("folder", root=str(tmp_path / "folder"))
    assert ds.x.shape == (4, 3, 6, 6) and ds.y.tolist() == [0, 0, 1, 1] and ds.classes == 2
