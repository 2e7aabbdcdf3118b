// KD on the CPU: one fused forward per row that writes the loss, the student
// and teacher gradients and d/dT (math in csrc/kd_math.h), parallel over rows,
// vectorised over classes.
//
// Passes over a row: (1) online statistics in chunks of kStatsChunk columns (chunk
// max, then the sums of exp relative to it, merged into the running
// statistics), (2) only when a gradient is wanted, the gradients. A chunk of
// both nets stays in L1 between its max and its sums, and a whole row of the
// usual vocabularies stays in L2 between the two passes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../kd_math.h"
#include "loss_common.h"
#include "vec_exp.h"

namespace fastkd {
namespace {

// KDRawStats (csrc/kd_math.h) of one chunk of raw logits: the chunk maxima first,
// then the sums relative to them (one exp per element and net). With kKeep it
// also stores exp(a - chunk max) into `kept` (the student-gradient row, so that
// the gradient pass needs one exp per element, not two).
template <bool kKeep = false>
FASTKD_INLINE KDRawStats kd_chunk_stats(const float* s, const float* t, int64_t n, float inv_t, float* kept = nullptr) {
  float ms = -INFINITY, mt = -INFINITY;
#pragma omp simd reduction(max : ms, mt)
  for (int64_t j = 0; j < n; ++j) {
    ms = s[j] > ms ? s[j] : ms;
    mt = t[j] > mt ? t[j] : mt;
  }
  // an all -inf chunk shifts by 0 (its exps are all 0, not NaN)
  const float base_s = ms == -INFINITY ? 0.0f : ms, base_t = mt == -INFINITY ? 0.0f : mt;
  float zs = 0.0f, zt = 0.0f, cross = 0.0f;
#pragma omp simd reduction(+ : zs, zt, cross)
  for (int64_t j = 0; j < n; ++j) {
    const float a = (s[j] - base_s) * inv_t, b = (t[j] - base_t) * inv_t;  // raw differences first
    const float es = vexp(a), et = vexp(b);
    if (kKeep) kept[j] = es;
    zs += es;
    zt += et;
    cross += kd_cross_term(et, a, b);
  }
  return {ms, zs, mt, zt, cross};
}

template <bool kGradS, bool kGradT, bool kDTemp>
FASTKD_INLINE void kd_grad_pass(const float* s, const float* t, int64_t C, float inv_t, const KDRawStats& st,
                                const KDRow& r, float coef, float* gs, float* gt, float& a1, float& a2) {
  float s1 = 0.0f, s2 = 0.0f;
  const float ms = st.ms, mt = st.mt;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t j = 0; j < C; ++j) {
    const float a = (s[j] - ms) * inv_t, b = (t[j] - mt) * inv_t;
    const float ps = vexp(a - r.lse_s), pt = vexp(b - r.lse_t);
    if (kGradS) gs[j] = coef * (ps - pt);
    if (kGradT) gt[j] = coef * kd_teacher_term(r, pt, a, b);
    if (kDTemp) kd_dtemp_terms(r, ps, pt, a, b, s1, s2);
  }
  a1 = s1, a2 = s2;
}

// The usual training case (teacher detached, float temperature): the student
// gradient from the exps kept in `gs` by the statistics pass, rescaled per chunk.
FASTKD_INLINE void kd_student_grad_from_kept(const float* t, int64_t C, float inv_t, const KDRawStats& st,
                                             const KDRow& r, float coef, const float* chunk_max, float* gs) {
  const float mt = st.mt;
  for (int64_t c0 = 0, k = 0; c0 < C; c0 += kStatsChunk, ++k) {
    const int64_t n = std::min(kStatsChunk, C - c0);
    // exp((s - chunk max) / T) * to_prob = p_s; 0 for an all -inf chunk (its kept exps are 0)
    const float to_prob = expf(raw_gap(chunk_max[k], st.ms) * inv_t - r.lse_s);
    float* g = gs + c0;
    const float* tc = t + c0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) g[j] = coef * (g[j] * to_prob - vexp((tc[j] - mt) * inv_t - r.lse_t));
  }
}

