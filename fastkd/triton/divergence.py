"""Triton ``divergence_fwd``: the language-model divergences, one program per row.

Contract (arguments, formulas, buckets, skipped rows, numerics): docs/design.md,
"The language-model divergences: one op, divergence_fwd". Per row, with
``q = softmax(s / T)`` (student), ``p`` the teacher (dense ``softmax(t / T_t)``, ``T_t`` the
teacher_temperature, ``T`` where it is 0; or top-k buckets), ``l = log``:

    kind 0:  soft = a KL(p || m) + b KL(q || m),   m = w_p p + w_q q
    kind 1:  soft = 0.5 sum |p - q|                               (TVD)
    kind 2:  soft = a KL(p || q) + b KL(q || p)                   (Jeffreys: a = b = 1)
    kind 3:  soft = sum (p - q)^2 / (p + q)                       (triangular)
    kind 4:  the AB divergence (a, b = alpha, beta; Amari's alpha: b = 1 - a)
    kind 6:  Renyi of order a (b = 1: reversed), U summed in pass 2, gradients as kind 5 at 1 / S
    hard = lse(s) - s[target]                                     (T = 1)
    loss = w (soft_scale soft + ce_weight hard)

Per bucket/class ``c`` (``G = q dsoft/dq``, ``H = p dsoft/dp``)::

    r = w_q q / m, u = w_p p / m          (formed as exp(l w + l q - l m): finite where q, m underflow)
    G = b q (l q - l m) - r (a p + b q)    H = a p (l p - l m) - u (a p + b q)
    TVD: G = 0.5 q sign(q - p),            H = 0.5 p sign(p - q)
    dL/ds = w (soft_scale / T) (G - q sum G) + w ce_weight (softmax(s) - onehot(target))
    dL/dt = w (soft_scale / T_t) (H - p sum H)                    (dense teacher)

Dense kernel, three passes over the row (the third only for gradients):
  1. statistics: raw running maxima and sums of the student at 1/T (and at T = 1
     when a target is given: same raw max, a second exponential) and of the teacher;
  2. the per-element terms with the final lse: soft, sum G, sum H;
  3. the gradients, which need sum G / sum H, from the logits again. Each pass
     re-reads the row from DRAM at large V (at 128k the rows in flight exceed the
     L2), so a pass is a third of the row's traffic. No [N, V] temporary: only the
     gradients are written.
Two passes where the sums are known after pass 1 (SUMS_KNOWN: w_p == 0 or w_q == 0 in
the KL family, forward and reverse KL): there sum G and sum H are -(a + b) or the soft
loss itself (w_q == 0: sum G = b KL(q || p); w_p == 0: sum H = a KL(p || q)), which
pass 1 gets as KD's cross term (CROSS); pass 2 then sums the soft loss and writes the
gradients.

Top-k kernel (teacher log-probs [N, K] taken as given, ids [N, K], -1 = padding):
  1. one pass over the student row: lse(x) and, for the tail, lse over the ids
     *not* in the top-k, summed over those ids themselves: each block masks its
     member lanes, found by walking the row's sorted ids (one compare per id per
     row, not K per element). ``total - sum over ids`` would cancel to 0 or below
     when the top-k holds nearly all the mass, and underflow to log 0 when the
     tail is below float32's range relative to the max (a logit gap of 100);
  2. the K (+ tail) buckets in registers; the teacher tail ``1 - sum exp(logprobs)``
     in float64 (a tail of 1e-9 keeps 7 digits);
  3. (gradients) the dense student row: non-member lanes from the tail bucket,
     member lanes stored by a gather/scatter of K values (disjoint addresses,
     so no ordering between the two stores is needed); the teacher gradient [N, K].

Rows with weight 0 are not read (loss 0, gradients 0). A counted row with a target
outside [0, V) or an id outside [-1, V) reads no logit and gets NaN loss, soft,
hard and gradients (no host-side check, no illegal access).
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..core.autograd import register_loss_autograd
from ._common import device_guard, empty_grad, load_logits, online_update_scaled, unit_stride_rows
from .divergence_rows import _bucket_terms, _gate, _log1p, _renyi_row, _row_stats_tt, _stats_update

NEG_INF = tl.constexpr(float("-inf"))
# Sorted-id sentinel for padding slots (and past the end): above every column index.
ID_SENTINEL = 2 ** 62
_ID_SENTINEL = tl.constexpr(ID_SENTINEL)

KIND_KL, KIND_TVD, KIND_JEFFREYS, KIND_TRIANGULAR = 0, 1, 2, 3
KIND_AB, KIND_RENYI = 4, 6  # (5: Renyi's gradient pass at the row's S, internal)
KIND_ENTROPY_GATED = 7
TOPK_NONE, TOPK_TAIL, TOPK_RENORM = 0, 1, 2


@triton.jit
def _target(TGT, row, live, n_cols, HAS_TARGET: tl.constexpr):
    """(target, its validity): ``-1, live`` without a target; skipped rows never read it."""
    if HAS_TARGET:
        g = tl.load(TGT + row, mask=live, other=0)
        return g, live & (g >= 0) & (g < n_cols)
    else:
        return (row * 0 - 1), live


@triton.jit
def _store_row_outputs(LOSS, SOFT, HARD, row, ok, fill, w, soft, hard, soft_scale, ce_weight):
    soft_w = w * (soft_scale * soft)
    hard_w = w * hard
    # ce_weight == 0: the hard term is not added (an infinite hard, a -inf target logit, times 0 is NaN)
    loss = tl.where(ce_weight == 0.0, soft_w, soft_w + ce_weight * hard_w)
    tl.store(LOSS + row, tl.where(ok, loss, fill))
    tl.store(SOFT + row, tl.where(ok, soft_w, fill))
    tl.store(HARD + row, tl.where(ok, hard_w, fill))


@triton.jit
def _div_dense_kernel(
    S, T, TGT, W, LOSS, SOFT, HARD, GS, GT,
    stride_s, stride_t, stride_gs, stride_gt, stride_w,
    n_cols, inv_temp, inv_temp_t, a, b, w_p, w_q, soft_scale, ce_weight, log_v,
    KIND: tl.constexpr, HAS_TARGET: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr,
    SUMS_KNOWN: tl.constexpr = False, CROSS: tl.constexpr = 0,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride may pass 2^31
    w = tl.load(W + row * stride_w)
    live = w != 0.0
    g, ok = _target(TGT, row, live, n_cols, HAS_TARGET)
    fill = tl.where(live, float("nan"), 0.0)  # bad counted rows: NaN; skipped rows: 0
    n_live = tl.where(ok, n_cols, 0)  # skipped and bad rows run no reading iteration
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    cols = tl.arange(0, BLOCK)
    log_wp = tl.log(w_p)  # -inf for 0: the mixture then reduces to the other side exactly
    log_wq = tl.log(w_q)

    # ---- pass 1: raw maxima and sums (student at 1/T and at 1, teacher at its own 1/T_t) ----
    m_s, z_s, z1, m_t, z_t, kl = _row_stats_tt(s_row, t_row, n_live, n_cols, inv_temp, inv_temp_t, HAS_TARGET, BLOCK,
                                               "evict_last", CROSS)
    lz_s = tl.log(z_s)
    lz_t = tl.log(z_t)
    if HAS_TARGET:
        lz1 = tl.log(z1)
        s_g = tl.load(s_row + g, mask=ok, other=0.0).to(tl.float32)
        hard = (m_s - s_g) + lz1  # lse(s) - s[g], the large values subtracted first
    else:
        lz1 = 0.0
        hard = 0.0

    if SUMS_KNOWN and (GRAD_S or GRAD_T):
        # ---- pass 2 of 2: soft and the gradients, the sums known (a coefficient of 0: never 0 * inf) ----
        known = -(a + b)
        sum_g = tl.where(CROSS == 2, tl.where(b == 0.0, 0.0, b * kl), known)
        sum_h = tl.where(CROSS == 1, tl.where(a == 0.0, 0.0, a * kl), known)
        soft = _div_dense_grads(s_row, t_row, GS, GT, row, stride_gs, stride_gt, n_cols, n_live, g, ok, fill,
                                m_s, lz_s, m_t, lz_t, lz1, inv_temp, inv_temp_t, a, b, w_p, w_q, log_wp, log_wq,
                                sum_g, sum_h, w * soft_scale * inv_temp, w * soft_scale * inv_temp_t, w * ce_weight,
                                ce_weight,
                                KIND, HAS_TARGET, GRAD_S, GRAD_T, BLOCK, True)
        _store_row_outputs(LOSS, SOFT, HARD, row, ok, fill, w, soft, hard, soft_scale, ce_weight)
        return

    # ---- pass 2: per-element terms: soft, sum G, sum H ----
    soft = 0.0
    sum_g = 0.0
    sum_h = 0.0
    for start in range(0, n_live, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        s, t = load_logits(s_row, t_row, offs, mask, "evict_last")
        lq = (s - m_s) * inv_temp - lz_s
        lp = (t - m_t) * inv_temp_t - lz_t
        term, gq, hp = _bucket_terms(lp, lq, a, b, w_p, w_q, log_wp, log_wq, KIND)
        soft += tl.sum(tl.where(mask, term, 0.0), 0)
        if GRAD_S or KIND == 7 or KIND == 6:
            sum_g += tl.sum(tl.where(mask, gq, 0.0), 0)
        if GRAD_T or KIND == 7:
            sum_h += tl.sum(tl.where(mask, hp, 0.0), 0)
    if KIND == 7:  # the sums were KL(p || q), KL(q || p), H(p): gate, then the gradients of kind 2 at (w, 1 - w)
        a, b, soft, sum_g, sum_h = _gate(soft, sum_g, sum_h, a, b, w_p, w_q, log_v)
    if KIND == 6:  # the sum was U: the row's S, then the gradients of kind 5 at w_p = 1 / S
        soft, sum_g, sum_h, w_p, w_q = _renyi_row(soft, sum_g, a, b)
    _store_row_outputs(LOSS, SOFT, HARD, row, ok, fill, w, soft, hard, soft_scale, ce_weight)

    # ---- pass 3: gradients ----
    if (GRAD_S or GRAD_T) and KIND == 7:
        _div_dense_grads(s_row, t_row, GS, GT, row, stride_gs, stride_gt, n_cols, n_live, g, ok, fill,
                         m_s, lz_s, m_t, lz_t, lz1, inv_temp, inv_temp_t, a, b, w_p, w_q, log_wp, log_wq,
                         sum_g, sum_h, w * soft_scale * inv_temp, w * soft_scale * inv_temp_t, w * ce_weight,
                         ce_weight,
                         2, HAS_TARGET, GRAD_S, GRAD_T, BLOCK, False)
    elif (GRAD_S or GRAD_T) and KIND == 6:
        _div_dense_grads(s_row, t_row, GS, GT, row, stride_gs, stride_gt, n_cols, n_live, g, ok, fill,
                         m_s, lz_s, m_t, lz_t, lz1, inv_temp, inv_temp_t, a, b, w_p, w_q, log_wp, log_wq,
                         sum_g, sum_h, w * soft_scale * inv_temp, w * soft_scale * inv_temp_t, w * ce_weight,
                         ce_weight,
                         5, HAS_TARGET, GRAD_S, GRAD_T, BLOCK, False)
    elif GRAD_S or GRAD_T:
        _div_dense_grads(s_row, t_row, GS, GT, row, stride_gs, stride_gt, n_cols, n_live, g, ok, fill,
                         m_s, lz_s, m_t, lz_t, lz1, inv_temp, inv_temp_t, a, b, w_p, w_q, log_wp, log_wq,
                         sum_g, sum_h, w * soft_scale * inv_temp, w * soft_scale * inv_temp_t, w * ce_weight,
                         ce_weight,
                         KIND, HAS_TARGET, GRAD_S, GRAD_T, BLOCK, False)


@triton.jit
def _div_dense_grads(s_row, t_row, GS, GT, row, stride_gs, stride_gt, n_cols, n_live, g, ok, fill,
                     m_s, lz_s, m_t, lz_t, lz1, inv_temp, inv_temp_t, a, b, w_p, w_q, log_wp, log_wq, sum_g, sum_h,
                     c_soft, c_soft_t, c_ce, ce_weight,
                     KIND: tl.constexpr, HAS_TARGET: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
                     BLOCK: tl.constexpr, SUM_SOFT: tl.constexpr):
    """The gradient pass of a dense row (the whole row: skipped and bad rows get ``fill``);
    with SUM_SOFT also the row's soft loss (the two-pass path), else 0. ``c_soft`` / ``c_soft_t``: the soft
    term's factor of each side, ``w soft_scale`` over that side's own temperature (T, T_t: the chain rule)."""
    cols = tl.arange(0, BLOCK)
    soft = 0.0
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        s, t = load_logits(s_row, t_row, offs, offs < n_live, "evict_first")  # skipped rows: nothing read
        lq = (s - m_s) * inv_temp - lz_s
        lp = (t - m_t) * inv_temp_t - lz_t
        term, gq, hp = _bucket_terms(lp, lq, a, b, w_p, w_q, log_wp, log_wq, KIND)
        if SUM_SOFT:
            soft += tl.sum(tl.where(offs < n_live, term, 0.0), 0)
        if GRAD_S:
            gs = c_soft * (gq - tl.exp(lq) * sum_g)
            if HAS_TARGET:
                ce = tl.exp((s - m_s) - lz1) - tl.where(offs == g, 1.0, 0.0)
                gs += tl.where(ce_weight == 0.0, 0.0, c_ce * ce)
            tl.store(GS + row * stride_gs + offs, tl.where(ok, gs, fill).to(GS.dtype.element_ty), mask=mask)
        if GRAD_T:
            gt = c_soft_t * (hp - tl.exp(lp) * sum_h)
            tl.store(GT + row * stride_gt + offs, tl.where(ok, gt, fill).to(GT.dtype.element_ty), mask=mask)
    return soft


@triton.jit
def _members(SID_row, j, n_k, offs, end, ok):
    """Lanes of this block that hold one of the row's top-k ids.

    ``SID_row`` holds the row's ids sorted ascending (padding = a sentinel above every
    column); ``j`` is the first not yet passed. Blocks are visited in increasing order,
    so the walk visits each id once per pass. Returns (member mask, new j).
    """
    member = offs < 0
    nxt = tl.load(SID_row + j, mask=j < n_k, other=_ID_SENTINEL)
    while ok & (nxt < end):
        member = member | (offs == nxt)
        j += 1
        nxt = tl.load(SID_row + j, mask=j < n_k, other=_ID_SENTINEL)
    return member, j


@triton.jit
def _div_topk_kernel(
    S, LPT, IDS, SIDS, TGT, W, LOSS, SOFT, HARD, GS, GT,
    stride_s, stride_lp, stride_ids, stride_gs, stride_gt, stride_w,
    n_cols, n_k, inv_temp, a, b, w_p, w_q, soft_scale, ce_weight, log_v,
    KIND: tl.constexpr, TAIL: tl.constexpr, HAS_TARGET: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(W + row * stride_w)
    live = w != 0.0
    g, ok = _target(TGT, row, live, n_cols, HAS_TARGET)
    ks = tl.arange(0, KP)
    kmask = ks < n_k
    # (a row flag is folded into lane masks with where(): the interpreter cannot `&` a scalar with a vector)
    ids = tl.load(IDS + row * stride_ids + ks, mask=tl.where(live, kmask, False), other=-1)
    bad_ids = tl.sum(tl.where(kmask & ((ids < -1) | (ids >= n_cols)), 1, 0), 0)
    ok = ok & (bad_ids == 0)
    fill = tl.where(live, float("nan"), 0.0)
    valid = tl.where(ok, kmask & (ids >= 0), False)  # non-padding slots of a row that is read
    n_live = tl.where(ok, n_cols, 0)
    s_row = S + row * stride_s
    sid_row = SIDS + row * n_k
    cols = tl.arange(0, BLOCK)
    log_wp = tl.log(w_p)
    log_wq = tl.log(w_q)
    x_k = tl.load(s_row + ids, mask=valid, other=float("-inf")).to(tl.float32)  # raw student logits at the ids
    lp_in = tl.load(LPT + row * stride_lp + ks, mask=valid, other=float("-inf")).to(tl.float32)

    # ---- pass 1: student lse (1/T; T = 1 for the CE) and, for the tail, lse over non-members ----
    m_s = float("-inf")
    z_s = 0.0
    z1 = 0.0
    m_n = float("-inf")  # non-member (tail) raw max and sum at 1/T
    z_n = 0.0
    if TAIL or HAS_TARGET:
        j = 0
        for start in range(0, n_live, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            s = tl.load(S + row * stride_s + offs, mask=mask, other=float("-inf"),
                        eviction_policy="evict_last").to(tl.float32)
            m_s, z_s, z1 = _stats_update(m_s, z_s, z1, s, inv_temp, HAS_TARGET)
            if TAIL:
                member, j = _members(sid_row, j, n_k, offs, start + BLOCK, ok)
                m_n, z_n, _e, _alpha = online_update_scaled(m_n, z_n, tl.where(member, float("-inf"), s), inv_temp)
    lz_s = tl.log(z_s)
    if HAS_TARGET:
        lz1 = tl.log(z1)
        s_g = tl.load(s_row + g, mask=ok, other=0.0).to(tl.float32)
        hard = (m_s - s_g) + lz1
    else:
        lz1 = 0.0
        hard = 0.0

    # ---- buckets ----
    if TAIL:
        lq_k = tl.where(valid, (x_k - m_s) * inv_temp - lz_s, float("-inf"))
        lz_n = tl.log(z_n)
        m_n_safe = tl.where(m_n == float("-inf"), m_s, m_n)  # no non-member: z_n = 0 gives -inf below
        # log q_tail from whichever side is smaller: a tail below 1/2 as the difference of
        # the two lse (summed over the non-members themselves: no cancellation, no
        # underflow), a tail above 1/2 as log1p(-sum q_k) (the lse difference would lose
        # eps * lse in absolute terms, 1e-4 relative for a tail of 0.99 at V = 4096).
        # A row of padding only: sum q_k = 0, the tail is exactly 0.
        q_members = tl.sum(tl.exp(lq_k), 0)
        lq_tail = tl.where(q_members < 0.5, _log1p(-q_members), (m_n_safe - m_s) * inv_temp + lz_n - lz_s)
        lp_k = lp_in
        # teacher tail 1 - sum p_k in float64 (clamped at 0): float32 would keep no digit of a 1e-9 tail
        p_tail64 = 1.0 - tl.sum(tl.exp(lp_in.to(tl.float64)), 0)
        # (a NaN log-prob makes the tail NaN, not empty: every slot's gradient is then NaN, as the reference's)
        lp_tail = tl.where(p_tail64 > 0.0, tl.log(tl.where(p_tail64 > 0.0, p_tail64, 1.0)),
                           tl.where(p_tail64 != p_tail64, p_tail64, float("-inf"))).to(tl.float32)
        term_n, g_n, h_n = _bucket_terms(lp_tail, lq_tail, a, b, w_p, w_q, log_wp, log_wq, KIND)
    else:
        # renormalise over the K ids (the full lse cancels): both sides shifted by their own max
        mx = tl.max(x_k, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        ex = (x_k - mx) * inv_temp
        lq_k = tl.where(valid, ex - tl.log(tl.sum(tl.exp(ex), 0)), float("-inf"))
        mp = tl.max(lp_in, 0)
        mp = tl.where(mp == float("-inf"), 0.0, mp)
        lp_k = tl.where(valid, (lp_in - mp) - tl.log(tl.sum(tl.exp(lp_in - mp), 0)), float("-inf"))
        term_n = 0.0
        g_n = 0.0
        h_n = 0.0
        lq_tail = 0.0
        m_n_safe = 0.0
        lz_n = 0.0
        lp_tail = 0.0
    term_k, g_k, h_k = _bucket_terms(lp_k, lq_k, a, b, w_p, w_q, log_wp, log_wq, KIND)
    soft = tl.sum(tl.where(valid, term_k, 0.0), 0) + term_n
    sum_g = tl.sum(tl.where(valid, g_k, 0.0), 0) + g_n
    if KIND == 7:  # KL(p || q), KL(q || p), H(p) over the buckets: gate, then G, H of kind 2 at (w, 1 - w)
        ent = tl.sum(tl.where(valid, h_k, 0.0), 0) + h_n
        a, b, soft, sum_g, _sum_h = _gate(soft, sum_g, ent, a, b, w_p, w_q, log_v)
        term_k, g_k, h_k = _bucket_terms(lp_k, lq_k, a, b, w_p, w_q, log_wp, log_wq, 2)
        if TAIL:
            term_n, g_n, h_n = _bucket_terms(lp_tail, lq_tail, a, b, w_p, w_q, log_wp, log_wq, 2)
    if KIND == 6:  # U over the buckets: the row's S, then G, H of kind 5 at w_p = 1 / S
        soft, sum_g, _sum_h, w_p, w_q = _renyi_row(soft, sum_g, a, b)
        term_k, g_k, h_k = _bucket_terms(lp_k, lq_k, a, b, w_p, w_q, log_wp, log_wq, 5)
        if TAIL:
            term_n, g_n, h_n = _bucket_terms(lp_tail, lq_tail, a, b, w_p, w_q, log_wp, log_wq, 5)
    _store_row_outputs(LOSS, SOFT, HARD, row, ok, fill, w, soft, hard, soft_scale, ce_weight)

    if GRAD_T:  # w.r.t. the given log-probs: no 1/T
        p_k = tl.exp(lp_k)
        if TAIL:
            # p_tail = 1 - sum p_k: d/dlp_k moves mass from the tail. H omits the a p of
            # d/dlp [a p (l p - l m)], which that move cancels; an empty (clamped) tail does not
            # move, so the a p_k stays: H_k + a p_k (TVD's H is the whole derivative).
            p_tail = tl.exp(lp_tail)
            if KIND == 1:  # TVD: H is the whole derivative
                empty_tail = 0.0
            elif KIND == 3:  # triangular: H drops p
                empty_tail = -1.0
            elif KIND == 4:  # AB: H is the whole derivative
                empty_tail = 0.0
            elif KIND == 6:  # Renyi: H drops p / S on the teacher's side (x = p), nothing reversed or on direct rows
                empty_tail = tl.where(b != 0.0, 0.0, tl.where(w_q != 0.0, 0.0, -w_p))
            else:
                empty_tail = -a
            ratio = tl.where(p_tail == 0.0, empty_tail, h_n / tl.where(p_tail == 0.0, 1.0, p_tail))
            gt = h_k - p_k * ratio
        else:
            gt = h_k - p_k * tl.sum(tl.where(valid, h_k, 0.0), 0)
        gt = tl.where(valid, w * soft_scale * gt, 0.0)
        tl.store(GT + row * stride_gt + ks, tl.where(ok, gt, fill).to(GT.dtype.element_ty), mask=kmask)

    if GRAD_S:
        c_soft = w * soft_scale * inv_temp
        c_ce = w * ce_weight
        # non-member lanes (the whole row for skipped and bad rows)
        j = 0
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            s = tl.load(s_row + offs, mask=offs < n_live, other=float("-inf"),
                        eviction_policy="evict_first").to(tl.float32)
            member, j = _members(sid_row, j, n_k, offs, start + BLOCK, ok)
            if TAIL:
                q = tl.exp((s - m_s) * inv_temp - lz_s)
                # an empty tail (every non-member -inf, z_n = 0) has no share: exp(-inf + inf) would be NaN
                share = tl.where(z_n == 0.0, 0.0, tl.exp((s - m_n_safe) * inv_temp - lz_n))
                gs = c_soft * (share * g_n - q * sum_g)
            else:
                gs = tl.zeros([BLOCK], dtype=tl.float32)  # renormalised: 0 outside the ids
            if HAS_TARGET:
                ce = tl.exp((s - m_s) - lz1) - tl.where(offs == g, 1.0, 0.0)
                gs += tl.where(ce_weight == 0.0, 0.0, c_ce * ce)
            tl.store(GS + row * stride_gs + offs, tl.where(ok, gs, fill).to(GS.dtype.element_ty),
                     mask=mask & ~member)
        # member lanes: G_k - q_k sum G (q_k the bucket probability)
        gm = c_soft * (g_k - tl.exp(lq_k) * sum_g)
        if HAS_TARGET:
            ce_k = tl.exp((x_k - m_s) - lz1) - tl.where(ids == g, 1.0, 0.0)
            gm += tl.where(ce_weight == 0.0, 0.0, c_ce * ce_k)
        tl.store(GS + row * stride_gs + ids, gm.to(GS.dtype.element_ty), mask=valid)


# Launch sizes. Both kernels keep about ten float32 values per element live (s, t, l p, l q,
# p, q, l m, r, u, G, H). ptxas (sm_90, tests/test_triton_compile.py) held the dense bf16
# kernel at 64 registers and spilled 4 bytes with 8 elements per thread (BLOCK 2048 / 8 warps,
# and 1024 / 4); at 4 elements per thread (2048 / 16, 1024 / 8) it uses at most 63 and
# never spills. So: blocks of at most 2048 columns, 4 elements per thread.
DIV_MAX_BLOCK = 2048
DIV_ELEMS_PER_THREAD = 4


def div_row_config(n_cols):
    """(BLOCK, num_warps) of both divergence kernels: the row width rounded up to a power of two
    (at least 16, at most DIV_MAX_BLOCK), DIV_ELEMS_PER_THREAD elements per thread (1 to 16 warps)."""
    block = max(16, min(DIV_MAX_BLOCK, triton.next_power_of_2(int(n_cols))))
    num_warps = max(1, min(16, block // (32 * DIV_ELEMS_PER_THREAD)))
    return block, num_warps


def div_topk_config(n_cols, kp):
    """(BLOCK, num_warps) of the top-k kernel: ``div_row_config``, with enough warps that the
    K-wide bucket vectors (``kp`` lanes) also hold at most DIV_ELEMS_PER_THREAD per thread
    (K = 256 on one warp spilled 4 bytes at 128 registers, sm_90)."""
    block, num_warps = div_row_config(n_cols)
    return block, max(num_warps, min(16, kp // (32 * DIV_ELEMS_PER_THREAD)))


def dense_sums_known(kind, w_p, w_q, grad_student, grad_teacher):
    """(SUMS_KNOWN, CROSS) of the dense kernel: whether sum G and sum H are known after pass 1
    (the KL family with w_p == 0 or w_q == 0: two passes), and which KL pass 1 sums for the
    one that is the soft loss (1: KL(p || q), w_p == 0 with a teacher gradient; 2: KL(q || p),
    w_q == 0 with a student gradient; 0: none needed)."""
    if kind != KIND_KL or (w_p != 0 and w_q != 0):
        return False, 0
    if w_q == 0:
        return True, 2 if grad_student else 0
    return True, 1 if grad_teacher else 0


_FLOAT32_MAX = 3.4028234663852886e38


def teacher_inv_temp(teacher_temperature, temperature, topk_mode):
    """The teacher's inverse temperature after tt_interface's checks: ``1 / T`` for 0 (the default, and the same
    float for ``T_t == T``: the same bits), else ``1 / T_t``; a top-k teacher's log-probs take no temperature."""
    # as the CPU op's teacher_scale: T_t, 1 / T_t and T / T_t finite in float32 (1e-39 would overflow); plain
    # float arithmetic (no tensor: nothing read from a device)
    tt = float(teacher_temperature)
    usable = 0.0 < tt <= _FLOAT32_MAX and 1.0 / tt <= _FLOAT32_MAX and float(temperature) / tt <= _FLOAT32_MAX
    if not (tt == 0.0 or usable):
        raise ValueError(f"fastkd: teacher_temperature must be 0 (the temperature) or a finite number > 0, "
                         f"got {teacher_temperature}")
    if topk_mode != TOPK_NONE and teacher_temperature not in (0.0, temperature):
        raise ValueError(f"fastkd: teacher_temperature must be 0 or the temperature ({temperature}) with a top-k "
                         f"teacher (its log-probs are taken as given), got {teacher_temperature}")
    return 1.0 / (teacher_temperature or temperature)


