// KD on the CPU: one fused forward per row that writes the loss, the student
// and teacher gradients and d/dT (math in csrc/kd_math.h), parallel over rows,
// vectorised over classes.
//
// Passes over a row: (1) statistics in chunks of kStatsChunk columns (chunk
// maxima, then the exps relative to them, merged into the row's statistics),
// keeping both exps of every column when a gradient is wanted: the student's in
// the student-gradient row (or a per-thread row buffer), the teacher's in a
// per-thread row buffer; (2) only when a gradient is wanted, the gradients from
// the kept exps, rescaled per chunk, so two exps per element in all. A chunk of
// both nets stays in L1 between its max and its exps, and a whole row of the
// usual vocabularies (inputs and kept exps) stays in L2 between the two passes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../kd_math.h"
#include "loss_common.h"
#include "vec_exp.h"

namespace fastkd {
namespace {

// KDRawStats (csrc/kd_math.h) of one chunk of raw logits: the chunk maxima first,
// then the sums relative to them (one exp per element and net). With kKeep it
// also stores the exps, exp((x - chunk max) / T), into kept_s and kept_t.
template <bool kKeep>
FASTKD_INLINE KDRawStats kd_chunk_stats(const float* s, const float* t, int64_t n, float inv_t, float* kept_s,
                                        float* kept_t) {
  const ChunkMax m = chunk_max(s, t, n);
  float zs = 0.0f, zt = 0.0f, cross = 0.0f;
#pragma omp simd reduction(+ : zs, zt, cross)
  for (int64_t j = 0; j < n; ++j) {
    const float a = (s[j] - m.bs) * inv_t, b = (t[j] - m.bt) * inv_t;  // raw differences first
    const float es = vexp(a), et = vexp(b);
    if (kKeep) kept_s[j] = es, kept_t[j] = et;
    zs += es;
    zt += et;
    cross += kd_cross_term(et, a, b);
  }
  return {m.ms, zs, m.mt, zt, cross};
}

// The gradients of one chunk from its kept exps: p = kept * to_p (to_p per net:
// exp((chunk max - row max) / T - lse)). kept_s may be gs itself (read, then
// overwritten). The inputs are read again only for the teacher gradient and dL/dT.
template <bool kGradS, bool kGradT, bool kDTemp>
FASTKD_INLINE void kd_grad_chunk(const float* s, const float* t, int64_t n, float inv_t, const KDRawStats& st,
                                 const KDRow& r, float to_ps, float to_pt, const float* kept_s, const float* kept_t,
                                 float coef, float* gs, float* gt, float& a1, float& a2) {
  float s1 = 0.0f, s2 = 0.0f;
  const float ms = st.ms, mt = st.mt;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t j = 0; j < n; ++j) {
    const float ps = kept_s[j] * to_ps, pt = kept_t[j] * to_pt;
    if (kGradS) gs[j] = coef * (ps - pt);
    if (kGradT || kDTemp) {
      const float a = (s[j] - ms) * inv_t, b = (t[j] - mt) * inv_t;
      if (kGradT) gt[j] = coef * kd_teacher_term(r, pt, a, b);
      if (kDTemp) kd_dtemp_terms(r, ps, pt, a, b, s1, s2);
    }
  }
  a1 += s1, a2 += s2;
}

// The gradient pass over a row, chunk by chunk (`chunk_max`: both nets' maxima per chunk).
template <bool kGradS, bool kGradT, bool kDTemp>
FASTKD_INLINE void kd_grad_pass(const float* s, const float* t, int64_t C, float inv_t, const KDRawStats& st,
                                const KDRow& r, const float* chunk_max, const float* kept_s, const float* kept_t,
                                float coef, float* gs, float* gt, float& a1, float& a2) {
  for (int64_t c0 = 0, k = 0; c0 < C; c0 += kStatsChunk, ++k) {
    const int64_t n = std::min(kStatsChunk, C - c0);
    // 0 for an all -inf chunk (whose kept exps are 0)
    const float to_ps = expf(raw_gap(chunk_max[2 * k], st.ms) * inv_t - r.lse_s);
    const float to_pt = expf(raw_gap(chunk_max[2 * k + 1], st.mt) * inv_t - r.lse_t);
    kd_grad_chunk<kGradS, kGradT, kDTemp>(s + c0, t + c0, n, inv_t, st, r, to_ps, to_pt, kept_s + c0, kept_t + c0,
                                          coef, kGradS ? gs + c0 : nullptr, kGradT ? gt + c0 : nullptr, a1, a2);
  }
}

// Per-thread scratch of kd_row: kept exps of one row (the student's only when it
// has no gradient row to live in) and both maxima of every chunk.
struct KDScratch {
  std::vector<float> kept_s, kept_t, chunk_max;
};

// One row: returns the weighted loss, writes the weighted gradients (gs / gt may
// be null) and, if asked, the weighted dL/dT.
FASTKD_CPU_CLONES
float kd_row(const float* s, const float* t, int64_t C, float T, float w, float* gs, float* gt, float* dtemp,
             KDScratch& scratch) {
  const float inv_t = 1.0f / T;
  const int mode = (gs ? 1 : 0) | (gt ? 2 : 0) | (dtemp ? 4 : 0);
  float *kept_s = gs, *kept_t = nullptr;
  if (mode) {
    scratch.kept_t.resize(C);
    kept_t = scratch.kept_t.data();
    if (!gs) {
      scratch.kept_s.resize(C);
      kept_s = scratch.kept_s.data();
    }
  }
  scratch.chunk_max.resize(2 * ((C + kStatsChunk - 1) / kStatsChunk));
  float* chunk_max = scratch.chunk_max.data();
  KDRawStats st = kd_raw_empty();
  for (int64_t c0 = 0, k = 0; c0 < C; c0 += kStatsChunk, ++k) {
    const int64_t n = std::min(kStatsChunk, C - c0);
    const KDRawStats chunk = mode ? kd_chunk_stats<true>(s + c0, t + c0, n, inv_t, kept_s + c0, kept_t + c0)
                                  : kd_chunk_stats<false>(s + c0, t + c0, n, inv_t, nullptr, nullptr);
    chunk_max[2 * k] = chunk.ms, chunk_max[2 * k + 1] = chunk.mt;
    st = kd_raw_merge(st, chunk, inv_t);
  }
  const KDRow r = kd_raw_finish(st);
  const float coef = w * T;
  float a1 = 0.0f, a2 = 0.0f;
#define FASTKD_KD_PASS(GS, GT, DT) \
  kd_grad_pass<GS, GT, DT>(s, t, C, inv_t, st, r, chunk_max, kept_s, kept_t, coef, gs, gt, a1, a2)
  switch (mode) {
    case 1: FASTKD_KD_PASS(true, false, false); break;  // the usual training case
    case 2: FASTKD_KD_PASS(false, true, false); break;
    case 3: FASTKD_KD_PASS(true, true, false); break;
    case 4: FASTKD_KD_PASS(false, false, true); break;
    case 5: FASTKD_KD_PASS(true, false, true); break;
    case 6: FASTKD_KD_PASS(false, true, true); break;
    case 7: FASTKD_KD_PASS(true, true, true); break;
    default: break;
  }
#undef FASTKD_KD_PASS
  if (dtemp) *dtemp = w * kd_dtemp(T, r.kl, a1, a2);
  return w * T * T * r.kl;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& temperature,
    const at::Tensor& row_weight, bool reduce, bool grad_student, bool grad_teacher, bool grad_temperature) {
  check_logit_pair(student, teacher);
  const int64_t N = student.size(0), C = student.size(1);
  check_row_vector(temperature, N, at::kFloat, "temperature");
  check_row_vector(row_weight, N, at::kFloat, "row_weight");

  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor gs = grad_like(student, grad_student);
  at::Tensor gt = grad_like(teacher, grad_teacher);
  at::Tensor gT = grad_temperature ? at::zeros({N}, f32) : at::empty({0}, f32);
  const float* temp = temperature.const_data_ptr<float>();
  const float* weight = row_weight.const_data_ptr<float>();
  float* dtemp = grad_temperature ? gT.mutable_data_ptr<float>() : nullptr;
  at::Tensor loss_rows = for_each_weighted_row(
      student, teacher, row_weight, gs, gt, [&](int64_t i, const float* s, const float* t, float* gs_row, float* gt_row) {
        thread_local KDScratch scratch;
        return kd_row(s, t, C, temp[i], weight[i], gs_row, gt_row, dtemp ? dtemp + i : nullptr, scratch);
      });
  at::Tensor loss_out = reduce ? loss_rows.sum() : loss_rows;
  return {loss_out, gs, gt, gT};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("kd_fwd", &kd_fwd_cpu); }

}  // namespace fastkd
