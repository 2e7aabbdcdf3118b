// Torch-facing side of the CUDA akl_fwd op (kernel in akl.cu; contract in docs/design.md, "akl_fwd"):
// divergence_fwd's schema, a = mu, kind 8, dense teachers; checks, outputs, one launch on the current stream.
#include <cmath>
#include <algorithm>
#include <torch/library.h>

#include "cuda_common.h"

namespace fastkd {

cudaError_t akl_fwd_cuda(const DivergenceArgs& args, cudaStream_t stream);  // akl.cu

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> akl_fwd_cuda_op(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& topk_ids, const at::Tensor& target,
    const at::Tensor& row_weight, double temperature, int64_t kind, double a, double b, double w_p, double w_q,
    double soft_scale, double ce_weight, int64_t topk_mode, bool reduce, bool grad_student, bool grad_teacher,
    double teacher_temperature) {
  TORCH_CHECK_VALUE(kind == 8, "fastkd: akl_fwd kind must be 8 (AKL), got ", kind);
  TORCH_CHECK_VALUE(a > 0.0 && a <= 1.0, "fastkd: akl_fwd a (mu) must be in (0, 1], got ", a);
  TORCH_CHECK_VALUE(topk_mode == 0 && topk_ids.numel() == 0,
                    "fastkd: akl_fwd takes a dense teacher (topk_mode 0, empty topk_ids), got topk_mode ", topk_mode);
  TORCH_CHECK_VALUE(temperature > 0, "fastkd: akl_fwd: temperature must be > 0, got ", temperature);
  // as the CPU op (teacher_scale, csrc/cpu/loss_common.h): T_t as the float32 the kernel scales by, with a finite
  // 1/T_t and T/T_t
  const float tt = static_cast<float>(teacher_temperature), temp = static_cast<float>(temperature);
  TORCH_CHECK_VALUE(teacher_temperature == 0.0 ||
                        (tt > 0.0f && std::isfinite(tt) && std::isfinite(1.0f / tt) && std::isfinite(temp / tt)),
                    "fastkd: akl_fwd: teacher_temperature must be a finite number > 0 (or 0: the temperature), got ",
                    teacher_temperature);
  check_logit_pair_cuda(student, teacher);
  const int64_t N = student.size(0), V = student.size(1);
  const bool has_target = target.numel() > 0;
  if (has_target) check_target_cuda(target, N, student);
  TORCH_CHECK_VALUE(has_target || ce_weight == 0 || N == 0, "fastkd: akl_fwd: ce_weight=", ce_weight,
                    " adds a cross-entropy term, which needs target");
  check_vector_cuda(row_weight, N, "row_weight", student);
  const CudaCall call("akl_fwd", student);
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor gs = grad_output(student, grad_student);
  at::Tensor gt = grad_output(teacher, grad_teacher);
  at::Tensor loss, soft, hard;
  if (V == 0) {  // no classes: nothing to read, everything 0
    loss = at::zeros({N}, f32), soft = at::zeros({N}, f32), hard = at::zeros({N}, f32);
  } else {
    loss = at::empty({N}, f32), soft = at::empty({N}, f32), hard = at::empty({N}, f32);
    DivergenceArgs args;
    args.s_dtype = dtype_tag(student);
    args.t_dtype = dtype_tag(teacher);
    args.student = student.const_data_ptr();
    args.teacher = teacher.const_data_ptr();
    args.topk_ids = nullptr;
    args.target = has_target ? target.const_data_ptr<int64_t>() : nullptr;
    args.row_weight = row_weight.const_data_ptr<float>();
    args.rows = N, args.cols = V, args.k = 0;
    args.temperature = static_cast<float>(temperature);
    args.teacher_temperature = teacher_temperature == 0.0 ? 0.0f : tt;  // 0: the temperature
    // mu < 1 must stay below 1 in float (the kernel selects a head only then): the largest float below 1
    args.a = a < 1.0 ? std::min(static_cast<float>(a), std::nextafter(1.0f, 0.0f)) : 1.0f;
    args.b = static_cast<float>(b);
    args.w_p = static_cast<float>(w_p), args.w_q = static_cast<float>(w_q);
    args.soft_scale = static_cast<float>(soft_scale), args.ce_weight = static_cast<float>(ce_weight);
    args.kind = static_cast<int>(kind), args.topk_mode = 0;
    args.loss_rows = loss.mutable_data_ptr<float>();
    args.soft_rows = soft.mutable_data_ptr<float>();
    args.hard_rows = hard.mutable_data_ptr<float>();
    args.grad_student = grad_ptr(gs, grad_student);
    args.grad_teacher = grad_ptr(gt, grad_teacher);
    call.check(akl_fwd_cuda(args, call.stream()));
  }
  if (reduce) return {loss.sum(), soft.sum(), hard.sum(), gs, gt};
  return {loss, soft, hard, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("akl_fwd", &akl_fwd_cuda_op); }

}  // namespace fastkd
