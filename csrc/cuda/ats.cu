// ATS on CUDA: one block per row, like kd.cu: each thread keeps online
// statistics over a strided slice of the row (kl_stats.cuh), the block merges
// them, then a second pass writes the gradients (math in csrc/ats_math.h). The
// teacher scale is 1/target_temperature at the target column, 1/other_temperature
// elsewhere. Launched on the caller's stream.
#include "../ats_math.h"
#include "common.cuh"
#include "kl_stats.cuh"

namespace fastkd {
namespace {

constexpr int kThreads = 512;  // as kd.cu: enough loads in flight per row for wide vocabularies

template <typename S, typename T>
__global__ void __launch_bounds__(kThreads)
    ats_fwd_kernel(const S* __restrict__ student, const T* __restrict__ teacher, const int64_t* __restrict__ target,
                   const float* __restrict__ row_weight, int64_t cols, float student_temp, float inv_tt, float inv_to,
                   float* __restrict__ loss_rows, S* __restrict__ grad_student, T* __restrict__ grad_teacher) {
  __shared__ KDStats scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t offset = row * cols;  // 64-bit: rows * cols may pass 2^31
  const S* s = student + offset;
  const T* t = teacher + offset;
  S* gs = grad_student ? grad_student + offset : nullptr;
  T* gt = grad_teacher ? grad_teacher + offset : nullptr;
  const float w = row_weight[row];
  const int64_t g = w == 0.0f ? -1 : target[row];  // ignored rows: target never read
  if (g < 0 || g >= cols) {  // ignored row: 0; a counted row with a bad target: NaN
    const float fill = w == 0.0f ? 0.0f : NAN;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      if (gs) gs[c] = from_float<S>(fill);
      if (gt) gt[c] = from_float<T>(fill);
    }
    if (threadIdx.x == 0) loss_rows[row] = fill;
    return;
  }
  const float inv_s = 1.0f / student_temp;

  KDStats st = kd_stats_empty();
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    kd_stats_push(st, to_float(s[c]) * inv_s, to_float(t[c]) * (c == g ? inv_tt : inv_to));
  }
  const KDRow r = kd_finish(kd_stats_block(st, scratch));
  const float coef_s = w * student_temp, coef_t = coef_s * student_temp;
  if (threadIdx.x == 0) loss_rows[row] = coef_t * r.kl;
  if (!gs && !gt) return;

  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float inv_b = c == g ? inv_tt : inv_to;
    const float a = to_float(s[c]) * inv_s, b = to_float(t[c]) * inv_b;
    const float pt = __expf(b - r.lse_t);
    if (gs) gs[c] = from_float<S>(coef_s * (__expf(a - r.lse_s) - pt));
    if (gt) gt[c] = from_float<T>(coef_t * inv_b * kd_teacher_term(r, pt, a, b));
  }
}

}  // namespace

cudaError_t ats_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher, const int64_t* target,
                         const float* row_weight, int64_t rows, int64_t cols, float student_temperature,
                         float target_temperature, float other_temperature, float* loss_rows, void* grad_student,
                         void* grad_teacher, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const float inv_tt = 1.0f / target_temperature, inv_to = 1.0f / other_temperature;
  FASTKD_DISPATCH_ONE(s_dtype, S, FASTKD_DISPATCH_ONE(t_dtype, T, {
    ats_fwd_kernel<S, T><<<rows, kThreads, 0, stream>>>(
        static_cast<const S*>(student), static_cast<const T*>(teacher), target, row_weight, cols,
        student_temperature, inv_tt, inv_to, loss_rows, static_cast<S*>(grad_student), static_cast<T*>(grad_teacher));
  }))
  return cudaGetLastError();
}

}  // namespace fastkd
