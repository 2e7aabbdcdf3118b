// The vocabulary-parallel divergences on the CPU (fastkd/distributed.py): the three
// row passes of a dense-teacher divergence over one rank's shard of the vocabulary,
// with the all-reduces of per-row numbers between them done in Python.
//
//   divergence_shard_stats  per row, over the shard: raw maxima of s and t and the
//                           sums of exp((x - max) / T) relative to them (and, for the
//                           cross-entropy, of exp(s - max_s)): [N, 5]
//   divergence_shard_terms  given the whole-vocabulary (M_s, L_s, M_t, L_t, L_1): the
//                           shard's part of the loss, of sum G, sum H and of TVD's
//                           sign masses ([N, 8]),
//                           with G and H written to the gradient buffers g, h when both
//                           are float32 ("stored"; else nothing: the grad pass recomputes);
//                           where sum G is known beforehand (kMixQ: forward KL, -(a + b))
//                           and row_direct [N, 2] gives (coef_s, ce), the student's
//                           gradient itself instead (no grad pass; no teacher gradient)
//   divergence_shard_grad   given the whole-vocabulary sum G, sum H (TVD: the sign
//                           masses) and the row coefficients: the gradients
//                           coef_s (G - q sum G) + ce (q1 - onehot), coef_t (H - p sum H)
//                           (TVD: 0.5 coef q div_tvd_factor(...) + ce (q1 - onehot), likewise
//                           for p), from the stored G, H in place, or with G, H recomputed
//
// Inputs: float32, bfloat16 or float16 rows with unit column stride (any row stride), converted
// to float32 per row (row_buffers.h); the math is float32 throughout. Gradient buffers g, h:
// float32 or the dtype of their input (student, teacher). G, H are kept between the passes only
// in float32: rounded to bf16, G alone carries an error of |G| eps where the gradient
// G - q sum G can be far smaller (forward KL: q - p, near 0 where the nets agree), so with a
// bf16/fp16 buffer the grad pass recomputes them from the logits (one more evaluation of the
// per-class terms, no [N, V] temporary). The CE's one-hot (-ce at row_target, the target's
// local column or -1) is added before a gradient is rounded to its dtype.
//
// The per-class math is csrc/divergence_math.h's (div_terms_form), as in the
// single-process op; only the row sums come from elsewhere. Rows with row_read 0 are
// not read (their outputs are 0).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "loss_common.h"
#include "../divergence_math.h"

namespace fastkd {
namespace {

bool shard_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

void check_shard_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && shard_dtype(x.scalar_type()) &&
                  (x.size(1) <= 1 || x.stride(1) == 1),
              "fastkd: ", name, " must be a float32, bfloat16 or float16 2-D CPU tensor with unit column stride, got ",
              x.scalar_type(), " ", x.sizes(), " strides ", x.strides(), " on ", x.device());
}

// A gradient buffer: empty (not wanted), or shaped like its input with unit column stride, in float32
// or the input's dtype.
void check_grad_rows(const at::Tensor& x, const at::Tensor& input, const char* name) {
  if (x.numel() == 0) return;
  TORCH_CHECK(x.device().is_cpu() && x.sizes() == input.sizes() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == input.scalar_type()) &&
                  (x.size(1) <= 1 || x.stride(1) == 1),
              "fastkd: ", name, " must be empty or a CPU tensor shaped like its input ", input.sizes(),
              " in float32 or ", input.scalar_type(), " with unit column stride, got ", x.scalar_type(), " ",
              x.sizes(), " strides ", x.strides());
}

// Whether G, H are kept in the gradient buffers between the terms and grad passes: every given one
// is float32 (else the grad pass recomputes them).
bool terms_stored(const at::Tensor& g, const at::Tensor& h) {
  return (g.numel() == 0 || g.scalar_type() == at::kFloat) && (h.numel() == 0 || h.scalar_type() == at::kFloat);
}

