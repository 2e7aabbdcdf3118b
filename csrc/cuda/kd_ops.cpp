// Torch-facing side of the CUDA KD op: checks, allocation, stream, launch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_common.h"
#include "launch.h"

namespace fastkd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_fwd_cuda_op(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& temperature,
    const at::Tensor& row_weight, bool reduce, bool grad_student, bool grad_teacher, bool grad_temperature) {
  check_rows_cuda(student, "student");
  check_rows_cuda(teacher, "teacher");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "fastkd: student and teacher shapes differ");
  const int64_t N = student.size(0), C = student.size(1);
  check_vector_cuda(temperature, N, "temperature", student);
  check_vector_cuda(row_weight, N, "row_weight", student);
  c10::cuda::CUDAGuard guard(student.device());

  auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss_rows = at::zeros({N}, f32);
  at::Tensor gs = grad_student ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor gt = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  at::Tensor gT = grad_temperature ? at::zeros({N}, f32) : at::empty({0}, f32);
  if (C == 0) {
    gs.zero_();
    gt.zero_();
  } else {
    cudaError_t err = kd_fwd_cuda(
        dtype_tag(student), student.const_data_ptr(), dtype_tag(teacher), teacher.const_data_ptr(),
        temperature.const_data_ptr<float>(), row_weight.const_data_ptr<float>(), N, C,
        loss_rows.mutable_data_ptr<float>(), grad_student ? gs.mutable_data_ptr() : nullptr,
        grad_teacher ? gt.mutable_data_ptr() : nullptr, grad_temperature ? gT.mutable_data_ptr<float>() : nullptr,
        c10::cuda::getCurrentCUDAStream(student.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "fastkd: kd_fwd CUDA launch failed: ", cudaGetErrorString(err));
  }
  at::Tensor loss_out = reduce ? loss_rows.sum() : loss_rows;
  return {loss_out, gs, gt, gT};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("kd_fwd", &kd_fwd_cuda_op); }

}  // namespace fastkd
