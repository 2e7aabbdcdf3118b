"""AKL against a ``TopKTeacher`` (an offline teacher cache, ``fastkd.teacher_topk``): the head and the gaps
over the teacher's buckets, then the blend of the two bucket KLs at those (constant) weights.

The K members and, in ``"tail"`` mode, the tail bucket (the teacher's mass outside the top-k as one
class, the buckets every top-k divergence compares) are the classes. The tail bucket ranks last: each of
its tokens is less probable than every member, so it joins the head only where every class does
(``mu >= 1``); the head is otherwise found among the members as for dense logits
(``fastkd.reference.akl.akl_head``: ties in or out together, the most probable always in). With
``"renormalize"`` both sides are renormalised over the K members and there is no tail bucket.

``h KL(p || q) + l KL(q || p)`` is two calls of the top-k row op (forward and reverse KL with the row
weights times ``h`` and ``l``; the cross-entropy, where wanted, a third, at the plain row weights): each
reads the student's row, and the weights need its log-sum-exp and, in tail mode, that of its non-members
(one more read, in blocks of rows: no ``[N, V]`` temporary).
"""
from typing import Tuple

import torch

import torch.nn.functional as F

from ..core.divergence import LossParts
from ..core.rows import compute_dtype, row_weights
from ..core.topk import TopKTeacher
from ..reference.akl import akl_head
from ..dispatch.backend import resolve
from .divergence import forward_kl_loss, fused_call, reverse_kl_loss
from .teacher_blocks import BLOCK_ELEMENTS, _blocks

__all__ = ["akl_topk_weights", "akl_topk_loss"]


