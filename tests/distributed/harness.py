"""Run a function on W local gloo ranks (loopback only) and collect each rank's result.

    results = run_ranks(fn, world=3, args=(...))   # fn(rank, world, *args) -> picklable

`fn` must be importable (a module-level function of a test module). Each rank runs in a
fresh spawned process with a default process group (gloo, 127.0.0.1, a free port, a short
collective timeout) and 1 torch thread. Returns the list of results in rank order; raises
AssertionError with every failing rank's traceback, or after `timeout` seconds (the
processes are killed: no test hangs CI).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import traceback

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world, port, args, queue):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))


# Failures of the rendezvous itself, not of the code under test: the free port was taken between
# free_port() and the bind, or a peer's socket closed while the mesh formed (a shared 2-vCPU machine).
RENDEZVOUS_ERRORS = ("connectFullMesh failed", "Address already in use", "EADDRINUSE")


def run_ranks(fn, world: int, args: tuple = (), timeout: float = 180.0, attempts: int = 3) -> list:
    """fn(rank, world, *args) in `world` spawned gloo processes; their results in rank order.
    A rendezvous failure (RENDEZVOUS_ERRORS, every failing rank) is retried on a fresh port, up
    to `attempts` times; any other failure raises AssertionError with each failing rank's traceback."""
    for attempt in range(attempts):
        try:
            return _run_ranks_once(fn, world, args, timeout)
        except AssertionError as exc:
            parts = str(exc).split("--- rank ")[1:]  # one traceback per failing rank; none: a timeout
            rendezvous = bool(parts) and all(any(e in part for e in RENDEZVOUS_ERRORS) for part in parts)
            if not rendezvous or attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")


def _run_ranks_once(fn, world: int, args: tuple, timeout: float) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, args, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    failures: dict[int, str] = {}
    try:
        for _ in range(world):
            try:
                rank, ok, value = queue.get(timeout=timeout)
            except Exception:  # queue.Empty
                raise AssertionError(f"ranks {sorted(set(range(world)) - set(results) - set(failures))} "
                                     f"gave no result within {timeout} s") from None
            (results if ok else failures)[rank] = value
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    if failures:
        raise AssertionError("\n".join(f"--- rank {r} failed:\n{tb}" for r, tb in sorted(failures.items())))
    return [results[r] for r in range(world)]


def descriptors_of(z, g, rows=slice(None), kind="numpy", dtype=None):
    """pyfk.Descriptors of `rows` of per-scale NumPy arrays z (and g, or None): NumPy ("numpy",
    astype `dtype`) or CPU torch tensors ("torch", .to(`dtype`))."""
    import numpy as np
    import torch

    import pyfk

    def conv(a):
        a = a[rows]
        if kind == "torch":
            t = torch.from_numpy(np.ascontiguousarray(a))
            return t if dtype is None else t.to(dtype)
        return a if dtype is None else a.astype(dtype)

    return pyfk.Descriptors([conv(a) for a in z], None if g is None else [conv(a) for a in g])


def checked_cases(cases: list, results: list):
    """(case, per-rank results) for every case expected to succeed, in order; a case with an
    expected error (case["error"] = (kind, pattern)) is checked here with `assert_same_error`."""
    for c, case in enumerate(cases):
        per_rank = [r[c] for r in results]
        if case["error"] is not None:
            assert_same_error(case["name"], per_rank, *case["error"])
            continue
        yield case, per_rank


def assert_same_error(name: str, per_rank: list, kind: type, pattern: str) -> None:
    """Every rank's result is ("error", type name, message, seconds): the expected type, a message
    matching `pattern`, the same text on every rank, and raised promptly (no rank waited for a
    collective timeout)."""
    import re

    for rank, res in enumerate(per_rank):
        assert res[0] == "error", (name, rank, res)
        assert res[1] == kind.__name__ and re.search(pattern, res[2]), (name, rank, res[1], res[2], pattern)
        assert res[3] < 10, (name, rank, f"took {res[3]:.1f} s")
    assert len({res[2] for res in per_rank}) == 1, (name, [res[2] for res in per_rank])
