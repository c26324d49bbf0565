"""Backend `torch`: the pure-torch reference, and the oracle every other backend is tested against.

Inputs are normalised float32 matrices whose columns follow a `Layout`:
    product: R = sum_j (Qz_j Pz_j^T) * (Qg_j Pg_j^T)      sum / features: R = Q P^T
Top-k keeps, per query row, the k largest scores, ties to the smaller pool index,
exactly: scores and indices are packed into one int64 key (pyfk.engine.topk_state)
before torch.topk. Memory: the (M, tile) score block of one pool tile plus the
(M, k) state; the pool is normalised one ~256 MiB chunk at a time.
Runs on any device torch runs on (CPU, CUDA).
"""

from __future__ import annotations

import torch

from pyfk.engine.backend import Backend, register
from pyfk.engine.layout import Layout
from pyfk.engine.topk_state import TopK, pack_keys, unpack_keys

_TILE_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}  # M x tile scores held at once

__all__ = ["similarity", "topk_update", "pack_keys", "unpack_keys", "TorchBackend"]


def similarity(q: torch.Tensor, p: torch.Tensor, widths, product: bool) -> torch.Tensor:
    """Dense (M, N) scores of normalised queries q (M, D) against pool p (N, D)."""
    if not product:
        return q @ p.T
    return Layout(tuple(widths), "product").similarity(q, p)


def _block_topk(block: torch.Tensor, first: int, kk: int):
    """Exact top-kk of one (M, T) score block as packed keys, ties to the smaller index.

    Fast path: float topk, then only rows where more than kk scores reach the kk-th
    value (a tie straddling the cut) are redone on int64 keys.
    """
    vals, pos = block.topk(kk, dim=1, sorted=False)
    keys = pack_keys(vals, pos + first)
    straddle = (block >= vals.min(dim=1, keepdim=True).values).sum(dim=1) > kk
    if bool(straddle.any()):
        rows = straddle.nonzero().squeeze(1)
        ids = torch.arange(first, first + block.shape[1], device=block.device)
        keys[rows] = pack_keys(block[rows], ids.expand(len(rows), -1)).topk(kk, dim=1).values
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


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda")
    description = "reference: chunked torch GEMMs + exact running top-k merge"
    auto_priority = {"cpu": 10, "cuda": 10}

    def unavailable_reason(self):
        return None

    def topk(self, queries, pool, rows, k, state, offset, options):
        p = pool.block(rows)
        s, i = topk_update(queries, p, pool.layout.widths, pool.layout.product, k, offset,
                           state.scores, state.index)
        return TopK(s, i)


register(TorchBackend())
