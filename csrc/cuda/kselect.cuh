// Exact k-selection on the GPU in pyfk's int64 key space (see
// pyfk/engine/topk_state.py, the one spec): key = ordered_float_bits(score) * 2^32 + (2^32 - 2 - index),
// where ordered_float_bits maps float order to signed int32 order (-0 folded into +0).
// A larger key is a larger score, or the same score at a smaller index, so "the k
// largest keys" is "the k best scores, ties to the smaller index", and a row of keys
// sorted descending is the sorted top-k state.
//
// This header is plain C++ (no CUDA headers): the pybind11 bindings include it and are
// compiled by the host compiler. Streams travel as void* (a cudaStream_t); every entry
// point launches asynchronously on that stream and returns a cudaError_t as int (0 = ok).
#pragma once

#include <cstdint>

namespace pyfk {
namespace cuda {

constexpr int kMaxK = 1024;
// pack_keys(-inf, -1): what an empty slot of the (M, k) state holds.
constexpr int64_t kEmptyKey = static_cast<int64_t>(0x807FFFFFFFFFFFFFull);
// Largest index a key can carry (low word 0 is index 2^32 - 2).
constexpr int64_t kMaxIndex = 4294967294LL;

// Per row r of a (rows, n) float32 score matrix (row stride ld >= n elements), the k
// largest keys of (scores[r, c], index_offset + c), sorted descending, into out (rows, k)
// contiguous. With init (rows, k) sorted keys (may alias out), the result is the top-k
// of init's row and the new scores: a fused running top-k update. Rows with fewer than
// k candidates are padded with kEmptyKey. Requires 1 <= k <= kMaxK and
// index_offset + n - 1 <= kMaxIndex.
int select_topk_f32(const float* scores, int64_t rows, int64_t n, int64_t ld, int k, int64_t index_offset,
                    const int64_t* init, int64_t* out, void* stream);

// The same for a (rows, n) matrix of already packed int64 keys.
int select_topk_keys(const int64_t* keys, int64_t rows, int64_t n, int64_t ld, int k, const int64_t* init,
                     int64_t* out, void* stream);

// out = top-k of the union of two (rows, k) key lists, each sorted descending; exact
// merge (out may alias a or b).
int merge_keys(const int64_t* a, const int64_t* b, int64_t rows, int k, int64_t* out, void* stream);

// keys (count) -> scores float32 and index int64 (empty slots: -inf, -1).
int unpack_keys(const int64_t* keys, int64_t count, float* scores, int64_t* index, void* stream);

// Host-side helpers.
const char* error_string(int code);
int device_count();  // 0 when no device or no driver
// Dynamic shared memory (bytes) select_topk uses for a given k.
int64_t select_shared_bytes(int k);

}  // namespace cuda
}  // namespace pyfk
