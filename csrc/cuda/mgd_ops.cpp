// Torch-facing side of the CUDA MGD ops: checks, allocation, launch (kernels in mgd.cu).
#include <torch/library.h>

#include "../mgd_math.h"
#include "cuda_common.h"

namespace fastkd {
namespace {

at::Tensor mgd_mask_cuda_op(const at::Tensor& x, int64_t seed, double mask_ratio, bool spatial) {
  TORCH_CHECK(x.is_cuda(), "fastkd: mgd_mask input must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "fastkd: mgd_mask input must be a contiguous NCHW tensor, got ",
              x.sizes());
  const CudaCall call("mgd_mask", x);
  at::Tensor out = at::empty_like(x);
  call.check(mgd_mask_cuda(dtype_tag(x), x.const_data_ptr(), out.mutable_data_ptr(), x.size(0), x.size(1),
                           x.size(2) * x.size(3), mgd_seed_key(seed), mgd_threshold(mask_ratio), spatial,
                           call.stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mgd_sq_err_cuda_op(const at::Tensor& pred, const at::Tensor& teacher,
                                                                  double scale, bool grad_pred, bool grad_teacher) {
  TORCH_CHECK(pred.is_cuda() && teacher.device() == pred.device(),
              "fastkd: mgd_sq_err pred and teacher must be on one CUDA device, got ", pred.device(), " and ",
              teacher.device());
  TORCH_CHECK(pred.is_contiguous() && teacher.is_contiguous(), "fastkd: mgd_sq_err inputs must be contiguous");
  TORCH_CHECK(pred.sizes() == teacher.sizes(), "fastkd: mgd_sq_err pred and teacher shapes differ: ", pred.sizes(),
              " and ", teacher.sizes());
  const CudaCall call("mgd_sq_err", pred);
  at::Tensor loss = at::empty({}, pred.options().dtype(at::kFloat));
  at::Tensor gp = grad_output(pred, grad_pred);
  at::Tensor gt = grad_output(teacher, grad_teacher);
  const int64_t numel = pred.numel();
  at::Tensor work = at::empty({std::max<int64_t>(mgd_sq_err_tiles(numel), 1)}, pred.options().dtype(at::kFloat));
  call.check(mgd_sq_err_cuda(dtype_tag(pred), pred.const_data_ptr(), dtype_tag(teacher), teacher.const_data_ptr(),
                             numel, scale, work.mutable_data_ptr<float>(), loss.mutable_data_ptr<float>(),
                             grad_ptr(gp, grad_pred), grad_ptr(gt, grad_teacher), call.stream()));
  return {loss, gp, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("mgd_mask", &mgd_mask_cuda_op);
  m.impl("mgd_sq_err", &mgd_sq_err_cuda_op);
}

}  // namespace fastkd
