// Per-element and per-row math of fastkd::divergence_fwd (docs/design.md, "The
// language-model divergences"), shared by the CPU kernel (csrc/cpu/divergence.cpp)
// and the CUDA kernel (csrc/cuda/divergence.cu): every function is FASTKD_HD, with
// no std:: containers and no host-only calls on the device path.
//
// One row, temperature T, raw student logits s and teacher logits t (dense teacher)
// with raw-unit maxima M_s, M_t (as KD, csrc/kd_math.h: differences of large values
// are formed before scaling by 1/T):
//   log q_c = kd_shift(s_c, M_s, 1/T) - L_s,  L_s = log sum_c exp((s_c - M_s) / T)
//   log p_c = kd_shift(t_c, M_t, 1/T) - L_t
// kind 0 (KL family), coefficients (a, b, w_p, w_q):
//   soft = a KL(p || m) + b KL(q || m),  m = w_p p + w_q q
//   per class: soft_c = a p (lp - lm) + b q (lq - lm)     (a term with probability 0 adds 0)
//              G_c = dsoft/dlq_c = b q (lq - lm) - r (a p + b q),  r = d lm / d lq = w_q q / m
//              H_c = dsoft/dlp_c = a p (lp - lm) - s (a p + b q),  s = d lm / d lp = w_p p / m
//   (the "+ b q" of d/dlq [q (lq - lm)] is dropped: through the log-softmax it adds
//   b q_c - q_c sum b q = 0.) Mixture modes, fixed per call:
//     kMixQ    (w_p == 0): lm = lq exactly, r = 1, s = 0   (forward KL: a = 1, b = 0)
//     kMixP    (w_q == 0): lm = lp exactly, r = 0, s = 1   (reverse KL: a = 0, b = 1)
//     kMixBoth:            lm = logaddexp(log w_p + lp, log w_q + lq), one exp and one
//                          log1p per class, finite whatever the log-probs (no log 0 of
//                          an underflowed m: Liger's NaN below -104 cannot happen).
// kind 1 (TVD): soft_c = 0.5 |p - q|, G_c = 0.5 q sign(q - p), H_c = 0.5 p sign(p - q).
// Gradients of the row (x = s / T, y = t / T):
//   dsoft/dx_c = G_c - q_c sum G,   dsoft/dy_c = H_c - p_c sum H
// In kMixQ sum G = -(a + b) and in kMixP sum H = -(a + b) (sum p = sum q = 1), so
// those gradients need no second pass (div_sum_g_known / div_sum_h_known).
//
// Top-k teacher (K log-probs taken as given, ids -1 = padding): the same bucket math
// over the K ids plus a tail (topk_mode 1) or over the K ids renormalised (mode 2);
// the row-level pieces are div_topk_* below.
#pragma once
#include <math.h>
#include <stdint.h>

#include "kd_math.h"  // FASTKD_HD, rescale, raw_gap, kd_shift, where_positive

#if !defined(__CUDACC__)
#include "cpu/vec_exp.h"  // vexp (include this header after the torch headers: see vec_exp.h)
#endif

namespace fastkd {

enum DivKind { kDivKL = 0, kDivTVD = 1 };
enum DivMix { kMixQ = 0, kMixP = 1, kMixBoth = 2 };
enum DivTopk { kTopkNone = 0, kTopkTail = 1, kTopkRenorm = 2 };

// exp on the per-element paths: the fast hardware exp on the GPU, the vectorisable
// polynomial (csrc/cpu/vec_exp.h, relative error < 2e-7) on the CPU.
FASTKD_HD float div_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#elif defined(__CUDACC__)
  return expf(x);
#else
  return vexp(x);
#endif
}

