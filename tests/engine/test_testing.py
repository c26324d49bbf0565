"""pyfk.testing.assert_topk_valid: accepts every correct answer (any tie order), rejects wrong ones."""

import numpy as np
import pytest
import torch

import pyfk
from pyfk.testing import assert_topk_valid
from tests.oracle import topk64


@pytest.fixture
def case(rng):
    R = rng.integers(-5, 6, size=(6, 40)).astype(np.float64)  # many ties
    scores, index = topk64(R, 7)
    return R, scores.astype(np.float32), index.astype(np.int64)


def test_accepts_the_exact_answer_and_torch(case):
    R, s, i = case
    assert_topk_valid(s, i, R, 7)
    assert_topk_valid(torch.from_numpy(s), torch.from_numpy(i), torch.from_numpy(R), 7)


def test_accepts_another_tie_order(case):
    R, s, i = case
    alt = i.copy()
    for r in range(R.shape[0]):  # among items tied with the k-th, take the largest indices instead
        kth = s[r, -1]
        tied = np.flatnonzero(R[r] == kth)
        above = i[r][R[r, i[r]] > kth]
        pick = np.concatenate([above, tied[::-1][:7 - len(above)]])
        alt[r] = pick[np.lexsort((pick, -R[r, pick]))]
    assert_topk_valid(s, alt, R, 7)


@pytest.mark.parametrize("defect", ["duplicate", "out_of_range", "not_descending", "wrong_score", "misses_best",
                                    "dtype", "shape"])
def test_rejects_wrong_answers(case, defect):
    R, s, i = case
    s, i = s.copy(), i.copy()
    if defect == "duplicate":
        i[2, 1] = i[2, 0]
    elif defect == "out_of_range":
        i[0, 3] = R.shape[1]
    elif defect == "not_descending":
        s[1, [0, 6]] = s[1, [6, 0]]
        i[1, [0, 6]] = i[1, [6, 0]]
        if s[1, 0] == s[1, 6]:
            s[1, 0] -= 1
    elif defect == "wrong_score":
        s[3, 2] += 0.5
    elif defect == "misses_best":
        worst = np.argsort(R[4])[0]
        i[4, -1] = worst
        s[4, -1] = R[4, worst]
    elif defect == "dtype":
        i = i.astype(np.int32)
    elif defect == "shape":
        s, i = s[:, :6], i[:, :6]
    with pytest.raises(AssertionError):
        assert_topk_valid(s, i, R, 7)


def test_is_exported():
    assert pyfk.testing.assert_topk_valid is assert_topk_valid
