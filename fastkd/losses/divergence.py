"""The language-model divergences: forward and reverse KL, generalised JSD, skew KL, TVD, Jeffreys, triangular,
entropy-gated KL, adaptive KL (AKL); Jeffreys, the entropy-gated KL and AKL live in ``losses/two_sided.py``,
the power divergences (Amari's alpha, AB, Renyi) in ``losses/power.py``, all on this module's ``_divergence_loss``.

Public functionals (re-exported as ``fastkd.*`` and ``fastkd.functional.*``)::

    forward_kl_loss(s, t, *, temperature=1.0, ...same...)
    reverse_kl_loss(s, t, *, temperature=1.0, reduction="batchmean", target=None, ignore_index=-100,
                    sample_weight=None, ce_weight=0.0, return_parts=False, process_group=None, backend="auto")
    jsd_loss(s, t, *, beta=0.5, ...same...)
    skew_kl_loss(s, t, *, skew=0.1, reverse=False, ...same...)
    tvd_loss(s, t, *, ...same...)
    jeffreys_loss(s, t, *, ...same...)
    triangular_loss(s, t, *, ...same...)
    entropy_gated_kl_loss(s, t, *, alpha_min=0.0, alpha_max=1.0, tau=0.5, scale=0.1, ...same...)
    akl_loss(s, t, *, mu=0.5, ...same...)                  (its own row op akl_fwd, dense teachers)

``t`` is dense teacher logits, a ``fastkd.TopKTeacher``, a ``fastkd.MappedTeacher`` (another
tokenizer's teacher) or a ``fastkd.TeacherMixture`` of dense logits (several teachers mixed block by
block of rows, never as an ``[N, V]`` tensor: ``fastkd.losses.teacher_blocks``; not with ``process_group``). With
``p = softmax(t / T)`` (teacher), ``q = softmax(s / T)`` (student), per row
(formulas and numerics: ``fastkd.reference.divergence``, re-exported by
``fastkd.reference``). None of these multiplies by ``T^2`` (as TRL, Liger and
DistiLLM); ``kd_loss`` keeps Hinton's ``T^2``.

Backends: the reference (plain PyTorch, autograd; float64 stays float64) and
every fused backend that has the row op ``divergence_fwd`` (``docs/design.md``):
one op for the whole family, the divergence given by its coefficients
``(a, b, w_p, w_q)`` (``fastkd.core.divergence.divergence_coefficients``),
the cross-entropy computed in the same pass over the student logits.
"""
from typing import Optional, Union

import torch

from ..core import checks as v
from ..core.checks import BACKENDS, check_constant_weight
from ..core.divergence import (
    TOPK_MODE_CODES,
    LossParts,
    check_divergence_args,
    check_divergence_params,
    divergence_op_args,
)
from ..core.rows import GappedRows, from_gapped, gapped_period, row_view, row_weights, to_gapped, wants_grad
from ..core.topk import PAD_ID, TopKTeacher
from ..core.mixture import TeacherMixture
from ..core.vocab import MappedTeacher
from ..dispatch.backend import ROW_OPS, ROW_STRIDED_BACKENDS, implementation, resolve
from ..reference import divergence as R
from .teacher_blocks import mapped_is_constant, mapped_loss, mixture_loss

__all__ = ["forward_kl_loss", "reverse_kl_loss", "jsd_loss", "skew_kl_loss", "tvd_loss", "triangular_loss", "LossParts",
           "TopKTeacher"]  # Jeffreys, the entropy-gated KL and AKL: fastkd.losses.two_sided

Teacher = Union[torch.Tensor, TopKTeacher]

_NO_IDS = torch.empty(0, dtype=torch.int64)