// row_target: empty (no one-hot) or int64 [N], the target's local column or -1.
const int64_t* row_targets(const at::Tensor& row_target, int64_t n) {
  if (row_target.numel() == 0) return nullptr;
  check_row_vector(row_target, n, at::kLong, "row_target");
  return row_target.const_data_ptr<int64_t>();
}

// Row i of x as float32 (in place, or converted into buf), and where row i of a gradient buffer is
// written as float32 (in place, or buf; then grad_row_done converts it): row_buffers.h at row i's offset.
const float* shard_row(const at::Tensor& x, int64_t i, std::vector<float>& buf) {
  return input_span(x, i * x.stride(0), x.size(1), buf);
}
float* grad_row_out(const at::Tensor& g, int64_t i, std::vector<float>& buf) {
  return output_span(g, g.numel() ? i * g.stride(0) : 0, g.numel() ? g.size(1) : 0, buf);
}
void grad_row_done(const at::Tensor& g, int64_t i, const std::vector<float>& buf) {
  if (g.numel()) output_span_done(g, i * g.stride(0), g.size(1), buf);
}

// An unread row of a gradient buffer: zeros (all-zero bits in every dtype taken).
void zero_row(const at::Tensor& g, int64_t i) {
  if (g.numel()) std::memset(static_cast<char*>(g.data_ptr()) + i * g.stride(0) * g.element_size(), 0,
                             g.size(1) * g.element_size());
}

void check_row_matrix(const at::Tensor& x, int64_t n, int64_t k, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == n &&
                  x.size(1) == k && x.is_contiguous(),
              "fastkd: ", name, " must be a contiguous float32 CPU tensor [", n, ", ", k, "], got ",
              x.scalar_type(), " ", x.sizes());
}

// The checks every pass makes: two float32 row tensors of one shape, and a known kind (-1: none given).
void check_shard_pair(const at::Tensor& student, const at::Tensor& teacher, int64_t kind) {
  check_shard_rows(student, "student");
  check_shard_rows(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "fastkd: student and teacher shapes differ: ", student.sizes(),
              " and ", teacher.sizes());
  // 5 (Renyi's gradient pass) is internal: the grad pass forms it from kind 6 and the row's 1 / S
  TORCH_CHECK_VALUE(kind == -1 || (kind >= kDivKL && kind <= kDivLastKind && div_kind_known(kind)),
                    "fastkd: kind must be 0 (KL family), 1 (TVD), 2 (two-sided KL), 3 (triangular), 4 (AB), 6 (Renyi) "
                    "or 7 (entropy-gated KL), got ", kind);
}

int64_t row_grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// sum of exp((x - m) * inv_t) of n values (m finite).
FASTKD_CPU_CLONES
float span_sum_exp(const float* x, int64_t n, float m, float inv_t) {
  float z = 0.0f;
#pragma omp simd reduction(+ : z)
  for (int64_t j = 0; j < n; ++j) z += vexp(kd_shift(x[j], m, inv_t));
  return z;
}

// Raw maximum and sum of exp((x - max) * inv_t) of n values: -inf and 0 for an empty or all -inf span.
// A NaN logit makes the sum NaN (the max comparisons skip it; its exp does not), also where every
// value is NaN or -inf (the max stays -inf): a NaN must reach the loss, never vanish as an empty shard.
FASTKD_CPU_CLONES
DivLse span_lse(const float* x, int64_t n, float inv_t) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  if (m == -INFINITY) {
    int nan = 0;
#pragma omp simd reduction(| : nan)
    for (int64_t j = 0; j < n; ++j) nan |= x[j] != x[j];
    return {m, nan ? NAN : 0.0f};
  }
  return {m, span_sum_exp(x, n, m, inv_t)};
}

