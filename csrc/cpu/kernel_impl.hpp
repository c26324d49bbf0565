// Fused multi-scale Hadamard-Gram top-k, one instantiation per instruction set.
//
// Included by kernel_avx512.cpp / kernel_avx2.cpp / kernel_generic.cpp, each of
// which defines PYFK_ISA (the namespace), PYFK_VW (floats per vector register),
// PYFK_MR (query rows per micro-tile) and PYFK_NRV (vectors of pool columns per
// micro-tile) and is compiled with its own -m flags. GCC vector extensions let
// one source produce AVX-512, AVX2 and SSE2 code.
//
// Layout. Queries Q (M, D) and pool P (N, D) are row-major float32 whose
// columns are S segments of widths w_0..w_{S-1} (D = sum w_s):
//   product mode: segments are pairs (z_j, g_j) and
//       R(q, p) = sum_j (z_j(q).z_j(p)) * (g_j(q).g_j(p));
//   dot mode: R(q, p) = sum over all columns q.p (combine = "sum"/"features").
// Q is packed once per call into MR-row panels, P is packed per block of NB
// items into NR-column panels; each segment of a panel is stored k-major
// ([w_s][MR] resp. [w_s][NR]) so the micro-kernel broadcasts one query value
// and multiplies it into NRV pool vectors.
//
// Instruction sets. The ISA files are NOT compiled with -mavx512f/-mavx2: every
// header (the standard library, kernel_api.hpp) is parsed with the baseline
// flags and only the code below, all of it inside namespace pyfk::PYFK_ISA, is
// compiled for PYFK_TARGET via `#pragma GCC target`. Compiling a whole file
// with -m flags made GCC emit std::vector/std::thread template instances with
// AVX-512 instructions; those instances are shared (COMDAT/ODR) between the
// three files, the linker kept one, and the avx2/generic kernels crashed with
// SIGILL on CPUs without AVX-512 (seen on an AMD EPYC with AVX2 only).
//
// fp16 pool rows: the avx2/avx512 variants (PYFK_F16C; F16C is in their PYFK_TARGET
// and required by cpu_has) convert with vcvtph2ps, exact for half -> float like the
// software half_to_float the generic variant keeps.
//
// Finiteness: the pool is not scanned before the kernel runs. Every raw pool row
// segment is tested for NaN/Inf while it is converted for packing (before it is
// normalised), and the smallest offending position per segment is reported in
// `bad` (see kernel_api.hpp); the caller raises after the pass.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "kernel_api.hpp"
#include "thread_pool.hpp"

#ifdef PYFK_F16C
#include <immintrin.h>  // before the target pragma, like every header
#endif

#ifdef PYFK_TARGET
#define PYFK_PRAGMA(x) _Pragma(#x)
#define PYFK_TARGET_PRAGMA(t) PYFK_PRAGMA(GCC target(t))
#pragma GCC push_options
PYFK_TARGET_PRAGMA(PYFK_TARGET)
#endif

#include "topk_heap.hpp"  // the per-query heaps (internal linkage: one copy per ISA file)

