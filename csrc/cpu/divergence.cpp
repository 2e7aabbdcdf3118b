// fastkd::divergence_fwd on the CPU: reverse KL, JSD, skew KL, TVD, Jeffreys, triangular, the power
// divergences (AB, Renyi), entropy-gated KL, forward KL against a top-k teacher, and the cross-entropy fused
// with any of them, one row at
// a time (math in csrc/divergence_math.h, contract in docs/design.md), parallel over
// rows, vectorised over classes.
//
// Dense teacher, per row:
//   (1) statistics in chunks of kStatsChunk columns: the chunk maxima of both nets
//       (raw units), then the exps relative to them, kept (the student's in the
//       student-gradient row when it is float32, else in a row buffer; the teacher's
//       in a row buffer), with a target at T != 1 the student's sum at T = 1 for the
//       cross-entropy (from the kept exps at T = 2, 3, 4), and for forward and reverse
//       KL the KL itself as KD's cross term (DivCross; Jeffreys and the entropy-gated KL:
//       both KLs and the teacher's entropy);
//   (2) forward and reverse KL, Jeffreys, entropy-gated KL: the gradients, their sums being
//       known (sum G of reverse KL is the KL of (1)): two passes, as KD. Otherwise per class: q and p
//       from the kept exps (rescaled per chunk), the log-probs from the logits, the
//       loss terms and the sums of G, H (div_terms); G goes to a row buffer (H to the
//       teacher-gradient row) and
//   (3) a last pass forms G - q sum G (H - p sum H).
//   The cross-entropy gradient rides along the last pass (softmax at T = 1 from the
//   kept exps, or one exp per element at other T than 1..4).
// Top-k teacher, tail mode: the K member slots are flagged in the student-gradient
// row (or a row buffer), one chunked pass gathers the statistics of the full row and
// of the non-members (the tail is summed over the non-member ids themselves), the
// K + 1 buckets are evaluated on their own, and one pass writes the dense gradient,
// after which the member slots are rewritten. Renormalise mode reads the student only
// at the K ids (the whole row only for the cross-entropy).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "loss_common.h"
#include "teacher_mixture.h"
#include "../divergence_math.h"

