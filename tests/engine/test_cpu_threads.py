"""The `cpu` backend's threading: both work splits, every thread count, the persistent
worker pool (reused, grown on demand, shared by concurrent callers, rebuilt after fork).

Results must not depend on how the work was shared: on tie-heavy small-integer inputs
(exact in float32) every split and thread count returns the same packed keys as the
float64 oracle, including when a seeded state is merged chunk by chunk."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest
import torch

import pyfk
from pyfk import _C
from pyfk.engine import registry
from pyfk.engine.layout import Layout
from pyfk.engine.topk_state import EMPTY_KEY, TopK, pack_keys

SPLITS = ["auto", "pool", "queries"]


def _tie_heavy(rng, m, n, widths):
    z = [rng.integers(-1, 2, (n, w)).astype(np.float32) for w in widths]
    g = [rng.integers(-1, 2, (n, w)).astype(np.float32) for w in widths]
    z[0][::5] = -0.0
    q = pyfk.Descriptors([rng.integers(-1, 2, (m, w)).astype(np.float32) for w in widths],
                         [rng.integers(-1, 2, (m, w)).astype(np.float32) for w in widths])
    return q, pyfk.Descriptors(z, g)


def _exact_keys(q, p, combine, first, k):
    parts, layout = Layout.of(p, combine)
    q_parts, _ = Layout.of(q, combine)
    pn = torch.cat([torch.from_numpy(a) for a in parts], dim=1).double()
    qn = torch.cat([torch.from_numpy(a) for a in q_parts], dim=1).double()
    exact = layout.similarity(qn, pn).float()
    m, n = exact.shape
    keys = pack_keys(exact, torch.arange(first, first + n).expand(m, -1))
    top = keys.topk(min(k, n), dim=1).values
    return torch.cat([top, torch.full((m, k - top.shape[1]), EMPTY_KEY, dtype=torch.int64)], dim=1)


def _keys(s, i):
    return pack_keys(torch.as_tensor(s), torch.as_tensor(i))


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("combine", ["product", "features"])
@pytest.mark.parametrize("m,n,k", [(1, 300, 7), (4, 300, 300), (13, 250, 17), (40, 1000, 64), (97, 70, 70)])
def test_every_split_and_thread_count_gives_the_oracle_keys(rng, cpu_isa, split, combine, m, n, k):
    q, p = _tie_heavy(rng, m, n, [3, 5])
    want = _exact_keys(q, p, combine, 0, k)
    for threads in (1, 2, 3, 7):
        s, i = pyfk.topk(q, p, k, combine=combine, normalize="none", backend="cpu",
                         options={"threads": threads, "split": split})
        assert torch.equal(_keys(s, i), want), (threads, split)


@pytest.mark.parametrize("split", SPLITS)
def test_seeded_state_merged_chunk_by_chunk(rng, cpu_isa, split):
    """The incoming state is seeded into the heaps (pool split: thread 0's; query split:
    every thread its own rows) and merged exactly with each new chunk."""
    q, p = _tie_heavy(rng, 23, 600, [4, 2])
    parts, layout = Layout.of(p, "product")
    q_parts, _ = Layout.of(q, "product")
    qf = torch.cat([torch.from_numpy(a) for a in q_parts], dim=1)
    b = registry.get("cpu")
    pool = b.prepare(parts, layout, "none")
    options = b.resolve_options({"threads": 3, "split": split})
    state = TopK.empty(23, 40)
    for a in range(0, 600, 170):
        state = b.topk(qf, pool, slice(a, min(600, a + 170)), 40, state, a, options)
    assert torch.equal(state.keys(), _exact_keys(q, p, "product", 0, 40))


def test_split_option_is_checked():
    q = pyfk.Descriptors([np.ones((2, 3), np.float32)], [np.ones((2, 3), np.float32)])
    with pytest.raises(ValueError, match=r"options: 'split' expected None or one of 'auto', 'pool', "
                                         r"'queries', got 'rows'"):
        pyfk.topk(q, q, 1, backend="cpu", options={"split": "rows"})


def test_pool_workers_are_reused_and_grow_on_demand(rng):
    q, p = _tie_heavy(rng, 30, 400, [3])
    pyfk.topk(q, p, 5, backend="cpu", options={"threads": 3})
    started = _C.pool_workers()
    assert started >= 2  # the caller plus at least two workers ran the 3-thread call
    for _ in range(20):
        pyfk.topk(q, p, 5, backend="cpu", options={"threads": 3})
    assert _C.pool_workers() == started  # no thread started per call
    more = started + 3  # earlier tests may have grown the pool already
    q, p = _tie_heavy(rng, 30, 256 * more, [3])  # enough pool ranges for `more` threads
    pyfk.topk(q, p, 5, backend="cpu", options={"threads": more, "split": "pool"})
    assert _C.pool_workers() == more - 1


def test_concurrent_callers_get_their_own_results(rng):
    """Two Python threads (the GIL is released in the kernel) calling at once: the second
    finds the pool busy and runs on threads of its own; both results stay exact."""
    cases = [_tie_heavy(rng, 31, 2000, [4, 3]) for _ in range(4)]
    want = [_exact_keys(q, p, "product", 0, 9) for q, p in cases]
    got: dict[int, list] = {}

    def work(j):
        q, p = cases[j]
        got[j] = [_keys(*pyfk.topk(q, p, 9, normalize="none", backend="cpu", options={"threads": 2}))
                  for _ in range(15)]

    threads = [threading.Thread(target=work, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for j in range(4):
        assert all(torch.equal(keys, want[j]) for keys in got[j])


def _child_topk(conn, q, p):
    s, i = pyfk.topk(q, p, 6, normalize="none", backend="cpu", options={"threads": 3})
    conn.send((s, i))
    conn.close()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_forked_child_starts_its_own_pool(rng):
    """DataLoader workers fork a process whose parent has already used the pool: the child
    must not wait for workers that exist only in the parent."""
    q, p = _tie_heavy(rng, 19, 900, [3, 3])
    want = _keys(*pyfk.topk(q, p, 6, normalize="none", backend="cpu", options={"threads": 3}))
    assert _C.pool_workers() >= 2
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_topk, args=(send, q, p))
    child.start()
    assert recv.poll(120), "the forked child did not answer (hung on the parent's workers?)"
    s, i = recv.recv()
    child.join(30)
    assert child.exitcode == 0
    assert torch.equal(_keys(s, i), want)
