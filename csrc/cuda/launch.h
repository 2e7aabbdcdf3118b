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

// ATS / DKD: like kd_fwd_cuda, with one target per row (read only where row_weight != 0;
// an out-of-range target of a counted row gives a NaN loss and NaN gradients).
cudaError_t ats_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher, const int64_t* target,
                         const float* row_weight, int64_t rows, int64_t cols, float student_temperature,
                         float target_temperature, float other_temperature, float* loss_rows, void* grad_student,
                         void* grad_teacher, cudaStream_t stream);

cudaError_t dkd_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher, const int64_t* target,
                         const float* row_weight, int64_t rows, int64_t cols, float alpha, float beta,
                         float temperature, float* loss_rows, void* grad_student, void* grad_teacher,
                         cudaStream_t stream);

// DIST workspace, allocated by the caller: float32 [3 * rows + 6 * cols] and
// float64 [dist_row_slices(rows, cols) * 5 * cols].
int64_t dist_row_slices(int64_t rows, int64_t cols);

// Writes the 0-d loss and the gradients whose pointers are non-null (rows >= 1, cols >= 1).
cudaError_t dist_fwd_cuda(DType s_dtype, const void* student, DType t_dtype, const void* teacher, int64_t rows,
                          int64_t cols, float beta, float gamma, float temperature, float* work_f32, double* work_f64,
                          float* loss, void* grad_student, void* grad_teacher, cudaStream_t stream);

// out = x * M for a contiguous NCHW x (key = mgd_seed_key(seed), threshold = mgd_threshold(ratio)).
cudaError_t mgd_mask_cuda(DType dtype, const void* x, void* out, int64_t n, int64_t c, int64_t hw, uint32_t key,
                          uint32_t threshold, bool spatial, cudaStream_t stream);

// Partial sums of (pred - teacher)^2 over fixed tiles, then loss = scale * their sum in
// order; workspace: float32 [mgd_sq_err_tiles(numel)]. Writes the gradients whose pointers are non-null.
int64_t mgd_sq_err_tiles(int64_t numel);
cudaError_t mgd_sq_err_cuda(DType p_dtype, const void* pred, DType t_dtype, const void* teacher, int64_t numel,
                            double scale, float* work, float* loss, void* grad_pred, void* grad_teacher,
                            cudaStream_t stream);

}  // namespace fastkd
