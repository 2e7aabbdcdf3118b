"""Plain-PyTorch reference of the language-model divergences (issue 10).

Re-exported by ``fastkd.reference``. With ``p`` the teacher, ``q`` the student,
both ``softmax(logits / T)`` over the vocabulary (or over top-k buckets, see
``fastkd.TopKTeacher``), per row:

* ``forward_kl_loss``: ``KL(p || q)`` (``kd_loss`` without ``T^2``)
* ``reverse_kl_loss``: ``KL(q || p)``
* ``jsd_loss``: ``m = beta p + (1 - beta) q``, ``beta KL(p || m) + (1 - beta) KL(q || m)``;
  ``beta == 0`` is ``KL(p || q)`` and ``beta == 1`` is ``KL(q || p)`` (TRL, Liger)
* ``skew_kl_loss``: ``KL(p || skew p + (1 - skew) q)``, or with ``reverse=True``
  ``KL(q || (1 - skew) p + skew q)`` (DistiLLM)
* ``tvd_loss``: ``0.5 sum |p - q|``
* ``jeffreys_loss``: ``KL(p || q) + KL(q || p)``
* ``triangular_loss``: ``sum (p - q)^2 / (p + q)`` (terms with ``p + q = 0`` add 0)
* ``entropy_gated_kl_loss``: ``w KL(p || q) + (1 - w) KL(q || p)``, ``w = alpha_min + (alpha_max -
  alpha_min) sigmoid((H(p) / log V - tau) / scale)`` per row, ``w`` a constant in the gradients
* ``akl_loss``: adaptive KL (Wu et al. 2025): ``h KL(p || q) + l KL(q || p)``, ``h``, ``l`` the shares of
  ``sum |p - q|`` on the teacher's head (its most probable classes holding mass ``mu``) and tail (``akl_rows``)
* ``alpha_divergence_loss``: Amari's alpha divergence, ``ab_divergence_loss`` at ``beta = 1 - alpha``
* ``ab_divergence_loss``: ``-(1 / (a b)) sum [p^a q^b - (a / s) p^s - (b / s) q^s]``, ``s = a + b`` (ABKD)
* ``renyi_loss``: ``log(sum p^r q^(1 - r)) / (r - 1)`` (``reverse``: p and q swapped)
* ``kd_topk_loss``: ``T^2 KL(p || q)`` against a ``TopKTeacher`` (``kd_loss``'s formula)

Every KL-type divergence here is one formula with four coefficients (the
contract the fused kernels implement)::

    loss = a * KL(p || m) + b * KL(q || m),   m = w_p * p + w_q * q

(forward KL: 1, 0, 0, 1; reverse KL: 0, 1, 1, 0; JSD: beta, 1 - beta, beta,
1 - beta; skew KL: 1, 0, skew, 1 - skew; skew reverse KL: 0, 1, 1 - skew, skew).
``log m`` is formed in log space, ``logaddexp(log p + log w_p, log q + log w_q)``,
so it is finite wherever p or q is > 0, whatever the log-probs (no underflow to
``log 0``: the NaN Liger's JSD gives for log-probs below about -104).

Shared with ``kd_loss``: rows from all leading dims; a row whose target is
``ignore_index`` or whose sample weight is exactly 0 is never read (its logits are
replaced by zeros before any arithmetic: loss 0, gradient 0); ``row_weight =
valid * sample_weight / divisor`` (divisor: counted rows for "batchmean",
counted rows * C for "mean", 1 otherwise); terms with probability exactly 0
add exactly 0 (value and gradient) on either side; NaN inputs propagate; math in
``max(float32, input dtypes)`` (float64 stays float64, for gradcheck).
``ce_weight`` adds ``ce_weight * (logsumexp(s) - s[target])`` (student logits at
T = 1) to each row before the row weight, so the CE has the same reduction,
``ignore_index`` and ``sample_weight`` as the soft loss.
"""
import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F

from ..core.divergence import (
    KIND_CODES,
    LossParts,
    check_divergence_args,
    check_akl_op_args,
    check_akl_teacher,
    check_divergence_params,
    divergence_coefficients,
    entropy_gate,
)
from ..core.rows import compute_dtype, read_rows, row_weights
from ..core.topk import PAD_ID, TopKTeacher
from .power import ab_divergence_rows, renyi_rows
from .akl import akl_head, akl_weights  # noqa: F401  (akl_head: public here too)

