"""The language-model divergences: reverse KL, generalised JSD, skew KL, TVD (issue 10).

Public functionals (re-exported as ``fastkd.*`` and ``fastkd.functional.*``)::

    reverse_kl_loss(s, t, *, temperature=1.0, reduction="batchmean", target=None, ignore_index=-100,
                    sample_weight=None, ce_weight=0.0, return_parts=False, backend="auto")
    jsd_loss(s, t, *, beta=0.5, ...same...)
    skew_kl_loss(s, t, *, skew=0.1, reverse=False, ...same...)
    tvd_loss(s, t, *, ...same...)

``t`` is dense teacher logits or a ``fastkd.TopKTeacher``. With
``p = softmax(t / T)`` (teacher), ``q = softmax(s / T)`` (student), per row
(formulas and numerics: ``fastkd._reference_divergence``, re-exported by
``fastkd.reference``). None of these multiplies by ``T^2`` (as TRL, Liger and
DistiLLM); ``kd_loss`` keeps Hinton's ``T^2``.

Backends: only ``"reference"`` implements this family so far. ``"auto"`` runs it
without the fallback warning (nothing is missing from this installation: no
fused kernel exists yet); an explicit ``"cpu"``, ``"cuda"`` or ``"triton"``
raises the standard "unavailable ... no <loss> kernel yet" ``ValueError``. When
the fused row op ``divergence_fwd`` lands (contract in ``docs/design.md``), its
losses join ``_backend.LOSS_OPS`` and ``_backend_for`` becomes ``_backend.resolve``.
"""
from typing import Optional, Union

import torch

from . import _reference_divergence as R
from ._backend import BACKENDS, unavailable_reason
from ._reference_divergence import LossParts
from .topk import TopKTeacher

__all__ = ["reverse_kl_loss", "jsd_loss", "skew_kl_loss", "tvd_loss", "LossParts", "TopKTeacher"]

# The fused row op these losses will run on (one op for the whole family, a divergence switch).
FUSED_OP = "divergence_fwd"

Teacher = Union[torch.Tensor, TopKTeacher]


