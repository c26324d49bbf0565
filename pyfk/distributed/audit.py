"""The label audit (`pyfk.audit`) over a labeled set sharded across torch.distributed ranks.

    report = pyfk.distributed.audit(my_descriptors, my_labels, probs=my_oos_probs, k=32)
    report.indices[:20]      # the 20 most suspect labeled rows (global row numbers)

Rank r holds rows offsets[r] .. offsets[r+1]-1 of the labeled set (contiguous shards in rank order,
offsets the exclusive prefix sum of the shard sizes; a shard may be empty): their descriptors,
labels y and, optionally, the model's class probabilities p. Every rank calls `audit` with its own
shard, and every rank gets the report `pyfk.audit` computes in one process on the shards
concatenated in rank order. The rules are those of pyfk.al.audit, with N rows and C classes:

    neighbours  N(i) = the k' = min(k, N - 1) rows m != i of largest R(i, m) (the PFK similarity,
                `combine`/`normalize` as in pyfk.topk), ties to the smaller row; found as the top
                k' + 1 over all N rows, then row i is dropped (the last entry where exact ties push
                row i itself out of that list);
    vote        v_i[c] = sum_{m in N(i), y_m = c} w_im / sum_{m in N(i)} w_im,  w_im = max(R(i, m), 0)
                (v_i = 1/C everywhere when every weight is 0);
    mixture     q_i = alpha v_i + (1 - alpha) p_i   (q_i = v_i without probs);
    thresholds  t_c = mean of q_i[c] over the rows labeled c (+inf for a class no row has); the
                confident class of row i is the argmax of q_i over the classes c with
                q_i[c] >= t_c - 1e-6 (-1 if none); n_issues = round(sum_c n_c (1 - J_cc / J_c.)),
                J the confident joint (given label x confident class; J_cc / J_c. = 1 for a class
                without confident rows) and n_c the rows labeled c -- provenance only;
    flag        row i when max_{c != y_i} q_i[c] > q_i[y_i]; suggested_i = the argmax of q_i over
                c != y_i for a flagged row, over every c for the others;
    ranking     by self-confidence q_i[y_i] ascending, ties to the smaller global row;
                score_i = 1 - q_i[y_i].

How the work is split. The search is the expensive part, O(N^2 D): the labeled rows are both the
queries and the pool, so the shards take turns as queries. For each owner rank in order and each
block of at most `query_block` of its rows, the owner broadcasts the block's descriptors (raw bytes,
so every rank searches bit-identical queries; a block of fewer than min(N, MIN_QUERIES) rows is
padded with repeats of its rows, see MIN_QUERIES), and every rank runs the sharded exact top-k
(`pyfk.distributed.topk`, k' + 1) of that block against its own shard; the one exact, tie-stable
merge leaves the same (block, k' + 1) lists on every rank. The labels (N int64) and probs
(N x C float64) are all-gathered; the rest -- vote, thresholds, confident joint, ranking -- is the
single-process code run on the same global arrays, in the same global order, on every rank: no
float is ever summed in a rank-dependent order. With the `cpu` backend -- whose score of a
(query, row) pair depends neither on the thread count nor on which pool rows share the call, and
on the other queries only through the kernel path, which the padding fixes -- every field of the
report equals one process's bit for bit (tested). With `torch`/`cuda` (library GEMMs that round by
shape) the lists are exact top-k to rounding and the same on every rank, but near ties may resolve
differently from one process (see pyfk.distributed.search).

Shapes and cost per rank: local_descriptors n_r rows (Descriptors, DescriptorStore or Extraction),
local_labels (n_r,) ints, probs None or (n_r, C) rows summing to 1 (pass a (0, C) array on an empty
shard). The report is replicated: every rank holds O(N (k' + C)) for it (neighbours and scores
N x k', q N x C) plus the gathered labels and probs; the search holds at most world x query_block
x (k' + 1) candidate keys at a time, besides the engine's own buffers. Communication: per block one
(block x D) broadcast, one (world x block x (k' + 1)) all-gather of int64 keys and a few scalar
collectives of the sharded top-k's checks; once, N labels and N x C probabilities. Every block is
one pass over each shard (a memory-mapped shard is read once per block): a larger query_block
means fewer passes.

Errors: every rank checks its own arguments, then every rank raises the first failing rank's
ValueError/TypeError ("rank r of W: local_labels: ..."), never leaving a rank waiting; k, alpha,
classes, whether probs are given (and their width), combine, normalize, backend, query_block and
the descriptors' widths and dtypes must be the same on every rank (a mismatch is the same
ValueError on every rank). Without an initialised process group, or with one rank, this is
`pyfk.audit` itself.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from pyfk.al.audit import Audit, _drop_self, _report, check_alpha, check_prob_rows
from pyfk.al.audit import audit as single_audit
from pyfk.distributed import comm
from pyfk.distributed import search as dsearch
from pyfk.engine.descriptors import COMBINES, NORMALIZES, Descriptors, as_descriptors
from pyfk.engine.registry import resolve
from pyfk.engine.search import check_pair, check_representable
from pyfk.errors import check_choice, check_int, check_labels, check_not_masked

__all__ = ["audit"]

DESC, LABELS, PROBS = "local_descriptors", "local_labels", "probs"  # how errors name the arguments
QUERY_BLOCK_KEYS = 1 << 24  # default query_block: world x block x (k' + 1) gathered keys (int64) stay under this
# The cpu kernel scores a call of at most MR / 2 queries (MR = 6 or 8 rows per micro-tile) on another
# path (one GEMV per pool row) than a larger call (packed micro-tiles), rounding differently. One
# process searches all N labeled rows in one call, so a smaller block is padded with repeats of its
# own rows to min(N, MIN_QUERIES) queries (their answers dropped) to take the same path.
MIN_QUERIES = 32


def audit(local_descriptors, local_labels, *, probs=None, k: int = 32, alpha: float = 0.5,
          classes: int | None = None, combine: str = "features", normalize: str = "pcc", backend: str = "auto",
          group=None, query_block: int | None = None, progress=None, options=None) -> Audit:
    """`pyfk.audit` over a labeled set sharded across the ranks of `group` (collective; see the
    module docstring for the formula and the cost).

    local_descriptors: this rank's contiguous shard of the labeled rows (may be empty).
    local_labels: (n_r,) their given labels. probs: None or (n_r, C) their class probabilities
    (given on every rank or on none). k, alpha, classes, combine, normalize, backend, progress,
    options: as in `pyfk.audit`, the same on every rank (progress: rank 0's bars only).
    group: a torch.distributed group (None: the default group). query_block: at most this many
    rows are searched as queries at once (None: as many as keep world x block x (k' + 1)
    candidate keys under QUERY_BLOCK_KEYS), the same on every rank.
    Returns, on every rank, the Audit `pyfk.audit` returns for the concatenated shards: global
    row indices, in rank order (most suspect first). Raises ValueError/TypeError naming the
    argument, the same on every rank.
    """
    rank, world = comm.rank_and_world(group)
    if world == 1:
        if query_block is not None:
            check_int(query_block, "query_block", 1, 2**63 - 1)
        return single_audit(local_descriptors, local_labels, probs=probs, k=k, alpha=alpha, classes=classes,
                            combine=combine, normalize=normalize, backend=backend, progress=progress,
                            options=options)

    # 1. this rank's arguments; every rank raises the first failing rank's error
    parsed, error = dsearch._attempt(lambda: _parse(local_descriptors, local_labels, probs, k, alpha, classes,
                                                    combine, normalize, backend, query_block))
    dsearch._agree(error, group)
    desc, y, p, k, alpha, classes, query_block = parsed

    # 2. the shards, and the same call on every rank
    offsets = comm.shard_offsets(desc.n, group)
    n = int(offsets[-1])
    layout = _layout(desc, combine)
    dsearch._check_same([("k", k), ("alpha", alpha), ("classes", classes),
                         (PROBS, None if p is None else f"{p.shape[1]} columns"), ("combine", combine),
                         ("normalize", normalize), ("backend", backend), ("query_block", query_block),
                         (DESC, layout)], group)
    if n < 2:
        raise ValueError(f"{DESC}: expected at least 2 labeled rows over all ranks (each is judged by the others), "
                         f"got {n}")
    offset = int(offsets[rank])
    dsearch._agree(_global_row(dsearch._attempt(lambda: desc.check_finite(DESC))[1], offset), group)
    if normalize == "none":  # R over every pair of labeled rows: the global norms on both sides, as in one process
        norms = dsearch._global_norms(desc, combine, group)
        check_representable(norms, norms, combine, normalize, qname=DESC, pname=DESC)

    # 3. labels (and probabilities) of every row, in rank order
    y_all = _gather_rows(y, offsets, group)
    if classes is None:
        classes = p.shape[1] if p is not None else max(2, int(y_all.max()) + 1)
    p_all = None if p is None else _gather_rows(p, offsets, group)
    if p is None:
        alpha = 1.0

    # 4. neighbours: each shard's rows in turn as queries against every shard
    k_eff = min(k, n - 1)
    block = query_block or max(1, QUERY_BLOCK_KEYS // (world * (k_eff + 1)))
    nb = np.empty((n, k_eff), dtype=np.int64)
    nb_scores = np.empty((n, k_eff), dtype=np.float32)
    for owner in range(world):
        for lo in range(int(offsets[owner]), int(offsets[owner + 1]), block):
            hi = min(lo + block, int(offsets[owner + 1]))
            local = (lo - int(offsets[owner]), hi - int(offsets[owner])) if rank == owner else None
            queries = _broadcast_rows(desc, local, hi - lo, owner, combine, group)
            if hi - lo < min(n, MIN_QUERIES):  # the search path one process takes (see MIN_QUERIES)
                queries = queries.take(np.resize(np.arange(hi - lo), min(n, MIN_QUERIES)))
            scores, index = dsearch.topk(queries, desc, k_eff + 1, combine, normalize, backend, group=group,
                                         options=options, progress=progress)
            # _drop_self finds row i at position i: shift the block to start at 0, then back
            rows, row_scores = _drop_self(_numpy(index)[:hi - lo] - lo, _numpy(scores)[:hi - lo])
            nb[lo:hi] = rows + lo
            nb_scores[lo:hi] = row_scores

    # 5. the report, from the same global arrays on every rank
    prov = {"k": k_eff, "alpha": alpha, "combine": combine, "normalize": normalize, "backend": backend}
    return _report(y_all, nb, nb_scores, classes, p_all, alpha, prov)


# ----------------------------------------------------------------------------- checks

def _parse(local_descriptors, local_labels, probs, k, alpha, classes, combine, normalize, backend, query_block):
    """This rank's arguments checked as pyfk.audit checks them (in its order), with n this shard's
    rows: (descriptors, labels int64, probs float64 or None, k, alpha, classes or None, query_block)."""
    desc = as_descriptors(local_descriptors, DESC)
    n = desc.n
    k = check_int(k, "k", 1, 2**31 - 1)
    alpha = check_alpha(alpha)
    check_choice(combine, "combine", COMBINES)
    check_choice(normalize, "normalize", NORMALIZES)
    if query_block is not None:
        query_block = check_int(query_block, "query_block", 1, 2**63 - 1)
    p = None
    if probs is not None:
        check_not_masked(probs, PROBS)
        if isinstance(probs, torch.Tensor):
            probs = probs.detach().cpu()
        try:
            p = np.asarray(probs, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{PROBS}: expected an array of class probabilities, got {type(probs).__name__}") from None
        check_prob_rows(p, n, PROBS, " (this rank's rows)")
    if classes is not None:
        classes = check_int(classes, "classes", 2, 2**31 - 1)
        if p is not None and p.shape[1] != classes:
            raise ValueError(f"{PROBS}: expected {classes} columns (classes), got {p.shape[1]}")
    y = check_labels(local_labels, LABELS, n, DESC).astype(np.int64)
    bound = classes if classes is not None else p.shape[1] if p is not None else None  # else max(labels) + 1
    if n and (y.min() < 0 or (bound is not None and y.max() >= bound)):
        raise ValueError(f"{LABELS}: expected classes in [0, {bound if bound is not None else 'C'}), "
                         f"got range [{y.min()}, {y.max()}]")
    if n:
        check_pair(desc, desc, combine, qname=DESC, pname=DESC)  # has what `combine` needs
    resolve(backend, desc.device)
    return desc, y, p, k, alpha, classes, query_block


def _dtype_name(a) -> str:
    return str(a.dtype).removeprefix("torch.") if isinstance(a, torch.Tensor) else np.dtype(a.dtype).name


def _arrays(desc: Descriptors, combine: str) -> list:
    """The arrays a search under `combine` reads: z, then g unless combine="features"."""
    return desc.z + (desc.g if combine != "features" else [])


def _layout(desc: Descriptors, combine: str) -> str:
    """What must match across ranks for the shards to be one labeled set (and for the query
    blocks to be rebuilt from raw bytes)."""
    text = f"widths {desc.widths}"
    if combine != "features":
        text += f", gradient widths {desc.g_widths}"
    return f"{text}, dtypes {[_dtype_name(a) for a in _arrays(desc, combine)]}"


_NON_FINITE = re.compile(rf"^{DESC}: ([zg]\[\d+\]) contains NaN or Inf values \(first at row (\d+)\)$")


def _global_row(error: BaseException | None, offset: int) -> BaseException | None:
    """A NaN/Inf error naming a local row, restated with the global row too."""
    m = _NON_FINITE.match(str(error)) if isinstance(error, ValueError) else None
    if m is None:
        return error
    row = int(m[2])
    return ValueError(f"{DESC}: {m[1]} contains NaN or Inf values (first at global row {offset + row}, "
                      f"local row {row})")


# ----------------------------------------------------------------------------- communication

def _gather_rows(local: np.ndarray, offsets: np.ndarray, group) -> np.ndarray:
    """Every rank's rows of `local` ((n_r, ...), same trailing shape and dtype everywhere),
    concatenated in rank order on every rank; values travel unchanged (padded to the largest shard)."""
    sizes = np.diff(offsets)
    padded = np.zeros((int(sizes.max()),) + local.shape[1:], dtype=local.dtype)
    padded[:len(local)] = local
    parts = comm.all_gather_tensor(torch.from_numpy(padded), group)
    return np.concatenate([part.numpy()[:int(s)] for part, s in zip(parts, sizes)])


def _broadcast_rows(desc: Descriptors, local: tuple[int, int] | None, rows: int, owner: int, combine: str,
                    group) -> Descriptors:
    """Local rows local[0]:local[1] of the owner's shard (`local` given on the owner only) as
    Descriptors on every rank -- this rank's kind and device, the owner's bytes exactly. The
    arrays' widths and dtypes are the same on every rank (checked), so only raw bytes travel."""
    arrays = _arrays(desc, combine)
    shapes = [(rows, int(a.shape[1])) for a in arrays]
    dtypes = [_dtype_name(a) for a in arrays]
    sizes = [r * w * torch.empty(0, dtype=getattr(torch, d)).element_size() for (r, w), d in zip(shapes, dtypes)]
    buf = None
    if local is not None:
        lo, hi = local
        if desc.kind == "torch":
            buf = torch.cat([a[lo:hi].contiguous().view(torch.uint8).reshape(-1).cpu() for a in arrays])
        else:
            buf = torch.from_numpy(np.concatenate([np.ascontiguousarray(a[lo:hi]).view(np.uint8).reshape(-1)
                                                   for a in arrays]))
    buf = comm.broadcast_rows(buf, owner, (sum(sizes),), torch.uint8, group)
    out, start = [], 0
    for shape, dtype, size in zip(shapes, dtypes, sizes):
        raw = buf[start:start + size].clone()  # its own storage: aligned for the view below
        start += size
        if desc.kind == "torch":
            out.append(raw.view(getattr(torch, dtype)).reshape(shape).to(desc.device))
        else:
            out.append(raw.numpy().view(np.dtype(dtype)).reshape(shape))
    s = desc.num_scales
    return Descriptors(out[:s], out[s:] if combine != "features" else None, same_widths=False)


def _numpy(a) -> np.ndarray:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
