// Device helpers shared by the fastkd CUDA kernels: dtype conversion and
// block-wide reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launch.h"

namespace fastkd {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_float<double>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float shfl_xor(float v, int offset) { return __shfl_xor_sync(0xffffffffu, v, offset); }
__device__ __forceinline__ double shfl_xor(double v, int offset) { return __shfl_xor_sync(0xffffffffu, v, offset); }

// Reduce a value of any type across the block with a commutative `merge`;
// every thread gets the result. `scratch` holds one value per warp.
template <typename V, typename Merge>
__device__ V block_reduce(V v, V identity, Merge merge, V* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) v = merge(v, shfl_xor(v, offset));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : identity;
  for (int offset = 16; offset > 0; offset >>= 1) v = merge(v, shfl_xor(v, offset));
  __syncthreads();  // scratch may be reused right after
  return v;
}

// Sum of x[0..n) in float64, the same bits on every run: each thread adds a fixed
// strided subset in order, then the fixed shuffle tree of block_reduce. Every
// thread gets the result. `scratch` holds one double per warp.
__device__ __forceinline__ double block_sum_fixed(const float* x, int64_t n, double* scratch) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += x[i];
  return block_reduce(acc, 0.0, [](double u, double v) { return u + v; }, scratch);
}

// Call `body(S, T)` with the C++ types behind two dtype tags.
#define FASTKD_DISPATCH_ONE(TAG, NAME, ...)                          \
  switch (TAG) {                                                     \
    case DType::Float32: { using NAME = float; __VA_ARGS__ } break;  \
    case DType::Float16: { using NAME = __half; __VA_ARGS__ } break; \
    case DType::BFloat16: { using NAME = __nv_bfloat16; __VA_ARGS__ } break; \
    default: break; \
  }

}  // namespace fastkd