at::Tensor shard_stats_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature, bool ce,
                           const at::Tensor& row_read) {
  check_shard_pair(student, teacher, -1);
  const int64_t N = student.size(0), V = student.size(1);
  check_row_vector(row_read, N, at::kFloat, "row_read");
  const float inv_t = static_cast<float>(1.0 / temperature);
  at::Tensor out = at::zeros({N, 5}, student.options().dtype(at::kFloat));
  const float* read = row_read.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf, tbuf;
    for (int64_t i = begin; i < end; ++i) {
      float* r = o + 5 * i;
      if (read[i] == 0.0f) {  // not read: an empty row (max -inf, sum 0)
        r[0] = r[2] = -INFINITY;
        continue;
      }
      const float* s = shard_row(student, i, sbuf);
      const DivLse a = span_lse(s, V, inv_t), b = span_lse(shard_row(teacher, i, tbuf), V, inv_t);
      r[0] = a.m, r[1] = a.z, r[2] = b.m, r[3] = b.z;
      r[4] = ce ? (inv_t == 1.0f || a.m == -INFINITY ? a.z : span_sum_exp(s, V, a.m, 1.0f)) : 0.0f;
    }
  });
  return out;
}

// How divergence_shard_terms stores the student's side: G, or (kMixQ, sum G known) the gradient
// coef_s (G - q sum G) with or without the cross-entropy's ce softmax(s) at T = 1.
enum ShardStore { kStoreG = 0, kStoreGrad = 1, kStoreGradCE = 2 };

// One row of divergence_shard_terms: writes G or the student's gradient (kG, kStore), H (kH); returns (soft,
// sum G, sum H) and, for TVD, the sign masses (q_lt, q_gt, p_lt, p_gt, tie of DivTvdSums) that
// divergence_shard_grad needs instead of G, H. direct: (coef_s, ce) of kStoreGrad*. The stores are
// compile-time choices: a null test per class kept the loop from vectorising.
template <int kKind, int kMix, int kForm, bool kG, bool kH, int kStore = kStoreG>
FASTKD_CPU_CLONES void terms_row(const DivParams& dp, const float* s, const float* t, int64_t V, float inv_t,
                                 const float* st, const float* direct, float* g, float* h, float* out) {
  static_assert(kStore == kStoreG || (kKind == kDivKL && kMix == kMixQ), "sum G is known in kMixQ only");
  const DivParams d = dp;
  const float ms = st[0], ls = st[1], mt = st[2], lt = st[3], l1 = st[4];
  const float dm = mt - ms, dl = ls - lt;
  const float coef_s = kStore == kStoreG ? 0.0f : direct[0], ce = kStore == kStoreGradCE ? direct[1] : 0.0f;
  const float known = div_known_sum(d);
  // double sums: sum G and G - q sum G nearly cancel on the largest classes (see divergence.cpp)
  double so = 0.0, sg = 0.0, sh = 0.0, q_lt = 0.0, q_gt = 0.0, p_lt = 0.0, p_gt = 0.0, tie = 0.0;
#pragma omp simd reduction(+ : so, sg, sh, q_lt, q_gt, p_lt, p_gt, tie)
  for (int64_t j = 0; j < V; ++j) {
    const float q = vexp(div_log_prob(s[j], ms, inv_t, ls)), p = vexp(div_log_prob(t[j], mt, inv_t, lt));
    const float delta = ((t[j] - s[j]) - dm) * inv_t + dl;  // lp - lq from the raw logits
    // kind 7: the gate's three sums (KL(p || q), KL(q || p), H(p)), lp from the teacher's logits
    // kinds 4, 5, 6: from the log-probs (kind 6: the sum U in soft, nothing stored)
    const float lq = div_log_prob(s[j], ms, inv_t, ls), lp = div_log_prob(t[j], mt, inv_t, lt);
    const DivTerms x = kKind == kDivEntropyGated ? div_gate_terms(p, q, lp, delta)
                       : kKind == kDivAB         ? div_ab_terms<false>(d, lp, lq, delta)  // guarded below
                       : kKind == kDivRenyi      ? div_renyi_terms(d, lp, lq, delta)
                       : kKind == kDivRenyiGrad  ? div_renyi_grad_terms(d, lp, lq, delta)
                                                 : div_terms_form<kKind, kMix, kForm>(d, p, q, delta);
    so += x.soft;
    sg += x.g;
    sh += x.h;
    if (kKind == kDivTVD) tvd_masses_add(q, p, q_lt, q_gt, p_lt, p_gt, tie);
    if (kG && kStore == kStoreG) g[j] = x.g;
    if (kG && kStore == kStoreGrad) g[j] = coef_s * (x.g - q * known);
    if (kG && kStore == kStoreGradCE) g[j] = coef_s * (x.g - q * known) + ce * vexp(div_log_prob(s[j], ms, 1.0f, l1));
    if (kH) h[j] = x.h;
  }
  if (kKind == kDivAB && !std::isfinite(so + sg + sh)) {  // a zero probability: the guarded terms (div_ab_terms)
    so = sg = sh = 0.0;
    for (int64_t j = 0; j < V; ++j) {
      const float lq = div_log_prob(s[j], ms, inv_t, ls), lp = div_log_prob(t[j], mt, inv_t, lt);
      const DivTerms x = div_ab_terms<true>(d, lp, lq, ((t[j] - s[j]) - dm) * inv_t + dl);
      so += x.soft, sg += x.g, sh += x.h;
      if (kG) g[j] = x.g;
      if (kH) h[j] = x.h;
    }
  }
  // (a NaN or all -inf row, which the zero-probability selects hide, is made NaN by the caller from the lse)
  const double sums[8] = {so, sg, sh, q_lt, q_gt, p_lt, p_gt, tie};
  for (int k = 0; k < 8; ++k) out[k] = static_cast<float>(sums[k]);
}