namespace fastkd {
namespace {

// What is fixed for one call. The teacher has its own temperature T_t (teacher_temperature; T when 0):
// inv_tt = 1 / T_t scales its logits where they stand alone (statistics, kept exps, lp), rho = T / T_t where
// they meet the student's, all at 1 / T: lp - lq = ((t - M_t) rho - (s - M_s)) / T + (L_s - L_t). At T_t = T
// inv_tt is inv_t and rho exactly 1, so every expression is today's one-temperature one, bit for bit.
struct DivCall {
  DivParams d;
  float T, inv_t, inv_tt, rho, soft_scale, ce_weight;
  int topk_mode;
  int64_t V, K;
};

// Unweighted row results.
struct DivRowOut {
  float soft, hard;
};

// Per-thread scratch (rows of V floats, and the K buckets of a top-k row).
struct DivScratch {
  std::vector<float> s_conv, t_conv, gs_conv, gt_conv;  // dtype conversion of one row
  std::vector<float> kept_s, kept_t, g_row, mark, chunk_max;
  std::vector<float> bp, bq, bg, bh;
};

float* sized(std::vector<float>& v, int64_t n) {
  v.resize(n);
  return v.data();
}

int64_t num_chunks(int64_t V) { return (V + kStatsChunk - 1) / kStatsChunk; }

// ---------------------------------------------------------------------------
// Dense teacher

// Which KL pass (1) also sums as KD's cross term (csrc/kd_math.h), so that the sum the
// gradient needs is known before pass (2), which then writes the gradient (two passes):
//   kCrossP: KL(p || q), weights e_t: kMixQ (forward KL), sum H = a KL(p || q) = soft;
//   kCrossQ: KL(q || p), weights e_s: kMixP (reverse KL), sum G = b KL(q || p) = soft.
// The KDRawStats are oriented as kd_math.h has them, the weighting net second, so for
// kCrossQ the nets swap places (kd_raw_merge and kd_raw_finish then serve unchanged).
// kCrossBoth (Jeffreys, entropy-gated KL): both KLs and the teacher's entropy at once (DivBothStats), so
// that sum G and sum H are known before pass (2) as well.
enum DivCross { kCrossNone = 0, kCrossP = 1, kCrossQ = 2, kCrossBoth = 3 };

// kd_raw_merge (csrc/kd_math.h) with each net at its own temperature: the KDRawStats' first net scaled by
// rho_s / T, the second by rho_t / T (the teacher's rho = T / T_t, the student's 1). The cross term stays exact
// with two temperatures: sum e_t (b - a) = E_p[lp - lq] + L_t - L_s whatever scales a and b, so merging moves
// each net's shifted logits by its own gap, gap * rho / T. At rho = 1 this is kd_raw_merge, bit for bit.
FASTKD_INLINE void cross_add(KDRawStats& acc, const KDRawStats& p, float inv_t, float rho_s, float rho_t) {
  const float gs = raw_gap(p.ms, acc.ms) * rho_s, gt = raw_gap(p.mt, acc.mt) * rho_t;
  const float fs = expf(gs * inv_t), ft = expf(gt * inv_t);
  acc.zs += p.zs * fs;
  acc.zt += p.zt * ft;
  if (p.zt > 0.0f && ft > 0.0f) acc.cross += ft * (p.cross + p.zt * ((gt - gs) * inv_t));
}

FASTKD_INLINE KDRawStats cross_merge(const KDRawStats& x, const KDRawStats& y, float inv_t, float rho_s,
                                     float rho_t) {
  KDRawStats r = {max_ignoring_nan(x.ms, y.ms), 0.0f, max_ignoring_nan(x.mt, y.mt), 0.0f, 0.0f};
  cross_add(r, x, inv_t, rho_s, rho_t);
  cross_add(r, y, inv_t, rho_s, rho_t);
  return r;
}

// The row sums of kCrossBoth with a = (s - M_s) / T, b = (t - M_t) / T_t (each net's maximum first, as KD):
//   KL(p || q) = cross_p / z_t - log z_t + log z_s,  cross_p = sum e_t (b - a)
//   KL(q || p) = cross_q / z_s - log z_s + log z_t,  cross_q = sum e_s (a - b)
//   H(p)       = log z_t - ent / z_t,                ent = sum e_t b
// A chunk's sums are relative to its own maxima; merging moves a and b by each net's gap (cross_add's rule,
// applied to the three weighted sums: sum e (x + g) = sum e x + z g, times the factor of the weighting net).
struct DivBothStats {
  float ms, zs, mt, zt, cross_p, cross_q, ent;
};

FASTKD_INLINE DivBothStats both_empty() { return {-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f, 0.0f, 0.0f}; }

FASTKD_INLINE void both_add(DivBothStats& acc, const DivBothStats& p, float inv_t, float rho) {
  const float gs = raw_gap(p.ms, acc.ms), gt = raw_gap(p.mt, acc.mt) * rho;
  const float fs = expf(gs * inv_t), ft = expf(gt * inv_t);
  acc.zs += p.zs * fs;
  acc.zt += p.zt * ft;
  if (p.zt > 0.0f && ft > 0.0f) {
    acc.cross_p += ft * (p.cross_p + p.zt * ((gt - gs) * inv_t));
    acc.ent += ft * (p.ent + p.zt * (gt * inv_t));
  }
  if (p.zs > 0.0f && fs > 0.0f) acc.cross_q += fs * (p.cross_q + p.zs * ((gs - gt) * inv_t));
}

FASTKD_INLINE DivBothStats both_merge(const DivBothStats& x, const DivBothStats& y, float inv_t, float rho) {
  DivBothStats r = {max_ignoring_nan(x.ms, y.ms), 0.0f, max_ignoring_nan(x.mt, y.mt), 0.0f, 0.0f, 0.0f, 0.0f};
  both_add(r, x, inv_t, rho);
  both_add(r, y, inv_t, rho);
  return r;
}

// KL(p || q), KL(q || p), H(p) of a row's DivBothStats (NaN without a finite logit in a net, as kd_raw_finish).
struct DivTwoKL {
  float kl_pq, kl_qp, ent;
};

// L_s - L_t as one log of the sums' ratio: two logs of ~log V each round to ~1e-6, an absolute floor under both
// KLs (Jeffreys near coinciding nets was 1e-3 off at 1e-4); the ratio's log is ~0 there, and exact to ~1e-7.
FASTKD_INLINE DivTwoKL both_finish(const DivBothStats& st) {
  const bool live = st.zs > 0.0f && st.zt > 0.0f;
  const float dl = logf(st.zs / st.zt);  // (zs, zt in [1, V]: no overflow)
  return {live ? st.cross_p / st.zt + dl : NAN, live ? st.cross_q / st.zs - dl : NAN,
          live ? logf(st.zt) - st.ent / st.zt : NAN};
}

// How the cross-entropy's exps at T = 1 come from the kept exps at 1/T (same chunk base
// M): kCE1Pow: T = 2, 3 or 4, exp(s - M) = exp((s - M) / T)^T (a few multiplies, where an
// exp per element made CE cost a third of KD; relative error below 1e-6, as fkl_row's);
// kCE1Exp: any other T, one exp; kCE1Same: T = 1, the CE's softmax is q; kCE1None: not needed.
enum DivCE1 { kCE1None = 0, kCE1Pow = 1, kCE1Exp = 2, kCE1Same = 3 };

// T as that power: 1..4 when T is that integer, 0 otherwise.
int ce_power(float T) { return (T == 1.0f || T == 2.0f || T == 3.0f || T == 4.0f) ? static_cast<int>(T) : 0; }

// e^pw for pw in 1..4, as the four powers weighted by 0 or 1: a select on the
// loop-invariant pw kept the loops scalar (6x slower). e is a kept exp (<= 1 or NaN),
// so no inf * 0 arises.
struct PowSel {
  float w1, w2, w3, w4;
};
PowSel pow_sel(int pw) { return {pw == 1 ? 1.0f : 0.0f, pw == 2 ? 1.0f : 0.0f, pw == 3 ? 1.0f : 0.0f, pw == 4 ? 1.0f : 0.0f}; }
FASTKD_INLINE float pow_small(float e, const PowSel& w) { return e * (w.w1 + e * w.w2) + e * e * e * (w.w3 + e * w.w4); }

// (1) of one chunk: chunk maxima, exps relative to them (kept), sums; with kCE1 the
// student's sum at T = 1 too (relative to the same maximum; T = 1 itself needs none);
// with kCross the cross term. Returns the oriented KDRawStats (see DivCross).
template <int kCross, int kCE1>
FASTKD_INLINE KDRawStats dense_chunk_stats(const float* s, const float* t, int64_t n, float inv_t, float inv_tt,
                                           PowSel pw, float* kept_s, float* kept_t, float& z1, float& cross_q,
                                           float& ent) {
  const ChunkMax m = chunk_max(s, t, n);
  const float bs = m.bs, bt = m.bt;
  float zs = 0.0f, zt = 0.0f, cross = 0.0f, zo = 0.0f, cq = 0.0f, h = 0.0f;
#pragma omp simd reduction(+ : zs, zt, cross, zo, cq, h)
  for (int64_t j = 0; j < n; ++j) {
    const float a = (s[j] - bs) * inv_t, b = (t[j] - bt) * inv_tt;  // raw differences first
    const float es = vexp(a), et = vexp(b);
    kept_s[j] = es, kept_t[j] = et;
    zs += es;
    zt += et;
    if (kCross == kCrossP) cross += kd_cross_term(et, a, b);  // e_t (b - a)
    if (kCross == kCrossQ) cross += kd_cross_term(es, b, a);  // e_s (a - b)
    if (kCross == kCrossBoth) {  // unguarded (three selects cost 10% of the pass); a non-finite chunk is redone
      const float d = b - a;
      cross += et * d, cq -= es * d, h += et * b;
    }
    if (kCE1 == kCE1Pow) zo += pow_small(es, pw);
    if (kCE1 == kCE1Exp) zo += vexp(s[j] - bs);
  }
  if (kCross == kCrossBoth && !std::isfinite(cross + cq + h)) {
    // an infinite (or NaN) logit: 0 * inf where its exp is 0; the guarded terms from the kept exps
    cross = cq = h = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      const float a = (s[j] - bs) * inv_t, b = (t[j] - bt) * inv_tt, es = kept_s[j], et = kept_t[j];
      cross += kd_cross_term(et, a, b), cq += kd_cross_term(es, b, a), h += where_positive(et, et * b);
    }
  }
  z1 = zo;
  cross_q = cq, ent = h;
  if (kCross == kCrossQ) return {m.mt, zt, m.ms, zs, cross};
  return {m.ms, zs, m.mt, zt, cross};
}

// Pass (1) over the row: the row statistics (st_s, st_t at 1/T, st_1 at T = 1 when kCE1),
// the chunk maxima, and the oriented cross statistics (kCrossBoth: both, in `both`).
template <int kCross, int kCE1>
FASTKD_INLINE KDRawStats dense_stats(const DivCall& c, const float* s, const float* t, PowSel pw, float* kept_s,
                                     float* kept_t, float* chunk_max, DivLse& st_s, DivLse& st_t, DivLse& st_1,
                                     DivBothStats& both) {
  KDRawStats x = kd_raw_empty();
  for (int64_t c0 = 0, k = 0; c0 < c.V; c0 += kStatsChunk, ++k) {
    const int64_t n = std::min(kStatsChunk, c.V - c0);
    float z1 = 0.0f, cross_q = 0.0f, ent = 0.0f;
    const KDRawStats part = dense_chunk_stats<kCross, kCE1>(s + c0, t + c0, n, c.inv_t, c.inv_tt, pw, kept_s + c0,
                                                            kept_t + c0, z1, cross_q, ent);
    const float ms = kCross == kCrossQ ? part.mt : part.ms, mt = kCross == kCrossQ ? part.ms : part.mt;
    const float zs = kCross == kCrossQ ? part.zt : part.zs, zt = kCross == kCrossQ ? part.zs : part.zt;
    chunk_max[2 * k] = ms, chunk_max[2 * k + 1] = mt;
    div_lse_merge(st_s, DivLse{ms, zs}, c.inv_t);
    div_lse_merge(st_t, DivLse{mt, zt}, c.inv_tt);
    if (kCE1 != kCE1None) div_lse_merge(st_1, DivLse{ms, z1}, 1.0f);
    // oriented: kCrossQ has the teacher first (KDRawStats' s side)
    if (kCross == kCrossP) x = cross_merge(x, part, c.inv_t, 1.0f, c.rho);
    if (kCross == kCrossQ) x = cross_merge(x, part, c.inv_t, c.rho, 1.0f);
    if (kCross == kCrossBoth)
      both = both_merge(both, DivBothStats{part.ms, part.zs, part.mt, part.zt, part.cross, cross_q, ent}, c.inv_t,
                        c.rho);
  }
  return x;
}

// Row scalars of passes (2) and (3).
struct DenseRow {
  float ms, ls, mt, lt;  // raw maxima, log of the sums relative to them
  float dl;              // L_s - L_t
  float sum_g, sum_h;    // known beforehand (kCross, or div_known_sum) or summed by pass (2)
  DivTvdSums tvd;        // TVD: the masses of div_tvd_factor, summed by pass (2)
  float coef;            // w soft_scale / T (the student gradient's factor)
  float coef_t;          // w soft_scale / T_t (the teacher gradient's)
  float inv_tt, rho;     // DivCall's: the teacher's 1 / T_t and T / T_t
  float ce;              // w ce_weight: the CE gradient ce (softmax(s) - onehot) (the onehot added by the caller)
  PowSel pw;             // kCE1Pow: T as a power
  float m1, l1;          // the T = 1 statistics (raw max, log of the sum)
};

// The CE's softmax(s)_j at T = 1: kept_s^T to_1 (kCE1Pow; to_1 = exp(chunk max - M - L_1)) or one exp.
template <int kCE1>
FASTKD_INLINE float softmax1(const DenseRow& r, float es, float q, float s, float to_1) {
  if (kCE1 == kCE1Same) return q;
  if (kCE1 == kCE1Exp) return vexp(div_log_prob(s, r.m1, 1.0f, r.l1));
  return pow_small(es, r.pw) * to_1;
}

// (2) of one chunk where the sums are known (kMixQ, kMixP; kind 2, also the entropy-gated KL's gradients at its
// (w, 1 - w)): the gradients. gs may be kept_s.
template <int kKind, int kMix, bool kGS, bool kGT, int kCE1>
FASTKD_INLINE void dense_grad_chunk(const DivParams& dp, const float* s, const float* t, int64_t n, float inv_t,
                                    const DenseRow& r, float to_q, float to_p, float to_1, const float* kept_s,
                                    const float* kept_t, float* gs, float* gt) {
  const DivParams d = dp;  // a local copy: the gradient stores cannot alias it, so its fields stay in registers
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float es = kept_s[j], q = es * to_q, p = kept_t[j] * to_p;  // read before gs[j] is written
    const float delta = ((t[j] - r.mt) * r.rho - (s[j] - r.ms)) * inv_t + r.dl;  // lp - lq, each maximum first
    const DivTerms x = div_terms_form<kKind, kMix, kFormGeneral>(d, p, q, delta);
    if (kGS) {
      float g = r.coef * (x.g - q * r.sum_g);
      if (kCE1 != kCE1None) g += r.ce * softmax1<kCE1>(r, es, q, s[j], to_1);
      gs[j] = g;
    }
    if (kGT) gt[j] = r.coef_t * (x.h - p * r.sum_h);
  }
}

