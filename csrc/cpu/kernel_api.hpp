// Interface between the pybind11 module and the per-instruction-set kernels.
// Declarations only: anything defined here would be compiled with several sets
// of -m flags and could be picked by the linker for the wrong CPU.
#pragma once
#include <cstdint>
#include <vector>

namespace pyfk {

struct Layout {
  std::vector<int64_t> widths;   // segment widths w_s
  std::vector<int64_t> offsets;  // column offset of each segment
  int64_t width = 0;             // D = sum w_s (row stride of Q and P)
  bool product = true;           // pairs (z_j, g_j) multiplied, else plain dot
};

enum class DType : int { f32 = 0, f16 = 1 };
enum class Normalize : int { none = 0, pcc = 1, l2 = 2 };

// How topk_update shares work between threads: by pool range (per-thread heaps for every
// query, merged at the end), by query panels (each thread packs the whole pool, keeps only
// its own queries' heaps), or chosen by size (automatic).
enum class Split : int { automatic = 0, pool = 1, queries = 2 };

// One pool segment: row i, column c of the segment is data[(i * ld + c)] (in elements).
struct Segment {
  const void* data = nullptr;
  int64_t ld = 0;
  DType dtype = DType::f32;
};

// The pool as the kernels read it: raw segments (z_1, g_1, ... as given by the
// user, float32 or float16, any row stride), optionally a row list (pool row of
// position i is rows[i]), normalised per row and segment while being packed.
struct PoolView {
  std::vector<Segment> segs;
  const int64_t* rows = nullptr;  // null: position i is row i
  int64_t n = 0;                  // positions
  Normalize normalize = Normalize::none;
};

// `bad` (both kernels): one slot per pool segment, filled with INT64_MAX by the caller.
// The kernels test every raw pool row they read for NaN/Inf while converting it (before
// normalising) and lower bad[s] to the smallest position whose segment s is non-finite;
// such rows are scored as zeros, so the caller must raise, not use the results.
using TopkFn = void (*)(const float* q, int64_t m, const PoolView& pool, const Layout& lay,
                        int64_t k, int64_t index_offset, float* scores, int64_t* index,
                        int threads, Split split, int64_t* bad);
using SimilarityFn = void (*)(const float* q, int64_t m, const PoolView& pool,
                              const Layout& lay, float* out, int threads, int64_t* bad);

struct Kernels {
  TopkFn topk_update;
  SimilarityFn similarity;
  int mr;
  int nr;
  const char* isa;
};

namespace avx512 { extern const Kernels kernels; }
namespace avx2 { extern const Kernels kernels; }
namespace generic { extern const Kernels kernels; }

}  // namespace pyfk
