"""The classification losses (KD, DKD, ATS, DIST, MGD): check, pick a backend, run it.

Each functional checks its arguments once (``fastkd.core.checks``: ``ValueError`` /
``TypeError`` naming the argument), flattens logits ``[..., C]`` into rows ``[N, C]``,
builds the per-row weights that carry ``ignore_index``, ``sample_weight`` and the
reduction (``docs/design.md``), and runs the fused row op of the chosen backend, or
the reference's computation (``fastkd.reference.classification``) for
``backend="reference"``. Formulas: see each function's docstring in
``fastkd.reference``; every backend computes the same quantity, in float32, and returns
a float32 loss. With ``process_group`` the loss is ``fastkd.distributed``'s.
"""
from typing import Callable, Optional, Union

import torch

from ..core import checks as v
from ..core import mask as _mask
from ..core.divergence import LossParts
from ..core.mixture import TeacherMixture
from ..core.rows import gapped_period, row_view, row_weights, temperature_rows, wants_grad
from ..core.topk import TopKTeacher
from ..core.vocab import MappedTeacher
from ..dispatch.backend import implementation, resolve
from ..reference import classification as reference
from . import divergence as _divergence

__all__ = ["kd_loss", "dkd_loss", "ats_loss", "dist_loss", "mgd_loss"]


def _reject_topk(loss: str, teacher) -> None:
    if isinstance(teacher, TopKTeacher):
        raise TypeError(
            f"{loss} needs dense teacher logits (its formula uses the teacher's whole distribution); "
            "a fastkd.TopKTeacher works with kd_loss, reverse_kl_loss, jsd_loss, skew_kl_loss and tvd_loss"
        )


