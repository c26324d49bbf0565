// Exact block-level k-selection and sorted-list merge in pyfk's int64 key space.
//
// select (one thread block per row):
//   shared memory holds  [0, k): the running top-k, sorted descending, and
//                        [k, cap): a candidate buffer.
//   The row is read in rounds of kRound = kThreads * kItems columns (coalesced). A
//   column whose key beats the threshold -- the k-th best key kept so far -- is appended
//   to the buffer (shared atomicAdd). When the buffer could not take another full round,
//   the block bitonic-sorts [0, next_pow2(k + count)) descending in shared memory: the
//   first k entries are the new top-k and entry k-1 the new threshold. A key at or below
//   the threshold can never enter the final top-k (k distinct keys already beat it), so
//   the result is exact; keys are distinct within a row (distinct indices), so it is
//   also deterministic. On random data the threshold rises quickly and almost nothing is
//   buffered after the first rounds, so the cost is one read of the row.
//   With `init` (the running state) the top-k starts from it: a fused state update.
//
// merge (one block per row): each element of a and b finds its output rank by a binary
// search in the other list (ties: a first), a stable merge; ranks < k are written.
//
// Correctness first; performance tuning (warp queues, vector loads, several rows per
// block for small n) belongs on a GPU with a profiler.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "kselect.cuh"

namespace pyfk {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // select: threads per block
constexpr int kItems = 4;      // select: columns per thread per round
constexpr int kRound = kThreads * kItems;
constexpr int kMergeThreads = 128;
constexpr int64_t kSentinel = LLONG_MIN;  // below every key; marks unused slots in shared memory

__host__ __device__ inline int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Shared-memory length of the select kernel: top-k plus room for two rounds.
__host__ __device__ inline int select_capacity(int k) { return next_pow2(k + 2 * kRound); }

__device__ inline int64_t pack_key(float score, int64_t index) {
  if (score == 0.0f) score = 0.0f;  // fold -0 into +0, as reference.pack_keys does
  int32_t bits = __float_as_int(score);
  if (bits < 0) bits ^= 0x7FFFFFFF;  // float order == signed int order
  const uint64_t hi = static_cast<uint64_t>(static_cast<uint32_t>(bits)) << 32;
  const uint64_t lo = static_cast<uint64_t>(kMaxIndex - index);  // in [0, 2^32 - 1] for index in [-1, kMaxIndex]
  return static_cast<int64_t>(hi | lo);  // == bits * 2^32 + lo in two's complement
}

struct FloatSource {
  const float* __restrict__ data;
  int64_t ld;
  int64_t index_offset;
  __device__ int64_t key(int64_t row, int64_t col) const {
    return pack_key(data[row * ld + col], index_offset + col);
  }
};

struct KeySource {
  const int64_t* __restrict__ data;
  int64_t ld;
  __device__ int64_t key(int64_t row, int64_t col) const { return data[row * ld + col]; }
};

// Sort a[0, len) descending; len a power of two; all threads of the block call it.
__device__ void bitonic_sort_desc(int64_t* a, int len) {
  for (int size = 2; size <= len; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < len / 2; t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1));  // bit `stride` of lo is 0
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;  // the last pass (size == len) is all descending
        const int64_t x = a[lo];
        const int64_t y = a[hi];
        if (desc ? (x < y) : (x > y)) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      __syncthreads();
    }
  }
}

// Fold the `count` buffered candidates into the top-k; all threads call it with the same count.
__device__ void flush(int64_t* buf, int k, int count, int* s_count, int64_t* s_threshold) {
  const int used = k + count;
  const int len = next_pow2(used);
  for (int i = used + threadIdx.x; i < len; i += blockDim.x) buf[i] = kSentinel;
  __syncthreads();
  bitonic_sort_desc(buf, len);
  if (threadIdx.x == 0) {
    *s_count = 0;
    *s_threshold = buf[k - 1];
  }
  __syncthreads();
}

