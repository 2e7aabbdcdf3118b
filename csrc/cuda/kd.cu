// KD on CUDA: one block per row; each thread keeps online statistics over a
// strided slice of the row (kd_raw_push in csrc/kd_math.h: maxima in raw-logit
// units, one exp per element per net in the common case), the block merges them,
// then a second pass over the row writes the gradients. Launched on the caller's stream.
#include "../kd_math.h"
#include "common.cuh"

namespace fastkd {

struct Sum2 {
  float x, y;
};
// Found by argument-dependent lookup from block_reduce.
__device__ __forceinline__ Sum2 shfl_xor(const Sum2& v, int offset) {
  return {shfl_xor(v.x, offset), shfl_xor(v.y, offset)};
}
__device__ __forceinline__ KDRawStats shfl_xor(const KDRawStats& v, int offset) {
  return {shfl_xor(v.ms, offset), shfl_xor(v.zs, offset), shfl_xor(v.mt, offset), shfl_xor(v.zt, offset),
          shfl_xor(v.cross, offset)};
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
  __shared__ KDRawStats stats_scratch[32];
  __shared__ Sum2 sum_scratch[32];
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

  KDRawStats st = kd_raw_empty();
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) kd_raw_push(st, to_float(s[c]), to_float(t[c]), inv_t);
  st = block_reduce(st, kd_raw_empty(),
                    [inv_t](const KDRawStats& x, const KDRawStats& y) { return kd_raw_merge(x, y, inv_t); },
                    stats_scratch);
  const KDRow r = kd_raw_finish(st);
  if (threadIdx.x == 0) loss_rows[row] = w * temp * temp * r.kl;
  if (!gs && !gt && !grad_temperature) return;

  const float coef = w * temp;
  Sum2 acc = {0.0f, 0.0f};
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float a = (to_float(s[c]) - st.ms) * inv_t, b = (to_float(t[c]) - st.mt) * inv_t;  // shifted in raw units
    const float ps = __expf(a - r.lse_s), pt = __expf(b - r.lse_t);
    if (gs) gs[c] = from_float<S>(coef * (ps - pt));
    if (gt) gt[c] = from_float<T>(coef * kd_teacher_term(r, pt, a, b));
    if (grad_temperature) kd_dtemp_terms(r, ps, pt, a, b, acc.x, acc.y);
  }
  if (grad_temperature) {
    acc = block_reduce(acc, Sum2{0.0f, 0.0f}, [](const Sum2& x, const Sum2& y) { return Sum2{x.x + y.x, x.y + y.y}; },
                       sum_scratch);
    if (threadIdx.x == 0) grad_temperature[row] = w * kd_dtemp(temp, r.kl, acc.x, acc.y);
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