// (2) of one chunk where a sum is not known: the row's soft loss and the sums the wanted
// gradients need (only those: each float -> double sum costs conversions in the loop);
// G goes to g_row, H to the teacher-gradient row.
template <int kKind, int kMix, int kForm, bool kGS, bool kGT>
FASTKD_INLINE void dense_terms_chunk(const DivParams& dp, const float* s, const float* t, int64_t n, float inv_t,
                                     const DenseRow& r, float to_q, float to_p, const float* kept_s,
                                     const float* kept_t, float* gt, float* g_row, double& soft, double& sum_g,
                                     double& sum_h, double* tvd) {
  const DivParams d = dp;
  constexpr bool kTVD = kKind == kDivTVD;
  // double sums: the gradient is G - q sum G, where G and q sum G nearly cancel on the largest classes
  // (JSD near beta = 1, TVD), so a float32 sum's rounding (lanes of 128 terms) showed as 2e-5 there
  double so = 0.0, sg = 0.0, sh = 0.0, q_lt = 0.0, q_gt = 0.0, p_lt = 0.0, p_gt = 0.0, tie = 0.0;
#pragma omp simd reduction(+ : so, sg, sh, q_lt, q_gt, p_lt, p_gt, tie)
  for (int64_t j = 0; j < n; ++j) {
    const float q = kept_s[j] * to_q, p = kept_t[j] * to_p;
    if (kTVD && kGS) q_lt += q < p ? q : 0.0f, q_gt += q > p ? q : 0.0f;
    if (kTVD && kGT) p_lt += p < q ? p : 0.0f, p_gt += p > q ? p : 0.0f;
    if (kTVD && (kGS || kGT)) tie += p == q ? p : 0.0f;
    // lp - lq from the raw logits: ((t - M_t) - (s - M_s)) / T + (L_s - L_t) (see div_mixture); each
    // maximum first: t - s loses |t - s| eps when the nets sit at different large offsets (+-1e4)
    const float delta = ((t[j] - r.mt) * r.rho - (s[j] - r.ms)) * inv_t + r.dl;
    const DivTerms x = div_terms_form<kKind, kMix, kForm>(d, p, q, delta);
    so += x.soft;
    if (!kTVD && kGS) sg += x.g, g_row[j] = x.g;
    if (!kTVD && kGT) sh += x.h, gt[j] = x.h;
  }
  soft += so, sum_g += sg, sum_h += sh;
  if (kTVD) tvd[0] += q_lt, tvd[1] += q_gt, tvd[2] += p_lt, tvd[3] += p_gt, tvd[4] += tie;
}

// (2) of one chunk of a power divergence (kinds 4, 6), from the log-probs of the logits (not the kept exps:
// q^s, p^s are exps of s lq, s lp). Kind 4: soft, G (to g_row), H (to the teacher-gradient row) and their sums
// (div_ab_terms), then (3) is dense_finish_chunk's. Kind 6: the sum of t = x phi_c(e) (U) in soft; the parts
// (3) needs, x^r y^c and t, kept (student side in g_row, teacher side in the teacher row; div_renyi_parts).
// kUnit (kind 4 with s = a + b = 1, Amari's alpha): q^s, p^s are the kept exps' q, p, one exp per class.
template <int kKind, bool kGS, bool kGT, bool kSumSoft = false, bool kUnit = false>
FASTKD_INLINE void dense_power_chunk(const DivParams& dp, const float* s, const float* t, int64_t n, float inv_t,
                                     const DenseRow& r, float to_q, float to_p, const float* kept_s,
                                     const float* kept_t, float* gt, float* g_row, double& soft, double& sum_g,
                                     double& sum_h) {
  const DivParams d = dp;
  const bool rev = d.b != 0.0f;  // kind 6
  double so = 0.0, sg = 0.0, sh = 0.0;
#pragma omp simd reduction(+ : so, sg, sh)
  for (int64_t j = 0; j < n; ++j) {
    const float lq = (s[j] - r.ms) * inv_t - r.ls, lp = (t[j] - r.mt) * r.inv_tt - r.lt;
    const float delta = ((t[j] - r.mt) * r.rho - (s[j] - r.ms)) * inv_t + r.dl;  // each maximum first (see above)
    if (kKind == kDivAB) {  // unguarded (see div_ab_terms); a chunk with a zero probability is redone below
      const DivTerms x = kUnit ? div_ab_terms_unit<kSumSoft>(d, kept_t[j] * to_p, kept_s[j] * to_q, lp, lq, delta)
                               : div_ab_terms<false, kSumSoft>(d, lp, lq, delta);
      if (!kSumSoft) so += x.soft;  // (0 there: the loss comes from the sums below)
      if (kGS || kSumSoft) sg += x.g;
      if (kGS) g_row[j] = x.g;
      if (kGT || kSumSoft) sh += x.h;
      if (kGT) gt[j] = x.h;
    } else {
      const float xp = rev ? kept_s[j] * to_q : kept_t[j] * to_p;  // x = q or p from the kept exps
      const DivRenyiParts x = div_renyi_parts_x(d.a, rev, xp, lp, lq, delta);
      so += x.t, sg += x.xy;  // U and S
      if (kGS) g_row[j] = rev ? x.t : x.xy;
      if (kGT) gt[j] = rev ? x.xy : x.t;
    }
  }
  if (kKind == kDivAB && kSumSoft) so = (sg + sh) / d.pw_s;  // (DivParams::pw_sum_soft)
  if (kKind == kDivAB && !std::isfinite(so + sg + sh)) {  // a zero probability (or a NaN, or an inf term): guarded
    so = sg = sh = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const float lq = (s[j] - r.ms) * inv_t - r.ls, lp = (t[j] - r.mt) * r.inv_tt - r.lt;
      const DivTerms x = div_ab_terms<true>(d, lp, lq, ((t[j] - r.mt) * r.rho - (s[j] - r.ms)) * inv_t + r.dl);
      so += x.soft;
      if (kGS) sg += x.g, g_row[j] = x.g;
      if (kGT) sh += x.h, gt[j] = x.h;
    }
  }
  soft += so, sum_g += sg, sum_h += sh;
}

// (3) of one chunk of a Renyi row: G = -k_g (kept student part), H = -k_h (kept teacher part), with
// (k_g, k_h) = (1 / S, r / S) (reversed: (r / S, 1 / S)); reads the kept exps and parts, not the logits.
template <bool kGS, bool kGT, int kCE1>
FASTKD_INLINE void dense_renyi_finish_chunk(const float* s, int64_t n, const DenseRow& r, float k_g, float k_h,
                                            float to_q, float to_p, float to_1, const float* kept_s,
                                            const float* kept_t, const float* g_row, float* gs, float* gt) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float es = kept_s[j], q = es * to_q, p = kept_t[j] * to_p;
    if (kGS) {
      float out = r.coef * (-k_g * g_row[j] - q * r.sum_g);
      if (kCE1 != kCE1None) out += r.ce * softmax1<kCE1>(r, es, q, s[j], to_1);
      gs[j] = out;
    }
    if (kGT) gt[j] = r.coef_t * (-k_h * gt[j] - p * r.sum_h);
  }
}

// (3) of one chunk of a Renyi row whose S < 1/2 (rare: the nets far apart): kind 5's G, H from the logits again.
template <bool kGS, bool kGT, int kCE1>
FASTKD_INLINE void dense_renyi_direct_chunk(const DivParams& dp, const float* s, const float* t, int64_t n,
                                            float inv_t, const DenseRow& r, float to_q, float to_p, float to_1,
                                            const float* kept_s, const float* kept_t, float* gs, float* gt) {
  const DivParams d = dp;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float es = kept_s[j], q = es * to_q, p = kept_t[j] * to_p;
    const float lq = (s[j] - r.ms) * inv_t - r.ls, lp = (t[j] - r.mt) * r.inv_tt - r.lt;
    const float delta = ((t[j] - r.mt) * r.rho - (s[j] - r.ms)) * inv_t + r.dl;
    const DivTerms x = div_renyi_grad_terms(d, lp, lq, delta);
    if (kGS) {
      float out = r.coef * (x.g - q * r.sum_g);
      if (kCE1 != kCE1None) out += r.ce * softmax1<kCE1>(r, es, q, s[j], to_1);
      gs[j] = out;
    }
    if (kGT) gt[j] = r.coef_t * (x.h - p * r.sum_h);
  }
}

// (3) of one chunk: the gradients whose sums (2) found.
template <int kKind, bool kGS, bool kGT, int kCE1>
FASTKD_INLINE void dense_finish_chunk(const float* s, int64_t n, const DenseRow& r, float to_q, float to_p,
                                      float to_1, const float* kept_s, const float* kept_t, const float* g_row,
                                      float* gs, float* gt) {
  const DivTvdSums& v = r.tvd;
  const float half = 0.5f * r.coef, half_t = 0.5f * r.coef_t;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float es = kept_s[j], q = es * to_q, p = kept_t[j] * to_p;
    float g = 0.0f;
    if (kKind == kDivTVD) {
      if (kGS) g = half * q * div_tvd_factor(q, p, v.q_lt, v.q_gt, v.tie);
      if (kGT) gt[j] = half_t * p * div_tvd_factor(p, q, v.p_lt, v.p_gt, v.tie);
    } else {
      if (kGS) g = r.coef * (g_row[j] - q * r.sum_g);
      if (kGT) gt[j] = r.coef_t * (gt[j] - p * r.sum_h);
    }
    if (kGS && kCE1 != kCE1None) g += r.ce * softmax1<kCE1>(r, es, q, s[j], to_1);
    if (kGS) gs[j] = g;
  }
}

