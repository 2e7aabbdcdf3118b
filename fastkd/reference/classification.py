"""Plain-PyTorch references of the classification losses (KD, DKD, ATS, DIST, MGD, SimKD, IPWD).

These mirror the official semantics written down in ``docs/methods.md`` and are
what every fused backend (cpu, cuda, triton) is tested against. They favour
obviousness over speed: each loss materialises its [N, C] temporaries.

Conventions shared by every logit loss here:

* Logits are ``[..., C]``; all leading dims are flattened into N rows.
* Work happens in ``max(float32, input dtypes)``: float16/bfloat16/float32
  inputs give a float32 loss, float64 inputs stay float64 (so
  ``torch.autograd.gradcheck`` works on this module).
* ``row_weight[i] = valid[i] * sample_weight[i] / divisor`` (from
  ``fastkd.core.rows.row_weights``) already contains the reduction divisor, so
  the loss is ``sum_i row_loss[i] * row_weight[i]``; with ``reduction="none"``
  the weighted per-row losses are returned in the leading shape.
* A skipped row -- its target equals ``ignore_index``, or its ``sample_weight``
  is exactly 0 -- is never read: its logits are replaced by zeros before any
  arithmetic, so it gives loss 0 and gradient 0 even if its logits hold NaN or
  inf (the fused kernels do not read such rows at all; one rule everywhere). A
  NaN ``sample_weight`` is not 0, so that row's loss is NaN.
* A term with probability exactly 0 under the distribution the KL is taken
  from (for example a teacher logit of ``-inf``) contributes exactly 0, in the
  loss and in the gradient. NaN inputs propagate NaN.
"""
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..core import mask as _mask
from ..core.checks import (
    check_ats_args,
    check_dist_args,
    check_dkd_args,
    check_ignore_index,
    check_kd_args,
    check_mask_args,
    check_pair,
    check_positive,
    check_seed,
    check_target,
    mgd_check_aligned,
    mgd_check_args,
    mgd_check_generated,
)
from ..core.divergence import LossParts
from ..core.rows import compute_dtype, row_weights
from .divergence import kl_terms

__all__ = [
    "kd_loss",
    "dkd_loss",
    "ats_loss",
    "dist_loss",
    "mgd_loss",
    "mgd_keep_mask",
    "simkd_loss",
    "ipw_weights",
]


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def _rows(student, teacher, target, ignore_index, dtype, sample_weight=None):
    """Flatten to [N, C] in ``dtype``; zero the logits of skipped rows.

    Skipped rows: ``target == ignore_index`` or ``sample_weight == 0``.
    Returns (s, t, safe_target or None, valid[N] bool), ``valid`` being the
    rows whose target is not ``ignore_index`` (the counted rows). Skipped rows
    get target 0 so that gathers never read an out-of-range index.
    """
    num_classes = student.shape[-1]
    s = student.reshape(-1, num_classes).to(dtype)
    t = teacher.reshape(-1, num_classes).to(dtype)
    n = s.shape[0]
    valid = torch.ones(n, dtype=torch.bool, device=s.device)
    tgt = None
    if target is not None:
        tgt = target.reshape(-1).to(torch.int64)
        valid = tgt != ignore_index
    read = valid if sample_weight is None else valid & (sample_weight.reshape(n) != 0)
    if target is None and sample_weight is None:
        return s, t, None, valid
    # where() (not a product) so NaN/inf logits of skipped rows give 0 and zero grads.
    keep = read.unsqueeze(1)
    s = torch.where(keep, s, torch.zeros_like(s))
    t = torch.where(keep, t, torch.zeros_like(t))
    if tgt is not None:
        tgt = torch.where(read, tgt, torch.zeros_like(tgt))
    return s, t, tgt, valid


def _reduce(row_loss, student, target, ignore_index, sample_weight, reduction):
    """Apply the contract's row weights; shape the result for ``reduction``."""
    # in the loss's dtype: a float32 1/N would cost float64 losses 2^-24 of relative precision
    weight = row_weights(student, target, ignore_index, sample_weight, reduction, row_loss.dtype)
    weighted = row_loss * weight
    if reduction == "none":
        return weighted.reshape(student.shape[:-1])
    return weighted.sum()


