"""Intervals over seeds and paired comparisons of strategies, for claims that hold.

An AL curve is a mean over seeds; whether strategy A beats B at some label count is a
question about the seeds' spread. Two tools, both Student-t based (seeds are few):

- `interval(values)`: mean and the half-width h of the two-sided 95% t-interval
  mean +- t_{0.975, n-1} * s / sqrt(n) (s: sample standard deviation, ddof=1);
  h is NaN for a single value (no spread to measure).
- `paired(a, b)`: the same interval on the per-seed differences a_i - b_i, plus how many
  seeds A won, tied and lost. Seeds pair runs that share their random numbers (the
  runner's seed fixes the initial labels and the round-0 model for every strategy), so
  the differences cancel the seed-to-seed spread that unpaired intervals carry.
  `holds` is True when the interval excludes 0 (A > B when diff > 0): the claim
  "A beats B here" is made only then.

Both are per comparison: nothing here corrects for making many of them (20 comparisons at
95% admit one spurious "holds" on average), which is why the runner also compares the
area under the curve (one number per seed and strategy: the mean over the rounds that
follow a selection).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95


def t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    """t_{(1 + confidence) / 2, dof}: the two-sided Student-t critical value."""
    from scipy.stats import t  # scipy is a dependency; imported here to keep `import pyfk` light

    if dof < 1:
        raise ValueError(f"dof: expected an integer >= 1, got {dof!r}")
    return float(t.ppf(0.5 + confidence / 2, dof))


def interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half-width) of the two-sided t-interval of the mean; half-width NaN for one value."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("values: expected at least one value, got none")
    if v.size < 2:
        return float(v[0]), float("nan")
    half = t_quantile(v.size - 1, confidence) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return float(v.mean()), half


@dataclass(frozen=True)
class Paired:
    """a - b over paired seeds: mean difference, its t-interval [lo, hi], and the seed counts."""

    pairs: int
    diff: float
    lo: float
    hi: float
    wins: int    # seeds where a > b
    ties: int
    losses: int  # seeds where a < b

    @property
    def holds(self) -> bool:
        """True when the interval excludes 0 (its sign says which way)."""
        return self.pairs >= 2 and (self.lo > 0 or self.hi < 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["holds"] = self.holds
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def paired(a, b, confidence: float = CONFIDENCE) -> Paired:
    """Compare a[i] with b[i] (same seed i): Paired(pairs, diff, lo, hi, wins, ties, losses)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a, b: expected one value per seed in each, got {a.size} and {b.size}")
    d = a - b
    mean, half = interval(d, confidence)
    return Paired(pairs=int(d.size), diff=mean, lo=mean - half, hi=mean + half,
                  wins=int((d > 0).sum()), ties=int((d == 0).sum()), losses=int((d < 0).sum()))
