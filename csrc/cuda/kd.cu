// KD on CUDA: a warp or a block per row (rows.cuh). Each thread keeps online
// statistics over its columns of the row (kd_raw_push in csrc/kd_math.h: maxima
// in raw-logit units, one exp per element per net in the common case), the team
// merges them, then a second sweep writes the gradients and the sums of dL/dT.
// Launched on the caller's stream.
#include "../kd_math.h"
#include "common.cuh"
#include "rows.cuh"

namespace fastkd {

struct Sum2 {
  float x, y;
};
// Found by argument-dependent lookup from RowTeam::reduce.
__device__ __forceinline__ Sum2 shfl_xor(const Sum2& v, int offset) {
  return {shfl_xor(v.x, offset), shfl_xor(v.y, offset)};
}
__device__ __forceinline__ KDRawStats shfl_xor(const KDRawStats& v, int offset) {
  return {shfl_xor(v.ms, offset), shfl_xor(v.zs, offset), shfl_xor(v.mt, offset), shfl_xor(v.zt, offset),
          shfl_xor(v.cross, offset)};
}

namespace {

template <bool kWarp, typename S, typename T>
__global__ void __launch_bounds__(kRowBlockBound<kWarp>, kRowMinBlocks<kWarp>)
    kd_fwd_kernel(const S* __restrict__ student, const T* __restrict__ teacher, const float* __restrict__ temperature,
                  const float* __restrict__ row_weight, int64_t rows, int64_t cols, bool packs,
                  float* __restrict__ loss_rows, S* __restrict__ grad_student, T* __restrict__ grad_teacher,
                  float* __restrict__ grad_temperature) {
  constexpr int W = kPackWidth<S, T>;
  __shared__ KDRawStats stats_scratch[32];
  __shared__ Sum2 sum_scratch[32];
  const RowTeam<kWarp> team;
  const bool live = team.row < rows;
  const float w = live ? row_weight[team.row] : 0.0f;
  const bool counted = w != 0.0f;  // ignored rows (and rows past the end) read nothing
  const int64_t offset = team.row * cols;  // 64-bit: rows * cols may pass 2^31
  const RowPtrs<S, T> row = row_ptrs(offset, student, teacher, grad_student, grad_teacher);
  const RowSplit<W> sp = split_row<W>(offset, counted ? cols : 0, packs, team.lane, team.lanes);
  const float temp = counted ? temperature[team.row] : 1.0f, inv_t = 1.0f / temp;

  KDRawStats st = kd_raw_empty();
  sweep_row(sp, row.s, row.t, [&](int64_t, float x, float y) { kd_raw_push(st, x, y, inv_t); });
  st = team.reduce(st, kd_raw_empty(),
                   [inv_t](const KDRawStats& x, const KDRawStats& y) { return kd_raw_merge(x, y, inv_t); },
                   stats_scratch);
  const KDRow r = kd_raw_finish(st);
  if (live && team.lane == 0) {
    loss_rows[team.row] = counted ? w * temp * temp * r.kl : 0.0f;
    if (grad_temperature && !counted) grad_temperature[team.row] = 0.0f;
  }
  if (!counted) {
    fill_row_grads(split_row<W>(offset, live ? cols : 0, packs, team.lane, team.lanes), row.gs, row.gt, 0.0f);
  }
  if (!row.gs && !row.gt && !grad_temperature) return;  // the same for every thread of the launch

  // An ignored row sweeps nothing here but still joins the reduction below (rows.cuh).
  const float coef = w * temp;
  Sum2 acc = {0.0f, 0.0f};
  sweep_row_grads(sp, row.s, row.t, row.gs, row.gt, [&](int64_t, float x, float y) {
    const float a = (x - st.ms) * inv_t, b = (y - st.mt) * inv_t;  // shifted in raw units
    const float ps = __expf(a - r.lse_s), pt = __expf(b - r.lse_t);
    if (grad_temperature) kd_dtemp_terms(r, ps, pt, a, b, acc.x, acc.y);
    return GradPair{row.gs ? coef * (ps - pt) : 0.0f, row.gt ? coef * kd_teacher_term(r, pt, a, b) : 0.0f};
  });
  if (!grad_temperature) return;
  acc = team.reduce(acc, Sum2{0.0f, 0.0f}, [](const Sum2& x, const Sum2& y) { return Sum2{x.x + y.x, x.y + y.y}; },
                    sum_scratch);
  if (counted && team.lane == 0) grad_temperature[team.row] = w * kd_dtemp(temp, r.kl, acc.x, acc.y);
}

}  // namespace

cudaError_t kd_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher,
                        const float* temperature, const float* row_weight, int64_t rows, int64_t cols,
                        float* loss_rows, void* grad_student, void* grad_teacher, float* grad_temperature,
                        cudaStream_t stream) {
  return launch_rows(s_dtype, student, t_dtype, teacher, grad_student, grad_teacher, rows, cols,
                     [&](auto warp, auto s, auto t, auto gs, auto gt, bool packs, const RowPlan& plan) {
                       kd_fwd_kernel<decltype(warp)::value><<<plan.blocks, plan.threads, 0, stream>>>(
                           s, t, temperature, row_weight, rows, cols, packs, loss_rows, gs, gt, grad_temperature);
                     });
}

}  // namespace fastkd