def _reduce_with_ce(row_loss, s, tgt, student, target, ignore_index, sample_weight, reduction, ce_weight,
                    return_parts):
    """``row_loss + ce_weight * CE`` reduced, or ``LossParts(loss, soft, hard)`` with ``return_parts``.

    ``s`` and ``tgt`` are the rows of ``_rows`` (skipped rows zeroed, their target 0);
    the cross-entropy ``lse(s) - s[target]`` is of the raw student logits (T = 1).
    """
    hard = torch.zeros_like(row_loss)
    if target is not None and (ce_weight != 0 or return_parts):
        hard = torch.logsumexp(s, dim=1) - s.gather(1, tgt.unsqueeze(1)).squeeze(1)
    total = row_loss + ce_weight * hard if ce_weight != 0 else row_loss
    loss = _reduce(total, student, target, ignore_index, sample_weight, reduction)
    if not return_parts:
        return loss
    with torch.no_grad():
        return LossParts(loss, _reduce(row_loss, student, target, ignore_index, sample_weight, reduction),
                         _reduce(hard, student, target, ignore_index, sample_weight, reduction))


def _temperature_column(temperature, n: int, device, dtype) -> torch.Tensor:
    """The temperature as an [N, 1] tensor in ``dtype`` (keeps autograd to a tensor input)."""
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(device=device, dtype=dtype)
        t = t.reshape(-1).expand(n) if t.numel() == 1 else t.reshape(n)
        return t.unsqueeze(1)
    return torch.full((n, 1), float(temperature), dtype=dtype, device=device)


# ----------------------------------------------------------------------------
# KD
# ----------------------------------------------------------------------------

def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: Union[float, torch.Tensor] = 4.0,
    *,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
):
    """Vanilla KD (Hinton et al. 2015), the KL divergence of tempered softmaxes.

    Per row::

        row_loss = T^2 * sum_c p_t[c] * (log p_t[c] - log p_s[c]),
        p_t = softmax(t / T),  log p_s = log_softmax(s / T)

    with terms where ``p_t[c] == 0`` contributing exactly 0. No epsilon.
    ``batchmean`` equals ``F.kl_div(log p_s, p_t, reduction="batchmean") * T^2``
    on 2-D input; leading dims are flattened into rows (so [B, L, V] divides by
    B*L, not B as ``F.kl_div`` would).

    ``temperature`` may be a number or a tensor (one element, or one value per
    row) that requires grad (CTKD): it enters both the softmaxes and the
    ``T^2`` factor, so its gradient is the full derivative of the loss.
    ``target`` skips rows equal to ``ignore_index`` and is the class of the
    optional cross-entropy: ``ce_weight`` adds ``ce_weight * (lse(s) - s[target])``
    (raw student logits, T = 1) with the same row weights; ``return_parts=True``
    returns ``LossParts(loss, soft, hard)`` (``soft``, ``hard`` detached).
    """
    check_kd_args(student_logits, teacher_logits, temperature, reduction, target, ignore_index, sample_weight,
                  ce_weight, return_parts)
    return compute_kd(student_logits, teacher_logits, temperature, reduction, target, ignore_index, sample_weight,
                      ce_weight, return_parts)


def compute_kd(student_logits, teacher_logits, temperature, reduction, target, ignore_index, sample_weight,
               ce_weight, return_parts):
    """``kd_loss`` on checked arguments (the dispatching functional's reference branch calls it)."""
    dtype = compute_dtype(student_logits, teacher_logits, temperature)
    s, t, tgt, _ = _rows(student_logits, teacher_logits, target, ignore_index, dtype, sample_weight)
    temp = _temperature_column(temperature, s.shape[0], s.device, dtype)
    log_ps = F.log_softmax(s / temp, dim=1)
    log_pt = F.log_softmax(t / temp, dim=1)
    row_loss = temp.squeeze(1) ** 2 * kl_terms(log_pt, log_ps).sum(dim=1)
    return _reduce_with_ce(row_loss, s, tgt, student_logits, target, ignore_index, sample_weight, reduction,
                           ce_weight, return_parts)


# ----------------------------------------------------------------------------
# DKD
# ----------------------------------------------------------------------------

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
):
    """Decoupled KD (Zhao et al. 2022), as mdistiller computes it, but stably.

    With ``x = logits / T`` for both nets, ``g`` the target class and
    ``lse`` = logsumexp::

        log b[0] = log p[g]     = x[g] - lse(x)
        log b[1] = log(1 - p[g]) = lse(x[c != g]) - lse(x)      (stable, no 1 - p)
        TCKD = sum_k b_t[k] * (log b_t[k] - log b_s[k])
        log q = log_softmax(x over c != g)                       (class g excluded exactly)
        NCKD = sum_{c != g} q_t[c] * (log q_t[c] - log q_s[c])
        row_loss = T^2 * (alpha * TCKD + beta * NCKD)

    mdistiller takes ``log`` of the binary probabilities without epsilon (so a
    confident row gives -inf/NaN) and excludes class g by subtracting 1000 from
    its scaled logit; both are the same mathematical quantities as above. Terms
    with zero teacher probability contribute 0. Needs at least 2 classes.
    ``ce_weight`` / ``return_parts``: as ``kd_loss``.
    """
    check_dkd_args(student_logits, teacher_logits, target, alpha, beta, temperature, reduction, ignore_index,
                   sample_weight, ce_weight, return_parts)
    return compute_dkd(student_logits, teacher_logits, target, alpha, beta, temperature, reduction, ignore_index,
                       sample_weight, ce_weight, return_parts)


