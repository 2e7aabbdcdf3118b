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
  const TargetRow tr = target_row(row_weight, target, team.row, rows, cols);
  const int64_t offset = team.row * cols;  // 64-bit: rows * cols may pass 2^31
  const S* s = student + offset;
  const T* t = teacher + offset;
  S* gs = grad_student ? grad_student + offset : nullptr;
  T* gt = grad_teacher ? grad_teacher + offset : nullptr;
  const RowSplit<W> all = split_row<W>(offset, team.row < rows ? cols : 0, packs, team.lane, team.lanes);
  const RowSplit<W> counted = split_row<W>(offset, tr.counted ? cols : 0, packs, team.lane, team.lanes);
  const float inv_s = 1.0f / student_temp;

  KDStats st = kd_stats_empty();
  sweep_row(counted, s, t, [&](int64_t c, float x, float y) {
    kd_stats_push(st, x * inv_s, y * (c == tr.g ? inv_tt : inv_to));
  });
  const KDRow r = kd_finish(kd_stats_team(team, st, scratch));
  const float coef_s = tr.w * student_temp, coef_t = coef_s * student_temp;
  if (team.row < rows && team.lane == 0) loss_rows[team.row] = tr.counted ? coef_t * r.kl : tr.fill;
  if (!tr.counted) {
    fill_row_grads(all, gs, gt, tr.fill);
    return;  // no reduction follows
  }
  if (!gs && !gt) return;
  sweep_row_grads(counted, s, t, gs, gt, [&](int64_t c, float x, float y) {
    const float inv_b = c == tr.g ? inv_tt : inv_to;
    const float a = x * inv_s, b = y * inv_b;
    const float pt = __expf(b - r.lse_t);
    return GradPair{gs ? coef_s * (__expf(a - r.lse_s) - pt) : 0.0f,
                    gt ? coef_t * inv_b * kd_teacher_term(r, pt, a, b) : 0.0f};
  });
}

}  // namespace

cudaError_t ats_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher, const int64_t* target,
                         const float* row_weight, int64_t rows, int64_t cols, float student_temperature,
                         float target_temperature, float other_temperature, float* loss_rows, void* grad_student,
                         void* grad_teacher, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const float inv_tt = 1.0f / target_temperature, inv_to = 1.0f / other_temperature;
  const RowPlan plan = plan_rows(rows, cols);
  FASTKD_DISPATCH_ONE(s_dtype, S, FASTKD_DISPATCH_ONE(t_dtype, T, {
    const bool packs = rows_vectorizable<S, T>(student, teacher, grad_student, grad_teacher);
    with_row_team(plan, [&](auto warp) {
      ats_fwd_kernel<decltype(warp)::value, S, T><<<plan.blocks, plan.threads, 0, stream>>>(
          static_cast<const S*>(student), static_cast<const T*>(teacher), target, row_weight, rows, cols, packs,
          student_temperature, inv_tt, inv_to, loss_rows, static_cast<S*>(grad_student),
          static_cast<T*>(grad_teacher));
    });
  }))
  return cudaGetLastError();
}

}  // namespace fastkd
