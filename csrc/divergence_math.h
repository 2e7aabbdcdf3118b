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
// kind 2 (two-sided KL, Jeffreys with a = b = 1): soft = a KL(p || q) + b KL(q || p),
//   soft_c = a p (lp - lq) + b q (lq - lp),  G_c = b q (lq - lp) - a p,  H_c = a p (lp - lq) - b q
//   (the + b q of G and the + a p of H are dropped, as in kind 0: multiples of q and p).
// kind 3 (triangular discrimination): soft_c = (p - q)^2 / (p + q) (0 where p + q = 0) = p + q - 4pq / (p + q);
//   with d = (p - q) / (p + q), u = q / (p + q), v = p / (p + q):
//   soft_c = (p - q) d,  G_c = -4 q v^2,  H_c = -4 p u^2
//   (the derivatives of -4pq / (p + q): q and p times the exact partials, -q d (3 - 2u) and p d (1 + 2u),
//   less q and p. Exact ones cancelled on a peaked row: where p ~ 1 and q ~ 0, H ~ p and H - p sum H lost
//   1e-3 of the teacher gradient in float32; -4 p u^2 has no cancellation. d, u, v in [-1, 1].)
// kind 7 (entropy-gated KL): soft = w KL(p || q) + (1 - w) KL(q || p) per row, with the gate
//   w = alpha_min + (alpha_max - alpha_min) sigmoid((H(p) / log V - tau) / scale), H(p) = -sum p lp
//   (the op's a, b, w_p, w_q carry alpha_min, alpha_max, tau, scale). The pass that sums the terms
//   sums KL(p || q), KL(q || p) and H(p) (div_gate_terms: three sums that do not depend on w), then
//   div_gate_row turns them into the row's soft loss, sum G, sum H and the kind-2 parameters
//   (a, b) = (w, 1 - w) with which the gradient pass evaluates G, H: w is held constant in both
//   gradients (it depends on the teacher alone, so the student gradient is exact; the teacher
//   gradient omits the gate's own derivative, as AKL does with its weights). Passes: statistics,
//   terms (+ H(p)), gradients; the CPU's dense rows sum all three as cross terms of the statistics
//   pass instead (two passes, as its kind 2).
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

enum DivKind { kDivKL = 0, kDivTVD = 1, kDivJeffreys = 2, kDivTriangular = 3 };
// The power divergences (kinds 4 and 6; 5 is internal: Renyi's gradient pass at the row's S, never an op
// argument) and the entropy-gated KL; appended kinds, never renumbered:
enum DivKindPower { kDivAB = 4, kDivRenyiGrad = 5, kDivRenyi = 6 };
enum DivKindGated { kDivEntropyGated = 7 };
// The largest kind a kernel accepts (its checks read `kind <= kDivLastKind`; 5 is not accepted: see div_kind_known).
constexpr int kDivLastKind = 7;
FASTKD_HD bool div_kind_known(int64_t kind) {
  return (kind >= kDivKL && kind <= kDivAB) || kind == kDivRenyi || kind == kDivEntropyGated;
}
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
// prop: a w_q == b w_p (JSD: a = w_p, b = w_q), so a p + b q = (a / w_p) m and the terms
// r (a p + b q) = (a / w_p) w_q q and s (a p + b q) = (a / w_p) w_p p are constant
// multiples of q and p: they add exactly 0 to G - q sum G and H - p sum H and are
// dropped from G and H (div_terms_delta). Kept, they made G and q sum G nearly cancel
// on the largest classes (relative gradient error 2e-5 in float32 at beta = 0.9).
// G and H are then the contract's G + c q, H + c p; every gradient formula of
// docs/design.md gives the same result with them (sum q = sum p = 1).
// Likewise, in kMixBoth G and H use lq - lm + log w_q and lp - lm + log w_p (a shift by a
// constant times q and p): on the largest classes lp - lm is close to -log w_p, and the
// unshifted H nearly cancelled against p sum H (5e-3 relative where the student is
// one-hot). The loss itself uses the unshifted differences. g_shift / h_shift: the
// constants c of G = G_contract + c q, H = H_contract + c p.
struct DivParams {
  float a, b, w_p, w_q, log_wp, log_wq;
  int kind, mix;
  bool prop;
  float g_shift, h_shift;
  // kind 4 (AB, see div_ab_terms): s = a + b; the soft form's side (0: q^s (k1 psi_a(d) + k2 psi_s(d)),
  // 1: p^s (k1 psi_b(-d) + k2 psi_s(-d))), its c1 (a or b) and weights; whether a class with q = 0
  // (p = 0) has a finite term (s > 0 and b > 0; s > 0 and a > 0)
  float pw_s, pw_c1, pw_k1, pw_k2, pw_side;
  bool pw_q0_finite, pw_p0_finite;
  // the same as per-element float tests (a select on a loop-invariant bool made GCC unswitch the CPU loop and
  // run a scalar copy, 7x slower): lim_q = -inf when the q = 0 term is finite (lq <= lim_q: q = 0 there), else
  // NaN (never true); soft there max(p^s inv_q, cap_q): (1 / (b s), 0) finite, (0, inf) infinite; likewise p
  float pw_lim_q, pw_lim_p, pw_inv_q, pw_inv_p, pw_cap_q, pw_cap_p, pw_inv_b;
  // reciprocals for the direct (|c x| > 1) forms, multiplied rather than divided per class (inf where the
  // parameter is 0: that form is never selected then)
  float pw_inv_a, pw_inv_c1sq, pw_inv_ssq;
  // the CPU's dense rows may take the loss as (sum G + sum H) / s, skipping the per-class psi forms, where s is
  // not small (|s| >= 1/2 and >= max(|a|, |b|) / 4): no worse a cancellation than a KL's sum of p (lp - lq)
  bool pw_sum_soft;
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
  d.prop = d.mix == kMixBoth && a * w_q == b * w_p;
  const bool both = kind == kDivKL && d.mix == kMixBoth;
  // with a == 0 or b == 0 the mixture part folds in too (div_terms_delta): one more unit
  const float plus1 = (d.prop || a == 0.0f || b == 0.0f) ? 1.0f : 0.0f;
  d.g_shift = both ? b * (d.log_wq + plus1) : 0.0f;
  d.h_shift = both ? a * (d.log_wp + plus1) : 0.0f;
  // AB: the soft form dividing by the larger of |a|, |b| (div_ab_terms); a = b = 0: d^2 / 2 (k1 = 0, k2 = 1)
  const float s = a + b;
  const bool side_p = fabsf(a) > fabsf(b);
  d.pw_s = s;
  d.pw_side = side_p ? 1.0f : 0.0f;
  d.pw_c1 = side_p ? b : a;
  const float div = side_p ? a : b;
  d.pw_k1 = div != 0.0f ? -d.pw_c1 / div : 0.0f;
  d.pw_k2 = div != 0.0f ? s / div : 1.0f;
  d.pw_q0_finite = s > 0.0f && b > 0.0f;
  d.pw_p0_finite = s > 0.0f && a > 0.0f;
  d.pw_lim_q = d.pw_q0_finite ? -INFINITY : NAN;
  d.pw_lim_p = d.pw_p0_finite ? -INFINITY : NAN;
  d.pw_inv_q = d.pw_q0_finite ? 1.0f / (b * s) : 0.0f;
  d.pw_inv_p = d.pw_p0_finite ? 1.0f / (a * s) : 0.0f;
  d.pw_cap_q = d.pw_q0_finite ? 0.0f : INFINITY;
  d.pw_cap_p = d.pw_p0_finite ? 0.0f : INFINITY;
  d.pw_inv_b = b != 0.0f ? 1.0f / b : 0.0f;
  d.pw_inv_a = 1.0f / a;
  d.pw_inv_c1sq = 1.0f / (d.pw_c1 * d.pw_c1);
  d.pw_inv_ssq = 1.0f / (s * s);
  d.pw_sum_soft = fabsf(s) >= 0.5f && 4.0f * fabsf(s) >= fmaxf(fabsf(a), fabsf(b));
  return d;
}