def compute_dkd(student_logits, teacher_logits, target, alpha, beta, temperature, reduction, ignore_index,
                sample_weight, ce_weight, return_parts):
    """``dkd_loss`` on checked arguments (the dispatching functional's reference branch calls it)."""
    dtype = compute_dtype(student_logits, teacher_logits)
    s, t, tgt, _ = _rows(student_logits, teacher_logits, target, ignore_index, dtype, sample_weight)
    gt = F.one_hot(tgt, s.shape[1]).bool()

    def parts(x):
        x = x / temperature
        lse_all = torch.logsumexp(x, dim=1)
        x_other = x.masked_fill(gt, float("-inf"))
        lse_other = torch.logsumexp(x_other, dim=1)
        log_gt = x.gather(1, tgt.unsqueeze(1)).squeeze(1) - lse_all
        log_binary = torch.stack([log_gt, lse_other - lse_all], dim=1)
        # log_softmax over c != g (-inf at g); when every c != g is -inf the non-target
        # distribution is empty: all -inf (so NCKD = 0) instead of -inf - -inf = NaN
        empty = torch.isneginf(lse_other).unsqueeze(1)
        log_other = torch.where(empty, x_other, x_other - lse_other.unsqueeze(1))
        return log_binary, log_other

    log_b_s, log_q_s = parts(s)
    log_b_t, log_q_t = parts(t)
    tckd = kl_terms(log_b_t, log_b_s).sum(dim=1)
    nckd = kl_terms(log_q_t, log_q_s).sum(dim=1)
    row_loss = temperature**2 * (alpha * tckd + beta * nckd)
    return _reduce_with_ce(row_loss, s, tgt, student_logits, target, ignore_index, sample_weight, reduction,
                           ce_weight, return_parts)


# ----------------------------------------------------------------------------
# ATS
# ----------------------------------------------------------------------------

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
):
    """Asymmetric temperature scaling (Li et al. 2022), KL form.

    Per row, with ``g`` the target class::

        tau_c = target_temperature if c == g else other_temperature
        q     = softmax(t / tau)              (element-wise division, one softmax)
        p_s   = softmax(s / student_temperature)
        row_loss = student_temperature^2 * sum_c q[c] * (log q[c] - log p_s[c])

    The official code reports the soft cross-entropy ``-sum q log p_s``, which is
    this KL plus the teacher entropy ``-sum q log q``: same gradient w.r.t. the
    student, different value. ``ce_weight`` / ``return_parts``: as ``kd_loss``.
    """
    check_ats_args(student_logits, teacher_logits, target, target_temperature, other_temperature,
                   student_temperature, reduction, ignore_index, sample_weight, ce_weight, return_parts)
    return compute_ats(student_logits, teacher_logits, target, target_temperature, other_temperature,
                       student_temperature, reduction, ignore_index, sample_weight, ce_weight, return_parts)


def compute_ats(student_logits, teacher_logits, target, target_temperature, other_temperature, student_temperature,
                reduction, ignore_index, sample_weight, ce_weight, return_parts):
    """``ats_loss`` on checked arguments (the dispatching functional's reference branch calls it)."""
    dtype = compute_dtype(student_logits, teacher_logits)
    s, t, tgt, _ = _rows(student_logits, teacher_logits, target, ignore_index, dtype, sample_weight)
    gt = F.one_hot(tgt, s.shape[1]).bool()
    tau = torch.where(
        gt,
        torch.full_like(t, float(target_temperature)),
        torch.full_like(t, float(other_temperature)),
    )
    log_q = F.log_softmax(t / tau, dim=1)
    log_ps = F.log_softmax(s / student_temperature, dim=1)
    row_loss = student_temperature**2 * kl_terms(log_q, log_ps).sum(dim=1)
    return _reduce_with_ce(row_loss, s, tgt, student_logits, target, ignore_index, sample_weight, reduction,
                           ce_weight, return_parts)


# ----------------------------------------------------------------------------
# DIST
# ----------------------------------------------------------------------------

