// Torch-facing side of the CUDA divergence_fwd op (kernel in divergence.cu; contract in
// docs/design.md, "The language-model divergences"): checks, outputs, one launch.
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "cuda_common.h"

namespace fastkd {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> divergence_fwd_cuda_op(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& topk_ids, const at::Tensor& target,
    const at::Tensor& row_weight, double temperature, int64_t kind, double a, double b, double w_p, double w_q,
    double soft_scale, double ce_weight, int64_t topk_mode, bool reduce, bool grad_student, bool grad_teacher,
    double teacher_temperature, std::optional<at::TensorList> teacher_members, at::ArrayRef<double> member_weights,
    int64_t mixture_mode) {
  // a TeacherMixture formed inside the op is the CPU kernel's (csrc/cpu/teacher_mixture.h); fastkd's losses mix
  // blocks of rows for this backend and pass one dense teacher (fastkd/losses/teacher_blocks.py)
  TORCH_CHECK_VALUE(mixture_mode == 0 && (!teacher_members.has_value() || teacher_members->empty()) &&
                        member_weights.empty(),
                    "fastkd: divergence_fwd (CUDA): a teacher mixture inside the row op (teacher_members, "
                    "mixture_mode = ", mixture_mode, ") is implemented by the CPU kernel only; fastkd's losses mix a "
                    "TeacherMixture block by block for the cuda backend");
  // csrc/divergence_math.h: kDivAB = 4, kDivRenyi = 6, kDivEntropyGated = 7 (5 is internal: Renyi's gradient pass)
  TORCH_CHECK((kind >= 0 && kind <= 4) || kind == 6 || kind == 7,
              "fastkd: divergence_fwd: kind must be 0 (KL family), 1 (TVD), 2 (two-sided KL), 3 (triangular), "
              "4 (AB divergence), 6 (Renyi) or 7 (entropy-gated KL), got ", kind);
  TORCH_CHECK(kind != 6 || (a > 0.0 && std::isfinite(a)), "fastkd: divergence_fwd: Renyi's order (a) must be a "
              "finite number > 0, got ", a);
  TORCH_CHECK(kind != 4 || (std::isfinite(a) && std::isfinite(b)), "fastkd: divergence_fwd: the AB divergence's "
              "alpha, beta (a, b) must be finite, got ", a, ", ", b);
  TORCH_CHECK(topk_mode >= 0 && topk_mode <= 2,
              "fastkd: divergence_fwd: topk_mode must be 0 (dense teacher), 1 (tail) or 2 (renormalise), got ",
              topk_mode);
  TORCH_CHECK(temperature > 0, "fastkd: divergence_fwd: temperature must be > 0, got ", temperature);
  // as the CPU op (teacher_scale, csrc/cpu/loss_common.h) and Triton: ValueError; T_t as the float32 the kernel
  // scales by, with a finite 1/T_t and T/T_t
  const float tt = static_cast<float>(teacher_temperature), temp = static_cast<float>(temperature);
  TORCH_CHECK_VALUE(teacher_temperature == 0.0 ||
                        (tt > 0.0f && std::isfinite(tt) && std::isfinite(1.0f / tt) && std::isfinite(temp / tt)),
                    "fastkd: divergence_fwd: teacher_temperature must be a finite number > 0 (or 0: the "
                    "temperature), got ", teacher_temperature);
  // top-k log-probs are taken as given: no temperature of the teacher's own applies to them
  TORCH_CHECK_VALUE(topk_mode == 0 || teacher_temperature == 0.0 || tt == temp,
                    "fastkd: divergence_fwd: a top-k teacher (topk_mode ", topk_mode, ") takes teacher_temperature 0 "
                    "or the temperature ", temperature, ", got ", teacher_temperature);
  check_rows_cuda(student, "student");
  const int64_t N = student.size(0), V = student.size(1);
  int64_t K = 0;
  if (topk_mode == 0) {
    check_logit_pair_cuda(student, teacher);
    TORCH_CHECK(topk_ids.numel() == 0, "fastkd: divergence_fwd: topk_ids must be empty for a dense teacher (topk_mode 0)");
  } else {
    check_rows_cuda(teacher, "teacher");
    TORCH_CHECK(teacher.device() == student.device(), "fastkd: student is on ", student.device(), " but teacher on ",
                teacher.device());
    TORCH_CHECK(teacher.size(0) == N, "fastkd: divergence_fwd: teacher log-probs must have ", N, " rows, got ",
                teacher.size(0));
    K = teacher.size(1);
    TORCH_CHECK(topk_ids.device() == student.device() && topk_ids.scalar_type() == at::kLong &&
                    topk_ids.is_contiguous() && topk_ids.sizes() == teacher.sizes(),
                "fastkd: divergence_fwd: topk_ids must be a contiguous int64 tensor of the teacher's shape ",
                teacher.sizes(), " on ", student.device());
  }
  const bool has_target = target.numel() > 0;
  if (has_target) check_target_cuda(target, N, student);
  // no rows: nothing to classify, so an empty target is the target of every row (kd_loss on [0, V] gives 0)
  TORCH_CHECK(has_target || ce_weight == 0 || N == 0, "fastkd: divergence_fwd: ce_weight=", ce_weight,
              " adds a cross-entropy term, which needs target");
  check_vector_cuda(row_weight, N, "row_weight", student);
  const CudaCall call("divergence_fwd", student);
  if (topk_mode == 1) {
    // the tail mode keeps a bit per vocabulary column of each row in shared memory
    int device = student.device().index(), optin = 0;
    call.check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const int64_t need = divergence_tail_shared_bytes(N, V);
    TORCH_CHECK(need + 4096 <= optin, "fastkd: divergence_fwd: a top-k tail over a vocabulary of ", V,
                " columns needs ", need, " bytes of shared memory per block; this device allows ", optin);
  }

  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor gs = grad_output(student, grad_student);
  at::Tensor gt = grad_output(teacher, grad_teacher);
  at::Tensor loss, soft, hard;
  if (V == 0) {  // no classes: nothing to read, everything 0
    loss = at::zeros({N}, f32), soft = at::zeros({N}, f32), hard = at::zeros({N}, f32);
    if (grad_teacher) gt.zero_();
  } else {
    loss = at::empty({N}, f32), soft = at::empty({N}, f32), hard = at::empty({N}, f32);
    DivergenceArgs args;
    args.s_dtype = dtype_tag(student);
    args.t_dtype = dtype_tag(teacher);
    args.student = student.const_data_ptr();
    args.teacher = teacher.const_data_ptr();
    args.topk_ids = topk_mode == 0 ? nullptr : topk_ids.const_data_ptr<int64_t>();
    args.target = has_target ? target.const_data_ptr<int64_t>() : nullptr;
    args.row_weight = row_weight.const_data_ptr<float>();
    args.rows = N, args.cols = V, args.k = K;
    args.temperature = static_cast<float>(temperature);
    args.teacher_temperature = teacher_temperature == 0.0 ? 0.0f : tt;  // 0: the temperature
    args.a = static_cast<float>(a), args.b = static_cast<float>(b);
    args.w_p = static_cast<float>(w_p), args.w_q = static_cast<float>(w_q);
    args.soft_scale = static_cast<float>(soft_scale), args.ce_weight = static_cast<float>(ce_weight);
    args.kind = static_cast<int>(kind), args.topk_mode = static_cast<int>(topk_mode);
    args.loss_rows = loss.mutable_data_ptr<float>();
    args.soft_rows = soft.mutable_data_ptr<float>();
    args.hard_rows = hard.mutable_data_ptr<float>();
    args.grad_student = grad_ptr(gs, grad_student);
    args.grad_teacher = grad_ptr(gt, grad_teacher);
    call.check(divergence_fwd_cuda(args, call.stream()));
  }
  if (reduce) return {loss.sum(), soft.sum(), hard.sum(), gs, gt};
  return {loss, soft, hard, gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("divergence_fwd", &divergence_fwd_cuda_op); }

}  // namespace fastkd
