// ATS on the CPU: one fused forward per row that writes the loss and the student
// and teacher gradients (math in csrc/ats_math.h), parallel over rows,
// vectorised over classes.
//
// Passes over a row: (1) online statistics in chunks (loss_common.h) of the
// classes before and after the target, which share one teacher scale, merged
// with the target column's own statistics; (2) only when a gradient is wanted,
// the gradients of every column with the non-target teacher scale, then the
// target column rewritten with its own.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ats_math.h"
#include "loss_common.h"

namespace fastkd {
namespace {

template <bool kGradS, bool kGradT>
FASTKD_INLINE void ats_grad_pass(const float* s, const float* t, int64_t C, float inv_a, float inv_b, const KDRow& r,
                                 float coef_s, float coef_t, float* gs, float* gt) {
#pragma omp simd
  for (int64_t j = 0; j < C; ++j) {
    const float a = s[j] * inv_a, b = t[j] * inv_b;
    const float pt = vexp(b - r.lse_t);
    if (kGradS) gs[j] = coef_s * (vexp(a - r.lse_s) - pt);
    if (kGradT) gt[j] = coef_t * kd_teacher_term(r, pt, a, b);
  }
}

// One counted row with target g: returns the weighted loss and writes the weighted
// gradients (gs / gt may be null). inv_s = 1/S, inv_tt / inv_to: 1/tau at and off g.
FASTKD_CPU_CLONES
float ats_row(const float* s, const float* t, int64_t C, int64_t g, float S, float inv_tt, float inv_to, float w,
              float* gs, float* gt) {
  const float inv_s = 1.0f / S;
  const float a_g = s[g] * inv_s, b_g = t[g] * inv_tt;
  KDStats st = kl_span_stats(s, t, g, inv_s, inv_to);
  st = kd_stats_merge(st, kd_stats_one(a_g, b_g));
  st = kd_stats_merge(st, kl_span_stats(s + g + 1, t + g + 1, C - g - 1, inv_s, inv_to));
  const KDRow r = kd_finish(st);
  const float coef_s = w * S, coef_t = w * S * S;
  if (gs && gt) ats_grad_pass<true, true>(s, t, C, inv_s, inv_to, r, coef_s, coef_t * inv_to, gs, gt);
  else if (gs) ats_grad_pass<true, false>(s, t, C, inv_s, inv_to, r, coef_s, coef_t * inv_to, gs, gt);
  else if (gt) ats_grad_pass<false, true>(s, t, C, inv_s, inv_to, r, coef_s, coef_t * inv_to, gs, gt);
  const float pt_g = vexp(b_g - r.lse_t);
  if (gs) gs[g] = coef_s * (vexp(a_g - r.lse_s) - pt_g);
  if (gt) gt[g] = coef_t * inv_tt * kd_teacher_term(r, pt_g, a_g, b_g);
  return coef_t * r.kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ats_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                           const at::Tensor& target, const at::Tensor& row_weight,
                                                           double student_temperature, double target_temperature,
                                                           double other_temperature, bool reduce, bool grad_student,
                                                           bool grad_teacher) {
  const float S = static_cast<float>(student_temperature);
  const float inv_tt = static_cast<float>(1.0 / target_temperature);
  const float inv_to = static_cast<float>(1.0 / other_temperature);
  return target_rows_fwd(student, teacher, target, row_weight, reduce, grad_student, grad_teacher,
                         [&](const float* s, const float* t, int64_t C, int64_t g, float w, float* gs, float* gt) {
                           return ats_row(s, t, C, g, S, inv_tt, inv_to, w, gs, gt);
                         });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("ats_fwd", &ats_fwd_cpu); }

}  // namespace fastkd
