"""pyfk.audit (confident learning on kernel-smoothed probabilities) against a float64 NumPy oracle,
planted label flips, cleanlab's confident joint, and `pyfk audit` from the shell."""

import csv
import json

import numpy as np
import pytest

import pyfk
from pyfk.al.audit import audit
from tests.oracle import similarity64


def _blobs(rng, n=240, classes=4, widths=(9, 5), flips=20, separation=3.0):
    """Multi-scale descriptors of `classes` separated blobs, and labels with `flips` planted errors."""
    y = rng.integers(0, classes, n)
    z = []
    for w in widths:
        centres = rng.standard_normal((classes, w)) * separation
        z.append((centres[y] + rng.standard_normal((n, w))).astype(np.float32))
    g = [rng.standard_normal((n, w)).astype(np.float32) for w in widths]
    flipped = np.sort(rng.choice(n, flips, replace=False))
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, classes, flips)) % classes
    return pyfk.Descriptors(z, g), y, noisy, flipped


def oracle(desc, labels, probs, k, alpha, classes, combine="features", normalize="pcc"):
    """The module docstring's steps on the dense float64 R (self excluded, ties to the lower row)."""
    z = [np.asarray(a, np.float64) for a in desc.z]
    g = [np.asarray(a, np.float64) for a in desc.g] if desc.g is not None else None
    R = similarity64(z, g, z, g, combine, normalize)
    n = len(labels)
    np.fill_diagonal(R, -np.inf)
    k = min(k, n - 1)
    cols = np.broadcast_to(np.arange(n), R.shape)
    nb = np.lexsort((cols, -R), axis=-1)[:, :k]
    q = np.zeros((n, classes))
    for i in range(n):
        w = np.maximum(R[i, nb[i]], 0)
        for m, wm in zip(nb[i], w):
            q[i, labels[m]] += wm
        q[i] = q[i] / q[i].sum() if q[i].sum() > 0 else np.full(classes, 1 / classes)
    if probs is not None:
        q = alpha * q + (1 - alpha) * probs
    others = q.copy()
    others[np.arange(n), labels] = -np.inf
    flagged = others.max(1) > q[np.arange(n), labels]
    return q, flagged


@pytest.mark.parametrize("combine", ["features", "product", "sum"])
@pytest.mark.parametrize("with_probs", [False, True])
def test_matches_the_float64_oracle(rng, combine, with_probs):
    desc, _, noisy, _ = _blobs(rng)
    probs = rng.dirichlet(np.ones(4), len(noisy)) if with_probs else None
    rep = audit(desc, noisy, probs=probs, k=7, alpha=0.6, combine=combine, backend="cpu")
    q, flagged = oracle(desc, noisy, probs, 7, 0.6 if with_probs else 1.0, 4, combine)
    inv = np.empty_like(rep.indices)
    inv[rep.indices] = np.arange(len(inv))
    np.testing.assert_allclose(rep.q[inv], q, atol=2e-4)  # float32 kernel scores weigh the votes
    # float32 kernel scores may move a row across a threshold or a near-tie in self-confidence
    assert (rep.flagged[inv] == flagged).mean() > 0.97
    self_conf = rep.q[np.arange(len(q)), rep.given]
    assert np.all(np.diff(self_conf) >= 0)  # ranked by self-confidence, lowest first
    np.testing.assert_allclose(rep.scores, 1 - self_conf)
    assert rep.neighbours.shape == (len(noisy), 7)
    assert not np.any(rep.neighbours == rep.indices[:, None])  # never its own neighbour


def test_planted_flips_rank_first(rng):
    desc, truth, noisy, flipped = _blobs(rng, flips=20, separation=6.0)  # no flip can pass for its given class
    rep = audit(desc, noisy, k=10)
    assert set(rep.indices[:20]) == set(flipped)
    assert set(rep.suspects) == set(flipped)  # the flipped rows' look-alikes all carry the true class
    np.testing.assert_array_equal(rep.suggested[:20], truth[rep.indices[:20]])
    for r in range(20):  # provenance: the neighbours that disagree with the given label
        assert len(rep.disagreeing(r)) >= 6
        assert np.all(noisy[rep.disagreeing(r)] != rep.given[r])


