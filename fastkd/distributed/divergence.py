"""Vocabulary parallel: the divergences (dense and top-k teachers), with the cross-entropy.

Public: ``kd_loss``, ``reverse_kl_loss``, ``jsd_loss``, ``skew_kl_loss``, ``tvd_loss``, ``jeffreys_loss``,
``triangular_loss``, ``entropy_gated_kl_loss``, ``akl_loss`` (the
signatures of ``fastkd.*`` plus ``process_group``). The row math is ``divergence_rows``: three
all-reduces of per-row numbers per row chunk (``fastkd.distributed``'s docstring); AKL adds its head's
radix sweeps (``distributed/akl.py``).
"""
from types import SimpleNamespace
from typing import Union

import torch
import torch.distributed as dist

from ..core import checks as v
from ..core.divergence import (AKL_MU_DEFAULT, ENTROPY_GATE_DEFAULTS, KIND_CODES, LossParts,
                               check_divergence_params, divergence_op_args, entropy_gate, renyi_row)
from ..core.rows import compute_dtype, read_rows
from ..core.topk import PAD_ID, TopKTeacher
from ..reference import divergence as R
from ..reference.power import renyi_parts
from .akl import akl_rows, two_sided_rows
from .comm import all_reduce, check_group_shapes, group_geometry
from .rows import (
    MINUS_INF, StoredGradLoss, check_global_ids, common_checks, forward_kl_and_grads,
    gather_owned, ids_in_range, local_columns, masked_max, masked_sum_exp, poison, row_weight, run_chunks,
    safe_shift, soft_and_grads, stand_in,
)
from .shard_kernels import divergence_rows_kernel, kernels_take_all_rows, shard_kernels

Teacher = Union[torch.Tensor, TopKTeacher]


# ----------------------------------------------------------------------------
# vocabulary parallel: the divergences (dense and top-k teachers), with the cross-entropy
# ----------------------------------------------------------------------------

def _divergence(student, teacher: Teacher, temperature, reduction, target, ignore_index, sample_weight,
                ce_weight, return_parts, process_group, kind, soft_scale_t2=False, **params):
    common_checks(student, teacher, reduction, target, ignore_index, sample_weight, ce_weight != 0)
    tensor_temp = isinstance(temperature, torch.Tensor)
    if tensor_temp:
        if not soft_scale_t2 or isinstance(teacher, TopKTeacher):
            raise TypeError("a tensor temperature (CTKD) is taken by the vocabulary-parallel kd_loss with dense "
                            "teacher logits only; pass temperature as a Python number")
        v.check_temperature_tensor(temperature, student)
    else:
        v.check_positive("temperature", temperature)
    v.check_ce(ce_weight, return_parts, target)
    rank, world, width = group_geometry(student, process_group)
    topk = isinstance(teacher, TopKTeacher)
    t_in = teacher.logprobs if topk else teacher
    T = 1.0 if tensor_temp else float(temperature)  # a tensor temperature: per-row rows below instead
    soft_scale = T * T if soft_scale_t2 else 1.0
    use_ce = target is not None and (ce_weight != 0 or return_parts)
    need_temp = tensor_temp and torch.is_grad_enabled() and temperature.requires_grad
    need_s = torch.is_grad_enabled() and student.requires_grad
    need_t = torch.is_grad_enabled() and t_in.requires_grad
    lead = student.shape[:-1]

    dtype = compute_dtype(student, t_in)
    dev = student.device
    offset, vocab = rank * width, world * width
    s_all = student.reshape(-1, width)
    n_all = s_all.shape[0]
    t_all = t_in.reshape(n_all, t_in.shape[-1])  # (not -1: N may be 0)
    read_all = read_rows(student, target, ignore_index, sample_weight)
    if topk:  # ids in [-1, V) and distinct within each read row (CPU; free there)
        teacher.check_against(stand_in(student, vocab), read_all)
    if use_ce:
        check_global_ids("target", target.reshape(n_all), read_all, vocab, 0)
    weight_all = row_weight(n_all, target, ignore_index, sample_weight, reduction, vocab, dtype, dev)
    ids_all = teacher.indices.reshape(n_all, teacher.indices.shape[-1]) if topk else None
    temp_all = None
    if tensor_temp:  # one value per row, in the compute dtype (its gradient is formed here, by hand)
        temp_all = temperature.detach().to(device=dev, dtype=dtype).reshape(-1)
        temp_all = temp_all.expand(n_all) if temp_all.numel() == 1 else temp_all

    c = SimpleNamespace(kind=kind, params=params, T=T, soft_scale=soft_scale, mode=teacher.mode if topk else None,
                        use_ce=use_ce, ce_weight=float(ce_weight), width=width, offset=offset, vocab=vocab,
                        need_s=need_s, need_t=need_t, need_temp=need_temp, dtype=dtype, group=process_group)
    tgt_all = target.reshape(n_all).to(torch.int64) if use_ce else None

    def compute():
        equal = check_group_shapes(n_all, width, process_group, dev, (student.dtype, t_in.dtype),
                                    (need_s, need_t, need_temp))

        def body(r, out):
            return divergence_rows(c, s_all[r], t_all[r], ids_all[r] if topk else None,
                                    tgt_all[r] if use_ce else None, None if read_all is None else read_all[r],
                                    weight_all[r], equal, None if temp_all is None else temp_all[r], out)

        return run_chunks(body, n_all, student, t_in, need_s, need_t, reduction, lead,
                           whole=temp_all is None and kernels_take_all_rows(c, s_all, t_all))

    loss, soft, hard = StoredGradLoss.apply(compute, student, t_in, temperature if tensor_temp else None)
    return LossParts(loss, soft, hard) if return_parts else loss