def fused_call(name: str, student, teacher: Teacher, *, temperature: float, reduction: str, target, ignore_index,
               sample_weight, ce_weight: float, return_parts: bool, kind: str, soft_scale: float = 1.0,
               teacher_temperature: Optional[float] = None, **params):
    """Run ``divergence_fwd`` of fused backend ``name`` on the rows of ``student`` (arguments checked).

    ``kind``: "tvd", "ce" (cross-entropy alone: ``a = b = 0``) or a KL-family kind of
    ``divergence_coefficients``; "akl" runs the row op ``akl_fwd`` (the same signature).
    ``teacher_temperature`` (dense logits): the op's own argument, ``p = softmax(t / teacher_temperature)``,
    the teacher's gradient (when it requires grad) taken at it. Returns the loss, or ``LossParts`` with
    ``return_parts``.
    """
    check_constant_weight(sample_weight, name)
    strided = name in ROW_STRIDED_BACKENDS
    topk = isinstance(teacher, TopKTeacher)
    # logits[:, :-1] of [B, S, V] (HF's shift): B S - 1 rows of one stride over the unshifted tensor,
    # the B - 1 gap rows weighted 0 (never read): no copy of the logits, none of their gradient
    period = gapped_period(student, *(() if topk else (teacher,))) if strided else None

    def per_row(x, fill):  # per-row values [..., (K)] laid out as the student's rows
        return to_gapped(x, period, fill) if period else x.reshape((-1,) + x.shape[len(lead):])

    lead = student.shape[:-1]
    s = GappedRows.apply(student, period) if period else row_view(student, strided)
    if topk:
        t, ids = row_view(per_row(teacher.logprobs, 0.0)), row_view(per_row(teacher.indices, PAD_ID))
    elif period:
        t, ids = GappedRows.apply(teacher, period), _NO_IDS.to(s.device)
    else:
        t, ids = row_view(teacher, strided), _NO_IDS.to(s.device)
    code, *coefficients = divergence_op_args(kind, **params)
    # The target costs a second log-sum-exp (T = 1): passed only when the CE is wanted.
    wants_ce = target is not None and (ce_weight != 0 or return_parts)
    tgt = per_row(target.reshape(lead).to(torch.int64), 0).contiguous() if wants_ce else _NO_IDS.to(s.device)
    weight = per_row(row_weights(student, target, ignore_index, sample_weight, reduction).reshape(lead), 0.0)
    mode = TOPK_MODE_CODES[teacher.mode if topk else None]
    row_op = ROW_OPS.get(kind, "divergence_fwd")
    # by keyword, and only when given: the op's default (0: the temperature) is the one-temperature call
    own_t = {} if teacher_temperature is None else {"teacher_temperature": float(teacher_temperature)}
    loss, soft, hard, _, _ = getattr(implementation(name), row_op)(
        s, t, ids, tgt, weight, float(temperature), code, *coefficients, float(soft_scale), float(ce_weight), mode,
        reduction != "none", wants_grad(s), wants_grad(t), **own_t,
    )
    if reduction == "none":
        if period:
            loss, soft, hard = (from_gapped(x, lead[0], lead[1], period) for x in (loss, soft, hard))
        loss, soft, hard = loss.reshape(lead), soft.reshape(lead), hard.reshape(lead)
    return LossParts(loss, soft.detach(), hard.detach()) if return_parts else loss


def sharded(name: str, backend: str, *args, **kwargs):
    """``fastkd.distributed.<name>``: the loss over a ``process_group`` (vocabulary- or data-parallel).

    The sharded losses pick their own kernels (``fastkd.distributed.SHARD_KERNELS``: shard
    kernels by device, or PyTorch on the shard), not a backend's whole-row op, so an
    explicit fused ``backend`` is refused rather than ignored.
    """
    if backend not in ("auto", "reference"):
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        raise ValueError(
            f"backend '{backend}' cannot be chosen with process_group: the sharded losses pick their own shard "
            "kernels by device (fastkd.distributed.SHARD_KERNELS); pass backend='auto' (or 'reference')"
        )
    from .. import distributed  # torch.distributed is imported only by those who use it

    return getattr(distributed, name)(*args, **kwargs)


def _dispatch(loss: str, student, teacher: Teacher, backend: str, temperature, reduction, target, ignore_index,
              sample_weight, ce_weight, return_parts, kind: str, scale_t2: bool = False,
              teacher_temperature: Optional[float] = None, **params):
    """Resolve ``loss``'s backend and run it: the reference by autograd, or ``fused_call``.
    ``teacher_temperature`` (dense logits, checked: ``None`` or different from ``temperature``): the
    fused ops take it as their argument; the reference runs at ``T`` on ``t (T / T_t)``
    (``softmax(t (T / T_t) / T) = softmax(t / T_t)``; autograd takes the teacher's gradient through the
    product), in float64 for float64 inputs: the oracle."""
    topk = isinstance(teacher, TopKTeacher)
    name = resolve(loss, backend, student, teacher.logprobs if topk else teacher)
    if name == "reference":
        if teacher_temperature is not None:
            teacher = teacher * (float(temperature) / float(teacher_temperature))
        return R.compute(student, teacher, temperature, reduction, target, ignore_index, sample_weight,
                          ce_weight, return_parts, kind, scale_t2=scale_t2, **params)
    return fused_call(name, student, teacher, temperature=temperature, reduction=reduction, target=target,
                      ignore_index=ignore_index, sample_weight=sample_weight, ce_weight=ce_weight,
                      return_parts=return_parts, kind=kind,
                      soft_scale=float(temperature) ** 2 if scale_t2 else 1.0,
                      teacher_temperature=teacher_temperature, **params)


