"""Backend `faiss_ann`: approximate candidates (TensorSketch + IVF/HNSW), exact scores.

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
pool (option cache=True, or an `AnnIndex` kept by the caller), on clustered data.

Options: the fields of `AnnParams`, with its defaults, e.g.
    pyfk.topk(q, p, k, backend="faiss_ann", options={"nprobe": 8, "width": 128})
An unknown or invalid option raises ValueError naming it. Within one search, and
across the searches of one prepared pool (e.g. `select` growing k), the index of a
chunk is built once (kept in the PreparedPool). The IVF build is deterministic for
a seed (faiss k-means is seeded); an HNSW graph built with several OpenMP threads
is not bit-reproducible.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import torch

from pyfk.engine.backend import Backend, register
from pyfk.engine.descriptors import normalized_block
from pyfk.engine.kernels import cpu as _cpu_kernel
from pyfk.engine.kernels import faiss as _fx
from pyfk.engine.kernels import torch as _torch_kernel
from pyfk.engine.layout import Layout
from pyfk.engine.topk_state import TopK

_ANN_CHUNK_ROWS = 1 << 22  # the approximate index is built over one chunk: normally the whole pool
_KEEP_ROWS_BYTES = 1 << 30  # AnnParams.keep_rows: the most normalised-row bytes an index keeps

__all__ = ["AnnIndex", "AnnParams", "FaissAnnBackend", "Sketcher", "clear_cache", "recall_at_k", "tensor_sketch"]

recall_at_k = _fx.recall_at_k  # where users of the approximate backend look for it


# ----------------------------------------------------------------------------- parameters

def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class AnnParams:
    """Knobs of the approximate backend (its options, by these names and defaults).

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
            if not _is_int(value) or value < 1:
                raise ValueError(f"AnnParams.{name}: expected a positive integer, got {value!r}")
        for name in ("nlist", "candidates", "search_threads"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"AnnParams.{name}: expected None or a positive integer, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"AnnParams.seed: expected a non-negative integer, got {self.seed!r}")
        for name in ("cache", "keep_rows"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"AnnParams.{name}: expected True or False, got {value!r}")

    @classmethod
    def from_options(cls, options) -> AnnParams:
        """AnnParams from a dict of backend options; an unknown name raises ValueError naming it."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"options: backend 'faiss_ann' accepts {sorted(fields)}, got unknown {unknown}")
        return cls(**options)

    def n_candidates(self, k: int, n: int) -> int:
        want = self.candidates if self.candidates is not None else max(4 * k, 128)
        return int(min(n, max(k, want)))

    def n_lists(self, n: int) -> int:
        if self.nlist is not None:
            return int(max(1, min(self.nlist, n)))
        return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


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
        self.explicit = _fx.explicit_width(self.widths, self.product)
        self.mode = "explicit" if self.explicit <= width else "sketch"
        self.dim = self.explicit if self.mode == "explicit" else int(width)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + 12345)
        self.h = [_count_sketch_matrix(w, self.dim, gen) for w in self.widths] if self.mode == "sketch" else []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(n, dim) float32 sketch of normalised rows x (n, D)."""
        if self.mode == "explicit":
            return _fx.explicit_features(x, self.widths, self.product)
        h = [m.to(x.device) for m in self.h]
        if not self.product:  # one count sketch of the concatenation: sum of per-segment sketches
            out = None
            for cols, hm in zip(Layout(tuple(self.widths), "features").columns(), h):
                part = x[:, cols] @ hm
                out = part if out is None else out.add_(part)
            return out
        out, W = None, self.dim
        for j, (z, g) in enumerate(Layout(tuple(self.widths), "product").pairs()):
            cz = x[:, z] @ h[2 * j]
            cg = x[:, g] @ h[2 * j + 1]
            ts = torch.fft.irfft(torch.fft.rfft(cz, dim=1) * torch.fft.rfft(cg, dim=1), n=W, dim=1)
            out = ts if out is None else out.add_(ts)  # scales added: see the module docstring
        return out


def tensor_sketch(x: torch.Tensor, widths, product: bool, width: int = 256, seed: int = 0) -> torch.Tensor:
    """Functional form of `Sketcher`: the (n, width) sketch of normalised rows x."""
    return Sketcher(widths, product, width, seed)(x)


# ----------------------------------------------------------------------------- approximate index

def _exact_fallback(q, parts, sel, normalize, widths, product, k):
    """Exact top-k (chunk-local positions) with the cpu kernel, or the torch one when it is not built."""
    empty = TopK.empty(q.shape[0], k)
    if _cpu_kernel.IMPORT_ERROR is None and q.device.type == "cpu":
        s, i, _ = _cpu_kernel.topk_update(q, parts, sel, normalize, widths, product, k, 0, empty.scores,
                                          empty.index)  # NaN report unused: the engine checked the pool
        return s, i
    p = normalized_block(parts, sel, normalize, device=q.device)
    return _torch_kernel.topk_update(q, p, widths, product, k, 0, empty.scores.to(q.device), empty.index.to(q.device))


class AnnIndex:
    """A TensorSketch IVF/HNSW index over one pool chunk, with exact re-ranking.

        ix = AnnIndex(parts, sel, normalize, widths, product, AnnParams(nprobe=32))
        scores, positions = ix.search(q, k)     # chunk-local positions, exact scores
    """

    def __init__(self, parts, sel, normalize: str, widths, product: bool, params: AnnParams | None = None,
                 device=None):
        faiss = _fx.require_faiss("faiss_ann")
        self.params = params if params is not None else AnnParams()
        self.parts, self.sel, self.normalize = list(parts), sel, normalize
        self.widths, self.product = [int(w) for w in widths], bool(product)
        self.n = _fx.chunk_len(parts, sel)
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
            x = normalized_block(parts, _fx.sub_rows(parts, sel, a, b), normalize, device=self.device)
            if keep:
                for dst, src in zip(self.rows, torch.split(x, self.widths, dim=1)):
                    dst[a:b] = src
            sk[a:b] = _fx.np32(self.sketcher(x))
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
            if _fx.use_gpu(self.device):
                index = _fx.to_gpu(index, self.device)
                self.gpu = True
        self.index = index

    def candidates(self, q: torch.Tensor, k: int) -> np.ndarray:
        """(M, K') chunk-local candidate positions from the sketch index (-1 = none)."""
        kc = self.params.n_candidates(k, self.n)
        qs = _fx.np32(self.sketcher(q.to(self.device)))
        if self.params.index == "hnsw":
            self.index.hnsw.efSearch = max(int(self.params.ef_search), kc)
        else:
            self.index.nprobe = int(min(self.params.nprobe, self.nlist))
        with _fx.omp_threads(self.params.search_threads):
            _, cand = self.index.search(qs, kc)
        return _fx.dedupe(cand)

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact-scored top-k (float32 scores, int64 chunk-local positions) among the candidates.

        Rows whose candidates number fewer than k are answered by an exact search instead.
        The whole search runs with faiss at `search_threads` OpenMP threads (see AnnParams).
        """
        with _fx.omp_threads(self.params.search_threads):
            return self._search(q, k)

    def _search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(min(k, self.n))
        cand = self.candidates(q, k)
        s, i = _fx.rerank(q, self.parts, self.sel, self.normalize, self.widths, self.product, k, cand, self.rows)
        short = (cand >= 0).sum(axis=1) < k
        if short.any():
            rows = torch.from_numpy(np.flatnonzero(short)).to(q.device)
            fs, fi = _exact_fallback(q[rows], self.parts, self.sel, self.normalize, self.widths, self.product, k)
            s[rows], i[rows] = fs.to(q.device), fi.to(q.device)
        return s, i


# ----------------------------------------------------------------------------- the index cache

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
_CACHE: dict = {}  # option cache=True: the last index built, across searches and pools


def clear_cache() -> None:
    """Drop the cached approximate index (see AnnParams.cache)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def cached_index() -> AnnIndex | None:
    """The index kept by option cache=True, if any."""
    with _CACHE_LOCK:
        hit = _CACHE.get("entry")
    return None if hit is None else hit[1]


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


# ----------------------------------------------------------------------------- the backend

def ann_chunk_rows(m: int, width: int) -> int:
    return _ANN_CHUNK_ROWS


_POOL_KEY = "faiss_ann.index"  # PreparedPool.extra: (key, AnnIndex) of the last chunk searched


class FaissAnnBackend(Backend):
    """Options: the fields of AnnParams, with its defaults (see the module docstring)."""

    name = "faiss_ann"
    devices = ("cpu", "cuda")
    description = "APPROXIMATE: TensorSketch + IVF/HNSW candidates, exact re-ranking (recall@k < 1; see AnnParams)"
    exact = False
    options = dataclasses.asdict(AnnParams())

    def unavailable_reason(self):
        return _fx.available()

    def resolve_options(self, options):
        """The defaults updated with `options`, validated as AnnParams (ValueError naming the option)."""
        opts = super().resolve_options(options)
        return dataclasses.asdict(AnnParams(**opts))

    def chunk_rows(self, m, width, options):
        return ann_chunk_rows(m, width)

    def chunk_index(self, pool, rows, params: AnnParams, device) -> AnnIndex:
        """The AnnIndex of pool chunk `rows`: built once per prepared pool and chunk (the last
        one is kept in pool.extra), or taken from the module cache with params.cache."""
        key = (_sel_key(rows), params, str(device))
        hit = pool.extra.get(_POOL_KEY)
        if hit is not None and hit[0] == key:
            return hit[1]
        pool.extra.pop(_POOL_KEY, None)  # let the previous chunk's index go before building this one
        built = _ann_index(pool.parts, rows, pool.normalize, pool.layout.widths, pool.layout.product, params,
                           device)
        pool.extra[_POOL_KEY] = (key, built)
        return built

    def topk(self, queries, pool, rows, k, state, offset, options):
        _fx.require_faiss(self.name)
        if _fx.chunk_len(pool.parts, rows) == 0:
            return state
        params = AnnParams.from_options(options)
        s, i = self.chunk_index(pool, rows, params, queries.device).search(queries, k)
        return state.merge(TopK(s, i).shifted(offset))


register(FaissAnnBackend())
