// pybind11 module pyfk._C: buffers in, buffers out (no libtorch ABI).
// The GIL is released around every kernel call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <thread>

#include "cpu/kernel_api.hpp"

namespace py = pybind11;
using pyfk::Kernels;
using pyfk::Layout;

namespace {

using farray = py::array_t<float, py::array::c_style>;
using iarray = py::array_t<int64_t, py::array::c_style>;

bool cpu_has(const char* feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (std::string(feature) == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  if (std::string(feature) == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::string(feature) == "generic";
}

const Kernels& pick(const std::string& isa) {
  if (isa == "auto") {
    if (cpu_has("avx512")) return pyfk::avx512::kernels;
    if (cpu_has("avx2")) return pyfk::avx2::kernels;
    return pyfk::generic::kernels;
  }
  if (isa != "avx512" && isa != "avx2" && isa != "generic")
    throw std::invalid_argument("isa: expected 'auto', 'avx512', 'avx2' or 'generic', got '" + isa + "'");
  if (!cpu_has(isa.c_str()))
    throw std::invalid_argument("isa: this CPU does not support '" + isa + "'");
  if (isa == "avx512") return pyfk::avx512::kernels;
  if (isa == "avx2") return pyfk::avx2::kernels;
  return pyfk::generic::kernels;
}

Layout make_layout(const std::vector<int64_t>& widths, bool product) {
  Layout lay;
  lay.widths = widths;
  lay.product = product;
  if (widths.empty()) throw std::invalid_argument("widths: expected at least one segment");
  if (product && widths.size() % 2) throw std::invalid_argument("widths: product mode needs (z, g) pairs");
  for (int64_t w : widths) {
    if (w <= 0) throw std::invalid_argument("widths: every segment width must be positive");
    lay.offsets.push_back(lay.width);
    lay.width += w;
  }
  return lay;
}

int thread_count(int threads) {
  if (threads > 0) return threads;
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

void check_matrix(const farray& a, const char* name, int64_t width) {
  if (a.ndim() != 2 || a.shape(1) != width)
    throw std::invalid_argument(std::string(name) + ": expected a (rows, " + std::to_string(width) +
                                ") float32 C-contiguous array");
}

void topk_update(const farray& queries, const farray& pool, const std::vector<int64_t>& widths,
                 bool product, int64_t index_offset, farray scores, iarray index, int threads,
                 const std::string& isa) {
  const Layout lay = make_layout(widths, product);
  check_matrix(queries, "queries", lay.width);
  check_matrix(pool, "pool", lay.width);
  const int64_t m = queries.shape(0), n = pool.shape(0);
  if (scores.ndim() != 2 || scores.shape(0) != m || index.ndim() != 2 || index.shape(0) != m ||
      index.shape(1) != scores.shape(1) || scores.shape(1) < 1)
    throw std::invalid_argument("scores/index: expected (M, k) float32 / int64 state arrays");
  const int64_t k = scores.shape(1);
  const Kernels& kern = pick(isa);
  const float* q = queries.data();
  const float* p = pool.data();
  float* s = scores.mutable_data();
  int64_t* ix = index.mutable_data();
  const int t = thread_count(threads);
  py::gil_scoped_release release;
  kern.topk_update(q, m, p, n, lay, k, index_offset, s, ix, t);
}

void similarity(const farray& queries, const farray& pool, const std::vector<int64_t>& widths,
                bool product, farray out, int threads, const std::string& isa) {
  const Layout lay = make_layout(widths, product);
  check_matrix(queries, "queries", lay.width);
  check_matrix(pool, "pool", lay.width);
  const int64_t m = queries.shape(0), n = pool.shape(0);
  if (out.ndim() != 2 || out.shape(0) != m || out.shape(1) != n)
    throw std::invalid_argument("out: expected an (M, N) float32 array");
  const Kernels& kern = pick(isa);
  const float* q = queries.data();
  const float* p = pool.data();
  float* o = out.mutable_data();
  const int t = thread_count(threads);
  py::gil_scoped_release release;
  kern.similarity(q, m, p, n, lay, o, t);
}

py::list isas() {
  py::list out;
  for (const char* name : {"avx512", "avx2", "generic"})
    if (cpu_has(name)) out.append(name);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfk fused CPU kernels (C++17, std::thread, AVX-512/AVX2/SSE2 variants)";
  m.def("topk_update", &topk_update, py::arg("queries"), py::arg("pool"), py::arg("widths"),
        py::arg("product"), py::arg("index_offset"), py::arg("scores"), py::arg("index"),
        py::arg("threads") = 0, py::arg("isa") = "auto",
        "Merge the top-k of queries x pool into the sorted (M, k) state arrays in place.");
  m.def("similarity", &similarity, py::arg("queries"), py::arg("pool"), py::arg("widths"),
        py::arg("product"), py::arg("out"), py::arg("threads") = 0, py::arg("isa") = "auto",
        "Dense (M, N) similarity into `out` (small inputs only).");
  m.def("isas", &isas, "Instruction sets this CPU can run, fastest first.");
  m.def("isa_default", []() { return std::string(pick("auto").isa); });
}
