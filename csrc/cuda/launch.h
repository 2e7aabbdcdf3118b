// Plain C++ interface between the torch-facing CUDA op files (*_ops.cpp) and
// the kernels (*.cu), so that the .cu files never include torch's headers
// (they dominate compile time) and the kernels see raw pointers only.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

namespace fastkd {

// float64 never reaches the fused kernels (the Python layer routes it to the reference).
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Writes per-row weighted losses (zero-initialised by the caller), and the
// gradients whose pointers are non-null. Launches on `stream`.
cudaError_t kd_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher,
                        const float* temperature, const float* row_weight, int64_t rows, int64_t cols,
                        float* loss_rows, void* grad_student, void* grad_teacher, float* grad_temperature,
                        cudaStream_t stream);

}  // namespace fastkd