// The cross-entropy gradient at T != 1: gs += w ce_weight softmax(s) (the target's -1 is added by the caller).
FASTKD_INLINE void add_softmax1(const float* s, int64_t n, const DivLse& st1, float coef, float* gs) {
  const float m = st1.m, l = logf(st1.z);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) gs[j] += coef * vexp(div_log_prob(s[j], m, 1.0f, l));
}

// Per-chunk factors turning the kept exps into probabilities: exp((chunk max - row max) / T - L).
FASTKD_INLINE float to_prob(float chunk_max, float row_max, float inv_t, float l) {
  return expf(raw_gap(chunk_max, row_max) * inv_t - l);  // 0 for an all -inf chunk
}

// Passes (2) and (3) of a row; returns its soft loss (soft_known where kMixQ / kMixP).
template <int kKind, int kMix, int kForm, bool kGS, bool kGT, int kCE1>
FASTKD_INLINE float dense_passes(const DivCall& c, const float* s, const float* t, DenseRow& r,
                                 const float* chunk_max, const float* kept_s, const float* kept_t, float* gs,
                                 float* gt, float* g_row, float soft_known) {
  // sum G and sum H known: two passes (kind 2: the two KLs of pass (1); the entropy-gated KL comes as kind 2)
  constexpr bool kKnown = (kKind == kDivKL && kMix != kMixBoth) || kKind == kDivJeffreys;
  const int64_t V = c.V;
  auto chunk_factors = [&](int64_t k, float& to_q, float& to_p, float& to_1) {
    to_q = to_prob(chunk_max[2 * k], r.ms, c.inv_t, r.ls);
    to_p = to_prob(chunk_max[2 * k + 1], r.mt, c.inv_tt, r.lt);
    to_1 = kCE1 == kCE1Pow ? to_prob(chunk_max[2 * k], r.m1, 1.0f, r.l1) : 0.0f;
  };
  if constexpr (kKind == kDivAB || kKind == kDivRenyi) {
    double soft = 0.0, sum_g = 0.0, sum_h = 0.0;
    for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
      const int64_t n = std::min(kStatsChunk, V - c0);
      float to_q, to_p, to_1;
      chunk_factors(k, to_q, to_p, to_1);
      if (kKind == kDivAB && c.d.pw_sum_soft && c.d.pw_s == 1.0f)
        dense_power_chunk<kKind, kGS, kGT, true, true>(c.d, s + c0, t + c0, n, c.inv_t, r, to_q, to_p, kept_s + c0,
                                                       kept_t + c0, kGT ? gt + c0 : nullptr,
                                                       kGS ? g_row + c0 : nullptr, soft, sum_g, sum_h);
      else if (kKind == kDivAB && c.d.pw_sum_soft)
        dense_power_chunk<kKind, kGS, kGT, true>(c.d, s + c0, t + c0, n, c.inv_t, r, to_q, to_p, kept_s + c0,
                                                 kept_t + c0, kGT ? gt + c0 : nullptr, kGS ? g_row + c0 : nullptr,
                                                 soft, sum_g, sum_h);
      else
        dense_power_chunk<kKind, kGS, kGT>(c.d, s + c0, t + c0, n, c.inv_t, r, to_q, to_p, kept_s + c0,
                                           kept_t + c0, kGT ? gt + c0 : nullptr, kGS ? g_row + c0 : nullptr, soft,
                                           sum_g, sum_h);
    }
    float row_soft = static_cast<float>(soft), k_g = 1.0f, k_h = 1.0f;
    DivParams grad_d = c.d;
    bool recompute = false;
    if (kKind == kDivRenyi) {  // soft held U, sum_g S
      const DivRenyiRow rr = div_renyi_row(c.d, row_soft, static_cast<float>(sum_g));
      row_soft = rr.soft, sum_g = rr.sum_g, sum_h = rr.sum_h;
      const bool rev = c.d.b != 0.0f;
      k_g = rev ? c.d.a * rr.d.w_p : rr.d.w_p;
      k_h = rev ? rr.d.w_p : c.d.a * rr.d.w_p;
      grad_d = rr.d;
      // a direct row (S < 1/2): its x side from x^r y^c, not the kept t; an infinite row: gradients 0
      recompute = rr.d.w_q != 0.0f || rr.d.w_p == 0.0f;
    }
    if (kGS || kGT) {
      r.sum_g = static_cast<float>(sum_g);
      r.sum_h = static_cast<float>(sum_h);
      for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
        const int64_t n = std::min(kStatsChunk, V - c0);
        float to_q, to_p, to_1;
        chunk_factors(k, to_q, to_p, to_1);
        if (kKind == kDivRenyi && recompute)
          dense_renyi_direct_chunk<kGS, kGT, kCE1>(grad_d, s + c0, t + c0, n, c.inv_t, r, to_q, to_p, to_1,
                                                   kept_s + c0, kept_t + c0, kGS ? gs + c0 : nullptr,
                                                   kGT ? gt + c0 : nullptr);
        else if (kKind == kDivAB)
          dense_finish_chunk<kKind, kGS, kGT, kCE1>(s + c0, n, r, to_q, to_p, to_1, kept_s + c0, kept_t + c0,
                                                    kGS ? g_row + c0 : nullptr, kGS ? gs + c0 : nullptr,
                                                    kGT ? gt + c0 : nullptr);
        else
          dense_renyi_finish_chunk<kGS, kGT, kCE1>(s + c0, n, r, k_g, k_h, to_q, to_p, to_1, kept_s + c0,
                                                   kept_t + c0, kGS ? g_row + c0 : nullptr, kGS ? gs + c0 : nullptr,
                                                   kGT ? gt + c0 : nullptr);
      }
    }
    return row_soft;
  }
  if (kKnown) {
    if (kGS || kGT) {
      for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
        const int64_t n = std::min(kStatsChunk, V - c0);
        float to_q, to_p, to_1;
        chunk_factors(k, to_q, to_p, to_1);
        dense_grad_chunk<kKind, kMix, kGS, kGT, kCE1>(c.d, s + c0, t + c0, n, c.inv_t, r, to_q, to_p, to_1, kept_s + c0,
                                               kept_t + c0, kGS ? gs + c0 : nullptr, kGT ? gt + c0 : nullptr);
      }
    }
    return soft_known;
  }
  double soft = 0.0, sum_g = 0.0, sum_h = 0.0, tvd[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
    const int64_t n = std::min(kStatsChunk, V - c0);
    float to_q, to_p, to_1;
    chunk_factors(k, to_q, to_p, to_1);
    dense_terms_chunk<kKind, kMix, kForm, kGS, kGT>(c.d, s + c0, t + c0, n, c.inv_t, r, to_q, to_p, kept_s + c0,
                                                    kept_t + c0, kGT ? gt + c0 : nullptr,
                                                    kGS ? g_row + c0 : nullptr, soft, sum_g, sum_h, tvd);
  }
  if (kGS || kGT) {
    r.sum_g = static_cast<float>(sum_g);
    r.sum_h = static_cast<float>(sum_h);
    r.tvd = {float(tvd[0]), float(tvd[1]), float(tvd[2]), float(tvd[3]), float(tvd[4])};
    for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
      const int64_t n = std::min(kStatsChunk, V - c0);
      float to_q, to_p, to_1;
      chunk_factors(k, to_q, to_p, to_1);
      dense_finish_chunk<kKind, kGS, kGT, kCE1>(s + c0, n, r, to_q, to_p, to_1, kept_s + c0, kept_t + c0,
                                                kGS ? g_row + c0 : nullptr, kGS ? gs + c0 : nullptr,
                                                kGT ? gt + c0 : nullptr);
    }
  }
  return static_cast<float>(soft);
}

// kCE1 only matters with a student gradient (the CE adds to it alone).
template <int kKind, int kMix, int kForm>
FASTKD_INLINE float dense_passes_any(const DivCall& c, const float* s, const float* t, DenseRow& r,
                                     const float* chunk_max, const float* kept_s, const float* kept_t, float* gs,
                                     float* gt, float* g_row, float soft_known, int ce1) {
#define FASTKD_DIV_PASSES(GS, GT, CE1) \
  dense_passes<kKind, kMix, kForm, GS, GT, CE1>(c, s, t, r, chunk_max, kept_s, kept_t, gs, gt, g_row, soft_known)
#define FASTKD_DIV_PASSES_CE(GS, GT)                                  \
  (ce1 == kCE1Same  ? FASTKD_DIV_PASSES(GS, GT, kCE1Same)             \
   : ce1 == kCE1Pow ? FASTKD_DIV_PASSES(GS, GT, kCE1Pow)              \
   : ce1 == kCE1Exp ? FASTKD_DIV_PASSES(GS, GT, kCE1Exp)              \
                    : FASTKD_DIV_PASSES(GS, GT, kCE1None))
  if (gs && gt) return FASTKD_DIV_PASSES_CE(true, true);
  if (gs) return FASTKD_DIV_PASSES_CE(true, false);
  if (gt) return FASTKD_DIV_PASSES(false, true, kCE1None);
  return FASTKD_DIV_PASSES(false, false, kCE1None);
#undef FASTKD_DIV_PASSES_CE
#undef FASTKD_DIV_PASSES
}

