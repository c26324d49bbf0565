// pybind11 module pyfk._C_cuda: CUDA k-selection on raw device pointers.
//
// Pointers and streams are Python ints (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream); every call launches asynchronously on the
// given stream, on the calling thread's current CUDA device, and returns at once. The
// caller keeps the buffers alive and on the right device (pyfk/kernels/cuda_select.py).
// Bad arguments raise ValueError (std::invalid_argument); launch failures RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kselect.cuh"

namespace py = pybind11;
namespace kc = pyfk::cuda;

namespace {

void* as_ptr(std::uint64_t p) { return reinterpret_cast<void*>(static_cast<std::uintptr_t>(p)); }

void require_ptr(std::uint64_t p, const char* name) {
  if (p == 0) throw std::invalid_argument(std::string(name) + ": expected a non-null device pointer");
}

int check_k(int64_t k) {
  if (k < 1 || k > kc::kMaxK)
    throw std::invalid_argument("k: expected 1 <= k <= " + std::to_string(kc::kMaxK) + ", got " +
                                std::to_string(k));
  return static_cast<int>(k);
}

void check_rows(int64_t rows) {
  if (rows < 0 || rows > 2147483647LL)
    throw std::invalid_argument("rows: expected 0 <= rows < 2^31, got " + std::to_string(rows));
}

int64_t check_n_ld(int64_t n, int64_t ld) {
  if (n < 0) throw std::invalid_argument("n: expected n >= 0, got " + std::to_string(n));
  if (ld < 0) ld = n;  // default: contiguous rows
  if (ld < n)
    throw std::invalid_argument("ld: expected a row stride >= n = " + std::to_string(n) + ", got " +
                                std::to_string(ld));
  return ld;
}

void check_launch(int code, const char* what) {
  if (code != 0) throw std::runtime_error(std::string(what) + ": CUDA error: " + kc::error_string(code));
}

void select_topk(std::uint64_t scores, int64_t rows, int64_t n, int64_t k, std::uint64_t out, std::uint64_t stream,
                 int64_t ld, int64_t index_offset, std::uint64_t init) {
  const int kk = check_k(k);
  check_rows(rows);
  ld = check_n_ld(n, ld);
  if (index_offset < 0 || (n > 0 && index_offset > kc::kMaxIndex - (n - 1)))
    throw std::invalid_argument("index_offset: expected 0 <= index_offset and index_offset + n - 1 <= 2^32 - 2");
  if (rows == 0) return;
  if (n > 0) require_ptr(scores, "scores_ptr");
  require_ptr(out, "out_keys_ptr");
  int code;
  {
    py::gil_scoped_release release;
    code = kc::select_topk_f32(static_cast<const float*>(as_ptr(scores)), rows, n, ld, kk, index_offset,
                               static_cast<const int64_t*>(as_ptr(init)), static_cast<int64_t*>(as_ptr(out)),
                               as_ptr(stream));
  }
  check_launch(code, "select_topk");
}

void select_topk_keys(std::uint64_t keys, int64_t rows, int64_t n, int64_t k, std::uint64_t out,
                      std::uint64_t stream, int64_t ld, std::uint64_t init) {
  const int kk = check_k(k);
  check_rows(rows);
  ld = check_n_ld(n, ld);
  if (rows == 0) return;
  if (n > 0) require_ptr(keys, "keys_ptr");
  require_ptr(out, "out_keys_ptr");
  int code;
  {
    py::gil_scoped_release release;
    code = kc::select_topk_keys(static_cast<const int64_t*>(as_ptr(keys)), rows, n, ld, kk,
                                static_cast<const int64_t*>(as_ptr(init)), static_cast<int64_t*>(as_ptr(out)),
                                as_ptr(stream));
  }
  check_launch(code, "select_topk_keys");
}

void merge_keys(std::uint64_t a, std::uint64_t b, int64_t rows, int64_t k, std::uint64_t out, std::uint64_t stream) {
  const int kk = check_k(k);
  check_rows(rows);
  if (rows == 0) return;
  require_ptr(a, "a_ptr");
  require_ptr(b, "b_ptr");
  require_ptr(out, "out_ptr");
  int code;
  {
    py::gil_scoped_release release;
    code = kc::merge_keys(static_cast<const int64_t*>(as_ptr(a)), static_cast<const int64_t*>(as_ptr(b)), rows, kk,
                          static_cast<int64_t*>(as_ptr(out)), as_ptr(stream));
  }
  check_launch(code, "merge_keys");
}

void unpack_keys(std::uint64_t keys, int64_t count, std::uint64_t scores, std::uint64_t index, std::uint64_t stream) {
  if (count < 0) throw std::invalid_argument("count: expected count >= 0, got " + std::to_string(count));
  if (count == 0) return;
  require_ptr(keys, "keys_ptr");
  require_ptr(scores, "scores_ptr");
  require_ptr(index, "index_ptr");
  int code;
  {
    py::gil_scoped_release release;
    code = kc::unpack_keys(static_cast<const int64_t*>(as_ptr(keys)), count, static_cast<float*>(as_ptr(scores)),
                           static_cast<int64_t*>(as_ptr(index)), as_ptr(stream));
  }
  check_launch(code, "unpack_keys");
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "pyfk CUDA k-selection: exact top-k and merge of packed int64 keys on raw device pointers";
  m.attr("MAX_K") = kc::kMaxK;
  m.attr("EMPTY_KEY") = kc::kEmptyKey;
  m.attr("MAX_INDEX") = kc::kMaxIndex;
  m.def("select_topk", &select_topk,
        "Per row, the k largest keys of (scores[r, c], index_offset + c) from a (rows, n) float32 matrix, "
        "sorted descending, into out (rows, k) int64; init_ptr: a (rows, k) sorted state to merge into "
        "(may equal out_keys_ptr).",
        py::arg("scores_ptr"), py::arg("rows"), py::arg("n"), py::arg("k"), py::arg("out_keys_ptr"),
        py::arg("stream") = 0, py::kw_only(), py::arg("ld") = -1, py::arg("index_offset") = 0,
        py::arg("init_ptr") = 0);
  m.def("select_topk_keys", &select_topk_keys,
        "select_topk for a (rows, n) matrix of packed int64 keys.", py::arg("keys_ptr"), py::arg("rows"),
        py::arg("n"), py::arg("k"), py::arg("out_keys_ptr"), py::arg("stream") = 0, py::kw_only(),
        py::arg("ld") = -1, py::arg("init_ptr") = 0);
  m.def("merge_keys", &merge_keys,
        "out (rows, k) = top-k of two (rows, k) sorted key lists, sorted descending (out may alias a or b).",
        py::arg("a_ptr"), py::arg("b_ptr"), py::arg("rows"), py::arg("k"), py::arg("out_ptr"),
        py::arg("stream") = 0);
  m.def("unpack_keys", &unpack_keys, "keys (count,) int64 -> scores float32 and index int64.", py::arg("keys_ptr"),
        py::arg("count"), py::arg("scores_ptr"), py::arg("index_ptr"), py::arg("stream") = 0);
  m.def("device_count", &kc::device_count, "CUDA devices the runtime sees (0 without a driver).");
  m.def("select_shared_bytes", &kc::select_shared_bytes, py::arg("k"),
        "Dynamic shared memory per block of select_topk for this k.");
}