// Whether there is a soft loss at all: a = b = 0 in the KL family is the cross-entropy alone (soft 0).
FASTKD_HD bool div_soft_on(const DivParams& d) { return d.kind != kDivKL || d.a != 0.0f || d.b != 0.0f; }

// sum_c G_c / sum_c H_c when they are known without summing (see the header comment).
FASTKD_HD bool div_sum_g_known(int kind, int mix) { return kind == kDivKL && mix == kMixQ; }
FASTKD_HD bool div_sum_h_known(int kind, int mix) { return kind == kDivKL && mix == kMixP; }
FASTKD_HD float div_known_sum(const DivParams& d) { return -(d.a + d.b); }

// One class (or bucket): its share of the loss and its G, H (see the header comment).
struct DivTerms {
  float soft, g, h;
};

// The mixture of one class in the differences it is used through: lp - lm, lq - lm,
// r = d lm / d lq, s = d lm / d lp, from delta = lp - lq alone. Taking the
// differences from delta (not lp - lm from two log-probs) keeps their precision:
// each log-prob carries a rounding error of eps |lp| (a few 1e-6 at lp = -20),
// while lp - lm is often O(0.1) (JSD near beta = 1), so the direct difference lost
// a digit or two of the teacher gradient. Here lm = hi + log1p(e) with hi the larger
// of A = log w_p + lp and B = log w_q + lq, e = exp(-|A - B|), A - B = log w_p - log w_q + delta.
struct DivMixture {
  float dp, dq, r, s;  // lp - lm, lq - lm, d lm / d lq, d lm / d lp
  float gp, gq;        // the gradient's shifted differences (DivParams): dp + log w_p, dq + log w_q
};

template <int kMix>
FASTKD_HD DivMixture div_mixture(const DivParams& d, float p, float q, float delta) {
  DivMixture x;
  if (kMix == kMixQ) {
    x.dp = delta, x.dq = 0.0f, x.r = 1.0f, x.s = 0.0f;  // lm = lq
    x.gp = x.dp, x.gq = x.dq;
  } else if (kMix == kMixP) {
    x.dp = 0.0f, x.dq = -delta, x.r = 0.0f, x.s = 1.0f;  // lm = lp
    x.gp = x.dp, x.gq = x.dq;
  } else {
    const float ab = d.log_wp - d.log_wq + delta;  // A - B: +inf when q = 0, -inf when p = 0
    const bool p_side = ab >= 0.0f;
    const float e = div_exp(p_side ? -ab : ab);  // 0 when one side has no mass
    const float inv = 1.0f / (1.0f + e), l1p = div_log1p_unit(e);
    const bool any = p > 0.0f || q > 0.0f;  // p = q = 0: delta = -inf - -inf = NaN; the terms are 0 anyway
    x.dp = p_side ? -d.log_wp - l1p : delta - d.log_wq - l1p;
    x.dq = p_side ? -delta - d.log_wp - l1p : -d.log_wq - l1p;
    x.gp = p_side ? -l1p : ab - l1p;
    x.gq = p_side ? -ab - l1p : -l1p;
    x.s = any ? (p_side ? inv : e * inv) : 0.0f;
    x.r = any ? (p_side ? e * inv : inv) : 0.0f;
  }
  return x;
}