def align_teacher_vocab(student, teacher, teacher_vocab: str):
    """Dense teacher logits wider than the student's (``V_t > V``: a head padded past the tokenizer).

    ``"truncate"``: the teacher's columns past ``V`` are dropped, so the teacher is renormalised over
    the student's vocabulary (a view, no copy). ``"mask"``: the student gets ``V_t - V`` columns of
    ``-inf`` (no mass; a copy of the student's logits). Anything else is returned as is, for the
    argument checks to judge.
    """
    v.check_teacher_vocab(teacher_vocab)
    if not (isinstance(student, torch.Tensor) and isinstance(teacher, torch.Tensor)) or min(student.dim(),
                                                                                           teacher.dim()) < 1:
        return student, teacher
    vocab, t_vocab = student.shape[-1], teacher.shape[-1]
    if t_vocab <= vocab or student.shape[:-1] != teacher.shape[:-1]:
        return student, teacher
    if teacher_vocab == "truncate":
        return student, teacher[..., :vocab]
    return torch.nn.functional.pad(student, (0, t_vocab - vocab), value=float("-inf")), teacher


def mapped_as_topk(student, teacher, temperature, process_group=None):
    """A ``MappedTeacher`` as the top-k buckets it projects onto at ``temperature``; anything else unchanged."""
    if not isinstance(teacher, MappedTeacher):
        return teacher
    if process_group is not None:
        raise ValueError("a MappedTeacher cannot be used with process_group (its projection needs the whole "
                         "student vocabulary on each rank)")
    v.check_positive("temperature", temperature)
    teacher.check_against(student)
    return teacher.as_topk(temperature)


def _divergence_loss(kind: str, params: dict, student, teacher: Teacher, temperature, reduction, target,
                     ignore_index, sample_weight, ce_weight, return_parts, process_group, backend: str,
                     teacher_vocab: str = "truncate", teacher_temperature: Optional[float] = None,
                     scale_t2: bool = False):
    """The body of every public divergence: the sharded loss with a process group, else check and dispatch
    (``kd_loss`` comes here with a mixture or a teacher temperature: forward KL times ``T^2``, ``scale_t2``)."""
    check_divergence_params(**params)
    teacher_temperature = check_teacher_temperature(teacher, temperature, teacher_temperature, process_group)
    if isinstance(teacher, TeacherMixture):
        if process_group is not None:
            raise ValueError("a TeacherMixture cannot be used with process_group (the sharded losses take one "
                             "teacher's logits)")
        return mixture_loss(kind, params, student, teacher, temperature, reduction, target, ignore_index,
                            sample_weight, ce_weight, return_parts, backend, kind, teacher_vocab,
                            _soft_scale(temperature, scale_t2), teacher_temperature)
    if isinstance(teacher, MappedTeacher) and process_group is None and mapped_is_constant(teacher):
        check_divergence_args(student, teacher, temperature, reduction, target, ignore_index, sample_weight,
                              ce_weight, return_parts)
        hidden = teacher.teacher if isinstance(teacher.teacher, torch.Tensor) else teacher.teacher[0]
        name = resolve(kind, backend, student, hidden)
        if name != "reference":  # projected block by block (the reference projects the whole teacher: the oracle)
            return mapped_loss(kind, params, student, teacher, temperature, teacher_temperature, reduction, target,
                               ignore_index, sample_weight, ce_weight, return_parts, name,
                               _soft_scale(temperature, scale_t2))
    teacher = mapped_as_topk(student, teacher, temperature if teacher_temperature is None else teacher_temperature,
                             process_group)
    if process_group is None:
        student, teacher = align_teacher_vocab(student, teacher, teacher_vocab)
    if process_group is not None:
        return sharded(f"{kind}_loss", backend, student, teacher, process_group=process_group, **params,
                       temperature=temperature, reduction=reduction, target=target, ignore_index=ignore_index,
                       sample_weight=sample_weight, ce_weight=ce_weight, return_parts=return_parts)
    check_divergence_args(student, teacher, temperature, reduction, target, ignore_index, sample_weight, ce_weight,
                          return_parts)
    # dense logits at their own temperature (a TopKTeacher was refused, a MappedTeacher projected at it)
    own_t = teacher_temperature if not isinstance(teacher, TopKTeacher) else None
    return _dispatch(kind, student, teacher, backend, temperature, reduction, target, ignore_index, sample_weight,
                     ce_weight, return_parts, kind, scale_t2=scale_t2, teacher_temperature=own_t, **params)


