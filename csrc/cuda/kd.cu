// KD on CUDA: one block per row; each thread keeps online statistics over a
// strided slice of the row (kl_stats.cuh: one exp per element per net in the common case),
// the block merges them (csrc/kd_math.h), then a second pass over the row
// writes the gradients. Launched on the caller's stream.
#include "../kd_math.h"
#include "common.cuh"
#include "kl_stats.cuh"

namespace fastkd {

struct Sum3 {
  float x, y, z;
};
__device__ __forceinline__ Sum3 shfl_xor(const Sum3& v, int offset) {
  return {shfl_xor(v.x, offset), shfl_xor(v.y, offset), shfl_xor(v.z, offset)};
}

namespace {

constexpr int kThreads = 512;  // 16 warps: enough loads in flight per row for wide vocabularies

template <typename S, typename T>
__global__ void __launch_bounds__(kThreads) kd_fwd_kernel(const S* __restrict__ student, const T* __restrict__ teacher,
                                                          const float* __restrict__ temperature,
                                                          const float* __restrict__ row_weight, int64_t cols,
                                                          float* __restrict__ loss_rows, S* __restrict__ grad_student,
                                                          T* __restrict__ grad_teacher,
                                                          float* __restrict__ grad_temperature) {
  __shared__ KDStats stats_scratch[32];
  __shared__ Sum3 sum_scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t offset = row * cols;  // 64-bit: rows * cols may pass 2^31
  const S* s = student + offset;
  const T* t = teacher + offset;
  S* gs = grad_student ? grad_student + offset : nullptr;
  T* gt = grad_teacher ? grad_teacher + offset : nullptr;
  const float w = row_weight[row];
  if (w == 0.0f) {  // ignored row: contributes nothing
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      if (gs) gs[c] = from_float<S>(0.0f);
      if (gt) gt[c] = from_float<T>(0.0f);
    }
    return;
  }
  const float temp = temperature[row], inv_t = 1.0f / temp;

  KDStats st = kd_stats_empty();
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    kd_stats_push(st, to_float(s[c]) * inv_t, to_float(t[c]) * inv_t);
  }
  st = kd_stats_block(st, stats_scratch);
  const KDRow r = kd_finish(st);
  if (threadIdx.x == 0) loss_rows[row] = w * temp * temp * r.kl;
  if (!gs && !gt && !grad_temperature) return;

  const float coef = w * temp;
  Sum3 acc = {0.0f, 0.0f, 0.0f};
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float a = to_float(s[c]) * inv_t, b = to_float(t[c]) * inv_t;
    const float ps = __expf(a - r.lse_s), pt = __expf(b - r.lse_t);
    if (gs) gs[c] = from_float<S>(coef * (ps - pt));
    if (gt) gt[c] = from_float<T>(coef * kd_teacher_term(r, pt, a, b));
    if (grad_temperature) kd_dtemp_terms(r, ps, pt, a, b, acc.x, acc.y, acc.z);
  }
  if (grad_temperature) {
    acc = block_reduce(acc, Sum3{0.0f, 0.0f, 0.0f},
                       [](const Sum3& x, const Sum3& y) { return Sum3{x.x + y.x, x.y + y.y, x.z + y.z}; },
                       sum_scratch);
    if (threadIdx.x == 0) grad_temperature[row] = w * kd_dtemp(temp, r.kl, acc.x, acc.y, acc.z);
  }
}

}  // namespace

cudaError_t kd_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher,
                        const float* temperature, const float* row_weight, int64_t rows, int64_t cols,
                        float* loss_rows, void* grad_student, void* grad_teacher, float* grad_temperature,
                        cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  FASTKD_DISPATCH_ONE(s_dtype, S, FASTKD_DISPATCH_ONE(t_dtype, T, {
    kd_fwd_kernel<S, T><<<rows, kThreads, 0, stream>>>(
        static_cast<const S*>(student), static_cast<const T*>(teacher), temperature, row_weight, cols, loss_rows,
        static_cast<S*>(grad_student), static_cast<T*>(grad_teacher), grad_temperature);
  }))
  return cudaGetLastError();
}

}  // namespace fastkd