FASTKD_HD float div_sign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

// Which of the forms of div_terms_form a kMixBoth call uses (see DivParams): fixed
// per call, so a kernel can make it a template argument (the CPU loops do: a runtime
// branch per class kept GCC from vectorising them, 10x slower).
enum DivForm { kFormGeneral = 0, kFormProp = 1, kFormNoB = 2, kFormNoA = 3 };

FASTKD_HD int div_form(const DivParams& d) {
  if (d.mix != kMixBoth) return kFormGeneral;
  if (d.prop) return kFormProp;
  if (d.b == 0.0f) return kFormNoB;
  if (d.a == 0.0f) return kFormNoA;
  return kFormGeneral;
}

// One class from its probabilities and delta = lp - lq, with the form fixed at
// compile time (kForm = div_form(d); only used in kMixBoth).
template <int kKind, int kMix, int kForm>
FASTKD_HD DivTerms div_terms_form(const DivParams& d, float p, float q, float delta) {
  DivTerms t;
  if (kKind == kDivTVD) {
    const float diff = q - p;
    t.soft = 0.5f * (diff < 0.0f ? -diff : diff);
    t.g = 0.5f * q * div_sign(diff);
    t.h = -0.5f * p * div_sign(diff);
    return t;
  }
  if (kKind == kDivJeffreys) {  // a zero probability drops its side's term (delta is +-inf or NaN there)
    const float kl_p = d.a != 0.0f ? d.a * where_positive(p, p * delta) : 0.0f;
    const float kl_q = d.b != 0.0f ? d.b * where_positive(q, -q * delta) : 0.0f;
    t.soft = kl_p + kl_q;
    t.g = kl_q - d.a * p;
    t.h = kl_p - d.b * q;
    return t;
  }
  if (kKind == kDivTriangular) {
    // == 0, not > 0: a NaN probability stays NaN; two divisions, not a reciprocal: 1 / sum overflows
    // when p + q is subnormal (log-probs near -100)
    const float sum = p + q, safe = sum == 0.0f ? 1.0f : sum;
    const float dd = (p - q) / safe, u = q / safe, v = p / safe;
    t.soft = (p - q) * dd;
    t.g = -4.0f * q * v * v;
    t.h = -4.0f * p * u * u;
    return t;
  }
  const DivMixture x = div_mixture<kMix>(d, p, q, delta);
  // a coefficient of 0 drops its term (never 0 * inf = NaN)
  const float kl_p = d.a != 0.0f ? d.a * where_positive(p, p * x.dp) : 0.0f;
  const float kl_q = d.b != 0.0f ? d.b * where_positive(q, q * x.dq) : 0.0f;
  t.soft = kl_p + kl_q;
  if (kMix == kMixBoth) {  // the shifted forms (see DivParams)
    const float gq = d.b != 0.0f ? d.b * where_positive(q, q * x.gq) : 0.0f;
    const float gp = d.a != 0.0f ? d.a * where_positive(p, p * x.gp) : 0.0f;
    if (kForm == kFormProp) {  // the mixture terms are multiples of q and p
      t.g = gq, t.h = gp;
    } else if (kForm == kFormNoB) {  // skew KL: H = a p (gp - s) + a p = a p (gp + r) (r + s = 1), no cancellation
      t.g = -x.r * (d.a * p);
      t.h = d.a * where_positive(p, p * (x.gp + x.r));
    } else if (kForm == kFormNoA) {  // skew reverse KL: G = b q (gq - r) + b q = b q (gq + s)
      t.g = d.b * where_positive(q, q * (x.gq + x.s));
      t.h = -x.s * (d.b * q);
    } else {
      const float apbq = d.a * p + d.b * q;
      t.g = gq - x.r * apbq;
      t.h = gp - x.s * apbq;
    }
  } else {
    const float apbq = d.a * p + d.b * q;
    t.g = kl_q - x.r * apbq;
    t.h = kl_p - x.s * apbq;
  }
  return t;
}

// The same with the form chosen at run time (the preferred input: the CPU kernel
// forms delta from the raw logits, ((t - M_t) - (s - M_s)) / T + L_s - L_t).
template <int kKind, int kMix>
FASTKD_HD DivTerms div_terms_delta(const DivParams& d, float p, float q, float delta) {
  if (kKind == kDivKL && kMix == kMixBoth) {
    switch (div_form(d)) {
      case kFormProp: return div_terms_form<kKind, kMix, kFormProp>(d, p, q, delta);
      case kFormNoB: return div_terms_form<kKind, kMix, kFormNoB>(d, p, q, delta);
      case kFormNoA: return div_terms_form<kKind, kMix, kFormNoA>(d, p, q, delta);
      default: break;
    }
  }
  return div_terms_form<kKind, kMix, kFormGeneral>(d, p, q, delta);
}