def _soft_scale(temperature, scale_t2: bool) -> float:
    return float(temperature) ** 2 if scale_t2 else 1.0


def check_teacher_temperature(teacher, temperature, teacher_temperature, process_group) -> Optional[float]:
    """``teacher_temperature`` checked: ``None`` where it equals ``temperature`` (the one-temperature
    path), else the float; refused with a ``TopKTeacher`` (its log-probs are taken as given) and with
    ``process_group``."""
    if teacher_temperature is None:
        return None
    v.check_positive("teacher_temperature", teacher_temperature)
    v.check_positive("temperature", temperature)
    if float(teacher_temperature) == float(temperature):
        return None
    if isinstance(teacher, TopKTeacher):
        raise ValueError("teacher_temperature does not apply to a TopKTeacher: its log-probs are taken as given "
                         "(build the top-k at the teacher's temperature: fastkd.teacher_topk(..., temperature=))")
    if process_group is not None:
        raise ValueError("teacher_temperature different from temperature is not supported with process_group yet")
    return float(teacher_temperature)


def forward_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
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
    params = {}
    return _divergence_loss("forward_kl", params, student_logits, teacher_logits, temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
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
    params = {}
    return _divergence_loss("reverse_kl", params, student_logits, teacher_logits, temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)


def jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    beta: float = 0.5,
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
    params = {"beta": beta}
    return _divergence_loss("jsd", params, student_logits, teacher_logits, temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)


def skew_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    skew: float = 0.1,
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
    params = {"skew": skew, "reverse": reverse}
    return _divergence_loss("skew_kl", params, student_logits, teacher_logits, temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)


def tvd_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
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
    params = {}
    return _divergence_loss("tvd", params, student_logits, teacher_logits, temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)


def triangular_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
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
    params = {}
    return _divergence_loss("triangular", params, student_logits, teacher_logits, temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)


def kd_topk_loss(student_logits, teacher: TopKTeacher, temperature=4.0, *, reduction="batchmean", target=None,
                 ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False, backend="auto"):
    """``fastkd.kd_loss`` with a ``TopKTeacher`` (it routes here): ``T^2 * KL(p || q)`` over the buckets.

    A tensor temperature (CTKD) is supported by the reference only: ``"auto"`` runs
    the reference then, an explicit fused backend raises.
    """
    check_divergence_args(student_logits, teacher, temperature, reduction, target, ignore_index, sample_weight,
                          ce_weight, return_parts, temperature_tensor=True)
    if isinstance(temperature, torch.Tensor):
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend not in ("auto", "reference"):
            raise ValueError(
                f"backend '{backend}' takes a float temperature with a TopKTeacher; a tensor temperature "
                "(learned, CTKD) runs on backend='reference' (or 'auto')"
            )
        backend = "reference"
    return _dispatch("kd_topk", student_logits, teacher, backend, temperature, reduction, target, ignore_index,
                     sample_weight, ce_weight, return_parts, "forward_kl", scale_t2=True)


_DETAIL = """
    ``t``: teacher logits ``[..., V]`` (same shape as ``s``) or a ``fastkd.TopKTeacher``
    (``[..., K]`` ids and log-probs taken as given; ``temperature`` then divides the
    student only, and the divergence is over its K + 1 buckets, or K renormalised), or a
    ``fastkd.MappedTeacher`` (a teacher with another tokenizer: ``softmax(t / T)`` summed onto the
    matched student tokens, then as a ``TopKTeacher`` over them).

    No ``T^2`` factor (as TRL, Liger and DistiLLM; ``kd_loss`` keeps Hinton's ``T^2``).

    ``teacher_temperature`` (default: ``temperature``): ``p = softmax(t / teacher_temperature)`` while
    ``q = softmax(s / temperature)``. For dense logits the fused row op takes it as an argument (one
    call, no copy of the teacher, the same passes as one temperature), and a teacher that requires grad
    gets its gradient at ``T_t``; a ``MappedTeacher`` is projected, a ``TeacherMixture``'s members are
    mixed, at ``T_t`` (block by block of rows: ``fastkd.losses.teacher_blocks``). Not with a ``TopKTeacher`` (its
    log-probs are taken as given: build it at the teacher's temperature) nor ``process_group``.

    ``teacher_vocab``: what dense teacher logits wider than the student's (``V_t > V``, a teacher
    head padded past the tokenizer, as Qwen2.5's 152064 rows for 151665 tokens) mean. ``"truncate"``
    (default) drops the teacher's columns past ``V`` and renormalises it over the first ``V``: every
    divergence is then over the shared vocabulary (the padding rows of a head carry no real token).
    ``"mask"`` keeps the teacher whole and gives the student ``-inf`` on the missing columns: forward
    KL, JSD-style mixtures' ``p`` side and skew KL are then infinite (or grow) wherever the teacher
    puts mass past ``V``, reverse KL ignores that mass, TVD counts it; ``"mean"`` divides by
    ``V_t``. Ignored with ``process_group`` (shards are equally wide).

    Rows, reduction, skipped rows: as ``kd_loss``. Leading dims are flattened into
    rows; ``"batchmean"`` divides by the counted rows over all leading dims, as TRL's
    ``DistillationTrainer`` divides by its valid tokens (``size(0) * size(1)`` without a
    mask; checked against TRL 1.16; its older GKD ``generalized_jsd_loss`` divides by
    ``size(0)`` alone when it gets no labels); ``"sum"``; ``"mean"`` divides by counted rows * V; ``"none"``
    returns the weighted per-row losses in the leading shape. A row whose target is
    ``ignore_index`` or whose ``sample_weight`` is exactly 0 is never read (loss 0,
    gradient 0, even with NaN logits). Terms with probability 0 on either side
    (``-inf`` logits: masked vocabulary) add exactly 0; NaN inputs propagate.

    ``process_group``: the last dim of the logits is this rank's contiguous vocabulary
    shard (Megatron layout; ``target`` and top-k ids global): see ``fastkd.distributed``.

    ``ce_weight``: adds ``ce_weight * cross_entropy(s, target)`` (student logits at
    T = 1) with the same reduction, ``ignore_index`` and ``sample_weight``
    (``ValueError`` without ``target``). ``return_parts=True`` returns
    ``LossParts(loss, soft, hard)``, ``soft`` and ``hard`` detached, in the loss's
    dtype (float32; float64 for float64 inputs); ``hard`` is the unweighted CE
    (0 without a target).

    Gradients reach the student and, where it requires grad, the teacher (dense
    logits or ``TopKTeacher.logprobs``). float64 inputs are computed in float64.
"""

forward_kl_loss.__doc__ = """Forward KL, per row ``KL(p || q) = sum_c p_c (log p_c - log q_c)``.

    Mode-covering: the divergence of Hinton's KD without its ``T^2`` factor (``kd_loss``
    keeps it), as TRL's ``DistillationTrainer`` and GKD with ``beta = 0``, Liger's
    ``LigerFusedLinearJSDLoss(beta=0)`` and torchtune's ``ForwardKLLoss`` compute it
    (torchtune divides by the count of labels != ignore_index: ``reduction="batchmean"``
    with ``target`` here). A class the student masks (``q = 0``) while the teacher gives it
    mass makes the loss +inf, as the KL is.
""" + _DETAIL

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

triangular_loss.__doc__ = """Triangular discrimination (Le Cam), per row::

        sum_c (p_c - q_c)^2 / (p_c + q_c)

    A symmetric, bounded (``[0, 2]``) divergence: ``2 (1 - sum 2 p q / (p + q))``, within a
    factor 2 of the squared Hellinger distance. Classes with ``p_c + q_c = 0`` (both nets
    mask them) add exactly 0. Evaluated as ``(p - q) d``, ``d = (p - q) / (p + q)`` in
    ``[-1, 1]``, so tiny probabilities neither underflow to 0 / 0 nor lose digits.
    Gradient (``x = s / T``): ``dL/dx_c = G_c - q_c sum G`` with ``G_c = -4 q_c v_c^2``,
    ``v = p / (p + q)`` (the derivative of the ``-4 p q / (p + q)`` part: no cancellation on
    peaked rows); teacher ``H_c = -4 p_c u_c^2``, ``u = q / (p + q)``.
""" + _DETAIL