def _tvd_factor(x, y, x_lt, x_gt, tie):
    """csrc/divergence_math.h's div_tvd_factor: the TVD gradient's bracket (times 0.5 x), per row sums [n, 1]."""
    return torch.where(x > y, tie + 2.0 * x_lt, torch.where(x < y, -(tie + 2.0 * x_gt), x_lt - x_gt))


def _tvd_rows(lp, lq, need_s, need_t, group):
    """TVD of the dense rows (log-probs over the shard): the row sums and d soft / d(s / T), d soft / d(t / T).

    Third round: the loss part and the five sign masses (q where q < p, q > p; p where p < q, p > q;
    p where p == q) instead of sum G, sum H: the form ``G - q sum G`` cancels on a peaked row's largest
    class (1e-5 relative in float32), the sign-mass bracket does not (as the CPU op, divergence_math.h).
    """
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    parts = [(0.5 * (p - q).abs()).sum(dim=1)]
    if need_s or need_t:
        parts.append(torch.stack([torch.where(q < p, q, zero).sum(dim=1), torch.where(q > p, q, zero).sum(dim=1),
                                  torch.where(p < q, p, zero).sum(dim=1), torch.where(p > q, p, zero).sum(dim=1),
                                  torch.where(p == q, p, zero).sum(dim=1)], dim=1))
    red = all_reduce(parts, dist.ReduceOp.SUM, group)
    grad_a = grad_b = None
    if need_s or need_t:
        # (a NaN in one net: its sign comparisons are all False, so the other net's gradient is 0 there, as
        # in the single-process losses and the reference)
        q_lt, q_gt, p_lt, p_gt, tie = red[1].unsqueeze(2).unbind(1)
        if need_s:
            grad_a = 0.5 * q * _tvd_factor(q, p, q_lt, q_gt, tie)
        if need_t:
            grad_b = 0.5 * p * _tvd_factor(p, q, p_lt, p_gt, tie)
    return red[0], grad_a, grad_b


def _gated_rows(lp, lq, vocab, params, group):
    """Entropy-gated KL of the dense rows (log-probs over the shard): the row sums and d soft / d(s / T),
    d soft / d(t / T) (both formed; the caller keeps those it needs).

    Third round: the shard's parts of ``KL(p || q)``, ``KL(q || p)`` and ``H(p)``, so the gate ``w`` sees the
    whole vocabulary's entropy over ``log V`` (``V`` the whole vocabulary); then kind 2's
    ``G = (1 - w) q (lq - lp) - w p``, ``H = w p (lp - lq) - (1 - w) q`` at that fixed ``w``.
    """
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    kl_p = torch.where(p == 0, zero, p * (lp - lq))
    kl_q = torch.where(q == 0, zero, q * (lq - lp))
    entropy = torch.where(p == 0, zero, -p * lp)
    red = all_reduce([kl_p.sum(dim=1), kl_q.sum(dim=1), entropy.sum(dim=1)], dist.ReduceOp.SUM, group)
    w = entropy_gate(red[2], vocab, **{**ENTROPY_GATE_DEFAULTS, **params})
    return two_sided_rows(p, q, kl_p, kl_q, red[:2], w, 1.0 - w)


