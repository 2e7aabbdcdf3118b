// A TeacherMixture of dense members formed one row at a time inside divergence_fwd (csrc/cpu/divergence.cpp):
// the row's mixed log-probs go into a per-thread row buffer, which the dense path then reads as the teacher's
// logits at inverse temperature 1 (softmax(log p) = p). No [N, V] tensor of the mixture ever exists.
//
// With a_ij = (t_ij - M_i) / T_t - L_i (member i's log-probs at the teacher temperature; M_i its raw maximum,
// L_i the log of its sum relative to M_i) and weights w_i:
//   arithmetic: log p_j = log sum_i w_i exp(a_ij): the sum from the exps the statistics pass kept (relative to
//               each chunk's maximum, times one factor per member and chunk), so one log per column and no exp;
//               a column whose sum is below kMixTiny (exps that may have underflowed) is redone as
//               logsumexp_i(log w_i + a_ij), so log-probs far below float32's exp range keep their digits;
//   geometric:  log p_j = sum_i w_i (t_ij - M_i) / T_t (the L_i are a per-row constant, which the dense path's
//               softmax removes, so only each member's maximum is needed).
#pragma once
#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "loss_common.h"
#include "../divergence_math.h"

namespace fastkd {

enum MixtureMode { kMixtureNone = 0, kMixtureArithmetic = 1, kMixtureGeometric = 2 };

// log(x) for the positive normal floats this file takes (mixed probabilities >= kMixTiny), branch-free so that
// the column loops vectorise (glibc's logf does not): x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m =
// 2 atanh(f / (2 + f)), f = m - 1, by its odd series to s^9 (|s| < 0.172: relative error below 1e-9 before
// rounding). 0 gives -inf, NaN stays NaN, +inf stays +inf (subnormals are not expected here).
FASTKD_INLINE float vlog_pos(float x) {
  int32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 127;
  int32_t mbits = (bits & 0x007fffff) | 0x3f800000;
  float m;
  memcpy(&m, &mbits, sizeof(m));
  const bool big = m > 1.41421356f;
  m = big ? 0.5f * m : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f, s = f / (2.0f + f), s2 = s * s;
  float poly = 1.0f / 9.0f;
  poly = poly * s2 + 1.0f / 7.0f;
  poly = poly * s2 + 1.0f / 5.0f;
  poly = poly * s2 + 1.0f / 3.0f;
  const float log_m = 2.0f * s + 2.0f * s * s2 * poly;
  const float ef = static_cast<float>(e);
  float y = ef * 0.693359375f + (log_m - ef * 2.12194440e-4f);  // ln2 split in two, as vexp
  y = x == 0.0f ? -INFINITY : y;
  y = x == INFINITY ? INFINITY : y;
  return x != x ? x : y;
}

// What is fixed for one call: the members [N, V] (unit column stride), their weights and the teacher's 1 / T_t.
struct MixCall {
  int mode = kMixtureNone;
  std::vector<at::Tensor> members;
  std::vector<float> log_w, w;
  float inv_tt = 1.0f;
};

// divergence_fwd's mixture arguments, checked (mode 0: none, and no members or weights). The schema's
// "Tensor[]? teacher_members=None": a defaulted tensor list must be optional (TorchScript's schema parser takes
// list defaults for numbers only), so None and [] both mean no members. The members take the
// dense teacher's layout rules: [N, V] like the student, floating, on the CPU; rows with unit column stride are
// read in place, other layouts copied. inv_tt: the call's 1 / T_t.
inline MixCall mixture_call(std::optional<at::TensorList> given, at::ArrayRef<double> weights, int64_t mode,
                            const at::Tensor& student, int64_t topk_mode, bool grad_teacher, float inv_tt) {
  TORCH_CHECK_VALUE(mode >= kMixtureNone && mode <= kMixtureGeometric, "fastkd: divergence_fwd: mixture_mode must be "
                    "0 (no mixture), 1 (arithmetic) or 2 (geometric), got ", mode);
  const at::TensorList members = given.has_value() ? *given : at::TensorList();
  MixCall mc;
  if (mode == kMixtureNone) {
    TORCH_CHECK_VALUE(members.empty() && weights.empty(), "fastkd: divergence_fwd: teacher_members and "
                      "member_weights need mixture_mode 1 (arithmetic) or 2 (geometric), got mixture_mode 0");
    return mc;
  }
  const int64_t K = static_cast<int64_t>(members.size());
  TORCH_CHECK_VALUE(K >= 1, "fastkd: divergence_fwd: mixture_mode ", mode, " needs at least one teacher member");
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == K, "fastkd: divergence_fwd: member_weights must hold one "
                    "weight per teacher member (", K, "), got ", weights.size());
  TORCH_CHECK_VALUE(topk_mode == 0, "fastkd: divergence_fwd: a teacher mixture takes dense members (topk_mode 0), "
                    "got topk_mode ", topk_mode);
  TORCH_CHECK_VALUE(!grad_teacher, "fastkd: divergence_fwd: a teacher mixture's members are constants: "
                    "grad_teacher must be false");
  mc.mode = static_cast<int>(mode), mc.inv_tt = inv_tt;
  for (int64_t k = 0; k < K; ++k) {
    const double w = weights[k];
    const float wf = static_cast<float>(w);  // (1e-50 would be 0 in float32, and 0 * -inf a NaN row)
    TORCH_CHECK_VALUE(w > 0.0 && std::isfinite(w) && std::isfinite(std::log(w)) && wf > 0.0f && std::isfinite(wf) &&
                      std::isfinite(wf * inv_tt), "fastkd: divergence_fwd: member_weights[", k, "] must be a "
                      "finite number > 0 representable in float32 (also times 1 / teacher_temperature), got ", w);
    const at::Tensor& m = members[k];
    TORCH_CHECK(m.device().is_cpu() && at::isFloatingType(m.scalar_type()) && m.sizes() == student.sizes(),
                "fastkd: divergence_fwd: teacher_members[", k, "] must be a floating CPU tensor shaped like the "
                "student ", student.sizes(), ", got ", m.scalar_type(), " ", m.sizes(), " on ", m.device());
    mc.members.push_back(m.stride(1) == 1 || m.size(1) <= 1 ? m : m.contiguous());
    mc.w.push_back(static_cast<float>(w));
    mc.log_w.push_back(static_cast<float>(std::log(w)));
  }
  return mc;
}