__all__ = [
    "LossParts",
    "forward_kl_loss",
    "reverse_kl_loss",
    "jsd_loss",
    "skew_kl_loss",
    "tvd_loss",
    "jeffreys_loss",
    "triangular_loss",
    "entropy_gated_kl_loss",
    "akl_loss",
    "akl_head",
    "alpha_divergence_loss",
    "ab_divergence_loss",
    "renyi_loss",
    "kd_topk_loss",
    "topk_log_probs",
    "divergence_fwd",
    "akl_fwd",
]

Teacher = Union[torch.Tensor, TopKTeacher]


# ----------------------------------------------------------------------------
# row math
# ----------------------------------------------------------------------------

def kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Element-wise ``a (log a - log b)``, exactly 0 in value and gradient where a == 0.

    The difference is masked before the product, so the ``-inf - -inf`` of a
    zero-probability term never reaches the gradient; NaN still propagates.
    """
    a = log_a.exp()
    return a * torch.where(a == 0, torch.zeros_like(log_a), log_a - log_b)


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, w_p: float, w_q: float) -> torch.Tensor:
    """``log(w_p p + w_q q)`` in log space; exact ``log q`` / ``log p`` when a weight is 0."""
    if w_p == 0:
        return log_q
    if w_q == 0:
        return log_p
    # Where both are 0, logaddexp(-inf, -inf) has a NaN gradient; those terms are masked by
    # _kl_terms (p == q == 0), so feed finite dummies there to keep the gradient clean.
    both = torch.isneginf(log_p) & torch.isneginf(log_q)
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    return torch.logaddexp(torch.where(both, zero, log_p + math.log(w_p)),
                           torch.where(both, zero, log_q + math.log(w_q)))


def soft_rows(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, num_classes=None, **params) -> torch.Tensor:
    """Per-row divergence ``[N]`` between teacher ``log_p`` and student ``log_q`` (``[N, buckets]``).

    ``num_classes``: the vocabulary size ``V`` (the entropy gate's ``log V``; default: the buckets)."""
    if kind == "akl":
        return akl_rows(log_p, log_q, **params)
    if kind == "entropy_gated_kl":
        return entropy_gated_kl_rows(log_p, log_q, num_classes or log_p.shape[1], **params)
    if kind == "alpha_divergence":
        alpha = params.get("alpha", 0.5)
        return ab_divergence_rows(log_p, log_q, alpha, 1.0 - alpha)
    if kind == "ab_divergence":
        return ab_divergence_rows(log_p, log_q, params.get("alpha", 0.2), params.get("beta", 0.7))
    if kind == "renyi":
        return renyi_rows(log_p, log_q, params.get("order", 0.5), params.get("reverse", False))
    if kind == "tvd":
        return tvd_rows(log_p, log_q)
    if kind == "jeffreys":
        return two_sided_kl_rows(log_p, log_q, 1.0, 1.0)
    if kind == "triangular":
        return triangular_rows(log_p, log_q)
    return kl_family_rows(log_p, log_q, *divergence_coefficients(kind, **params))


def tvd_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=1)


def two_sided_kl_rows(log_p, log_q, a: float, b: float) -> torch.Tensor:
    """``a KL(p || q) + b KL(q || p)`` per row (Jeffreys: ``a = b = 1``); a coefficient of 0 drops its KL."""
    loss = torch.zeros(log_p.shape[0], dtype=log_p.dtype, device=log_p.device)
    if a != 0:
        loss = loss + a * kl_terms(log_p, log_q).sum(dim=1)
    if b != 0:
        loss = loss + b * kl_terms(log_q, log_p).sum(dim=1)
    return loss


def entropy_gated_kl_rows(log_p, log_q, num_classes: int, alpha_min: float = 0.0, alpha_max: float = 1.0,
                          tau: float = 0.5, scale: float = 0.1) -> torch.Tensor:
    """``w KL(p || q) + (1 - w) KL(q || p)`` per row, ``w = entropy_gate(H(p), V, ...)`` computed from the
    detached teacher (a constant in both gradients); a weight of 0 drops its KL (never 0 * inf)."""
    p = log_p.exp()
    entropy = -(p * torch.where(p == 0, torch.zeros_like(log_p), log_p)).sum(dim=1)
    w = entropy_gate(entropy.detach(), num_classes, alpha_min, alpha_max, tau, scale)
    u = 1.0 - w
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    fwd = torch.where(w == 0, zero, w * kl_terms(log_p, log_q).sum(dim=1))
    rev = torch.where(u == 0, zero, u * kl_terms(log_q, log_p).sum(dim=1))
    return fwd + rev


