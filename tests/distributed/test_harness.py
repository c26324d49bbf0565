"""The test harness itself: results come back in rank order, a failing rank is reported."""

import pytest
from harness import run_ranks


def _echo(rank, world, base):
    import torch.distributed as dist

    return (rank, world, dist.get_rank(), base + rank)


def _fail_on_one(rank, world):
    if rank == 1:
        raise RuntimeError("rank one breaks")
    return rank


def test_results_in_rank_order():
    assert run_ranks(_echo, 3, (10,)) == [(0, 3, 0, 10), (1, 3, 1, 11), (2, 3, 2, 12)]


def test_a_failing_rank_is_reported():
    with pytest.raises(AssertionError, match="rank 1 failed"):
        run_ranks(_fail_on_one, 2)
