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

using TopkFn = void (*)(const float* q, int64_t m, const float* p, int64_t n, const Layout& lay,
                        int64_t k, int64_t index_offset, float* scores, int64_t* index,
                        int threads);
using SimilarityFn = void (*)(const float* q, int64_t m, const float* p, int64_t n,
                              const Layout& lay, float* out, int threads);

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