def _backend_for(loss: str, backend, student: torch.Tensor) -> str:
    """The backend that runs ``loss``: the reference for now (see the module docstring)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("auto", "reference"):
        return "reference"
    # Same message as _backend.resolve for a fused backend without the loss's op.
    reason = unavailable_reason(backend, None, student.device)
    if reason is None:
        missing = "" if backend == "triton" else f" (missing fastkd::{FUSED_OP})"
        reason = f"backend '{backend}' has no {loss} kernel yet{missing}"
    raise ValueError(f"backend '{backend}' is unavailable for {loss}: {reason}")


def _loss_name(base: str, teacher) -> str:
    return f"{base} with a TopKTeacher" if isinstance(teacher, TopKTeacher) else base


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    backend: str = "auto",
):
    R.check_args(student_logits, teacher_logits, temperature, reduction, target, ignore_index, sample_weight,
                 ce_weight, return_parts)
    _backend_for(_loss_name("reverse_kl", teacher_logits), backend, student_logits)
    return R._compute(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                      sample_weight, ce_weight, return_parts, "reverse_kl")


def jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    backend: str = "auto",
):
    R._check_unit("beta", beta)
    R.check_args(student_logits, teacher_logits, temperature, reduction, target, ignore_index, sample_weight,
                 ce_weight, return_parts)
    _backend_for(_loss_name("jsd", teacher_logits), backend, student_logits)
    return R._compute(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                      sample_weight, ce_weight, return_parts, "jsd", beta=beta)


def skew_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    skew: float = 0.1,
    reverse: bool = False,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    backend: str = "auto",
):
    R.check_skew_args(skew, reverse)
    R.check_args(student_logits, teacher_logits, temperature, reduction, target, ignore_index, sample_weight,
                 ce_weight, return_parts)
    _backend_for(_loss_name("skew_kl", teacher_logits), backend, student_logits)
    return R._compute(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                      sample_weight, ce_weight, return_parts, "skew_kl", skew=skew, reverse=reverse)


def tvd_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    backend: str = "auto",
):
    R.check_args(student_logits, teacher_logits, temperature, reduction, target, ignore_index, sample_weight,
                 ce_weight, return_parts)
    _backend_for(_loss_name("tvd", teacher_logits), backend, student_logits)
    return R._compute(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                      sample_weight, ce_weight, return_parts, "tvd")


def kd_topk_loss(student_logits, teacher: TopKTeacher, temperature=4.0, *, reduction="batchmean", target=None,
                 ignore_index=-100, sample_weight=None, backend="auto"):
    """``fastkd.kd_loss`` with a ``TopKTeacher`` (it routes here): ``T^2 * KL(p || q)`` over the buckets."""
    R.check_args(student_logits, teacher, temperature, reduction, target, ignore_index, sample_weight,
                 0.0, False, temperature_tensor=True)
    _backend_for("kd with a TopKTeacher", backend, student_logits)
    return R._compute(student_logits, teacher, temperature, reduction, target, ignore_index, sample_weight,
                      0.0, False, "forward_kl", scale_t2=True)


_DETAIL = """
    ``t``: teacher logits ``[..., V]`` (same shape as ``s``) or a ``fastkd.TopKTeacher``
    (``[..., K]`` ids and log-probs taken as given; ``temperature`` then divides the
    student only, and the divergence is over its K + 1 buckets, or K renormalised).

    No ``T^2`` factor (as TRL, Liger and DistiLLM; ``kd_loss`` keeps Hinton's ``T^2``).

    Rows, reduction, skipped rows: as ``kd_loss``. Leading dims are flattened into
    rows; ``"batchmean"`` divides by the counted rows over all leading dims (TRL's
    ``batchmean`` divides by the label != -100 count with labels, but by dim 0 only
    without them); ``"sum"``; ``"mean"`` divides by counted rows * V; ``"none"``
    returns the weighted per-row losses in the leading shape. A row whose target is
    ``ignore_index`` or whose ``sample_weight`` is exactly 0 is never read (loss 0,
    gradient 0, even with NaN logits). Terms with probability 0 on either side
    (``-inf`` logits: masked vocabulary) add exactly 0; NaN inputs propagate.

    ``ce_weight``: adds ``ce_weight * cross_entropy(s, target)`` (student logits at
    T = 1) with the same reduction, ``ignore_index`` and ``sample_weight``
    (``ValueError`` without ``target``). ``return_parts=True`` returns
    ``LossParts(loss, soft, hard)``, ``soft`` and ``hard`` detached, in the loss's
    dtype (float32; float64 for float64 inputs); ``hard`` is the unweighted CE
    (0 without a target).

    Gradients reach the student and, where it requires grad, the teacher (dense
    logits or ``TopKTeacher.logprobs``). float64 inputs are computed in float64.
"""

reverse_kl_loss.__doc__ = """Reverse KL, per row ``KL(q || p) = sum_c q_c (log q_c - log p_c)``.

    Mode-seeking (MiniLLM; GKD with beta = 1; TRL ``DistillationConfig``'s default).
    torchtune's ``ReverseKLLoss`` computes the same KL divided by the count of
    labels != ignore_index (``reduction="batchmean"`` with ``target`` here), but
    drops every term where either logit is +-inf; here a class the teacher masks
    (``p = 0``) while the student gives it mass makes the loss +inf, as the KL is.
""" + _DETAIL

jsd_loss.__doc__ = """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024), per row::

        m = beta * p + (1 - beta) * q
        loss = beta * KL(p || m) + (1 - beta) * KL(q || m)

    exactly as TRL's ``GKDTrainer.generalized_jsd_loss`` and Liger's ``LigerJSD``,
    including their special cases ``beta == 0`` -> ``KL(p || q)`` and ``beta == 1``
    -> ``KL(q || p)`` (the formula's limit there is 0). ``log m`` is formed in log
    space, ``logaddexp(log p + log beta, log q + log(1 - beta))``: no NaN where the
    value is finite, whatever the log-probs (Liger's JSD gives NaN when both fall
    below about -104). ``beta`` must be in [0, 1].
""" + _DETAIL

skew_kl_loss.__doc__ = """Skew KL (DistiLLM, Ko et al. 2024), per row::

        reverse=False:  KL(p || skew * p + (1 - skew) * q)
        reverse=True:   KL(q || (1 - skew) * p + skew * q)

    ``skew`` is DistiLLM's lambda (default 0.1, in [0, 1]; 0 gives the plain
    forward / reverse KL). fastkd returns the KL itself: DistiLLM's
    ``skewed_forward_kl`` returns ``-sum p log m`` (the teacher entropy omitted:
    same gradient to the student, value larger by ``H(p)``); its
    ``skewed_reverse_kl`` is this KL.
""" + _DETAIL

tvd_loss.__doc__ = """Total variation distance, per row ``0.5 * sum_c |p_c - q_c|`` (DistiLLM's ``tv_distance``).

    Liger's ``LigerTVDLoss`` takes probabilities; this takes logits. Where
    ``p_c == q_c`` the subgradient used is 0.
""" + _DETAIL
