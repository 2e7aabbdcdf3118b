// MGD's two element-wise kernels on CUDA (mask definition in csrc/mgd_math.h),
// launched on the caller's stream:
//   mgd_mask_kernel: out = x * M, M regenerated from the seed per element; the mask
//     index comes from the element index by divisions by H*W and C fixed per launch
//     (fast_div.h) when the tensor has fewer than 2^32 elements, by 64-bit division beyond;
//   mgd_sq_err_kernel: per fixed tile of kTile elements, the sum of (pred - teacher)^2
//     (written to the tile's slot) and the gradients 2 scale (pred - teacher), -that;
//   mgd_sum_kernel: one block adds the tile sums in a fixed order (no atomics).
#include "../mgd_math.h"
#include "common.cuh"
#include "fast_div.h"

namespace fastkd {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTile = kThreads * 16;  // elements per tile of the squared error

// Index into the mask of element e (mgd_mask_index, csrc/mgd_math.h) with e = p * hw + k,
// p = n * C + channel: the channel mask is indexed by the plane p, the spatial one by
// n * hw + k. Two multiply-shift divisions instead of two 64-bit divides.
__device__ __forceinline__ uint32_t mask_index_small(uint32_t e, const FastDiv32& by_hw, const FastDiv32& by_c,
                                                     bool spatial) {
  const uint32_t p = fast_div(e, by_hw);
  if (!spatial) return p;
  const uint32_t k = e - p * by_hw.d;
  return fast_div(p, by_c) * by_hw.d + k;
}

// kSmall: numel < 2^32, so every element and mask index fits 32 bits.
template <bool kSmall, typename X>
__global__ void __launch_bounds__(kThreads)
    mgd_mask_kernel(const X* __restrict__ x, X* __restrict__ out, int64_t numel, int64_t hw, int64_t chw,
                    FastDiv32 by_hw, FastDiv32 by_c, uint32_t key, uint32_t threshold, bool spatial) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride) {
    const uint64_t i = kSmall ? mask_index_small(static_cast<uint32_t>(e), by_hw, by_c, spatial)
                              : mgd_mask_index(e, hw, chw, spatial);
    const float keep = mgd_hash(key, i) >= threshold ? 1.0f : 0.0f;
    out[e] = from_float<X>(to_float(x[e]) * keep);  // x * 1 and x * 0 (NaN * 0 = NaN) as the reference's x * M
  }
}

template <typename P, typename T>
__global__ void __launch_bounds__(kThreads)
    mgd_sq_err_kernel(const P* __restrict__ pred, const T* __restrict__ teacher, int64_t numel, float two_scale,
                      float* __restrict__ tile_sums, P* __restrict__ grad_pred, T* __restrict__ grad_teacher) {
  __shared__ float scratch[32];
  const int64_t start = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t end = min(numel, start + kTile);
  float acc = 0.0f;
  for (int64_t e = start + threadIdx.x; e < end; e += blockDim.x) {
    const float d = to_float(pred[e]) - to_float(teacher[e]);
    acc += d * d;
    if (grad_pred) grad_pred[e] = from_float<P>(two_scale * d);
    if (grad_teacher) grad_teacher[e] = from_float<T>(-two_scale * d);
  }
  acc = block_reduce(acc, 0.0f, [](float u, float v) { return u + v; }, scratch);
  if (threadIdx.x == 0) tile_sums[blockIdx.x] = acc;
}

constexpr int kSumThreads = 1024;

__global__ void __launch_bounds__(kSumThreads)
    mgd_sum_kernel(const float* __restrict__ tile_sums, int64_t tiles, double scale, float* __restrict__ loss) {
  __shared__ double scratch[32];
  const double sum = block_sum_fixed(tile_sums, tiles, scratch);
  if (threadIdx.x == 0) loss[0] = static_cast<float>(scale * sum);
}

}  // namespace

cudaError_t mgd_mask_cuda(DType dtype, const void* x, void* out, int64_t n, int64_t c, int64_t hw, uint32_t key,
                          uint32_t threshold, bool spatial, cudaStream_t stream) {
  const int64_t numel = n * c * hw;
  if (numel == 0) return cudaSuccess;
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);  // grid-stride beyond that
  const bool small = numel <= static_cast<int64_t>(UINT32_MAX);
  // Unused (any divisor >= 1 will do) on the 64-bit path.
  const FastDiv32 by_hw = fast_div32(small ? static_cast<uint32_t>(hw) : 1u);
  const FastDiv32 by_c = fast_div32(small ? static_cast<uint32_t>(c) : 1u);
  FASTKD_DISPATCH_ONE(dtype, X, {
    if (small) {
      mgd_mask_kernel<true, X><<<grid, kThreads, 0, stream>>>(static_cast<const X*>(x), static_cast<X*>(out), numel,
                                                              hw, c * hw, by_hw, by_c, key, threshold, spatial);
    } else {
      mgd_mask_kernel<false, X><<<grid, kThreads, 0, stream>>>(static_cast<const X*>(x), static_cast<X*>(out), numel,
                                                               hw, c * hw, by_hw, by_c, key, threshold, spatial);
    }
  })
  return cudaGetLastError();
}

int64_t mgd_sq_err_tiles(int64_t numel) { return (numel + kTile - 1) / kTile; }

cudaError_t mgd_sq_err_cuda(DType p_dtype, const void* pred, DType t_dtype, const void* teacher, int64_t numel,
                            double scale, float* work, float* loss, void* grad_pred, void* grad_teacher,
                            cudaStream_t stream) {
  const int64_t tiles = mgd_sq_err_tiles(numel);
  FASTKD_DISPATCH_ONE(p_dtype, P, FASTKD_DISPATCH_ONE(t_dtype, T, {
    if (tiles > 0) {
      mgd_sq_err_kernel<P, T><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
          static_cast<const P*>(pred), static_cast<const T*>(teacher), numel, static_cast<float>(2.0 * scale), work,
          static_cast<P*>(grad_pred), static_cast<T*>(grad_teacher));
    }
    mgd_sum_kernel<<<1, kSumThreads, 0, stream>>>(work, tiles, scale, loss);
  }))
  return cudaGetLastError();
}

}  // namespace fastkd
