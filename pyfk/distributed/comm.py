"""The collectives pyfk's sharded functions are built from, on torch.distributed.

Every function here is collective: all ranks of `group` call it, in the same order,
with the arguments described (shapes equal on every rank where said). They work on
gloo (CPU tensors) and NCCL (CUDA tensors: pass the rank's device as `device`).

Shards: each rank holds a contiguous slice of the global pool, in rank order, so the
global index of local row r on rank q is offsets[q] + r with offsets the exclusive
prefix sum of the shard sizes gathered in rank order.

Failure: a rank that fails before a collective would leave the others waiting; the
sharded functions therefore validate locally, then call `agree` (pyfk.engine.collectives,
the rule shared with sharded extraction) so that every rank raises the same error (naming
the failing rank) instead of hanging or running on. Hangs inside a collective are bounded
by the group's timeout (`init` sets one).
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

from pyfk.engine.collectives import RankFailed, agree, initialized, rank_and_world  # noqa: F401 - re-exported
from pyfk.engine.topk_state import TopK

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def init(backend: str | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) if it is not initialised yet: gloo on CPU machines, NCCL when
    CUDA is available (or `backend`). Returns True if this call initialised it; False if a
    group existed already or the environment is not a torchrun one (single process)."""
    if initialized():
        return False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def _device(group=None, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_tensor(t: torch.Tensor, group=None, device=None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape and dtype on every rank), in rank order, on CPU."""
    _, world = rank_and_world(group)
    if world == 1:
        return [t.detach().cpu()]
    dev = _device(group, device)
    t = t.detach().to(dev).contiguous()
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return [o.cpu() for o in out]


def shard_offsets(local_n: int, group=None, device=None) -> np.ndarray:
    """(world + 1,) int64: offsets[q] = first global row of rank q's shard, offsets[-1] = N."""
    sizes = all_gather_tensor(torch.tensor([int(local_n)], dtype=torch.int64), group, device)
    return np.concatenate([[0], np.cumsum([int(s[0]) for s in sizes])]).astype(np.int64)


def merge_topk(state: TopK, group=None, device=None) -> TopK:
    """The exact, tie-stable merge of every rank's (M, k) state (global indices), on every rank:
    identical to the state one process computes over the whole pool."""
    _, world = rank_and_world(group)
    if world == 1:
        return state
    keys = all_gather_tensor(state.keys(), group, device)
    return TopK.merge_all([TopK.from_keys(k) for k in keys])


def argmax_global(value: float, index: int, group=None, device=None) -> tuple[float, int]:
    """(max value over ranks, its global index), ties to the smaller index; a rank with
    nothing to offer passes (-inf, -1). Exact: values travel as float64."""
    _, world = rank_and_world(group)
    if world == 1:
        return float(value), int(index)
    vals = all_gather_tensor(torch.tensor([float(value)], dtype=torch.float64), group, device)
    idxs = all_gather_tensor(torch.tensor([int(index)], dtype=torch.int64), group, device)
    best_v, best_i = -np.inf, -1
    for v, i in zip(vals, idxs):
        v, i = float(v[0]), int(i[0])
        if i < 0:
            continue
        if best_i < 0 or v > best_v or (v == best_v and i < best_i):
            best_v, best_i = v, i
    return best_v, best_i


def broadcast_rows(rows: torch.Tensor | None, owner: int, shape: tuple, dtype: torch.dtype, group=None,
                   device=None) -> torch.Tensor:
    """`rows` (given on rank `owner` only) on every rank: shape and dtype known to all."""
    _, world = rank_and_world(group)
    if world == 1:
        return rows
    dev = _device(group, device)
    rank, _ = rank_and_world(group)
    buf = rows.detach().to(dev, dtype).contiguous() if rank == owner else torch.empty(shape, dtype=dtype, device=dev)
    dist.broadcast(buf, src=dist.get_global_rank(group, owner) if group is not None else owner, group=group)
    return buf.cpu()