template <typename Source>
__global__ void __launch_bounds__(kThreads) select_kernel(Source src, int64_t n, int k, int cap,
                                                           const int64_t* init, int64_t* out) {
  extern __shared__ int64_t buf[];  // [0, k): top-k, sorted descending; [k, cap): candidates
  __shared__ int s_count;
  __shared__ int64_t s_threshold;
  const int64_t row = blockIdx.x;

  for (int i = threadIdx.x; i < k; i += blockDim.x) buf[i] = init ? init[row * k + i] : kSentinel;
  if (threadIdx.x == 0) s_count = 0;
  __syncthreads();
  if (threadIdx.x == 0) s_threshold = buf[k - 1];
  __syncthreads();

  const int limit = cap - k - kRound;  // a buffer this full still takes one more round
  for (int64_t base = 0; base < n; base += kRound) {
    const int64_t threshold = s_threshold;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t col = base + j * kThreads + threadIdx.x;
      if (col < n) {
        const int64_t key = src.key(row, col);
        if (key > threshold) buf[k + atomicAdd(&s_count, 1)] = key;
      }
    }
    __syncthreads();
    const int count = s_count;
    __syncthreads();  // every thread has read s_count before anyone changes it
    if (count > limit) flush(buf, k, count, &s_count, &s_threshold);
  }
  const int count = s_count;  // stable: the loop ended on a barrier
  if (count > 0) {
    __syncthreads();
    flush(buf, k, count, &s_count, &s_threshold);
  }
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const int64_t v = buf[i];
    out[row * k + i] = v == kSentinel ? kEmptyKey : v;
  }
}

// Entries of the descending list a[0, len) that are > x (strict) or >= x.
__device__ inline int rank_greater(const int64_t* a, int len, int64_t x, bool or_equal) {
  int lo = 0, hi = len;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] > x || (or_equal && a[mid] == x)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const int64_t* a, const int64_t* b, int k,
                                                               int64_t* out) {
  extern __shared__ int64_t sm[];
  int64_t* sa = sm;
  int64_t* sb = sm + k;
  const int64_t row = blockIdx.x;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    sa[i] = a[row * k + i];
    sb[i] = b[row * k + i];
  }
  __syncthreads();  // all reads of a and b precede the writes: out may alias either
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const int pa = i + rank_greater(sb, k, sa[i], false);  // ties: the a entry first
    if (pa < k) out[row * k + pa] = sa[i];
    const int pb = i + rank_greater(sa, k, sb[i], true);
    if (pb < k) out[row * k + pb] = sb[i];
  }
}

__global__ void unpack_kernel(const int64_t* keys, int64_t count, float* scores, int64_t* index) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t key = static_cast<uint64_t>(keys[i]);
    int32_t bits = static_cast<int32_t>(static_cast<uint32_t>(key >> 32));
    if (bits < 0) bits ^= 0x7FFFFFFF;
    scores[i] = __int_as_float(bits);
    index[i] = kMaxIndex - static_cast<int64_t>(key & 0xFFFFFFFFull);
  }
}

template <typename Source>
int launch_select(Source src, int64_t rows, int64_t n, int k, const int64_t* init, int64_t* out, void* stream) {
  if (k < 1 || k > kMaxK || rows < 0 || n < 0 || rows > INT_MAX) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int cap = select_capacity(k);
  const size_t smem = static_cast<size_t>(cap) * sizeof(int64_t);
  select_kernel<Source><<<static_cast<unsigned>(rows), kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      src, n, k, cap, init, out);
  return cudaGetLastError();
}

}  // namespace

int select_topk_f32(const float* scores, int64_t rows, int64_t n, int64_t ld, int k, int64_t index_offset,
                    const int64_t* init, int64_t* out, void* stream) {
  if (ld < n || index_offset < 0 || (n > 0 && index_offset + n - 1 > kMaxIndex)) return cudaErrorInvalidValue;
  return launch_select(FloatSource{scores, ld, index_offset}, rows, n, k, init, out, stream);
}

int select_topk_keys(const int64_t* keys, int64_t rows, int64_t n, int64_t ld, int k, const int64_t* init,
                     int64_t* out, void* stream) {
  if (ld < n) return cudaErrorInvalidValue;
  return launch_select(KeySource{keys, ld}, rows, n, k, init, out, stream);
}

int merge_keys(const int64_t* a, const int64_t* b, int64_t rows, int k, int64_t* out, void* stream) {
  if (k < 1 || k > kMaxK || rows < 0 || rows > INT_MAX) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const size_t smem = 2 * static_cast<size_t>(k) * sizeof(int64_t);
  merge_kernel<<<static_cast<unsigned>(rows), kMergeThreads, smem, static_cast<cudaStream_t>(stream)>>>(a, b, k,
                                                                                                       out);
  return cudaGetLastError();
}

int unpack_keys(const int64_t* keys, int64_t count, float* scores, int64_t* index, void* stream) {
  if (count < 0) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (count + threads - 1) / threads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  unpack_kernel<<<grid, threads, 0, static_cast<cudaStream_t>(stream)>>>(keys, count, scores, index);
  return cudaGetLastError();
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return count;
}

int64_t select_shared_bytes(int k) {
  return static_cast<int64_t>(select_capacity(k)) * static_cast<int64_t>(sizeof(int64_t));
}

}  // namespace cuda
}  // namespace pyfk
