// ATS on CUDA: a warp or a block per row (rows.cuh). Each thread keeps online
// statistics over its columns of the row (kl_stats.cuh), the team merges them,
// then a second sweep writes the gradients (math in csrc/ats_math.h). The teacher
// scale is 1/target_temperature at the target column, 1/other_temperature
// elsewhere. Launched on the caller's stream.
#include "../ats_math.h"
#include "common.cuh"
#include "kl_stats.cuh"
#include "rows.cuh"

namespace fastkd {
namespace {

template <bool kWarp, typename S, typename T>
__global__ void __launch_bounds__(kRowBlockBound<kWarp>, kRowMinBlocks<kWarp>)
    ats_fwd_kernel(const S* __restrict__ student, const T* __restrict__ teacher, const int64_t* __restrict__ target,
                   const float* __restrict__ row_weight, int64_t rows, int64_t cols, bool packs, float student_temp,
                   float inv_tt, float inv_to, float* __restrict__ loss_rows, S* __restrict__ grad_student,
                   T* __restrict__ grad_teacher) {
  constexpr int W = kPackWidth<S, T>;
  __shared__ KDStats scratch[32];
  const RowTeam<kWarp> team;
  const auto row = target_row_view<W>(team, student, teacher, target, row_weight, rows, cols, packs, grad_student,
                                      grad_teacher);
  const float inv_s = 1.0f / student_temp;

  KDStats st = kd_stats_empty();
  sweep_row(row.work, row.s, row.t, [&](int64_t c, float x, float y) {
    kd_stats_push(st, x * inv_s, y * (c == row.g ? inv_tt : inv_to));
  });
  const KDRow r = kd_finish(kd_stats_team(team, st, scratch));
  const float coef_s = row.w * student_temp, coef_t = coef_s * student_temp;
  if (team.row < rows && team.lane == 0) loss_rows[team.row] = row.counted ? coef_t * r.kl : row.fill;
  if (!row.counted) {
    fill_row_grads(row.all, row.gs, row.gt, row.fill);
    return;  // no reduction follows
  }
  if (!row.gs && !row.gt) return;
  sweep_row_grads(row.work, row.s, row.t, row.gs, row.gt, [&](int64_t c, float x, float y) {
    const float inv_b = c == row.g ? inv_tt : inv_to;
    const float a = x * inv_s, b = y * inv_b;
    const float pt = __expf(b - r.lse_t);
    return GradPair{row.gs ? coef_s * (__expf(a - r.lse_s) - pt) : 0.0f,
                    row.gt ? coef_t * inv_b * kd_teacher_term(r, pt, a, b) : 0.0f};
  });
}

}  // namespace

cudaError_t ats_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher, const int64_t* target,
                         const float* row_weight, int64_t rows, int64_t cols, float student_temperature,
                         float target_temperature, float other_temperature, float* loss_rows, void* grad_student,
                         void* grad_teacher, cudaStream_t stream) {
  const float inv_tt = 1.0f / target_temperature, inv_to = 1.0f / other_temperature;
  return launch_rows(s_dtype, student, t_dtype, teacher, grad_student, grad_teacher, rows, cols,
                     [&](auto warp, auto s, auto t, auto gs, auto gt, bool packs, const RowPlan& plan) {
                       ats_fwd_kernel<decltype(warp)::value><<<plan.blocks, plan.threads, 0, stream>>>(
                           s, t, target, row_weight, rows, cols, packs, student_temperature, inv_tt, inv_to,
                           loss_rows, gs, gt);
                     });
}

}  // namespace fastkd
