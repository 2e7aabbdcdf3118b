"""Vocabulary parallel DKD and ATS (the target column lives on one rank), and data-parallel DIST."""
import torch
import torch.distributed as dist

from ..core import checks as v
from ..core.rows import compute_dtype
from ..reference import divergence as R
from .comm import AllReduceSum, all_reduce
from .rows import (
    MINUS_INF, add_ce_grad, ce_rows, ce_sums, forward_kl_and_grads, gather_owned, ids_in_range, masked_max, poison,
    rows_and_target, run_target_loss, safe_shift, soft_and_grads, target_column, target_loss_setup,
)


def dkd_loss(student_logits, teacher_logits, target, *, process_group, alpha=1.0, beta=8.0, temperature=4.0,
             reduction="batchmean", ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    """``fastkd.dkd_loss`` over a vocabulary-sharded process group (``target``: global class ids).

    Per side (student, teacher; ``x = logits / T``, ``g`` the target) the row needs
    ``lse(x)``, ``lse(x over c != g)`` and ``x[g]``: the first two from MAX/SUM
    all-reduces at their own shifts, ``x[g]`` from its owner. TCKD is then a
    replicated [N, 2] computation; NCKD is summed over the shards. ``ce_weight`` /
    ``return_parts``: as ``fastkd.dkd_loss`` (CE at T = 1 on the raw student logits;
    its two per-row numbers ride in the SUM round, no extra collective).
    """
    student, teacher = student_logits, teacher_logits
    v.check_non_negative("alpha", alpha)
    v.check_non_negative("beta", beta)
    v.check_positive("temperature", temperature)
    c = target_loss_setup(student, teacher, target, ignore_index, sample_weight, reduction, ce_weight, return_parts,
                          process_group)
    if c.vocab < 2:
        raise ValueError(f"student_logits must have at least 2 classes over the process group for DKD, "
                         f"got {c.vocab}")
    T = float(temperature)
    use_ce, need_s, need_t, dtype = c.use_ce, c.need_s, c.need_t, c.dtype
    offset, width, vocab = c.offset, c.width, c.vocab

    def body(r, equal):
        s, t, tgt, read = rows_and_target(c.s, c.t, target, c.read, r, dtype)
        dev = s.device
        own, col, is_g = target_column(tgt, offset, width, s.shape, dev)
        other = ~is_g
        maxima = all_reduce([s.amax(dim=1), masked_max(s, other), t.amax(dim=1), masked_max(t, other)],
                             dist.ReduceOp.MAX, process_group)
        sides = []
        sums = []
        for x, m_all, m_oth in ((s, maxima[0], maxima[1]), (t, maxima[2], maxima[3])):
            m_all, m_oth = safe_shift(m_all).unsqueeze(1), safe_shift(m_oth).unsqueeze(1)
            a = (x - m_all) / T
            o = ((x - m_oth) / T).masked_fill(is_g, MINUS_INF)
            sides.append((a, o, m_all, m_oth))
            sums += [a.exp().sum(dim=1), o.exp().sum(dim=1), gather_owned(a, own, col).squeeze(1)]
        m_s = sides[0][2]  # the student's global raw maximum (safe), [N, 1]: the CE's shift
        if use_ce:
            sums += ce_sums(s, m_s, own, col)
        sums = all_reduce(sums, dist.ReduceOp.SUM, process_group)
        logs = []  # per side: (log p[g] [N], log(1 - p[g]) [N], log softmax over c != g [N, V_local], P, Q)
        for i, (a, o, m_all, m_oth) in enumerate(sides):
            z_all, z_oth, a_g = sums[3 * i], sums[3 * i + 1], sums[3 * i + 2]
            lz_all, lz_oth = z_all.log(), z_oth.log()
            log_pg = a_g - lz_all
            log_rest = (m_oth - m_all).squeeze(1) / T + lz_oth - lz_all  # lse(x over c != g) - lse(x)
            empty = torch.isneginf(lz_oth).unsqueeze(1)  # no mass outside g: NCKD 0 (not -inf - -inf)
            log_other = torch.where(empty, o, o - lz_oth.unsqueeze(1))
            logs.append((log_pg, log_rest, log_other, a - lz_all.unsqueeze(1)))
        (pg_s, rest_s, oth_s, lq_all), (pg_t, rest_t, oth_t, lp_all) = logs
        scale = T * T
        with torch.enable_grad():  # TCKD, replicated: derivatives w.r.t. the four per-row log-probs
            leaves = [x.detach().requires_grad_(True) for x in (pg_s, rest_s, pg_t, rest_t)]
            tckd = scale * alpha * R.kl_terms(torch.stack(leaves[2:], dim=1),
                                               torch.stack(leaves[:2], dim=1)).sum(dim=1)
            g_tckd = torch.autograd.grad(tckd.sum(), leaves)
        tckd = tckd.detach()
        nckd_part, g_l, h_l = soft_and_grads(
            lambda lp_, lq_: scale * beta * R.kl_terms(lp_, lq_).sum(dim=1), oth_t, oth_s, need_t)
        red = all_reduce([nckd_part, g_l.sum(dim=1)] + ([h_l.sum(dim=1)] if need_t else []),
                          dist.ReduceOp.SUM, process_group)
        soft = tckd + red[0]
        hard = ce_rows(m_s, sums[6], sums[7]) if use_ce else torch.zeros_like(soft)
        rows = soft + ce_weight * hard if ce_weight != 0 else soft
        weight = poison(c.weight[r], equal & ids_in_range(tgt.unsqueeze(1), read, vocab, 0))

        def chain(g_pg, g_rest, g_local, sum_local, log_all, log_other):
            # d/dx_c = -(gA + gB) P_c + [c = g] gA + Q_c (gB - sum gL) + gL_c   (x = logits / T)
            p_all, q_oth = log_all.exp(), log_other.exp()
            grad = g_local - (g_pg + g_rest).unsqueeze(1) * p_all + q_oth * (g_rest - sum_local).unsqueeze(1)
            grad.scatter_add_(1, col, torch.where(own, g_pg.unsqueeze(1), torch.zeros((), dtype=dtype, device=dev)))
            return grad * (weight / T).unsqueeze(1)

        grad_s = chain(g_tckd[0], g_tckd[1], g_l, red[1], lq_all, oth_s) if need_s else None
        if need_s and ce_weight != 0:
            add_ce_grad(grad_s, s, m_s, sums[6], own, col, (weight * ce_weight).unsqueeze(1))
        grad_t = chain(g_tckd[2], g_tckd[3], h_l, red[2], lp_all, oth_t) if need_t else None
        return rows * weight, soft * weight, hard * weight, grad_s, grad_t

    return run_target_loss(body, c, student, teacher, process_group, reduction, return_parts)


def ats_loss(student_logits, teacher_logits, target, *, process_group, target_temperature=4.0,
             other_temperature=2.0, student_temperature=1.0, reduction="batchmean", ignore_index=-100,
             sample_weight=None, ce_weight=0.0, return_parts=False):
    """``fastkd.ats_loss`` over a vocabulary-sharded process group (``target``: global class ids).

    The teacher's per-class temperature is ``target_temperature`` in the one column
    (on one rank) holding the target; the rest is ``kd_loss``'s forward KL with the
    teacher maximum taken in scaled units (the temperatures differ per column).
    ``ce_weight`` / ``return_parts``: as ``fastkd.ats_loss`` (CE at T = 1 on the raw
    student logits, two more per-row numbers in the SUM round).
    """
    student, teacher = student_logits, teacher_logits
    for name, value in (("target_temperature", target_temperature), ("other_temperature", other_temperature),
                        ("student_temperature", student_temperature)):
        v.check_positive(name, value)
    c = target_loss_setup(student, teacher, target, ignore_index, sample_weight, reduction, ce_weight, return_parts,
                          process_group)
    st = float(student_temperature)
    use_ce, need_s, need_t, dtype = c.use_ce, c.need_s, c.need_t, c.dtype
    offset, width, vocab = c.offset, c.width, c.vocab

    def body(r, equal):
        s, t, tgt, read = rows_and_target(c.s, c.t, target, c.read, r, dtype)
        dev = s.device
        own, col, is_g = target_column(tgt, offset, width, s.shape, dev)
        tau = torch.where(is_g, torch.full((), float(target_temperature), dtype=dtype, device=dev),
                          torch.full((), float(other_temperature), dtype=dtype, device=dev))
        y = t / tau
        m_s, m_y = all_reduce([s.amax(dim=1), y.amax(dim=1)], dist.ReduceOp.MAX, process_group)
        m_s = safe_shift(m_s).unsqueeze(1)
        a = (s - m_s) / st
        b = y - safe_shift(m_y).unsqueeze(1)
        sums = all_reduce([a.exp().sum(dim=1), b.exp().sum(dim=1)] + (ce_sums(s, m_s, own, col) if use_ce else []),
                           dist.ReduceOp.SUM, process_group)
        z_s, z_y = sums[0], sums[1]
        lps, lq = a - z_s.log().unsqueeze(1), b - z_y.log().unsqueeze(1)  # student, teacher log-probs
        part, g, h = forward_kl_and_grads(lq, lps, need_t)
        red = all_reduce([part, g.sum(dim=1)] + ([h.sum(dim=1)] if need_t else []), dist.ReduceOp.SUM,
                          process_group)
        scale = st * st
        weight = poison(c.weight[r], equal & ids_in_range(tgt.unsqueeze(1), read, vocab, 0))
        w = (weight * scale).unsqueeze(1)
        grad_s = (g - lps.exp() * red[1].unsqueeze(1)) * (w / st) if need_s else None
        if need_s and ce_weight != 0:
            add_ce_grad(grad_s, s, m_s, sums[2], own, col, (weight * ce_weight).unsqueeze(1))
        grad_t = (h - lq.exp() * red[2].unsqueeze(1)) * w / tau if need_t else None
        soft = scale * red[0]
        hard = ce_rows(m_s, sums[2], sums[3]) if use_ce else torch.zeros_like(soft)
        rows = soft + ce_weight * hard if ce_weight != 0 else soft
        return rows * weight, soft * weight, hard * weight, grad_s, grad_t

    return run_target_loss(body, c, student, teacher, process_group, reduction, return_parts)


# ----------------------------------------------------------------------------
# data parallel: DIST over the global batch
# ----------------------------------------------------------------------------

def _sqrt0(x: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 at 0 (as ``Tensor.norm`` of a zero vector), not inf * 0 = NaN."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def dist_loss(student_logits, teacher_logits, *, process_group, beta=1.0, gamma=1.0, temperature=1.0):
    """``fastkd.dist_loss`` over the global batch of a data-parallel process group.

    Rows are sharded (any number per rank, 0 included), classes are not. The result,
    on every rank, is single-process DIST on the concatenation of all ranks' rows:
    the inter-class term averages the per-row correlations over the global rows, and
    the intra-class correlations of each class use the global means and centred
    moments, all-reduced in two rounds (``[C] + [C] + 2`` then ``3 [C]`` numbers;
    centring before the products keeps the reference's two-pass precision).

    Gradients and DDP: the all-reduces are differentiable with a SUM all-reduce
    backward, so rank r's input gradient is ``P`` (the world size) times its share of
    the gradient of the global loss; DDP averages parameter gradients over the ``P``
    ranks, so one DDP step equals one single-process step on the concatenated batch,
    with no rescaling. Without DDP (summing gradients yourself), divide by ``P``.
    Every rank must call backward (it communicates).
    """
    v.check_pair(student_logits, teacher_logits)
    v.check_non_negative("beta", beta)
    v.check_non_negative("gamma", gamma)
    v.check_positive("temperature", temperature)
    if process_group is None:
        raise ValueError("process_group must be a torch.distributed process group (got None); "
                         "use fastkd.dist_loss for one process")
    dtype = compute_dtype(student_logits, teacher_logits)
    C = student_logits.shape[-1]
    s = student_logits.reshape(-1, C).to(dtype)
    t = teacher_logits.reshape(-1, C).to(dtype)
    T = float(temperature)
    y_s, y_t = torch.softmax(s / T, dim=1), torch.softmax(t / T, dim=1)
    # inter-class: per-row Pearson over the classes (local), averaged over the global rows
    cs, ct = y_s - y_s.mean(dim=1, keepdim=True), y_t - y_t.mean(dim=1, keepdim=True)
    rho_rows = (cs * ct).sum(dim=1) / (cs.norm(dim=1) * ct.norm(dim=1) + 1e-8)
    n_local = torch.full((1,), float(s.shape[0]), dtype=dtype, device=s.device)
    first = AllReduceSum.apply(torch.cat([rho_rows.sum().reshape(1), n_local, y_s.sum(dim=0), y_t.sum(dim=0)]),
                                process_group)
    rho_sum, n = first[0], first[1]
    n_safe = n.clamp_min(1)
    mean_s, mean_t = first[2:2 + C] / n_safe, first[2 + C:] / n_safe
    # intra-class: per-class Pearson over the global rows, from centred moments
    ds, dt = y_s - mean_s, y_t - mean_t
    second = AllReduceSum.apply(torch.cat([(ds * dt).sum(dim=0), (ds * ds).sum(dim=0), (dt * dt).sum(dim=0)]),
                                 process_group)
    s_st, s_ss, s_tt = second[:C], second[C:2 * C], second[2 * C:]
    rho_cols = s_st / (_sqrt0(s_ss) * _sqrt0(s_tt) + 1e-8)
    scale = T * T
    inter = scale * (1.0 - rho_sum / n_safe)
    intra = scale * (1.0 - rho_cols.mean())
    loss = beta * inter + gamma * intra
    return torch.where(n > 0, loss, torch.zeros_like(loss))  # an empty global batch: 0, as the reference
