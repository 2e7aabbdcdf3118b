// DKD on the CPU: one fused forward per row that writes the loss and the student
// and teacher gradients (math and gradient derivation in csrc/dkd_math.h),
// parallel over rows, vectorised over classes.
//
// Passes over a row: (1) online statistics in chunks (loss_common.h) of the
// non-target classes only (the stretches before and after the target), the
// target logits read on their own; TCKD and NCKD both follow from these; (2)
// only when a gradient is wanted, the non-target gradient formula on every
// column, then the target column rewritten with its own formula.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../dkd_math.h"
#include "loss_common.h"

namespace fastkd {
namespace {

template <bool kGradS, bool kGradT>
FASTKD_INLINE void dkd_grad_pass(const float* s, const float* t, int64_t C, float inv_t, const DKDRow& r, float alpha,
                                 float beta, float coef, float* gs, float* gt) {
#pragma omp simd
  for (int64_t j = 0; j < C; ++j) {
    const float a = s[j] * inv_t, b = t[j] * inv_t;
    const float q_s = vexp(a - r.norm_s), q_t = vexp(b - r.norm_t);
    if (kGradS) gs[j] = coef * dkd_student_other(r, alpha, beta, q_s, q_t);
    if (kGradT) gt[j] = coef * dkd_teacher_other(r, alpha, beta, q_t, a, b);
  }
}

// One counted row with target g: returns the weighted loss, writes the weighted gradients (gs / gt may be null).
FASTKD_CPU_CLONES
float dkd_row(const float* s, const float* t, int64_t C, int64_t g, float T, float alpha, float beta, float w,
              float* gs, float* gt) {
  const float inv_t = 1.0f / T;
  const KDStats other = kd_stats_merge(kl_span_stats(s, t, g, inv_t, inv_t),
                                       kl_span_stats(s + g + 1, t + g + 1, C - g - 1, inv_t, inv_t));
  const DKDRow r = dkd_finish(other, s[g] * inv_t, t[g] * inv_t);
  const float coef = w * T;
  if (gs && gt) dkd_grad_pass<true, true>(s, t, C, inv_t, r, alpha, beta, coef, gs, gt);
  else if (gs) dkd_grad_pass<true, false>(s, t, C, inv_t, r, alpha, beta, coef, gs, gt);
  else if (gt) dkd_grad_pass<false, true>(s, t, C, inv_t, r, alpha, beta, coef, gs, gt);
  if (gs) gs[g] = coef * dkd_student_target(r, alpha);
  if (gt) gt[g] = coef * dkd_teacher_target(r, alpha);
  return w * T * T * dkd_objective(r, alpha, beta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dkd_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                           const at::Tensor& target, const at::Tensor& row_weight,
                                                           double alpha, double beta, double temperature, bool reduce,
                                                           bool grad_student, bool grad_teacher) {
  const float T = static_cast<float>(temperature), a = static_cast<float>(alpha), b = static_cast<float>(beta);
  return target_rows_fwd(student, teacher, target, row_weight, reduce, grad_student, grad_teacher,
                         [&](const float* s, const float* t, int64_t C, int64_t g, float w, float* gs, float* gt) {
                           return dkd_row(s, t, C, g, T, a, b, w, gs, gt);
                         });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("dkd_fwd", &dkd_fwd_cpu); }

}  // namespace fastkd
