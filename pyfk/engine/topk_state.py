"""TopK: the running top-k state every backend returns into, and its one exact merge.

State: `scores` (M, k) float32, descending per row, and `index` (M, k) int64
global pool indices; an empty slot is (-inf, -1). Order: higher score first,
ties to the smaller index. Merging two states (or a state and a candidate set)
keeps the k best of the union under that order, exactly -- whatever the order in
which chunks, threads, backends or ranks produced them -- so a search split any
way gives the same answer as one pass.

The packed key (the one spec; the C++ heap, the CUDA selection in
csrc/cuda/kselect.cuh and the Triton kernel mirror it, and tests hold them to it):

    bits  = the float32 bit pattern of (score + 0.0) as a signed int32, with
            bits ^ 0x7FFFFFFF applied when negative   (float order == integer order;
            +0.0 folds -0.0 into +0.0)
    key   = bits * 2**32 + (2**32 - 2 - index)        (int64; index in [-1, 2**32 - 2])

so a larger key is a better (score, index) pair and torch.topk on keys is an exact
top-k. The empty slot (-inf, -1) ranks below every entry with a finite score; an
entry scored -inf would rank below it, which never happens to a real entry: inputs
are checked finite and within the float32 range before any search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KEY_LOW = 1 << 32
MAX_INDEX = KEY_LOW - 2  # the largest index a key can hold
EMPTY_INDEX = -1


def pack_keys(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is (score descending, index ascending)."""
    bits = (scores.to(torch.float32) + 0.0).contiguous().view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order == signed int order
    return bits * KEY_LOW + (KEY_LOW - 2 - index.to(torch.int64))


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of pack_keys: (scores float32, index int64)."""
    bits = torch.div(keys, KEY_LOW, rounding_mode="floor")
    index = KEY_LOW - 2 - (keys - bits * KEY_LOW)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int32)
    return bits.view(torch.float32), index


EMPTY_KEY = int(pack_keys(torch.tensor([float("-inf")]), torch.tensor([EMPTY_INDEX]))[0])


@dataclass
class TopK:
    """Running top-k of M queries: scores (M, k) float32 and index (M, k) int64 (see module docstring)."""

    scores: torch.Tensor
    index: torch.Tensor

    @classmethod
    def empty(cls, m: int, k: int, device=None) -> TopK:
        return cls(torch.full((m, k), float("-inf"), dtype=torch.float32, device=device),
                   torch.full((m, k), EMPTY_INDEX, dtype=torch.int64, device=device))

    @property
    def m(self) -> int:
        return int(self.scores.shape[0])

    @property
    def k(self) -> int:
        return int(self.scores.shape[1])

    @property
    def device(self) -> torch.device:
        return self.scores.device

    def keys(self) -> torch.Tensor:
        return pack_keys(self.scores, self.index)

    @classmethod
    def from_keys(cls, keys: torch.Tensor) -> TopK:
        scores, index = unpack_keys(keys)
        return cls(scores.contiguous(), index.contiguous())

    def merge(self, other: TopK | tuple) -> TopK:
        """The exact top-k (this state's k) of the union of this state and `other`: another
        TopK or a (scores, index) pair of candidates (M, c) -- indices already global."""
        if isinstance(other, TopK):
            o_scores, o_index = other.scores, other.index
        else:
            o_scores, o_index = other
        o_scores = o_scores.to(self.device)
        o_index = o_index.to(self.device)
        if o_scores.shape[0] != self.m or o_scores.shape != o_index.shape:
            raise ValueError(f"other: expected ({self.m}, c) scores and index, got {tuple(o_scores.shape)} "
                             f"and {tuple(o_index.shape)}")
        keys = torch.cat([self.keys(), pack_keys(o_scores, o_index)], dim=1)
        return TopK.from_keys(keys.topk(self.k, dim=1, sorted=True).values)

    @classmethod
    def merge_all(cls, states: list[TopK]) -> TopK:
        """One exact merge of several states of equal shape (chunks, threads or ranks)."""
        if not states:
            raise ValueError("states: expected at least one TopK, got none")
        keys = torch.cat([s.keys().to(states[0].device) for s in states], dim=1)
        return cls.from_keys(keys.topk(states[0].k, dim=1, sorted=True).values)

    def shifted(self, offset: int) -> TopK:
        """The same state with every non-empty index moved by `offset` (local -> global rows)."""
        return TopK(self.scores, torch.where(self.index >= 0, self.index + offset, self.index))

    def remapped(self, rows: np.ndarray | torch.Tensor) -> TopK:
        """Positions into `rows` replaced by rows[position] (a search over a row subset)."""
        rows = torch.as_tensor(rows, device=self.device)
        safe = self.index.clamp(min=0)
        return TopK(self.scores, torch.where(self.index >= 0, rows[safe], self.index))

    def filled(self) -> bool:
        """Whether every slot holds an entry."""
        return bool((self.index >= 0).all())
