"""Fake implementations and autograd of the compiled ``fastkd::`` ops (csrc/).

Schemas are declared once in csrc/ops.cpp; the CPU and CUDA kernels register
themselves when ``fastkd._C`` is imported. This module adds what
``torch.compile`` and autograd need. Loading failures are kept (not raised) so
that ``fastkd.backends()`` can say why the compiled backends are missing.
"""
import torch

from ..core.autograd import register_loss_autograd

LOAD_ERROR = None
try:
    from .. import _C  # noqa: F401  (registers the ops)
except ImportError as exc:  # pure-Python install or a broken build
    LOAD_ERROR = f"fastkd._C could not be imported ({exc}); reinstall fastkd with its compiled extension"


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether ``fastkd::op_name`` has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    if LOAD_ERROR is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastkd::{op_name}", dispatch_key)
    except RuntimeError:  # op not declared in this build
        return False


def _empty_grad(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    return torch.empty_like(x) if wanted else x.new_empty((0,))


def _loss(x: torch.Tensor, reduce: bool) -> torch.Tensor:
    return x.new_empty(() if reduce else (x.shape[0],), dtype=torch.float32)


def _register_kd():
    @torch.library.register_fake("fastkd::kd_fwd")
    def _(student, teacher, temperature, row_weight, reduce, grad_student, grad_teacher, grad_temperature):
        return (
            _loss(student, reduce),
            _empty_grad(student, grad_student),
            _empty_grad(teacher, grad_teacher),
            _empty_grad(temperature, grad_temperature),
        )

    register_loss_autograd("fastkd::kd_fwd", {0: 1, 1: 2, 2: 3})


def _declared(op_name: str) -> bool:
    """Whether this build of ``fastkd._C`` declares ``fastkd::op_name`` (an older build may not)."""
    try:
        torch._C._dispatch_find_schema_or_throw(f"fastkd::{op_name}", "")
        return True
    except RuntimeError:
        return False


def _register_ats_dkd():
    @torch.library.register_fake("fastkd::ats_fwd")
    def _(student, teacher, target, row_weight, student_temperature, target_temperature, other_temperature,
          reduce, grad_student, grad_teacher):
        return _loss(student, reduce), _empty_grad(student, grad_student), _empty_grad(teacher, grad_teacher)

    @torch.library.register_fake("fastkd::dkd_fwd")
    def _(student, teacher, target, row_weight, alpha, beta, temperature, reduce, grad_student, grad_teacher):
        return _loss(student, reduce), _empty_grad(student, grad_student), _empty_grad(teacher, grad_teacher)

    for op in ("fastkd::ats_fwd", "fastkd::dkd_fwd"):
        register_loss_autograd(op, {0: 1, 1: 2})


def _register_dist():
    @torch.library.register_fake("fastkd::dist_fwd")
    def _(student, teacher, beta, gamma, temperature, grad_student, grad_teacher):
        return _loss(student, True), _empty_grad(student, grad_student), _empty_grad(teacher, grad_teacher)

    register_loss_autograd("fastkd::dist_fwd", {0: 1, 1: 2})


def _register_mgd():
    @torch.library.register_fake("fastkd::mgd_mask")
    def _(x, seed, mask_ratio, spatial):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def mask_setup(ctx, inputs, output):
        ctx.mask_args = inputs[1:]

    def mask_backward(ctx, grad):
        # d(x * M)/dx = M: regenerate M from the seed instead of storing it.
        return torch.ops.fastkd.mgd_mask(grad.contiguous(), *ctx.mask_args), None, None, None

    torch.library.register_autograd("fastkd::mgd_mask", mask_backward, setup_context=mask_setup)

    @torch.library.register_fake("fastkd::mgd_sq_err")
    def _(pred, teacher, scale, grad_pred, grad_teacher):
        return _loss(pred, True), _empty_grad(pred, grad_pred), _empty_grad(teacher, grad_teacher)

    register_loss_autograd("fastkd::mgd_sq_err", {0: 1, 1: 2})


def _register_divergence():
    # teacher_members / member_weights / mixture_mode: a TeacherMixture formed in the op (its teacher gradient
    # is never asked for, so the outputs' shapes are those of a dense teacher)
    @torch.library.register_fake("fastkd::divergence_fwd")
    def _(student, teacher, topk_ids, target, row_weight, temperature, kind, a, b, w_p, w_q, soft_scale, ce_weight,
          topk_mode, reduce, grad_student, grad_teacher, teacher_temperature=0.0, teacher_members=None,
          member_weights=(), mixture_mode=0):
        loss = _loss(student, reduce)
        return (loss, torch.empty_like(loss), torch.empty_like(loss), _empty_grad(student, grad_student),
                _empty_grad(teacher, grad_teacher))

    register_loss_autograd("fastkd::divergence_fwd", {0: 3, 1: 4})


def _register_akl():
    # adaptive KL: divergence_fwd's schema and outputs (csrc/cpu/akl.cpp, csrc/cuda/akl.cu)
    @torch.library.register_fake("fastkd::akl_fwd")
    def _(student, teacher, topk_ids, target, row_weight, temperature, kind, a, b, w_p, w_q, soft_scale, ce_weight,
          topk_mode, reduce, grad_student, grad_teacher, teacher_temperature=0.0):
        loss = _loss(student, reduce)
        return (loss, torch.empty_like(loss), torch.empty_like(loss), _empty_grad(student, grad_student),
                _empty_grad(teacher, grad_teacher))

    register_loss_autograd("fastkd::akl_fwd", {0: 3, 1: 4})


def _register_topk():
    # No autograd: the teacher's top-k is a constant (fastkd.teacher_topk detaches its inputs).
    @torch.library.register_fake("fastkd::topk_fwd")
    def _(logits, k, temperature):
        n = logits.shape[0]
        f32 = dict(dtype=torch.float32, device=logits.device)
        return (logits.new_empty((n, k), dtype=torch.int64), logits.new_empty((n, k), **f32),
                logits.new_empty((n,), **f32), logits.new_empty((n, 2), **f32))


def _register_uld():
    @torch.library.register_fake("fastkd::uld_fwd")
    def _(student, teacher, target, row_weight, temperature, teacher_temperature, ce_weight, reduce, grad_student,
          grad_teacher, log_probs=False):
        loss = _loss(student, reduce)
        return (loss, torch.empty_like(loss), torch.empty_like(loss), _empty_grad(student, grad_student),
                _empty_grad(teacher, grad_teacher))

    register_loss_autograd("fastkd::uld_fwd", {0: 3, 1: 4})


if LOAD_ERROR is None:
    _register_kd()
    if _declared("ats_fwd"):  # all of these are declared together in csrc/ops.cpp
        _register_ats_dkd()
        _register_dist()
        _register_mgd()
    if _declared("divergence_fwd"):
        _register_divergence()
    if _declared("akl_fwd"):
        _register_akl()
    if _declared("topk_fwd"):
        _register_topk()
    if _declared("uld_fwd"):
        _register_uld()
