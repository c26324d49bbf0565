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

// Exact, tie-stable merge of per-thread heaps into sorted (m, k) outputs;
// slots that stay empty get (-inf, -1).
inline void merge_into(const std::vector<TopK>& parts, int64_t m, int64_t k, float* scores,
                       int64_t* index) {
  std::vector<std::pair<float, int64_t>> all;
  for (int64_t q = 0; q < m; ++q) {
    all.clear();
    for (const TopK& t : parts)
      for (int64_t j = 0; j < t.size[q]; ++j) all.emplace_back(t.s[q * k + j], t.id[q * k + j]);
    const int64_t take = std::min<int64_t>(k, static_cast<int64_t>(all.size()));
    std::partial_sort(all.begin(), all.begin() + take, all.end(),
                      [](const auto& a, const auto& b) {
                        return better(a.first, a.second, b.first, b.second);
                      });
    for (int64_t j = 0; j < k; ++j) {
      scores[q * k + j] = j < take ? all[j].first : -std::numeric_limits<float>::infinity();
      index[q * k + j] = j < take ? all[j].second : -1;
    }
  }
}

}  // namespace
}  // namespace PYFK_ISA
}  // namespace pyfk