def akl_rows(log_p, log_q, mu: float = 0.5) -> torch.Tensor:
    """Adaptive KL per row: ``h KL(p || q) + l KL(q || p)`` with ``(h, l) = akl_weights(...)`` constants in the
    gradients (the official code detaches the student's probabilities there); a weight of 0 drops its KL."""
    h, l = akl_weights(log_p, log_q, mu)
    # a weight of 0 drops its KL: its row's KL is taken between equal log-probs (0, gradient 0), never 0 * inf,
    # whose gradient would be NaN (mu = 1 with a masked teacher: l = 0 and KL(q || p) = inf)
    q_fwd = torch.where((h == 0).unsqueeze(1), log_p, log_q)
    p_rev = torch.where((l == 0).unsqueeze(1), log_q, log_p)
    return h * kl_terms(log_p, q_fwd).sum(dim=1) + l * kl_terms(log_q, p_rev).sum(dim=1)


def triangular_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum (p - q)^2 / (p + q)`` per row; a class with ``p + q = 0`` adds exactly 0 (value and gradient)."""
    p, q = log_p.exp(), log_q.exp()
    total = p + q
    empty = total == 0  # == 0, not > 0: a NaN probability stays NaN
    safe = torch.where(empty, torch.ones((), dtype=p.dtype, device=p.device), total)
    return torch.where(empty, torch.zeros((), dtype=p.dtype, device=p.device), (p - q) ** 2 / safe).sum(dim=1)


def kl_family_rows(log_p, log_q, a: float, b: float, w_p: float, w_q: float) -> torch.Tensor:
    """``a KL(p || m) + b KL(q || m)`` per row, ``m = w_p p + w_q q``."""
    log_m = log_mixture(log_p, log_q, w_p, w_q)
    loss = torch.zeros(log_p.shape[0], dtype=log_p.dtype, device=log_p.device)
    if a != 0:  # skipped rather than multiplied by 0: an inf term times 0 would be NaN
        loss = loss + a * kl_terms(log_p, log_m).sum(dim=1)
    if b != 0:
        loss = loss + b * kl_terms(log_q, log_m).sum(dim=1)
    return loss


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2`` (Maechler 2012).

    Each branch gets a safe input where it is not used, so neither puts NaN in the gradient.
    """
    near = x > -math.log(2.0)
    dummy = torch.full_like(x, -1.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, dummy))),
                       torch.log1p(-torch.exp(torch.where(near, dummy, x))))


def log_normalize(log_x: torch.Tensor) -> torch.Tensor:
    """``log_x - logsumexp(log_x)`` per row; a row of -inf only (no mass) stays -inf, not NaN."""
    lse = torch.logsumexp(log_x, dim=1, keepdim=True)
    return torch.where(torch.isneginf(lse), log_x, log_x - lse)


def logsumexp_near_zero(log_x: torch.Tensor) -> torch.Tensor:
    """Row logsumexp ``[N, 1]`` accurate to relative rounding when it is close to 0 (a sum close to 1).

    ``m + log1p(sum of the other terms)``: the largest term contributes exactly 1 and is
    not added to the sum, so a top-k mass of ``1 - 1e-9`` keeps its ``1e-9`` (``logsumexp``
    rounds ``log(1 + 2e-9)`` to 0 in float32). A row of -inf only gives -inf.
    """
    m = log_x.max(dim=1, keepdim=True).values
    empty = torch.isneginf(m)
    m_safe = torch.where(empty, torch.zeros_like(m), m)
    first_max = torch.zeros_like(log_x, dtype=torch.bool).scatter_(1, log_x.argmax(dim=1, keepdim=True), True)
    others = torch.where(first_max, torch.zeros_like(log_x), (log_x - m_safe).exp()).sum(dim=1, keepdim=True)
    return torch.where(empty, m, m_safe + torch.log1p(others))


