// Torch-facing side of the CUDA DIST op: checks, workspace, stream, launch (kernels in dist.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_common.h"
#include "launch.h"

namespace fastkd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dist_fwd_cuda_op(const at::Tensor& student, const at::Tensor& teacher,
                                                                double beta, double gamma, double temperature,
                                                                bool grad_student, bool grad_teacher) {
  check_rows_cuda(student, "student");
  check_rows_cuda(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "fastkd: student and teacher shapes differ");
  const int64_t N = student.size(0), C = student.size(1);
  c10::cuda::CUDAGuard guard(student.device());

  at::Tensor loss = at::zeros({}, student.options().dtype(at::kFloat));
  at::Tensor gs = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor gt = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (N == 0 || C == 0) {  // no rows: loss 0, zero gradients (the reference's convention)
    gs.zero_();
    gt.zero_();
    return {loss, gs, gt};
  }
  // The caching allocator hands these out on the current stream, where the kernels run.
  at::Tensor work_f32 = at::empty({3 * N + 6 * C}, student.options().dtype(at::kFloat));
  at::Tensor work_f64 = at::empty({dist_row_slices(N, C) * 5 * C}, student.options().dtype(at::kDouble));
  cudaError_t err = dist_fwd_cuda(
      dtype_tag(student), student.const_data_ptr(), dtype_tag(teacher), teacher.const_data_ptr(), N, C,
      static_cast<float>(beta), static_cast<float>(gamma), static_cast<float>(temperature),
      work_f32.mutable_data_ptr<float>(), work_f64.mutable_data_ptr<double>(), loss.mutable_data_ptr<float>(),
      grad_student ? gs.mutable_data_ptr() : nullptr, grad_teacher ? gt.mutable_data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream(student.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "fastkd: dist_fwd CUDA launch failed: ", cudaGetErrorString(err));
  return {loss, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("dist_fwd", &dist_fwd_cuda_op); }

}  // namespace fastkd
