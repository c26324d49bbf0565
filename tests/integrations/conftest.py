"""Shared by the adapter tests."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: torch's thread pool only adds contention (10-50x slower on a busy 2-core machine);
    the old thread count is restored after each module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
