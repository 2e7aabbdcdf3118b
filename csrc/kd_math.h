// Per-row math of the KD loss, shared by the CPU (csrc/cpu/kd.cpp) and CUDA
// (csrc/cuda/kd.cu) kernels so the CPU tests exercise the formulas the GPU runs.
//
// One row, temperature T, a = s / T (student), b = t / T (teacher):
//   log p_s = a - lse(a),  log p_t = b - lse(b)
//   KL      = sum_c p_t (log p_t - log p_s) = E_pt[b - a] - lse(b) + lse(a)
//   loss    = w * T^2 * KL                  (w: the row weight, docs/design.md)
//   dL/ds_c = w * T * (p_s - p_t)
//   dL/dt_c = w * T * p_t * (log p_t - log p_s - KL)
//   dL/dT   = w * (2 T KL - T * (A1 + A2 - KL * A3)),
//             A1 = sum (p_s - p_t) a,  A2 = sum p_t (log p_t - log p_s) b,  A3 = sum p_t b
// (from da/dT = -a/T, db/dT = -b/T and dKL/da = p_s - p_t, dKL/db = p_t (lr - KL)).
// Terms where p_t == 0 (teacher logit -inf) contribute exactly 0, as in
// kl_div's xlogy convention; NaN inputs still propagate through lse.
#pragma once
#include <math.h>

#ifdef __CUDACC__
#define FASTKD_HD __host__ __device__ __forceinline__
#else
#define FASTKD_HD inline __attribute__((always_inline))
#endif

namespace fastkd {

// exp(m_old - m_new) for rescaling a running sum when its max moves; 0 when the
// sum is still empty (m_old = -inf), which also avoids -inf - -inf = NaN.
FASTKD_HD float rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
}

FASTKD_HD float max_ignoring_nan(float x, float y) { return x > y ? x : y; }

// Partial statistics of one row (or part of one): running maxima and sums of
// exp for student (ms, zs) and teacher (mt, zt), and cross = sum exp(b - mt) (b - a).
struct KDStats {
  float ms, zs, mt, zt, cross;
};

FASTKD_HD KDStats kd_stats_empty() { return {-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f}; }

// Combine two partial statistics (order-independent up to rounding).
FASTKD_HD KDStats kd_stats_merge(const KDStats& x, const KDStats& y) {
  const float ms = max_ignoring_nan(x.ms, y.ms);
  const float mt = max_ignoring_nan(x.mt, y.mt);
  const float xs = rescale(x.ms, ms), ys = rescale(y.ms, ms);
  const float xt = rescale(x.mt, mt), yt = rescale(y.mt, mt);
  return {ms, x.zs * xs + y.zs * ys, mt, x.zt * xt + y.zt * yt, x.cross * xt + y.cross * yt};
}

// Contribution of one teacher term to `cross`: e_t (b - a), 0 where e_t == 0.
FASTKD_HD float kd_cross_term(float e_t, float a, float b) { return e_t > 0.0f ? e_t * (b - a) : 0.0f; }

struct KDRow {
  float lse_s, lse_t, kl;
};

FASTKD_HD KDRow kd_finish(const KDStats& st) {
  KDRow r;
  r.lse_s = st.ms + logf(st.zs);
  r.lse_t = st.mt + logf(st.zt);
  r.kl = st.cross / st.zt - r.lse_t + r.lse_s;
  return r;
}

// log p_t - log p_s for one class.
FASTKD_HD float kd_log_ratio(const KDRow& r, float a, float b) { return (b - r.lse_t) - (a - r.lse_s); }

// Teacher-gradient factor p_t (log p_t - log p_s - KL), 0 where p_t == 0.
FASTKD_HD float kd_teacher_term(const KDRow& r, float p_t, float a, float b) {
  return p_t > 0.0f ? p_t * (kd_log_ratio(r, a, b) - r.kl) : 0.0f;
}

// The three sums of dL/dT for one class (see the header comment).
FASTKD_HD void kd_dtemp_terms(const KDRow& r, float p_s, float p_t, float a, float b, float& a1, float& a2,
                              float& a3) {
  a1 += (p_s > 0.0f ? p_s * a : 0.0f) - (p_t > 0.0f ? p_t * a : 0.0f);
  a2 += p_t > 0.0f ? p_t * kd_log_ratio(r, a, b) * b : 0.0f;
  a3 += p_t > 0.0f ? p_t * b : 0.0f;
}

// dL/dT of one row, before the row weight.
FASTKD_HD float kd_dtemp(float T, float kl, float a1, float a2, float a3) {
  return 2.0f * T * kl - T * (a1 + a2 - kl * a3);
}

}  // namespace fastkd
