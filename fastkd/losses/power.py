"""The power divergences (issue 22): Amari's alpha divergence, the AB divergence, Renyi. Kinds 4 and 6 of
``divergence_fwd`` (``docs/design.md``), through ``losses.divergence``'s ``_divergence_loss``::

    alpha_divergence_loss(s, t, *, alpha=0.5, temperature=1.0, reduction="batchmean", target=None,
                          ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False,
                          process_group=None, backend="auto")
    ab_divergence_loss(s, t, *, alpha=0.2, beta=0.7, ...same...)
    renyi_loss(s, t, *, order=0.5, reverse=False, ...same...)
"""
from typing import Optional

import torch

from .divergence import _DETAIL, Teacher, _divergence_loss

__all__ = ["alpha_divergence_loss", "ab_divergence_loss", "renyi_loss"]


def alpha_divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    teacher_vocab: str = "truncate",
    process_group=None,
    backend: str = "auto",
):
    params = {"alpha": alpha}
    return _divergence_loss("alpha_divergence", params, student_logits, teacher_logits, temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)


def ab_divergence_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    alpha: float = 0.2,
    beta: float = 0.7,
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    teacher_vocab: str = "truncate",
    process_group=None,
    backend: str = "auto",
):
    params = {"alpha": alpha, "beta": beta}
    return _divergence_loss("ab_divergence", params, student_logits, teacher_logits, temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)


def renyi_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    order: float = 0.5,
    reverse: bool = False,
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    teacher_vocab: str = "truncate",
    process_group=None,
    backend: str = "auto",
):
    params = {"order": order, "reverse": reverse}
    return _divergence_loss("renyi", params, student_logits, teacher_logits, temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)

alpha_divergence_loss.__doc__ = """Amari's alpha divergence, per row::

        (1 / (alpha (1 - alpha))) sum_c [alpha p_c + (1 - alpha) q_c - p_c^alpha q_c^(1 - alpha)]

    the AB divergence at ``beta = 1 - alpha`` (``ab_divergence_loss``; the same kernel kind). ``alpha -> 1``
    is ``KL(p || q)``, ``alpha -> 0`` is ``KL(q || p)`` (both exact limits, no cancellation near them),
    ``alpha = 0.5`` is ``4 (1 - sum sqrt(p q))`` (four times the squared Hellinger distance). ``alpha`` any
    finite real; outside [0, 1] a class with mass on one side only makes the loss ``+inf``.
    Gradient (``x = s / T``): ``dL/dx_c = G_c - q_c sum G``, ``G_c = -q_c phi_alpha(d_c)``, ``d = log p - log q``,
    ``phi_c(d) = expm1(c d) / c``. Three passes (statistics, sums, gradients): the stable forms need the final
    log-sum-exps.
""" + _DETAIL

ab_divergence_loss.__doc__ = """The alpha-beta divergence (ABKD, Wang et al. ICML 2025), per row, ``s = alpha + beta``::

        -(1 / (alpha beta)) sum_c [p^alpha q^beta - (alpha / s) p^s - (beta / s) q^s]

    with its limits where ``alpha``, ``beta`` or ``s`` is 0 (ABKD's special cases: ``alpha = 0``, ``beta = 0``,
    ``alpha = beta = 0`` (``sum (log p - log q)^2 / 2``), ``alpha + beta = 0``). ``(1, 0)`` is ``KL(p || q)``,
    ``(0, 1)`` is ``KL(q || p)``, ``(0.5, 0.5)`` is ``4 (1 - sum sqrt(p q))``; the defaults ``(0.2, 0.7)`` are ABKD's.
    ``alpha``, ``beta`` any finite reals. Evaluated per class as ``q^s (k1 psi_a(d) + k2 psi_s(d))`` (or the same
    from the teacher's side, whichever divides by the larger of ``|alpha|``, ``|beta|``), ``psi_c(d) =
    (expm1(c d) - c d) / c^2``: no cancellation as any parameter tends to 0 (``docs/design.md``).

    ABKD's code (distillm ``losses.py::ab_div``) masks non-finite log-ratios to 0 in its special cases; fastkd
    computes the exact value: ``+inf`` where a class has mass on one side only and the divergence is infinite
    there (e.g. ``alpha < 0`` and ``p_c = 0``), a class with ``p_c = q_c = 0`` adds 0. Gradient (``x = s / T``):
    ``dL/dx_c = G_c - q_c sum G`` with ``G_c = q dsoft/dq = -q^s phi_alpha(d)``; the teacher's with
    ``H_c = -p^s phi_beta(-d)``.
""" + _DETAIL

renyi_loss.__doc__ = """Renyi divergence of order ``r = order`` (> 0), per row::

        D_r(p || q) = log(sum_c p_c^r q_c^(1 - r)) / (r - 1)      (reverse=True: D_r(q || p))

    ``r -> 1`` is ``KL(p || q)`` (reversed ``KL(q || p)``), ``r = 0.5`` is ``-2 log(sum sqrt(p q))``. Evaluated as
    ``-U log1p(c U) / (c U)``, ``c = 1 - r``, ``U = sum_c p_c phi_c(log q_c - log p_c)``: no cancellation near
    ``r = 1``. Student gradient (``x = s / T``): ``dL/dx_c = q_c - w_c``, ``w_c = p^r q^(1 - r) / sum p^r q^(1 - r)``;
    teacher ``dL/dy_c = -r p_c (phi_c(log q_c - log p_c) - U) / S``. ``U`` is a row sum the gradients need, so the
    fused kernels take three passes (statistics, ``U``, gradients). Where ``q_c = 0 < p_c`` the divergence is
    ``+inf`` for ``r >= 1``.
""" + _DETAIL