// The same from the two log-probs.
template <int kKind, int kMix>
FASTKD_HD DivTerms div_terms(const DivParams& d, float p, float q, float lp, float lq) {
  return div_terms_delta<kKind, kMix>(d, p, q, lp - lq);
}

// ---------------------------------------------------------------------------
// The power divergences (kinds 4, 5, 6; docs/design.md "divergence_fwd"). With d = lp - lq,
// phi_c(x) = expm1(c x) / c (phi_0(x) = x) and psi_c(x) = (expm1(c x) - c x) / c^2 (psi_0(x) = x^2 / 2):
// kind 4 (AB divergence, a = alpha, b = beta, s = a + b; Amari's alpha divergence is b = 1 - a):
//   soft_c = -(1 / (a b)) [p^a q^b - (a / s) p^s - (b / s) q^s]
//          = q^s (k1 psi_a(d) + k2 psi_s(d)),  k1 = -a / b, k2 = s / b      (|b| >= |a|)
//          = p^s (k1 psi_b(-d) + k2 psi_s(-d)), k1 = -b / a, k2 = s / a     (|a| > |b|)
//   (a = b = 0: d^2 / 2). Dividing by the larger of |a|, |b| and using psi (no linear term) leaves no
//   cancellation in any limit of the parameters (a -> 0, b -> 0, s -> 0, all together): k1, k2 are in
//   [-1, 2], and where they differ in sign (a, b of one sign) the two psi terms cancel by at most a factor
//   ~|d| (2e-6 relative at |d| = 20). (G + H) / s, the form of the issue, loses 1 / (|s| |d|) digits near s = 0;
//   the CPU's dense rows take the row's loss as (sum G + sum H) / s where |s| >= 1/2 and >= max(|a|, |b|) / 4
//   (DivParams::pw_sum_soft: a relative error of about eps / |d|, a KL's), saving the per-class psi forms.
//   G_c = q dsoft/dq = -q^s phi_a(d),  H_c = p dsoft/dp = -p^s phi_b(-d)   (exact: nothing dropped)
//   Each term is built from three exps, q^s, p^s, p^a q^b, of s l + (multiples of d), l the larger log-prob
//   (one base, so their ratios carry d's precision, and the base's rounding is small), never as a product of
//   an overflowing and an underflowing factor; psi, phi by a polynomial where |c x| <= 1 (div_p1, div_p2), else from the exps.
//   Zero probabilities: p = q = 0 adds 0; q = 0 < p: soft = p^s / (b s), G = 0, H = p^s / b when s > 0 and
//   b > 0, else soft = +inf (the divergence is infinite) and G = H = 0 (a constant term, as the reference's
//   autograd sees it); p = 0 < q likewise with a.
// kind 6 (Renyi of order r > 0, a = r, b = 1 for the reverse (p and q swapped), w_p, w_q unused):
//   with (x, y) = (p, q) (or (q, p) reversed), e = ly - lx, c = 1 - r:
//   soft = log(S) / (r - 1), S = 1 + c U, U = sum x phi_c(e)  (= sum (x^r y^c - x) / c), so
//   soft = -U log1p(c U) / (c U) (-U at c U = 0: r -> 1 is KL(x || y) with no cancellation).
//   The terms pass sums U and S (div_renyi_terms: t = x phi_c(e) in soft, x^r y^c in g); div_renyi_row turns
//   them into the row's soft loss (log(S) / (r - 1) where S < 1/2), sum G, sum H and the parameters of kind 5,
//   the gradient pass at known S:
//   on the x side G_x = -r t / S (sum -r U / S), on the y side G_y = -x^r y^c / S (sum -1); the exact
//   derivatives less p / S on the teacher side when x = p (nothing on the student side). Zero
//   probabilities: x = 0 adds 0; y = 0 < x: t = -x / c for r < 1, -inf for r >= 1 (soft +inf).

// expm1(y) / y and (expm1(y) - y) / y^2 for |y| <= 1 (Taylor; truncation below 3e-9 relative). y is
// clamped to [-1, 1] so that the unselected lane of a branch-free select stays finite.
FASTKD_HD float div_p1(float y) {
  y = y < -1.0f ? -1.0f : (y > 1.0f ? 1.0f : y);
  float r = 1.0f / 39916800.0f;  // 1 / 11!
  r = r * y + 1.0f / 3628800.0f;
  r = r * y + 1.0f / 362880.0f;
  r = r * y + 1.0f / 40320.0f;
  r = r * y + 1.0f / 5040.0f;
  r = r * y + 1.0f / 720.0f;
  r = r * y + 1.0f / 120.0f;
  r = r * y + 1.0f / 24.0f;
  r = r * y + 1.0f / 6.0f;
  r = r * y + 0.5f;
  return r * y + 1.0f;
}
FASTKD_HD float div_p2(float y) {
  y = y < -1.0f ? -1.0f : (y > 1.0f ? 1.0f : y);
  float r = 1.0f / 479001600.0f;  // 1 / 12!
  r = r * y + 1.0f / 39916800.0f;
  r = r * y + 1.0f / 3628800.0f;
  r = r * y + 1.0f / 362880.0f;
  r = r * y + 1.0f / 40320.0f;
  r = r * y + 1.0f / 5040.0f;
  r = r * y + 1.0f / 720.0f;
  r = r * y + 1.0f / 120.0f;
  r = r * y + 1.0f / 24.0f;
  r = r * y + 1.0f / 6.0f;
  return r * y + 0.5f;
}

