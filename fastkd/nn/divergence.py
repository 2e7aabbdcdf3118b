"""Modules of the language-model divergences: ``ReverseKLLoss``, ``JSDLoss``, ``SkewKLLoss``,
``TVDLoss`` (the keyword arguments at construction; ``teacher_logits`` may be a ``TopKTeacher``).
"""
from typing import Optional

import torch
from torch import nn

from .. import functional
from ..core import checks as v


class _DivergenceLoss(nn.Module):
    """What the divergence modules share: the keyword arguments and ``forward``.

    ``forward(student_logits, teacher_logits, target=None, sample_weight=None)``;
    ``teacher_logits`` may be a ``fastkd.TopKTeacher``. The constructor checks the
    arguments so that a bad one fails early; the functional checks again per call.
    """

    def __init__(self, function, options: dict, temperature: float, reduction: str, ignore_index: int,
                 ce_weight: float, return_parts: bool, backend: str, process_group=None):
        super().__init__()
        v.check_positive("temperature", temperature)
        v.check_row_args(reduction, ignore_index, backend)
        v.check_ce(ce_weight, return_parts, target=0)  # the target comes with each call
        self._function = function
        self._options = options
        self.temperature = temperature
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.return_parts = return_parts
        self.backend = backend
        self.process_group = process_group

    def forward(self, student_logits: torch.Tensor, teacher_logits, target: Optional[torch.Tensor] = None,
                sample_weight: Optional[torch.Tensor] = None):
        return self._function(
            student_logits, teacher_logits, temperature=self.temperature, reduction=self.reduction, target=target,
            ignore_index=self.ignore_index, sample_weight=sample_weight, ce_weight=self.ce_weight,
            return_parts=self.return_parts, process_group=self.process_group, backend=self.backend,
            **{k: getattr(self, k) for k in self._options},
        )

    def extra_repr(self) -> str:
        options = "".join(f"{k}={getattr(self, k)!r}, " for k in self._options)
        return (f"{options}temperature={self.temperature}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, ce_weight={self.ce_weight}, "
                f"return_parts={self.return_parts}, backend={self.backend!r}")


class ReverseKLLoss(_DivergenceLoss):
    """Reverse KL ``KL(q || p)`` per row, ``q`` the student, ``p`` the teacher, both ``softmax(logits / T)``.

    No ``T^2`` factor (``KDLoss`` has it). Arguments and semantics: ``fastkd.reverse_kl_loss``.
    """

    def __init__(self, *, temperature: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto",
                 process_group=None):
        super().__init__(functional.reverse_kl_loss, (), temperature, reduction, ignore_index, ce_weight,
                         return_parts, backend, process_group)


class JSDLoss(_DivergenceLoss):
    """Generalised JSD (GKD) ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``.

    ``beta == 0``: ``KL(p || q)``; ``beta == 1``: ``KL(q || p)`` (as TRL). No ``T^2``
    factor. Arguments and semantics: ``fastkd.jsd_loss``.
    """

    def __init__(self, *, beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                 ignore_index: int = -100, ce_weight: float = 0.0, return_parts: bool = False,
                 backend: str = "auto",
                 process_group=None):
        v.check_unit("beta", beta)
        super().__init__(functional.jsd_loss, ("beta",), temperature, reduction, ignore_index, ce_weight,
                         return_parts, backend, process_group)
        self.beta = beta


class SkewKLLoss(_DivergenceLoss):
    """Skew KL (DistiLLM): ``KL(p || skew p + (1 - skew) q)``; ``reverse=True``: ``KL(q || (1 - skew) p + skew q)``.

    No ``T^2`` factor. Arguments and semantics: ``fastkd.skew_kl_loss``.
    """

    def __init__(self, *, skew: float = 0.1, reverse: bool = False, temperature: float = 1.0,
                 reduction: str = "batchmean", ignore_index: int = -100, ce_weight: float = 0.0,
                 return_parts: bool = False, backend: str = "auto",
                 process_group=None):
        v.check_unit("skew", skew)
        if not isinstance(reverse, bool):
            raise TypeError(f"reverse must be a bool, got {type(reverse).__name__}")
        super().__init__(functional.skew_kl_loss, ("skew", "reverse"), temperature, reduction, ignore_index,
                         ce_weight, return_parts, backend, process_group)
        self.skew = skew
        self.reverse = reverse


class TVDLoss(_DivergenceLoss):
    """Total variation distance ``0.5 * sum |p - q|`` per row. No ``T^2`` factor. See ``fastkd.tvd_loss``."""

    def __init__(self, *, temperature: float = 1.0, reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto",
                 process_group=None):
        super().__init__(functional.tvd_loss, (), temperature, reduction, ignore_index, ce_weight,
                         return_parts, backend, process_group)