def _mean_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of rho(a_i, b_i), epsilon 1e-8 added to the product of norms."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    rho = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    return rho.mean()


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """DIST (Huang et al. 2022): Pearson-correlation relations of the softmaxes.

    On the whole [N, C] batch (leading dims flattened into N)::

        y_s = softmax(s / tau), y_t = softmax(t / tau)          (over classes)
        rho(a, b) = sum((a - mean a)(b - mean b)) / (||a - mean a|| * ||b - mean b|| + 1e-8)
        inter = tau^2 * (1 - mean_i rho(y_s[i, :], y_t[i, :]))
        intra = tau^2 * (1 - mean_c rho(y_s[:, c], y_t[:, c]))
        loss  = beta * inter + gamma * intra

    The intra term couples all rows, so DIST has no ignore_index, sample_weight
    or reduction. Returns a 0-d loss (float32, or float64 for float64 input);
    an empty batch gives 0.
    """
    check_dist_args(student_logits, teacher_logits, beta, gamma, temperature)
    return compute_dist(student_logits, teacher_logits, beta, gamma, temperature)


def compute_dist(student_logits, teacher_logits, beta, gamma, temperature):
    """``dist_loss`` on checked arguments (the dispatching functional's reference branch calls it)."""
    dtype = compute_dtype(student_logits, teacher_logits)
    s, t, _, _ = _rows(student_logits, teacher_logits, None, -100, dtype)
    if s.shape[0] == 0:
        # mean over zero rows would be NaN; keep the graph so backward gives zero grads.
        return (s.sum() + t.sum()) * 0.0
    y_s = F.softmax(s / temperature, dim=1)
    y_t = F.softmax(t / temperature, dim=1)
    scale = temperature**2
    inter = scale * (1.0 - _mean_pearson(y_s, y_t))
    intra = scale * (1.0 - _mean_pearson(y_s.t(), y_t.t()))
    return beta * inter + gamma * intra


# ----------------------------------------------------------------------------
# MGD
# ----------------------------------------------------------------------------