def _renyi_rows(lp, lq, params, group):
    """Renyi of the dense rows (log-probs over the shard): the row losses and d soft / d(s / T), d soft / d(t / T).

    Third round: the shard's part of ``U`` (``reference.power.renyi_parts``), so ``S = 1 + (1 - r) U`` is the
    whole vocabulary's; then the x side's ``G = -r t / S`` and the y side's ``-x^r y^(1 - r) / S``
    (``core.divergence.renyi_row``: the sums).
    """
    order, reverse = params.get("order", 0.5), params.get("reverse", False)
    t, xy = renyi_parts(lp, lq, order, reverse)
    red = all_reduce([t.sum(dim=1), xy.sum(dim=1)], dist.ReduceOp.SUM, group)  # U, S
    soft, sum_g, sum_h, inv_s, direct = renyi_row(red[0], red[1], order, reverse)
    inv_s, direct = inv_s.unsqueeze(1), direct.unsqueeze(1) != 0
    exact = order / (order - 1.0) if order != 1 else 0.0  # direct rows (S < 1/2): the exact x side
    x_side, y_side = torch.where(direct, exact * xy * inv_s, -order * t * inv_s), -xy * inv_s
    dead = inv_s == 0  # an infinite row: a constant, gradients 0
    x_side, y_side = torch.where(dead, 0.0, x_side), torch.where(dead, 0.0, y_side)
    g, h = (x_side, y_side) if reverse else (y_side, x_side)
    return soft, g - lq.exp() * sum_g.unsqueeze(1), h - lp.exp() * sum_h.unsqueeze(1)