// One counted dense row (g: its target, -1 without): the unweighted soft and hard
// losses; writes the weighted gradients (gs / gt may be null).
FASTKD_CPU_CLONES
DivRowOut dense_row(const DivCall& c, const float* s, const float* t, int64_t g, float w, float* gs, float* gt,
                    DivScratch& sc) {
  const int64_t V = c.V, nc = num_chunks(V);
  const DivParams& d = c.d;
  float* kept_s = gs ? gs : sized(sc.kept_s, V);
  float* kept_t = sized(sc.kept_t, V);
  float* chunk_max = sized(sc.chunk_max, 2 * nc);
  // the CE's sums at T = 1: those at 1/T when T = 1, else from the kept exps (kCE1Pow) or their own exps
  const int pw = ce_power(c.T);
  const int ce1_stats = (g < 0 || c.T == 1.0f) ? kCE1None : (pw ? kCE1Pow : kCE1Exp);
  const bool two_kl = d.kind == kDivJeffreys || d.kind == kDivEntropyGated;
  const int cross = two_kl ? kCrossBoth
                           : (d.kind != kDivKL ? kCrossNone
                                               : (d.mix == kMixP ? kCrossQ : (d.mix == kMixQ ? kCrossP : kCrossNone)));
  DivLse st_s = div_lse_empty(), st_t = div_lse_empty(), st_1 = div_lse_empty();
  KDRawStats x;
  DivBothStats both = both_empty();
#define FASTKD_DIV_STATS(CROSS, CE1) \
  dense_stats<CROSS, CE1>(c, s, t, pow_sel(pw), kept_s, kept_t, chunk_max, st_s, st_t, st_1, both)
#define FASTKD_DIV_STATS_CE(CROSS)                                            \
  (ce1_stats == kCE1Pow   ? FASTKD_DIV_STATS(CROSS, kCE1Pow)                  \
   : ce1_stats == kCE1Exp ? FASTKD_DIV_STATS(CROSS, kCE1Exp)                  \
                          : FASTKD_DIV_STATS(CROSS, kCE1None))
  if (cross == kCrossQ) x = FASTKD_DIV_STATS_CE(kCrossQ);
  else if (cross == kCrossP) x = FASTKD_DIV_STATS_CE(kCrossP);
  else if (cross == kCrossBoth) x = FASTKD_DIV_STATS_CE(kCrossBoth);
  else x = FASTKD_DIV_STATS_CE(kCrossNone);
#undef FASTKD_DIV_STATS_CE
#undef FASTKD_DIV_STATS
  if (g >= 0 && ce1_stats == kCE1None) st_1 = st_s;  // T = 1: the same sums
  DenseRow r;
  r.ms = st_s.m, r.ls = div_lse_log(st_s), r.mt = st_t.m, r.lt = div_lse_log(st_t);
  r.dl = r.ls - r.lt;
  r.sum_g = r.sum_h = div_known_sum(d);
  // kMixP: soft = b KL(q || p) = sum G; kMixQ: soft = a KL(p || q) = sum H (a coefficient of 0: never 0 * inf)
  float soft_known = 0.0f;
  if (cross == kCrossP || cross == kCrossQ) {
    const float kl = kd_raw_finish(x).kl, coef = cross == kCrossQ ? d.b : d.a;
    soft_known = coef != 0.0f ? coef * kl : 0.0f;
    (cross == kCrossQ ? r.sum_g : r.sum_h) = soft_known;
  }
  // kind 2 and the entropy-gated KL: kind 2's row at (a, b), or at the gate's (w, 1 - w) (div_gate_row, which
  // forms kind 2's soft, sum G = b KL(q || p) - a, sum H = a KL(p || q) - b; a weight of 0 drops its KL)
  DivCall grad_call = c;
  if (cross == kCrossBoth) {
    const DivTwoKL kl = both_finish(both);
    const DivGateRow gr = d.kind == kDivEntropyGated ? div_gate_row(d, kl.kl_pq, kl.kl_qp, kl.ent, V)
                                                     : div_two_kl_row(d, kl.kl_pq, kl.kl_qp);
    soft_known = gr.soft, r.sum_g = gr.sum_g, r.sum_h = gr.sum_h;
    grad_call.d = gr.d;
  }
  r.coef = w * c.soft_scale * c.inv_t;
  r.coef_t = w * c.soft_scale * c.inv_tt;
  r.inv_tt = c.inv_tt, r.rho = c.rho;
  r.ce = g >= 0 ? w * c.ce_weight : 0.0f;
  r.pw = pow_sel(pw);
  r.m1 = st_1.m, r.l1 = g >= 0 ? div_lse_log(st_1) : 0.0f;
  // the CE gradient rides along the last pass: from the kept exps at T = 1, 2, 3, 4, else one exp
  const int ce1 = (g < 0 || c.ce_weight == 0.0f) ? kCE1None : (pw == 1 ? kCE1Same : (pw ? kCE1Pow : kCE1Exp));
  float* g_row = (gs && cross == kCrossNone && d.kind != kDivTVD) ? sized(sc.g_row, V) : nullptr;
  float soft;
#define FASTKD_DIV_ROW(KIND, MIX, FORM) \
  dense_passes_any<KIND, MIX, FORM>(grad_call, s, t, r, chunk_max, kept_s, kept_t, gs, gt, g_row, soft_known, ce1)
  if (d.kind == kDivTVD) soft = FASTKD_DIV_ROW(kDivTVD, kMixBoth, kFormGeneral);
  else if (two_kl) soft = FASTKD_DIV_ROW(kDivJeffreys, kMixBoth, kFormGeneral);
  else if (d.kind == kDivTriangular) soft = FASTKD_DIV_ROW(kDivTriangular, kMixBoth, kFormGeneral);
  else if (d.kind == kDivAB) soft = FASTKD_DIV_ROW(kDivAB, kMixBoth, kFormGeneral);
  else if (d.kind == kDivRenyi) soft = FASTKD_DIV_ROW(kDivRenyi, kMixBoth, kFormGeneral);
  else if (d.mix == kMixQ) soft = FASTKD_DIV_ROW(kDivKL, kMixQ, kFormGeneral);
  else if (d.mix == kMixP) soft = FASTKD_DIV_ROW(kDivKL, kMixP, kFormGeneral);
  else if (div_form(d) == kFormProp) soft = FASTKD_DIV_ROW(kDivKL, kMixBoth, kFormProp);
  else if (div_form(d) == kFormNoB) soft = FASTKD_DIV_ROW(kDivKL, kMixBoth, kFormNoB);
  else if (div_form(d) == kFormNoA) soft = FASTKD_DIV_ROW(kDivKL, kMixBoth, kFormNoA);
  else soft = FASTKD_DIV_ROW(kDivKL, kMixBoth, kFormGeneral);
#undef FASTKD_DIV_ROW
  // a NaN logit: the terms' xlogy selects could hide it (cross-entropy alone: soft is 0 whatever the row)
  if (div_soft_on(c.d) && (r.ls != r.ls || r.lt != r.lt)) soft = NAN;
  DivRowOut out = {soft, 0.0f};
  if (g >= 0) {
    out.hard = div_ce_hard(st_1, s[g]);
    if (gs && c.ce_weight != 0.0f) gs[g] -= w * c.ce_weight;
  }
  return out;
}

// ---------------------------------------------------------------------------
// Dense forward KL without a teacher gradient (kd_loss(..., ce_weight) runs here):
// KD's two-pass row (csrc/cpu/kd.cpp, KDRawStats of csrc/kd_math.h) with the
// cross-entropy folded in. kMixQ makes soft = a KL(p || q) and the student gradient
// a (q - p) whatever b, so pass (1) gets the KL from KD's cross term and pass (2)
// only reads the kept exps. The CE's exps at T = 1 are those at 1/T raised to the
// power T when T is 2, 3 or 4 (same chunk base: exp(s - M) = exp((s - M) / T)^T; two
// multiplies instead of an exp, relative error below 1e-6); other T take one exp.

template <int kPow>  // 1: T = 1 (the same exps); 2..4: T = kPow; 0: any other T
FASTKD_INLINE float exp_at_one(float es, float s, float base) {
  if (kPow == 0) return vexp(s - base);
  if (kPow == 1) return es;
  if (kPow == 2) return es * es;
  if (kPow == 3) return es * es * es;
  const float e2 = es * es;
  return e2 * e2;
}

