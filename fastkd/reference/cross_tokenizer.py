"""Plain-PyTorch reference of the cross-tokenizer losses: the float64 oracle of ``fastkd.losses.cross_tokenizer``.

Universal Logit Distillation (ULD, Boizard et al. 2024), per row, ``q = softmax(s / T)`` (student,
``V_s`` classes), ``p = softmax(t / T_t)`` (teacher, ``V_t`` classes)::

    a = sort(q, descending), b = sort(p, descending), both zero-padded to V = max(V_s, V_t)
    uld = sum_i |a_i - b_i|

(an optimal-transport distance between the two sets of probabilities; no token correspondence).
With ``k=K``: the K largest of each side compared exactly and the rest by their masses,
``uld_K = sum_{i <= K} |a_i - b_i| + |A - B|`` with ``A = sum_{i > K} a_i``, ``B = sum_{i > K} b_i``;
``uld_K <= uld <= uld_K + 2 min(A, B)`` (triangle inequality one way, ``|a_i - b_i| <= a_i + b_i``
the other), and ``2 min(A, B)`` is returned as the bound.

Gradients here come from autograd through ``torch.sort`` (the sort permutation) and the softmax.
Rows, row weights, reduction, ``ce_weight``, skipped rows: as ``fastkd.reference.divergence``
(``"mean"`` divides by counted rows * ``max(V_s, V_t)``).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ..core.cross_tokenizer import HybridParts, ULDParts, check_hybrid_args, check_uld_args
from ..core.divergence import divergence_coefficients
from ..core.rows import compute_dtype, read_rows, row_weights
from .divergence import kl_family_rows

__all__ = ["uld_loss", "hybrid_uld_loss", "sorted_l1_rows", "ULDParts", "HybridParts"]


def sorted_l1_rows(q: torch.Tensor, p: torch.Tensor, k: Optional[int] = None):
    """``(uld [N], bound [N])`` between probability rows ``q [N, V_s]`` and ``p [N, V_t]`` (see the module)."""
    width = max(q.shape[1], p.shape[1])
    a = F.pad(q.sort(dim=1, descending=True).values, (0, width - q.shape[1]))
    b = F.pad(p.sort(dim=1, descending=True).values, (0, width - p.shape[1]))
    if k is None or k >= width:
        return (a - b).abs().sum(dim=1), torch.zeros(q.shape[0], dtype=q.dtype, device=q.device)
    head = (a[:, :k] - b[:, :k]).abs().sum(dim=1)
    tail_a, tail_b = a[:, k:].sum(dim=1), b[:, k:].sum(dim=1)
    return head + (tail_a - tail_b).abs(), 2 * torch.minimum(tail_a, tail_b).detach()


def probabilities(s, t, temperature, teacher_temperature, inputs):
    """``(q, p)`` of rows ``s``, ``t``: softmax at the temperatures, or log-probabilities as given (<= 0)."""
    if inputs == "log_probs":
        return s.clamp(max=0.0).exp(), t.clamp(max=0.0).exp()
    t_temp = temperature if teacher_temperature is None else teacher_temperature
    return F.softmax(s / temperature, dim=1), F.softmax(t / t_temp, dim=1)


def compute_uld(student, teacher, temperature, teacher_temperature, reduction, target, ignore_index, sample_weight,
                ce_weight, return_parts, k, inputs="logits"):
    """The reference ULD loss, arguments already checked."""
    dtype = compute_dtype(student, teacher)
    lead = student.shape[:-1]
    s = student.reshape(-1, student.shape[-1]).to(dtype)
    t = teacher.reshape(-1, teacher.shape[-1]).to(dtype)
    n = s.shape[0]
    read = read_rows(student, target, ignore_index, sample_weight)
    if read is not None:  # skipped rows are never read (NaN there changes nothing)
        s = torch.where(read.unsqueeze(1), s, torch.zeros((), dtype=dtype))
        t = torch.where(read.unsqueeze(1), t, torch.zeros((), dtype=dtype))
    soft, bound = sorted_l1_rows(*probabilities(s, t, temperature, teacher_temperature, inputs), k)
    hard = torch.zeros_like(soft)
    if target is not None and (ce_weight != 0 or return_parts):
        tgt = target.reshape(n).to(torch.int64)
        if read is not None:
            tgt = torch.where(read, tgt, torch.zeros_like(tgt))
        hard = torch.logsumexp(s, dim=1) - s.gather(1, tgt.unsqueeze(1)).squeeze(1)
    row = soft + ce_weight * hard if ce_weight != 0 else soft
    weight = row_weights(student, target, ignore_index, sample_weight, reduction, dtype)
    if reduction == "mean":  # row_weights divides by counted rows * V_s; ULD's width is max(V_s, V_t)
        weight = weight * (student.shape[-1] / max(student.shape[-1], teacher.shape[-1]))

    def reduce(r):
        r = r * weight
        return r.reshape(lead) if reduction == "none" else r.sum()

    loss = reduce(row)
    if not return_parts:
        return loss
    with torch.no_grad():
        return ULDParts(loss, reduce(soft.detach()), reduce(hard.detach()), reduce(bound))


def uld_loss(student_logits, teacher_logits, *, temperature=1.0, teacher_temperature=None, reduction="batchmean",
             target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False, k=None,
             inputs="logits"):
    """Universal Logit Distillation: per row ``sum_i |sort(q)_i - sort(p)_i|`` (module docstring).

    ``teacher_temperature`` (default: ``temperature``) divides the teacher's logits. No ``T^2``
    factor. Student ``[..., V_s]`` and teacher ``[..., V_t]`` share the leading shape.
    """
    check_uld_args(student_logits, teacher_logits, temperature, teacher_temperature, reduction, target,
                   ignore_index, sample_weight, ce_weight, return_parts, k, inputs)
    return compute_uld(student_logits, teacher_logits, temperature, teacher_temperature, reduction, target,
                       ignore_index, sample_weight, ce_weight, return_parts, k, inputs)


# ----------------------------------------------------------------------------
# GOLD's hybrid: matched tokens by a divergence, the unmatched ones by ULD
# ----------------------------------------------------------------------------

def hybrid_rows(q: torch.Tensor, p: torch.Tensor, vocab_map, beta: float, sorted_l1=None):
    """``(matched [N], unmatched [N])`` of GOLD's hybrid between probability rows ``q [N, V_s]``, ``p [N, V_t]``.

    matched: over the distinct matched student ids ``j``, ``P_j = sum_{map(c) = j} p_c`` against ``q_j``,
    the generalised JSD's terms on these masses as they are (not renormalised, no tail: GOLD's),
    ``sum_j beta P_j log(P_j / M_j) + (1 - beta) q_j log(q_j / M_j)``, ``M = beta P + (1 - beta) q``
    (``beta = 0``: ``sum P log(P / q)``; ``beta = 1``: ``sum q log(q / P)``);
    unmatched: ULD between the teacher's unmatched probabilities and the student's probabilities on the
    ids no teacher token maps to. ``sorted_l1(q, p) -> [N]`` (default: the sort, autograd).
    """
    vm = vocab_map
    big_p = p.new_zeros(p.shape[0], vm.student_ids.numel()).index_add(1, vm.bucket, p[:, vm.matched_teacher])
    matched = kl_family_rows(big_p.log(), q[:, vm.student_ids].log(), *divergence_coefficients("jsd", beta=beta))
    hit = torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
    hit[vm.student_ids] = True
    q_rest, p_rest = q[:, ~hit], p[:, vm.teacher_to_student < 0]
    if q_rest.shape[1] == 0 or p_rest.shape[1] == 0:  # GOLD: no unmatched term when either side has none
        return matched, torch.zeros_like(matched)
    unmatched = sorted_l1(q_rest, p_rest) if sorted_l1 is not None else sorted_l1_rows(q_rest, p_rest)[0]
    return matched, unmatched


def hybrid_weights(vocab_map, matched_weight, unmatched_weight):
    """GOLD's weights: the matched fraction of the teacher's vocabulary and its complement, or the fixed pair."""
    if matched_weight is None:
        return vocab_map.matched_fraction, 1.0 - vocab_map.matched_fraction
    return float(matched_weight), float(unmatched_weight)


def compute_hybrid(student, teacher, vocab_map, beta, matched_weight, unmatched_weight, temperature,
                   teacher_temperature, reduction, target, ignore_index, sample_weight, ce_weight, return_parts,
                   inputs="logits", sorted_l1=None):
    """The hybrid loss, arguments checked (``fastkd.hybrid_uld_loss``); ``sorted_l1`` as ``hybrid_rows``."""
    dtype = compute_dtype(student, teacher)
    lead = student.shape[:-1]
    s = student.reshape(-1, student.shape[-1]).to(dtype)
    t = teacher.reshape(-1, teacher.shape[-1]).to(dtype)
    n = s.shape[0]
    read = read_rows(student, target, ignore_index, sample_weight)
    if read is not None:
        s = torch.where(read.unsqueeze(1), s, torch.zeros((), dtype=dtype))
        t = torch.where(read.unsqueeze(1), t, torch.zeros((), dtype=dtype))
    vm = vocab_map.to(s.device) if vocab_map.teacher_to_student.device != s.device else vocab_map
    matched, unmatched = hybrid_rows(*probabilities(s, t, temperature, teacher_temperature, inputs), vm, beta,
                                     sorted_l1)
    w_m, w_u = hybrid_weights(vm, matched_weight, unmatched_weight)
    soft = w_m * matched + w_u * unmatched
    hard = torch.zeros_like(soft)
    if target is not None and (ce_weight != 0 or return_parts):
        tgt = target.reshape(n).to(torch.int64)
        if read is not None:
            tgt = torch.where(read, tgt, torch.zeros_like(tgt))
        hard = torch.logsumexp(s, dim=1) - s.gather(1, tgt.unsqueeze(1)).squeeze(1)
    row = soft + ce_weight * hard if ce_weight != 0 else soft
    weight = row_weights(student, target, ignore_index, sample_weight, reduction, dtype)
    if reduction == "mean":
        weight = weight * (student.shape[-1] / max(student.shape[-1], teacher.shape[-1]))

    def reduce(r):
        r = r * weight
        return r.reshape(lead) if reduction == "none" else r.sum()

    loss = reduce(row)
    if not return_parts:
        return loss
    with torch.no_grad():
        return HybridParts(loss, reduce(soft.detach()), reduce(hard.detach()), reduce(matched.detach()),
                           reduce(unmatched.detach()))


def hybrid_uld_loss(student_logits, teacher_logits, vocab_map, *, beta=0.5, matched_weight=None,
                    unmatched_weight=None, temperature=1.0, teacher_temperature=None, reduction="batchmean",
                    target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False,
                    inputs="logits"):
    """GOLD's hybrid ULD (``fastkd.hybrid_uld_loss``), sort-based, by autograd."""
    check_hybrid_args(student_logits, teacher_logits, vocab_map, beta, matched_weight, unmatched_weight)
    check_uld_args(student_logits, teacher_logits, temperature, teacher_temperature, reduction, target,
                   ignore_index, sample_weight, ce_weight, return_parts, None, inputs)
    return compute_hybrid(student_logits, teacher_logits, vocab_map, beta, matched_weight, unmatched_weight,
                          temperature, teacher_temperature, reduction, target, ignore_index, sample_weight, ce_weight,
                          return_parts, inputs)