template <int kKind, int kMix, int kForm>
void terms_row_any(const DivParams& d, const float* s, const float* t, int64_t V, float inv_t, const float* st,
                   float* g, float* h, float* out) {
  if (g && h) terms_row<kKind, kMix, kForm, true, true>(d, s, t, V, inv_t, st, nullptr, g, h, out);
  else if (g) terms_row<kKind, kMix, kForm, true, false>(d, s, t, V, inv_t, st, nullptr, g, h, out);
  else if (h) terms_row<kKind, kMix, kForm, false, true>(d, s, t, V, inv_t, st, nullptr, g, h, out);
  else terms_row<kKind, kMix, kForm, false, false>(d, s, t, V, inv_t, st, nullptr, g, h, out);
}

// The student's gradient straight from the terms pass (kMixQ, row_direct given; g only, no H).
void terms_row_direct(const DivParams& d, const float* s, const float* t, int64_t V, float inv_t, const float* st,
                      const float* direct, float* g, float* out) {
  if (direct[1] != 0.0f)
    terms_row<kDivKL, kMixQ, kFormGeneral, true, false, kStoreGradCE>(d, s, t, V, inv_t, st, direct, g, nullptr, out);
  else
    terms_row<kDivKL, kMixQ, kFormGeneral, true, false, kStoreGrad>(d, s, t, V, inv_t, st, direct, g, nullptr, out);
}