# Long on purpose (about 140 lines): the three collectives of a row chunk and the math between them read
# top to bottom in the order they run; split up, a dozen per-row tensors would travel between helpers.
def divergence_rows(c, s, t, ids, tgt, read, weight, equal, temp=None, out=(None, None)):
    """One chunk of rows of a vocabulary-parallel divergence (and its cross-entropy): three collectives.

    ``s`` [n, V_local] student logits and ``t`` (teacher logits [n, V_local] or top-k log-probs
    [n, K]) in any float dtype; ``ids`` [n, K] global top-k ids or None; ``tgt`` [n] int64 global
    targets (None without the CE); ``read`` bool [n] (None: every row) and ``weight`` [n] the
    contract's row weights; ``equal`` the 0-d bool of ``check_group_shapes``; ``out``: float32
    buffers the shard kernels may write the gradients into (``run_chunks``). ``c``: the call's
    constants (built in ``_divergence``, ``fused_linear_kd_loss``'s sharded row op). Returns the
    row-weighted (loss, soft, hard) [n] and the weighted gradients w.r.t. ``s`` and ``t`` (None
    where not requested), in ``c.dtype``, and the weighted ``d loss_row / d temp_row`` [n] when
    ``temp`` (the rows' temperatures, [n]: ``kd_loss`` with a tensor temperature, so forward KL
    with ``T^2``, dense teacher) is given and ``c.need_temp``, else None.
    """
    ops = shard_kernels(c, s) if temp is None else None
    if ops is not None:
        return divergence_rows_kernel(ops, c, s, t, tgt, read, weight, equal, out)
    dtype, dev, width, offset, vocab = c.dtype, s.device, c.width, c.offset, c.vocab
    # T broadcasts over a row ([n, 1] for a tensor temperature); the row scales are [n] or floats
    t_rows = c.T if temp is None else temp
    T = c.T if temp is None else temp.unsqueeze(1)
    scale_rows = c.soft_scale if temp is None else temp * temp
    need_temp = temp is not None and c.need_temp
    topk, use_ce, need_s, need_t, process_group = c.mode is not None, c.use_ce, c.need_s, c.need_t, c.group
    kind, params, ce_weight = c.kind, c.params, c.ce_weight
    s, t = s.to(dtype), t.to(dtype)
    if read is not None:  # skipped rows are never read: zeros in their place, before any arithmetic
        keep = read.unsqueeze(1)
        s = torch.where(keep, s, torch.zeros((), dtype=dtype, device=dev))
        t = torch.where(keep, t, torch.zeros((), dtype=dtype, device=dev))
        if topk:
            ids = torch.where(keep, ids, torch.full((), PAD_ID, dtype=ids.dtype, device=dev))
        if use_ce:
            tgt = torch.where(read, tgt, torch.zeros_like(tgt))
    tail = c.mode == "tail"
    if topk:
        pad = ids == PAD_ID
        own, col = local_columns(ids, offset, width)
        # count of owned ids per local column (scatter_add: unowned slots add 0 at a clamped column)
        members = torch.zeros(s.shape, dtype=torch.int32, device=dev)
        members.scatter_add_(1, col, own.to(torch.int32))
        non_member = members == 0
        del members

    # 1. MAX of the raw row maxima (the shifts)
    maxima = [s.amax(dim=1)]
    if not topk:
        maxima.append(t.amax(dim=1))
    if tail:
        maxima.append(masked_max(s, non_member))
    maxima = all_reduce(maxima, dist.ReduceOp.MAX, process_group)
    m_s = safe_shift(maxima[0]).unsqueeze(1)
    a = (s - m_s) / T  # student logits / T, shifted in raw units first (precision at large offsets)

    # 2. SUM of the sums of exponentials and of the logits at global ids
    sums = [a.exp().sum(dim=1)]
    if not topk:
        m_t = safe_shift(maxima[1]).unsqueeze(1)
        b = (t - m_t) / T
        sums.append(b.exp().sum(dim=1))
    if tail:
        m_tail = safe_shift(maxima[-1]).unsqueeze(1)
        a_tail = (s - m_tail) / T
        sums.append(masked_sum_exp(a_tail, non_member))
    if use_ce:
        t_own, t_col = local_columns(tgt.unsqueeze(1), offset, width)
        sums.append((s - m_s).exp().sum(dim=1))
        sums.append(gather_owned(s, t_own, t_col).squeeze(1))
    if topk:
        sums.append(gather_owned(a, own, col))
    sums = all_reduce(sums, dist.ReduceOp.SUM, process_group)
    log_z = sums[0].log().unsqueeze(1)
    lq = a - log_z  # log q over the shard (q = softmax(s / T) over the whole vocabulary)

    grad_a = grad_b = grad_temp = None
    if not topk and kind == "entropy_gated_kl":
        soft, grad_a, grad_b = _gated_rows(b - sums[1].log().unsqueeze(1), lq, vocab, params, process_group)
    elif not topk and kind == "akl":  # the head's radix sweeps, then one SUM (distributed/akl.py)
        soft, grad_a, grad_b = akl_rows(t, b - sums[1].log().unsqueeze(1), lq, maxima[1],
                                        params.get("mu", AKL_MU_DEFAULT), process_group)
    elif not topk and kind == "renyi":
        soft, grad_a, grad_b = _renyi_rows(b - sums[1].log().unsqueeze(1), lq, params, process_group)
    elif not topk and kind == "tvd":
        soft, grad_a, grad_b = _tvd_rows(b - sums[1].log().unsqueeze(1), lq, need_s, need_t, process_group)
    elif not topk:
        lp = b - sums[1].log().unsqueeze(1)
        if divergence_op_args(kind, **params) == (KIND_CODES["kl_family"], 1.0, 0.0, 0.0, 1.0):
            part, g, h = forward_kl_and_grads(lp, lq, need_t or need_temp)  # KD's forward KL: closed form
        else:
            part, g, h = soft_and_grads(lambda lp_, lq_: R.soft_rows(lp_, lq_, kind, **params), lp, lq,
                                         need_t)
        # 3. SUM of the partial divergences and of sum G, sum H
        red = [part, g.sum(dim=1)] + ([h.sum(dim=1)] if need_t else [])
        if need_temp:
            # d KL / d T = -(S1 + S2 - KL S3) / T, S1 = sum (q - p) a, S2 = sum H b, S3 = sum p b (a = s / T,
            # b = t / T; d KL / d a = q - p, d KL / d b = H - p KL; the shifts cancel: both sum to 0)
            # a zero probability adds 0 (as in the loss): its logit may be -inf, and 0 * -inf is NaN
            p, q, zero = -g, lq.exp(), torch.zeros((), dtype=dtype, device=dev)

            def where_positive(w, x):  # row sums of x where the probability w > 0
                return torch.where(w > 0, x, zero).sum(dim=1)

            red += [where_positive(q, q * a) - where_positive(p, p * a), where_positive(p, h * b),
                    where_positive(p, p * b)]
        red = all_reduce(red, dist.ReduceOp.SUM, process_group)
        if need_temp:
            s1, s2, s3 = red[-3:]
            grad_temp = t_rows * (2.0 * red[0] - s1 - s2 + red[0] * s3)  # d (T^2 KL) / d T
        soft = red[0]
        if need_s:
            grad_a = g - lq.exp() * red[1].unsqueeze(1)
        if need_t:
            grad_b = h - lp.exp() * red[2].unsqueeze(1)
    else:
        lq_tail = None
        if tail:
            # log q_tail = lse(s / T over the non-ids) - lse(s / T), each sum at its own shift: exact
            # however small the tail (never 1 - sum_k q_k); a row of padding only: the whole row, 0
            lq_tail = (m_tail - m_s) / T + sums[1].log().unsqueeze(1) - log_z
            lq_tail = torch.where(pad.all(dim=1, keepdim=True), torch.zeros((), dtype=dtype, device=dev), lq_tail)
        soft, grad_a, grad_b = _topk_buckets(c.mode, kind, params, sums, a, lq, t, pad, own, col,
                                             non_member if tail else None, a_tail if tail else None,
                                             lq_tail, need_s, need_t, vocab)
    soft = soft * scale_rows
    hard = torch.zeros_like(soft)
    if use_ce:
        z1, s_target = sums[-3 if topk else -2], sums[-2 if topk else -1]
        hard = (m_s.squeeze(1) - s_target) + z1.log()  # lse(s) - s[target], T = 1
    ok = equal
    if topk:
        ok = ok & ids_in_range(ids, read, vocab, PAD_ID)
    if use_ce:
        ok = ok & ids_in_range(tgt.unsqueeze(1), read, vocab, 0)
    weight = poison(weight, ok)
    rows = soft + ce_weight * hard if ce_weight != 0 else soft

    grad_s = grad_t = None
    if need_s:
        gs = grad_a * (weight * (scale_rows / t_rows)).unsqueeze(1)
        if use_ce and ce_weight != 0:
            wce = (weight * ce_weight).unsqueeze(1)
            gs = gs + wce * ((s - m_s).exp() / z1.unsqueeze(1))  # softmax(s) at T = 1
            gs.scatter_add_(1, t_col, torch.where(t_own, -wce, torch.zeros((), dtype=dtype, device=dev)))
        grad_s = gs
    if need_t:
        # dense teacher: d/dt = (H - p sum H) / T; top-k log-probs: no 1/T (they are not divided by T)
        scale = weight * (scale_rows if topk else scale_rows / t_rows)
        grad_t = grad_b * scale.unsqueeze(1)
    if grad_temp is not None:
        grad_temp = grad_temp * weight
    return rows * weight, soft * weight, hard * weight, grad_s, grad_t, grad_temp


