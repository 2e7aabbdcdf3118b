"""``FusedLinearKDLoss``: the LM head fused with the loss, as a module (``fastkd.fused_linear_kd_loss``)."""
from typing import Optional

import torch
from torch import nn

from ..core import checks as v
from ..core.divergence import check_divergence_params, divergence_params
from ..losses.fused_linear import Teacher, fused_linear_kd_loss


class FusedLinearKDLoss(nn.Module):
    """``fastkd.fused_linear_kd_loss`` as a module: the keyword arguments at construction,
    ``forward(student_hidden, student_weight, teacher, target=None)``.

    ::

        loss_fn = fastkd.nn.FusedLinearKDLoss(divergence="kl", temperature=2.0, ce_weight=0.5)
        out = student(input_ids, output_hidden_states=True)
        loss = loss_fn(out.hidden_states[-1], student.lm_head.weight,
                       (teacher_hidden.detach(), teacher.lm_head.weight.detach()), labels)
    """

    def __init__(self, *, divergence: str = "kl", temperature: float = 1.0, beta: Optional[float] = None,
                 skew: float = 0.1,
                 alpha_min: float = 0.0, alpha_max: float = 1.0, tau: float = 0.5, scale: float = 0.1,
                 alpha: Optional[float] = None, order: float = 0.5, reverse: bool = False, mu: float = 0.5,
                 ce_weight: float = 0.0, logit_scale: Optional[float] = None, softcap: Optional[float] = None,
                 ignore_index: int = -100, reduction: str = "batchmean", chunk_size: Optional[int] = None,
                 return_parts: bool = False, teacher_vocab: str = "truncate", backend: str = "auto",
                 process_group=None, teacher_temperature: Optional[float] = None, teacher_grad: bool = False):
        super().__init__()
        # the same checks as the functional, early (it checks again at call time)
        v.check_fused_linear_options(divergence, temperature, beta, skew, ce_weight, logit_scale, softcap, reduction)
        gate = dict(alpha_min=alpha_min, alpha_max=alpha_max, tau=tau, scale=scale)
        check_divergence_params(**divergence_params(divergence, **gate, alpha=alpha, beta=beta, order=order,
                                                    reverse=reverse, mu=mu))
        v.check_backend(backend)
        v.check_teacher_vocab(teacher_vocab)
        if teacher_temperature is not None:
            v.check_positive("teacher_temperature", teacher_temperature)
        self.kwargs = dict(divergence=divergence, temperature=temperature, beta=beta, skew=skew, **gate, alpha=alpha,
                           order=order, reverse=reverse, mu=mu,
                           ce_weight=ce_weight, logit_scale=logit_scale, softcap=softcap,
                           ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
                           return_parts=return_parts, teacher_vocab=teacher_vocab, backend=backend,
                           process_group=process_group, teacher_temperature=teacher_temperature,
                           teacher_grad=teacher_grad)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher: Teacher,
                target: Optional[torch.Tensor] = None, *, student_bias: Optional[torch.Tensor] = None,
                teacher_bias: Optional[torch.Tensor] = None, sample_weight: Optional[torch.Tensor] = None):
        return fused_linear_kd_loss(student_hidden, student_weight, teacher, target, student_bias=student_bias,
                                    teacher_bias=teacher_bias, sample_weight=sample_weight, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={val!r}" for k, val in self.kwargs.items())
