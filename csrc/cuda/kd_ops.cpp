// Torch-facing side of the CUDA KD op: checks, then the shared row-loss call (cuda_common.h).
#include <torch/library.h>

#include "cuda_common.h"

namespace fastkd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_fwd_cuda_op(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& temperature,
    const at::Tensor& row_weight, bool reduce, bool grad_student, bool grad_teacher, bool grad_temperature) {
  check_logit_pair_cuda(student, teacher);
  const int64_t N = student.size(0), C = student.size(1);
  check_vector_cuda(temperature, N, "temperature", student);
  check_vector_cuda(row_weight, N, "row_weight", student);
  const CudaCall call("kd_fwd", student);
  // zeros: also the right value when C == 0 and the kernel does not run
  at::Tensor gT = grad_temperature ? at::zeros({N}, temperature.options()) : at::empty({0}, temperature.options());
  auto [loss, gs, gt] = row_loss_call(call, student, teacher, reduce, grad_student, grad_teacher,
                                      [&](float* loss_rows, void* gs_ptr, void* gt_ptr) {
                                        return kd_fwd_cuda(dtype_tag(student), student.const_data_ptr(),
                                                           dtype_tag(teacher), teacher.const_data_ptr(),
                                                           temperature.const_data_ptr<float>(),
                                                           row_weight.const_data_ptr<float>(), N, C, loss_rows,
                                                           gs_ptr, gt_ptr,
                                                           grad_temperature ? gT.mutable_data_ptr<float>() : nullptr,
                                                           call.stream());
                                      });
  return {loss, gs, gt, gT};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("kd_fwd", &kd_fwd_cuda_op); }

}  // namespace fastkd
