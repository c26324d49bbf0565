"""Intervals over seeds and paired comparisons (pyfk.al.stats, runner.summarise/compare/format_table)
against scipy's t-distribution and a direct NumPy computation."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from pyfk import al
from pyfk.al import runner, stats


@pytest.mark.parametrize("n", [2, 3, 5, 10, 20, 37])
def test_interval_is_the_t_interval(rng, n):
    v = rng.normal(0.4, 0.1, n)
    mean, half = stats.interval(v)
    lo, hi = sps.t.interval(0.95, n - 1, loc=v.mean(), scale=sps.sem(v))
    assert mean == pytest.approx(v.mean(), abs=1e-15)
    assert mean - half == pytest.approx(lo, abs=1e-12) and mean + half == pytest.approx(hi, abs=1e-12)
    # the same by hand: t * s / sqrt(n)
    assert half == pytest.approx(sps.t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n), rel=1e-12)
    assert stats.interval(v, 0.99)[1] > half


def test_interval_of_one_value_and_errors():
    mean, half = stats.interval([0.3])
    assert mean == 0.3 and math.isnan(half)
    with pytest.raises(ValueError, match="values"):
        stats.interval([])
    with pytest.raises(ValueError, match="dof"):
        stats.t_quantile(0)


@pytest.mark.parametrize("n", [3, 8, 20])
def test_paired_agrees_with_the_paired_t_test(rng, n):
    for shift in (0.0, 0.02, 0.2):
        b = rng.normal(0.3, 0.1, n)
        a = b + shift + rng.normal(0, 0.03, n)
        p = stats.paired(a, b)
        d = a - b
        assert p.pairs == n and p.diff == pytest.approx(d.mean(), abs=1e-15)
        assert (p.wins, p.ties, p.losses) == ((d > 0).sum(), (d == 0).sum(), (d < 0).sum())
        # the interval excludes 0 exactly when the two-sided paired t-test rejects at 5%
        pvalue = sps.ttest_rel(a, b).pvalue
        if abs(pvalue - 0.05) > 1e-9:
            assert p.holds == (pvalue < 0.05), (shift, pvalue, p)
    with pytest.raises(ValueError, match="a, b"):
        stats.paired([1, 2], [1, 2, 3])
    one = stats.paired([0.5], [0.2]).to_dict()
    assert one["lo"] is None and one["hi"] is None and one["holds"] is False and one["diff"] == pytest.approx(0.3)


def _rows(rng, strategies, seeds, rounds, effect):
    """Result rows where strategy s gains effect[s] per round over a shared per-seed curve."""
    rows = []
    for seed in seeds:
        base = rng.uniform(0.2, 0.5)
        for s in strategies:
            for r in range(rounds + 1):
                acc = base + (r * (0.05 + effect[s] + rng.normal(0, 0.01)) if r else 0.0)
                rows.append({"strategy": s, "seed": seed, "round": r, "labels": 10 + 5 * r, "accuracy": acc,
                             "minority_accuracy": acc / 2, "selection_seconds": 0.1, "selected_minority": r % 2})
    return rows


def test_compare_pairs_by_seed_per_round_and_over_the_curve(rng):
    effect = {"pfk": 0.05, "entropy": 0.0, "random": 0.05}
    rows = _rows(rng, list(effect), range(12), 3, effect)
    pfk = {(x["seed"], x["round"]): x for x in rows if x["strategy"] == "pfk"}
    for x in rows:  # random: pfk's values +-0.01 by seed parity after round 0, a mean difference of exactly 0
        if x["strategy"] == "random":
            shift = (0.01 if x["seed"] % 2 else -0.01) * (x["round"] > 0)
            x["accuracy"] = pfk[x["seed"], x["round"]]["accuracy"] + shift
            x["minority_accuracy"] = pfk[x["seed"], x["round"]]["minority_accuracy"] + shift
    result = al.compare(rows)
    assert result["reference"] == "pfk" and set(result["metrics"]) == set(runner.PAIRED_METRICS)
    for metric in runner.PAIRED_METRICS:
        per = result["metrics"][metric]
        assert set(per) == {"entropy", "random"}
        for other in per:
            assert [e["round"] for e in per[other]["rounds"]] == [1, 2, 3]  # round 0 is shared: not compared
            for e in per[other]["rounds"]:  # each entry is stats.paired on that round's per-seed values
                a = [x[metric] for x in rows if x["strategy"] == "pfk" and x["round"] == e["round"]]
                b = [x[metric] for x in rows if x["strategy"] == other and x["round"] == e["round"]]
                assert e == {"round": e["round"], "labels": 10 + 5 * e["round"], **stats.paired(a, b).to_dict()}
            mean = per[other]["mean"]
            curve = {s: [np.mean([x[metric] for x in rows if x["strategy"] == s and x["seed"] == seed and x["round"]])
                         for seed in range(12)] for s in ("pfk", other)}
            assert mean == {"rounds": [1, 3], **stats.paired(curve["pfk"], curve[other]).to_dict()}
        assert per["entropy"]["mean"]["holds"] and per["entropy"]["mean"]["diff"] > 0
    text = runner.format_paired(result)
    assert "pfk above entropy" in text and "not separated from random" in text
    assert al.compare(rows, reference="bald") == {}
    assert al.compare([r for r in rows if r["strategy"] == "pfk"]) == {}


def test_compare_uses_only_the_rounds_every_paired_seed_finished(rng):
    effect = {"pfk": 0.05, "entropy": 0.0}
    rows = _rows(rng, list(effect), range(4), 3, effect)
    rows = [r for r in rows if not (r["strategy"] == "entropy" and r["seed"] == 3 and r["round"] >= 2)]
    per = al.compare(rows)["metrics"]["accuracy"]["entropy"]
    assert [e["pairs"] for e in per["rounds"]] == [4, 3, 3]
    assert per["mean"]["rounds"] == [1, 1] and per["mean"]["pairs"] == 4


def test_summary_intervals_and_table(rng):
    effect = {"pfk": 0.05, "random": 0.0}
    rows = _rows(rng, list(effect), range(5), 2, effect)
    summary = al.summarise(rows)
    for s, entries in summary.items():
        for e in entries:
            for m in runner.PAIRED_METRICS:
                vals = [x[m] for x in rows if x["strategy"] == s and x["round"] == e["round"]]
                mean, half = stats.interval(vals)
                assert e[m] == pytest.approx(mean) and e[m + "_lo"] == pytest.approx(mean - half)
                assert e[m + "_hi"] == pytest.approx(mean + half)
                assert e[m + "_min"] == min(vals) and e[m + "_max"] == max(vals)
    table = al.format_table(summary, al.compare(rows))
    assert "5 seeds" in table and "±" in table and "pfk minus each other strategy" in table
    one = al.summarise([r for r in rows if r["seed"] == 0])
    assert one["pfk"][1]["accuracy_lo"] is None and "1 seed;" in al.format_table(one)


def test_compare_other_metrics_and_missing_keys(rng):
    effect = {"pfk": 0.05, "entropy": 0.0, "random": 0.0}
    rows = _rows(rng, list(effect), range(4), 2, effect)
    for x in rows:
        if x["strategy"] != "random":
            x["wrong_labels"] = x["round"] * (1 if x["strategy"] == "pfk" else 3)
            x["queries"] = x["labels"]
    result = al.compare(rows, metrics=("wrong_labels",))
    per = result["metrics"]["wrong_labels"]
    assert set(per) == {"entropy"}  # random has no wrong_labels: not compared on it
    assert [e["diff"] for e in per["entropy"]["rounds"]] == [-2.0, -4.0]
    assert per["entropy"]["rounds"][0]["queries"] == 15
    assert per["entropy"]["mean"]["diff"] == -3.0 and per["entropy"]["mean"]["lo"] == -3.0  # no spread
    assert "pfk above none; below entropy" in runner.format_paired(result)


def test_results_tables_script(rng, tmp_path, capsys, monkeypatch):
    """benchmarks/al_tables.py prints the same numbers as summarise/compare."""
    from benchmarks import al_tables

    effect = {"pfk": 0.05, "entropy": 0.0}
    rows = _rows(rng, list(effect), range(3), 2, effect)
    (tmp_path / "results.json").write_text(__import__("json").dumps({"rows": rows, "summary": al.summarise(rows)}))
    monkeypatch.setattr("sys.argv", ["al_tables.py", str(tmp_path)])
    al_tables.main()
    out = capsys.readouterr().out
    summary, paired = al.summarise(rows), al.compare(rows)
    e = summary["pfk"][2]
    assert "| 2 (20) | " in out and f"{summary['entropy'][2]['accuracy']:.3f} ± " in out
    assert f"{e['minority_accuracy']:.3f} ± {(e['minority_accuracy_hi'] - e['minority_accuracy_lo']) / 2:.3f}" in out
    d = paired["metrics"]["accuracy"]["entropy"]["mean"]
    assert "| entropy | " in out and f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] 3-0-0 *" in out