FASTKD_HD bool div_big(float y) { return y > 1.0f || y < -1.0f; }

// kind 4: one class from its log-probs and d = lp - lq (see above). kGuard = false leaves out the zero-probability
// selects (the class then comes out NaN or inf): the CPU's simd loops use it and redo a chunk whose sums are not
// finite with the guards (GCC kept the guarded loop scalar: 20 ns per class instead of 3).
// The unguarded terms from the three exps q^s, p^s, p^a q^b and d (div_ab_terms; kNoSoft: G, H only).
template <bool kNoSoft = false>
FASTKD_HD DivTerms div_ab_from_exps(const DivParams& dp, float qs, float ps, float pab, float delta) {
  const float a = dp.a, b = dp.b, s = dp.pw_s, c1 = dp.pw_c1;
  const float ad = a * delta, bd = b * delta, sd = s * delta;
  DivTerms t;
  t.g = div_big(ad) ? (qs - pab) * dp.pw_inv_a : -qs * delta * div_p1(ad);
  t.h = div_big(bd) ? (ps - pab) * dp.pw_inv_b : ps * delta * div_p1(-bd);
  if (kNoSoft) {  // (the caller forms the loss from sum G + sum H; unguarded only)
    t.soft = 0.0f;
    return t;
  }
  const bool side_p = dp.pw_side != 0.0f;
  const float w = side_p ? ps : qs, wo = side_p ? qs : ps, e = side_p ? -delta : delta;
  const float c1e = c1 * e, se = side_p ? -sd : sd;
  const float x1 = div_big(c1e) ? (pab - w - c1e * w) * dp.pw_inv_c1sq : w * e * e * div_p2(c1e);
  const float x2 = div_big(se) ? (wo - w - se * w) * dp.pw_inv_ssq : w * e * e * div_p2(se);
  t.soft = dp.pw_k1 * x1 + dp.pw_k2 * x2;
  return t;
}

template <bool kGuard = true, bool kNoSoft = false>
FASTKD_HD DivTerms div_ab_terms(const DivParams& dp, float lp, float lq, float delta) {
  const float a = dp.a, b = dp.b, s = dp.pw_s;
  const bool q0 = lq == -INFINITY, p0 = lp == -INFINITY;
  // the three exponents from the larger log-prob and d (s l p = s l q + s d, a l p + b l q = s l q + a d =
  // s l p - b d): their rounding is that of the larger log-prob (near 0), not of one near -1000
  const bool p_hi = lp >= lq;  // (q = 0: p's side, whose exps of s l q etc. come out 0 for s > 0)
  const float base = s * (p_hi ? lp : lq);
  const float qs = div_exp(p_hi ? base - s * delta : base);
  const float ps = div_exp(p_hi ? base : base + s * delta);
  const float pab = div_exp(p_hi ? base - b * delta : base + a * delta);
  DivTerms t = div_ab_from_exps<kNoSoft>(dp, qs, ps, pab, delta);
  if (!kGuard) return t;
  // zero probabilities (the formulas meet 0 * inf there); fmaxf: a NaN product (inf * 0) gives the cap
  // an infinite term is a constant (G = H = 0 there, as the reference's autograd has it)
  const bool q0_fin = lq <= dp.pw_lim_q, p0_fin = lp <= dp.pw_lim_p;
  const float soft_q0 = fmaxf(ps * dp.pw_inv_q, dp.pw_cap_q), soft_p0 = fmaxf(qs * dp.pw_inv_p, dp.pw_cap_p);
  t.soft = q0 ? (p0 ? 0.0f : soft_q0) : (p0 ? soft_p0 : t.soft);
  t.g = (q0 | (p0 & !p0_fin)) ? 0.0f : t.g;
  t.h = (p0 | (q0 & !q0_fin)) ? 0.0f : (q0 ? ps * dp.pw_inv_b : t.h);
  return t;
}

// kind 4 at s = a + b = 1 (Amari's alpha divergence; DivParams::pw_s == 1 exactly): q^s and p^s are the
// probabilities q, p themselves, so a caller that has them (the CPU's kept exps) passes them and p^a q^b is the
// only exp (from the larger log-prob, as div_ab_terms). Unguarded (div_ab_terms<false>).
template <bool kNoSoft = false>
FASTKD_HD DivTerms div_ab_terms_unit(const DivParams& dp, float p, float q, float lp, float lq, float delta) {
  const float pab = div_exp(lp >= lq ? lp - dp.b * delta : lq + dp.a * delta);
  return div_ab_from_exps<kNoSoft>(dp, q, p, pab, delta);
}

// kind 6 (terms pass) and kind 5 (gradient pass): t = x phi_c(e) and x^r y^c of one class, with
// (x, y, e) from the orientation rev (0: x = p; 1: x = q); c = 1 - r.
struct DivRenyiParts {
  float t, xy;
};

