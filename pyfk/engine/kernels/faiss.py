"""Backend `faiss` (exact search over explicit Kronecker features), and the faiss plumbing
that backend `faiss_ann` (pyfk.engine.kernels.faiss_ann) shares with it.

`faiss` (exact)
    Every pool row becomes its explicit feature vector
        product:  concat_j vec(z_j (x) g_j)      (width sum_j Lz_j * Lg_j)
        sum:      concat_j [z_j, g_j]            (width sum_j Lz_j + Lg_j)
        features: concat_j z_j
    whose inner products are exactly the pyfk similarity, since
    <z (x) g, z' (x) g'> = (z.z')(g.g'). An IndexFlatIP (a faiss GPU index when
    faiss sees a GPU and the queries are CUDA tensors) returns k + EXACT_MARGIN
    candidates, which are re-scored with the fused product formula in float32 and
    merged into the running state with pyfk's tie rule (score descending, smaller
    index first) by `TopK.merge`. Rows whose (k + EXACT_MARGIN)-th faiss score lies
    within float32 rounding of their k-th (ties faiss may have cut in arbitrary order,
    e.g. integer data) are redone by the exact tie-stable torch scan of the chunk. The
    explicit width is capped at KRON_MAX_WIDTH (ValueError above it). On CPU this is
    a correctness/portability path, not a fast one: sum_j L_j^2 columns per row cost
    far more than the fused kernel's 2 sum_j L_j. No options.

Shared plumbing: faiss's lazy import and availability (`available`, `require_faiss`),
explicit features, the exact re-ranking of candidates (`pair_scores`, `rerank`), chunk
row arithmetic, faiss GPU resources and OpenMP threads, and `recall_at_k`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading

import numpy as np
import torch

from pyfk.engine.backend import Backend, register
from pyfk.engine.descriptors import normalized_block
from pyfk.engine.kernels import torch as _torch_kernel
from pyfk.engine.layout import Layout
from pyfk.engine.topk_state import TopK, pack_keys

faiss = None  # the faiss module, imported on first use: `import pyfk` stays light
IMPORT_ERROR: str | None = None  # why importing faiss failed, once tried

KRON_MAX_WIDTH = 8192  # explicit feature columns the exact backend will build per row
EXACT_MARGIN = 16  # extra candidates the exact backend re-ranks, against float32 rounding in faiss
_TIE_RTOL = 1e-5  # float32 inner-product error, relative to |q| max|p|, treated as a possible tie
_EXACT_BLOCK_BYTES = 256 << 20  # explicit-feature bytes per exact topk call
_RERANK_ELEMENTS = 1 << 24  # gathered candidate floats held at once during re-ranking


def _load():
    """Import faiss once; afterwards `faiss` is the module or IMPORT_ERROR says why not."""
    global faiss, IMPORT_ERROR
    if faiss is None and IMPORT_ERROR is None:
        try:
            import faiss as module
        except ImportError as exc:
            IMPORT_ERROR = f"the Python package 'faiss' failed to load ({exc}); pip install faiss-cpu"
        else:
            faiss = module
    return faiss


def available() -> str | None:
    """None when faiss can run here, else why not (the probe of both faiss backends)."""
    if faiss is None and IMPORT_ERROR is None and importlib.util.find_spec("faiss") is None:
        return "the Python package 'faiss' is not installed (pip install faiss-cpu, or faiss-gpu for GPUs)"
    _load()
    return IMPORT_ERROR


def require_faiss(backend: str = "faiss"):
    """The faiss module; RuntimeError naming `backend` when it cannot be imported."""
    reason = available()
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run: {reason}")
    return faiss


# ----------------------------------------------------------------------------- explicit features

def _pair_widths(widths) -> list[tuple[int, int]]:
    """(Lz_j, Lg_j) per scale."""
    return [(z.stop - z.start, g.stop - g.start) for z, g in Layout(tuple(widths), "product").pairs()]


def explicit_width(widths, product: bool) -> int:
    """Columns of the explicit feature vectors: sum_j Lz_j * Lg_j for product, else sum of widths."""
    if not product:
        return int(sum(widths))
    return int(sum(wz * wg for wz, wg in _pair_widths(widths)))


def _check_explicit_width(widths, product: bool) -> int:
    w = explicit_width(widths, product)
    if w > KRON_MAX_WIDTH:
        pairs = _pair_widths(widths) if product else list(widths)
        raise ValueError(
            f"backend 'faiss': the explicit {'Kronecker ' if product else ''}features would have {w} columns "
            f"(segment widths {pairs}{', sum of Lz*Lg' if product else ''}), above the limit "
            f"KRON_MAX_WIDTH={KRON_MAX_WIDTH}; use backend='cpu' (exact, fused) or 'faiss_ann' (approximate, "
            f"sketched), or project the scales to fewer dimensions")
    return w


def explicit_features(x: torch.Tensor, widths, product: bool) -> torch.Tensor:
    """(n, explicit_width) float32 features of normalised rows x whose inner products are the similarity."""
    if not product:
        return x.contiguous()
    blocks = []
    for z, g in Layout(tuple(widths), "product").pairs():
        wz, wg = z.stop - z.start, g.stop - g.start
        blocks.append((x[:, z].unsqueeze(2) * x[:, g].unsqueeze(1)).reshape(x.shape[0], wz * wg))
    return torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0].contiguous()


# ----------------------------------------------------------------------------- exact re-ranking

def split_segments(x: torch.Tensor, widths) -> list[torch.Tensor]:
    """The column segments of x (n, D) as contiguous (n, L) tensors (fast row gathers)."""
    return [t.contiguous() for t in torch.split(x, [int(w) for w in widths], dim=1)]


def pair_scores(q: torch.Tensor, segs: list[torch.Tensor], idx: torch.Tensor, widths, product: bool) -> torch.Tensor:
    """Exact scores (m, c) of queries q (m, D) against their own candidates, both normalised.

    segs: the pool's normalised segments, contiguous (n, L_j) each; idx: (m, c) rows of segs.
    The fused formula, batched per query: sum_j (qz_j . pz_j) * (qg_j . pg_j), or q . p.
    """
    m, c = idx.shape
    flat = idx.reshape(-1)
    dots, col = [], 0
    for w, seg in zip(widths, segs):
        block = seg.index_select(0, flat).view(m, c, w)  # contiguous gather of one segment
        dots.append(torch.bmm(block, q[:, col:col + w].unsqueeze(2)).view(m, c))
        col += w
    if not product:
        return torch.stack(dots).sum(0) if len(dots) > 1 else dots[0]
    out = None
    for zz, gg in zip(dots[0::2], dots[1::2]):
        zz.mul_(gg)
        out = zz if out is None else out.add_(zz)
    return out


def best_candidates(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top min(k, c) of (m, c) candidate (scores, index) pairs (index -1 = none) in the
    order of pyfk.engine.topk_state: (m, min(k, c)) scores float32 and index int64."""
    kk = min(k, scores.shape[1])
    top = TopK.from_keys(pack_keys(scores.contiguous(), index.contiguous()).topk(kk, dim=1, sorted=True).values)
    return top.scores, top.index


