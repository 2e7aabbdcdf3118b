// Per-row math of the KD loss, shared by the CPU (csrc/cpu/kd.cpp) and CUDA
// (csrc/cuda/kd.cu) kernels so the CPU tests exercise the formulas the GPU runs.
//
// One row, temperature T, raw logits s (student) and t (teacher) with row maxima
// M_s, M_t. KD works on the shifted, scaled logits
//   a = (s - M_s) / T,  b = (t - M_t) / T           (all <= 0)
// Softmax ignores the shift, so p_s = softmax(a), p_t = softmax(b) and
//   log p_s = a - lse(a),  log p_t = b - lse(b)
//   KL      = sum_c p_t (log p_t - log p_s) = E_pt[b - a] - lse(b) + lse(a)
//   loss    = w * T^2 * KL                  (w: the row weight, docs/design.md)
//   dL/ds_c = w * T * (p_s - p_t)
//   dL/dt_c = w * T * p_t (log p_t - log p_s - KL)
//   dL/dT   = w * (2 T KL - T * (A1 + A2)),
//             A1 = sum (p_s - p_t) a,  A2 = sum p_t (log p_t - log p_s - KL) b
// (from da/dT = -a/T, db/dT = -b/T, dKL/da = p_s - p_t, dKL/db = p_t (lr - KL);
// the shift may be treated as constant because sum (p_s - p_t) = sum p_t (lr - KL) = 0).
// Why the shift: with logits of a large common offset (1e3, 1e4) the unshifted
// a, b are large, and A1 or lse(b) - lse(a) lose all their digits to cancellation
// (dL/dT came out with the wrong sign at an offset of 1e3). s - M_s is exact in
// float32 near the max (Sterbenz), so all of a, b, b - a, lse(a), lse(b) keep
// the precision of the logits' spread, not of their offset. The running maxima
// are therefore kept in raw-logit units (KDRawStats) and every difference of
// large values (s - M_s, t - M_t, M_t' - M_t) is formed before scaling by 1/T.
// Terms where p_t == 0 (teacher logit -inf) contribute exactly 0, as in
// kl_div's xlogy convention; NaN inputs still propagate through lse.
//
// KDStats (below, scaled units) is the older form that ATS and DKD still use:
// ATS has a per-class teacher scale, so a raw-unit teacher maximum means nothing there.
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

// 0 where the probability p is 0, else v: the xlogy convention (a term of probability
// 0 adds 0 even when v is NaN or inf). A NaN p keeps v (NaN): a NaN logit must reach the
// loss and the gradients, not vanish as a zero probability. v is an argument, computed
// unconditionally: a plain select, which the CPU loops vectorise (given the
// -fno-trapping-math of csrc/cpu/vec_exp.h).
FASTKD_HD float where_positive(float p, float v) { return p == 0.0f ? 0.0f : v; }

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
FASTKD_HD float kd_cross_term(float e_t, float a, float b) { return where_positive(e_t, e_t * (b - a)); }

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
  return where_positive(p_t, p_t * (kd_log_ratio(r, a, b) - r.kl));
}

// The two sums of dL/dT for one class (see the header comment), a and b shifted.
FASTKD_HD void kd_dtemp_terms(const KDRow& r, float p_s, float p_t, float a, float b, float& a1, float& a2) {
  a1 += where_positive(p_s, p_s * a) - where_positive(p_t, p_t * a);
  a2 += where_positive(p_t, p_t * (kd_log_ratio(r, a, b) - r.kl) * b);
}

// dL/dT of one row, before the row weight.
FASTKD_HD float kd_dtemp(float T, float kl, float a1, float a2) { return 2.0f * T * kl - T * (a1 + a2); }

// ---------------------------------------------------------------------------
// KD statistics with the maxima in raw-logit units (see the header comment).
// ms, mt: running maxima of the raw logits s, t; with a = (s - ms) / T and
// b = (t - mt) / T, zs = sum exp(a), zt = sum exp(b), cross = sum exp(b) (b - a).
struct KDRawStats {
  float ms, zs, mt, zt, cross;
};

FASTKD_HD KDRawStats kd_raw_empty() { return {-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f}; }