// Per-thread scratch: each member's row as float32 (its dtype converted), its exps relative to each chunk's
// maximum (arithmetic) and those chunk maxima, the mixed row.
struct MixScratch {
  std::vector<std::vector<float>> conv, kept, chunk_max;
  std::vector<const float*> rows;
  std::vector<float> maxima, lse;  // per member: M_i (0 for an all -inf row), L_i
  std::vector<float> out;
};

// Below this a column's mixed probability is taken in log space instead (vlog_pos takes normal floats, and a
// probability whose exps underflowed must keep its log's digits).
constexpr float kMixTiny = 1e-30f;

// One member row's raw maximum and, for the arithmetic mixture, the log of its sum of exps relative to it at
// inv_tt, in one chunked read; with `kept` the exps relative to each chunk's maximum (kept, one per column) and
// those maxima (chunk_max, one per chunk).
FASTKD_INLINE DivLse member_stats(const float* t, int64_t V, float inv_tt, float* kept, float* chunk_max) {
  DivLse st = div_lse_empty();
  for (int64_t c0 = 0, k = 0; c0 < V; c0 += kStatsChunk, ++k) {
    const int64_t n = std::min(kStatsChunk, V - c0);
    const float* x = t + c0;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
    if (!kept) {
      st.m = max_ignoring_nan(st.m, m);
      continue;
    }
    const float base = m == -INFINITY ? 0.0f : m;
    float* e = kept + c0;
    float z = 0.0f;
#pragma omp simd reduction(+ : z)
    for (int64_t j = 0; j < n; ++j) {
      e[j] = vexp((x[j] - base) * inv_tt);
      z += e[j];
    }
    chunk_max[k] = m;
    div_lse_merge(st, DivLse{m, z}, inv_tt);
  }
  return st;
}