def _student_lse(student: torch.Tensor, ids: torch.Tensor, temperature: float, dtype: torch.dtype,
                 tail: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``student [..., V]``: the log-sum-exp of ``s / T`` and (``tail``) of its entries outside
    ``ids [..., K]`` (-1: padding), in ``dtype``, leading shape; block by block of rows."""
    lead, vocab = student.shape[:-1], student.shape[-1]
    lse_all = torch.empty(lead, dtype=dtype, device=student.device)
    lse_out = torch.empty(lead, dtype=dtype, device=student.device) if tail else None
    for idx in _blocks(tuple(lead), max(1, BLOCK_ELEMENTS // max(vocab, 1))):
        x = student[idx].to(dtype, copy=True).div_(float(temperature))
        lse_all[idx] = torch.logsumexp(x, dim=-1)
        if tail:
            block_ids = ids[idx]
            # members to -inf; padding ids (-1) write into one extra column, dropped
            member = torch.zeros(x.shape[:-1] + (vocab + 1,), dtype=torch.bool, device=x.device)
            member.scatter_(-1, torch.where(block_ids >= 0, block_ids, vocab), True)
            lse_out[idx] = torch.logsumexp(x.masked_fill_(member[..., :vocab], float("-inf")), dim=-1)
    return lse_all, lse_out


def akl_topk_weights(student: torch.Tensor, teacher: TopKTeacher, temperature: float,
                     mu: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """AKL's ``(h, l)`` per row (the student's leading shape; constants) against the buckets of ``teacher``:
    ``g_head = sum_head |p - q|``, ``g_tail = sum_tail |p - q|`` over the members and, in tail mode, the tail
    bucket (tail unless ``mu >= 1``); ``h = g_head / max(g_head + g_tail, 1e-8)``, ``l`` likewise.
    Computed in the students' and teacher's common dtype, at least float32."""
    with torch.no_grad():
        dtype = compute_dtype(student, teacher.logprobs)
        ids, tail = teacher.indices, teacher.mode == "tail"
        valid = ids >= 0
        neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=student.device)
        lse_all, lse_out = _student_lse(student, ids, temperature, dtype, tail)
        s_at = student.gather(-1, ids.clamp_min(0)).to(dtype) / float(temperature)
        log_q = torch.where(valid, s_at - lse_all.unsqueeze(-1), neg_inf)
        log_p = torch.where(valid, teacher.logprobs.to(dtype), neg_inf)
        if not tail:  # both renormalised over the members (a row of padding only stays -inf: no mass, gaps 0)
            lse_p, lse_q = (torch.logsumexp(x, dim=-1, keepdim=True) for x in (log_p, log_q))
            log_p = torch.where(valid, log_p - lse_p, neg_inf)
            log_q = torch.where(valid, log_q - lse_q, neg_inf)
        k = ids.shape[-1]
        head = akl_head(log_p.reshape(-1, k), mu).reshape(log_p.shape) & valid
        gap = (log_p.exp() - log_q.exp()).abs()
        g_head = torch.where(head, gap, 0.0).sum(dim=-1)
        g_tail = torch.where(head, 0.0, gap).sum(dim=-1)
        if tail:  # the tail buckets: p's as every top-k loss derives it, q's exact (no cancellation)
            tail_gap = ((1.0 - log_p.exp().sum(dim=-1)).clamp_min(0.0) - (lse_out - lse_all).exp()).abs()
            if mu >= 1.0:
                g_head = g_head + tail_gap
            else:
                g_tail = g_tail + tail_gap
        total = (g_head + g_tail).clamp_min(1e-8)
        return g_head / total, g_tail / total


def _cross_entropy(name: str, student, target, ignore_index, sample_weight, reduction, ce_weight):
    """The weighted cross-entropy of ``student`` at ``T = 1``: ``(ce_weight * ce, ce.detach())``, as every
    divergence weights it (its own pass of the row op's CE-only kind; the reference by autograd)."""
    if name != "reference":
        ce = fused_call(name, student, student.detach(), temperature=1.0, reduction=reduction, target=target,
                        ignore_index=ignore_index, sample_weight=sample_weight, ce_weight=ce_weight,
                        return_parts=True, kind="ce")
        return ce.loss, ce.hard
    rows = student.reshape(-1, student.shape[-1]).to(compute_dtype(student))
    per_row = F.cross_entropy(rows, target.reshape(-1).to(torch.int64), ignore_index=ignore_index, reduction="none")
    weighted = per_row * row_weights(student, target, ignore_index, sample_weight, reduction, per_row.dtype)
    ce = weighted.reshape(student.shape[:-1]) if reduction == "none" else weighted.sum()
    return ce_weight * ce, ce.detach()


def akl_topk_loss(student: torch.Tensor, teacher: TopKTeacher, mu: float, temperature: float, reduction: str,
                  target, ignore_index: int, sample_weight, ce_weight: float, return_parts: bool, backend: str):
    """``h KL(p || q) + l KL(q || p)`` over the buckets of ``teacher`` (arguments checked by the caller) and
    ``ce_weight`` times the cross-entropy: the two KLs on the top-k row op at row weights times ``h`` and ``l``,
    the cross-entropy (where wanted) in a pass of its own at the plain row weights."""
    name = resolve("forward_kl", backend, student, teacher.logprobs)
    h, l = akl_topk_weights(student, teacher, temperature, mu)
    if sample_weight is not None:
        weight = sample_weight.reshape(h.shape).to(h.dtype)  # (not h in a bf16 weight's precision)
        h, l = weight * h, weight * l
    options = dict(temperature=temperature, reduction=reduction, target=target, ignore_index=ignore_index,
                   ce_weight=0.0, return_parts=True, backend=name)
    fwd = forward_kl_loss(student, teacher, sample_weight=h, **options)
    rev = reverse_kl_loss(student, teacher, sample_weight=l, **options)
    loss, hard = fwd.loss + rev.loss, fwd.hard
    if target is not None and (ce_weight != 0 or return_parts):
        ce_loss, hard = _cross_entropy(name, student, target, ignore_index, sample_weight, reduction, ce_weight)
        loss = loss + ce_loss if ce_weight != 0 else loss
    return LossParts(loss, fwd.soft + rev.soft, hard) if return_parts else loss