// One row of the per-class terms (the kernel variant for d): the row's sums into out, G and H into g, h
// where not null (TVD: sums and sign masses only).
void terms_row_for(const DivParams& d, int form, const float* s, const float* t, int64_t V, float inv_t,
                   const float* st, float* g, float* h, float* out) {
#define FASTKD_SHARD_TERMS(KIND, MIX, FORM) terms_row_any<KIND, MIX, FORM>(d, s, t, V, inv_t, st, g, h, out)
  if (d.kind == kDivTVD)  // the gradient comes from the sign masses: no G, H
    terms_row<kDivTVD, kMixBoth, kFormGeneral, false, false>(d, s, t, V, inv_t, st, nullptr, g, h, out);
  else if (d.kind == kDivJeffreys) FASTKD_SHARD_TERMS(kDivJeffreys, kMixBoth, kFormGeneral);
  else if (d.kind == kDivTriangular) FASTKD_SHARD_TERMS(kDivTriangular, kMixBoth, kFormGeneral);
  else if (d.kind == kDivEntropyGated)  // G, H need the gate: the grad pass evaluates them (kind 2)
    terms_row<kDivEntropyGated, kMixBoth, kFormGeneral, false, false>(d, s, t, V, inv_t, st, nullptr, g, h, out);
  else if (d.kind == kDivAB) FASTKD_SHARD_TERMS(kDivAB, kMixBoth, kFormGeneral);
  else if (d.kind == kDivRenyi)  // G, H need S: the grad pass evaluates them (kind 5)
    terms_row<kDivRenyi, kMixBoth, kFormGeneral, false, false>(d, s, t, V, inv_t, st, nullptr, g, h, out);
  else if (d.kind == kDivRenyiGrad) FASTKD_SHARD_TERMS(kDivRenyiGrad, kMixBoth, kFormGeneral);
  else if (d.mix == kMixQ) FASTKD_SHARD_TERMS(kDivKL, kMixQ, kFormGeneral);
  else if (d.mix == kMixP) FASTKD_SHARD_TERMS(kDivKL, kMixP, kFormGeneral);
  else if (form == kFormProp) FASTKD_SHARD_TERMS(kDivKL, kMixBoth, kFormProp);
  else if (form == kFormNoB) FASTKD_SHARD_TERMS(kDivKL, kMixBoth, kFormNoB);
  else if (form == kFormNoA) FASTKD_SHARD_TERMS(kDivKL, kMixBoth, kFormNoA);
  else FASTKD_SHARD_TERMS(kDivKL, kMixBoth, kFormGeneral);
#undef FASTKD_SHARD_TERMS
}

// The CE's one-hot: -ce at the target's local column (col -1: another shard's, or none).
inline void add_one_hot(float* g, const int64_t* target, int64_t i, float ce) {
  if (g && target && ce != 0.0f && target[i] >= 0) g[target[i]] -= ce;
}

// g, h: [N, V] gradient buffers (float32 or the input's dtype; unit column stride, any row stride), or empty
// (not wanted): G, H written to them when both are float32 (terms_stored). row_direct: empty, or [N, 2]
// (coef_s, ce) for g to receive the student's gradient (kMixQ, no h: with a teacher gradient the grad pass
// runs anyway, and the Triton kernel with both spilled), with the one-hot at row_target.
at::Tensor shard_terms_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_stats,
                           double temperature, int64_t kind, double a, double b, double w_p, double w_q,
                           const at::Tensor& row_read, const at::Tensor& row_direct, const at::Tensor& row_target,
                           at::Tensor g, at::Tensor h) {
  check_shard_pair(student, teacher, kind);
  const int64_t N = student.size(0), V = student.size(1);
  check_row_matrix(row_stats, N, 5, "row_stats");
  check_row_vector(row_read, N, at::kFloat, "row_read");
  const DivParams d = div_params(static_cast<int>(kind), static_cast<float>(a), static_cast<float>(b),
                                 static_cast<float>(w_p), static_cast<float>(w_q));
  const bool direct = row_direct.numel() > 0;
  if (direct) {
    check_row_matrix(row_direct, N, 2, "row_direct");
    TORCH_CHECK_VALUE(d.kind == kDivKL && d.mix == kMixQ && g.numel() > 0 && h.numel() == 0,
                      "fastkd: row_direct needs the KL family with w_p = 0 (sum G known), a g buffer and no h");
  }
  const float inv_t = static_cast<float>(1.0 / temperature);
  check_grad_rows(g, student, "g");
  check_grad_rows(h, teacher, "h");
  const int64_t* target = row_targets(row_target, N);
  // G, H kept only in float32 buffers (terms_stored); the direct gradient goes into any
  const bool store = terms_stored(g, h);
  at::Tensor sums = at::zeros({N, 8}, student.options().dtype(at::kFloat));
  const float* stats = row_stats.const_data_ptr<float>();
  const float* read = row_read.const_data_ptr<float>();
  const float* coef = direct ? row_direct.const_data_ptr<float>() : nullptr;
  float* out = sums.mutable_data_ptr<float>();
  const int form = div_form(d);
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf, tbuf, gbuf, hbuf;
    for (int64_t i = begin; i < end; ++i) {
      if (read[i] == 0.0f) {
        zero_row(g, i);
        zero_row(h, i);
        continue;
      }
      const float* s = shard_row(student, i, sbuf);
      const float* t = shard_row(teacher, i, tbuf);
      const float* st = stats + 5 * i;
      if (direct) {
        float* gi = grad_row_out(g, i, gbuf);
        terms_row_direct(d, s, t, V, inv_t, st, coef + 2 * i, gi, out + 8 * i);
        add_one_hot(gi, target, i, coef[2 * i + 1]);
        grad_row_done(g, i, gbuf);
      } else {
        terms_row_for(d, form, s, t, V, inv_t, st, store ? grad_row_out(g, i, gbuf) : nullptr,
                      store ? grad_row_out(h, i, hbuf) : nullptr, out + 8 * i);
      }
    }
  });
  return sums;
}