def _finish(loss: torch.Tensor, reduction: str, student: torch.Tensor) -> torch.Tensor:
    return loss.reshape(student.shape[:-1]) if reduction == "none" else loss


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: Union[float, torch.Tensor] = 4.0,
    *,
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
    """Vanilla KD (Hinton et al. 2015), per row::

        loss_i = T^2 * sum_c p_t[c] * (log p_t[c] - log p_s[c]),  p = softmax(logits / T)

    reduced by ``reduction`` ("batchmean": sum / counted rows; "sum"; "mean": sum /
    (counted rows * C); "none": per-row losses shaped like the leading dims).
    ``temperature`` may be a float or a tensor (one element, or one per row) that
    receives a gradient (CTKD). ``target`` is only used to skip rows equal to
    ``ignore_index``; ``sample_weight`` (one per row) multiplies each row's loss.

    Skipped rows: a row whose target is ``ignore_index`` or whose sample weight is
    exactly 0 is not read, on every backend: loss 0 and gradient 0 even if its
    logits are NaN or inf (unlike ``0 * nan = nan`` in plain torch). This is the
    rule of every logit loss here (``ats_loss``, ``dkd_loss`` too).

    Values are checked on CPU tensors (target in range, tensor temperature > 0);
    on GPU tensors that would synchronise every step, so they are not checked
    unless ``fastkd.set_value_checks(True)``: a counted row with an out-of-range
    target gives a NaN loss and NaN gradients there.

    ``teacher_logits`` may be a ``fastkd.TopKTeacher`` (top-k teacher log-probs,
    taken as given: ``temperature`` divides the student only, ``T^2`` is kept).
    ``teacher_temperature`` (a float; default ``temperature``): ``p_t = softmax(teacher_logits /
    teacher_temperature)``, the student's at ``temperature``, the factor ``temperature^2`` (as the fused
    head); dense logits run block by block on ``divergence_fwd`` (``fastkd.forward_kl_loss``'s
    ``teacher_temperature``). Not with a tensor temperature, a ``TopKTeacher`` or ``process_group``.
    It may also be a ``fastkd.TeacherMixture`` of dense logits (``p`` the members' arithmetic or
    geometric mixture at ``teacher_temperature``, default ``temperature``, formed one block of rows at
    a time; a float temperature, no ``process_group``).

    ``ce_weight`` adds ``ce_weight * cross_entropy(student_logits, target)`` (raw
    logits, T = 1; same reduction, ``ignore_index`` and ``sample_weight``; needs
    ``target``), computed in the same pass over the logits as the KL when the
    temperature is a number (a tensor temperature takes a second pass).
    ``return_parts=True`` returns ``LossParts(loss, soft, hard)``: the reduced KD
    term (with ``T^2``) and the unweighted reduced cross-entropy, both detached.

    ``teacher_vocab``: dense teacher logits wider than the student's (``V_t > V``): ``"truncate"``
    (default) drops the teacher's columns past ``V``, ``"mask"`` gives the student ``-inf`` there
    (then KD is infinite where the teacher puts mass past ``V``); see ``fastkd.forward_kl_loss``.

    ``process_group`` (``torch.distributed``): the last dim of the logits is this
    rank's contiguous vocabulary shard (Megatron layout; ``target`` and top-k ids are
    global ids); the loss is that of the whole vocabulary, on every rank, with O(rows)
    communication (``fastkd.distributed``; a tensor temperature with dense teacher logits only).
    """
    if teacher_temperature is not None:
        if isinstance(temperature, torch.Tensor):
            raise TypeError("kd_loss's teacher_temperature needs a float temperature (a tensor temperature, CTKD, "
                            "scales both sides)")
        v.check_positive("teacher_temperature", teacher_temperature)
        if float(teacher_temperature) == float(temperature):
            teacher_temperature = None  # one temperature: the plain path
    if isinstance(teacher_logits, (TeacherMixture, MappedTeacher)) or teacher_temperature is not None:
        # several teachers, another tokenizer's teacher, or the teacher at its own temperature: forward KL at
        # T, times T^2, on the divergences' path (fastkd/losses/teacher_blocks.py)
        if isinstance(temperature, torch.Tensor):
            raise TypeError(f"kd_loss with a {type(teacher_logits).__name__} takes a float temperature")
        return _divergence._divergence_loss(
            "forward_kl", {}, student_logits, teacher_logits, temperature, reduction, target, ignore_index,
            sample_weight, ce_weight, return_parts, process_group, backend, teacher_vocab, teacher_temperature,
            scale_t2=True)
    if process_group is None:
        student_logits, teacher_logits = _divergence.align_teacher_vocab(student_logits, teacher_logits,
                                                                         teacher_vocab)
    if process_group is not None:
        return _divergence.sharded(
            "kd_loss", backend, student_logits, teacher_logits, temperature, process_group=process_group,
            reduction=reduction, target=target, ignore_index=ignore_index, sample_weight=sample_weight,
            ce_weight=ce_weight, return_parts=return_parts,
        )
    if isinstance(teacher_logits, TopKTeacher):  # top-k teacher: fastkd/losses/divergence.py
        return _divergence.kd_topk_loss(
            student_logits, teacher_logits, temperature, reduction=reduction, target=target,
            ignore_index=ignore_index, sample_weight=sample_weight, ce_weight=ce_weight,
            return_parts=return_parts, backend=backend,
        )
    v.check_kd_args(student_logits, teacher_logits, temperature, reduction, target, ignore_index, sample_weight,
                    ce_weight, return_parts)
    with_ce = ce_weight != 0 or return_parts
    # shifted [B, S - 1, V] views run copy-free on divergence_fwd (forward KL, T^2), where kd_fwd would copy
    shifted = not isinstance(temperature, torch.Tensor) and gapped_period(student_logits, teacher_logits)
    name = resolve("kd+ce" if with_ce or shifted else "kd", backend, student_logits, teacher_logits)
    if name == "reference":
        return reference.compute_kd(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                                    sample_weight, ce_weight, return_parts)
    fused_in_one_pass = with_ce or (shifted and name in _divergence.ROW_STRIDED_BACKENDS)
    if fused_in_one_pass and not isinstance(temperature, torch.Tensor):  # KL (and CE) in one pass
        return _divergence.fused_call(
            name, student_logits, teacher_logits, temperature=temperature, reduction=reduction, target=target,
            ignore_index=ignore_index, sample_weight=sample_weight, ce_weight=ce_weight,
            return_parts=return_parts, kind="forward_kl", soft_scale=float(temperature) ** 2,
        )
    v.check_constant_weight(sample_weight, name)
    s, t = row_view(student_logits), row_view(teacher_logits)
    weight = row_weights(student_logits, target, ignore_index, sample_weight, reduction)
    temp = temperature_rows(temperature, student_logits)
    loss = implementation(name).kd_fwd(
        s, t, temp, weight, reduction != "none", wants_grad(s), wants_grad(t), wants_grad(temp)
    )[0]
    return _with_ce(_finish(loss, reduction, student_logits), name, student_logits, target, ignore_index,
                    sample_weight, reduction, ce_weight, return_parts)