def _topk_buckets(mode, kind, params, sums, a, lq, logprobs, pad, own, col, non_member, a_tail, lq_tail,
                  need_s, need_t, vocab):
    """Divergence over the top-k buckets (replicated, [N, K(+1)]) and the local gradient slices.

    Every rank holds the same all-reduced bucket log-probs, so the bucket math (the
    reference's ``topk_log_probs`` with the whole-vocabulary sums supplied) runs
    identically everywhere and needs no third collective. Returns
    (soft [N], d soft / d a [N, V_local], d soft / d logprobs [N, K]).
    """
    dtype = a.dtype
    minus_inf = torch.full((), MINUS_INF, dtype=dtype, device=a.device)
    log_z = sums[0].unsqueeze(1).log()
    a_ids = sums[-1]  # [N, K]: a (= s / T shifted) at the ids, from their owners
    only_pad = pad.all(dim=1, keepdim=True)
    with torch.enable_grad():
        x_ids = a_ids.detach().requires_grad_(need_s)  # leaf: log q_k + log Z (tail) or before renormalising
        lp_in = logprobs.detach().requires_grad_(need_t)
        log_p = torch.where(pad, minus_inf, lp_in)
        if mode == "renormalize":
            log_p, log_q = R.log_normalize(log_p), R.log_normalize(torch.where(pad, minus_inf, x_ids))
            leaves = [x_ids]
        else:
            log_q = torch.where(pad, minus_inf, x_ids - log_z)
            lse_p = R.logsumexp_near_zero(log_p)
            full = lse_p >= 0
            safe = torch.where(full, torch.full_like(lse_p, -1.0), lse_p)
            log_p_tail = torch.where(full, minus_inf, R.log1mexp(safe))
            # the tail's log q comes from the whole-vocabulary sums (a leaf here; chained in below)
            lq_tail = lq_tail.detach().requires_grad_(need_s)
            log_p = torch.cat([log_p, log_p_tail], dim=1)
            log_q = torch.cat([log_q, lq_tail], dim=1)
            leaves = [x_ids, lq_tail]
        rows = R.soft_rows(log_p, log_q, kind, num_classes=vocab, **params)
        wanted = ([*leaves] if need_s else []) + ([lp_in] if need_t else [])
        grads = list(torch.autograd.grad(rows.sum(), wanted, allow_unused=True)) if wanted else []
    rows = rows.detach()
    grad_a = grad_lp = None
    if need_s:
        g_ids = grads[0] if grads[0] is not None else torch.zeros_like(a_ids)
        g_ids = torch.where(pad, torch.zeros((), dtype=dtype, device=a.device), g_ids)
        if mode == "renormalize":
            grad_a = torch.zeros_like(a)  # exactly 0 outside the ids
        else:
            g_tail = torch.where(only_pad, torch.zeros((), dtype=dtype, device=a.device), grads[1])
            # d/da_c: member c = id_k: g_k - q_c sum g; non-member: softmax_tail(c) g_tail - q_c sum g
            total = g_ids.sum(dim=1, keepdim=True) + g_tail
            tail_log_z = sums[1].unsqueeze(1).log()
            grad_a = torch.where(non_member, (a_tail - tail_log_z).exp() * g_tail,
                                 torch.zeros((), dtype=dtype, device=a.device)) - lq.exp() * total
        grad_a.scatter_add_(1, col, torch.where(own, g_ids, torch.zeros((), dtype=dtype, device=a.device)))
    if need_t:
        grad_lp = grads[-1]
        grad_lp = torch.where(pad, torch.zeros((), dtype=dtype, device=a.device), grad_lp)
    return rows, grad_a, grad_lp


