// ULD (Universal Logit Distillation) on the CPU: per row, sum_i |a_i - b_i| with a, b the student's
// and the teacher's probabilities sorted in descending order (the shorter zero-padded), the
// cross-entropy of the student at T = 1, and both gradients, without sorting either row.
//
// The identity (N_q(u) = #{c : q_c > u}): sum_i |a_i - b_i| = integral_0^1 |N_q(u) - N_p(u)| du.
// Per row (fastkd/losses/cross_tokenizer.py states the same algorithm in PyTorch):
//   1. softmax of each side (a max pass, an exp pass writing the exps, and the normalising pass,
//      which also builds per bucket (the top 4 mantissa bits and the exponent of the float: 16
//      buckets per octave) the count and the sum of each side);
//   2. per bucket, from the top: where the counts above it and in it decide the sign of
//      N_q - N_p across it, its integral |int N_q - int N_p| from the counts and sums, and that sign
//      is every gradient in it (+1 the dominant side, -1 the other);
//   3. the elements of the other buckets (where the counting functions may cross) are collected,
//      sorted by value, and integrated exactly segment by segment; their sign is that of N_q - N_p
//      just above them;
//   4. the gradients, w q (g - sum q g) / T (and the teacher's), over the kept probabilities.
// With log_probs (rows of log-probabilities taken as given, not renormalised: inputs="log_probs"), step 1
// is exp(min(x, 0)) and the gradients are w q g (no normaliser, no temperature).
// So three passes over the student row plus the gradient pass, two over the teacher's, one exp
// per element (two with a cross-entropy at T != 1), and a sort of the ambiguous elements only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "loss_common.h"

namespace fastkd {
namespace {

// Bucket keys: the exponent and the top 6 mantissa bits of the float (64 buckets per octave) for
// probabilities from 2^-60 to 1; everything below 2^-60 shares bucket 0, which is never refined: its
// term is taken as if the sign of N_q - N_p held across it (off by at most 2^-60 (count in it) < 1e-13).
constexpr int kSubBits = 6;
constexpr int kShift = 23 - kSubBits;
constexpr int kFloor = (127 - 60) << kSubBits;          // raw key of 2^-60
constexpr int kBuckets = ((128 << kSubBits) - kFloor);  // keys of the floats in [0, 2)

FASTKD_INLINE int bucket_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int raw = static_cast<int>(bits >> kShift);
  return raw > kFloor ? raw - kFloor : 0;
}

FASTKD_INLINE double edge(int k) {
  if (k == 0) return 0.0;
  const uint32_t bits = static_cast<uint32_t>(k + kFloor) << kShift;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct Ambiguous {
  float value;
  int32_t index;  // column; the side is in `student`
  bool student;
};

struct ULDScratch {
  std::vector<double> sum_q, sum_p, above_q, above_p;
  std::vector<int32_t> cnt_q, cnt_p;
  std::vector<float> factor_q, factor_p;
  std::vector<int32_t> sign;
  std::vector<Ambiguous> amb;
  std::vector<float> q, p;
};

// exps of x / T relative to each chunk's max into out (one read of the row: a chunk stays in L1 between
// its max and its exps); the row's max, min and sum relative to the max (NaN / 0 / inf: a bad row), and
// per chunk the factor exp((chunk max - row max) / T) that the normalising pass applies.
FASTKD_INLINE void softmax_exps(const float* x, int64_t n, float inv_t, float* out, std::vector<float>& factor,
                                float& m, float& mn, double& z) {
  const int64_t chunks = (n + kStatsChunk - 1) / kStatsChunk;
  factor.resize(2 * chunks);
  float row_max = -INFINITY, row_min = INFINITY;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* xc = x + c * kStatsChunk;
    float* oc = out + c * kStatsChunk;
    const int64_t len = std::min(kStatsChunk, n - c * kStatsChunk);
    float mx = -INFINITY, lo = INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : mx) reduction(min : lo)
    for (int64_t j = 0; j < len; ++j) mx = xc[j] > mx ? xc[j] : mx, lo = xc[j] < lo ? xc[j] : lo;
    const float shift = mx == -INFINITY ? 0.0f : mx;  // an all -inf chunk: exps 0, not NaN
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < len; ++j) {
      oc[j] = vexp((xc[j] - shift) * inv_t);
      sum += oc[j];
    }
    factor[2 * c] = mx, factor[2 * c + 1] = sum;
    row_max = std::max(row_max, mx), row_min = std::min(row_min, lo);
  }
  double total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    const float f = factor[2 * c] == -INFINITY ? 0.0f : static_cast<float>(std::exp(double(factor[2 * c] - row_max) * inv_t));
    factor[2 * c] = f;
    total += double(f) * factor[2 * c + 1];
  }
  m = row_max, mn = row_min, z = total;
}