def mgd_keep_mask(
    seed: int,
    shape_nchw: Sequence[int],
    mask_ratio: float,
    mask_type: str = "channel",
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The MGD keep mask M (1 = kept, 0 = dropped) as a float tensor.

    Shape (N, C, 1, 1) for ``"channel"`` (element index ``n * C + c``) and
    (N, 1, H, W) for ``"spatial"`` (index ``n * H * W + h * W + w``); element
    ``i`` is kept iff ``hash32(seed, i) >= floor(mask_ratio * 2^32)``
    (``fastkd.core.mask``), so every backend builds the same mask bit for bit.
    """
    check_seed(seed)
    check_mask_args(mask_ratio, mask_type)
    n, c, h, w = (int(v) for v in shape_nchw)
    shape = (n, c, 1, 1) if mask_type == "channel" else (n, 1, h, w)
    count = shape[0] * shape[1] * shape[2] * shape[3]
    keep = _mask.keep_mask(seed, count, float(mask_ratio), device=device)
    return keep.reshape(shape).to(dtype)


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
) -> torch.Tensor:
    """Masked generative distillation (Yang et al. 2022)::

        x    = align(student_feat) if align is not None else student_feat
        loss = alpha * sum((generation(x * M) - teacher_feat)^2) / N

    summed over all elements and divided by the batch size N only. ``M`` is
    ``mgd_keep_mask(seed, x.shape, mask_ratio, mask_type)``: whole channels
    (N, C, 1, 1) for ``"channel"`` (classification) or positions (N, 1, H, W)
    for ``"spatial"`` (detection / segmentation), each dropped with
    probability ``mask_ratio``. The seed is
    ``int(torch.randint(0, 2**31 - 1, (1,), generator=generator))`` (the global
    RNG if ``generator`` is None) unless ``seed`` is given, which pins the mask
    and ignores ``generator``.
    """
    mgd_check_args(student_feat, teacher_feat, generation, align, alpha, mask_ratio, mask_type, generator)
    if seed is not None:
        check_seed(seed)
    x = align(student_feat) if align is not None else student_feat
    mgd_check_aligned(x, teacher_feat, align is not None)
    if seed is None:
        seed = _mask.draw_seed(generator)
    mask = mgd_keep_mask(seed, x.shape, mask_ratio, mask_type, device=x.device, dtype=x.dtype)
    pred = generation(x * mask)
    mgd_check_generated(pred, teacher_feat)
    dtype = compute_dtype(pred, teacher_feat)
    diff = pred.to(dtype) - teacher_feat.to(dtype)
    return alpha * (diff * diff).sum() / max(teacher_feat.shape[0], 1)


# ----------------------------------------------------------------------------
# SimKD
# ----------------------------------------------------------------------------

def simkd_loss(projected_student: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """SimKD (Chen et al. 2022): mean squared error over all elements::

        loss = sum((projected_student - teacher_feat)^2) / numel

    Pooling to a common spatial size and the projector are the caller's
    (``fastkd.nn``); an empty input gives 0.
    """
    for name, x in (("projected_student", projected_student), ("teacher_feat", teacher_feat)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if projected_student.shape != teacher_feat.shape:
        raise ValueError(
            f"projected_student and teacher_feat must have the same shape, "
            f"got {tuple(projected_student.shape)} and {tuple(teacher_feat.shape)}"
        )
    if projected_student.device != teacher_feat.device:
        raise ValueError(
            f"projected_student and teacher_feat must be on the same device, "
            f"got {projected_student.device} and {teacher_feat.device}"
        )
    dtype = compute_dtype(projected_student, teacher_feat)
    diff = projected_student.to(dtype) - teacher_feat.to(dtype)
    return (diff * diff).sum() / max(diff.numel(), 1)


# ----------------------------------------------------------------------------
# IPWD weights
# ----------------------------------------------------------------------------

def ipw_weights(
    kd_logits: torch.Tensor,
    aux_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    clip: Optional[Tuple[float, float]] = (0.1, 10.0),
    normalize: bool = True,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-sample inverse-propensity weights for IPWD (Niu et al. 2022).

    ``kd_logits`` come from the head trained by distillation (the "machine
    domain" the teacher represents), ``aux_logits`` from an auxiliary head on
    the same features trained with plain CE (the "human", ground-truth
    domain). No official code exists; the estimator chosen here is::

        propensity_i = p_kd[i, y_i] / p_aux[i, y_i]       (p = softmax, y = target)
        w_i = 1 / propensity_i = exp(log_softmax(aux)[i, y_i] - log_softmax(kd)[i, y_i])
        w_i = clamp(w_i, clip[0], clip[1])                 (if clip is not None)
        w_i = w_i / mean_{counted j} w_j                   (if normalize)

    Why this form: the propensity must say how well the teacher's domain
    represents sample i relative to the ground truth. The ratio of the two
    heads' probabilities of the true class is 1 where the KD head agrees with
    the CE head, below 1 where the teacher under-weights the true class (so
    that sample gets a weight above 1, as IPWD intends), and above 1 where the
    teacher over-represents it. It is computed in log space, so confident
    heads cannot divide by an underflowed probability. Clipping bounds the
    variance of inverse-probability weights (the usual truncated IPW), and
    self-normalising to mean 1 over counted rows keeps the KD term's overall
    scale (and its tuned loss weight) unchanged; the mean is taken *after*
    clipping, so normalised weights may leave the clip range.

    Rows with ``target == ignore_index`` get weight 0 and are not counted; if
    no row is counted every weight is 0. The weights are detached (no gradient
    reaches either head) and returned as float32 with ``target``'s shape, ready
    to pass as ``sample_weight`` to any logit loss. NaN logits give NaN weights.
    """
    check_pair(kd_logits, aux_logits, "kd_logits", "aux_logits")
    check_ignore_index(ignore_index)
    check_target(target, kd_logits, ignore_index, required=True)
    if clip is not None:
        if not isinstance(clip, (tuple, list)) or len(clip) != 2:
            raise TypeError(f"clip must be a (low, high) pair or None, got {clip!r}")
        check_positive("clip[0]", clip[0])
        check_positive("clip[1]", clip[1])
        if clip[0] > clip[1]:
            raise ValueError(f"clip must have low <= high, got {tuple(clip)}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")

    with torch.no_grad():
        dtype = compute_dtype(kd_logits, aux_logits)
        kd, aux, tgt, valid = _rows(kd_logits.detach(), aux_logits.detach(), target, ignore_index, dtype)
        index = tgt.unsqueeze(1)
        log_w = (F.log_softmax(aux, dim=1).gather(1, index) - F.log_softmax(kd, dim=1).gather(1, index)).squeeze(1)
        w = log_w.exp()
        if clip is not None:
            w = w.clamp(float(clip[0]), float(clip[1]))
        w = torch.where(valid, w, torch.zeros_like(w))
        if normalize:
            counted = valid.sum().to(dtype)
            # No counted row: every weight is already 0; divide by 1 instead of 0.
            w = w * (counted / torch.where(counted > 0, w.sum(), torch.ones_like(counted)))
        return w.to(torch.float32).reshape(target.shape)