// One row: returns the weighted loss, writes the weighted gradients (gs / gt may
// be null) and, if asked, the weighted dL/dT. `chunk_max` has room for one float
// per chunk of the row.
FASTKD_CPU_CLONES
float kd_row(const float* s, const float* t, int64_t C, float T, float w, float* gs, float* gt, float* dtemp,
             float* chunk_max) {
  const float inv_t = 1.0f / T;
  const bool student_only = gs && !gt && !dtemp;
  KDRawStats st = kd_raw_empty();
  for (int64_t c0 = 0, k = 0; c0 < C; c0 += kStatsChunk, ++k) {
    const int64_t n = std::min(kStatsChunk, C - c0);
    const KDRawStats chunk = student_only ? kd_chunk_stats<true>(s + c0, t + c0, n, inv_t, gs + c0)
                                          : kd_chunk_stats(s + c0, t + c0, n, inv_t);
    chunk_max[k] = chunk.ms;
    st = kd_raw_merge(st, chunk, inv_t);
  }
  const KDRow r = kd_raw_finish(st);
  const float coef = w * T;
  if (student_only) {
    kd_student_grad_from_kept(t, C, inv_t, st, r, coef, chunk_max, gs);
    return w * T * T * r.kl;
  }
  float a1 = 0.0f, a2 = 0.0f;
  const int mode = (gs ? 1 : 0) | (gt ? 2 : 0) | (dtemp ? 4 : 0);
  switch (mode) {
    case 2: kd_grad_pass<false, true, false>(s, t, C, inv_t, st, r, coef, gs, gt, a1, a2); break;
    case 3: kd_grad_pass<true, true, false>(s, t, C, inv_t, st, r, coef, gs, gt, a1, a2); break;
    case 4: kd_grad_pass<false, false, true>(s, t, C, inv_t, st, r, coef, gs, gt, a1, a2); break;
    case 5: kd_grad_pass<true, false, true>(s, t, C, inv_t, st, r, coef, gs, gt, a1, a2); break;
    case 6: kd_grad_pass<false, true, true>(s, t, C, inv_t, st, r, coef, gs, gt, a1, a2); break;
    case 7: kd_grad_pass<true, true, true>(s, t, C, inv_t, st, r, coef, gs, gt, a1, a2); break;
    default: break;
  }
  if (dtemp) *dtemp = w * kd_dtemp(T, r.kl, a1, a2);
  return w * T * T * r.kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& temperature,
    const at::Tensor& row_weight, bool reduce, bool grad_student, bool grad_teacher, bool grad_temperature) {
  check_logit_pair(student, teacher);
  const int64_t N = student.size(0), C = student.size(1);
  check_row_vector(temperature, N, at::kFloat, "temperature");
  check_row_vector(row_weight, N, at::kFloat, "row_weight");

  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor gs = grad_like(student, grad_student);
  at::Tensor gt = grad_like(teacher, grad_teacher);
  at::Tensor gT = grad_temperature ? at::zeros({N}, f32) : at::empty({0}, f32);
  const float* temp = temperature.const_data_ptr<float>();
  const float* weight = row_weight.const_data_ptr<float>();
  float* dtemp = grad_temperature ? gT.mutable_data_ptr<float>() : nullptr;
  at::Tensor loss_rows = for_each_weighted_row(
      student, teacher, row_weight, gs, gt, [&](int64_t i, const float* s, const float* t, float* gs_row, float* gt_row) {
        thread_local std::vector<float> chunk_max;
        chunk_max.resize((C + kStatsChunk - 1) / kStatsChunk);
        return kd_row(s, t, C, temp[i], weight[i], gs_row, gt_row, dtemp ? dtemp + i : nullptr, chunk_max.data());
      });
  at::Tensor loss_out = reduce ? loss_rows.sum() : loss_rows;
  return {loss_out, gs, gt, gT};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("kd_fwd", &kd_fwd_cpu); }

}  // namespace fastkd
