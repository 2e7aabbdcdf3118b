// DKD on CUDA: one block per row. Each thread keeps online statistics of the
// non-target classes of its strided slice (kl_stats.cuh), the block merges them
// and combines them with the target logits (csrc/dkd_math.h: TCKD and NCKD from
// this one pass), then a second pass writes the gradients. Launched on the
// caller's stream.
#include "../dkd_math.h"
#include "common.cuh"
#include "kl_stats.cuh"

namespace fastkd {
namespace {

constexpr int kThreads = 512;  // as kd.cu

template <typename S, typename T>
__global__ void __launch_bounds__(kThreads)
    dkd_fwd_kernel(const S* __restrict__ student, const T* __restrict__ teacher, const int64_t* __restrict__ target,
                   const float* __restrict__ row_weight, int64_t cols, float alpha, float beta, float temp,
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
  const float inv_t = 1.0f / temp;

  KDStats st = kd_stats_empty();
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    if (c != g) kd_stats_push(st, to_float(s[c]) * inv_t, to_float(t[c]) * inv_t);
  }
  const DKDRow r = dkd_finish(kd_stats_block(st, scratch), to_float(s[g]) * inv_t, to_float(t[g]) * inv_t);
  const float coef = w * temp;
  if (threadIdx.x == 0) loss_rows[row] = coef * temp * dkd_objective(r, alpha, beta);
  if (!gs && !gt) return;

  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float a = to_float(s[c]) * inv_t, b = to_float(t[c]) * inv_t;
    const float q_s = __expf(a - r.norm_s), q_t = __expf(b - r.norm_t);
    if (gs) {
      const float d = c == g ? dkd_student_target(r, alpha) : dkd_student_other(r, alpha, beta, q_s, q_t);
      gs[c] = from_float<S>(coef * d);
    }
    if (gt) {
      const float d = c == g ? dkd_teacher_target(r, alpha) : dkd_teacher_other(r, alpha, beta, q_t, a, b);
      gt[c] = from_float<T>(coef * d);
    }
  }
}

}  // namespace

cudaError_t dkd_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher, const int64_t* target,
                         const float* row_weight, int64_t rows, int64_t cols, float alpha, float beta,
                         float temperature, float* loss_rows, void* grad_student, void* grad_teacher,
                         cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  FASTKD_DISPATCH_ONE(s_dtype, S, FASTKD_DISPATCH_ONE(t_dtype, T, {
    dkd_fwd_kernel<S, T><<<rows, kThreads, 0, stream>>>(
        static_cast<const S*>(student), static_cast<const T*>(teacher), target, row_weight, cols, alpha, beta,
        temperature, loss_rows, static_cast<S*>(grad_student), static_cast<T*>(grad_teacher));
  }))
  return cudaGetLastError();
}

}  // namespace fastkd
