// Per-row math of ATS (asymmetric temperature scaling, KL form), shared by the
// CPU (csrc/cpu/ats.cpp) and CUDA (csrc/cuda/ats.cu) kernels.
//
// One row with target g, student temperature S and teacher temperature tau_c
// (target_temperature at c == g, other_temperature elsewhere):
//   a_c = s_c / S,  b_c = t_c / tau_c,  p = softmax(a),  q = softmax(b)
//   KL      = sum_c q_c (log q_c - log p_c) = E_q[b - a] - lse(b) + lse(a)
//   loss    = w * S^2 * KL                            (w: the row weight)
//   dL/ds_c = w * S^2 * (p_c - q_c) / S       = w * S * (p_c - q_c)
//   dL/dt_c = w * S^2 * q_c (log q_c - log p_c - KL) / tau_c
// This is KD's row (kd_math.h) with a per-class teacher scale, so the same
// KDStats / KDRow carry it; the kernels scale every column by 1/other_temperature
// and handle the target column on its own. Terms with q_c == 0 add exactly 0.
#pragma once
#include "kd_math.h"

namespace fastkd {

// KDStats of a single column (a, b): 0-mass sums where a logit is -inf, so that
// merging it never produces -inf - -inf.
FASTKD_HD KDStats kd_stats_one(float a, float b) {
  const float es = a == -INFINITY ? 0.0f : 1.0f;
  const float et = b == -INFINITY ? 0.0f : 1.0f;
  return {a, es, b, et, kd_cross_term(et, a, b)};
}

// d KL / d a_c (before the factor w * S): p_c - q_c.
FASTKD_HD float ats_student_term(const KDRow& r, float a, float b) {
  return expf(a - r.lse_s) - expf(b - r.lse_t);
}

}  // namespace fastkd