// m_old - m_new (<= 0) for a maximum that moved from m_old to m_new, in raw units:
// 0 when it did not move (also when both are -inf, avoiding -inf - -inf = NaN).
FASTKD_HD float raw_gap(float m_old, float m_new) { return m_old == m_new ? 0.0f : m_old - m_new; }

// exp on the hot per-element paths: the fast hardware exp on the GPU.
FASTKD_HD float kd_fast_exp(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return expf(x);
#endif
}

// One part of a merge: `p` re-expressed relative to the maxima (ms, mt), added to `acc`.
// Moving the maxima multiplies the sums by exp(gap / T) and shifts every b - a by
// (gap_t - gap_s) / T (the gaps taken in raw units first). Empty parts add 0.
FASTKD_HD void kd_raw_add(KDRawStats& acc, const KDRawStats& p, float inv_t) {
  const float gs = raw_gap(p.ms, acc.ms), gt = raw_gap(p.mt, acc.mt);
  const float fs = expf(gs * inv_t), ft = expf(gt * inv_t);
  acc.zs += p.zs * fs;
  acc.zt += p.zt * ft;
  if (p.zt > 0.0f && ft > 0.0f) acc.cross += ft * (p.cross + p.zt * ((gt - gs) * inv_t));
}

// Combine two partial statistics of one row (order-independent up to rounding).
FASTKD_HD KDRawStats kd_raw_merge(const KDRawStats& x, const KDRawStats& y, float inv_t) {
  KDRawStats r = {max_ignoring_nan(x.ms, y.ms), 0.0f, max_ignoring_nan(x.mt, y.mt), 0.0f, 0.0f};
  kd_raw_add(r, x, inv_t);
  kd_raw_add(r, y, inv_t);
  return r;
}

// A shifted, scaled logit (x - m) / T; 0 at the maximum (also for an all -inf row).
FASTKD_HD float kd_shift(float x, float m, float inv_t) { return x == m ? 0.0f : (x - m) * inv_t; }

// Fold one column (raw s, t) into running statistics: one exp per net unless a
// maximum moves. A -inf logit adds nothing (and never computes -inf - -inf); a
// NaN poisons the sums (a first maximum multiplies them by 0, keeping a NaN). The
// student goes first: the teacher's cross term of this column uses the updated
// student maximum.
FASTKD_HD void kd_raw_push(KDRawStats& st, float s, float t, float inv_t) {
  if (s > st.ms) {
    // every earlier a drops by (s - ms) / T, so every earlier b - a grows by it
    const float up = (s - st.ms) * inv_t;  // +inf on the first finite logit
    if (st.zt > 0.0f) st.cross += st.zt * up;
    st.zs = st.zs * (st.ms == -INFINITY ? 0.0f : kd_fast_exp(-up)) + 1.0f;
    st.ms = s;
  } else if (st.ms != -INFINITY || s != s) {
    st.zs += kd_fast_exp((s - st.ms) * inv_t);
  }
  const float a = kd_shift(s, st.ms, inv_t);
  if (t > st.mt) {
    // every earlier b drops by (t - mt) / T
    const float up = (t - st.mt) * inv_t;
    const float f = st.mt == -INFINITY ? 0.0f : kd_fast_exp(-up);
    st.cross = (st.zt > 0.0f ? st.cross - st.zt * up : st.cross) * f;
    st.zt = st.zt * f + 1.0f;
    st.cross += -a;  // this column: e_t = 1, b = 0
    st.mt = t;
  } else if (st.mt != -INFINITY || t != t) {
    const float b = (t - st.mt) * inv_t, et = kd_fast_exp(b);
    st.zt += et;
    st.cross += kd_cross_term(et, a, b);
  }
}

// KDRow of the finished statistics: lse_s = lse(a), lse_t = lse(b) of the shifted
// logits. A net without a finite logit has no softmax: the KL is NaN then.
FASTKD_HD KDRow kd_raw_finish(const KDRawStats& st) {
  KDRow r;
  r.lse_s = logf(st.zs);
  r.lse_t = logf(st.zt);
  r.kl = st.zs > 0.0f ? st.cross / st.zt - r.lse_t + r.lse_s : NAN;
  return r;
}

}  // namespace fastkd
