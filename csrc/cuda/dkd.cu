// DKD on CUDA: a warp or a block per row (rows.cuh). Each thread keeps online
// statistics of the non-target classes among its columns (kl_stats.cuh), the
// team merges them and combines them with the target logits (csrc/dkd_math.h:
// TCKD and NCKD from this one pass), then a second sweep writes the gradients.
// Launched on the caller's stream.
#include "../dkd_math.h"
#include "common.cuh"
#include "kl_stats.cuh"
#include "rows.cuh"

namespace fastkd {
namespace {

template <bool kWarp, typename S, typename T>
__global__ void __launch_bounds__(kRowBlockBound<kWarp>, kRowMinBlocks<kWarp>)
    dkd_fwd_kernel(const S* __restrict__ student, const T* __restrict__ teacher, const int64_t* __restrict__ target,
                   const float* __restrict__ row_weight, int64_t rows, int64_t cols, bool packs, float alpha,
                   float beta, float temp, float* __restrict__ loss_rows, S* __restrict__ grad_student,
                   T* __restrict__ grad_teacher) {
  constexpr int W = kPackWidth<S, T>;
  __shared__ KDStats scratch[32];
  const RowTeam<kWarp> team;
  const auto row = target_row_view<W>(team, student, teacher, target, row_weight, rows, cols, packs, grad_student,
                                      grad_teacher);
  const float inv_t = 1.0f / temp;

  KDStats st = kd_stats_empty();
  sweep_row(row.work, row.s, row.t, [&](int64_t c, float x, float y) {
    if (c != row.g) kd_stats_push(st, x * inv_t, y * inv_t);
  });
  st = kd_stats_team(team, st, scratch);
  if (!row.counted) {
    if (team.row < rows && team.lane == 0) loss_rows[team.row] = row.fill;
    fill_row_grads(row.all, row.gs, row.gt, row.fill);
    return;  // no reduction follows
  }
  const DKDRow r = dkd_finish(st, to_float(row.s[row.g]) * inv_t, to_float(row.t[row.g]) * inv_t);
  const float coef = row.w * temp;
  if (team.lane == 0) loss_rows[team.row] = coef * temp * dkd_objective(r, alpha, beta);
  if (!row.gs && !row.gt) return;
  sweep_row_grads(row.work, row.s, row.t, row.gs, row.gt, [&](int64_t c, float x, float y) {
    const float a = x * inv_t, b = y * inv_t;
    const float q_s = __expf(a - r.norm_s), q_t = __expf(b - r.norm_t);
    GradPair g = {0.0f, 0.0f};
    if (row.gs) {
      g.gs = coef * (c == row.g ? dkd_student_target(r, alpha) : dkd_student_other(r, alpha, beta, q_s, q_t));
    }
    if (row.gt) {
      g.gt = coef * (c == row.g ? dkd_teacher_target(r, alpha) : dkd_teacher_other(r, alpha, beta, q_t, a, b));
    }
    return g;
  });
}

}  // namespace

cudaError_t dkd_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher, const int64_t* target,
                         const float* row_weight, int64_t rows, int64_t cols, float alpha, float beta,
                         float temperature, float* loss_rows, void* grad_student, void* grad_teacher,
                         cudaStream_t stream) {
  return launch_rows(s_dtype, student, t_dtype, teacher, grad_student, grad_teacher, rows, cols,
                     [&](auto warp, auto s, auto t, auto gs, auto gt, bool packs, const RowPlan& plan) {
                       dkd_fwd_kernel<decltype(warp)::value><<<plan.blocks, plan.threads, 0, stream>>>(
                           s, t, target, row_weight, rows, cols, packs, alpha, beta, temperature, loss_rows, gs, gt);
                     });
}

}  // namespace fastkd