def _target_loss(name: str, op: str, student, teacher, target, ignore_index, sample_weight, reduction, ce_weight,
                 return_parts, *params):
    """A fused loss op with a target (``ats_fwd``, ``dkd_fwd``) on backend ``name``, plus its cross-entropy."""
    v.check_constant_weight(sample_weight, name)
    s, t = row_view(student), row_view(teacher)
    weight = row_weights(student, target, ignore_index, sample_weight, reduction)
    loss = getattr(implementation(name), op)(
        s, t, target.reshape(-1).to(torch.int64).contiguous(), weight, *(float(p) for p in params),
        reduction != "none", wants_grad(s), wants_grad(t),
    )[0]
    return _with_ce(_finish(loss, reduction, student), name, student, target, ignore_index, sample_weight,
                    reduction, ce_weight, return_parts)


def _with_ce(soft, name, student_logits, target, ignore_index, sample_weight, reduction, ce_weight, return_parts):
    """``soft`` (a fused loss) plus its cross-entropy from a CE-only pass of ``divergence_fwd``."""
    if ce_weight == 0 and not return_parts:
        return soft
    ce = _divergence.fused_call(
        name, student_logits, student_logits.detach(), temperature=1.0, reduction=reduction, target=target,
        ignore_index=ignore_index, sample_weight=sample_weight, ce_weight=ce_weight, return_parts=True, kind="ce",
    )
    loss = soft + ce.loss if ce_weight != 0 else soft
    return LossParts(loss, soft.detach(), ce.hard) if return_parts else loss


def ats_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    target_temperature: float = 4.0,
    other_temperature: float = 2.0,
    student_temperature: float = 1.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    process_group=None,
    backend: str = "auto",
):
    """ATS, asymmetric temperature scaling (Li et al. 2022), KL form, per row::

        q_c    = softmax(t / tau_c),  tau_c = target_temperature if c == target else other_temperature
        loss_i = s^2 * KL(q || softmax(student / s)),  s = student_temperature

    (the official soft cross-entropy minus the teacher entropy: same gradient).
    ``ce_weight`` / ``return_parts``: as ``kd_loss`` (the cross-entropy is a second
    pass over the student logits here). ``process_group``: vocabulary-sharded logits,
    as ``kd_loss`` (``ce_weight`` / ``return_parts`` included).
    """
    _reject_topk("ats_loss", teacher_logits)
    if process_group is not None:
        return _divergence.sharded(
            "ats_loss", backend, student_logits, teacher_logits, target, process_group=process_group,
            target_temperature=target_temperature, other_temperature=other_temperature,
            student_temperature=student_temperature, reduction=reduction, ignore_index=ignore_index,
            sample_weight=sample_weight, ce_weight=ce_weight, return_parts=return_parts,
        )
    v.check_ats_args(student_logits, teacher_logits, target, target_temperature, other_temperature,
                     student_temperature, reduction, ignore_index, sample_weight, ce_weight, return_parts)
    name = resolve("ats+ce" if ce_weight != 0 or return_parts else "ats", backend, student_logits, teacher_logits)
    if name == "reference":
        return reference.compute_ats(student_logits, teacher_logits, target, target_temperature, other_temperature,
                                     student_temperature, reduction, ignore_index, sample_weight, ce_weight,
                                     return_parts)
    return _target_loss(name, "ats_fwd", student_logits, teacher_logits, target, ignore_index, sample_weight,
                        reduction, ce_weight, return_parts, student_temperature, target_temperature,
                        other_temperature)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "batchmean",
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    process_group=None,
    backend: str = "auto",
):
    """DKD, decoupled KD (Zhao et al. 2022), per row::

        loss_i = alpha * TCKD_i + beta * NCKD_i
        TCKD_i = T^2 * KL([p_t[g], 1 - p_t[g]] || [p_s[g], 1 - p_s[g]])
        NCKD_i = T^2 * KL(softmax(t / T over c != g) || softmax(s / T over c != g))

    with ``g = target``, ``log(1 - p[g])`` computed stably as
    ``lse(x / T over c != g) - lse(x / T)``. ``ce_weight`` / ``return_parts``: as
    ``kd_loss`` (the cross-entropy is a second pass over the student logits here;
    mdistiller adds its CE outside the loss, with weight 1). ``process_group``:
    vocabulary-sharded logits, as ``kd_loss`` (``ce_weight`` / ``return_parts`` included).
    """
    _reject_topk("dkd_loss", teacher_logits)
    if process_group is not None:
        return _divergence.sharded(
            "dkd_loss", backend, student_logits, teacher_logits, target, process_group=process_group, alpha=alpha,
            beta=beta, temperature=temperature, reduction=reduction, ignore_index=ignore_index,
            sample_weight=sample_weight, ce_weight=ce_weight, return_parts=return_parts,
        )
    v.check_dkd_args(student_logits, teacher_logits, target, alpha, beta, temperature, reduction, ignore_index,
                     sample_weight, ce_weight, return_parts)
    name = resolve("dkd+ce" if ce_weight != 0 or return_parts else "dkd", backend, student_logits, teacher_logits)
    if name == "reference":
        return reference.compute_dkd(student_logits, teacher_logits, target, alpha, beta, temperature, reduction,
                                     ignore_index, sample_weight, ce_weight, return_parts)
    return _target_loss(name, "dkd_fwd", student_logits, teacher_logits, target, ignore_index, sample_weight,
                        reduction, ce_weight, return_parts, alpha, beta, temperature)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    process_group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """DIST (Huang et al. 2022) on the whole [N, C] batch::

        y = softmax(logits / tau),  rho(a, b) = cov(a, b) / (std(a) std(b) + 1e-8)  (sums, not means)
        inter = tau^2 * (1 - mean_i rho(y_s[i, :], y_t[i, :]))
        intra = tau^2 * (1 - mean_c rho(y_s[:, c], y_t[:, c]))
        loss  = beta * inter + gamma * intra

    What it does not do: no ``ignore_index``, ``target``, ``sample_weight`` or
    ``reduction`` (the intra-class term correlates each class over all rows, so
    every row enters it; padding tokens must be removed before the call), and the
    intra-class statistics are over the local batch only (under data parallelism
    each rank correlates its own rows; it is not the loss of the global batch)
    unless ``process_group`` is given: then the rows are this rank's part of the
    global batch (any count, 0 included), the intra-class statistics are all-reduced
    per-class moments, and the loss is that of the concatenated batch on every rank.
    Its backward all-reduces too, so under DDP (which averages gradients over ranks)
    each parameter gets exactly the single-process gradient (``fastkd.distributed``).
    """
    _reject_topk("dist_loss", teacher_logits)
    if process_group is not None:
        return _divergence.sharded("dist_loss", backend, student_logits, teacher_logits,
                                   process_group=process_group, beta=beta, gamma=gamma, temperature=temperature)
    v.check_dist_args(student_logits, teacher_logits, beta, gamma, temperature)
    name = resolve("dist", backend, student_logits, teacher_logits)
    if name == "reference":
        return reference.compute_dist(student_logits, teacher_logits, beta, gamma, temperature)
    s, t = row_view(student_logits), row_view(teacher_logits)
    return implementation(name).dist_fwd(
        s, t, float(beta), float(gamma), float(temperature), wants_grad(s), wants_grad(t)
    )[0]


