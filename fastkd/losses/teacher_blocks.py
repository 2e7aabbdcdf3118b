"""Teachers formed one block of rows at a time for the logit losses (every divergence and ``kd_loss``):
a ``fastkd.TeacherMixture`` of dense logits, and a constant ``fastkd.MappedTeacher`` (another tokenizer's).

Both hand the fused backend's row op a teacher per block of rows:

- mixture (``fastkd.core.mixture``: arithmetic ``sum_i w_i p_i`` or geometric ``prod_i p_i^(w_i) / Z``
  of ``p_i = softmax(t_i / T_t)``): float32 logits ``T log p``, formed in float32 log space, whose
  ``softmax(. / T)`` is the mixture. The members are constants: no gradient reaches them (as in
  ``fused_linear_kd_loss``).
- mapped teacher: the block's teacher log-probs at ``T_t`` projected onto the matched student ids, run as
  top-k buckets over them.

So neither exists as an ``[N, V]`` tensor: besides the gradients, one ``[rows, V]`` block of the
teacher (for the mixture, and one of the member being mixed; a contiguous copy of the student's block
where its rows are not one stride apart) is alive at a time. Blocks are about ``BLOCK_ELEMENTS``
elements (32 MiB of float32). (Dense logits at their own ``teacher_temperature`` need no blocks: the row
ops take it as an argument, ``losses.divergence.fused_call``.)

On the backends whose ``divergence_fwd`` forms the mixture itself (``MIXTURE_OP_BACKENDS``: cpu) the
mixture takes no blocks either: one call of the op with the members (``teacher_members``,
``member_weights``, ``mixture_mode``), which mixes each row in log space into a per-thread row buffer
(docs/design.md), read in place like a dense teacher (row slices, HF-shifted views). The other fused
backends (cuda, triton) and AKL (``akl_fwd`` takes no members) keep the blocks.

The reference backend forms the whole teacher (in float64 for float64 inputs) and runs the reference
loss on it: it is the oracle, not a memory-saving path.
"""
import math
from typing import Iterator, Optional, Tuple

import torch

from ..core import checks as v
from ..core.divergence import TOPK_MODE_CODES, LossParts, check_divergence_args, divergence_op_args
from ..core.mixture import MIXTURE_MODE_CODES, TeacherMixture, check_mixture, mix_log_probs, mixture_vocab
from ..core.vocab import MappedTeacher
from ..core.autograd import guard_stored_backward, scale_stored_grad
from ..core.rows import (GappedRows, compute_dtype, from_gapped, gapped_period, row_view, row_weights, to_gapped,
                         wants_grad)
from ..dispatch.backend import ROW_OPS, ROW_STRIDED_BACKENDS, implementation, resolve
from ..reference import divergence as R

__all__ = ["mixture_loss", "mapped_loss", "mapped_is_constant", "check_dense_mixture", "MIXTURE_OP_BACKENDS"]

# The backends whose divergence_fwd forms a TeacherMixture of dense members inside the row op.
MIXTURE_OP_BACKENDS = ("cpu",)

# Elements of one block of rows (float32: 32 MiB per block of the mixture).
BLOCK_ELEMENTS = 1 << 23
_NO_IDS = torch.empty(0, dtype=torch.int64)


def check_dense_mixture(student: torch.Tensor, mixture: TeacherMixture, teacher_vocab: str) -> TeacherMixture:
    """The members against the student (dense logits only, the student's leading shape, one device,
    one vocabulary ``V_t``); ``V_t > V`` with ``teacher_vocab="truncate"`` drops the columns past ``V``.
    Returns the mixture to use."""
    v.check_logits("student_logits", student)
    for i, m in enumerate(mixture.members):
        if m[0] != "logits":
            raise TypeError(f"teachers[{i}] of the TeacherMixture is a (teacher_hidden, teacher_weight) pair: the "
                            "logit losses take members of dense teacher logits [..., V]; pairs are for "
                            "fastkd.fused_linear_kd_loss")
        if m[1].requires_grad and torch.is_grad_enabled():
            raise ValueError(f"teachers[{i}] requires grad, but a TeacherMixture's members are constants (no "
                             f"gradient would reach them); pass teachers[{i}].detach()")
    check_mixture(mixture, tuple(student.shape[:-1]), student.device, owner="student_logits")
    v.check_teacher_vocab(teacher_vocab)
    vocab, t_vocab = student.shape[-1], mixture_vocab(mixture)
    if t_vocab > vocab and teacher_vocab == "truncate":
        return mixture.truncated(vocab)
    if t_vocab != vocab:
        raise ValueError(f"the TeacherMixture's vocabulary ({t_vocab}) must match student_logits' last dim ({vocab})"
                         + (" (teacher_vocab='mask' is not supported with a TeacherMixture: use 'truncate')"
                            if t_vocab > vocab else ""))
    return mixture


