// Torch-facing side of the CUDA ATS op: checks, allocation, stream, launch (kernel in ats.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_common.h"
#include "launch.h"

namespace fastkd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> ats_fwd_cuda_op(const at::Tensor& student, const at::Tensor& teacher,
                                                               const at::Tensor& target, const at::Tensor& row_weight,
                                                               double student_temperature, double target_temperature,
                                                               double other_temperature, bool reduce,
                                                               bool grad_student, bool grad_teacher) {
  check_rows_cuda(student, "student");
  check_rows_cuda(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "fastkd: student and teacher shapes differ");
  const int64_t N = student.size(0), C = student.size(1);
  TORCH_CHECK(target.device() == student.device() && target.dim() == 1 && target.size(0) == N &&
                  target.scalar_type() == at::kLong && target.is_contiguous(),
              "fastkd: target must be a contiguous int64 vector of ", N, " rows on ", student.device());
  check_vector_cuda(row_weight, N, "row_weight", student);
  c10::cuda::CUDAGuard guard(student.device());

  at::Tensor loss_rows = at::zeros({N}, student.options().dtype(at::kFloat));
  at::Tensor gs = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor gt = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  if (C == 0) {
    gs.zero_();
    gt.zero_();
  } else {
    cudaError_t err = ats_fwd_cuda(
        dtype_tag(student), student.const_data_ptr(), dtype_tag(teacher), teacher.const_data_ptr(),
        target.const_data_ptr<int64_t>(), row_weight.const_data_ptr<float>(), N, C,
        static_cast<float>(student_temperature), static_cast<float>(target_temperature),
        static_cast<float>(other_temperature), loss_rows.mutable_data_ptr<float>(),
        grad_student ? gs.mutable_data_ptr() : nullptr, grad_teacher ? gt.mutable_data_ptr() : nullptr,
        c10::cuda::getCurrentCUDAStream(student.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "fastkd: ats_fwd CUDA launch failed: ", cudaGetErrorString(err));
  }
  return {reduce ? loss_rows.sum() : loss_rows, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("ats_fwd", &ats_fwd_cuda_op); }

}  // namespace fastkd
