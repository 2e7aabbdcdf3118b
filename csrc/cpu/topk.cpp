// fastkd::topk_fwd on the CPU: each row's top-k logits and their log-probs at temperature T,
// the exact log-mass of the rest, in one pass over the row (docs/design.md, "Teacher top-k").
//
//   topk_fwd(logits [N, V], k, temperature)
//     -> (ids [N, k] int64, logprobs [N, k] float32, tail [N] float32, stats [N, 2] float32)
//
// The definition is fastkd.core.topk.topk_rows: ids by descending raw logit, ties to the lower id
// (NaN ranks as -inf); logprobs = (x - M) / T - log z; tail = log(sum over the non-members of
// exp((x - M) / T)) - log z; stats = (M, log z), M the raw row maximum (shift 0 when it is -inf).
//
// Per row, in chunks of 2048 columns: (1) the chunk's raw maximum (vectorised) moves the running
// maximum and rescales the running sums z and tail; (2) only when the heap of the best k is not
// full yet or the chunk's maximum beats its worst entry (the current k-th value), a scalar scan
// pushes the chunk's candidates into the heap; an entry pushed out, or a candidate that lost to
// entries pushed earlier in the same scan, adds its exp to tail; (3) a vectorised pass adds every
// exp to z and those at or below the k-th value at the chunk's start to tail. A later column
// that equals the k-th value loses the tie (its id is larger), so "at or below" is exact. Every
// non-member is thus summed into tail exactly once: no `log(z - sum over the members)`, which
// cancels when the top-k hold nearly all the mass. On random rows the heap is touched by about
// k log(V / k) columns; most chunks cost the two vectorised passes only.
//
// Input rows: float32 (read in place), bfloat16 or float16 (converted per row into a per-thread
// buffer), unit column stride, any row stride. k <= kTopkMax (fastkd.core.topk.TOPK_MAX).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "row_buffers.h"
#include "vec_exp.h"

namespace fastkd {
namespace {

constexpr int64_t kTopkMax = 1024;  // fastkd.core.topk.TOPK_MAX
constexpr int64_t kTopkChunk = 2048;

struct Entry {
  float x;     // the logit, NaN read as -inf
  int64_t id;  // its column
};

// a ranks before b: larger value, then lower id. A strict weak order (no NaN reaches it).
inline bool ranks_before(const Entry& a, const Entry& b) { return a.x > b.x || (a.x == b.x && a.id < b.id); }

inline float rank_value(float x) { return x != x ? -INFINITY : x; }

// The raw maximum of n values; NaN is skipped (-inf for an empty or all-NaN span).
FASTKD_CPU_CLONES float span_max(const float* x, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// z += sum exp((x - base) / T) and tail += the same over the values <= thr (NaN: into z only).
FASTKD_CPU_CLONES void span_sums(const float* x, int64_t n, float base, float inv_t, float thr, float& z_out,
                                 float& tail_out) {
  float z = 0.0f, tail = 0.0f;
#pragma omp simd reduction(+ : z, tail)
  for (int64_t j = 0; j < n; ++j) {
    const float e = vexp((x[j] - base) * inv_t);
    z += e;
    tail += x[j] <= thr ? e : 0.0f;
  }
  z_out = z;
  tail_out = tail;
}

// One row: the best k in `heap` (worst at the front while filling; sorted best first on return).
void topk_row(const float* x, int64_t V, int64_t k, float inv_t, std::vector<Entry>& heap, int64_t* ids,
              float* logprobs, float* tail_out, float* stats) {
  heap.clear();
  float M = -INFINITY;
  double z = 0.0, tail = 0.0;
  for (int64_t c0 = 0; c0 < V; c0 += kTopkChunk) {
    const int64_t n = std::min(kTopkChunk, V - c0);
    const float* xc = x + c0;
    const float cm = span_max(xc, n);
    if (cm > M) {
      if (M != -INFINITY) {  // before, z = tail = 0: nothing to rescale
        const double a = std::exp(static_cast<double>((M - cm) * inv_t));
        z *= a;
        tail *= a;
      }
      M = cm;
    }
    const float base = M == -INFINITY ? 0.0f : M;
    const bool full = static_cast<int64_t>(heap.size()) == k;
    const float thr0 = full ? heap.front().x : -INFINITY;  // -inf: the vector pass adds only exps of 0
    if (!full || cm > thr0) {
      for (int64_t j = 0; j < n; ++j) {
        const Entry e{rank_value(xc[j]), c0 + j};
        if (static_cast<int64_t>(heap.size()) < k) {
          heap.push_back(e);
          std::push_heap(heap.begin(), heap.end(), ranks_before);
        } else if (e.x > heap.front().x) {  // equal values lose: every id in the heap is lower
          std::pop_heap(heap.begin(), heap.end(), ranks_before);
          tail += vexp((heap.back().x - base) * inv_t);  // pushed out: now a non-member
          heap.back() = e;
          std::push_heap(heap.begin(), heap.end(), ranks_before);
        } else if (xc[j] > thr0) {  // a non-member the vector pass below does not count
          tail += vexp((xc[j] - base) * inv_t);
        }
      }
    }
    float zc, tc;
    span_sums(xc, n, base, inv_t, thr0, zc, tc);
    z += zc;
    tail += tc;
  }
  std::sort_heap(heap.begin(), heap.end(), ranks_before);  // best first
  const float log_z = static_cast<float>(std::log(z));
  for (int64_t j = 0; j < k; ++j) {
    ids[j] = heap[j].id;
    logprobs[j] = (x[heap[j].id] - M) * inv_t - log_z;  // NaN where M = -inf (as log_softmax)
  }
  *tail_out = static_cast<float>(std::log(tail)) - log_z;
  stats[0] = M;
  stats[1] = log_z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_fwd_cpu(const at::Tensor& logits, int64_t k,
                                                                        double temperature) {
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 &&
                  (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) &&
                  (logits.size(1) <= 1 || logits.stride(1) == 1),
              "fastkd: logits must be a float32, bfloat16 or float16 2-D CPU tensor with unit column stride, got ",
              dtype, " ", logits.sizes(), " strides ", logits.strides(), " on ", logits.device());
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= V && k <= kTopkMax, "fastkd: k must be in [1, min(V, ", kTopkMax, ")] with V = ",
                    V, ", got ", k);
  TORCH_CHECK_VALUE(temperature > 0.0, "fastkd: temperature must be > 0, got ", temperature);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor ids = at::empty({N, k}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({N, k}, f32), tail = at::empty({N}, f32), stats = at::empty({N, 2}, f32);
  const float inv_t = static_cast<float>(1.0 / temperature);
  int64_t* id_out = ids.mutable_data_ptr<int64_t>();
  float* lp_out = logprobs.mutable_data_ptr<float>();
  float* tail_out = tail.mutable_data_ptr<float>();
  float* stats_out = stats.mutable_data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / V), [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    std::vector<Entry> heap;
    heap.reserve(k);
    for (int64_t i = begin; i < end; ++i) {
      const float* x = input_span(logits, i * logits.stride(0), V, buf);
      topk_row(x, V, k, inv_t, heap, id_out + i * k, lp_out + i * k, tail_out + i, stats_out + 2 * i);
    }
  });
  return {ids, logprobs, tail, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("topk_fwd", &topk_fwd_cpu); }

}  // namespace fastkd