def _blocks(lead: Tuple[int, ...], rows: int) -> Iterator[tuple]:
    """Index tuples ``idx`` over the leading dims ``lead`` such that ``x[idx]`` (``x [*lead, V]``) are
    disjoint blocks of about ``rows`` rows covering ``x``, each a view (no copy)."""
    if len(lead) == 0:
        yield ()
        return
    inner = math.prod(lead[1:])
    if inner <= rows:
        step = max(1, rows // max(inner, 1))
        for i in range(0, lead[0], step):
            yield (slice(i, min(i + step, lead[0])),)
        return
    for i in range(lead[0]):
        for rest in _blocks(lead[1:], rows):
            yield (i,) + rest


def _mixed_block(mixture: TeacherMixture, idx: tuple, teacher_temperature: float) -> torch.Tensor:
    """``log p`` of the mixture (members at ``teacher_temperature``) over the rows ``idx``: float32
    ``[rows, V]`` (contiguous)."""
    first = mixture.members[0][1][idx]
    out = torch.empty(first.reshape(-1, first.shape[-1]).shape, dtype=torch.float32, device=first.device)
    members = (m[1][idx].reshape(out.shape).to(torch.float32, copy=True) for m in mixture.members)
    return mix_log_probs(members, mixture.weights, mixture.mode, float(teacher_temperature), out)


class _BlockRows(torch.autograd.Function):
    """The loss of ``student`` against constant teacher blocks (``make_block(idx)``: float32 ``[rows, V]``
    teacher logits for the op, or ``(log-probs [rows, K], ids [rows, K], top-k mode code)``: top-k
    buckets), block by block on a fused backend's ``divergence_fwd``.

    The forward writes each block's student gradient into one ``[..., V]`` buffer (the student's
    shape and dtype); the backward scales it by the incoming gradient in place (no second buffer).
    """

    @staticmethod
    def forward(ctx, student, make_block, name, row_op, temperature, weight, target, code, coefficients,
                soft_scale, ce_weight, reduce, want_s):
        lead, vocab = student.shape[:-1], student.shape[-1]
        grad_s = torch.empty(student.shape, dtype=student.dtype, device=student.device) if want_s else None
        shape = () if reduce else tuple(lead)
        loss, soft, hard = (torch.zeros(shape, dtype=torch.float32, device=student.device) for _ in range(3))
        op = getattr(implementation(name), row_op)
        strided = name in ROW_STRIDED_BACKENDS  # CUDA's divergence_fwd takes contiguous rows
        no_ids = _NO_IDS.to(student.device)
        for idx in _blocks(tuple(lead), max(1, BLOCK_ELEMENTS // max(vocab, 1))):
            s = student[idx]
            rows = s.reshape(-1, vocab)  # a view when the block's rows are one stride apart, else a block copy
            if rows.stride(-1) != 1 or not (strided or rows.is_contiguous()):
                rows = rows.contiguous()
            tgt = target[idx].reshape(-1) if target is not None else no_ids
            block = make_block(idx)
            t_block, ids, mode = block if isinstance(block, tuple) else (block, no_ids, 0)
            out = op(rows, t_block, ids, tgt, weight[idx].reshape(-1), float(temperature), code,
                     *coefficients, float(soft_scale), float(ce_weight), mode, reduce, want_s, False)
            for total, value in zip((loss, soft, hard), out[:3]):
                if reduce:
                    total += value
                else:
                    total[idx] = value.reshape(s.shape[:-1])
            if want_s:
                grad_s[idx] = out[3].reshape(s.shape)
        ctx.grad_s, ctx.reduce, ctx.used = grad_s, reduce, False
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(soft, hard)
        return loss, soft, hard

    @staticmethod
    def backward(ctx, grad_loss, grad_soft, grad_hard):
        guard_stored_backward(ctx, grad_loss)
        g, ctx.grad_s = ctx.grad_s, None
        # the stored gradient is contiguous [..., V]: as rows it scales by one incoming value per row
        per_row = grad_loss if grad_loss is None or ctx.reduce else grad_loss.reshape(-1)
        grad_s = None if g is None else scale_stored_grad(g.view(-1, g.shape[-1]), per_row).view(g.shape)
        return (grad_s,) + (None,) * 12


def _run_blocks(kind, params, student, make_block, name, temperature, reduction, target, ignore_index,
                sample_weight, ce_weight, return_parts, soft_scale):
    v.check_constant_weight(sample_weight, name)
    lead = student.shape[:-1]
    weight = row_weights(student, target, ignore_index, sample_weight, reduction).reshape(lead)
    wants_ce = target is not None and (ce_weight != 0 or return_parts)
    tgt = target.reshape(lead).to(torch.int64) if wants_ce else None
    code, *coefficients = divergence_op_args(kind, **params)
    loss, soft, hard = _BlockRows.apply(student, make_block, name, ROW_OPS.get(kind, "divergence_fwd"),
                                        float(temperature), weight, tgt, code, tuple(coefficients),
                                        float(soft_scale), float(ce_weight), reduction != "none",
                                        wants_grad(student))
    return LossParts(loss, soft.detach(), hard.detach()) if return_parts else loss


def mixture_loss(kind: str, params: dict, student: torch.Tensor, mixture: TeacherMixture, temperature: float,
                 reduction: str, target, ignore_index, sample_weight, ce_weight: float, return_parts: bool,
                 backend: str, loss_name: str, teacher_vocab: str = "truncate", soft_scale: float = 1.0,
                 teacher_temperature: Optional[float] = None):
    """The divergence ``kind`` (``divergence_op_args``' names; ``kd_loss`` is ``"forward_kl"`` with
    ``soft_scale = T^2``) of ``student`` against ``mixture`` (its members at ``teacher_temperature``,
    default ``temperature``), reduced by ``reduction``. On ``MIXTURE_OP_BACKENDS`` (cpu) one call of the op,
    which mixes each row itself; on cuda and triton, and for AKL (``akl_fwd``), blocks of rows mixed in PyTorch;
    on the reference the whole mixture (the oracle)."""
    mixture = check_dense_mixture(student, mixture, teacher_vocab)
    first = mixture.members[0][1]
    check_divergence_args(student, first, temperature, reduction, target, ignore_index, sample_weight, ce_weight,
                          return_parts)
    t_temp = float(temperature if teacher_temperature is None else teacher_temperature)
    name = resolve(loss_name, backend, student, *(m[1] for m in mixture.members))
    if name == "reference":
        with torch.no_grad():
            mixed = _mixed_reference(mixture, t_temp, compute_dtype(student, *(m[1] for m in mixture.members)))
        return R.compute(student, mixed * temperature, temperature, reduction, target, ignore_index, sample_weight,
                         ce_weight, return_parts, kind, scale_t2=soft_scale != 1.0, **params)

    if name in MIXTURE_OP_BACKENDS and ROW_OPS.get(kind, "divergence_fwd") == "divergence_fwd":
        return _mixture_in_op(kind, params, student, mixture, temperature, t_temp, reduction, target, ignore_index,
                              sample_weight, ce_weight, return_parts, soft_scale, name)

    def make_block(idx):  # T log p: the op's softmax(. / T) gives the mixture
        return _mixed_block(mixture, idx, t_temp).mul_(float(temperature))

    return _run_blocks(kind, params, student, make_block, name, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, soft_scale)


def _mixture_in_op(kind, params, student, mixture, temperature, t_temp, reduction, target, ignore_index,
                   sample_weight, ce_weight, return_parts, soft_scale, name):
    """One ``divergence_fwd`` call of backend ``name`` that mixes the members row by row itself (arguments
    checked). Rows as ``losses.divergence.fused_call`` lays out a dense teacher: strided rows and HF-shifted
    views (``logits[:, :-1]``) of the student and of every member read in place, other layouts copied."""
    v.check_constant_weight(sample_weight, name)
    members = [m[1].detach() for m in mixture.members]
    lead = student.shape[:-1]
    period = gapped_period(student, *members)

    def per_row(x, fill):  # per-row values [...] laid out as the student's rows
        return to_gapped(x, period, fill) if period else x.reshape(-1)

    s = GappedRows.apply(student, period) if period else row_view(student, True)
    rows = [GappedRows.apply(m, period) if period else row_view(m, True) for m in members]
    wants_ce = target is not None and (ce_weight != 0 or return_parts)
    tgt = per_row(target.reshape(lead).to(torch.int64), 0).contiguous() if wants_ce else _NO_IDS.to(s.device)
    weight = per_row(row_weights(student, target, ignore_index, sample_weight, reduction).reshape(lead), 0.0)
    code, *coefficients = divergence_op_args(kind, **params)
    loss, soft, hard, _, _ = implementation(name).divergence_fwd(
        s, rows[0], _NO_IDS.to(s.device), tgt, weight, float(temperature), code, *coefficients, float(soft_scale),
        float(ce_weight), 0, reduction != "none", wants_grad(s), False, teacher_temperature=float(t_temp),
        teacher_members=rows, member_weights=[float(w) for w in mixture.weights],
        mixture_mode=MIXTURE_MODE_CODES[mixture.mode])
    if reduction == "none":
        if period:
            loss, soft, hard = (from_gapped(x, lead[0], lead[1], period) for x in (loss, soft, hard))
        loss, soft, hard = loss.reshape(lead), soft.reshape(lead), hard.reshape(lead)
    return LossParts(loss, soft.detach(), hard.detach()) if return_parts else loss


def mapped_loss(kind: str, params: dict, student: torch.Tensor, mapped: MappedTeacher, temperature: float,
                teacher_temperature: Optional[float], reduction: str, target, ignore_index, sample_weight,
                ce_weight: float, return_parts: bool, name: str, soft_scale: float = 1.0):
    """The divergence ``kind`` against a ``MappedTeacher`` (a constant one: ``mapped_is_constant``) on fused
    backend ``name`` (arguments checked): per block of rows the teacher's logits (its own, or its
    ``(hidden, weight)`` pair's block matmul) are projected onto the matched student ids at
    ``teacher_temperature`` (default ``temperature``) and run as top-k buckets over them; no ``[N, V_m]``
    projection (nor, for a pair, ``[N, V_t]`` logits) is ever formed."""
    t_temp = float(temperature if teacher_temperature is None else teacher_temperature)
    vm, mode = mapped.vocab_map, TOPK_MODE_CODES[mapped.topk_mode]

    def make_block(idx):
        if isinstance(mapped.teacher, torch.Tensor):
            block = mapped.teacher[idx]
            logits = block.reshape(-1, block.shape[-1])
        else:
            hidden, weight = mapped.teacher
            block = hidden[idx]
            logits = torch.mm(block.reshape(-1, block.shape[-1]).to(torch.float32), weight.to(torch.float32).t())
        log_p = mapped.projected_probs(t_temp, torch.float32, logits).log_()
        return log_p, vm.student_ids.expand(log_p.shape).contiguous(), mode

    return _run_blocks(kind, params, student, make_block, name, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, soft_scale)


def mapped_is_constant(mapped: MappedTeacher) -> bool:
    """No gradient would reach the teacher of ``mapped`` (the block path gives it none)."""
    tensors = (mapped.teacher,) if isinstance(mapped.teacher, torch.Tensor) else mapped.teacher
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))


def _mixed_reference(mixture: TeacherMixture, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``log p`` of the whole mixture in ``dtype`` (the reference's oracle: float64 for float64 inputs; the
    geometric one up to a per-row constant, which the loss's softmax removes)."""
    logs = [torch.log_softmax(m[1].to(dtype) / temperature, dim=-1) for m in mixture.members]
    if mixture.mode == "arithmetic":
        log_p = torch.logsumexp(torch.stack([lp + math.log(w) for lp, w in zip(logs, mixture.weights)]), dim=0)
    else:
        log_p = sum(w * lp for lp, w in zip(logs, mixture.weights))
    return log_p