template <bool kCE, int kPow>
FASTKD_INLINE KDRawStats fkl_chunk_stats(const float* s, const float* t, int64_t n, float inv_t, float inv_tt,
                                         float* kept_s, float* kept_t, float& z1) {
  const ChunkMax m = chunk_max(s, t, n);
  const float bs = m.bs, bt = m.bt;
  float zs = 0.0f, zt = 0.0f, cross = 0.0f, zo = 0.0f;
#pragma omp simd reduction(+ : zs, zt, cross, zo)
  for (int64_t j = 0; j < n; ++j) {
    const float a = (s[j] - bs) * inv_t, b = (t[j] - bt) * inv_tt;
    const float es = vexp(a), et = vexp(b);
    kept_s[j] = es, kept_t[j] = et;
    zs += es;
    zt += et;
    cross += kd_cross_term(et, a, b);
    if (kCE) zo += exp_at_one<kPow>(es, s[j], bs);
  }
  z1 = zo;
  return {m.ms, zs, m.mt, zt, cross};
}

template <bool kCE, int kPow>
FASTKD_INLINE void fkl_grad_chunk(const float* s, int64_t n, float base, float to_q, float to_p, float to_1,
                                  float coef, float ce, const float* kept_s, const float* kept_t, float* gs) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float es = kept_s[j];  // gs may be kept_s: read first
    float g = coef * (es * to_q - kept_t[j] * to_p);
    if (kCE) g += ce * exp_at_one<kPow>(es, s[j], base) * to_1;
    gs[j] = g;
  }
}

template <bool kCE, int kPow>
FASTKD_INLINE DivRowOut fkl_row_impl(const DivCall& c, const float* s, const float* t, int64_t g, float w,
                                     float* gs, DivScratch& sc) {
  const int64_t V = c.V, nc = num_chunks(V);
  const float inv_t = c.inv_t, inv_tt = c.inv_tt;
  float* kept_s = gs ? gs : sized(sc.kept_s, V);
  float* kept_t = sized(sc.kept_t, V);
  float* chunk_max = sized(sc.chunk_max, 2 * nc);
  KDRawStats st = kd_raw_empty();
  DivLse st1 = div_lse_empty();
  for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
    const int64_t n = std::min(kStatsChunk, V - c0);
    float z1 = 0.0f;
    const KDRawStats part =
        fkl_chunk_stats<kCE, kPow>(s + c0, t + c0, n, inv_t, inv_tt, kept_s + c0, kept_t + c0, z1);
    chunk_max[2 * k] = part.ms, chunk_max[2 * k + 1] = part.mt;
    st = cross_merge(st, part, inv_t, 1.0f, c.rho);
    if (kCE) div_lse_merge(st1, DivLse{part.ms, z1}, 1.0f);
  }
  const KDRow r = kd_raw_finish(st);
  const float l1 = kCE ? logf(st1.z) : 0.0f;
  if (gs) {
    const float coef = w * c.soft_scale * inv_t * c.d.a, ce = w * c.ce_weight;
    for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
      const int64_t n = std::min(kStatsChunk, V - c0);
      const float gap = raw_gap(chunk_max[2 * k], st.ms);
      const float to_q = expf(gap * inv_t - r.lse_s);
      const float to_p = expf(raw_gap(chunk_max[2 * k + 1], st.mt) * inv_tt - r.lse_t);
      const float base = chunk_max[2 * k] == -INFINITY ? 0.0f : chunk_max[2 * k];
      const float to_1 = kCE ? expf(gap - l1) : 0.0f;  // 0 for an all -inf chunk
      fkl_grad_chunk<kCE, kPow>(s + c0, n, base, to_q, to_p, to_1, coef, ce, kept_s + c0, kept_t + c0, gs + c0);
    }
    if (kCE) gs[g] -= ce;
  }
  DivRowOut out = {c.d.a != 0.0f ? c.d.a * r.kl : 0.0f, 0.0f};  // a = 0: CE alone (never 0 * inf)
  if (g >= 0) out.hard = div_ce_hard(DivLse{st.ms, st1.z}, s[g]);
  return out;
}

FASTKD_CPU_CLONES
DivRowOut fkl_row(const DivCall& c, const float* s, const float* t, int64_t g, float w, float* gs, DivScratch& sc) {
  // the CE's sums are needed for the hard loss whenever there is a target, its gradient only when ce_weight != 0
  if (g < 0) return fkl_row_impl<false, 1>(c, s, t, g, w, gs, sc);
  switch (ce_power(c.T)) {
    case 1: return fkl_row_impl<true, 1>(c, s, t, g, w, gs, sc);
    case 2: return fkl_row_impl<true, 2>(c, s, t, g, w, gs, sc);
    case 3: return fkl_row_impl<true, 3>(c, s, t, g, w, gs, sc);
    case 4: return fkl_row_impl<true, 4>(c, s, t, g, w, gs, sc);
    default: return fkl_row_impl<true, 0>(c, s, t, g, w, gs, sc);
  }
}

// ---------------------------------------------------------------------------
// Top-k teacher

// Id k of row i, checked (padding: -1).
FASTKD_INLINE int64_t checked_id(const int64_t* ids, int64_t i, int64_t k, int64_t V) {
  const int64_t id = ids[k];
  TORCH_CHECK_VALUE(id >= -1 && id < V, "fastkd: topk_ids[", i, ", ", k, "] (the teacher's top-k indices) = ", id,
                    " is outside [-1, ", V, ") (-1 marks padding)");
  return id;
}

// Tail mode, one chunk: full-row and non-member (mark == 0) statistics at 1/T, and with kCE1 at T = 1.
template <bool kCE1>
FASTKD_INLINE void tail_chunk_stats(const float* s, const float* mark, int64_t n, float inv_t, DivLse& cs,
                                    DivLse& ctail, DivLse& c1) {
  float ms = -INFINITY, mtl = -INFINITY;
#pragma omp simd reduction(max : ms, mtl)
  for (int64_t j = 0; j < n; ++j) {
    ms = s[j] > ms ? s[j] : ms;
    const float x = mark[j] == 0.0f ? s[j] : -INFINITY;
    mtl = x > mtl ? x : mtl;
  }
  const float bs = ms == -INFINITY ? 0.0f : ms, bt = mtl == -INFINITY ? 0.0f : mtl;
  float zs = 0.0f, ztl = 0.0f, z1 = 0.0f;
  if (bt == bs) {  // the usual chunk: its maximum is not a member, one exp serves both sums
#pragma omp simd reduction(+ : zs, ztl, z1)
    for (int64_t j = 0; j < n; ++j) {
      const float es = vexp((s[j] - bs) * inv_t);
      zs += es;
      ztl += mark[j] == 0.0f ? es : 0.0f;
      if (kCE1) z1 += vexp(s[j] - bs);
    }
  } else {  // the tail's own base, so a tail far below the members keeps its digits
#pragma omp simd reduction(+ : zs, ztl, z1)
    for (int64_t j = 0; j < n; ++j) {
      zs += vexp((s[j] - bs) * inv_t);
      const float et = vexp((s[j] - bt) * inv_t);
      ztl += mark[j] == 0.0f ? et : 0.0f;
      if (kCE1) z1 += vexp(s[j] - bs);
    }
  }
  cs = {ms, zs}, ctail = {mtl, ztl}, c1 = {ms, z1};
}

// Tail mode, the dense student gradient (see div_topk_nonmember_grad); mark may be gs itself.
FASTKD_INLINE void tail_grad_pass(const float* s, const float* mark, int64_t V, float inv_t, const DivLse& full,
                                  float ls, const DivLse& tail, float coef, float g_tail, float sum_g, float ce_q,
                                  float* gs) {
  const bool tail_on = tail.z > 0.0f;
  const float mtl = tail_on ? tail.m : 0.0f, ltl = tail_on ? logf(tail.z) : 0.0f;
  const float ms = full.m;
  // exp(x_c - lse_tail) = q_c / q_tail: one exp per column while q_tail >= 1e-20 (a q_c that
  // underflowed then had a share below 1e-18); a smaller tail takes its own exp per column
  const float lq_tail = tail_on ? raw_gap(tail.m, ms) * inv_t + ltl - ls : -INFINITY;
  if (tail_on && lq_tail >= -46.0f) {
    const float inv_q_tail = expf(-lq_tail);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) {
      const float q = vexp(div_log_prob(s[j], ms, inv_t, ls));
      const float share = mark[j] == 0.0f ? q * inv_q_tail : 0.0f;
      gs[j] = div_topk_nonmember_grad(coef, share, g_tail, q, sum_g) + ce_q * q;
    }
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float q = vexp(div_log_prob(s[j], ms, inv_t, ls));
    const float share_raw = vexp(div_log_prob(s[j], mtl, inv_t, ltl));  // exp(x_c - lse_tail)
    const float share = (tail_on && mark[j] == 0.0f) ? share_raw : 0.0f;
    gs[j] = div_topk_nonmember_grad(coef, share, g_tail, q, sum_g) + ce_q * q;
  }
}