// Log-probabilities taken as given (inputs="log_probs"): out = exp(min(x, 0)) (a value above 0 reads as
// probability 1, as the batched path), one factor of 1 per chunk and z = 1 (the normalising pass then only
// counts), the row's max and min; `bad` when a value is NaN (the one bad row here: -inf is probability 0).
FASTKD_INLINE void logprob_exps(const float* x, int64_t n, float* out, std::vector<float>& factor, float& m,
                                float& mn, bool& bad) {
  float row_max = -INFINITY, row_min = INFINITY;
  int nan = 0;
#pragma omp simd reduction(max : row_max) reduction(min : row_min) reduction(| : nan)
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    nan |= static_cast<int>(v != v);
    row_max = v > row_max ? v : row_max, row_min = v < row_min ? v : row_min;
    out[j] = vexp(v < 0.0f ? v : 0.0f);
  }
  factor.assign(2 * ((n + kStatsChunk - 1) / kStatsChunk), 1.0f);
  m = row_max, mn = row_min, bad = nan != 0;
}

// Normalise (out *= the chunk's factor / z) and add each probability to its bucket's count and sum.
FASTKD_INLINE void normalise_and_count(float* out, int64_t n, const std::vector<float>& factor, double z, int32_t* cnt,
                                       double* sum) {
  for (int64_t c = 0; c * kStatsChunk < n; ++c) {
    float* oc = out + c * kStatsChunk;
    const int64_t len = std::min(kStatsChunk, n - c * kStatsChunk);
    const float scale = static_cast<float>(factor[2 * c] / z);
    for (int64_t j = 0; j < len; ++j) {
      const float v = oc[j] * scale;
      oc[j] = v;
      const int k = bucket_of(v);
      cnt[k] += 1;
      sum[k] += v;
    }
  }
}

// The gradient of one side: g_j = coef * prob_j * (sign_j - c), sign_j its bucket's (ambiguous ones fixed after).
FASTKD_CPU_CLONES
void side_grad(const float* prob, int64_t n, const int32_t* sign, int flip, float coef, float c, float* g) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = prob[j];
    g[j] = coef * v * (static_cast<float>(flip * sign[bucket_of(v)]) - c);
  }
}

// Log-probs as given: a value above 0 is read as 0, a constant, so its gradient is 0.
FASTKD_INLINE void zero_where_positive(const float* x, int64_t n, float* g) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] = x[j] > 0.0f ? 0.0f : g[j];
}

// The elements of one side in ambiguous buckets (sign 0). Blocks of 16 without one (most: the ambiguous
// elements are a few percent, spread over the vocabulary) are skipped by a vectorised test (gathers of
// the int32 sign table).
FASTKD_INLINE void collect_ambiguous(const float* x, int64_t n, const int32_t* sign, bool student,
                                     std::vector<Ambiguous>& out) {
  constexpr int64_t kBlock = 16;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const float* xb = x + b0;
    const int64_t len = std::min(kBlock, n - b0);
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t j = 0; j < len; ++j) any |= static_cast<int>(sign[bucket_of(xb[j])] == 0);
    if (!any) continue;
    for (int64_t j = 0; j < len; ++j)
      if (sign[bucket_of(xb[j])] == 0) out.push_back({xb[j], static_cast<int32_t>(b0 + j), student});
  }
}