// log(1 + e) for e in [0, 1] (the logaddexp correction). On the CPU a branch-free
// series that vectorises: log(1 + e) = 2 atanh(z), z = e / (2 + e) in [0, 1/3], so
// z^2 <= 1/9 and eight odd terms leave a truncation error below 2e-9 relative; it is
// exact to rounding for small e (log(1 + e) ~ e), which a log(1 + e) would not be.
FASTKD_HD float div_log1p_unit(float e) {
#if defined(__CUDACC__)
  return log1pf(e);
#else
  const float z = e / (2.0f + e), z2 = z * z;
  float poly = 1.0f / 15.0f;
  poly = poly * z2 + 1.0f / 13.0f;
  poly = poly * z2 + 1.0f / 11.0f;
  poly = poly * z2 + 1.0f / 9.0f;
  poly = poly * z2 + 1.0f / 7.0f;
  poly = poly * z2 + 1.0f / 5.0f;
  poly = poly * z2 + 1.0f / 3.0f;
  poly = poly * z2 + 1.0f;
  return 2.0f * z * poly;
#endif
}

// The coefficients of one call. log_wp / log_wq are used in kMixBoth only (both > 0 there).
struct DivParams {
  float a, b, w_p, w_q, log_wp, log_wq;
  int kind, mix;
};

FASTKD_HD int div_mix_mode(float w_p, float w_q) {
  return w_p == 0.0f ? kMixQ : (w_q == 0.0f ? kMixP : kMixBoth);
}

FASTKD_HD DivParams div_params(int kind, float a, float b, float w_p, float w_q) {
  DivParams d;
  d.a = a, d.b = b, d.w_p = w_p, d.w_q = w_q;
  d.log_wp = w_p > 0.0f ? logf(w_p) : -INFINITY;
  d.log_wq = w_q > 0.0f ? logf(w_q) : -INFINITY;
  d.kind = kind;
  d.mix = div_mix_mode(w_p, w_q);
  return d;
}

// sum_c G_c / sum_c H_c when they are known without summing (see the header comment).
FASTKD_HD bool div_sum_g_known(int kind, int mix) { return kind == kDivKL && mix == kMixQ; }
FASTKD_HD bool div_sum_h_known(int kind, int mix) { return kind == kDivKL && mix == kMixP; }
FASTKD_HD float div_known_sum(const DivParams& d) { return -(d.a + d.b); }

// One class (or bucket): its share of the loss and its G, H (see the header comment).
struct DivTerms {
  float soft, g, h;
};

// log m and the two mixture derivatives r = d lm / d lq, s = d lm / d lp.
struct DivMixture {
  float lm, r, s;
};

template <int kMix>
FASTKD_HD DivMixture div_mixture(const DivParams& d, float p, float q, float lp, float lq) {
  DivMixture x;
  if (kMix == kMixQ) {
    x.lm = lq, x.r = 1.0f, x.s = 0.0f;
  } else if (kMix == kMixP) {
    x.lm = lp, x.r = 0.0f, x.s = 1.0f;
  } else {
    // logaddexp(A, B) = max + log1p(exp(-|A - B|)); the larger side's share of m is 1 / (1 + e)
    const float A = d.log_wp + lp, B = d.log_wq + lq;
    const bool p_side = A >= B;
    const float hi = p_side ? A : B, lo = p_side ? B : A;
    const float e = div_exp(lo - hi);  // 0 when one side has no mass (lo = -inf)
    const float inv = 1.0f / (1.0f + e);
    const bool any = p > 0.0f || q > 0.0f;  // p = q = 0: -inf - -inf would be NaN; the terms are 0 anyway
    x.lm = any ? hi + div_log1p_unit(e) : 0.0f;
    x.s = any ? (p_side ? inv : e * inv) : 0.0f;
    x.r = any ? (p_side ? e * inv : inv) : 0.0f;
  }
  return x;
}

FASTKD_HD float div_sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