// x: exp(lx) (div_renyi_parts), or the CPU's kept exp of it (one exp less per class).
FASTKD_HD DivRenyiParts div_renyi_parts_x(float r, bool rev, float x, float lp, float lq, float delta) {
  const float c = 1.0f - r;
  const float lx = rev ? lq : lp, ly = rev ? lp : lq, e = rev ? delta : -delta;
  const bool x0 = lx == -INFINITY, y0 = ly == -INFINITY;
  const float xy = div_exp(lx + c * e);
  const float ce = c * e;
  const float inv_c = 1.0f / c;  // (loop-invariant: hoisted, a multiply per class)
  float t = div_big(ce) ? (xy - x) * inv_c : x * e * div_p1(ce);
  t = y0 ? (c > 0.0f ? -x * inv_c : -INFINITY) : t;  // x^r y^c = 0 (r < 1) or inf (r > 1); r = 1: -x log 0
  DivRenyiParts o;
  o.t = x0 ? 0.0f : t;
  o.xy = x0 ? 0.0f : xy;
  return o;
}

FASTKD_HD DivRenyiParts div_renyi_parts(float r, bool rev, float lp, float lq, float delta) {
  return div_renyi_parts_x(r, rev, div_exp(rev ? lq : lp), lp, lq, delta);
}

// kind 6: the terms pass's share of one class, t in soft (summed into U), x^r y^c in g.
FASTKD_HD DivTerms div_renyi_terms(const DivParams& d, float lp, float lq, float delta) {
  const DivRenyiParts o = div_renyi_parts(d.a, d.b != 0.0f, lp, lq, delta);
  DivTerms t;
  t.soft = o.t, t.g = o.xy, t.h = 0.0f;
  return t;
}

// Renyi's row from U and s_direct = sum x^r y^c (the terms pass's soft and g sums): the loss, sum G, sum H and
// kind 5's parameters (a, b, w_p, w_q) = (r, reverse, 1 / S, U). S = 1 + c U (clamped at 0) where s_direct >= 1/2
// (no cancellation near r = 1), else s_direct itself and soft = log(S) / (r - 1) (1 + c U would cancel to eps when
// the distributions barely overlap). S = 0 (no overlap, r < 1) or an infinite U gives +inf; so does an S below
// float32's range (a divergence above about 87 / |1 - r|).
struct DivRenyiRow {
  DivParams d;
  float soft, sum_g, sum_h;
};

FASTKD_HD DivRenyiRow div_renyi_row(const DivParams& d, float u, float s_direct) {
  const float r = d.a, c = 1.0f - r;
  const bool rev = d.b != 0.0f;
  float x = c * u;
  x = x < -1.0f ? -1.0f : x;  // a NaN stays NaN
  const float ratio = (c == 0.0f || x == 0.0f) ? 1.0f : log1pf(x) / x;
  // S far below 1: 1 + c U keeps only eps of it (absolute), the direct sum keeps its digits (relative)
  const bool direct = s_direct < 0.5f && u != 0.0f;  // (U = S = 0: a row without buckets, loss 0)
  float inv_s = 1.0f / (direct ? s_direct : 1.0f + x);
  DivRenyiRow o;
  o.soft = direct ? logf(s_direct) / (r - 1.0f) : ((u == INFINITY || u == -INFINITY) ? INFINITY : -u * ratio);
  // the x side's sum: -r U / S, or (direct) r / (r - 1) (see div_renyi_grad_terms)
  float x_side = direct ? r / (r - 1.0f) : -r * u * inv_s, y_side = -1.0f;
  if (o.soft == INFINITY) inv_s = x_side = y_side = 0.0f;  // an infinite row is a constant: gradients 0 (kind 5)
  o.sum_g = rev ? x_side : y_side;
  o.sum_h = rev ? y_side : x_side;
  o.d = div_params(kDivRenyiGrad, r, rev ? 1.0f : 0.0f, inv_s, direct ? 1.0f : 0.0f);
  return o;
}

// kind 5: G, H of one class at the row's S (w_p = 1 / S; soft 0: the loss came from U). The x side is
// -r t / S (the exact derivative r x^r y^c / ((r - 1) S) less r x / ((r - 1) S): no cancellation near r = 1),
// except on a direct row (w_q = 1, S < 1/2), where -r (t - x U) / S would cancel (t and x U both ~ -x / c,
// their difference ~S): there the exact r x^r y^c / ((r - 1) S), sum r / (r - 1).
FASTKD_HD DivTerms div_renyi_grad_terms(const DivParams& d, float lp, float lq, float delta) {
  const bool rev = d.b != 0.0f;
  const DivRenyiParts o = div_renyi_parts(d.a, rev, lp, lq, delta);
  const bool dead = d.w_p == 0.0f;  // an infinite row (div_renyi_row): gradients 0
  const float x_side = dead ? 0.0f : (d.w_q != 0.0f ? d.a * o.xy * d.w_p / (d.a - 1.0f) : -d.a * o.t * d.w_p);
  const float y_side = dead ? 0.0f : -o.xy * d.w_p;
  DivTerms t;
  t.soft = 0.0f;
  t.g = rev ? x_side : y_side;
  t.h = rev ? y_side : x_side;
  return t;
}

