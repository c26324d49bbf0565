"""faiss backends: exact search over explicit Kronecker features, and approximate
(TensorSketch + IVF/HNSW) candidate generation followed by exact re-ranking.

`faiss` (exact)
    Every pool row becomes its explicit feature vector
        product:  concat_j vec(z_j (x) g_j)      (width sum_j Lz_j * Lg_j)
        sum:      concat_j [z_j, g_j]            (width sum_j Lz_j + Lg_j)
        features: concat_j z_j
    whose inner products are exactly the pyfk similarity, since
    <z (x) g, z' (x) g'> = (z.z')(g.g'). An IndexFlatIP (a faiss GPU index when
    faiss sees a GPU and the queries are CUDA tensors) returns k + EXACT_MARGIN
    candidates, which are re-scored with the fused product formula in float32 and
    merged with pyfk's tie rule (score descending, smaller index first) through
    `reference.merge_topk`. Rows whose (k + EXACT_MARGIN)-th faiss score lies within
    float32 rounding of their k-th (ties faiss may have cut in arbitrary order, e.g.
    integer data) are redone by the exact tie-stable torch scan of the chunk. The
    explicit width is capped at KRON_MAX_WIDTH (ValueError above it). On CPU this is
    a correctness/portability path, not a fast one: sum_j L_j^2 columns per row cost
    far more than the fused kernel's 2 sum_j L_j.

`faiss_ann` (approximate candidates, exact scores)
    Each pool row is mapped to a TensorSketch of its Kronecker features:
        TS(z (x) g) = irfft(rfft(CS_1(z)) * rfft(CS_2(g)), W)
    where CS_i are count sketches (seeded bucket hashes and signs) to width W;
    TS is itself a count sketch of z (x) g with bucket hash h1(a) + h2(b) mod W and
    sign s1(a) s2(b), so <TS(x), TS(y)> is an unbiased estimate of <x, y>.
    Scales are ADDED (not concatenated): with independent hashes per scale the sum
    is a count sketch of the concatenated Kronecker vector, one unbiased estimate of
    the whole sum_j with width W. Its variance, about
    (sum_j |x_j|^2)(sum_j |y_j|^2) / W, equals that of the best split of W
    between concatenated per-scale sketches (widths proportional to |x_j||y_j|),
    without having to choose a split, and the index stays W wide.
    When the explicit features are no wider than W they are indexed as they are
    (no sketch); "sum"/"features" wider than W use a plain count sketch.
    The sketches go into an IndexIVFFlat (inner product, nlist ~ 4 sqrt(N),
    `nprobe`) or an IndexHNSWFlat (inner product, `ef_search`); the top
    `candidates` (default max(4k, 128)) per query are then re-scored EXACTLY with
    the fused formula on their normalised rows and the top k kept. So every
    returned score is exact; only which items are found is approximate (recall@k).
    Queries whose probed lists hold fewer than k candidates fall back to the exact
    `cpu` (or `torch`) search, so k valid results always come back.

Cost model (why the index is not free): the fused exact kernel spends 4 sum_j L_j
flops per (query, pool row) pair -- 192 for scales 16 + 32 -- so a W = 256 sketch
index (512 flops per scanned row, plus nlist centroids per query) wins only when
it scans well under N / 10 rows per query, and building it (k-means over N x W)
costs ~50-150x one exact top-k. It pays off for many query batches against one
pool (AnnParams.cache, or an `AnnIndex` kept by the caller), on clustered data.

Parameters live in `AnnParams`; `ANN_PARAMS` is the module default that
`faiss_ann` uses (replace it, or use `ann_params(...)` as a context manager).
The IVF build is deterministic for a seed (faiss k-means is seeded); an HNSW
graph built with several OpenMP threads is not bit-reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import threading

import numpy as np
import torch

from pyfk.engine.descriptors import normalized_block
from pyfk.engine.kernels import torch as _reference

faiss = None  # the faiss module, imported on first use: `import pyfk` stays light
IMPORT_ERROR: str | None = None  # why importing faiss failed, once tried

KRON_MAX_WIDTH = 8192  # explicit feature columns the exact backend will build per row
EXACT_MARGIN = 16  # extra candidates the exact backend re-ranks, against float32 rounding in faiss
_TIE_RTOL = 1e-5  # float32 inner-product error, relative to |q| max|p|, treated as a possible tie
_EXACT_BLOCK_BYTES = 256 << 20  # explicit-feature bytes per exact topk_update call
_ANN_CHUNK_ROWS = 1 << 22  # the approximate index is built over one chunk: normally the whole pool
_KEEP_ROWS_BYTES = 1 << 30  # AnnParams.keep_rows: the most normalised-row bytes an index keeps
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
    """None when faiss can run here, else why not (the registry's probe for both backends)."""
    if faiss is None and IMPORT_ERROR is None and importlib.util.find_spec("faiss") is None:
        return "the Python package 'faiss' is not installed (pip install faiss-cpu, or faiss-gpu for GPUs)"
    _load()
    return IMPORT_ERROR


def _require_faiss() -> None:
    reason = available()
    if reason is not None:
        raise RuntimeError(f"backend 'faiss'/'faiss_ann' cannot run: {reason}")


# ----------------------------------------------------------------------------- parameters

@dataclasses.dataclass(frozen=True)
class AnnParams:
    """Knobs of the approximate backend.

    width:      TensorSketch width W (columns of the indexed vectors).
    index:      "ivf" (IndexIVFFlat, inner product) or "hnsw" (IndexHNSWFlat, inner product).
    nlist:      IVF lists; None = round(4 sqrt(N)), at most N // 39 (faiss wants ~39 training rows per list).
    nprobe:     IVF lists visited per query.
    hnsw_m:     HNSW graph degree; ef_construction / ef_search: HNSW beam widths.
    candidates: re-ranked candidates per query; None = max(4k, 128).
    seed:       hashes, signs and k-means seed.
    cache:      keep the last built index and reuse it while the same pool arrays, rows,
                normalisation and parameters come back (e.g. repeated `select` calls).
                Off by default: it holds N x W floats, and an in-place change of the pool
                arrays is not noticed (scores stay exact; recall may drop).
    keep_rows:  keep the chunk's normalised rows (N x D float32, up to 1 GiB) for re-ranking;
                otherwise the candidates' rows are gathered and normalised at every search.
    search_threads: OpenMP threads faiss uses for the index search (None = faiss's default).
                faiss-cpu wheels bundle their own libgomp beside torch's; after a multi-threaded
                faiss call its idle workers spin and starve the torch re-ranking that follows
                (measured 10x slower on 2 cores). 1 avoids that; raise it (and set
                OMP_WAIT_POLICY=PASSIVE before starting Python) on machines with many cores.
    """

    width: int = 256
    index: str = "ivf"
    nlist: int | None = None
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    candidates: int | None = None
    seed: int = 0
    cache: bool = False
    keep_rows: bool = True
    search_threads: int | None = 1

    def __post_init__(self):
        if self.index not in ("ivf", "hnsw"):
            raise ValueError(f"AnnParams.index: expected 'ivf' or 'hnsw', got {self.index!r}")
        for name in ("width", "nprobe", "hnsw_m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"AnnParams.{name}: expected a positive integer, got {value!r}")
        for name in ("nlist", "candidates", "search_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"AnnParams.{name}: expected None or a positive integer, got {value!r}")

    def n_candidates(self, k: int, n: int) -> int:
        want = self.candidates if self.candidates is not None else max(4 * k, 128)
        return int(min(n, max(k, want)))

    def n_lists(self, n: int) -> int:
        if self.nlist is not None:
            return int(max(1, min(self.nlist, n)))
        return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


ANN_PARAMS = AnnParams()


@contextlib.contextmanager
def ann_params(**changes):
    """Temporarily override fields of the module default `ANN_PARAMS` (not thread-safe)."""
    global ANN_PARAMS
    saved = ANN_PARAMS
    ANN_PARAMS = dataclasses.replace(saved, **changes)
    try:
        yield ANN_PARAMS
    finally:
        ANN_PARAMS = saved


# ----------------------------------------------------------------------------- explicit features

def explicit_width(widths, product: bool) -> int:
    """Columns of the explicit feature vectors: sum_j Lz_j * Lg_j for product, else sum of widths."""
    if not product:
        return int(sum(widths))
    return int(sum(a * b for a, b in zip(widths[0::2], widths[1::2])))


def _check_explicit_width(widths, product: bool) -> int:
    w = explicit_width(widths, product)
    if w > KRON_MAX_WIDTH:
        pairs = list(zip(widths[0::2], widths[1::2])) if product else list(widths)
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
    blocks, col = [], 0
    for wz, wg in zip(widths[0::2], widths[1::2]):
        z = x[:, col:col + wz]
        g = x[:, col + wz:col + wz + wg]
        col += wz + wg
        blocks.append((z.unsqueeze(2) * g.unsqueeze(1)).reshape(x.shape[0], wz * wg))
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


def _chunk_len(parts, sel) -> int:
    if isinstance(sel, slice):
        return len(range(*sel.indices(parts[0].shape[0])))
    return len(sel)


def _array_rows(parts, sel, local: np.ndarray) -> np.ndarray:
    """Rows of the pool arrays for chunk-local positions `local` (sorted, unique)."""
    if isinstance(sel, slice):
        start, _, step = sel.indices(parts[0].shape[0])
        return start + step * local
    return np.asarray(sel, dtype=np.int64)[local]


def _sub_rows(parts, sel, a: int, b: int):
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
        rows = normalized_block(parts, _array_rows(parts, sel, uniq), normalize, device=q.device)
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
        keys = _reference.pack_keys(s.contiguous(), ix.contiguous())
        top_s, top_i = _reference.unpack_keys(keys.topk(kk, dim=1, sorted=True).values)
        out_s[a:b], out_i[a:b] = top_s, top_i
    return out_s, out_i


def _dedupe(cand: np.ndarray) -> np.ndarray:
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


def _merge(scores, index, new_s, new_pos, offset: int, k: int):
    new_i = torch.where(new_pos >= 0, new_pos + offset, new_pos)
    s, i = _reference.merge_topk(scores, index, new_s, new_i, k)
    return s.contiguous(), i.contiguous()


def _exact_fallback(q, parts, sel, normalize, widths, product, k):
    """Exact top-k (chunk-local positions) with the cpu backend, or torch when it is not built."""
    m = q.shape[0]
    s0 = torch.full((m, k), float("-inf"), dtype=torch.float32)
    i0 = torch.full((m, k), -1, dtype=torch.int64)
    from pyfk.engine.kernels import cpu as _cpu
    if _cpu.IMPORT_ERROR is None and q.device.type == "cpu":
        return _cpu.topk_update(q, parts, sel, normalize, widths, product, k, 0, s0, i0)
    p = normalized_block(parts, sel, normalize, device=q.device)
    return _reference.topk_update(q, p, widths, product, k, 0, s0.to(q.device), i0.to(q.device))


# ----------------------------------------------------------------------------- faiss plumbing

_GPU_LOCK = threading.Lock()
_GPU_RESOURCES = None


def _use_gpu(q: torch.Tensor) -> bool:
    return (faiss is not None and q.device.type == "cuda" and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0)


def _gpu_resources():
    global _GPU_RESOURCES
    with _GPU_LOCK:
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        return _GPU_RESOURCES


def _to_gpu(index, q: torch.Tensor):
    device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return faiss.index_cpu_to_gpu(_gpu_resources(), device, index)


@contextlib.contextmanager
def _omp_threads(n: int | None):
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


def _np32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


# ----------------------------------------------------------------------------- exact backend

def exact_chunk_rows(m: int, width: int) -> int:
    """Pool rows per exact call: ~256 MiB of explicit features (bounded by the widest possible case)."""
    feat = min(KRON_MAX_WIDTH, max(width, (width // 2) ** 2))
    return max(1024, _EXACT_BLOCK_BYTES // (4 * max(feat, 1)))


def exact_topk_update(q, parts, sel, normalize, widths, product, k, offset, scores, index):
    """Registry contract for backend 'faiss': exact top-k through IndexFlatIP on explicit features."""
    _require_faiss()
    _check_explicit_width(widths, product)
    n = _chunk_len(parts, sel)
    if n == 0:
        return scores, index
    p = normalized_block(parts, sel, normalize, device=q.device)
    feats = explicit_features(p, widths, product)
    qf = explicit_features(q, widths, product)
    flat = faiss.IndexFlatIP(feats.shape[1])
    if _use_gpu(q):
        flat = _to_gpu(flat, q)
    flat.add(_np32(feats))
    p_norm_max = float(feats.norm(dim=1).max())
    del feats
    kk = min(n, k + EXACT_MARGIN)
    qf_np = _np32(qf)
    dist, cand = flat.search(qf_np, kk)
    del flat
    cand = _dedupe(cand)
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
    top_s, top_i = _reference.unpack_keys(
        _reference.pack_keys(s.contiguous(), ix.contiguous()).topk(min(k, kk), dim=1, sorted=True).values)
    if redo.any():
        rows = torch.from_numpy(np.flatnonzero(redo)).to(q.device)
        m = len(rows)
        rs, ri = _reference.topk_update(q[rows], p, widths, product, k, 0,
                                        torch.full((m, k), float("-inf"), device=q.device),
                                        torch.full((m, k), -1, dtype=torch.int64, device=q.device))
        top_s, top_i = top_s.clone(), top_i.clone()
        top_s[rows], top_i[rows] = rs, ri
    return _merge(scores, index, top_s, top_i, offset, k)


# ----------------------------------------------------------------------------- sketches

def _count_sketch_matrix(rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, width) dense matrix with one seeded +-1 per row at a seeded bucket: x @ H = CS(x)."""
    bucket = torch.randint(0, width, (rows,), generator=gen)
    sign = torch.randint(0, 2, (rows,), generator=gen).float().mul_(2).sub_(1)
    h = torch.zeros(rows, width)
    h[torch.arange(rows), bucket] = sign
    return h


class Sketcher:
    """Seeded TensorSketch (product) / count sketch (sum, features) to width W, or identity.

    `mode` is "explicit" when the explicit features are no wider than W (indexed as
    they are: exact inner products), else "sketch".
    """

    def __init__(self, widths, product: bool, width: int, seed: int):
        self.widths = [int(w) for w in widths]
        self.product = bool(product)
        self.explicit = explicit_width(self.widths, self.product)
        self.mode = "explicit" if self.explicit <= width else "sketch"
        self.dim = self.explicit if self.mode == "explicit" else int(width)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 12345)
        self.h = [_count_sketch_matrix(w, self.dim, gen) for w in self.widths] if self.mode == "sketch" else []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(n, dim) float32 sketch of normalised rows x (n, D)."""
        if self.mode == "explicit":
            return explicit_features(x, self.widths, self.product)
        h = [m.to(x.device) for m in self.h]
        if not self.product:  # one count sketch of the concatenation: sum of per-segment sketches
            out, col = None, 0
            for w, hm in zip(self.widths, h):
                part = x[:, col:col + w] @ hm
                col += w
                out = part if out is None else out.add_(part)
            return out
        out, col, W = None, 0, self.dim
        for j, (wz, wg) in enumerate(zip(self.widths[0::2], self.widths[1::2])):
            cz = x[:, col:col + wz] @ h[2 * j]
            cg = x[:, col + wz:col + wz + wg] @ h[2 * j + 1]
            col += wz + wg
            ts = torch.fft.irfft(torch.fft.rfft(cz, dim=1) * torch.fft.rfft(cg, dim=1), n=W, dim=1)
            out = ts if out is None else out.add_(ts)  # scales added: see the module docstring
        return out


def tensor_sketch(x: torch.Tensor, widths, product: bool, width: int = 256, seed: int = 0) -> torch.Tensor:
    """Functional form of `Sketcher`: the (n, width) sketch of normalised rows x."""
    return Sketcher(widths, product, width, seed)(x)


# ----------------------------------------------------------------------------- approximate index

class AnnIndex:
    """A TensorSketch IVF/HNSW index over one pool chunk, with exact re-ranking.

        ix = AnnIndex(parts, sel, normalize, widths, product, AnnParams(nprobe=32))
        scores, positions = ix.search(q, k)     # chunk-local positions, exact scores
    """

    def __init__(self, parts, sel, normalize: str, widths, product: bool, params: AnnParams | None = None,
                 device=None):
        _require_faiss()
        self.params = params or ANN_PARAMS
        self.parts, self.sel, self.normalize = list(parts), sel, normalize
        self.widths, self.product = [int(w) for w in widths], bool(product)
        self.n = _chunk_len(parts, sel)
        self.sketcher = Sketcher(self.widths, self.product, self.params.width, self.params.seed)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.gpu = False
        d = self.sketcher.dim
        width = sum(self.widths)
        keep = self.params.keep_rows and self.n * width * 4 <= _KEEP_ROWS_BYTES
        self.rows = ([torch.empty((self.n, w), dtype=torch.float32, device=self.device) for w in self.widths]
                     if keep else None)  # normalised segments, kept for re-ranking
        sk = np.empty((self.n, d), dtype=np.float32)
        step = max(1024, (64 << 20) // (4 * max(d, width)))
        for a in range(0, self.n, step):  # normalise and sketch in slabs
            b = min(self.n, a + step)
            x = normalized_block(parts, _sub_rows(parts, sel, a, b), normalize, device=self.device)
            if keep:
                for dst, src in zip(self.rows, torch.split(x, self.widths, dim=1)):
                    dst[a:b] = src
            sk[a:b] = _np32(self.sketcher(x))
        self.nlist = None
        if self.params.index == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(self.params.hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(self.params.ef_construction)
            index.add(sk)
        else:
            self.nlist = self.params.n_lists(self.n)
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(self.params.seed)
            index.train(sk)
            index.add(sk)
            self._quantizer = quantizer  # faiss keeps a reference too; belt and braces
            if self.device.type == "cuda" and faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources"):
                index = _to_gpu(index, torch.empty(0, device=self.device))
                self.gpu = True
        self.index = index

    def candidates(self, q: torch.Tensor, k: int) -> np.ndarray:
        """(M, K') chunk-local candidate positions from the sketch index (-1 = none)."""
        kc = self.params.n_candidates(k, self.n)
        qs = _np32(self.sketcher(q.to(self.device)))
        if self.params.index == "hnsw":
            self.index.hnsw.efSearch = max(int(self.params.ef_search), kc)
        else:
            self.index.nprobe = int(min(self.params.nprobe, self.nlist))
        with _omp_threads(self.params.search_threads):
            _, cand = self.index.search(qs, kc)
        return _dedupe(cand)

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact-scored top-k (float32 scores, int64 chunk-local positions) among the candidates.

        Rows whose candidates number fewer than k are answered by an exact search instead.
        The whole search runs with faiss at `search_threads` OpenMP threads (see AnnParams).
        """
        with _omp_threads(self.params.search_threads):
            return self._search(q, k)

    def _search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(min(k, self.n))
        cand = self.candidates(q, k)
        s, i = rerank(q, self.parts, self.sel, self.normalize, self.widths, self.product, k, cand, self.rows)
        short = (cand >= 0).sum(axis=1) < k
        if short.any():
            rows = torch.from_numpy(np.flatnonzero(short)).to(q.device)
            fs, fi = _exact_fallback(q[rows], self.parts, self.sel, self.normalize, self.widths, self.product, k)
            s[rows], i[rows] = fs.to(q.device), fi.to(q.device)
        return s, i


def _sel_key(sel):
    if isinstance(sel, slice):
        return ("slice", sel.start, sel.stop, sel.step)
    a = np.ascontiguousarray(sel, dtype=np.int64)
    return ("rows", len(a), hash(a.tobytes()))


def _parts_key(parts):
    key = []
    for a in parts:
        if isinstance(a, torch.Tensor):
            key.append((id(a), a.data_ptr(), tuple(a.shape), tuple(a.stride()), str(a.dtype), a._version))
        else:
            key.append((id(a), a.__array_interface__["data"][0], a.shape, a.strides, str(a.dtype)))
    return tuple(key)


_CACHE_LOCK = threading.Lock()
_CACHE: dict = {}


def clear_cache() -> None:
    """Drop the cached approximate index (see AnnParams.cache)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _ann_index(parts, sel, normalize, widths, product, params, device) -> AnnIndex:
    if not params.cache:
        return AnnIndex(parts, sel, normalize, widths, product, params, device)
    key = (_parts_key(parts), _sel_key(sel), normalize, tuple(widths), bool(product), params, str(device))
    with _CACHE_LOCK:
        hit = _CACHE.get("entry")
        if hit is not None and hit[0] == key:
            return hit[1]
    built = AnnIndex(parts, sel, normalize, widths, product, params, device)
    with _CACHE_LOCK:
        _CACHE["entry"] = (key, built)  # holds `parts`, so the ids in the key stay unique
    return built


def ann_topk_update(q, parts, sel, normalize, widths, product, k, offset, scores, index):
    """Registry contract for backend 'faiss_ann': sketch index candidates, exact re-ranking, merge."""
    _require_faiss()
    n = _chunk_len(parts, sel)
    if n == 0:
        return scores, index
    ix = _ann_index(parts, sel, normalize, widths, product, ANN_PARAMS, q.device)
    s, i = ix.search(q, k)
    return _merge(scores, index, s, i, offset, k)


def ann_chunk_rows(m: int, width: int) -> int:
    return _ANN_CHUNK_ROWS


def similarity(q, p, widths, product):
    """Dense (M, N) scores of normalised q against normalised p (the torch reference formula)."""
    return _reference.similarity(q, p, widths, product)


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
