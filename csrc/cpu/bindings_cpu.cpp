// pybind11 module pyfk._C: buffers in, buffers out (no libtorch ABI).
// The GIL is released around every kernel call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>

#include "kernel_api.hpp"
#include "thread_pool.hpp"

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
    // Every feature named in kernel_avx512.cpp's PYFK_TARGET.
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  if (std::string(feature) == "avx2")  // every feature named in kernel_avx2.cpp's PYFK_TARGET
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
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

pyfk::Split split_mode(const std::string& split) {
  if (split == "auto") return pyfk::Split::automatic;
  if (split == "pool") return pyfk::Split::pool;
  if (split == "queries") return pyfk::Split::queries;
  throw std::invalid_argument("split: expected 'auto', 'pool' or 'queries', got '" + split + "'");
}

int thread_count(int threads) {
  if (threads > 0) return threads;
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

void check_queries(const farray& q, int64_t width) {
  if (q.ndim() != 2 || q.shape(1) != width)
    throw std::invalid_argument("queries: expected a (M, " + std::to_string(width) +
                                ") float32 C-contiguous array");
}

pyfk::Normalize parse_normalize(const std::string& mode) {
  if (mode == "none") return pyfk::Normalize::none;
  if (mode == "pcc") return pyfk::Normalize::pcc;
  if (mode == "l2") return pyfk::Normalize::l2;
  throw std::invalid_argument("normalize: expected 'pcc', 'l2' or 'none', got '" + mode + "'");
}

// Pool segments: 2-D float32/float16 arrays with unit column stride (row stride
// free, so column slices of one matrix work), all with the same row count.
struct PoolArgs {
  pyfk::PoolView view;
  std::vector<int64_t> widths;
  std::vector<py::array> keep;  // hold references while the kernel runs
};

PoolArgs pool_args(const py::list& segments, const py::object& rows, const std::string& normalize) {
  PoolArgs out;
  int64_t n_rows = -1;
  for (size_t s = 0; s < segments.size(); ++s) {
    const std::string name = "pool segment " + std::to_string(s);
    if (!py::isinstance<py::array>(segments[s]))
      throw std::invalid_argument(name + ": expected a NumPy array");
    py::array a = py::reinterpret_borrow<py::array>(segments[s]);
    if (a.ndim() != 2) throw std::invalid_argument(name + ": expected a 2-D array");
    pyfk::Segment seg;
    // by kind and size, not dtype identity: an unpickled or copied float32 dtype is another object
    const std::string order = py::str(a.dtype().attr("byteorder"));
    if (order != "=" && order != "|")
      throw std::invalid_argument(name + ": expected native byte order, got " + std::string(py::str(a.dtype())));
    if (a.dtype().kind() == 'f' && a.dtype().itemsize() == 4) {
      seg.dtype = pyfk::DType::f32;
    } else if (a.dtype().kind() == 'f' && a.dtype().itemsize() == 2) {
      seg.dtype = pyfk::DType::f16;
    } else {
      throw std::invalid_argument(name + ": expected float32 or float16, got " +
                                  std::string(py::str(a.dtype())));
    }
    const int64_t item = a.itemsize();
    if (a.shape(1) > 1 && a.strides(1) != item)
      throw std::invalid_argument(name + ": expected unit column stride");
    if (a.strides(0) % item || a.strides(0) < 0)
      throw std::invalid_argument(name + ": expected a positive row stride in whole elements");
    if (n_rows >= 0 && a.shape(0) != n_rows)
      throw std::invalid_argument(name + ": expected " + std::to_string(n_rows) + " rows");
    n_rows = a.shape(0);
    seg.data = a.data();
    seg.ld = a.strides(0) / item;
    out.view.segs.push_back(seg);
    out.widths.push_back(a.shape(1));
    out.keep.push_back(a);
  }
  out.view.normalize = parse_normalize(normalize);
  out.view.n = n_rows < 0 ? 0 : n_rows;
  if (!rows.is_none()) {
    iarray r = rows.cast<iarray>();
    if (r.ndim() != 1) throw std::invalid_argument("rows: expected a 1-D int64 array");
    const int64_t* p = r.data();
    for (int64_t i = 0; i < r.shape(0); ++i)
      if (p[i] < 0 || p[i] >= n_rows) throw std::invalid_argument("rows: index out of range");
    out.view.rows = p;
    out.view.n = r.shape(0);
    out.keep.push_back(r);
  }
  return out;
}

// Per pool segment, the smallest position whose raw row the kernel found NaN or Inf in,
// or -1: `bad` as the kernels filled it (see kernel_api.hpp), as a Python list.
std::vector<int64_t> bad_slots(size_t segments) {
  return std::vector<int64_t>(segments, std::numeric_limits<int64_t>::max());
}

py::list bad_positions(const std::vector<int64_t>& bad) {
  py::list out;
  for (int64_t b : bad) out.append(b == std::numeric_limits<int64_t>::max() ? int64_t{-1} : b);
  return out;
}

py::list topk_update(const farray& queries, const py::list& pool, const py::object& rows,
                 const std::string& normalize, bool product, int64_t index_offset, farray scores,
                 iarray index, int threads, const std::string& isa, const std::string& split) {
  const pyfk::Split how = split_mode(split);
  PoolArgs args = pool_args(pool, rows, normalize);
  const Layout lay = make_layout(args.widths, product);
  check_queries(queries, lay.width);
  const int64_t m = queries.shape(0);
  if (scores.ndim() != 2 || scores.shape(0) != m || index.ndim() != 2 || index.shape(0) != m ||
      index.shape(1) != scores.shape(1) || scores.shape(1) < 1)
    throw std::invalid_argument("scores/index: expected (M, k) float32 / int64 state arrays");
  const int64_t k = scores.shape(1);
  const Kernels& kern = pick(isa);
  const float* q = queries.data();
  float* s = scores.mutable_data();
  int64_t* ix = index.mutable_data();
  const int t = thread_count(threads);
  std::vector<int64_t> bad = bad_slots(args.view.segs.size());
  if (args.view.n > 0) {
    py::gil_scoped_release release;
    kern.topk_update(q, m, args.view, lay, k, index_offset, s, ix, t, how, bad.data());
  }
  return bad_positions(bad);
}

py::list similarity(const farray& queries, const py::list& pool, const std::string& normalize,
                bool product, farray out, int threads, const std::string& isa) {
  PoolArgs args = pool_args(pool, py::none(), normalize);
  const Layout lay = make_layout(args.widths, product);
  check_queries(queries, lay.width);
  const int64_t m = queries.shape(0), n = args.view.n;
  if (out.ndim() != 2 || out.shape(0) != m || out.shape(1) != n)
    throw std::invalid_argument("out: expected an (M, N) float32 array");
  const Kernels& kern = pick(isa);
  const float* q = queries.data();
  float* o = out.mutable_data();
  const int t = thread_count(threads);
  std::vector<int64_t> bad = bad_slots(args.view.segs.size());
  if (n > 0) {
    py::gil_scoped_release release;
    kern.similarity(q, m, args.view, lay, o, t, bad.data());
  }
  return bad_positions(bad);
}

py::list isas() {
  py::list out;
  for (const char* name : {"avx512", "avx2", "generic"})
    if (cpu_has(name)) out.append(name);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfk fused CPU kernels (C++17, persistent worker pool, AVX-512/AVX2/SSE2 variants)";
  m.def("topk_update", &topk_update, py::arg("queries"), py::arg("pool"), py::arg("rows"),
        py::arg("normalize"), py::arg("product"), py::arg("index_offset"), py::arg("scores").noconvert(),
        py::arg("index").noconvert(), py::arg("threads") = 0, py::arg("isa") = "auto",
        py::arg("split") = "auto",
        "Merge the top-k of normalised queries (M, D) x pool segments into the sorted (M, k)\n"
        "state arrays in place; pool rows are gathered (rows), converted and normalised\n"
        "while packed. Result index = index_offset + pool position. Returns, per pool segment,\n"
        "the first position whose raw row holds NaN or Inf, or -1 (the state is then not valid).\n"
        "split: 'pool' (threads take pool ranges, heaps merged), 'queries' (threads take query\n"
        "panels) or 'auto' (queries when the pool is small for the thread count).");
  m.def("similarity", &similarity, py::arg("queries"), py::arg("pool"), py::arg("normalize"),
        py::arg("product"), py::arg("out").noconvert(), py::arg("threads") = 0, py::arg("isa") = "auto",
        "Dense (M, N) similarity of normalised queries x pool segments (normalised while packed)\n"
        "into `out`. Returns per pool segment the first non-finite position, or -1, like topk_update.");
  m.def("isas", &isas, "Instruction sets this CPU can run, fastest first.");
  m.def("pool_workers", &pyfk::pool_workers, "Worker threads the persistent pool has started.");
  m.def("isa_default", []() { return std::string(pick("auto").isa); });
}