// One counted top-k row: lp, ids its K teacher log-probs (float32) and ids; gt (K floats) may be null.
FASTKD_CPU_CLONES
DivRowOut topk_row(const DivCall& c, int64_t i, const float* s, const float* lp, const int64_t* ids, int64_t g,
                   float w, float* gs, float* gt, DivScratch& sc) {
  const int64_t V = c.V, K = c.K;
  const float inv_t = c.inv_t;
  const DivParams& d = c.d;
  float* bp = sized(sc.bp, K + 1);
  float* bq = sized(sc.bq, K + 1);
  float* bg = sized(sc.bg, K + 1);
  float* bh = sized(sc.bh, K + 1);
  const bool ce1 = g >= 0 && c.T != 1.0f;
  const float coef = w * c.soft_scale * inv_t, coef_t = w * c.soft_scale;
  const float ce_q = (g >= 0 && !ce1) ? w * c.ce_weight : 0.0f;
  for (int64_t k = 0; k < K; ++k) checked_id(ids, i, k, V);

  DivLse full = div_lse_empty(), tail = div_lse_empty(), one = div_lse_empty();
  float* mark = nullptr;
  if (c.topk_mode == kTopkTail) {
    // flag the members (1) in the gradient row or a buffer; the tail is every other id
    mark = gs ? gs : sized(sc.mark, V);
    std::fill(mark, mark + V, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      if (ids[k] >= 0) mark[ids[k]] = 1.0f;
    }
    for (int64_t c0 = 0; c0 < V; c0 += kStatsChunk) {
      const int64_t n = std::min(kStatsChunk, V - c0);
      DivLse cs, ctl, c1;
      if (ce1) tail_chunk_stats<true>(s + c0, mark + c0, n, inv_t, cs, ctl, c1);
      else tail_chunk_stats<false>(s + c0, mark + c0, n, inv_t, cs, ctl, c1);
      div_lse_merge(full, cs, inv_t);
      div_lse_merge(tail, ctl, inv_t);
      if (ce1) div_lse_merge(one, c1, 1.0f);
    }
    if (g >= 0 && !ce1) one = full;
  } else if (g >= 0) {
    // renormalise: the whole row only for the cross-entropy's lse at T = 1
    for (int64_t c0 = 0; c0 < V; c0 += kStatsChunk) {
      const int64_t n = std::min(kStatsChunk, V - c0);
      float ms = -INFINITY;
#pragma omp simd reduction(max : ms)
      for (int64_t j = 0; j < n; ++j) ms = s[c0 + j] > ms ? s[c0 + j] : ms;
      const float bs = ms == -INFINITY ? 0.0f : ms;
      float z = 0.0f;
#pragma omp simd reduction(+ : z)
      for (int64_t j = 0; j < n; ++j) z += vexp(s[c0 + j] - bs);
      div_lse_merge(one, DivLse{ms, z}, 1.0f);
    }
  }

  // bucket log-probs: lq_k, lp_k (padding: no mass)
  float lq_norm, lp_norm;  // what the gathered values are normalised by
  float ms_k;              // the raw maximum they are shifted by
  if (c.topk_mode == kTopkTail) {
    ms_k = full.m, lq_norm = div_lse_log(full), lp_norm = 0.0f;
  } else {
    DivLse sk = div_lse_empty(), pk = div_lse_empty();
    for (int64_t k = 0; k < K; ++k) {
      if (ids[k] < 0) continue;
      div_lse_push(sk, s[ids[k]], inv_t);
      div_lse_push(pk, lp[k], 1.0f);
    }
    ms_k = sk.m;
    // no finite member logit: q = 0 (not 0 - log 0 = +inf); a NaN sum stays NaN (not q = 0)
    lq_norm = sk.z != 0.0f ? div_lse_log(sk) : INFINITY;
    lp_norm = pk.z != 0.0f ? pk.m + div_lse_log(pk) : INFINITY;
  }
  float soft = 0.0f, sum_g = 0.0f, sum_h = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    if (ids[k] < 0) {
      bp[k] = bq[k] = bg[k] = bh[k] = 0.0f;
      continue;
    }
    const float lq = div_log_prob(s[ids[k]], ms_k, inv_t, lq_norm);
    const float lpk = lp[k] - lp_norm;
    const float p = expf(lpk), q = expf(lq);
    const DivTerms x = div_terms_any(d, p, q, lpk, lq);
    bp[k] = p, bq[k] = q, bg[k] = x.g, bh[k] = x.h;
    soft += x.soft, sum_g += x.g, sum_h += x.h;
  }
  float g_tail = 0.0f, hop_tail = 0.0f, lp_tail = 0.0f, lq_tail = 0.0f;
  if (c.topk_mode == kTopkTail) {
    lp_tail = div_topk_teacher_tail(div_topk_teacher_lse(lp, ids, K));
    lq_tail = div_topk_student_tail(full, tail, inv_t);
    const float p = expf(lp_tail), q = expf(lq_tail);
    const DivTerms x = div_terms_any(d, p, q, lp_tail, lq_tail);
    soft += x.soft, sum_g += x.g, sum_h += x.h;
    g_tail = x.g;
    hop_tail = div_h_over_p(d, p, q, lp_tail, lq_tail);
  }
  if (d.kind == kDivEntropyGated) {
    // the sums were KL(p || q), KL(q || p), H(p) over the buckets: gate, then G, H of kind 2 at (w, 1 - w)
    const DivGateRow gr = div_gate_row(d, soft, sum_g, sum_h, V);
    soft = gr.soft, sum_g = gr.sum_g, sum_h = gr.sum_h;
    for (int64_t k = 0; k < K; ++k) {
      if (ids[k] < 0) continue;
      const float lq = div_log_prob(s[ids[k]], ms_k, inv_t, lq_norm), lpk = lp[k] - lp_norm;
      const DivTerms x = div_terms_any(gr.d, bp[k], bq[k], lpk, lq);
      bg[k] = x.g, bh[k] = x.h;
    }
    if (c.topk_mode == kTopkTail) {
      const float p = expf(lp_tail), q = expf(lq_tail);
      g_tail = div_terms_any(gr.d, p, q, lp_tail, lq_tail).g;
      hop_tail = div_h_over_p(gr.d, p, q, lp_tail, lq_tail);
    }
  }
  if (d.kind == kDivRenyi) {
    // the sum was U over the buckets: the row's S, then G, H of kind 5 at it
    const DivRenyiRow rr = div_renyi_row(d, soft, sum_g);  // U, S
    soft = rr.soft, sum_g = rr.sum_g, sum_h = rr.sum_h;
    for (int64_t k = 0; k < K; ++k) {
      if (ids[k] < 0) continue;
      const float lq = div_log_prob(s[ids[k]], ms_k, inv_t, lq_norm), lpk = lp[k] - lp_norm;
      const DivTerms x = div_terms_any(rr.d, bp[k], bq[k], lpk, lq);
      bg[k] = x.g, bh[k] = x.h;
    }
    if (c.topk_mode == kTopkTail) {
      const float p = expf(lp_tail), q = expf(lq_tail);
      g_tail = div_terms_any(rr.d, p, q, lp_tail, lq_tail).g;
      hop_tail = div_h_over_p(rr.d, p, q, lp_tail, lq_tail);
    }
  }
  if (div_soft_on(d) && lq_norm != lq_norm) soft = NAN;  // a NaN student logit (the xlogy selects could hide it)

  if (gt) {
    const float factor = c.topk_mode == kTopkTail ? hop_tail : sum_h;
    for (int64_t k = 0; k < K; ++k) gt[k] = ids[k] < 0 ? 0.0f : div_topk_teacher_grad(coef_t, bh[k], bp[k], factor);
  }
  if (gs) {
    if (c.topk_mode == kTopkTail) {
      tail_grad_pass(s, mark, V, inv_t, full, lq_norm, tail, coef, g_tail, sum_g, ce_q, gs);
    } else if (ce_q != 0.0f) {
      // (renormalise, T = 1) CE on every column; its softmax is that of the full row
      std::fill(gs, gs + V, 0.0f);
      add_softmax1(s, V, one, ce_q, gs);
    } else {
      std::fill(gs, gs + V, 0.0f);  // the renormalised loss does not depend on the other ids
    }
    if (ce1 && c.ce_weight != 0.0f) add_softmax1(s, V, one, w * c.ce_weight, gs);
    // members: their own formula, plus the CE's softmax at that column
    const float l1 = g >= 0 ? logf(one.z) : 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t id = ids[k];
      if (id < 0) continue;
      const float ce = (g >= 0 && c.ce_weight != 0.0f) ? w * c.ce_weight * expf(div_log_prob(s[id], one.m, 1.0f, l1))
                                                       : 0.0f;
      gs[id] = div_topk_member_grad(coef, bg[k], bq[k], sum_g) + ce;
    }
  }
  DivRowOut out = {soft, 0.0f};
  if (g >= 0) {
    out.hard = div_ce_hard(one, s[g]);
    if (gs && c.ce_weight != 0.0f) gs[g] -= w * c.ce_weight;
  }
  return out;
}