def topk_log_probs(x: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor,
                   mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs over the top-k buckets: ``(log_p, log_q)``, ``[N, K(+1)]``.

    ``x``: student logits already divided by T, ``[N, V]``; ``indices`` ``[N, K]``
    (``-1``: padding); ``logprobs`` ``[N, K]`` teacher log-probs taken as given.
    ``mode="tail"`` appends the remaining-mass bucket (K + 1 columns);
    ``"renormalize"`` renormalises both over the K ids.
    """
    pad = indices == PAD_ID
    ids = indices.clamp_min(0)
    minus_inf = torch.full((), float("-inf"), dtype=x.dtype, device=x.device)
    lse = torch.logsumexp(x, dim=1, keepdim=True)
    log_q = torch.where(pad, minus_inf, x.gather(1, ids) - lse)
    log_p = torch.where(pad, minus_inf, logprobs.to(x.dtype))
    if mode == "renormalize":
        # normalised over the K ids from the gathered logits themselves (the full lse cancels), so the
        # student gradient outside the ids is exactly 0, not a rounding residue
        return log_normalize(log_p), log_normalize(torch.where(pad, minus_inf, x.gather(1, ids)))
    # Teacher tail: log(1 - sum_k p_k), with the sum clamped at 1 (an engine's log-probs may
    # sum a hair above 1 after rounding): then the tail is empty (-inf).
    lse_p = logsumexp_near_zero(log_p)
    full = lse_p >= 0
    log_p_tail = torch.where(full, minus_inf, log1mexp(torch.where(full, torch.full_like(lse_p, -1.0), lse_p)))
    # Student tail: the log-sum-exp of the ids outside the top-k, minus the full lse. This is
    # log1mexp(lse_k - lse) without its cancellation: a tail far below float32 rounding of the
    # total mass stays > 0 instead of rounding to 0 (which would make KL(p || q) infinite).
    member = torch.zeros(x.shape, dtype=torch.int32, device=x.device)
    member.scatter_add_(1, ids, (~pad).to(torch.int32))  # scatter_add: padding slots alias id 0 harmlessly
    # A row whose non-members are all -inf has an empty tail (-inf); logsumexp's gradient there is
    # exp(-inf - -inf) = NaN, which would reach those columns even times a 0, so it gets zeros instead.
    x_tail = x.masked_fill(member > 0, float("-inf"))
    no_tail = torch.isneginf(x_tail).all(dim=1, keepdim=True)
    x_tail = torch.where(no_tail, torch.zeros((), dtype=x.dtype, device=x.device), x_tail)
    log_q_tail = torch.where(no_tail, minus_inf, torch.logsumexp(x_tail, dim=1, keepdim=True)) - lse
    # a row of padding only: the tail is the whole row on both sides, exactly (loss exactly 0)
    log_q_tail = torch.where(pad.all(dim=1, keepdim=True), torch.zeros((), dtype=x.dtype), log_q_tail)
    return torch.cat([log_p, log_p_tail], dim=1), torch.cat([log_q, log_q_tail], dim=1)


def compute(student, teacher: Teacher, temperature, reduction, target, ignore_index, sample_weight,
             ce_weight, return_parts, kind, scale_t2=False, **params):
    """The loss of any divergence here, arguments already checked."""
    topk = isinstance(teacher, TopKTeacher)
    t_values = teacher.logprobs if topk else teacher
    dtype = compute_dtype(student, t_values, temperature)
    num_classes = student.shape[-1]
    s = student.reshape(-1, num_classes).to(dtype)
    n = s.shape[0]
    read = read_rows(student, target, ignore_index, sample_weight)
    if topk:
        indices = teacher.indices.reshape(n, teacher.k)
        t = teacher.logprobs.reshape(n, teacher.k).to(dtype)
    else:
        t = t_values.reshape(n, num_classes).to(dtype)
    if read is not None:
        # where() (not a product): NaN/inf in skipped rows gives loss 0 and gradient 0
        keep = read.unsqueeze(1)
        s = torch.where(keep, s, torch.zeros((), dtype=dtype))
        t = torch.where(keep, t, torch.zeros((), dtype=dtype))
        if topk:
            indices = torch.where(keep, indices, torch.full((), PAD_ID, dtype=indices.dtype))
    if isinstance(temperature, torch.Tensor):
        temp = temperature.to(device=s.device, dtype=dtype).reshape(-1)
        temp = (temp.expand(n) if temp.numel() == 1 else temp.reshape(n)).unsqueeze(1)
    else:
        temp = float(temperature)
    x = s / temp
    if topk:
        # the teacher log-probs are taken as given (already at the distillation temperature)
        log_p, log_q = topk_log_probs(x, indices, t, teacher.mode)
    else:
        log_p, log_q = F.log_softmax(t / temp, dim=1), F.log_softmax(x, dim=1)
    soft = soft_rows(log_p, log_q, kind, num_classes=num_classes, **params)
    if scale_t2:
        soft = soft * (temp.squeeze(1) ** 2 if isinstance(temp, torch.Tensor) else temp ** 2)
    hard = torch.zeros_like(soft)
    if target is not None and (ce_weight != 0 or return_parts):
        tgt = target.reshape(n).to(torch.int64)
        if read is not None:
            tgt = torch.where(read, tgt, torch.zeros_like(tgt))  # skipped rows: never index with their target
        hard = torch.logsumexp(s, dim=1) - s.gather(1, tgt.unsqueeze(1)).squeeze(1)
    row = soft + ce_weight * hard if ce_weight != 0 else soft
    weight = row_weights(student, target, ignore_index, sample_weight, reduction, dtype)

    def reduce(r):
        r = r * weight
        return r.reshape(student.shape[:-1]) if reduction == "none" else r.sum()

    loss = reduce(row)
    if not return_parts:
        return loss
    with torch.no_grad():
        return LossParts(loss, reduce(soft.detach()), reduce(hard.detach()))


# ----------------------------------------------------------------------------
# the fused row op, in plain PyTorch (docs/design.md, "divergence_fwd")
# ----------------------------------------------------------------------------

def divergence_fwd(student, teacher, topk_ids, target, row_weight, temperature: float, kind: int, a: float,
                   b: float, w_p: float, w_q: float, soft_scale: float, ce_weight: float, topk_mode: int,
                   reduce: bool, grad_student: bool, grad_teacher: bool):
    """``fastkd::divergence_fwd`` with the compiled op's signature and outputs, in plain PyTorch.

    The ground truth the fused kernels are tested against at the row-op level, and
    the per-chunk op of ``fastkd.losses.fused_linear`` on the reference backend. Computed in
    ``max(float32, input dtypes)``; gradients by autograd, returned in the inputs'
    dtypes (empty when not requested), as the fused ops return them.
    """
    dtype = compute_dtype(student, teacher)
    read = (row_weight != 0).unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=student.device)
    with torch.enable_grad():
        s = student.detach().to(dtype).requires_grad_(grad_student)
        t = teacher.detach().to(dtype).requires_grad_(grad_teacher)
        s_read, t_read = torch.where(read, s, zero), torch.where(read, t, zero)  # skipped rows: never read
        x = s_read / temperature
        if topk_mode == 0:
            log_p, log_q = F.log_softmax(t_read / temperature, dim=1), F.log_softmax(x, dim=1)
        else:
            ids = torch.where(read, topk_ids, torch.full((), PAD_ID, dtype=topk_ids.dtype, device=topk_ids.device))
            log_p, log_q = topk_log_probs(x, ids, t_read, "tail" if topk_mode == 1 else "renormalize")
        if kind == KIND_CODES["tvd"]:
            soft = tvd_rows(log_p, log_q)
        elif kind == KIND_CODES["jeffreys"]:
            soft = two_sided_kl_rows(log_p, log_q, a, b)
        elif kind == KIND_CODES["triangular"]:
            soft = triangular_rows(log_p, log_q)
        elif kind == KIND_CODES["akl"]:  # akl_fwd's a: mu
            soft = akl_rows(log_p, log_q, a)
        elif kind == KIND_CODES["ab_divergence"]:  # a, b: alpha, beta
            soft = ab_divergence_rows(log_p, log_q, a, b)
        elif kind == KIND_CODES["renyi"]:  # a: the order, b: 1 reversed
            soft = renyi_rows(log_p, log_q, a, b != 0)
        elif kind == KIND_CODES["entropy_gated_kl"]:  # a, b, w_p, w_q: alpha_min, alpha_max, tau, scale
            soft = entropy_gated_kl_rows(log_p, log_q, student.shape[1], a, b, w_p, w_q)
        else:
            soft = kl_family_rows(log_p, log_q, a, b, w_p, w_q)
        hard = torch.zeros_like(soft)
        if target.numel() > 0:
            tgt = torch.where(read.squeeze(1), target.to(torch.int64), torch.zeros_like(target, dtype=torch.int64))
            hard = torch.logsumexp(s_read, dim=1) - s_read.gather(1, tgt.unsqueeze(1)).squeeze(1)
        w = row_weight.to(dtype)
        soft_w = w * (soft_scale * soft)
        hard_w = w * hard
        loss = soft_w + ce_weight * hard_w if ce_weight != 0 else soft_w
        wanted = [x for x, want in ((s, grad_student), (t, grad_teacher)) if want]
        # allow_unused: with a = b = 0 (cross-entropy alone) the teacher is not in the graph
        # (the loss of the cross-entropy alone with only the teacher's gradient wanted has no graph at all)
        grads = (list(torch.autograd.grad(loss.sum(), wanted, allow_unused=True)) if loss.requires_grad
                 else [None] * len(wanted))
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(wanted, grads)]
    grad_s = grads.pop(0).to(student.dtype) if grad_student else student.new_empty((0,))
    grad_t = grads.pop(0).to(teacher.dtype) if grad_teacher else teacher.new_empty((0,))
    outs = [loss.detach(), soft_w.detach(), hard_w.detach()]
    if reduce:
        outs = [o.sum() for o in outs]
    return (*outs, grad_s, grad_t)


def akl_fwd(student, teacher, topk_ids, target, row_weight, temperature: float, kind: int, a: float, b: float,
            w_p: float, w_q: float, soft_scale: float, ce_weight: float, topk_mode: int, reduce: bool,
            grad_student: bool, grad_teacher: bool):
    """``fastkd::akl_fwd`` in plain PyTorch: ``divergence_fwd``'s signature, ``a`` = mu, a dense teacher."""
    check_akl_op_args(kind, a, topk_mode)
    return divergence_fwd(student, teacher, topk_ids, target, row_weight, temperature, KIND_CODES["akl"], a, b, w_p,
                          w_q, soft_scale, ce_weight, topk_mode, reduce, grad_student, grad_teacher)


# ----------------------------------------------------------------------------
# public reference functions (same signatures as fastkd.*, without backend)
# ----------------------------------------------------------------------------

_COMMON_DOC = """
    ``t`` is dense teacher logits ``[..., V]`` or a ``fastkd.TopKTeacher`` (then the
    divergence is over its top-k buckets). No ``T^2`` factor (as TRL, Liger and
    DistiLLM; ``kd_loss`` keeps Hinton's ``T^2``). Reduction, ``ignore_index``,
    ``sample_weight`` and skipped rows as ``kd_loss``; ``"batchmean"`` divides by the
    counted rows over all leading dims (as TRL's ``DistillationTrainer``; TRL's GKD loss without labels divides by dim 0 only).
    ``ce_weight`` adds ``ce_weight * cross_entropy(s, target)`` (student logits at
    T = 1, same reduction, ignore_index and sample_weight; ``"mean"`` divides it by
    counted rows * V like the soft loss). ``return_parts=True`` returns
    ``LossParts(loss, soft, hard)``.
"""


def _checked(kind: str, params: dict, student, teacher, temperature, reduction, target, ignore_index,
             sample_weight, ce_weight, return_parts):
    """Check, then compute: the body of each public reference divergence."""
    check_divergence_params(**params)
    check_divergence_args(student, teacher, temperature, reduction, target, ignore_index, sample_weight, ce_weight,
                          return_parts)
    return compute(student, teacher, temperature, reduction, target, ignore_index, sample_weight, ce_weight,
                   return_parts, kind, **params)


def forward_kl_loss(student_logits, teacher_logits: Teacher, *, temperature=1.0, reduction="batchmean",
                    target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    return _checked("forward_kl", {}, student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                    sample_weight, ce_weight, return_parts)


def reverse_kl_loss(student_logits, teacher_logits: Teacher, *, temperature=1.0, reduction="batchmean",
                    target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    return _checked("reverse_kl", {}, student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                    sample_weight, ce_weight, return_parts)


def jsd_loss(student_logits, teacher_logits: Teacher, *, beta=0.5, temperature=1.0, reduction="batchmean",
             target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    return _checked("jsd", {"beta": beta}, student_logits, teacher_logits, temperature, reduction, target,
                    ignore_index, sample_weight, ce_weight, return_parts)


def skew_kl_loss(student_logits, teacher_logits: Teacher, *, skew=0.1, reverse=False, temperature=1.0,
                 reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
                 return_parts=False):
    return _checked("skew_kl", {"skew": skew, "reverse": reverse}, student_logits, teacher_logits, temperature,
                    reduction, target, ignore_index, sample_weight, ce_weight, return_parts)


def tvd_loss(student_logits, teacher_logits: Teacher, *, temperature=1.0, reduction="batchmean", target=None,
             ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    return _checked("tvd", {}, student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                    sample_weight, ce_weight, return_parts)


def jeffreys_loss(student_logits, teacher_logits: Teacher, *, temperature=1.0, reduction="batchmean", target=None,
                  ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    return _checked("jeffreys", {}, student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                    sample_weight, ce_weight, return_parts)


def triangular_loss(student_logits, teacher_logits: Teacher, *, temperature=1.0, reduction="batchmean", target=None,
                    ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    return _checked("triangular", {}, student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                    sample_weight, ce_weight, return_parts)


def entropy_gated_kl_loss(student_logits, teacher_logits: Teacher, *, alpha_min=0.0, alpha_max=1.0, tau=0.5,
                          scale=0.1, temperature=1.0, reduction="batchmean", target=None, ignore_index=-100,
                          sample_weight=None, ce_weight=0.0, return_parts=False):
    params = {"alpha_min": alpha_min, "alpha_max": alpha_max, "tau": tau, "scale": scale}
    return _checked("entropy_gated_kl", params, student_logits, teacher_logits, temperature, reduction, target,
                    ignore_index, sample_weight, ce_weight, return_parts)


def akl_loss(student_logits, teacher_logits, *, mu=0.5, temperature=1.0, reduction="batchmean", target=None,
             ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    check_akl_teacher(teacher_logits, None)
    return _checked("akl", {"mu": mu}, student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                    sample_weight, ce_weight, return_parts)
def alpha_divergence_loss(student_logits, teacher_logits: Teacher, *, alpha=0.5, temperature=1.0,
                          reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
                          return_parts=False):
    return _checked("alpha_divergence", {"alpha": alpha}, student_logits, teacher_logits, temperature, reduction,
                    target, ignore_index, sample_weight, ce_weight, return_parts)


def ab_divergence_loss(student_logits, teacher_logits: Teacher, *, alpha=0.2, beta=0.7, temperature=1.0,
                       reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
                       return_parts=False):
    return _checked("ab_divergence", {"alpha": alpha, "beta": beta}, student_logits, teacher_logits, temperature,
                    reduction, target, ignore_index, sample_weight, ce_weight, return_parts)


def renyi_loss(student_logits, teacher_logits: Teacher, *, order=0.5, reverse=False, temperature=1.0,
               reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
               return_parts=False):
    return _checked("renyi", {"order": order, "reverse": reverse}, student_logits, teacher_logits, temperature,
                    reduction, target, ignore_index, sample_weight, ce_weight, return_parts)


def kd_topk_loss(student_logits, teacher: TopKTeacher, temperature=4.0, *, reduction="batchmean", target=None,
                 ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    """``kd_loss`` against a ``TopKTeacher``: ``T^2 * KL(p || q)`` over its buckets.

    The teacher log-probs are taken as given; ``temperature`` (a number, or a
    tensor of one value or one per row, as ``kd_loss``) divides the student logits
    and scales by ``T^2``.
    """
    if not isinstance(teacher, TopKTeacher):
        raise TypeError(f"teacher must be a fastkd.TopKTeacher, got {type(teacher).__name__}")
    check_divergence_args(student_logits, teacher, temperature, reduction, target, ignore_index, sample_weight,
                          ce_weight, return_parts, temperature_tensor=True)
    return compute(student_logits, teacher, temperature, reduction, target, ignore_index, sample_weight,
                    ce_weight, return_parts, "forward_kl", scale_t2=True)


forward_kl_loss.__doc__ = """Forward KL ``KL(p || q)`` per row (``kd_loss`` without its ``T^2``; GKD with beta = 0).
""" + _COMMON_DOC
reverse_kl_loss.__doc__ = """Reverse KL ``KL(q || p)`` per row (MiniLLM; GKD with beta = 1).
""" + _COMMON_DOC
jsd_loss.__doc__ = """Generalised JSD (GKD): ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``.

    ``beta == 0`` is ``KL(p || q)``, ``beta == 1`` is ``KL(q || p)`` (TRL's and Liger's
    special cases). ``log m`` by ``logaddexp`` (finite for any log-probs).
""" + _COMMON_DOC
skew_kl_loss.__doc__ = """Skew KL (DistiLLM): ``KL(p || skew p + (1 - skew) q)``; ``reverse=True``:
    ``KL(q || (1 - skew) p + skew q)``. The KL itself: DistiLLM's forward version
    returns ``-sum p log m`` (no teacher entropy; same gradient, value larger by H(p)).
""" + _COMMON_DOC
tvd_loss.__doc__ = """Total variation distance ``0.5 * sum |p - q|`` per row (DistiLLM).
""" + _COMMON_DOC
jeffreys_loss.__doc__ = """Jeffreys divergence ``KL(p || q) + KL(q || p)`` per row (the symmetrised KL).
""" + _COMMON_DOC
triangular_loss.__doc__ = """Triangular discrimination ``sum_c (p_c - q_c)^2 / (p_c + q_c)`` per row (classes with
    ``p_c + q_c = 0`` add exactly 0).
""" + _COMMON_DOC
entropy_gated_kl_loss.__doc__ = """Entropy-gated KL: ``w KL(p || q) + (1 - w) KL(q || p)`` per row, with
    ``w = alpha_min + (alpha_max - alpha_min) sigmoid((H(p) / log V - tau) / scale)``: the teacher's
    normalised entropy ``H(p) / log V`` (in [0, 1]) decides between mode covering (forward KL, an
    uncertain teacher) and mode seeking (reverse KL, a confident one). ``w`` depends on the teacher
    alone and is a constant in both gradients (the frozen teacher's student gradient is exact; a
    teacher gradient omits the gate's derivative). Against a ``TopKTeacher``, ``H(p)`` is that of the
    buckets (the K probabilities and the tail as one bucket; renormalised: the K), still over ``log V``.
    Defaults (fastkd's): ``alpha_min=0``, ``alpha_max=1``, ``tau=0.5``, ``scale=0.1``.
""" + _COMMON_DOC
akl_loss.__doc__ = """Adaptive KL (AKL, Wu et al., COLING 2025): ``h KL(p || q) + l KL(q || p)`` per row.

    The teacher's head is its most probable classes holding mass ``mu`` (``akl_head``: sorted, cumulative
    sum, the first class always in; ties in or out together), ``g_head`` / ``g_tail`` the sums of
    ``|p - q|`` over head and tail, ``h = g_head / max(g_head + g_tail, 1e-8)``, ``l = g_tail / max(...)``,
    constants in the gradients (the official code's ``get_ratio`` and ``AKL``). ``mu`` in (0, 1]
    (1: every class is head, ``l = 0``). Dense teacher logits only.
""" + _COMMON_DOC
alpha_divergence_loss.__doc__ = """Amari's alpha divergence per row: the AB divergence at ``beta = 1 - alpha``,
    ``(1 / (alpha (1 - alpha))) sum_c [alpha p_c + (1 - alpha) q_c - p_c^alpha q_c^(1 - alpha)]``; ``alpha -> 1`` is
    ``KL(p || q)``, ``alpha -> 0`` ``KL(q || p)``, ``alpha = 0.5`` ``4 (1 - sum sqrt(p q))``. Any finite ``alpha``.
""" + _COMMON_DOC
ab_divergence_loss.__doc__ = """The alpha-beta divergence (ABKD, Wang et al. 2025) per row, ``s = alpha + beta``::

        -(1 / (alpha beta)) sum_c [p^alpha q^beta - (alpha / s) p^s - (beta / s) q^s]

    and its limits where alpha, beta or s is 0 (``fastkd.reference.divergence.ab_divergence_rows``; the same
    values as ABKD's special cases). ABKD's code masks non-finite log-ratios to 0 in those cases; fastkd
    gives the exact value (``+inf`` where a class has mass on one side only and the divergence is infinite).
""" + _COMMON_DOC
renyi_loss.__doc__ = """Renyi divergence of order ``order`` (> 0) per row, ``log(sum_c p^r q^(1 - r)) / (r - 1)``;
    ``reverse=True`` swaps p and q. ``order -> 1`` is ``KL(p || q)`` (reversed: ``KL(q || p)``).
""" + _COMMON_DOC
