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

// divergence_fwd (docs/design.md, "The language-model divergences"): a dense teacher
// [rows, cols] (topk_mode 0, topk_ids null, k 0) or top-k teacher log-probs [rows, k] with
// their ids [rows, k] (topk_mode 1 tail, 2 renormalise). target: [rows] or null (then hard
// is 0). Writes loss_rows, soft_rows, hard_rows [rows] (weighted, before any sum) and the
// gradients whose pointers are non-null (student [rows, cols]; teacher the teacher's shape).
// A counted row with an out-of-range target or id gets NaN in all of them.
// teacher_temperature: > 0 scales the dense teacher's logits by its own 1/T_t (the teacher gradient's chain
// factor 1/T_t); 0 (the default, also a zero-initialised struct) means the temperature. Top-k teachers
// (log-probs as given) take 0 or the temperature only (the op checks it).
struct DivergenceArgs {
  DType s_dtype, t_dtype;
  const void* student;
  const void* teacher;
  const int64_t* topk_ids;
  const int64_t* target;
  const float* row_weight;
  int64_t rows, cols, k;
  float temperature, a, b, w_p, w_q, soft_scale, ce_weight;
  float teacher_temperature;
  int kind, topk_mode;
  float* loss_rows;
  float* soft_rows;
  float* hard_rows;
  void* grad_student;
  void* grad_teacher;
};
cudaError_t divergence_fwd_cuda(const DivergenceArgs& args, cudaStream_t stream);

// Dynamic shared memory of one block of the top-k tail mode (a bit per column of each row it holds).
int64_t divergence_tail_shared_bytes(int64_t rows, int64_t cols);

}  // namespace fastkd
