// Torch-facing side of the CUDA DIST op: checks, workspace, launch (kernels in dist.cu).
#include <torch/library.h>

#include "cuda_common.h"

namespace fastkd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_fwd_cuda_op(const at::Tensor& student, const at::Tensor& teacher,
                                                                double beta, double gamma, double temperature,
                                                                bool grad_student, bool grad_teacher) {
  check_logit_pair_cuda(student, teacher);
  const int64_t N = student.size(0), C = student.size(1);
  const CudaCall call("dist_fwd", student);
  at::Tensor loss = at::zeros({}, student.options().dtype(at::kFloat));
  at::Tensor gs = grad_output(student, grad_student);
  at::Tensor gt = grad_output(teacher, grad_teacher);
  if (N == 0 || C == 0) return {loss, gs, gt};  // no rows or classes: loss 0, empty gradients (the reference's)
  // The caching allocator hands these out on the current stream, where the kernels run.
  at::Tensor work_f32 = at::empty({3 * N + 6 * C}, student.options().dtype(at::kFloat));
  at::Tensor work_f64 = at::empty({dist_row_slices(N, C) * 5 * C}, student.options().dtype(at::kDouble));
  call.check(dist_fwd_cuda(dtype_tag(student), student.const_data_ptr(), dtype_tag(teacher), teacher.const_data_ptr(),
                           N, C, static_cast<float>(beta), static_cast<float>(gamma), static_cast<float>(temperature),
                           work_f32.mutable_data_ptr<float>(), work_f64.mutable_data_ptr<double>(),
                           loss.mutable_data_ptr<float>(), grad_ptr(gs, grad_student), grad_ptr(gt, grad_teacher),
                           call.stream()));
  return {loss, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("dist_fwd", &dist_fwd_cuda_op); }

}  // namespace fastkd