# ----------------------------------------------------------------------------
# public vocabulary-parallel losses (signatures as fastkd.*, plus process_group)
# ----------------------------------------------------------------------------

def kd_loss(student_logits, teacher_logits: Teacher, temperature: float = 4.0, *, process_group,
            reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
            return_parts=False):
    """``fastkd.kd_loss`` over a vocabulary-sharded process group: ``T^2 KL(p || q)``.

    ``temperature``: a number, or (dense teacher logits) a tensor of one value or one per row
    that receives a gradient (CTKD): ``d (T^2 KL) / dT = T (2 KL - S1 - S2 + KL S3)`` with the
    row sums ``S1 = sum (q - p) a``, ``S2 = sum p (log p - log q) b``, ``S3 = sum p b``
    (``a = s / T``, ``b = t / T``), all-reduced with the third round's other sums.
    """
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "forward_kl", soft_scale_t2=True)


def forward_kl_loss(student_logits, teacher_logits: Teacher, *, process_group, temperature=1.0,
                    reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
                    return_parts=False):
    """``fastkd.forward_kl_loss`` over a vocabulary-sharded process group (``kd_loss`` without ``T^2``)."""
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "forward_kl")


def reverse_kl_loss(student_logits, teacher_logits: Teacher, *, process_group, temperature=1.0,
                    reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
                    return_parts=False):
    """``fastkd.reverse_kl_loss`` over a vocabulary-sharded process group."""
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "reverse_kl")