// One TVD row of divergence_shard_grad: 0.5 coef x div_tvd_factor (the sign-mass form: G - q sum G
// cancelled on a peaked row's largest class, 2e-4 relative). c as grad_row's.
template <bool kG, bool kH>
FASTKD_CPU_CLONES void tvd_grad_row_for(const float* s, const float* t, int64_t V, float inv_t, const float* st,
                                        const float* c, float* g, float* h) {
  const float ms = st[0], ls = st[1], mt = st[2], lt = st[3], l1 = st[4];
  const float half_s = 0.5f * c[2], half_t = 0.5f * c[3], ce = c[4];
  const float q_lt = c[5], q_gt = c[6], p_lt = c[7], p_gt = c[8], tie = c[9];
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) {
    const float q = vexp(div_log_prob(s[j], ms, inv_t, ls)), p = vexp(div_log_prob(t[j], mt, inv_t, lt));
    if (kG) {
      const float ce_q = ce != 0.0f ? ce * vexp(div_log_prob(s[j], ms, 1.0f, l1)) : 0.0f;
      g[j] = half_s * q * div_tvd_factor(q, p, q_lt, q_gt, tie) + ce_q;
    }
    if (kH) h[j] = half_t * p * div_tvd_factor(p, q, p_lt, p_gt, tie);
  }
}

void tvd_grad_row(const float* s, const float* t, int64_t V, float inv_t, const float* st, const float* c, float* g,
                  float* h) {
  if (g && h) tvd_grad_row_for<true, true>(s, t, V, inv_t, st, c, g, h);
  else if (g) tvd_grad_row_for<true, false>(s, t, V, inv_t, st, c, g, h);
  else if (h) tvd_grad_row_for<false, true>(s, t, V, inv_t, st, c, g, h);
}

// One row of divergence_shard_grad. c: (sum G, sum H, coef_s, coef_t, ce, the TVD masses, kind 7's gate w or
// kind 6's 1 / S); st: (M_s, L_s,
// M_t, L_t, L_1).
FASTKD_CPU_CLONES void grad_row(const float* s, const float* t, int64_t V, float inv_t, const float* st,
                                const float* c, float* g, float* h) {
  const float ms = st[0], ls = st[1], mt = st[2], lt = st[3], l1 = st[4];
  const float sum_g = c[0], sum_h = c[1], coef_s = c[2], coef_t = c[3], ce = c[4];
  if (g) {
    if (ce != 0.0f) {
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) {
        const float q = vexp(div_log_prob(s[j], ms, inv_t, ls));
        g[j] = coef_s * (g[j] - q * sum_g) + ce * vexp(div_log_prob(s[j], ms, 1.0f, l1));
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) g[j] = coef_s * (g[j] - vexp(div_log_prob(s[j], ms, inv_t, ls)) * sum_g);
    }
  }
  if (h) {
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) h[j] = coef_t * (h[j] - vexp(div_log_prob(t[j], mt, inv_t, lt)) * sum_h);
  }
}