def chunk_len(parts, sel) -> int:
    """Rows of the chunk `sel` (a slice or a row array) of the pool arrays `parts`."""
    if isinstance(sel, slice):
        return len(range(*sel.indices(parts[0].shape[0])))
    return len(sel)


def array_rows(parts, sel, local: np.ndarray) -> np.ndarray:
    """Rows of the pool arrays for chunk-local positions `local` (sorted, unique)."""
    if isinstance(sel, slice):
        start, _, step = sel.indices(parts[0].shape[0])
        return start + step * local
    return np.asarray(sel, dtype=np.int64)[local]


def sub_rows(parts, sel, a: int, b: int):
    """Chunk-local positions [a, b) as a slice of the pool arrays when possible, else a row array."""
    if isinstance(sel, slice):
        start, _, step = sel.indices(parts[0].shape[0])
        return slice(start + a * step, start + b * step, step)
    return np.asarray(sel[a:b], dtype=np.int64)


def rerank(q: torch.Tensor, parts, sel, normalize: str, widths, product: bool, k: int,
           cand: np.ndarray, normalized=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k among each query's candidates (chunk-local positions, -1 = none).

    Candidate rows come from `normalized` (the chunk's normalised rows (n, D), or their
    segments as contiguous (n, L_j) tensors) when given,
    else the distinct candidates are gathered and normalised once (`normalized_block`);
    they are scored with the fused formula in float32 and ordered by (score desc,
    position asc). Returns float32 scores and int64 chunk-local positions (M, k) on
    q's device; slots without a candidate hold (-inf, -1).
    """
    m, c = cand.shape
    valid = cand >= 0
    valid_t = torch.from_numpy(valid).to(q.device)
    if normalized is not None:
        segs = normalized if isinstance(normalized, list) else split_segments(normalized, widths)
        pos_t = inv_t = torch.from_numpy(np.maximum(cand, 0)).to(q.device)
    else:
        uniq, inverse = np.unique(np.where(valid, cand, cand.max(initial=0)), return_inverse=True)
        inverse = inverse.reshape(m, c)
        rows = normalized_block(parts, array_rows(parts, sel, uniq), normalize, device=q.device)
        segs = split_segments(rows, widths)
        del rows
        inv_t = torch.from_numpy(inverse).to(q.device)
        pos_t = torch.from_numpy(uniq).to(q.device)[inv_t]
    kk = min(k, c)
    out_s = torch.empty((m, kk), dtype=torch.float32, device=q.device)
    out_i = torch.empty((m, kk), dtype=torch.int64, device=q.device)
    step = max(1, _RERANK_ELEMENTS // max(1, c * max(widths)))
    for a in range(0, m, step):
        b = min(m, a + step)
        s = pair_scores(q[a:b], segs, inv_t[a:b], widths, product)
        s = torch.where(valid_t[a:b], s, torch.full_like(s, float("-inf")))
        ix = torch.where(valid_t[a:b], pos_t[a:b], torch.full_like(pos_t[a:b], -1))
        out_s[a:b], out_i[a:b] = best_candidates(s, ix, kk)
    return out_s, out_i


def dedupe(cand: np.ndarray) -> np.ndarray:
    """Replace repeated candidates within a row by -1 (IVF/HNSW may return a row twice only in odd cases)."""
    s = np.sort(cand, axis=1)
    if not (s[:, 1:] == s[:, :-1])[s[:, 1:] >= 0].any():
        return cand
    out = cand.copy()
    for r in range(cand.shape[0]):
        _, first = np.unique(cand[r], return_index=True)
        keep = np.zeros(cand.shape[1], dtype=bool)
        keep[first] = True
        out[r, ~keep] = -1
    return out


# ----------------------------------------------------------------------------- faiss plumbing

_GPU_LOCK = threading.Lock()
_GPU_RESOURCES = None


def use_gpu(device: torch.device) -> bool:
    """Whether a faiss index for tensors on `device` goes on a faiss GPU."""
    return (faiss is not None and device.type == "cuda" and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0)


def _gpu_resources():
    global _GPU_RESOURCES
    with _GPU_LOCK:
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        return _GPU_RESOURCES


def to_gpu(index, device: torch.device):
    """A faiss GPU copy of a CPU `index` on CUDA `device` (one shared StandardGpuResources)."""
    ordinal = device.index if device.index is not None else torch.cuda.current_device()
    return faiss.index_cpu_to_gpu(_gpu_resources(), ordinal, index)


@contextlib.contextmanager
def omp_threads(n: int | None):
    """faiss's OpenMP thread count set to n for a block (None: unchanged)."""
    if n is None:
        yield
        return
    saved = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(saved)


def np32(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous float32 NumPy copy (or view) of a tensor, for faiss."""
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def recall_at_k(approx_index, exact_index) -> float:
    """Mean over queries of |approx row & exact row| / k (k = exact row length); -1 entries never count."""
    a = np.asarray(approx_index.cpu() if isinstance(approx_index, torch.Tensor) else approx_index)
    e = np.asarray(exact_index.cpu() if isinstance(exact_index, torch.Tensor) else exact_index)
    if a.ndim == 1:
        a, e = a[None], e[None]
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"recall_at_k: expected the same number of rows, got {a.shape[0]} and {e.shape[0]}")
    if e.shape[1] == 0:
        return 1.0
    hits = 0
    for ra, re_ in zip(a, e):
        hits += len(np.intersect1d(ra[ra >= 0], re_[re_ >= 0]))
    return hits / float(e.size)


# ----------------------------------------------------------------------------- the exact backend

def exact_chunk_rows(m: int, width: int) -> int:
    """Pool rows per exact call: ~256 MiB of explicit features (bounded by the widest possible case)."""
    feat = min(KRON_MAX_WIDTH, max(width, (width // 2) ** 2))
    return max(1024, _EXACT_BLOCK_BYTES // (4 * max(feat, 1)))


class FaissBackend(Backend):
    """Exact top-k through an IndexFlatIP over the explicit features of each pool chunk (see
    the module docstring). No options."""

    name = "faiss"
    devices = ("cpu", "cuda")
    description = (f"exact: IndexFlatIP over explicit Kronecker features (up to {KRON_MAX_WIDTH} columns), "
                   "exact re-ranking")

    def unavailable_reason(self):
        return available()

    def chunk_rows(self, m, width, options):
        return exact_chunk_rows(m, width)

    def topk(self, queries, pool, rows, k, state, offset, options):
        require_faiss(self.name)
        q = queries
        widths, product = pool.layout.widths, pool.layout.product
        _check_explicit_width(widths, product)
        n = chunk_len(pool.parts, rows)
        if n == 0:
            return state
        p = pool.block(rows)
        feats = explicit_features(p, widths, product)
        qf = explicit_features(q, widths, product)
        flat = faiss.IndexFlatIP(feats.shape[1])
        if use_gpu(q.device):
            flat = to_gpu(flat, q.device)
        flat.add(np32(feats))
        p_norm_max = float(feats.norm(dim=1).max())
        del feats
        kk = min(n, k + EXACT_MARGIN)
        qf_np = np32(qf)
        dist, cand = flat.search(qf_np, kk)
        del flat
        cand = dedupe(cand)
        # Rows whose last candidate scores within float32 rounding of their k-th may have had
        # (near-)ties with the k-th cut off by faiss in arbitrary order: those rows are redone
        # by the exact tie-stable scan of the chunk (rare on real-valued data; common on integers).
        redo = np.zeros(q.shape[0], dtype=bool)
        if kk < n:
            bound = np.linalg.norm(qf_np, axis=1) * p_norm_max  # Cauchy-Schwarz bound on |score|
            redo = dist[:, kk - 1] >= dist[:, k - 1] - _TIE_RTOL * bound - 1e-30
        # exact re-rank of the candidates, straight from the normalised chunk we hold
        valid = torch.from_numpy(cand >= 0).to(q.device)
        pos = torch.from_numpy(np.maximum(cand, 0)).to(q.device)
        s = pair_scores(q, split_segments(p, widths), pos, widths, product)
        s = torch.where(valid, s, torch.full_like(s, float("-inf")))
        ix = torch.where(valid, pos, torch.full_like(pos, -1))
        top_s, top_i = best_candidates(s, ix, k)
        if redo.any():
            redo_rows = torch.from_numpy(np.flatnonzero(redo)).to(q.device)
            empty = TopK.empty(len(redo_rows), k, q.device)
            rs, ri = _torch_kernel.topk_update(q[redo_rows], p, widths, product, k, 0, empty.scores, empty.index)
            top_s, top_i = top_s.clone(), top_i.clone()
            top_s[redo_rows], top_i[redo_rows] = rs, ri
        return state.merge(TopK(top_s, top_i).shifted(offset))


register(FaissBackend())