def test_alpha_zero_is_cleanlab_on_the_probabilities(rng):
    """With the vote weighed 0, q = probs: the flagged rows are cleanlab's predicted_neq_given, the
    confident classes its confident-joint off-diagonals, n_issues its calibrated estimate (up to its
    per-cell rounding), and the ranking its self-confidence order."""
    cleanlab = pytest.importorskip("cleanlab")
    from cleanlab import count, filter

    desc, truth, noisy, _ = _blobs(rng)
    logits = 3 * np.eye(4)[truth] + rng.standard_normal((len(truth), 4))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rep = audit(desc, noisy, probs=probs, alpha=0.0)
    np.testing.assert_allclose(rep.q, probs[rep.indices])
    want = filter.find_label_issues(noisy, probs, filter_by="predicted_neq_given")
    assert set(rep.suspects.tolist()) == set(np.flatnonzero(want).tolist())
    _, off = count.compute_confident_joint(noisy, probs, return_indices_of_off_diagonals=True)
    confident = rep.provenance["confident_class"]
    mine = rep.indices[(confident >= 0) & (confident != rep.given)]
    assert set(mine.tolist()) == set(np.asarray(off).tolist())
    estimate = count.num_label_issues(noisy, probs, estimation_method="off_diagonal_calibrated")
    assert abs(rep.provenance["n_issues"] - estimate) <= 4  # cleanlab rounds per cell: about one per class
    self_conf = probs[np.arange(len(noisy)), noisy]
    np.testing.assert_array_equal(rep.indices, np.lexsort((np.arange(len(noisy)), self_conf)))
    assert cleanlab.__version__


def test_small_and_edge_shapes(rng):
    desc, _, noisy, _ = _blobs(rng, n=2, flips=0, widths=(3,))
    rep = audit(desc, noisy, k=5)  # k capped at n - 1
    assert rep.neighbours.shape == (2, 1) and rep.provenance["k"] == 1
    desc, _, noisy, _ = _blobs(rng, n=30, flips=3, widths=(1, 7))
    rep = audit(desc, noisy, k=29, classes=6)
    assert rep.q.shape == (30, 6) and np.isinf(rep.provenance["thresholds"][4:]).all()
    torch = pytest.importorskip("torch")
    rep_t = audit(pyfk.Descriptors([torch.from_numpy(np.asarray(a)) for a in desc.z]), torch.from_numpy(noisy),
                  k=29, classes=6)
    np.testing.assert_array_equal(rep_t.indices, rep.indices)


def test_errors(rng):
    desc, _, noisy, _ = _blobs(rng, n=20, flips=2)
    with pytest.raises(ValueError, match="descriptors: expected at least 2"):
        audit(pyfk.Descriptors([np.ones((1, 3), np.float32)]), [0])
    with pytest.raises(TypeError, match="descriptors: expected pyfk.Descriptors"):
        audit(np.ones((20, 3)), noisy)
    with pytest.raises(ValueError, match="labels: expected shape"):
        audit(desc, noisy[:5])
    with pytest.raises(TypeError, match="labels: expected integer"):
        audit(desc, noisy.astype(float))
    with pytest.raises(ValueError, match=r"labels: expected classes in \[0, 3\)"):
        audit(desc, noisy, classes=3)
    with pytest.raises(ValueError, match="alpha: expected a weight"):
        audit(desc, noisy, alpha=1.5)
    with pytest.raises(ValueError, match="probs: expected an array of shape"):
        audit(desc, noisy, probs=np.full((20, 1), 1.0))
    with pytest.raises(ValueError, match="probs: expected finite non-negative rows summing to 1"):
        audit(desc, noisy, probs=np.full((20, 4), 0.5))
    with pytest.raises(ValueError, match="probs: expected 5 columns"):
        audit(desc, noisy, probs=np.full((20, 4), 0.25), classes=5)
    with pytest.raises(TypeError, match="k"):
        audit(desc, noisy, k=2.5)