// ---------------------------------------------------------------------------
// The op

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cpu(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& topk_ids_in,
    const at::Tensor& target, const at::Tensor& row_weight, double temperature, int64_t kind, double a, double b,
    double w_p, double w_q, double soft_scale, double ce_weight, int64_t topk_mode, bool reduce, bool grad_student,
    bool grad_teacher, double teacher_temperature, std::optional<at::TensorList> teacher_members,
    at::ArrayRef<double> member_weights, int64_t mixture_mode) {
  // kinds 4 to 6 are another branch's (appended there); div_kind_known accepts what this file implements
  TORCH_CHECK_VALUE(kind >= kDivKL && kind <= kDivLastKind && div_kind_known(kind),
                    "fastkd: divergence_fwd kind must be 0 (KL family), 1 (TVD), 2 (two-sided KL), 3 (triangular), "
                    "4 (AB divergence), 6 (Renyi) or 7 (entropy-gated KL), got ", kind);
  TORCH_CHECK_VALUE(kind != kDivRenyi || (a > 0.0 && std::isfinite(a)), "fastkd: divergence_fwd: Renyi's order (a) "
                    "must be a finite number > 0, got ", a);
  TORCH_CHECK_VALUE(kind != kDivAB || (std::isfinite(a) && std::isfinite(b)), "fastkd: divergence_fwd: the AB "
                    "divergence's alpha, beta (a, b) must be finite, got ", a, ", ", b);
  TORCH_CHECK_VALUE(topk_mode >= kTopkNone && topk_mode <= kTopkRenorm,
                    "fastkd: divergence_fwd topk_mode must be 0 (dense), 1 (tail) or 2 (renormalise), got ", topk_mode);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature), "fastkd: temperature must be a finite number > 0, got ",
                    temperature);
  const TeacherScale ts = teacher_scale(temperature, teacher_temperature, "divergence_fwd");
  TORCH_CHECK_VALUE(topk_mode == kTopkNone || !ts.own, "fastkd: divergence_fwd: a top-k teacher's log-probs are taken "
                    "as given, so teacher_temperature must be 0 or the temperature (", temperature, "), got ",
                    teacher_temperature);
  TORCH_CHECK(student_in.device().is_cpu() && student_in.dim() == 2 && at::isFloatingType(student_in.scalar_type()),
              "fastkd: student must be a floating 2-D [N, V] CPU tensor, got ", student_in.scalar_type(), " ",
              student_in.sizes(), " on ", student_in.device());
  const int64_t N = student_in.size(0), V = student_in.size(1);
  // rows with unit column stride are read in place (row slices of a bigger tensor); other layouts are copied
  const at::Tensor student = student_in.stride(1) == 1 || V <= 1 ? student_in : student_in.contiguous();
  const bool topk = topk_mode != kTopkNone;
  at::Tensor teacher = teacher_in, topk_ids;
  int64_t K = 0;
  TORCH_CHECK(teacher_in.device().is_cpu() && teacher_in.dim() == 2 && at::isFloatingType(teacher_in.scalar_type()),
              "fastkd: teacher must be a floating 2-D CPU tensor, got ", teacher_in.scalar_type(), " ",
              teacher_in.sizes(), " on ", teacher_in.device());
  if (topk) {
    K = teacher_in.size(1);
    TORCH_CHECK(teacher_in.size(0) == N, "fastkd: teacher (top-k log-probs) must be [N, K] with N = ", N, ", got ",
                teacher_in.sizes());
    TORCH_CHECK(topk_ids_in.device().is_cpu() && topk_ids_in.scalar_type() == at::kLong &&
                    topk_ids_in.sizes() == teacher_in.sizes(),
                "fastkd: topk_ids must be an int64 CPU tensor shaped like the teacher log-probs ", teacher_in.sizes(),
                ", got ", topk_ids_in.scalar_type(), " ", topk_ids_in.sizes());
    teacher = teacher_in.to(at::kFloat).contiguous();  // [N, K]: small
    topk_ids = topk_ids_in.contiguous();
  } else {
    TORCH_CHECK(teacher_in.sizes() == student_in.sizes(), "fastkd: student and teacher shapes differ: ",
                student_in.sizes(), " and ", teacher_in.sizes());
    TORCH_CHECK(topk_ids_in.numel() == 0, "fastkd: topk_ids must be empty for a dense teacher (topk_mode = 0)");
    if (teacher.stride(1) != 1 && V > 1) teacher = teacher.contiguous();
  }
  const MixCall mix = mixture_call(teacher_members, member_weights, mixture_mode, student_in, topk_mode, grad_teacher,
                                   ts.inv_tt);
  const bool has_target = target.numel() > 0;
  if (has_target) check_row_vector(target, N, at::kLong, "target");
  // no rows: nothing to classify, so an empty target is the target of every row (kd_loss on [0, V] gives 0)
  TORCH_CHECK_VALUE(has_target || ce_weight == 0.0 || N == 0,
                    "fastkd: ce_weight = ", ce_weight, " adds a cross-entropy term, which needs target");
  check_row_vector(row_weight, N, at::kFloat, "row_weight");

  DivCall c;
  c.d = div_params(static_cast<int>(kind), static_cast<float>(a), static_cast<float>(b), static_cast<float>(w_p),
                   static_cast<float>(w_q));
  c.T = static_cast<float>(temperature), c.inv_t = 1.0f / c.T;
  c.inv_tt = ts.inv_tt, c.rho = ts.rho;
  c.soft_scale = static_cast<float>(soft_scale), c.ce_weight = static_cast<float>(ce_weight);
  c.topk_mode = static_cast<int>(topk_mode);
  c.V = V, c.K = K;
  // a mixture's row holds log p: the dense path reads it at inverse temperature 1 (rho = T / 1)
  DivCall c_row = c;
  if (mix.mode != kMixtureNone) c_row.inv_tt = 1.0f, c_row.rho = c.T;

  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor gs = grad_like(student, grad_student);
  at::Tensor gt32 = topk ? (grad_teacher ? at::empty({N, K}, f32) : at::empty({0}, f32))
                         : grad_like(teacher_in, grad_teacher);
  at::Tensor loss_rows = at::zeros({N}, f32), soft_rows = at::zeros({N}, f32), hard_rows = at::zeros({N}, f32);
  if (N > 0 && V == 0) {  // nothing to read
    if (gs.numel()) gs.zero_();
    if (gt32.numel()) gt32.zero_();
  } else if (N > 0) {
    const float* weight = row_weight.const_data_ptr<float>();
    const int64_t* tgt = has_target ? target.const_data_ptr<int64_t>() : nullptr;
    const int64_t* ids_all = topk ? topk_ids.const_data_ptr<int64_t>() : nullptr;
    const float* lp_all = topk ? teacher.const_data_ptr<float>() : nullptr;
    float* gt_topk = topk && grad_teacher ? gt32.mutable_data_ptr<float>() : nullptr;
    float* loss = loss_rows.mutable_data_ptr<float>();
    float* soft_out = soft_rows.mutable_data_ptr<float>();
    float* hard_out = hard_rows.mutable_data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
    // forward KL family (w_p == 0) without a teacher gradient: KD's row (fkl_row)
    const bool fkl = !topk && !grad_teacher && c.d.kind == kDivKL && c.d.mix == kMixQ;
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      thread_local DivScratch sc;
      thread_local MixScratch mix_sc;
      for (int64_t i = begin; i < end; ++i) {
        const float w = weight[i];
        float* gs_row = output_row(gs, i, sc.gs_conv);
        float* gt_row = topk ? (gt_topk ? gt_topk + i * K : nullptr) : output_row(gt32, i, sc.gt_conv);
        const int64_t gt_n = topk ? K : V;
        if (w == 0.0f) {  // skipped: not read
          if (gs_row) std::fill(gs_row, gs_row + V, 0.0f);
          if (gt_row) std::fill(gt_row, gt_row + gt_n, 0.0f);
        } else {
          int64_t g = -1;
          if (tgt) {
            g = tgt[i];
            TORCH_CHECK_VALUE(g >= 0 && g < V, "fastkd: target[", i, "] = ", g, " is outside [0, ", V, ")");
          }
          const float* s = input_span(student, i * student.stride(0), V, sc.s_conv);
          DivRowOut r;
          if (topk) {
            r = topk_row(c, i, s, lp_all + i * K, ids_all + i * K, g, w, gs_row, gt_row, sc);
          } else {
            const float* t = mix.mode != kMixtureNone ? mixture_row(mix, i, V, mix_sc)
                                                      : input_span(teacher, i * teacher.stride(0), V, sc.t_conv);
            r = fkl ? fkl_row(c_row, s, t, g, w, gs_row, sc) : dense_row(c_row, s, t, g, w, gs_row, gt_row, sc);
          }
          soft_out[i] = w * c.soft_scale * r.soft;
          hard_out[i] = w * r.hard;
          loss[i] = soft_out[i] + (c.ce_weight != 0.0f ? c.ce_weight * hard_out[i] : 0.0f);
        }
        output_row_done(gs, i, sc.gs_conv);
        if (!topk) output_row_done(gt32, i, sc.gt_conv);
      }
    });
  }
  at::Tensor gt = topk && grad_teacher ? gt32.to(teacher_in.scalar_type()) : gt32;
  if (topk && !grad_teacher) gt = at::empty({0}, teacher_in.options());
  if (reduce) return {loss_rows.sum(), soft_rows.sum(), hard_rows.sum(), gs, gt};
  return {loss_rows, soft_rows, hard_rows, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("divergence_fwd", &divergence_fwd_cpu); }

}  // namespace fastkd