namespace pyfk {
namespace PYFK_ISA {

constexpr int VW = PYFK_VW;
constexpr int MR = PYFK_MR;
constexpr int NRV = PYFK_NRV;
constexpr int NR = NRV * VW;
typedef float vf __attribute__((vector_size(VW * sizeof(float))));

struct Tile {
  vf v[MR][NRV];
};

// Broadcast x to every lane. Written `x - 0`, which is x for every float, so GCC emits one
// `vbroadcastss mem, reg` (a load-port uop). The former `vf{} + x` is not x for x = -0.0
// (0 + -0 = +0): GCC kept a scalar vaddss plus a register broadcast, two extra uops per
// query row on the FP/shuffle ports the FMAs need -- the kernel ran at ~55% of the FMA peak.
static inline vf vsplat(float x) { return x - vf{}; }

// acc[r][c] = sum_k a[k*MR + r] * b[k*NR + c]  over k < width.
static inline void tile_dot(const float* __restrict a, const float* __restrict b,
                            int64_t width, Tile& acc) {
  vf c[MR][NRV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NRV; ++v) c[r][v] = vf{};
  for (int64_t k = 0; k < width; ++k) {
    vf bv[NRV];
#pragma GCC unroll 4
    for (int v = 0; v < NRV; ++v) std::memcpy(&bv[v], b + k * NR + v * VW, sizeof(vf));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vf av = vsplat(a[k * MR + r]);
#pragma GCC unroll 4
      for (int v = 0; v < NRV; ++v) c[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NRV; ++v) acc.v[r][v] = c[r][v];
}

// Scores of one MR x NR micro-tile: queries panel `a`, pool panel `b`.
static inline void tile_scores(const float* a, const float* b, const Layout& lay, Tile& out) {
  if (!lay.product) {
    tile_dot(a, b, lay.width, out);
    return;
  }
  Tile gz, gg;
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NRV; ++v) out.v[r][v] = vf{};
  for (size_t s = 0; s + 1 < lay.widths.size(); s += 2) {
    const int64_t oz = lay.offsets[s], og = lay.offsets[s + 1];
    tile_dot(a + MR * oz, b + NR * oz, lay.widths[s], gz);
    tile_dot(a + MR * og, b + NR * og, lay.widths[s + 1], gg);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NRV; ++v) out.v[r][v] += gz.v[r][v] * gg.v[r][v];
  }
}

// Pack rows [row0, row0 + rows) of a (n, D) float32 matrix into one panel of
// `R` rows (zero padded), each segment k-major: panel[R*off_s + k*R + r] = X[row0+r][off_s+k].
template <int R>
static void pack_panel(const float* x, int64_t ld, int64_t row0, int64_t rows,
                       const Layout& lay, float* panel) {
  for (size_t s = 0; s < lay.widths.size(); ++s) {
    const int64_t off = lay.offsets[s], w = lay.widths[s];
    float* dst = panel + R * off;
    int64_t r = 0;
    for (; r < rows; ++r) {
      const float* src = x + (row0 + r) * ld + off;
      for (int64_t k = 0; k < w; ++k) dst[k * R + r] = src[k];
    }
    for (; r < R; ++r)
      for (int64_t k = 0; k < w; ++k) dst[k * R + r] = 0.0f;
  }
}

static inline float half_to_float(uint16_t h) {
  // IEEE binary16 -> binary32, exact (subnormals, inf and NaN included).
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do { ++e; mant <<= 1; } while (!(mant & 0x400u));
    bits = sign | ((112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Sum of (x[k] - shift) over k < w, in float32 with VW-wide
// partial sums (vectorised, unlike a double accumulator). Shifting by a sample
// value keeps the mean accurate when it is large against the spread.
static inline float vsum(const float* x, int64_t w, float shift) {
  vf acc{};
  const vf sv = vsplat(shift);
  int64_t k = 0;
  for (; k + VW <= w; k += VW) {
    vf v;
    std::memcpy(&v, x + k, sizeof v);
    acc += v - sv;
  }
  float total = 0.0f;
  for (int l = 0; l < VW; ++l) total += acc[l];
  for (; k < w; ++k) total += x[k] - shift;
  return total;
}

// Dot product of a[0..w) and b[0..w) with VW-wide partial sums (vdot(x, x) = |x|^2).
static inline float vdot(const float* a, const float* b, int64_t w) {
  vf acc{};
  int64_t k = 0;
  for (; k + VW <= w; k += VW) {
    vf x, y;
    std::memcpy(&x, a + k, sizeof x);
    std::memcpy(&y, b + k, sizeof y);
    acc += x * y;
  }
  float total = 0.0f;
  for (int l = 0; l < VW; ++l) total += acc[l];
  for (; k < w; ++k) total += a[k] * b[k];
  return total;
}

// Largest |x[k]| over k < w (x finite: load_pool_row tests every pool row first, queries
// are checked in Python).
static inline float vmaxabs(const float* x, int64_t w) {
  vf acc{};
  int64_t k = 0;
  for (; k + VW <= w; k += VW) {
    vf v;
    std::memcpy(&v, x + k, sizeof v);
    v = v < 0 ? -v : v;
    acc = acc > v ? acc : v;
  }
  float m = 0.0f;
  for (int l = 0; l < VW; ++l) m = std::max(m, static_cast<float>(acc[l]));
  for (; k < w; ++k) m = std::max(m, std::fabs(x[k]));
  return m;
}

// Rows whose max |x| is above this are scaled by an exact power of two first: their
// squares would overflow float32 (same rule as pyfk.engine.descriptors.TAME_ABOVE).
constexpr float TAME_ABOVE = 1152921504606846976.0f;  // 2^60

// Normalise one row segment in place (same formulas as pyfk.engine.descriptors):
// pcc: (x - mean) / (population std + 1e-10);  l2: x / (||x|| + 1e-10).
static inline void normalize_row(float* x, int64_t w, Normalize mode) {
  if (mode == Normalize::none) return;
  const float amax = vmaxabs(x, w);
  if (amax > TAME_ABOVE) {  // x * 2^-e with amax = f * 2^e, f in [0.5, 1): exact, like torch.frexp
    int e = 0;
    std::frexp(amax, &e);
    const float scale = std::ldexp(1.0f, -e);
    for (int64_t k = 0; k < w; ++k) x[k] *= scale;
  }
  if (mode == Normalize::pcc) {
    const float mean = x[0] + vsum(x, w, x[0]) / static_cast<float>(w);
    for (int64_t k = 0; k < w; ++k) x[k] -= mean;
  }
  float norm = std::sqrt(vdot(x, x, w));
  if (mode == Normalize::pcc) norm /= std::sqrt(static_cast<float>(w));
  const float scale = 1.0f / (norm + 1e-10f);
  for (int64_t k = 0; k < w; ++k) x[k] *= scale;
}

#ifdef PYFK_F16C
// VW halves -> VW floats with F16C (exact). Unaligned loads: rows have any stride.
static inline vf half_vec(const uint16_t* p) {
#if PYFK_VW == 16
  return reinterpret_cast<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif PYFK_VW == 8
  return reinterpret_cast<vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
#error "PYFK_F16C needs PYFK_VW 8 or 16"
#endif
}
static inline float half_scalar(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float half_scalar(uint16_t h) { return half_to_float(h); }
#endif

// Gather pool position `pos`, segment s, into x[0..w): convert to float32 and
// normalise. Returns false if the raw row holds NaN or Inf; x is then zeroed (and
// not normalised) so the pass goes on with harmless values until the caller raises.
// The test is `acc += v - v` (0 for finite lanes, NaN once any lane was NaN or Inf),
// one subtract and one add per vector on data already in registers.
static inline bool load_pool_row(const PoolView& pool, int64_t pos, size_t s, int64_t w, float* x) {
  const Segment& seg = pool.segs[s];
  const int64_t row = pool.rows ? pool.rows[pos] : pos;
  vf acc{};
  float tail = 0.0f;
  int64_t k = 0;
  if (seg.dtype == DType::f32) {
    const float* src = static_cast<const float*>(seg.data) + row * seg.ld;
    for (; k + VW <= w; k += VW) {
      vf v;
      std::memcpy(&v, src + k, sizeof v);
      std::memcpy(x + k, &v, sizeof v);
      acc += v - v;
    }
    for (; k < w; ++k) {
      x[k] = src[k];
      tail += x[k] - x[k];
    }
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(seg.data) + row * seg.ld;
#ifdef PYFK_F16C
    for (; k + VW <= w; k += VW) {
      const vf v = half_vec(src + k);
      std::memcpy(x + k, &v, sizeof v);
      acc += v - v;
    }
#endif
    for (; k < w; ++k) {
      x[k] = half_scalar(src[k]);
      tail += x[k] - x[k];
    }
  }
  bool finite = tail == 0.0f;
#pragma GCC unroll 16
  for (int l = 0; l < VW; ++l) finite &= acc[l] == 0.0f;
  if (__builtin_expect(!finite, 0)) {
    std::fill(x, x + w, 0.0f);
    return false;
  }
  normalize_row(x, w, pool.normalize);
  return true;
}

// bad[s] = min(bad[s], pos), atomically (threads share `bad`; the joins publish it).
static inline void note_bad(int64_t* bad, size_t s, int64_t pos) {
  int64_t cur = __atomic_load_n(bad + s, __ATOMIC_RELAXED);
  while (pos < cur && !__atomic_compare_exchange_n(bad + s, &cur, pos, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// Pack pool positions [pos0, pos0 + count) into one NR-column panel: gather the
// row, convert to float32, normalise each segment, store k-major; zero padded.
static void pack_pool_panel(const PoolView& pool, int64_t pos0, int64_t count, const Layout& lay,
                            float* panel, std::vector<float>& tmp, int64_t* bad) {
  for (size_t s = 0; s < lay.widths.size(); ++s) {
    const int64_t off = lay.offsets[s], w = lay.widths[s];
    float* dst = panel + NR * off;
    int64_t r = 0;
    for (; r < count; ++r) {
      float* x = tmp.data();
      if (!load_pool_row(pool, pos0 + r, s, w, x)) note_bad(bad, s, pos0 + r);
      for (int64_t k = 0; k < w; ++k) dst[k * NR + r] = x[k];
    }
    for (; r < NR; ++r)
      for (int64_t k = 0; k < w; ++k) dst[k * NR + r] = 0.0f;
  }
}

// Few queries (m <= FEW): packing the pool into panels would cost more than the
// arithmetic, so each pool row is loaded once (contiguous) and dotted with every
// query row directly -- a memory-bound GEMV instead of a packed GEMM.
constexpr int64_t FEW = MR / 2;

// scores[i] = R(query i, normalised pool row x) for i < m; q is (m, D) row-major.
static inline void row_scores(const float* q, int64_t m, const float* x, const Layout& lay, float* scores) {
  for (int64_t i = 0; i < m; ++i) {
    const float* qi = q + i * lay.width;
    if (!lay.product) {
      scores[i] = vdot(qi, x, lay.width);
      continue;
    }
    float total = 0.0f;
    for (size_t s = 0; s + 1 < lay.widths.size(); s += 2) {
      const int64_t oz = lay.offsets[s], og = lay.offsets[s + 1];
      total += vdot(qi + oz, x + oz, lay.widths[s]) * vdot(qi + og, x + og, lay.widths[s + 1]);
    }
    scores[i] = total;
  }
}

// Load every pool position in [p0, p1) as one normalised row and score it.
template <class OnRow>
static void sweep_rows(const float* q, int64_t m, const PoolView& pool, const Layout& lay, int64_t p0,
                       int64_t p1, int64_t* bad, OnRow on_row) {
  std::vector<float> x(static_cast<size_t>(lay.width));
  float scores[FEW > 0 ? FEW : 1];
  for (int64_t pos = p0; pos < p1; ++pos) {
    for (size_t s = 0; s < lay.widths.size(); ++s)
      if (!load_pool_row(pool, pos, s, lay.widths[s], x.data() + lay.offsets[s])) note_bad(bad, s, pos);
    row_scores(q, m, x.data(), lay, scores);
    on_row(pos, scores);
  }
}

static int64_t pool_block_items(int64_t width) {
  // Keep a packed pool block near 384 KiB so it stays in a 1 MiB L2 beside
  // the query panel streaming through; at least one panel, at most 2048 items.
  int64_t nb = (384 * 1024) / (std::max<int64_t>(width, 1) * 4);
  nb = std::max<int64_t>(NR, std::min<int64_t>(2048, nb / NR * NR));
  return nb;
}

// Run body(task) for every task in [0, tasks) on the persistent pool (thread_pool.hpp).
template <class F>
static void run_tasks(int64_t tasks, int threads, F& body) {
  parallel_for(tasks, threads, [](void* ctx, int64_t t) { (*static_cast<F*>(ctx))(t); }, &body);
}

// Run `body(t, begin, end)` over [0, n) split into at most `threads` contiguous ranges
// whose bounds are multiples of `grain`; returns the number of ranges (tasks).
template <class F>
static int parallel_ranges(int64_t n, int64_t grain, int threads, F body) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int t_used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, chunks)));
  auto task = [&](int64_t t) {
    body(static_cast<int>(t), std::min<int64_t>(n, (chunks * t / t_used) * grain),
         std::min<int64_t>(n, (chunks * (t + 1) / t_used) * grain));
  };
  run_tasks(t_used, threads, task);
  return t_used;
}

// Queries packed into MR-row panels, the panels packed in parallel.
static std::vector<float> pack_queries(const float* q, int64_t m, const Layout& lay, int threads) {
  const int64_t panels = (m + MR - 1) / MR;
  std::vector<float> packed(static_cast<size_t>(panels * MR * lay.width));
  parallel_ranges(panels, 16, threads, [&](int, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      pack_panel<MR>(q, lay.width, i * MR, std::min<int64_t>(MR, m - i * MR), lay,
                     packed.data() + i * MR * lay.width);
  });
  return packed;
}

// Offer the scores of query panels [i0, i1) x pool positions [p0, p1) to `heaps`, whose
// row r holds query q0 + r. The pool is packed one block of nb_items at a time.
static void sweep_panels(const float* qpack, int64_t m, int64_t i0, int64_t i1, const PoolView& pool,
                         const Layout& lay, int64_t p0, int64_t p1, TopK& heaps, int64_t q0,
                         int64_t index_offset, int64_t* bad) {
  const int64_t max_w = *std::max_element(lay.widths.begin(), lay.widths.end());
  const int64_t nb_items = pool_block_items(lay.width);
  std::vector<float> bpack(static_cast<size_t>(((nb_items + NR - 1) / NR) * NR * lay.width));
  std::vector<float> tmp(static_cast<size_t>(max_w));
  alignas(64) float row[NR];
  for (int64_t b0 = p0; b0 < p1; b0 += nb_items) {
    const int64_t items = std::min<int64_t>(nb_items, p1 - b0);
    const int64_t panels = (items + NR - 1) / NR;
    for (int64_t c = 0; c < panels; ++c)
      pack_pool_panel(pool, b0 + c * NR, std::min<int64_t>(NR, items - c * NR), lay,
                      bpack.data() + c * NR * lay.width, tmp, bad);
    for (int64_t i = i0; i < i1; ++i) {
      const float* a = qpack + i * MR * lay.width;
      const int rows = static_cast<int>(std::min<int64_t>(MR, m - i * MR));
      for (int64_t c = 0; c < panels; ++c) {
        Tile out;
        tile_scores(a, bpack.data() + c * NR * lay.width, lay, out);
        const int cols = static_cast<int>(std::min<int64_t>(NR, items - c * NR));
        const int64_t first = index_offset + b0 + c * NR;
        for (int r = 0; r < rows; ++r) {
          const int64_t h = i * MR + r - q0;
          const float thr = heaps.threshold(h);
          // Cheap vector reject: most tiles hold nothing above the k-th best.
          vf hi = out.v[r][0];
#pragma GCC unroll 4
          for (int v = 1; v < NRV; ++v) hi = hi > out.v[r][v] ? hi : out.v[r][v];
          float best = hi[0];
#pragma GCC unroll 16
          for (int l = 1; l < VW; ++l) best = std::max(best, static_cast<float>(hi[l]));
          if (best < thr) continue;
#pragma GCC unroll 4
          for (int v = 0; v < NRV; ++v) std::memcpy(row + v * VW, &out.v[r][v], sizeof(vf));
          for (int col = 0; col < cols; ++col)
            if (row[col] >= thr) heaps.push(h, row[col], first + col);
        }
      }
    }
  }
}

// Below this many pool positions per thread, Split::automatic splits the queries
// instead: every thread then packs (and normalises) the whole small pool itself, but keeps
// the heaps of its own queries only -- no per-thread heaps for every query, no merge.
// Measured on a 2-core Zen 3 (M = 200-1000): queries 10-20% faster at N = 500-1,000, the
// two within noise from N = 2,000 to 10,000 (pool split slightly ahead with normalisation).
constexpr int64_t POOL_PER_THREAD = 1024;

// Pool split: T threads each sweep a range of the pool for every query into heaps of
// their own; each sorts its heaps, then the sorted lists are merged per query.
template <class Sweep>
static void topk_pool_split(int64_t m, int64_t n, int64_t grain, int threads, int64_t k, float* scores,
                            int64_t* index, Sweep sweep) {
  const int t_max = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, (n + grain - 1) / grain)));
  std::vector<std::vector<float>> part_s(t_max);
  std::vector<std::vector<int64_t>> part_i(t_max);
  const int used = parallel_ranges(n, grain, t_max, [&](int t, int64_t p0, int64_t p1) {
    TopK heaps;
    heaps.init(m, k);
    if (t == 0) heaps.seed(scores, index);
    sweep(heaps, p0, p1);
    std::vector<std::pair<float, int64_t>> buf;
    if (t_max == 1) {  // one range: its heaps are the answer
      for (int64_t q = 0; q < m; ++q) write_sorted(heaps, q, scores + q * k, index + q * k, buf);
      return;
    }
    part_s[t].resize(static_cast<size_t>(m * k));
    part_i[t].resize(static_cast<size_t>(m * k));
    for (int64_t q = 0; q < m; ++q) write_sorted(heaps, q, part_s[t].data() + q * k, part_i[t].data() + q * k, buf);
  });
  if (t_max == 1) return;
  part_s.resize(used);
  part_i.resize(used);
  parallel_ranges(m, 64, threads, [&](int, int64_t q0, int64_t q1) {
    merge_sorted(part_s, part_i, q0, q1, k, scores, index);
  });
}

void topk_update(const float* q, int64_t m, const PoolView& pool, const Layout& lay, int64_t k,
                 int64_t index_offset, float* scores, int64_t* index, int threads, Split split,
                 int64_t* bad) {
  const int64_t n = pool.n;
  if (m <= FEW) {
    topk_pool_split(m, n, 1024, threads, k, scores, index, [&](TopK& heaps, int64_t p0, int64_t p1) {
      sweep_rows(q, m, pool, lay, p0, p1, bad, [&](int64_t pos, const float* row) {
        for (int64_t i = 0; i < m; ++i)
          if (row[i] >= heaps.threshold(i)) heaps.push(i, row[i], index_offset + pos);
      });
    });
    return;
  }
  const std::vector<float> qpack = pack_queries(q, m, lay, threads);
  const int64_t qpanels = (m + MR - 1) / MR;
  const int64_t nb_items = pool_block_items(lay.width);
  const bool by_queries =
      split == Split::queries ||
      (split == Split::automatic && threads > 1 && n < threads * POOL_PER_THREAD && qpanels >= 2 * threads);
  if (by_queries) {
    parallel_ranges(qpanels, 1, threads, [&](int, int64_t i0, int64_t i1) {
      const int64_t q0 = i0 * MR, q1 = std::min<int64_t>(m, i1 * MR);
      TopK heaps;
      heaps.init(q1 - q0, k);
      heaps.seed(scores + q0 * k, index + q0 * k);
      sweep_panels(qpack.data(), m, i0, i1, pool, lay, 0, n, heaps, q0, index_offset, bad);
      std::vector<std::pair<float, int64_t>> buf;
      for (int64_t r = 0; r < q1 - q0; ++r)
        write_sorted(heaps, r, scores + (q0 + r) * k, index + (q0 + r) * k, buf);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(NR, std::min<int64_t>(nb_items, 4 * NR));
  topk_pool_split(m, n, grain, threads, k, scores, index, [&](TopK& heaps, int64_t p0, int64_t p1) {
    sweep_panels(qpack.data(), m, 0, qpanels, pool, lay, p0, p1, heaps, 0, index_offset, bad);
  });
}

// The pool sweep below repeats topk_update's on purpose: factoring both into one
// template with a per-tile callback cost ~20% of topk_update's speed (GCC 12 kept
// the tile in memory across the call), measured with 2 threads at M=1000, D=1920.
void similarity(const float* q, int64_t m, const PoolView& pool, const Layout& lay,
                float* out, int threads, int64_t* bad) {
  const int64_t n = pool.n;
  if (m <= FEW) {
    parallel_ranges(n, 1024, threads, [&](int, int64_t p0, int64_t p1) {
      sweep_rows(q, m, pool, lay, p0, p1, bad, [&](int64_t pos, const float* row) {
        for (int64_t i = 0; i < m; ++i) out[i * n + pos] = row[i];
      });
    });
    return;
  }
  const int64_t max_w = *std::max_element(lay.widths.begin(), lay.widths.end());
  const std::vector<float> qpack = pack_queries(q, m, lay, threads);
  const int64_t qpanels = (m + MR - 1) / MR;
  const int64_t nb_items = pool_block_items(lay.width);
  parallel_ranges(n, NR, threads, [&](int, int64_t p0, int64_t p1) {
    std::vector<float> bpack(static_cast<size_t>(((nb_items + NR - 1) / NR) * NR * lay.width));
    std::vector<float> tmp(static_cast<size_t>(max_w));
    alignas(64) float row[NR];
    for (int64_t b0 = p0; b0 < p1; b0 += nb_items) {
      const int64_t items = std::min<int64_t>(nb_items, p1 - b0);
      const int64_t panels = (items + NR - 1) / NR;
      for (int64_t c = 0; c < panels; ++c)
        pack_pool_panel(pool, b0 + c * NR, std::min<int64_t>(NR, items - c * NR), lay,
                        bpack.data() + c * NR * lay.width, tmp, bad);
      for (int64_t i = 0; i < qpanels; ++i) {
        const int rows = static_cast<int>(std::min<int64_t>(MR, m - i * MR));
        for (int64_t c = 0; c < panels; ++c) {
          Tile t;
          tile_scores(qpack.data() + i * MR * lay.width, bpack.data() + c * NR * lay.width, lay, t);
          const int cols = static_cast<int>(std::min<int64_t>(NR, items - c * NR));
          for (int r = 0; r < rows; ++r) {
#pragma GCC unroll 4
            for (int v = 0; v < NRV; ++v) std::memcpy(row + v * VW, &t.v[r][v], sizeof(vf));
            std::memcpy(out + (i * MR + r) * n + b0 + c * NR, row, cols * sizeof(float));
          }
        }
      }
    }
  });
}

extern const Kernels kernels = {&topk_update, &similarity, MR, NR, PYFK_ISA_NAME};

}  // namespace PYFK_ISA
}  // namespace pyfk

#ifdef PYFK_TARGET
#pragma GCC pop_options
#endif