// Runtime-dispatched div_terms (for code that handles one bucket at a time, e.g. the tail).
FASTKD_HD DivTerms div_gate_terms(float p, float q, float lp, float delta);
FASTKD_HD DivTerms div_terms_any(const DivParams& d, float p, float q, float lp, float lq) {
  if (d.kind == kDivEntropyGated) return div_gate_terms(p, q, lp, lp - lq);
  if (d.kind == kDivAB) return div_ab_terms(d, lp, lq, lp - lq);
  if (d.kind == kDivRenyi) return div_renyi_terms(d, lp, lq, lp - lq);
  if (d.kind == kDivRenyiGrad) return div_renyi_grad_terms(d, lp, lq, lp - lq);
  if (d.kind == kDivTVD) return div_terms<kDivTVD, kMixBoth>(d, p, q, lp, lq);
  if (d.kind == kDivJeffreys) return div_terms<kDivJeffreys, kMixBoth>(d, p, q, lp, lq);
  if (d.kind == kDivTriangular) return div_terms<kDivTriangular, kMixBoth>(d, p, q, lp, lq);
  if (d.mix == kMixQ) return div_terms<kDivKL, kMixQ>(d, p, q, lp, lq);
  if (d.mix == kMixP) return div_terms<kDivKL, kMixP>(d, p, q, lp, lq);
  return div_terms<kDivKL, kMixBoth>(d, p, q, lp, lq);
}

// ---------------------------------------------------------------------------
// Entropy-gated KL (kind 7; see the header comment).

// One class's share of the three sums of the terms pass: {KL(p || q), KL(q || p), H(p)} in the
// fields {soft, g, h}; a zero probability adds 0 (its log-prob is -inf: never 0 * inf), a NaN one NaN.
FASTKD_HD DivTerms div_gate_terms(float p, float q, float lp, float delta) {
  DivTerms t;
  t.soft = where_positive(p, p * delta);
  t.g = where_positive(q, -q * delta);
  t.h = where_positive(p, -p * lp);
  return t;
}

// The row's gate w from its teacher entropy H and the vocabulary size V (the whole vocabulary's,
// also on a shard); H / log V is taken as 0 for V = 1 (H = 0 there). Both exps of the sigmoid are
// of a non-positive number (no overflow for any scale); a NaN entropy gives a NaN gate.
FASTKD_HD float div_gate_weight(const DivParams& d, float entropy, int64_t V) {
  const float h_norm = V > 1 ? entropy / logf(static_cast<float>(V)) : 0.0f;
  const float x = (h_norm - d.w_p) / d.w_q;  // (H / log V - tau) / scale
  const float e = expf(-fabsf(x));
  const float sig = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  return x != x ? x : d.a + (d.b - d.a) * sig;  // alpha_min + (alpha_max - alpha_min) sigmoid
}

// What the gradient pass needs of a gated row: the kind-2 parameters (a, b) = (w, 1 - w), the soft
// loss and the sums of G, H (kind 2's: sum G = b KL(q || p) - a, sum H = a KL(p || q) - b; a weight
// of 0 drops its KL, never 0 * inf).
struct DivGateRow {
  DivParams d;
  float soft, sum_g, sum_h;
};

// The same for kind 2 itself at its own (a, b) (a row whose two KLs are known: the CPU's dense rows sum them in
// the statistics pass).
FASTKD_HD DivGateRow div_two_kl_row(const DivParams& d, float kl_pq, float kl_qp) {
  DivGateRow r;
  r.d = d;
  const float fwd = d.a != 0.0f ? d.a * kl_pq : 0.0f, rev = d.b != 0.0f ? d.b * kl_qp : 0.0f;
  r.soft = fwd + rev;
  r.sum_g = rev - d.a;
  r.sum_h = fwd - d.b;
  return r;
}

FASTKD_HD DivGateRow div_gate_row(const DivParams& gate, float kl_pq, float kl_qp, float entropy, int64_t V) {
  const float w = div_gate_weight(gate, entropy, V);
  return div_two_kl_row(div_params(kDivJeffreys, w, 1.0f - w, 0.0f, 0.0f), kl_pq, kl_qp);
}