// a, b, w_p, w_q: the divergence's coefficients (as divergence_shard_terms'), for G, H recomputed when
// the buffers are not float32 (terms_stored). row_target: the CE's one-hot, as divergence_shard_terms'.
void shard_grad_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_stats,
                    double temperature, int64_t kind, double a, double b, double w_p, double w_q,
                    const at::Tensor& row_coef, const at::Tensor& row_read, const at::Tensor& row_target, at::Tensor g,
                    at::Tensor h) {
  check_shard_pair(student, teacher, kind);
  const int64_t N = student.size(0), V = student.size(1);
  check_row_matrix(row_stats, N, 5, "row_stats");
  check_row_matrix(row_coef, N, 10, "row_coef");
  check_row_vector(row_read, N, at::kFloat, "row_read");
  check_grad_rows(g, student, "g");
  check_grad_rows(h, teacher, "h");
  const int64_t* target = row_targets(row_target, N);
  const DivParams d = div_params(static_cast<int>(kind), static_cast<float>(a), static_cast<float>(b),
                                 static_cast<float>(w_p), static_cast<float>(w_q));
  const int form = div_form(d);
  const bool stored = terms_stored(g, h);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float* stats = row_stats.const_data_ptr<float>();
  const float* coef = row_coef.const_data_ptr<float>();
  const float* read = row_read.const_data_ptr<float>();
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf, tbuf, gbuf, hbuf;
    float unused[8];
    for (int64_t i = begin; i < end; ++i) {
      if (read[i] == 0.0f) continue;  // zeroed by divergence_shard_terms
      const float* s = shard_row(student, i, sbuf);
      const float* t = shard_row(teacher, i, tbuf);
      const float *st = stats + 5 * i, *c = coef + 10 * i;
      float* gi = grad_row_out(g, i, gbuf);
      float* hi = grad_row_out(h, i, hbuf);
      if (kind == kDivTVD) {
        tvd_grad_row(s, t, V, inv_t, st, c, gi, hi);
      } else if (kind == kDivEntropyGated) {  // c[5]: the row's gate w; G, H of kind 2 at (w, 1 - w)
        const DivParams dw = div_params(kDivJeffreys, c[5], 1.0f - c[5], 0.0f, 0.0f);
        terms_row_for(dw, kFormGeneral, s, t, V, inv_t, st, gi, hi, unused);
        grad_row(s, t, V, inv_t, st, c, gi, hi);
      } else if (kind == kDivRenyi) {  // c[5], c[6]: the row's 1 / S and direct flag; G, H of kind 5 at them
        const DivParams dr = div_params(kDivRenyiGrad, d.a, d.b, c[5], c[6]);
        terms_row_for(dr, kFormGeneral, s, t, V, inv_t, st, gi, hi, unused);
        grad_row(s, t, V, inv_t, st, c, gi, hi);
      } else {
        if (!stored) terms_row_for(d, form, s, t, V, inv_t, st, gi, hi, unused);  // G, H again, in float32
        grad_row(s, t, V, inv_t, st, c, gi, hi);
      }
      add_one_hot(gi, target, i, c[4]);
      grad_row_done(g, i, gbuf);
      grad_row_done(h, i, hbuf);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("divergence_shard_stats", &shard_stats_cpu);
  m.impl("divergence_shard_terms", &shard_terms_cpu);
  m.impl("divergence_shard_grad", &shard_grad_cpu);
}

}  // namespace fastkd
