"""The failure rule every pyfk collective follows, and the process-group basics, in one place.

Used by pyfk.features.sharded (sharded extraction, ShardedStore.open) and pyfk.distributed
(sharded search and acquisition); it sits in the engine layer so that both can import it.

The rule: a rank that fails must not leave the others waiting in the next collective, so each
step is validated locally and then every rank learns every rank's outcome. If any rank failed,
every rank raises the first failing rank's error: that rank its own exception, every other
rank (failed too or not) its message prefixed "rank r of W:" -- as ValueError/TypeError when
that is what it raised (bad input reads the same on every rank), else as RankFailed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    """Raised on every other rank when one rank of the group failed with an error other than
    ValueError/TypeError (its type, rank and message are in the text)."""


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without an initialised process group."""
    if not initialized():
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the process group it was given")
    return rank, dist.get_world_size(group)


def message_of(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 4000 else text[:4000] + "..."


def raise_failure(kind: str, message: str, first: int, world: int):
    """Raise, on a rank that did not fail, rank `first`'s failure (see the module docstring)."""
    text = f"rank {first} of {world}: {message}"
    if kind == "ValueError":
        raise ValueError(text)
    if kind == "TypeError":
        raise TypeError(text)
    raise RankFailed(f"{kind} on {text}")


def collective(step: Callable[[], Any], group=None, gather: bool = False):
    """Run `step` on this rank, then apply the failure rule (collective: every rank of `group`
    calls it, in the same order). Returns this rank's value, or with `gather` every rank's value
    in rank order (values must then be picklable). One all_gather_object: on NCCL, the rank's
    CUDA device must be set (torch.cuda.set_device), as for any object collective. A rank that
    dies instead of raising breaks the group's connections: the others get torch.distributed's
    error (gloo: at once) or its timeout."""
    try:
        value, error = step(), None
    except BaseException as exc:  # noqa: BLE001 - raised again below, on every rank
        value, error = None, exc
    rank, world = rank_and_world(group)
    if world == 1:
        if error is not None:
            raise error
        return [value] if gather else value
    outcome = (("ok", value if gather else None) if error is None
               else ("error", type(error).__name__, message_of(error)))
    outcomes: list = [None] * world
    dist.all_gather_object(outcomes, outcome, group=group)
    failed = [q for q, o in enumerate(outcomes) if o[0] == "error"]
    if failed:
        if rank == failed[0]:
            raise error
        _, kind, message = outcomes[failed[0]]
        raise_failure(kind, message, failed[0], world)
    return [o[1] for o in outcomes] if gather else value


def agree(error: BaseException | None, group=None, device=None) -> None:
    """The failure rule for an outcome already computed (`error`: this rank's exception or
    None). The common case costs one all_gather of one int64 flag per rank (device: where the
    flag travels; NCCL needs the rank's CUDA device); messages are gathered only on failure."""
    rank, world = rank_and_world(group)
    if world == 1:
        if error is not None:
            raise error
        return
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl"
                  else torch.device("cpu"))
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=device)
    flags = [torch.empty_like(flag) for _ in range(world)]
    dist.all_gather(flags, flag, group=group)
    failed = [q for q, f in enumerate(flags) if int(f[0])]
    if not failed:
        return
    messages: list = [None] * world
    dist.all_gather_object(messages, None if error is None else (type(error).__name__, message_of(error)),
                           group=group)
    if rank == failed[0]:
        raise error
    kind, message = messages[failed[0]]
    raise_failure(kind, message, failed[0], world)