def mgd_loss(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    generation: Callable[[torch.Tensor], torch.Tensor],
    *,
    align: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    alpha: float = 7e-5,
    mask_ratio: float = 0.15,
    mask_type: str = "channel",
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """MGD, masked generative distillation (Yang et al. 2022)::

        loss = alpha * sum((generation(align(student) * M) - teacher)^2) / N

    ``M`` drops whole channels (``mask_type="channel"``, shape (N, C, 1, 1)) or
    positions (``"spatial"``, (N, 1, H, W)) with probability ``mask_ratio``; it is
    generated from a seed drawn from ``generator`` (``fastkd.core.mask``), identically
    on every backend, or from ``seed`` (an int in ``[0, 2^63)``) when given: drawing reads a
    tensor on the host, so under ``torch.compile(fullgraph=True)`` pass ``seed``. The fused
    backends apply the mask and the squared error in kernels; ``align`` and ``generation``
    are ordinary modules (cuDNN convolutions).
    """
    v.mgd_check_args(student_feat, teacher_feat, generation, align, alpha, mask_ratio, mask_type, generator)
    name = resolve("mgd", backend, student_feat, teacher_feat)
    if seed is None:  # a host read of a drawn tensor: under torch.compile pass seed= for a full graph
        seed = _mask.draw_seed(generator)
    else:
        v.check_seed(seed)
    if name == "reference":
        return reference.mgd_loss(
            student_feat, teacher_feat, generation, align=align, alpha=alpha, mask_ratio=mask_ratio,
            mask_type=mask_type, seed=seed,
        )
    impl = implementation(name)
    x = align(student_feat) if align is not None else student_feat
    v.mgd_check_aligned(x, teacher_feat, align is not None)
    masked = impl.mgd_mask(x.contiguous(), seed, float(mask_ratio), mask_type == "spatial")
    pred = generation(masked)
    v.mgd_check_generated(pred, teacher_feat)
    pred, teacher = pred.contiguous(), teacher_feat.contiguous()
    scale = float(alpha) / max(teacher_feat.shape[0], 1)
    return impl.mgd_sq_err(pred, teacher, scale, wants_grad(pred), wants_grad(teacher))[0]
