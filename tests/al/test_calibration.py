"""Temperature scaling and ECE (pyfk.al.calibration) against direct NumPy computations, and the
runner's `calibrate` key: a temperature fitted on the validation split every round, applied to the
probabilities the uncertainty strategies read, ECE/NLL before and after in every round's row."""

import csv
import io
import json
import math

import numpy as np
import pytest
import torch

import pyfk
from pyfk import al
from pyfk.al import calibration, runner
from pyfk.al.calibration import apply_temperature, calibrate, expected_calibration_error, nll, temper_probs
from tests.al.runs import interrupted_run

# ----------------------------------------------------------------------------- independent references


def _np_nll(logits, labels, t):
    """Mean NLL of softmax(logits / t), written out: -(z_y - log sum exp z), z = logits / t."""
    z = np.asarray(logits, dtype=np.float64) / t
    m = z.max(1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(1))
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))


def _golden_temperature(logits, labels, lo=1e-2, hi=1e2, iters=200):
    """Golden-section search for the NLL's minimiser over log T in [log lo, log hi] (the NLL is
    unimodal in log T: convex in 1/T, and 1/T is monotone in log T)."""
    a, b = math.log(lo), math.log(hi)
    r = (math.sqrt(5) - 1) / 2
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = _np_nll(logits, labels, math.exp(c)), _np_nll(logits, labels, math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = _np_nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = _np_nll(logits, labels, math.exp(d))
    return math.exp((a + b) / 2)


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_ece(probs, labels, bins):
    """Top-label ECE by a loop over the bins (lo, hi] of np.linspace(0, 1, bins + 1), the first also 0."""
    p = np.asarray(probs, dtype=np.float64)
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for b in range(bins):
        in_bin = (conf > edges[b]) & (conf <= edges[b + 1])
        if b == 0:
            in_bin |= conf == 0
        n = int(in_bin.sum())
        if n:
            acc = float(np.mean(pred[in_bin] == labels[in_bin]))
            total += n / len(p) * abs(acc - float(np.mean(conf[in_bin])))
    return total


def _calibrated_data(seed, n, c, scale, spread=2.0):
    """Logits scale * z whose labels are drawn from softmax(z): the true temperature is `scale`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, spread, (n, c))
    p = _np_softmax(z)
    labels = (rng.random((n, 1)) > p.cumsum(1)).sum(1).clip(0, c - 1)
    return scale * z, labels


# ----------------------------------------------------------------------------- calibrate


@pytest.mark.parametrize("seed", range(6))
def test_temperature_is_the_nll_minimiser_found_by_golden_section(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 400)), int(rng.integers(2, 12))
    scale = float(np.exp(rng.uniform(np.log(0.2), np.log(5))))
    logits, labels = _calibrated_data(seed, n, c, scale, spread=float(rng.uniform(0.5, 4)))
    labels = np.where(rng.random(n) < 0.2, rng.integers(0, c, n), labels)  # some label noise
    t = calibrate(logits, labels)
    ref = _golden_temperature(logits, labels)
    assert 0.01 <= t <= 100
    if 0.011 < ref < 99:  # interior: the same minimiser
        assert t == pytest.approx(ref, rel=1e-6)
    else:  # at a bound: the same bound
        assert t == pytest.approx(ref, rel=1e-3)
    grid = np.exp(np.linspace(np.log(0.01), np.log(100), 2001))
    best_on_grid = min(_np_nll(logits, labels, g) for g in grid)
    assert _np_nll(logits, labels, t) <= best_on_grid + 1e-12
    assert nll(logits, labels, t) == pytest.approx(_np_nll(logits, labels, t), rel=1e-12, abs=1e-15)


def test_overconfident_logits_recover_their_temperature_and_calibrated_ones_one():
    logits, labels = _calibrated_data(0, 20000, 5, 1.0)
    assert calibrate(logits, labels) == pytest.approx(1.0, rel=0.05)
    assert calibrate(3 * logits, labels) == pytest.approx(3.0, rel=0.05)   # over-confident: softened
    assert calibrate(logits / 3, labels) == pytest.approx(1 / 3, rel=0.05)  # under-confident: sharpened
    # the fitted temperature removes most of the miscalibration
    t = calibrate(3 * logits, labels)
    before = _np_ece(_np_softmax(3 * logits), labels, 15)
    after = _np_ece(_np_softmax(3 * logits / t), labels, 15)
    assert after < before / 3


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_nll_after_is_at_most_before(seed, scale):
    logits, labels = _calibrated_data(seed, 300, 4, scale)
    t = calibrate(logits, labels)
    assert _np_nll(logits, labels, t) <= _np_nll(logits, labels, 1.0) + 1e-12
    for near in (t * 0.99, t * 1.01):  # a local (hence, convex in 1/T, the global) minimum
        if 0.01 <= near <= 100:
            assert _np_nll(logits, labels, t) <= _np_nll(logits, labels, near) + 1e-12


def test_edge_cases():
    # C = 2, N = 1, classified correctly: the NLL falls as T -> 0, so the lowest temperature is returned
    assert calibrate(np.array([[2.0, -1.0]]), np.array([0])) == 0.01
    # N = 1 wrong with its label above the average logit: an interior minimum
    one, label = np.array([[3.0, 1.0, -4.0]]), np.array([1])
    assert calibrate(one, label) == pytest.approx(_golden_temperature(one, label), rel=1e-6)
    # N = 1 wrong with its label at the lowest logit: the NLL falls as T -> inf
    assert calibrate(one, np.array([2])) == 100.0
    # every row correct: the lowest bound, and the bounds are the caller's
    logits, labels = _calibrated_data(1, 50, 3, 1.0)
    labels = logits.argmax(1)
    assert calibrate(logits, labels) == 0.01
    assert calibrate(logits, labels, bounds=(0.5, 2.0)) == 0.5
    assert _np_nll(logits, labels, 0.01) < _np_nll(logits, labels, 1.0)
    # constant rows: the NLL does not depend on T
    assert calibrate(np.zeros((4, 3)), np.array([0, 1, 2, 0])) == 1.0
    # integer logits, torch tensors and float32 are read as float64
    logits, labels = _calibrated_data(2, 100, 4, 2.0)
    t = calibrate(logits, labels)
    assert calibrate(torch.from_numpy(logits), torch.from_numpy(labels)) == t
    assert calibrate(torch.from_numpy(logits).requires_grad_(), labels) == t
    assert calibrate(logits.astype(np.float32), labels.astype(np.int32)) == pytest.approx(t, rel=1e-5)
    ints = np.array([[3, 0], [0, 2], [1, 1], [2, 0]])
    assert calibrate(ints, np.array([0, 1, 0, 1])) == pytest.approx(
        _golden_temperature(ints, np.array([0, 1, 0, 1])), rel=1e-6)
    # deterministic
    assert all(calibrate(logits, labels) == t for _ in range(3))


# ----------------------------------------------------------------------------- temperature on probabilities


@pytest.mark.parametrize("t", [0.25, 1.0, 1.7, 30.0])
def test_temper_probs_equals_softmax_of_scaled_logits(t):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (4, 50, 7))  # e.g. (K, N, C) MC passes
    want = _np_softmax(logits / t)
    assert np.allclose(apply_temperature(logits, t), want, rtol=1e-12, atol=1e-15)
    probs = _np_softmax(logits)
    assert np.allclose(temper_probs(probs, t), want, rtol=1e-10, atol=1e-15)
    assert np.allclose(temper_probs(probs[0], t), want[0], rtol=1e-10, atol=1e-15)  # (N, C)
    assert np.allclose(temper_probs(5 * probs, t), want, rtol=1e-10, atol=1e-15)  # unnormalised rows
    p32 = temper_probs(probs.astype(np.float32), t)
    assert p32.dtype == np.float32 and np.allclose(p32, want, rtol=1e-5, atol=1e-7)
    zero = probs.copy()
    zero[0, 0, 0] = 0.0  # an underflowed entry stays 0
    assert temper_probs(zero, t)[0, 0, 0] == 0.0
    assert np.allclose(temper_probs(zero, t).sum(-1), 1.0)
    assert np.array_equal(temper_probs(probs, t).argmax(-1), probs.argmax(-1))  # argmax is invariant


# ----------------------------------------------------------------------------- ECE


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bins", [1, 2, 7, 10, 15, 100])
def test_ece_equals_a_direct_numpy_loop(seed, bins):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 300)), int(rng.integers(2, 10))
    probs = _np_softmax(rng.normal(0, float(rng.uniform(0.1, 5)), (n, c)))
    labels = rng.integers(0, c, n)
    for p in (probs, probs.astype(np.float32)):
        assert expected_calibration_error(p, labels, bins=bins) == pytest.approx(
            _np_ece(p, labels, bins), rel=1e-12, abs=1e-15)
    # confidences exactly on the bin edges (of np.linspace) belong to the lower bin
    edges = np.linspace(0, 1, bins + 1)
    conf = edges[edges >= 0.5]
    on_edge = np.stack([conf, 1 - conf], 1)
    lab = rng.integers(0, 2, len(conf))
    assert expected_calibration_error(on_edge, lab, bins=bins) == pytest.approx(
        _np_ece(on_edge, lab, bins), rel=1e-12, abs=1e-15)


def test_ece_by_hand():
    # bins of 0.25: conf 0.5 -> (0.25, 0.5], 0.75 -> (0.5, 0.75], 0.9 and 1.0 -> (0.75, 1]
    probs = np.array([[0.5, 0.5], [0.75, 0.25], [0.1, 0.9], [1.0, 0.0]])
    labels = np.array([0, 1, 1, 0])  # right, wrong, right, right
    want = 1 / 4 * abs(1 - 0.5) + 1 / 4 * abs(0 - 0.75) + 2 / 4 * abs(1 - 0.95)
    assert expected_calibration_error(probs, labels, bins=4) == pytest.approx(want, abs=1e-15)
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(3 / 4 - 0.7875), abs=1e-15)
    assert expected_calibration_error(np.array([[0.0, 1.0]]), np.array([1])) == 0.0  # N = 1, all correct, sure
    assert expected_calibration_error(np.array([[0.3, 0.7]]), np.array([1])) == pytest.approx(0.3)
    perfect = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error(perfect, np.array([0, 1, 2, 1])) == 0.0


# ----------------------------------------------------------------------------- errors

GOOD_LOGITS, GOOD_LABELS = np.zeros((3, 2)), np.array([0, 1, 0])
ERRORS = [
    (lambda: calibrate(np.zeros(3), [0, 1, 0]), ValueError,
     r"^logits: expected a finite float array of shape \(N, C\) with N >= 1 and C >= 2, got shape \(3,\)$"),
    (lambda: calibrate(np.zeros((0, 2)), np.zeros(0, int)), ValueError, r"^logits: .*got shape \(0, 2\)"),
    (lambda: calibrate(np.zeros((3, 1)), [0, 0, 0]), ValueError, r"^logits: .*got shape \(3, 1\)"),
    (lambda: calibrate(np.array([[0, np.nan], [1, 2], [0, 0]]), GOOD_LABELS), ValueError,
     r"^logits: expected a finite .*got nan at row 0, column 1$"),
    (lambda: calibrate(np.array([[0, 1], [np.inf, 2], [0, 0]]), GOOD_LABELS), ValueError,
     r"^logits: .*got inf at row 1, column 0$"),
    (lambda: calibrate(np.ones((3, 2), bool), GOOD_LABELS), TypeError, r"^logits: .*got dtype bool$"),
    (lambda: calibrate([["a", "b"]], [0]), TypeError, r"^logits: .*got dtype <U1$"),
    (lambda: calibrate(np.ma.masked_array(GOOD_LOGITS), GOOD_LABELS), TypeError, r"^logits: .*masked array"),
    (lambda: calibrate(GOOD_LOGITS, [0.0, 1.0, 0.0]), TypeError,
     r"^labels: expected integer class labels in \[0, 2\) of shape \(3,\), got dtype float64$"),
    (lambda: calibrate(GOOD_LOGITS, [True, False, True]), TypeError, r"^labels: .*got dtype bool$"),
    (lambda: calibrate(GOOD_LOGITS, [0, 1]), ValueError, r"^labels: .*\(one per row\), got shape \(2,\)$"),
    (lambda: calibrate(GOOD_LOGITS, [[0, 1, 0]]), ValueError, r"^labels: .*got shape \(1, 3\)$"),
    (lambda: calibrate(GOOD_LOGITS, [0, 2, 0]), ValueError, r"^labels: .*in \[0, 2\).*got 2 at row 1$"),
    (lambda: calibrate(GOOD_LOGITS, [0, 1, -1]), ValueError, r"^labels: .*got -1 at row 2$"),
    (lambda: calibrate(GOOD_LOGITS, GOOD_LABELS, bounds=(2.0, 1.0)), ValueError,
     r"^bounds: expected \(lowest, highest\) temperatures with 0 < lowest < highest, got \(2.0, 1.0\)$"),
    (lambda: calibrate(GOOD_LOGITS, GOOD_LABELS, bounds=(0, 1.0)), ValueError, r"^bounds: "),
    (lambda: calibrate(GOOD_LOGITS, GOOD_LABELS, bounds=1.0), ValueError, r"^bounds: "),
    (lambda: calibrate(GOOD_LOGITS, GOOD_LABELS, max_iter=0), ValueError, r"^max_iter: expected an integer in"),
    (lambda: calibrate(GOOD_LOGITS, GOOD_LABELS, max_iter=2.5), TypeError, r"^max_iter: expected an integer"),
    (lambda: nll(GOOD_LOGITS, GOOD_LABELS, 0.0), ValueError, r"^temperature: expected a finite number > 0, got 0.0$"),
    (lambda: apply_temperature(GOOD_LOGITS, -1), ValueError, r"^temperature: .*got -1$"),
    (lambda: apply_temperature(np.array([np.nan, 0]), 1.0), ValueError, r"^logits: expected a finite real array"),
    (lambda: temper_probs(GOOD_LOGITS + 0.5, float("nan")), ValueError, r"^temperature: .*got nan$"),
    (lambda: temper_probs(GOOD_LOGITS + 0.5, True), ValueError, r"^temperature: .*got True$"),
    (lambda: temper_probs(np.array([[0.5, -0.1]]), 2.0), ValueError, r"^probs: expected finite non-negative"),
    (lambda: temper_probs(np.zeros((2, 3)), 2.0), ValueError, r"^probs: .*every row with a positive entry"),
    (lambda: temper_probs(np.ones((2, 3), int), 2.0), ValueError, r"^probs: .*got dtype int64"),
    (lambda: expected_calibration_error(np.full((2, 2), 0.5), [0, 1], bins=0), ValueError,
     r"^bins: expected an integer in \[1, "),
    (lambda: expected_calibration_error(np.full((2, 2), 0.5), [0, 1], bins=True), TypeError, r"^bins: "),
    (lambda: expected_calibration_error(np.full((2, 2), 0.6), [0, 1]), ValueError,
     r"^probs: expected finite probabilities .* \(within 0.001\), got row 0 summing to 1.2$"),
    (lambda: expected_calibration_error(np.array([[1.5, -0.5]]), [0]), ValueError,
     r"^probs: .*got 1.5 at row 0, column 0$"),
    (lambda: expected_calibration_error(np.full((2, 2), 0.5), [0, 3]), ValueError, r"^labels: .*got 3 at row 1$"),
    (lambda: expected_calibration_error(np.full(2, 0.5), [0, 1]), ValueError, r"^probs: .*got shape \(2,\)$"),
]


@pytest.mark.parametrize("call,exc,message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_bad_input_is_refused_naming_the_argument(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_exported():
    assert pyfk.calibrate is calibrate and pyfk.expected_calibration_error is expected_calibration_error
    assert {"calibrate", "expected_calibration_error"} <= set(pyfk.__all__)


# ----------------------------------------------------------------------------- the runner

SMALL = dict(dataset="digits", val_per_class=10, test_per_class=30, imbalance=20, initial=12, budget=6,
             rounds=1, seeds=[0], train_steps=15, batch_size=16, mc_passes=3, k=4,
             strategies=["entropy", "var_ratio"])
QUIET = dict(progress=False, log=lambda *a: None)


def _spied_run(cfg, path, monkeypatch):
    """Run `cfg`; returns (raw PoolInputs from model_inputs, PoolInputs handed to select, calibrate calls),
    each a list in call order."""
    from pyfk.al import strategies

    raw, given, fits = [], [], []
    real_inputs, real_select, real_calibrate = runner.model_inputs, strategies.select, calibration.calibrate

    def inputs_spy(*a, **kw):
        out = real_inputs(*a, **kw)
        raw.append(out[0])
        return out

    def select_spy(name, pool, *a, **kw):
        given.append(pool)
        return real_select(name, pool, *a, **kw)

    def calibrate_spy(logits, labels, **kw):
        t = real_calibrate(logits, labels, **kw)
        fits.append((np.array(logits), np.array(labels), t))
        return t

    monkeypatch.setattr(runner, "model_inputs", inputs_spy)
    monkeypatch.setattr(strategies, "select", select_spy)
    monkeypatch.setattr(calibration, "calibrate", calibrate_spy)
    al.run(cfg, str(path), **QUIET)
    monkeypatch.undo()
    return raw, given, fits


def _records(path):
    return json.loads((path / "state.json").read_text())["runs"]


def _entropy(p):
    p = np.asarray(p, dtype=np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)


def test_runner_fits_a_temperature_every_round_and_strategies_read_calibrated_probabilities(tmp_path, monkeypatch):
    on, off = tmp_path / "on", tmp_path / "off"
    raw_on, given_on, fits = _spied_run(dict(SMALL, calibrate=True), on, monkeypatch)
    raw_off, given_off, no_fits = _spied_run(dict(SMALL, calibrate=False), off, monkeypatch)
    runs_on, runs_off = _records(on), _records(off)
    assert not no_fits

    # every round (the last, which selects nothing, too) records the fit on the validation split
    assert len(fits) == 2 * (SMALL["rounds"] + 1)
    for key in ("entropy/seed0", "var_ratio/seed0"):
        for rec in runs_on[key]:
            logits, labels, t = fits.pop(0)
            assert labels.shape == (100,) and logits.shape == (100, 10)  # val_per_class x 10 classes
            assert rec["temperature"] == t and 0 < t < math.inf
            assert rec["ece_before"] == pytest.approx(_np_ece(_np_softmax(logits), labels, 15), rel=1e-12, abs=1e-15)
            assert rec["ece_after"] == pytest.approx(_np_ece(_np_softmax(logits / t), labels, 15), rel=1e-12,
                                                     abs=1e-15)
            assert math.isfinite(rec["ece_after"]) and 0 <= rec["ece_after"] <= 1
            assert rec["nll_before"] == pytest.approx(_np_nll(logits, labels, 1.0), rel=1e-12)
            assert rec["nll_after"] == pytest.approx(_np_nll(logits, labels, t), rel=1e-12)
            assert rec["nll_after"] <= rec["nll_before"] + 1e-12
            if rec["round"] == 0:  # the same model as without calibration (T changes no prediction)
                assert rec["accuracy"] == runs_off[key][0]["accuracy"]

    # entropy (round 0) read softmax(log(raw) / T); var_ratio's MC passes likewise
    (entropy_raw, var_raw), (entropy_pool, var_pool) = raw_on, given_on
    t_entropy, t_var = runs_on["entropy/seed0"][0]["temperature"], runs_on["var_ratio/seed0"][0]["temperature"]
    want = _np_softmax(np.log(entropy_raw.probs.astype(np.float64)) / t_entropy)
    assert entropy_pool.probs.dtype == entropy_raw.probs.dtype
    assert np.allclose(entropy_pool.probs, want, rtol=1e-5, atol=1e-7)
    assert abs(math.log(t_entropy)) > 0.1  # (this small model is miscalibrated: T is not near 1)
    assert not np.allclose(entropy_pool.probs, entropy_raw.probs, atol=1e-3)
    assert np.allclose(var_pool.mc_probs, _np_softmax(np.log(var_raw.mc_probs.astype(np.float64)) / t_var),
                       rtol=1e-5, atol=1e-7)
    # its picks are the top entropies of the calibrated probabilities
    labeled = np.random.default_rng(runner._seed_for(0, "initial")).choice(len(want), SMALL["initial"], replace=False)
    scores = _entropy(entropy_pool.probs)
    picked = runs_on["entropy/seed0"][0]["selected"]
    assert scores[picked].min() >= np.delete(scores, np.concatenate([picked, labeled])).max()

    # calibrate: false hands the strategies the raw probabilities, the very arrays
    assert all(g is r for g, r in zip(given_off, raw_off))
    # round 0 is the same model either way: same raw probabilities
    assert np.array_equal(raw_on[0].probs, raw_off[0].probs)
    # T cannot change an argmax: var_ratio's votes, hence its picks and whole run, are those of calibrate: false
    strip = [{k: v for k, v in r.items() if k not in runner.CALIBRATION_KEYS + ("train_seconds", "selection_seconds",
                                                                                 "provenance")}
             for r in runs_on["var_ratio/seed0"]]
    assert strip == [{k: v for k, v in r.items() if k not in ("train_seconds", "selection_seconds", "provenance")}
                     for r in runs_off["var_ratio/seed0"]]

    # the rows: new columns with calibrate: true only
    header_on = next(csv.reader(io.StringIO((on / "results.csv").read_text())))
    header_off = next(csv.reader(io.StringIO((off / "results.csv").read_text())))
    assert header_on == header_off + list(runner.CALIBRATION_KEYS)
    assert not set(runner.CALIBRATION_KEYS) & {k for r in runs_off["entropy/seed0"] for k in r}
    rows = json.loads((on / "results.json").read_text())
    assert all(r["temperature"] > 0 for r in rows["rows"])
    entry = rows["summary"]["entropy"][0]
    assert entry["temperature"] == runs_on["entropy/seed0"][0]["temperature"]
    assert "ece_after_min" in entry and "temperature" not in json.loads((off / "results.json").read_text())[
        "summary"]["entropy"][0]
    table = al.format_table(rows["summary"])
    assert "val ECE" in table and "->" in table
    assert "val ECE" not in al.format_table(json.loads((off / "results.json").read_text())["summary"])
    # config.json: the key is written only when true (a calibrate: false directory is as before the key)
    assert json.loads((on / "config.json").read_text())["calibrate"] is True
    assert "calibrate" not in json.loads((off / "config.json").read_text())


def test_a_calibrated_run_resumes_identically(tmp_path, monkeypatch):
    cfg = al.Config.from_dict(dict(SMALL, strategies=["entropy"], calibrate=True))
    al.run(cfg, str(tmp_path / "whole"), **QUIET)
    interrupted_run(monkeypatch, cfg, tmp_path / "cut", 1, **QUIET)
    al.run(cfg, str(tmp_path / "cut"), **QUIET)

    def untimed(path):
        return {k: [{f: v for f, v in r.items() if f not in ("train_seconds", "selection_seconds", "provenance")}
                    for r in rounds] for k, rounds in _records(path).items()}

    a, b = untimed(tmp_path / "whole"), untimed(tmp_path / "cut")
    assert a == b and all("temperature" in r for r in a["entropy/seed0"])


def test_run_directories_with_and_without_calibration_are_not_mixed(tmp_path):
    base = dict(SMALL, rounds=0, strategies=["random"])
    old = tmp_path / "old"
    al.run(base, str(old), **QUIET)
    # a directory made before the key (no "calibrate" in config.json) is calibrate: false ...
    assert "calibrate" not in json.loads((old / "config.json").read_text())
    al.run(dict(base, calibrate=False), str(old), **QUIET)
    # ... also when config.json says so explicitly
    cfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(dict(cfg, calibrate=False)))
    al.run(base, str(old), **QUIET)
    # and is not continued with calibration (nor a calibrated one without)
    with pytest.raises(ValueError, match=r"run: .* holds a run with a different config \(keys \['calibrate'\]\)"):
        al.run(dict(base, calibrate=True), str(old), **QUIET)
    al.run(dict(base, calibrate=True), str(tmp_path / "new"), **QUIET)
    with pytest.raises(ValueError, match=r"different config \(keys \['calibrate'\]\)"):
        al.run(base, str(tmp_path / "new"), **QUIET)


@pytest.mark.parametrize("value", ["yes", 1, None, 0.0])
def test_calibrate_must_be_a_bool(value):
    with pytest.raises(ValueError) as info:
        al.Config.from_dict(dict(SMALL, calibrate=value))
    assert info.value.problems == [f"calibrate: expected true or false (fit a temperature on the validation "
                                   f"split every round), got {value!r}"]
