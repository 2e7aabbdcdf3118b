"""Modules of the language-model divergences: ``ForwardKLLoss``, ``ReverseKLLoss``, ``JSDLoss``, ``SkewKLLoss``,
``TVDLoss``, ``JeffreysLoss``, ``TriangularLoss``, ``EntropyGatedKLLoss``, ``AKLLoss``, ``AlphaDivergenceLoss``,
``ABDivergenceLoss``, ``RenyiLoss`` (the keyword arguments at construction, ``teacher_vocab`` included; ``teacher_logits`` may
be a ``TopKTeacher``).
"""
from typing import Optional

import torch

from .. import functional
from ..core import checks as v
from ..core.divergence import check_divergence_params
from .base import RowLoss


class _DivergenceLoss(RowLoss):
    """What the divergence modules share: the keyword arguments and ``forward``.

    ``forward(student_logits, teacher_logits, target=None, sample_weight=None)``;
    ``teacher_logits`` may be a ``fastkd.TopKTeacher``. ``params``: the divergence's own
    parameters (``beta``, ``skew``, ``reverse``), checked here and kept as attributes.
    """

    def __init__(self, function, params: dict, temperature: float, reduction: str, ignore_index: int,
                 ce_weight: float, return_parts: bool, backend: str, process_group=None,
                 teacher_vocab: str = "truncate", teacher_temperature: Optional[float] = None):
        v.check_positive("temperature", temperature)
        if teacher_temperature is not None:
            v.check_positive("teacher_temperature", teacher_temperature)
        v.check_teacher_vocab(teacher_vocab)
        check_divergence_params(**params)
        super().__init__(reduction, ignore_index, ce_weight, return_parts, backend, process_group)
        self._function = function
        self._options = tuple(params)
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.teacher_vocab = teacher_vocab
        for name, value in params.items():
            setattr(self, name, value)

    def forward(self, student_logits: torch.Tensor, teacher_logits, target: Optional[torch.Tensor] = None,
                sample_weight: Optional[torch.Tensor] = None):
        return self._function(student_logits, teacher_logits, temperature=self.temperature,
                              teacher_temperature=self.teacher_temperature, target=target,
                              teacher_vocab=self.teacher_vocab, **self.row_options(sample_weight),
                              **{k: getattr(self, k) for k in self._options})

    def extra_repr(self) -> str:
        options = "".join(f"{k}={getattr(self, k)!r}, " for k in self._options)
        return (f"{options}temperature={self.temperature}, teacher_temperature={self.teacher_temperature}, "
                f"reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, ce_weight={self.ce_weight}, "
                f"return_parts={self.return_parts}, backend={self.backend!r}")


class ForwardKLLoss(_DivergenceLoss):
    """Forward KL ``KL(p || q)`` per row, ``p`` the teacher, ``q`` the student, both ``softmax(logits / T)``.

    No ``T^2`` factor (``KDLoss`` has it). Arguments and semantics: ``fastkd.forward_kl_loss``.
    """

    def __init__(self, *, temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto",
                 process_group=None, teacher_vocab: str = "truncate"):
        super().__init__(functional.forward_kl_loss, {}, temperature, reduction, ignore_index, ce_weight,
                         return_parts, backend, process_group, teacher_vocab,
                         teacher_temperature)


class ReverseKLLoss(_DivergenceLoss):
    """Reverse KL ``KL(q || p)`` per row, ``q`` the student, ``p`` the teacher, both ``softmax(logits / T)``.

    No ``T^2`` factor (``KDLoss`` has it). Arguments and semantics: ``fastkd.reverse_kl_loss``.
    """

    def __init__(self, *, temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto",
                 process_group=None, teacher_vocab: str = "truncate"):
        super().__init__(functional.reverse_kl_loss, {}, temperature, reduction, ignore_index, ce_weight,
                         return_parts, backend, process_group, teacher_vocab,
                         teacher_temperature)


class JSDLoss(_DivergenceLoss):
    """Generalised JSD (GKD) ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``.

    ``beta == 0``: ``KL(p || q)``; ``beta == 1``: ``KL(q || p)`` (as TRL). No ``T^2``
    factor. Arguments and semantics: ``fastkd.jsd_loss``.
    """

    def __init__(self, *, beta: float = 0.5, temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 reduction: str = "batchmean",
                 ignore_index: int = -100, ce_weight: float = 0.0, return_parts: bool = False,
                 backend: str = "auto",
                 process_group=None, teacher_vocab: str = "truncate"):
        super().__init__(functional.jsd_loss, {"beta": beta}, temperature, reduction, ignore_index, ce_weight,
                         return_parts, backend, process_group, teacher_vocab,
                         teacher_temperature)


class SkewKLLoss(_DivergenceLoss):
    """Skew KL (DistiLLM): ``KL(p || skew p + (1 - skew) q)``; ``reverse=True``: ``KL(q || (1 - skew) p + skew q)``.

    No ``T^2`` factor. Arguments and semantics: ``fastkd.skew_kl_loss``.
    """

    def __init__(self, *, skew: float = 0.1, reverse: bool = False, temperature: float = 1.0,
                 teacher_temperature: Optional[float] = None, reduction: str = "batchmean", ignore_index: int = -100, ce_weight: float = 0.0,
                 return_parts: bool = False, backend: str = "auto",
                 process_group=None, teacher_vocab: str = "truncate"):
        super().__init__(functional.skew_kl_loss, {"skew": skew, "reverse": reverse}, temperature, reduction,
                         ignore_index, ce_weight, return_parts, backend, process_group, teacher_vocab,
                         teacher_temperature)