// H / p of one bucket (H as div_terms_delta gives it), formed without dividing by p
// (the top-k tail's teacher gradient: dlp_tail / dlp_k = -p_k / p_tail, so it needs
// H_tail / p_tail even when p_tail is tiny). Where p == 0 (the teacher's top-k mass
// clamped at 1) the tail does not depend on the log-probs, and d/dlp_k of
// a p_k (lp_k - lm_k) keeps the "+ a p_k" that G and H drop (it cancels against the
// tail's -p_k / p_tail only while the tail is live): the gradient is then
// H_k + a p_k (KL family; TVD: H_k), so this returns h_shift - a (H_k - p_k (h_shift - a)).
// (docs/design.md says "the tail term is 0 when p_tail = 0", which misses the a p_k.) The two-sided
// KL drops the same a p (kind 2: h_shift is 0), the triangular H drops p (factor -1); TVD's H is whole.
FASTKD_HD float div_h_over_p(const DivParams& d, float p, float q, float lp, float lq) {
  if (p != p) return p;  // a NaN teacher tail (a NaN log-prob): every slot's gradient is NaN
  if (d.kind == kDivAB) {  // H exact: nothing to add back when p = 0; else -p^(s - 1) phi_b(-d)
    if (!(p > 0.0f)) return 0.0f;
    const float delta = lp - lq, bd = d.b * delta, ps1 = expf((d.pw_s - 1.0f) * lp);
    return div_big(bd) ? (ps1 - expf((d.a - 1.0f) * lp + d.b * lq)) / d.b : ps1 * delta * div_p1(-bd);
  }
  if (d.kind == kDivRenyiGrad) {  // (w_p = 1 / S) x = p: H = H_exact - p / S, so -1 / S at p = 0; x = q: exact
    const bool rev = d.b != 0.0f, direct = d.w_q != 0.0f;  // direct rows: H exact on both sides
    if (!(p > 0.0f) || d.w_p == 0.0f) return (rev || direct) ? 0.0f : -d.w_p;
    if (rev) return -expf(d.a * (lq - lp)) * d.w_p;  // H / p = -(q / p)^r / S
    if (direct) return d.a * expf((1.0f - d.a) * (lq - lp)) * d.w_p / (d.a - 1.0f);  // r (q / p)^c / ((r - 1) S)
    const float c = 1.0f - d.a, e = lq - lp, ce = c * e;
    const float phi = lq == -INFINITY ? (c > 0.0f ? -1.0f / c : -INFINITY)
                                      : (div_big(ce) ? expm1f(ce) / c : e * div_p1(ce));
    return -d.a * phi * d.w_p;
  }
  if (!(p > 0.0f)) {
    if (d.kind == kDivKL || d.kind == kDivJeffreys) return d.h_shift - d.a;
    return d.kind == kDivTriangular ? -1.0f : 0.0f;
  }
  if (d.kind == kDivTVD) return -0.5f * div_sign(q - p);
  const float delta = lp - lq;
  if (d.kind == kDivJeffreys) return d.a * delta - d.b * expf(-delta);  // H = a p delta - b q
  if (d.kind == kDivTriangular) {  // H / p = -4 u^2
    const float u = q / (p + q);
    return -4.0f * u * u;
  }
  if (d.mix == kMixQ) return d.a * delta;                          // H = a p (lp - lq)
  if (d.mix == kMixP) return -(d.a + d.b * expf(-delta));         // H = -(a p + b q)
  const DivMixture x = div_mixture<kMixBoth>(d, p, q, delta);
  // as div_terms_delta; s / p = w_p / m = exp(log w_p - lm), with lm = lp - (lp - lm)
  if (d.prop) return d.a * x.gp;
  if (d.b == 0.0f) return d.a * (x.gp + x.r);
  return d.a * x.gp - expf(d.log_wp + x.dp - lp) * (d.a * p + d.b * q);
}

// TVD gradients without cancellation. G - q sum G = 0.5 q (sign(q - p) - (Q+ - Q-)),
// Q+ / Q- the student mass where q > p / q < p; when most mass sits on one side
// Q+ - Q- is close to +-1 and the difference loses digits (1e-5 in float32). With
// the tie mass Z = sum of q where q == p (= that of p), 1 - Q+ = Q- + Z exactly, so
//   q > p:  0.5 q (Z + 2 Q-),   q < p:  -0.5 q (Z + 2 Q+),   q == p:  0.5 q (Q- - Q+)
// and the same for the teacher with the roles of p and q swapped.
struct DivTvdSums {
  float q_lt, q_gt, p_lt, p_gt, tie;  // sum of q where q < p, q > p; of p where p < q, p > q; of p where p == q
};

// The bracket of the student (x = q, y = p) or teacher (x = p, y = q) gradient: times 0.5 x coef.
FASTKD_HD float div_tvd_factor(float x, float y, float x_lt, float x_gt, float tie) {
  return x > y ? tie + 2.0f * x_lt : (x < y ? -(tie + 2.0f * x_gt) : x_lt - x_gt);
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
    // while m is -inf, z is 0 or NaN (a NaN pushed first): a NaN must survive the first finite value
    st.z = (st.m == -INFINITY ? (st.z == st.z ? 0.0f : st.z) : st.z * div_exp((st.m - x) * inv_t)) + 1.0f;
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

// log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012); in double (see below).
FASTKD_HD double div_log1mexp(double x) {
  return x > -0.693147180559945 ? log(-expm1(x)) : log1p(-exp(x));
}

// Teacher tail log-prob log(1 - sum_k p_k) from lse_k(lp) (div_topk_teacher_lse);
// -inf when the top-k mass is >= 1 (an engine's rounding may push it a hair over).
FASTKD_HD float div_topk_teacher_tail(double lse_p) {
  return lse_p >= 0.0 ? -INFINITY : static_cast<float>(div_log1mexp(lse_p));
}

// lse over the non-padding log-probs of a row, accurate when it is close to 0: the
// first maximum contributes exactly 1 and only the others are summed, so
// log(1 + sum) keeps a remaining mass of 1e-9 (plain logsumexp rounds it to 0). In
// double: the teacher tail 1 - sum_k p_k of K float32 log-probs has an absolute error
// of K * 6e-8 in float32 arithmetic, which swamps a tail of 1e-9 (and the tail
// gradient p_k / p_tail amplifies it); K terms per row cost nothing.
// -inf for a row of padding only. lp: K float32 log-probs; ids: K ids (-1: padding).
FASTKD_HD double div_topk_teacher_lse(const float* lp, const int64_t* ids, int64_t K) {
  double m = -INFINITY;
  int64_t arg = -1;
  for (int64_t k = 0; k < K; ++k) {
    if (ids[k] >= 0 && (arg < 0 || lp[k] > m)) m = lp[k], arg = k;
  }
  if (arg < 0 || m == -INFINITY) return m == m ? -INFINITY : m;
  double others = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    if (ids[k] >= 0 && k != arg) others += exp(double(lp[k]) - m);
  }
  return m + log1p(others);
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
