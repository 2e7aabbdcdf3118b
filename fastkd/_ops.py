"""Fake implementations and autograd of the compiled ``fastkd::`` ops (csrc/).

Schemas are declared once in csrc/ops.cpp; the CPU and CUDA kernels register
themselves when ``fastkd._C`` is imported. This module adds what
``torch.compile`` and autograd need. Loading failures are kept (not raised) so
that ``fastkd.backends()`` can say why the compiled backends are missing.
"""
import torch

from ._autograd import register_loss_autograd

LOAD_ERROR = None
try:
    from . import _C  # noqa: F401  (registers the ops)
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

    register_loss_autograd("fastkd::kd_fwd", {0: 1, 1: 2, 2: 3}, reduce_arg=4)


if LOAD_ERROR is None:
    _register_kd()