class TVDLoss(_DivergenceLoss):
    """Total variation distance ``0.5 * sum |p - q|`` per row. No ``T^2`` factor. See ``fastkd.tvd_loss``."""

    def __init__(self, *, temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto",
                 process_group=None, teacher_vocab: str = "truncate"):
        super().__init__(functional.tvd_loss, {}, temperature, reduction, ignore_index, ce_weight,
                         return_parts, backend, process_group, teacher_vocab,
                         teacher_temperature)


class JeffreysLoss(_DivergenceLoss):
    """Jeffreys divergence ``KL(p || q) + KL(q || p)`` per row. No ``T^2`` factor. See ``fastkd.jeffreys_loss``."""

    def __init__(self, *, temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto",
                 process_group=None, teacher_vocab: str = "truncate"):
        super().__init__(functional.jeffreys_loss, {}, temperature, reduction, ignore_index, ce_weight,
                         return_parts, backend, process_group, teacher_vocab,
                         teacher_temperature)


class TriangularLoss(_DivergenceLoss):
    """Triangular discrimination ``sum (p - q)^2 / (p + q)`` per row. No ``T^2`` factor. See
    ``fastkd.triangular_loss``."""

    def __init__(self, *, temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto",
                 process_group=None, teacher_vocab: str = "truncate"):
        super().__init__(functional.triangular_loss, {}, temperature, reduction, ignore_index, ce_weight,
                         return_parts, backend, process_group, teacher_vocab,
                         teacher_temperature)


class EntropyGatedKLLoss(_DivergenceLoss):
    """Entropy-gated KL ``w KL(p || q) + (1 - w) KL(q || p)`` per row, ``w = alpha_min + (alpha_max -
    alpha_min) sigmoid((H(p) / log V - tau) / scale)``. No ``T^2`` factor. See ``fastkd.entropy_gated_kl_loss``."""

    def __init__(self, *, alpha_min: float = 0.0, alpha_max: float = 1.0, tau: float = 0.5, scale: float = 0.1,
                 temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto",
                 process_group=None, teacher_vocab: str = "truncate"):
        params = {"alpha_min": alpha_min, "alpha_max": alpha_max, "tau": tau, "scale": scale}
        super().__init__(functional.entropy_gated_kl_loss, params, temperature, reduction, ignore_index, ce_weight,
                         return_parts, backend, process_group, teacher_vocab,
                         teacher_temperature)


class AKLLoss(_DivergenceLoss):
    """Adaptive KL ``h KL(p || q) + l KL(q || p)`` per row, ``h``, ``l`` the shares of ``sum |p - q|`` on the teacher's
    head (its most probable classes holding mass ``mu``) and tail. No ``T^2`` factor; dense teacher logits only.
    See ``fastkd.akl_loss``."""

    def __init__(self, *, mu: float = 0.5, temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: int = -100, ce_weight: float = 0.0,
                 return_parts: bool = False, backend: str = "auto", process_group=None,
                 teacher_vocab: str = "truncate"):
        super().__init__(functional.akl_loss, {"mu": mu}, temperature, reduction, ignore_index, ce_weight,
                         return_parts, backend, process_group, teacher_vocab, teacher_temperature)


class AlphaDivergenceLoss(_DivergenceLoss):
    """Amari's alpha divergence per row (the AB divergence at ``beta = 1 - alpha``). No ``T^2`` factor. See
    ``fastkd.alpha_divergence_loss``."""

    def __init__(self, *, alpha: float = 0.5, temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: int = -100, ce_weight: float = 0.0,
                 return_parts: bool = False, backend: str = "auto", process_group=None,
                 teacher_vocab: str = "truncate"):
        super().__init__(functional.alpha_divergence_loss, {"alpha": alpha}, temperature, reduction, ignore_index,
                         ce_weight, return_parts, backend, process_group, teacher_vocab, teacher_temperature)


class ABDivergenceLoss(_DivergenceLoss):
    """The alpha-beta divergence per row (ABKD). No ``T^2`` factor. See ``fastkd.ab_divergence_loss``."""

    def __init__(self, *, alpha: float = 0.2, beta: float = 0.7, temperature: float = 1.0,
                 teacher_temperature: Optional[float] = None, reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto", process_group=None,
                 teacher_vocab: str = "truncate"):
        super().__init__(functional.ab_divergence_loss, {"alpha": alpha, "beta": beta}, temperature, reduction,
                         ignore_index, ce_weight, return_parts, backend, process_group, teacher_vocab,
                         teacher_temperature)


class RenyiLoss(_DivergenceLoss):
    """Renyi divergence of order ``order`` per row (``reverse``: p and q swapped). No ``T^2`` factor. See
    ``fastkd.renyi_loss``."""

    def __init__(self, *, order: float = 0.5, reverse: bool = False, temperature: float = 1.0,
                 teacher_temperature: Optional[float] = None, reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto", process_group=None,
                 teacher_vocab: str = "truncate"):
        super().__init__(functional.renyi_loss, {"order": order, "reverse": reverse}, temperature, reduction,
                         ignore_index, ce_weight, return_parts, backend, process_group, teacher_vocab,
                         teacher_temperature)
