// Torch-facing side of the CUDA MGD ops: checks, allocation, stream, launch (kernels in mgd.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../mgd_math.h"
#include "cuda_common.h"
#include "launch.h"

namespace fastkd {
namespace {

cudaStream_t current_stream(const at::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

at::Tensor mgd_mask_cuda_op(const at::Tensor& x, int64_t seed, double mask_ratio, bool spatial) {
  TORCH_CHECK(x.is_cuda(), "fastkd: mgd_mask input must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "fastkd: mgd_mask input must be a contiguous NCHW tensor, got ",
              x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  cudaError_t err = mgd_mask_cuda(dtype_tag(x), x.const_data_ptr(), out.mutable_data_ptr(), x.size(0), x.size(1),
                                  x.size(2) * x.size(3), mgd_seed_key(seed), mgd_threshold(mask_ratio), spatial,
                                  current_stream(x));
  TORCH_CHECK(err == cudaSuccess, "fastkd: mgd_mask CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mgd_sq_err_cuda_op(const at::Tensor& pred, const at::Tensor& teacher,
                                                                  double scale, bool grad_pred, bool grad_teacher) {
  TORCH_CHECK(pred.is_cuda() && teacher.device() == pred.device(),
              "fastkd: mgd_sq_err pred and teacher must be on one CUDA device");
  TORCH_CHECK(pred.is_contiguous() && teacher.is_contiguous(), "fastkd: mgd_sq_err inputs must be contiguous");
  TORCH_CHECK(pred.sizes() == teacher.sizes(), "fastkd: mgd_sq_err pred and teacher shapes differ: ", pred.sizes(),
              " and ", teacher.sizes());
  c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor loss = at::empty({}, pred.options().dtype(at::kFloat));
  at::Tensor gp = grad_pred ? at::empty_like(pred) : at::empty({0}, pred.options());
  at::Tensor gt = grad_teacher ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  const int64_t numel = pred.numel();
  at::Tensor work = at::empty({std::max<int64_t>(mgd_sq_err_tiles(numel), 1)}, pred.options().dtype(at::kFloat));
  cudaError_t err = mgd_sq_err_cuda(dtype_tag(pred), pred.const_data_ptr(), dtype_tag(teacher),
                                    teacher.const_data_ptr(), numel, scale, work.mutable_data_ptr<float>(),
                                    loss.mutable_data_ptr<float>(), grad_pred ? gp.mutable_data_ptr() : nullptr,
                                    grad_teacher ? gt.mutable_data_ptr() : nullptr, current_stream(pred));
  TORCH_CHECK(err == cudaSuccess, "fastkd: mgd_sq_err CUDA launch failed: ", cudaGetErrorString(err));
  return {loss, gp, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("mgd_mask", &mgd_mask_cuda_op);
  m.impl("mgd_sq_err", &mgd_sq_err_cuda_op);
}

}  // namespace fastkd
