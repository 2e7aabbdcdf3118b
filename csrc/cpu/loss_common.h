// Pieces shared by the CPU kernels: argument checks, chunk maxima (KD and the
// divergences), TVD's sign masses (the divergence kernels), online softmax
// statistics of a stretch of a row with separate student and teacher scales, and
// the parallel row loop that skips ignored rows with the forward of the
// target-aware KL losses (ats.cpp, dkd.cpp) around it.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../kd_math.h"
#include "grad_buffers.h"
#include "row_buffers.h"
#include "vec_exp.h"

namespace fastkd {

inline void check_logit_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "fastkd: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2, "fastkd: ", name, " must be 2-D [N, C], got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(), "fastkd: ", name, " must be contiguous");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastkd: ", name, " must be floating, got ", x.scalar_type());
}

inline void check_logit_pair(const at::Tensor& student, const at::Tensor& teacher) {
  check_logit_rows(student, "student");
  check_logit_rows(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "fastkd: student and teacher shapes differ: ", student.sizes(),
              " and ", teacher.sizes());
}

inline void check_row_vector(const at::Tensor& v, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 1 && v.size(0) == n && v.scalar_type() == dtype && v.is_contiguous(),
              "fastkd: ", name, " must be a contiguous ", dtype, " CPU vector of ", n, " rows, got ", v.scalar_type(),
              " ", v.sizes());
}

// The teacher's own temperature T_t of divergence_fwd and akl_fwd (their teacher_temperature; 0 means T), checked:
// inv_tt = 1 / T_t scales the teacher's logits, rho = T / T_t turns them into the student's units (1 / T). At
// T_t = T (or 0) they are exactly 1 / T and 1, so the kernels compute today's one-temperature expressions.
struct TeacherScale {
  float inv_tt, rho;
  bool own;  // T_t differs from T
};

inline TeacherScale teacher_scale(double temperature, double teacher_temperature, const char* op) {
  const float T = static_cast<float>(temperature), tt = static_cast<float>(teacher_temperature);
  const bool usable = tt > 0.0f && std::isfinite(tt) && std::isfinite(1.0f / tt) && std::isfinite(T / tt);
  TORCH_CHECK_VALUE(teacher_temperature == 0.0 || usable,
                    "fastkd: ", op, " teacher_temperature must be a finite number > 0 (or 0: the temperature), got ",
                    teacher_temperature);
  if (teacher_temperature == 0.0 || tt == T) return {1.0f / T, 1.0f, false};
  return {1.0f / tt, T / tt, true};
}

// Target of a counted row, checked (ignored rows never get here, so theirs is never read).
inline int64_t checked_target(const int64_t* target, int64_t i, int64_t C) {
  const int64_t g = target[i];
  TORCH_CHECK(g >= 0 && g < C, "fastkd: target[", i, "] = ", g, " is outside [0, ", C, ")");
  return g;
}

// Columns per chunk of the statistics pass: a chunk of both nets (16 KiB in
// float32) stays in L1 between its max and its sums.
constexpr int64_t kStatsChunk = 2048;

// The raw maxima of both nets over one chunk of n columns, and the shifts its exps are
// taken relative to: the maxima, or 0 for an all -inf net (its exps are all 0, not NaN).
// (KD, forward KL and the dense divergences; kl_chunk_stats below takes maxima of scaled logits.)
struct ChunkMax {
  float ms, mt;  // maxima
  float bs, bt;  // shifts
};

FASTKD_INLINE ChunkMax chunk_max(const float* s, const float* t, int64_t n) {
  float ms = -INFINITY, mt = -INFINITY;
#pragma omp simd reduction(max : ms, mt)
  for (int64_t j = 0; j < n; ++j) {
    ms = s[j] > ms ? s[j] : ms;
    mt = t[j] > mt ? t[j] : mt;
  }
  return {ms, mt, ms == -INFINITY ? 0.0f : ms, mt == -INFINITY ? 0.0f : mt};
}

// Adds one class to TVD's sign masses (DivTvdSums in csrc/divergence_math.h): q where q < p,
// q where q > p, p where p < q, p where p > q, p where p == q. The divergence loops keep them
// in double, as their other sums.
FASTKD_INLINE void tvd_masses_add(float q, float p, double& q_lt, double& q_gt, double& p_lt, double& p_gt,
                                  double& tie) {
  q_lt += q < p ? q : 0.0f;
  q_gt += q > p ? q : 0.0f;
  p_lt += p < q ? p : 0.0f;
  p_gt += p > q ? p : 0.0f;
  tie += p == q ? p : 0.0f;
}