def test_cli_writes_flagged_rows(rng, tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    from pyfk.cli import main
    from pyfk.features.store import DescriptorStore
    from pyfk.features.writer import extraction_from_store

    desc, truth, noisy, flipped = _blobs(rng, n=120, flips=8, widths=(12,))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.from_numpy(np.asarray(desc.z[0]))
    store = tmp_path / "store"
    pyfk.extract(net, DataLoader(TensorDataset(x), batch_size=32), ["0", "2"], store=str(store), dtype="float32",
                 progress=False)
    np.save(tmp_path / "labels.npy", noisy)
    out = tmp_path / "suspects.csv"
    assert main(["audit", "--store", str(store), "--labels", str(tmp_path / "labels.npy"), "--k", "10",
                 "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    ext = extraction_from_store(DescriptorStore.open(str(store)))
    rep = audit(ext.descriptors, noisy, k=10)
    assert [int(r["row"]) for r in rows] == rep.suspects.tolist() and len(rows) > 0
    assert [int(r["suggested"]) for r in rows] == rep.suggested[rep.flagged].tolist()
    record = json.loads((tmp_path / "suspects.json").read_text())
    assert record["flagged"] == len(rows) and record["k"] == 10 and record["probs"] is None
    assert main(["audit", "--store", str(store), "--labels", str(tmp_path / "labels.npy"), "--store-probs",
                 "--all", "--out", str(out), "--no-progress"]) == 0
    assert len(list(csv.DictReader(out.open()))) == 120
    # a pickled object array is refused, never loaded
    np.save(tmp_path / "evil.npy", np.array([object()], dtype=object), allow_pickle=True)
    assert main(["audit", "--store", str(store), "--labels", str(tmp_path / "evil.npy"), "--out", str(out)]) == 2
    assert main(["audit", "--store", str(store), "--labels", str(tmp_path / "nope.npy"), "--out", str(out)]) == 2
    np.save(tmp_path / "short.npy", noisy[:5])
    assert main(["audit", "--store", str(store), "--labels", str(tmp_path / "short.npy"), "--out", str(out)]) == 2
    assert main(["audit", "--store", str(tmp_path / "none"), "--labels", str(tmp_path / "labels.npy"),
                 "--out", str(out)]) == 2


@pytest.mark.parametrize("kind", ["symmetric", "class_conditional"])
def test_injected_noise_rates_are_exact(rng, kind):
    from pyfk.al.data import inject_label_noise

    y = rng.integers(0, 7, 1001)
    for rate in (0.0, 0.1, 0.2, 0.37):
        noisy, rows = inject_label_noise(y, rate, kind, seed=11)
        assert len(rows) == round(rate * 1001) and np.all(np.diff(rows) > 0)
        np.testing.assert_array_equal(np.flatnonzero(noisy != y), rows)  # every chosen row changed, no other
        if kind == "class_conditional":
            np.testing.assert_array_equal(noisy[rows], (y[rows] + 1) % 7)
        again, rows2 = inject_label_noise(y, rate, kind, seed=11)
        np.testing.assert_array_equal(again, noisy)
    _, rows = inject_label_noise(y, 0.5, "symmetric", seed=3)
    noisy, _ = inject_label_noise(y, 0.5, "symmetric", seed=3)
    shifts = (noisy[rows] - y[rows]) % 7
    assert set(shifts.tolist()) == set(range(1, 7))  # every other class reachable
    counts = np.bincount(shifts, minlength=7)[1:]
    assert counts.min() > 0.6 * counts.mean()  # roughly uniform over the other classes
    with pytest.raises(ValueError, match="rate: expected a fraction"):
        inject_label_noise(y, 1.0)
    with pytest.raises(ValueError, match="kind: expected one of"):
        inject_label_noise(y, 0.1, "pairs")
    with pytest.raises(TypeError, match="labels: expected a 1-D integer array"):
        inject_label_noise(y.astype(float), 0.1)
