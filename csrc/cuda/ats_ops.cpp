// Torch-facing side of the CUDA ATS op: checks, then the shared row-loss call (cuda_common.h; kernel in ats.cu).
#include <torch/library.h>

#include "cuda_common.h"

namespace fastkd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> ats_fwd_cuda_op(const at::Tensor& student, const at::Tensor& teacher,
                                                               const at::Tensor& target, const at::Tensor& row_weight,
                                                               double student_temperature, double target_temperature,
                                                               double other_temperature, bool reduce,
                                                               bool grad_student, bool grad_teacher) {
  return target_row_loss_call(
      "ats_fwd", student, teacher, target, row_weight, reduce, grad_student, grad_teacher,
      [&](int64_t N, int64_t C, float* loss_rows, void* gs_ptr, void* gt_ptr, cudaStream_t stream) {
        return ats_fwd_cuda(dtype_tag(student), student.const_data_ptr(), dtype_tag(teacher), teacher.const_data_ptr(),
                            target.const_data_ptr<int64_t>(), row_weight.const_data_ptr<float>(), N, C,
                            static_cast<float>(student_temperature), static_cast<float>(target_temperature),
                            static_cast<float>(other_temperature), loss_rows, gs_ptr, gt_ptr, stream);
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("ats_fwd", &ats_fwd_cuda_op); }

}  // namespace fastkd
