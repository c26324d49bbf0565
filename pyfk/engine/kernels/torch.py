"""Pure-torch reference kernels: the oracle every other backend is tested against.

Inputs are normalised float32 matrices whose columns are segments of the given
widths (see `pyfk.descriptors.segments`):
    product: R = sum_j (Qz_j Pz_j^T) * (Qg_j Pg_j^T)      dot: R = Q P^T
Top-k keeps, per query row, the k largest scores, ties to the smaller pool index,
exactly: scores and indices are packed into one int64 key (order-preserving
float bits in the high word, inverted index in the low word) before torch.topk.
Memory: the (M, tile) score block of one pool tile plus the (M, k) state.
"""

from __future__ import annotations

import torch

_TILE_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}  # M x tile scores held at once
_LOW = 1 << 32


def similarity(q: torch.Tensor, p: torch.Tensor, widths: list[int], product: bool) -> torch.Tensor:
    """Dense (M, N) scores of normalised queries q (M, D) against pool p (N, D)."""
    if not product:
        return q @ p.T
    out = None
    col = 0
    for wz, wg in zip(widths[0::2], widths[1::2]):
        zz = q[:, col:col + wz] @ p[:, col:col + wz].T
        col += wz
        zz.mul_(q[:, col:col + wg] @ p[:, col:col + wg].T)
        col += wg
        out = zz if out is None else out.add_(zz)
    return out


def pack_keys(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is (score descending, index ascending) reversed into ascending max.

    index must lie in [-1, 2**32 - 2]; -1 marks an empty slot.
    """
    bits = (scores + 0.0).contiguous().view(torch.int32).to(torch.int64)  # +0.0 folds -0 into +0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order == signed int order
    return bits * _LOW + (_LOW - 2 - index)


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = torch.div(keys, _LOW, rounding_mode="floor")
    index = _LOW - 2 - (keys - bits * _LOW)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int32)
    return bits.view(torch.float32), index


def merge_topk(scores_a, index_a, scores_b, index_b, k: int):
    """Exact, tie-stable top-k of the union of two (M, *) candidate sets."""
    keys = torch.cat([pack_keys(scores_a, index_a), pack_keys(scores_b, index_b)], dim=1)
    top = keys.topk(min(k, keys.shape[1]), dim=1, sorted=True).values
    return unpack_keys(top)


def _block_topk(block: torch.Tensor, first: int, kk: int):
    """Exact top-kk of one (M, T) score block as packed keys, ties to the smaller index.

    Fast path: float topk, then only rows where more than kk scores reach the kk-th
    value (a tie straddling the cut) are redone on int64 keys.
    """
    ids = torch.arange(first, first + block.shape[1], device=block.device)
    vals, pos = block.topk(kk, dim=1, sorted=False)
    keys = pack_keys(vals, pos + first)
    straddle = (block >= vals.min(dim=1, keepdim=True).values).sum(dim=1) > kk
    if bool(straddle.any()):
        rows = straddle.nonzero().squeeze(1)
        exact = pack_keys(block[rows], ids.expand(len(rows), -1)).topk(kk, dim=1).values
        keys[rows] = exact
    return keys


def topk_update(q, p, widths, product, k, index_offset, scores, index):
    """Merge the top-k of q x p (pool rows numbered from index_offset) into the
    sorted (M, k) state (scores float32, index int64; -1 = empty). Returns the new state."""
    m, n = q.shape[0], p.shape[0]
    tile = max(k, _TILE_ELEMENTS.get(q.device.type, 1 << 24) // max(m, 1))
    state = pack_keys(scores, index)
    for start in range(0, n, tile):
        stop = min(n, start + tile)
        block = similarity(q, p[start:stop], widths, product)
        cand = _block_topk(block, index_offset + start, min(k, stop - start))
        state = torch.cat([state, cand], dim=1).topk(k, dim=1, sorted=True).values
    scores, index = unpack_keys(state)
    return scores.contiguous(), index.contiguous()