template <int kKind, int kMix>
FASTKD_HD DivTerms div_terms(const DivParams& d, float p, float q, float lp, float lq) {
  DivTerms t;
  if (kKind == kDivTVD) {
    const float diff = q - p;
    t.soft = 0.5f * (diff < 0.0f ? -diff : diff);
    t.g = 0.5f * q * div_sign(diff);
    t.h = -0.5f * p * div_sign(diff);
    return t;
  }
  const DivMixture x = div_mixture<kMix>(d, p, q, lp, lq);
  // a coefficient of 0 drops its term (never 0 * inf = NaN)
  const float kl_p = d.a != 0.0f ? d.a * where_positive(p, p * (lp - x.lm)) : 0.0f;
  const float kl_q = d.b != 0.0f ? d.b * where_positive(q, q * (lq - x.lm)) : 0.0f;
  const float apbq = d.a * p + d.b * q;
  t.soft = kl_p + kl_q;
  t.g = kl_q - x.r * apbq;
  t.h = kl_p - x.s * apbq;
  return t;
}

// Runtime-dispatched div_terms (for code that handles one bucket at a time, e.g. the tail).
FASTKD_HD DivTerms div_terms_any(const DivParams& d, float p, float q, float lp, float lq) {
  if (d.kind == kDivTVD) return div_terms<kDivTVD, kMixBoth>(d, p, q, lp, lq);
  if (d.mix == kMixQ) return div_terms<kDivKL, kMixQ>(d, p, q, lp, lq);
  if (d.mix == kMixP) return div_terms<kDivKL, kMixP>(d, p, q, lp, lq);
  return div_terms<kDivKL, kMixBoth>(d, p, q, lp, lq);
}

// H / p of one bucket, formed without dividing by p (the top-k tail's teacher
// gradient: dlp_tail / dlp_k = -p_k / p_tail, so it needs H_tail / p_tail even when
// p_tail is tiny). 0 where p == 0 (the tail term of the contract).
FASTKD_HD float div_h_over_p(const DivParams& d, float p, float q, float lp, float lq) {
  if (!(p > 0.0f)) return 0.0f;
  if (d.kind == kDivTVD) return -0.5f * div_sign(q - p);
  if (d.mix == kMixQ) return d.a * (lp - lq);                      // H = a p (lp - lq)
  if (d.mix == kMixP) return -(d.a + d.b * expf(lq - lp));        // H = -(a p + b q)
  const DivMixture x = div_mixture<kMixBoth>(d, p, q, lp, lq);
  // s / p = w_p / m = exp(log w_p - lm)
  return d.a * (lp - x.lm) - expf(d.log_wp - x.lm) * (d.a * p + d.b * q);
}

// ---------------------------------------------------------------------------
// Row statistics: a running log-sum-exp with its maximum in raw units.
// z = sum exp((x - m) * inv_t) over the values pushed (0 when empty, m = -inf).
struct DivLse {
  float m, z;
};

FASTKD_HD DivLse div_lse_empty() { return {-INFINITY, 0.0f}; }

// Adds part (relative to its own maximum) into acc; both may be empty.
FASTKD_HD void div_lse_merge(DivLse& acc, const DivLse& part, float inv_t) {
  const float m = max_ignoring_nan(acc.m, part.m);
  const float fa = acc.z > 0.0f ? expf(raw_gap(acc.m, m) * inv_t) : 0.0f;
  const float fp = part.z > 0.0f ? expf(raw_gap(part.m, m) * inv_t) : 0.0f;
  acc.z = acc.z * fa + part.z * fp;  // a NaN sum stays NaN (NaN * 0 is NaN)
  acc.m = m;
}

// One value into a running DivLse (online softmax, one exp unless the maximum moves).
FASTKD_HD void div_lse_push(DivLse& st, float x, float inv_t) {
  if (x > st.m) {
    st.z = (st.m == -INFINITY ? 0.0f : st.z * div_exp((st.m - x) * inv_t)) + 1.0f;
    st.m = x;
  } else if (st.m != -INFINITY || x != x) {
    st.z += div_exp((x - st.m) * inv_t);
  }
}

// log of the sum, relative to m: lse = m * inv_t + div_lse_log(st). -inf when empty.
FASTKD_HD float div_lse_log(const DivLse& st) { return logf(st.z); }