// One counted row: returns {soft, hard} (unweighted); writes the weighted gradients (gs / gt may be null).
FASTKD_CPU_CLONES
std::pair<double, double> uld_row(const float* s, int64_t vs, const float* t, int64_t vt, float inv_ts, float inv_tt,
                                  int64_t target, float w, float ce_weight, bool log_probs, float* gs, float* gt,
                                  ULDScratch& sc) {
  sc.q.resize(vs);
  sc.p.resize(vt);
  float* q = gs ? gs : sc.q.data();
  float* p = gt ? gt : sc.p.data();
  float ms, mt, ns, nt;
  double zs = 1.0, zt = 1.0;
  // each side's largest and smallest probability (the bucket range the tables use)
  double q_max, q_min, p_max, p_min;
  bool bad;
  if (log_probs) {  // the rows as given: no softmax, no temperature
    bool bad_t;
    logprob_exps(s, vs, q, sc.factor_q, ms, ns, bad);
    logprob_exps(t, vt, p, sc.factor_p, mt, nt, bad_t);
    bad = bad || bad_t;
    q_max = std::exp(std::min(double(ms), 0.0)), q_min = std::exp(std::min(double(ns), 0.0));
    p_max = std::exp(std::min(double(mt), 0.0)), p_min = std::exp(std::min(double(nt), 0.0));
  } else {
    softmax_exps(s, vs, inv_ts, q, sc.factor_q, ms, ns, zs);
    softmax_exps(t, vt, inv_tt, p, sc.factor_p, mt, nt, zt);
    bad = !(zs > 0 && std::isfinite(zs) && zt > 0 && std::isfinite(zt));  // NaN / +inf logits, or all -inf
    q_max = 1.0 / zs, q_min = std::exp(double(ns - ms) * inv_ts) / zs;
    p_max = 1.0 / zt, p_min = std::exp(double(nt - mt) * inv_tt) / zt;
  }
  if (bad) {
    if (gs) std::fill(gs, gs + vs, NAN);
    if (gt) std::fill(gt, gt + vt, NAN);
    return {NAN, NAN};
  }
  for (auto* v : {&sc.sum_q, &sc.sum_p, &sc.above_q, &sc.above_p}) v->resize(kBuckets + 1);
  sc.cnt_q.resize(kBuckets + 1);
  sc.cnt_p.resize(kBuckets + 1);
  sc.sign.resize(kBuckets + 1);
  // the tables are cleared (and walked) only between the lowest and the highest bucket either side uses
  // (softmax: the largest probability is 1 / z, the smallest exp((min - max) / T) / z; one bucket of slack
  // for rounding)
  const int k_lo = std::max(0, bucket_of(static_cast<float>(std::min(q_min, p_min))) - 1);
  const int k_hi = std::min(kBuckets, bucket_of(static_cast<float>(std::max(q_max, p_max))) + 1);
  for (auto* v : {&sc.sum_q, &sc.sum_p}) std::fill(v->begin() + k_lo, v->begin() + k_hi + 1, 0.0);
  for (auto* v : {&sc.cnt_q, &sc.cnt_p}) std::fill(v->begin() + k_lo, v->begin() + k_hi + 1, 0);
  normalise_and_count(q, vs, sc.factor_q, zs, sc.cnt_q.data(), sc.sum_q.data());
  normalise_and_count(p, vt, sc.factor_p, zt, sc.cnt_p.data(), sc.sum_p.data());
  // buckets, from the top
  double loss = 0.0, c_q = 0.0, c_p = 0.0, above_q = 0.0, above_p = 0.0, ambiguous = 0.0;
  for (int k = k_hi; k >= k_lo; --k) {
    const double cq = sc.cnt_q[k], cp = sc.cnt_p[k];  // exact in double
    sc.above_q[k] = above_q, sc.above_p[k] = above_p;
    bool q_dom = above_q >= above_p + cp, p_dom = above_p >= above_q + cq;
    if (k == 0 && !(q_dom || p_dom)) q_dom = above_q >= above_p;  // below 2^-60: not refined
    if (q_dom || p_dom) {
      const double lo = edge(k), width = edge(k + 1) - lo;
      const double int_q = above_q * width + sc.sum_q[k] - cq * lo;
      const double int_p = above_p * width + sc.sum_p[k] - cp * lo;
      loss += std::fabs(int_q - int_p);
      const int32_t sg = q_dom ? 1 : -1;
      sc.sign[k] = sg;
      c_q += sg * sc.sum_q[k];
      c_p -= sg * sc.sum_p[k];
    } else {
      sc.sign[k] = 0;
      ambiguous += cq + cp;
    }
    above_q += cq, above_p += cp;
  }
  loss += std::fabs(above_q - above_p) * edge(k_lo);  // below every value: the zero padding of the shorter row
  sc.amb.clear();
  if (ambiguous > 0) {
    // buckets outside the table's used range [k_lo, k_hi] hold no element of either side
    std::fill(sc.sign.begin(), sc.sign.begin() + k_lo, 1);
    std::fill(sc.sign.begin() + k_hi + 1, sc.sign.end(), 1);
    collect_ambiguous(q, vs, sc.sign.data(), true, sc.amb);
    collect_ambiguous(p, vt, sc.sign.data(), false, sc.amb);
    std::sort(sc.amb.begin(), sc.amb.end(), [](const Ambiguous& a, const Ambiguous& b) { return a.value > b.value; });
    // walk each ambiguous bucket from its top: D = N_q - N_p just above the current element
    int bucket = -1;
    double diff = 0.0, upper = 0.0;
    for (auto& e : sc.amb) {
      const int k = bucket_of(e.value);
      if (k != bucket) {
        if (bucket >= 0) loss += std::fabs(diff) * (upper - edge(bucket));
        bucket = k, diff = sc.above_q[k] - sc.above_p[k], upper = edge(k + 1);
      }
      loss += std::fabs(diff) * (upper - e.value);
      const float sg = e.student ? (diff >= 0 ? 1.0f : -1.0f) : (diff <= 0 ? 1.0f : -1.0f);
      (e.student ? c_q : c_p) += sg * e.value;
      diff += e.student ? 1.0 : -1.0;
      upper = e.value;
      e.value = sg * e.value;  // keep sign * probability for the fix-up below
    }
    if (bucket >= 0) loss += std::fabs(diff) * (upper - edge(bucket));
  }
  // cross-entropy at T = 1: lse(s) - s[target]
  double hard = 0.0, lse1 = 0.0;
  const bool ce = target >= 0;
  if (ce) {
    if (inv_ts == 1.0f && !log_probs) {
      lse1 = ms + std::log(zs);
    } else {
      double z1 = 0.0;
      for (int64_t j = 0; j < vs; ++j) z1 += vexp(s[j] - ms);
      lse1 = ms + std::log(z1);
    }
    hard = lse1 - s[target];
  }
  // softmax rows: dL/dx = w q (g - sum q g) / T; log-probs as given: dL/dx = w q g (no normaliser)
  if (log_probs) c_q = c_p = 0.0, inv_ts = inv_tt = 1.0f;
  if (gs) {
    const float coef = w * inv_ts, cq = static_cast<float>(c_q);
    side_grad(q, vs, sc.sign.data(), 1, coef, cq, gs);  // q lives in gs: read, then overwritten
    for (const auto& e : sc.amb)
      if (e.student) gs[e.index] = coef * (e.value - std::fabs(e.value) * cq);
    if (log_probs) zero_where_positive(s, vs, gs);
    if (ce && ce_weight != 0.0f) {
      const float wc = w * ce_weight, l1 = static_cast<float>(lse1);
      for (int64_t j = 0; j < vs; ++j) gs[j] += wc * vexp(s[j] - l1);
      gs[target] -= wc;
    }
  }
  if (gt) {
    const float coef = w * inv_tt, cp = static_cast<float>(c_p);
    side_grad(p, vt, sc.sign.data(), -1, coef, cp, gt);
    for (const auto& e : sc.amb)
      if (!e.student) gt[e.index] = coef * (e.value - std::fabs(e.value) * cp);
    if (log_probs) zero_where_positive(t, vt, gt);
  }
  return {loss, hard};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> uld_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target, const at::Tensor& row_weight,
    double temperature, double teacher_temperature, double ce_weight, bool reduce, bool grad_student,
    bool grad_teacher, bool log_probs) {
  check_logit_rows(student, "student");
  check_logit_rows(teacher, "teacher");
  const int64_t N = student.size(0), vs = student.size(1), vt = teacher.size(1);
  TORCH_CHECK(teacher.size(0) == N, "fastkd: uld_fwd: student and teacher have different row counts");
  check_row_vector(row_weight, N, at::kFloat, "row_weight");
  TORCH_CHECK(target.numel() == 0 || (target.dim() == 1 && target.size(0) == N && target.scalar_type() == at::kLong &&
                                      target.is_contiguous()),
              "fastkd: uld_fwd: target must be empty or a contiguous int64 vector of N rows");
  at::Tensor gs = grad_like(student, grad_student), gt = grad_like(teacher, grad_teacher);
  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor soft = at::zeros({N}, f32), hard = at::zeros({N}, f32);
  const float* weight = row_weight.const_data_ptr<float>();
  const int64_t* tgt = target.numel() ? target.const_data_ptr<int64_t>() : nullptr;
  float* soft_out = soft.mutable_data_ptr<float>();
  float* hard_out = hard.mutable_data_ptr<float>();
  const float inv_ts = static_cast<float>(1.0 / temperature), inv_tt = static_cast<float>(1.0 / teacher_temperature);
  const float ce = static_cast<float>(ce_weight);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf, tbuf, gsbuf, gtbuf;
    thread_local ULDScratch scratch;
    for (int64_t i = begin; i < end; ++i) {
      float* gs_row = output_row(gs, i, gsbuf);
      float* gt_row = output_row(gt, i, gtbuf);
      if (weight[i] == 0.0f) {
        if (gs_row) std::fill(gs_row, gs_row + vs, 0.0f);
        if (gt_row) std::fill(gt_row, gt_row + vt, 0.0f);
      } else {
        const int64_t row_target = tgt ? checked_target(tgt, i, vs) : -1;
        const auto r = uld_row(input_row(student, i, sbuf), vs, input_row(teacher, i, tbuf), vt, inv_ts, inv_tt,
                               row_target, weight[i], ce, log_probs, gs_row, gt_row, scratch);
        soft_out[i] = static_cast<float>(weight[i] * r.first);
        hard_out[i] = static_cast<float>(weight[i] * r.second);
      }
      output_row_done(gs, i, gsbuf);
      output_row_done(gt, i, gtbuf);
    }
  });
  at::Tensor loss = ce != 0.0f ? soft + ce * hard : soft.clone();
  if (reduce) return {loss.sum(), soft.sum(), hard.sum(), gs, gt};
  return {loss, soft, hard, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("uld_fwd", &uld_fwd_cpu); }

}  // namespace fastkd
