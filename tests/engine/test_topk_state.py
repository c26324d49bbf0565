"""TopK: one exact, tie-stable merge, whatever the split (chunks, threads, ranks)."""

import numpy as np
import pytest
import torch

from pyfk.engine.topk_state import EMPTY_INDEX, TopK
from tests.oracle import topk64


def _state_of(S, cols, k):
    """The exact top-k of S restricted to columns `cols`, as a TopK with global indices."""
    sub = S[:, cols]
    s, pos = topk64(sub, min(k, len(cols)))
    state = TopK.empty(S.shape[0], k)
    return state.merge((torch.from_numpy(s.astype(np.float32)), torch.from_numpy(cols[pos])))


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_any_split_merges_to_the_one_pass_answer(rng, parts):
    S = rng.integers(-4, 5, size=(5, 300)).astype(np.float64)  # ties everywhere
    k = 23
    perm = rng.permutation(300)  # arbitrary, interleaved shards
    states = [_state_of(S, np.sort(c), k) for c in np.array_split(perm, parts)]
    rng.shuffle(states)
    want_s, want_i = topk64(S, k)
    merged = TopK.merge_all(states)
    np.testing.assert_array_equal(merged.scores.numpy(), want_s)
    np.testing.assert_array_equal(merged.index.numpy(), want_i)
    running = TopK.empty(5, k)
    for st in states:  # a running state merged one part at a time
        running = running.merge(st)
    np.testing.assert_array_equal(running.index.numpy(), want_i)


def test_empty_slots_fill_last_and_stay_empty_when_short():
    state = TopK.empty(2, 4)
    assert not state.filled() and (state.index == EMPTY_INDEX).all()
    got = state.merge((torch.tensor([[1.0, 3.0], [-3e38, 0.0]]), torch.tensor([[9, 4], [2, 7]])))
    assert got.index.tolist() == [[4, 9, -1, -1], [7, 2, -1, -1]]
    assert got.scores[0].tolist()[:2] == [3.0, 1.0] and np.isneginf(got.scores[0, 2:].numpy()).all()


def test_signed_zero_and_infinities_order():
    cand = torch.tensor([[-0.0, 0.0, np.inf, -3.4e38, -1e-45, 1e-45]])
    got = TopK.empty(1, 7).merge((cand, torch.tensor([[5, 1, 3, 0, 2, 4]])))
    # +0.0 and -0.0 are one score (ties to the smaller index); denormals keep their order;
    # every finite score ranks above the empty slot
    assert got.index.tolist() == [[3, 4, 1, 5, 2, 0, -1]]


def test_shifted_and_remapped_keep_empty_slots():
    st = TopK(torch.tensor([[2.0, 1.0, -np.inf]]), torch.tensor([[0, 2, -1]]))
    assert st.shifted(100).index.tolist() == [[100, 102, -1]]
    assert st.remapped(np.array([7, 8, 9])).index.tolist() == [[7, 9, -1]]


def test_merge_checks_shapes():
    with pytest.raises(ValueError, match=r"other: expected \(2, c\) scores and index"):
        TopK.empty(2, 3).merge((torch.zeros(3, 1), torch.zeros(3, 1, dtype=torch.int64)))
    with pytest.raises(ValueError, match="states: expected at least one TopK"):
        TopK.merge_all([])