// log p of one column of the arithmetic mixture in log space: logsumexp_i(log w_i + (t_ij - M_i) / T_t - L_i)
// (the columns whose mixed probability is below kMixTiny: rare, so scalar).
inline float mixture_column_log(const MixCall& mc, const MixScratch& sc, int64_t j) {
  const int64_t K = static_cast<int64_t>(mc.members.size());
  float mx = -INFINITY;
  for (int64_t k = 0; k < K; ++k) {
    const float a = (sc.rows[k][j] - sc.maxima[k]) * mc.inv_tt + mc.log_w[k] - sc.lse[k];
    if (a != a) return a;
    mx = a > mx ? a : mx;
  }
  if (mx == -INFINITY) return mx;
  float z = 0.0f;
  for (int64_t k = 0; k < K; ++k) z += expf((sc.rows[k][j] - sc.maxima[k]) * mc.inv_tt + mc.log_w[k] - sc.lse[k] - mx);
  return mx + logf(z);
}

// Row i of the mixture: its log-probs (geometric: up to a per-row constant) into sc.out, V floats.
FASTKD_CPU_CLONES
static const float* mixture_row(const MixCall& mc, int64_t i, int64_t V, MixScratch& sc) {
  const int64_t K = static_cast<int64_t>(mc.members.size()), nc = (V + kStatsChunk - 1) / kStatsChunk;
  const bool arith = mc.mode == kMixtureArithmetic;
  const float inv_tt = mc.inv_tt;
  sc.conv.resize(K), sc.kept.resize(K), sc.chunk_max.resize(K);
  sc.rows.resize(K), sc.maxima.resize(K), sc.lse.resize(K);
  for (int64_t k = 0; k < K; ++k) {
    const at::Tensor& m = mc.members[k];
    sc.rows[k] = input_span(m, i * m.stride(0), V, sc.conv[k]);
    float* kept = arith ? (sc.kept[k].resize(V), sc.kept[k].data()) : nullptr;
    float* chunk_max = arith ? (sc.chunk_max[k].resize(nc), sc.chunk_max[k].data()) : nullptr;
    const DivLse st = member_stats(sc.rows[k], V, inv_tt, kept, chunk_max);
    sc.maxima[k] = st.m == -INFINITY ? 0.0f : st.m;
    sc.lse[k] = arith ? div_lse_log(st) : 0.0f;  // an all -inf member: log 0 = -inf
  }
  sc.out.resize(V);
  float* out = sc.out.data();
  if (!arith) {
    for (int64_t k = 0; k < K; ++k) {
      const float* t = sc.rows[k];
      const float mk = sc.maxima[k], scale = mc.w[k] * inv_tt;
      if (k == 0) {
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) out[j] = (t[j] - mk) * scale;
      } else {
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) out[j] += (t[j] - mk) * scale;
      }
    }
    return out;
  }
  // arithmetic, chunk by chunk: p_j = sum_i c_ik e_ij from the kept exps, c_ik = w_i exp((m_ik - M_i) / T_t - L_i)
  // (m_ik the chunk's maximum; 0 for a member with no mass), then log p_j; a column whose p_j is below kMixTiny
  // (its exps may have underflowed) is redone in log space
  for (int64_t c0 = 0, c = 0; c0 < V; c0 += kStatsChunk, ++c) {
    const int64_t n = std::min(kStatsChunk, V - c0);
    float* p = out + c0;
    for (int64_t k = 0; k < K; ++k) {
      const float* e = sc.kept[k].data() + c0;
      const float gap = raw_gap(sc.chunk_max[k][c], sc.maxima[k]);
      // a member with no finite logit has no distribution: NaN, as the reference and the block path give
      const float coef = sc.lse[k] == -INFINITY ? NAN : mc.w[k] * expf(gap * inv_tt - sc.lse[k]);
      if (k == 0) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) p[j] = coef * e[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) p[j] += coef * e[j];
      }
    }
    float smallest = INFINITY;
#pragma omp simd reduction(min : smallest)
    for (int64_t j = 0; j < n; ++j) {
      smallest = p[j] < smallest ? p[j] : smallest;
      p[j] = vlog_pos(p[j]);
    }
    if (smallest < kMixTiny) {
      for (int64_t j = 0; j < n; ++j) {
        if (p[j] < logf(kMixTiny)) p[j] = mixture_column_log(mc, sc, c0 + j);
      }
    }
  }
  return out;
}

}  // namespace fastkd