// KDStats of one chunk, a = s * inv_a (student), b = t * inv_b (teacher): the
// chunk max first, then the sums relative to it (one exp per element and net).
// (ATS and DKD; KD has its own, in raw-logit units, in kd.cpp.)
FASTKD_INLINE KDStats kl_chunk_stats(const float* s, const float* t, int64_t n, float inv_a, float inv_b) {
  float ms = -INFINITY, mt = -INFINITY;
#pragma omp simd reduction(max : ms, mt)
  for (int64_t j = 0; j < n; ++j) {
    const float a = s[j] * inv_a, b = t[j] * inv_b;
    ms = a > ms ? a : ms;
    mt = b > mt ? b : mt;
  }
  // exps relative to the chunk max; an all -inf chunk uses 0 (its exps are all 0, not NaN)
  const float base_s = ms == -INFINITY ? 0.0f : ms, base_t = mt == -INFINITY ? 0.0f : mt;
  float zs = 0.0f, zt = 0.0f, cross = 0.0f;
#pragma omp simd reduction(+ : zs, zt, cross)
  for (int64_t j = 0; j < n; ++j) {
    const float a = s[j] * inv_a, b = t[j] * inv_b;
    const float et = vexp(b - base_t), es = vexp(a - base_s);
    zs += es;
    zt += et;
    cross += kd_cross_term(et, a, b);
  }
  return {ms, zs, mt, zt, cross};
}

// KDStats of n consecutive columns (n may be 0).
FASTKD_INLINE KDStats kl_span_stats(const float* s, const float* t, int64_t n, float inv_a, float inv_b) {
  KDStats st = kd_stats_empty();
  for (int64_t c0 = 0; c0 < n; c0 += kStatsChunk) {
    st = kd_stats_merge(st, kl_chunk_stats(s + c0, t + c0, std::min(kStatsChunk, n - c0), inv_a, inv_b));
  }
  return st;
}

// Runs `row(i, s, t, gs, gt) -> weighted row loss` on every row with a nonzero
// weight, in parallel over rows, with float32 views of the inputs and of the
// gradient rows to write (null when not requested). Rows with weight 0 are not
// read: loss 0, gradients 0. Returns the per-row losses (float32 [N]).
template <typename RowFn>
at::Tensor for_each_weighted_row(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& row_weight,
                                 const at::Tensor& gs, const at::Tensor& gt, const RowFn& row) {
  const int64_t N = student.size(0), C = student.size(1);
  at::Tensor loss_rows = at::zeros({N}, student.options().dtype(at::kFloat));
  if (N == 0) return loss_rows;
  if (C == 0) {
    if (gs.numel()) gs.zero_();
    if (gt.numel()) gt.zero_();
    return loss_rows;
  }
  const float* weight = row_weight.const_data_ptr<float>();
  float* loss = loss_rows.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 32768 / C);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> sbuf, tbuf, gsbuf, gtbuf;
    for (int64_t i = begin; i < end; ++i) {
      float* gs_row = output_row(gs, i, gsbuf);
      float* gt_row = output_row(gt, i, gtbuf);
      if (weight[i] == 0.0f) {
        if (gs_row) std::fill(gs_row, gs_row + C, 0.0f);
        if (gt_row) std::fill(gt_row, gt_row + C, 0.0f);
      } else {
        loss[i] = row(i, input_row(student, i, sbuf), input_row(teacher, i, tbuf), gs_row, gt_row);
      }
      output_row_done(gs, i, gsbuf);
      output_row_done(gt, i, gtbuf);
    }
  });
  return loss_rows;
}

// The forward of a target-indexed loss (ATS, DKD) around
// `row(s, t, C, target, weight, gs, gt) -> weighted row loss` of one counted row:
// the checks, the gradients asked for, the row loop, and the sum when `reduce`.
template <typename RowFn>
std::tuple<at::Tensor, at::Tensor, at::Tensor> target_rows_fwd(const at::Tensor& student, const at::Tensor& teacher,
                                                               const at::Tensor& target, const at::Tensor& row_weight,
                                                               bool reduce, bool grad_student, bool grad_teacher,
                                                               const RowFn& row) {
  check_logit_pair(student, teacher);
  const int64_t N = student.size(0), C = student.size(1);
  check_row_vector(target, N, at::kLong, "target");
  check_row_vector(row_weight, N, at::kFloat, "row_weight");
  at::Tensor gs = grad_like(student, grad_student), gt = grad_like(teacher, grad_teacher);
  const int64_t* tgt = target.const_data_ptr<int64_t>();
  const float* weight = row_weight.const_data_ptr<float>();
  auto counted_row = [&](int64_t i, const float* s, const float* t, float* gs_row, float* gt_row) {
    return row(s, t, C, checked_target(tgt, i, C), weight[i], gs_row, gt_row);
  };
  at::Tensor loss_rows = for_each_weighted_row(student, teacher, row_weight, gs, gt, counted_row);
  return {reduce ? loss_rows.sum() : loss_rows, gs, gt};
}

}  // namespace fastkd