def _check(student, teacher, topk_ids, target, row_weight, temperature, kind, ce_weight, topk_mode, a=0.0, b=0.0):
    """Shape, dtype and option checks that need no device read (the values are the Python layer's)."""
    if kind == KIND_RENYI and not (0 < a < float("inf")):
        raise ValueError(f"fastkd: divergence_fwd: Renyi's order (a) must be a finite number > 0, got {a}")
    if kind == KIND_AB and not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"fastkd: divergence_fwd: the AB divergence's alpha, beta (a, b) must be finite, got {a}, {b}")
    if kind not in (KIND_KL, KIND_TVD, KIND_JEFFREYS, KIND_TRIANGULAR, KIND_AB, KIND_RENYI, KIND_ENTROPY_GATED):
        raise ValueError(f"fastkd: divergence_fwd kind must be 0 (KL family), 1 (TVD), 2 (two-sided KL), "
                         f"3 (triangular), 4 (AB divergence), 6 (Renyi) or 7 (entropy-gated KL), got {kind}")
    if topk_mode not in (TOPK_NONE, TOPK_TAIL, TOPK_RENORM):
        raise ValueError(f"fastkd: divergence_fwd topk_mode must be 0 (dense), 1 (tail) or 2 (renormalise), "
                         f"got {topk_mode}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"fastkd: temperature must be a finite number > 0, got {temperature}")
    if student.dim() != 2 or not student.is_floating_point():
        raise ValueError(f"fastkd: student must be a floating-point [N, V] tensor, got {tuple(student.shape)} "
                         f"{student.dtype}")
    n = student.shape[0]
    if teacher.dim() != 2 or not teacher.is_floating_point():
        raise ValueError(f"fastkd: teacher must be a floating-point 2-D tensor, got {tuple(teacher.shape)} "
                         f"{teacher.dtype}")
    if topk_mode == TOPK_NONE:
        if teacher.shape != student.shape:
            raise ValueError(f"fastkd: student and teacher shapes differ: {tuple(student.shape)} vs "
                             f"{tuple(teacher.shape)}")
        if topk_ids.numel() != 0:
            raise ValueError("fastkd: topk_ids must be empty for a dense teacher (topk_mode = 0)")
    else:
        if teacher.shape[0] != n:
            raise ValueError(f"fastkd: teacher (top-k log-probs) must be [N, K] with N = {n}, got "
                             f"{tuple(teacher.shape)}")
        if topk_ids.shape != teacher.shape or topk_ids.dtype != torch.int64:
            raise ValueError(f"fastkd: topk_ids must be int64 of the teacher log-probs' shape {tuple(teacher.shape)}, "
                             f"got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    if target.numel() not in (0, n) or (target.numel() and target.dtype not in (torch.int64, torch.int32)):
        raise ValueError(f"fastkd: target must be empty or int [N] with N = {n}, got {tuple(target.shape)} "
                         f"{target.dtype}")
    if target.numel() == 0 and ce_weight != 0 and n != 0:  # no rows: an empty target is every row's
        raise ValueError(f"fastkd: ce_weight = {ce_weight} needs a target (one class per row)")
    if row_weight.shape != (n,) or row_weight.dtype != torch.float32:
        raise ValueError(f"fastkd: row_weight must be float32 [N] with N = {n}, got {tuple(row_weight.shape)} "
                         f"{row_weight.dtype}")


@triton_op("fastkd::divergence_fwd_triton", mutates_args=())
def _divergence_fwd_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    topk_ids: torch.Tensor,
    target: torch.Tensor,
    row_weight: torch.Tensor,
    temperature: float,
    kind: int,
    a: float,
    b: float,
    w_p: float,
    w_q: float,
    soft_scale: float,
    ce_weight: float,
    topk_mode: int,
    reduce: bool,
    grad_student: bool,
    grad_teacher: bool,
    teacher_temperature: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``divergence_fwd`` row op (docs/design.md): the compiled op's arguments and outputs
    (``teacher_temperature`` > 0: the dense teacher at its own temperature; 0: at ``temperature``).

    Returns (loss, soft, hard, grad_student, grad_teacher): loss/soft/hard float32,
    0-d sums (reduce) or [N]; grad_student [N, V] in the student's dtype and
    grad_teacher in the teacher's shape and dtype, or empty when not requested.
    """
    _check(student, teacher, topk_ids, target, row_weight, temperature, kind, ce_weight, topk_mode, a, b)
    inv_temp_t = teacher_inv_temp(teacher_temperature, temperature, topk_mode)
    student = unit_stride_rows(student)  # row slices run in place; other layouts are copied
    teacher = unit_stride_rows(teacher)
    n, v = student.shape
    dev = student.device
    loss_rows = torch.empty(n, dtype=torch.float32, device=dev)
    soft_rows = torch.empty(n, dtype=torch.float32, device=dev)
    hard_rows = torch.empty(n, dtype=torch.float32, device=dev)
    gs = torch.empty(student.shape, dtype=student.dtype, device=dev) if grad_student else empty_grad(student)
    gt = torch.empty(teacher.shape, dtype=teacher.dtype, device=dev) if grad_teacher else empty_grad(teacher)
    has_target = target.numel() > 0
    # the target pointer is not read without a target: row_weight stands in
    tgt = target.to(torch.int64).contiguous() if has_target else row_weight
    scalars = (v, 1.0 / temperature, a, b, w_p, w_q, soft_scale, ce_weight, math.log(v) if v > 1 else 0.0)
    if n:
        block, num_warps = div_row_config(v)
        with device_guard(student):  # launch on the input's device
            if topk_mode == TOPK_NONE:
                known, cross = dense_sums_known(kind, w_p, w_q, grad_student, grad_teacher)
                wrap_triton(_div_dense_kernel)[(n,)](
                    student, teacher, tgt, row_weight, loss_rows, soft_rows, hard_rows, gs, gt,
                    student.stride(0), teacher.stride(0),
                    gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0, row_weight.stride(0),
                    v, 1.0 / temperature, inv_temp_t, *scalars[2:],
                    KIND=kind, HAS_TARGET=has_target, GRAD_S=grad_student, GRAD_T=grad_teacher,
                    BLOCK=block, num_warps=num_warps, SUMS_KNOWN=known, CROSS=cross,
                )
            else:
                k = teacher.shape[1]
                kp = max(1, triton.next_power_of_2(k))
                block, num_warps = div_topk_config(v, kp)
                ids = unit_stride_rows(topk_ids)
                # membership walk (tail statistics, student gradient): ids sorted per row, padding last
                if topk_mode == TOPK_TAIL or grad_student:
                    sorted_ids = torch.where(ids < 0, torch.full((), ID_SENTINEL, dtype=torch.int64, device=dev),
                                             ids).sort(dim=1).values.contiguous()
                else:
                    sorted_ids = ids  # not read
                wrap_triton(_div_topk_kernel)[(n,)](
                    student, teacher, ids, sorted_ids, tgt, row_weight, loss_rows, soft_rows, hard_rows, gs, gt,
                    student.stride(0), teacher.stride(0), ids.stride(0),
                    gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0, row_weight.stride(0),
                    v, k, *scalars[1:],
                    KIND=kind, TAIL=topk_mode == TOPK_TAIL, HAS_TARGET=has_target,
                    GRAD_S=grad_student, GRAD_T=grad_teacher, BLOCK=block,
                    KP=kp, num_warps=num_warps,
                )
    if reduce:
        return loss_rows.sum(), soft_rows.sum(), hard_rows.sum(), gs, gt
    return loss_rows, soft_rows, hard_rows, gs, gt


register_loss_autograd(_divergence_fwd_op, {0: 3, 1: 4})


def divergence_fwd(student, teacher, topk_ids, target, row_weight, temperature, kind, a, b, w_p, w_q, soft_scale,
                   ce_weight, topk_mode, reduce, grad_student, grad_teacher, teacher_temperature=0.0,
                   teacher_members=None, member_weights=(), mixture_mode=0):
    """``divergence_fwd`` with the compiled op's whole signature (docs/design.md). The Triton kernels take one
    dense teacher: a teacher mixture (``mixture_mode`` 1 or 2 with ``teacher_members``) is refused, and
    ``fastkd.losses.teacher_blocks`` mixes blocks of rows for this backend instead. (A plain function around
    the ``triton_op``, whose schema cannot hold a defaulted tensor list.)"""
    if mixture_mode != 0 or teacher_members or len(member_weights):
        raise ValueError("fastkd: divergence_fwd (triton): a teacher mixture inside the row op (teacher_members, "
                         f"mixture_mode = {mixture_mode}) is implemented by the cpu backend only; fastkd's losses mix "
                         "a TeacherMixture block by block for the triton backend")
    return _divergence_fwd_op(student, teacher, topk_ids, target, row_weight, temperature, kind, a, b, w_p, w_q,
                              soft_scale, ce_weight, topk_mode, reduce, grad_student, grad_teacher,
                              teacher_temperature)