def jsd_loss(student_logits, teacher_logits: Teacher, *, process_group, beta=0.5, temperature=1.0,
             reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
             return_parts=False):
    """``fastkd.jsd_loss`` over a vocabulary-sharded process group."""
    check_divergence_params(beta=beta)
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "jsd", beta=beta)


def skew_kl_loss(student_logits, teacher_logits: Teacher, *, process_group, skew=0.1, reverse=False,
                 temperature=1.0, reduction="batchmean", target=None, ignore_index=-100, sample_weight=None,
                 ce_weight=0.0, return_parts=False):
    """``fastkd.skew_kl_loss`` over a vocabulary-sharded process group."""
    check_divergence_params(skew=skew, reverse=reverse)
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "skew_kl", skew=skew, reverse=reverse)


def tvd_loss(student_logits, teacher_logits: Teacher, *, process_group, temperature=1.0, reduction="batchmean",
             target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    """``fastkd.tvd_loss`` over a vocabulary-sharded process group."""
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "tvd")


def jeffreys_loss(student_logits, teacher_logits: Teacher, *, process_group, temperature=1.0,
                  reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
                  return_parts=False):
    """``fastkd.jeffreys_loss`` over a vocabulary-sharded process group."""
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "jeffreys")


def entropy_gated_kl_loss(student_logits, teacher_logits: Teacher, *, process_group, alpha_min=0.0,
                          alpha_max=1.0, tau=0.5, scale=0.1, temperature=1.0, reduction="batchmean", target=None,
                          ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    """``fastkd.entropy_gated_kl_loss`` over a vocabulary-sharded process group (the gate's entropy and
    ``log V`` are the whole vocabulary's: the shards' sums are all-reduced before it is formed)."""
    params = {"alpha_min": alpha_min, "alpha_max": alpha_max, "tau": tau, "scale": scale}
    check_divergence_params(**params)
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "entropy_gated_kl", **params)


def triangular_loss(student_logits, teacher_logits: Teacher, *, process_group, temperature=1.0,
                    reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
                    return_parts=False):
    """``fastkd.triangular_loss`` over a vocabulary-sharded process group."""
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "triangular")


def alpha_divergence_loss(student_logits, teacher_logits: Teacher, *, process_group, alpha=0.5, temperature=1.0,
                          reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
                          return_parts=False):
    """``fastkd.alpha_divergence_loss`` over a vocabulary-sharded process group."""
    check_divergence_params(alpha=alpha)
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "alpha_divergence", alpha=alpha)


def ab_divergence_loss(student_logits, teacher_logits: Teacher, *, process_group, alpha=0.2, beta=0.7,
                       temperature=1.0, reduction="batchmean", target=None, ignore_index=-100, sample_weight=None,
                       ce_weight=0.0, return_parts=False):
    """``fastkd.ab_divergence_loss`` over a vocabulary-sharded process group."""
    check_divergence_params(alpha=alpha, beta=beta)
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "ab_divergence", alpha=alpha, beta=beta)


def renyi_loss(student_logits, teacher_logits: Teacher, *, process_group, order=0.5, reverse=False, temperature=1.0,
               reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
               return_parts=False):
    """``fastkd.renyi_loss`` over a vocabulary-sharded process group (``U`` all-reduced before the log: the
    divergence is no sum of per-class terms)."""
    check_divergence_params(order=order, reverse=reverse)
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "renyi", order=order, reverse=reverse)


def akl_loss(student_logits, teacher_logits, *, process_group, mu=0.5, temperature=1.0, reduction="batchmean",
             target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    """``fastkd.akl_loss`` over a vocabulary-sharded process group, dense teacher logits (the head's threshold over
    the whole vocabulary by radix sweeps of all-reduced mass histograms: ``distributed/akl.py``)."""
    check_divergence_params(mu=mu)
    if isinstance(teacher_logits, TopKTeacher):
        raise TypeError("the vocabulary-parallel akl_loss takes dense teacher logits, not a TopKTeacher")
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "akl", mu=float(mu))
