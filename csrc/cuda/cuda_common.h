// What every torch-facing CUDA op file (*_ops.cpp) shares: argument checks,
// dtype tags, gradient allocation, and the device guard / current stream /
// launch-error check around a launch (CudaCall).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "launch.h"

namespace fastkd {

inline DType dtype_tag(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "fastkd: unsupported dtype ", x.scalar_type());
  }
}

inline void check_rows_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "fastkd: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2, "fastkd: ", name, " must be 2-D [N, C], got ", x.dim(), "-D");
  TORCH_CHECK(x.is_contiguous(), "fastkd: ", name, " must be contiguous");
  dtype_tag(x);
}

// student and teacher logits: [N, C] contiguous float tensors of one shape on one device.
inline void check_logit_pair_cuda(const at::Tensor& student, const at::Tensor& teacher) {
  check_rows_cuda(student, "student");
  check_rows_cuda(teacher, "teacher");
  TORCH_CHECK(student.device() == teacher.device(), "fastkd: student is on ", student.device(), " but teacher on ",
              teacher.device());
  TORCH_CHECK(student.sizes() == teacher.sizes(), "fastkd: student and teacher shapes differ: ", student.sizes(),
              " and ", teacher.sizes());
}

inline void check_vector_cuda(const at::Tensor& v, int64_t n, const char* name, const at::Tensor& like) {
  TORCH_CHECK(v.device() == like.device() && v.dim() == 1 && v.size(0) == n && v.scalar_type() == at::kFloat &&
                  v.is_contiguous(),
              "fastkd: ", name, " must be a contiguous float32 vector of ", n, " rows on ", like.device());
}

inline void check_target_cuda(const at::Tensor& target, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(target.device() == like.device() && target.dim() == 1 && target.size(0) == n &&
                  target.scalar_type() == at::kLong && target.is_contiguous(),
              "fastkd: target must be a contiguous int64 vector of ", n, " rows on ", like.device());
}

// A gradient output: like `x` when wanted, else the empty tensor of the op contract.
inline at::Tensor grad_output(const at::Tensor& x, bool wanted) {
  return wanted ? at::empty_like(x) : at::empty({0}, x.options());
}

// The pointer a kernel writes a gradient through: null when it was not asked for.
inline void* grad_ptr(at::Tensor& g, bool wanted) { return wanted ? g.mutable_data_ptr() : nullptr; }

// One op call on the device of `like`: holds the device guard for the call's
// lifetime (allocations and launch), gives the current stream of that device,
// and turns a failed launch into an error naming the op. The check reads the
// launch status only (cudaGetLastError), so it never waits for the GPU.
class CudaCall {
 public:
  CudaCall(const char* op, const at::Tensor& like)
      : op_(op), guard_(like.device()), stream_(c10::cuda::getCurrentCUDAStream(like.device().index()).stream()) {}

  cudaStream_t stream() const { return stream_; }

  void check(cudaError_t err) const {
    TORCH_CHECK(err == cudaSuccess, "fastkd: ", op_, " CUDA launch failed: ", cudaGetErrorString(err));
  }

 private:
  const char* op_;
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
};

// KD, ATS and DKD: the per-row losses (every row written by the kernel) and the
// gradients asked for. `launch(loss_rows, grad_student_ptr, grad_teacher_ptr)`
// runs the kernel when there is anything to compute; the loss is summed when `reduce`.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> row_loss_call(const CudaCall& call, const at::Tensor& student,
                                                             const at::Tensor& teacher, bool reduce,
                                                             bool grad_student, bool grad_teacher, Launch&& launch) {
  const int64_t N = student.size(0), C = student.size(1);
  at::Tensor gs = grad_output(student, grad_student);
  at::Tensor gt = grad_output(teacher, grad_teacher);
  at::Tensor loss_rows;
  if (C == 0) {  // no classes: loss 0 and empty gradient rows
    loss_rows = at::zeros({N}, student.options().dtype(at::kFloat));
  } else {
    loss_rows = at::empty({N}, student.options().dtype(at::kFloat));
    call.check(launch(loss_rows.mutable_data_ptr<float>(), grad_ptr(gs, grad_student), grad_ptr(gt, grad_teacher)));
  }
  return {reduce ? loss_rows.sum() : loss_rows, gs, gt};
}

// ATS and DKD: the checks of a target-indexed loss on the CUDA device, then row_loss_call
// with `launch(N, C, loss_rows, grad_student_ptr, grad_teacher_ptr, stream)`.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> target_row_loss_call(const char* op, const at::Tensor& student,
                                                                    const at::Tensor& teacher,
                                                                    const at::Tensor& target,
                                                                    const at::Tensor& row_weight, bool reduce,
                                                                    bool grad_student, bool grad_teacher,
                                                                    Launch&& launch) {
  check_logit_pair_cuda(student, teacher);
  const int64_t N = student.size(0), C = student.size(1);
  check_target_cuda(target, N, student);
  check_vector_cuda(row_weight, N, "row_weight", student);
  const CudaCall call(op, student);
  return row_loss_call(call, student, teacher, reduce, grad_student, grad_teacher,
                       [&](float* loss_rows, void* gs_ptr, void* gt_ptr) {
                         return launch(N, C, loss_rows, gs_ptr, gt_ptr, call.stream());
                       });
}

}  // namespace fastkd
