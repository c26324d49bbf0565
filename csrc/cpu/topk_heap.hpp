// Per-query running top-k as binary heaps whose root is the current worst
// entry. Order: higher score first, ties to the smaller pool index -- the order of
// the packed keys specified in pyfk/engine/topk_state.py (tests hold the two equal).
// Self-contained: it includes what it uses and puts everything in an anonymous
// namespace inside pyfk::PYFK_ISA, so each instruction-set file gets its own copy.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#ifndef PYFK_ISA
#error "define PYFK_ISA (the instruction-set namespace) before including topk_heap.hpp"
#endif

namespace pyfk {
namespace PYFK_ISA {
namespace {

inline bool better(float sa, int64_t ia, float sb, int64_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}

struct TopK {
  int64_t k = 0;
  std::vector<float> s;      // (m, k) heap scores
  std::vector<int64_t> id;   // (m, k) heap indices
  std::vector<int64_t> size; // entries used per query
  std::vector<float> thr;    // root score once full, -inf before

  void init(int64_t m, int64_t k_) {
    k = k_;
    s.assign(static_cast<size_t>(m * k), 0.0f);
    id.assign(static_cast<size_t>(m * k), -1);
    size.assign(static_cast<size_t>(m), 0);
    thr.assign(static_cast<size_t>(m), -std::numeric_limits<float>::infinity());
  }
  float threshold(int64_t q) const { return thr[q]; }

  // Offer (score, index) to query q's heap.
  void push(int64_t q, float score, int64_t index) {
    float* hs = s.data() + q * k;
    int64_t* hi = id.data() + q * k;
    int64_t n = size[q];
    if (n < k) {  // not full: sift up from the end
      int64_t c = n;
      while (c > 0) {
        int64_t parent = (c - 1) / 2;
        if (!better(hs[parent], hi[parent], score, index)) break;
        hs[c] = hs[parent];
        hi[c] = hi[parent];
        c = parent;
      }
      hs[c] = score;
      hi[c] = index;
      size[q] = n + 1;
      if (n + 1 == k) thr[q] = hs[0];
      return;
    }
    if (!better(score, index, hs[0], hi[0])) return;
    int64_t c = 0;  // replace the root and sift down
    for (;;) {
      int64_t l = 2 * c + 1;
      if (l >= k) break;
      int64_t w = l;
      if (l + 1 < k && better(hs[l], hi[l], hs[l + 1], hi[l + 1])) w = l + 1;
      if (!better(score, index, hs[w], hi[w])) break;
      hs[c] = hs[w];
      hi[c] = hi[w];
      c = w;
    }
    hs[c] = score;
    hi[c] = index;
    thr[q] = hs[0];
  }

  // Start from an existing sorted state; entries with index < 0 are empty.
  void seed(const float* scores, const int64_t* index) {
    const int64_t m = static_cast<int64_t>(size.size());
    for (int64_t q = 0; q < m; ++q)
      for (int64_t j = 0; j < k; ++j)
        if (index[q * k + j] >= 0) push(q, scores[q * k + j], index[q * k + j]);
  }
};

// Query q's entries of `heaps`, best first, into out_s/out_i (k slots; slots left
// empty get (-inf, -1)). `buf` is scratch space.
inline void write_sorted(const TopK& heaps, int64_t q, float* out_s, int64_t* out_i,
                         std::vector<std::pair<float, int64_t>>& buf) {
  const int64_t k = heaps.k, n = heaps.size[q];
  buf.clear();
  for (int64_t j = 0; j < n; ++j) buf.emplace_back(heaps.s[q * k + j], heaps.id[q * k + j]);
  std::sort(buf.begin(), buf.end(),
            [](const auto& a, const auto& b) { return better(a.first, a.second, b.first, b.second); });
  for (int64_t j = 0; j < k; ++j) {
    out_s[j] = j < n ? buf[j].first : -std::numeric_limits<float>::infinity();
    out_i[j] = j < n ? buf[j].second : -1;
  }
}

// Exact, tie-stable merge of T sorted (m, k) lists (as write_sorted leaves them, empty
// slots have index -1 and come last) into the sorted (m, k) outputs, rows [q0, q1).
inline void merge_sorted(const std::vector<std::vector<float>>& part_s,
                         const std::vector<std::vector<int64_t>>& part_i, int64_t q0, int64_t q1,
                         int64_t k, float* scores, int64_t* index) {
  const size_t parts = part_s.size();
  std::vector<int64_t> head(parts);
  for (int64_t q = q0; q < q1; ++q) {
    std::fill(head.begin(), head.end(), 0);
    for (int64_t j = 0; j < k; ++j) {
      int best = -1;
      for (size_t t = 0; t < parts; ++t) {
        const int64_t h = head[t];
        if (h >= k || part_i[t][q * k + h] < 0) continue;
        if (best < 0 || better(part_s[t][q * k + h], part_i[t][q * k + h], part_s[best][q * k + head[best]],
                               part_i[best][q * k + head[best]]))
          best = static_cast<int>(t);
      }
      if (best < 0) {
        scores[q * k + j] = -std::numeric_limits<float>::infinity();
        index[q * k + j] = -1;
      } else {
        scores[q * k + j] = part_s[best][q * k + head[best]];
        index[q * k + j] = part_i[best][q * k + head[best]];
        ++head[best];
      }
    }
  }
}

}  // namespace
}  // namespace PYFK_ISA
}  // namespace pyfk