// log-prob (x - M) / T - L of one raw logit against the row's (M, L = log z).
FASTKD_HD float div_log_prob(float x, float m, float inv_t, float l) { return kd_shift(x, m, inv_t) - l; }

// Cross-entropy of one row at T = 1 from its (M, z) at unit scale: lse(s) - s[target].
FASTKD_HD float div_ce_hard(const DivLse& st1, float s_target) {
  return logf(st1.z) - (s_target == st1.m ? 0.0f : s_target - st1.m);
}

// ---------------------------------------------------------------------------
// Top-k pieces.

// log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012).
FASTKD_HD float div_log1mexp(float x) {
  return x > -0.693147180559945f ? logf(-expm1f(x)) : log1pf(-expf(x));
}

// Teacher tail log-prob log(1 - sum_k p_k) from lse_k(lp) (div_topk_teacher_lse);
// -inf when the top-k mass is >= 1 (an engine's rounding may push it a hair over).
FASTKD_HD float div_topk_teacher_tail(float lse_p) {
  return lse_p >= 0.0f ? -INFINITY : div_log1mexp(lse_p);
}

// lse over the non-padding log-probs of a row, accurate when it is close to 0: the
// first maximum contributes exactly 1 and only the others are summed, so
// log(1 + sum) keeps a remaining mass of 1e-9 (plain logsumexp rounds it to 0).
// -inf for a row of padding only. lp: K float32 log-probs; ids: K ids (-1: padding).
FASTKD_HD float div_topk_teacher_lse(const float* lp, const int64_t* ids, int64_t K) {
  float m = -INFINITY;
  int64_t arg = -1;
  for (int64_t k = 0; k < K; ++k) {
    if (ids[k] >= 0 && (arg < 0 || lp[k] > m)) m = lp[k], arg = k;
  }
  if (arg < 0 || m == -INFINITY) return m == m ? -INFINITY : m;
  float others = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    if (ids[k] >= 0 && k != arg) others += expf(lp[k] - m);
  }
  return m + log1pf(others);
}

// Student tail log-prob from the full row's (M_s, z_s) and the tail's own (M_tail,
// z_tail) (both at 1/T): lse(x over non-members) - lse(x), summed over the non-member
// ids themselves (never total - top-k, which cancels when the top-k holds the mass).
// -inf when the tail is empty.
FASTKD_HD float div_topk_student_tail(const DivLse& full, const DivLse& tail, float inv_t) {
  if (!(tail.z > 0.0f)) return tail.z == tail.z ? -INFINITY : tail.z;
  return raw_gap(tail.m, full.m) * inv_t + logf(tail.z) - logf(full.z);
}

// The student gradient of the dense row behind a top-k bucket set, times
// coef = w soft_scale / T (x-space as the dense case):
//   member c = id_k:  coef (G_k - q_c sum G)                    (div_topk_member_grad)
//   non-member c:     coef (exp(x_c - lse_tail) G_tail - q_c sum G)
// exp(x_c - lse_tail) is formed from the tail's own statistics, so a tail far below
// float32 resolution of the total keeps its gradient.
FASTKD_HD float div_topk_member_grad(float coef, float g_k, float q_c, float sum_g) {
  return coef * (g_k - q_c * sum_g);
}
FASTKD_HD float div_topk_nonmember_grad(float coef, float tail_share, float g_tail, float q_c, float sum_g) {
  return coef * (tail_share * g_tail - q_c * sum_g);
}

// Teacher gradient (w.r.t. the given log-probs, no 1/T), times coef_t = w soft_scale:
//   tail mode:        coef_t (H_k - p_k H_tail / p_tail)   (h_tail_over_p: div_h_over_p of the tail)
//   renormalise mode: coef_t (H_k - p_k sum H)
FASTKD_HD float div_topk_teacher_grad(float coef_t, float h_k, float p_k, float factor) {
  return coef_t * (h_k - p_k * factor);
}

}  // namespace fastkd
