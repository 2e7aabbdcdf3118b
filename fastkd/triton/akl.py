"""Triton ``akl_fwd``: the adaptive KL (Wu et al., COLING 2025), one program per row.

Contract (``divergence_fwd``'s signature, ``a`` = mu, dense teachers): docs/design.md, "akl_fwd". Per row,
``p = softmax(t / T_t)`` (``T_t`` the teacher_temperature; ``T`` where it is 0), ``q = softmax(s / T)``, ``M(v)``
the teacher mass of the classes whose logit is ``>= v``::

    head = {c : M(t_c) <= mu} plus the classes at max t        (tied logits in or out together)
    h = g_head / max(g_head + g_tail, 1e-8),  l = g_tail / max(...),  g = sum |p - q| over head / tail
    soft = h KL(p || q) + l KL(q || p)                          (h, l constants in the gradients)
    dL/ds = w (soft_scale / T) (G - q sum G) + w ce_weight (softmax(s) - onehot),  G, H of kind 2 at (h, l)
    dL/dt = w (soft_scale / T_t) (H - p sum H)

The head without sorting: ``x* = min {x : f(x) <= mu}`` over the 32-bit order-preserving keys of the teacher's
logits, ``f(x) = sum p [key >= x]`` (non-increasing), so the head is ``key >= x*`` (plus the maxima). A 16-ary
search keeps ``x*`` in ``(lo, hi]``: each pass compares every logit's key with 16 candidates ``lo + i step``
(a ``[32 columns per warp, 16]`` broadcast, summed over the block) and keeps the sub-interval where ``f`` crosses
``mu``; ``hi - lo`` starts at most ``2^32 + 1`` and shrinks 16-fold per pass: at most 9 passes, which read the
teacher alone. Passes over the row: (1) statistics (both nets), (2..) the search (teacher), then the terms
(``KL(p || q)``, ``KL(q || p)``, the gaps by side; both nets) and the gradients (both nets; divergence.py's
gradient pass as kind 2 at ``(h, l)``). ``mu = 1`` skips the search (every class is head).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..core.autograd import register_loss_autograd
from ..core.divergence import KIND_CODES, check_akl_op_args
from ._common import device_guard, empty_grad, load_logits, unit_stride_rows
from .divergence import _check, _div_dense_grads, _store_row_outputs, _target, div_row_config, teacher_inv_temp
from .divergence_rows import _row_stats_tt

# The search's candidates per pass, and its column block: 16 columns per warp (32 from 8 warps), so that the
# [block, 16] comparison holds 8 (16) values per thread. ptxas (tests/test_triton_compile.py, every launch config,
# sm_90 and sm_80): at most 64 registers, no spills. The divergence blocks' 4 columns per thread (64 values per
# thread) took up to 167 registers at 1 and 4 warps; 16 columns per warp at 16 warps spilled 4 bytes on sm_80.
SEARCH_WAYS = 16


def search_block(block, num_warps):
    """The search's column block: 16 columns per warp below 8 warps, 32 from 8, at most the row block."""
    return min(block, (32 if num_warps >= 8 else 16) * num_warps)


@triton.jit
def _keys(t):
    """Order-preserving keys of float32 logits as int64 in [0, 2^32): 0.0 and -0.0 share one (equal logits, equal
    keys); -inf has the smallest key of a number."""
    t = tl.where(t == 0.0, 0.0, t)
    b = t.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(b >= 0, b + 2147483648, -b - 1)


@triton.jit
def _akl_kernel(
    S, T, TGT, W, LOSS, SOFT, HARD, GS, GT,
    stride_s, stride_t, stride_gs, stride_gt, stride_w,
    n_cols, inv_temp, inv_temp_t, mu, soft_scale, ce_weight,
    HAS_TARGET: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr,
    SBLOCK: tl.constexpr, WAYS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride may pass 2^31
    w = tl.load(W + row * stride_w)
    live = w != 0.0
    g, ok = _target(TGT, row, live, n_cols, HAS_TARGET)
    fill = tl.where(live, float("nan"), 0.0)
    n_live = tl.where(ok, n_cols, 0)  # skipped and bad rows read nothing
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    cols = tl.arange(0, BLOCK)

    # ---- pass 1: raw maxima and sums ----
    m_s, z_s, z1, m_t, z_t, _kl = _row_stats_tt(s_row, t_row, n_live, n_cols, inv_temp, inv_temp_t, HAS_TARGET,
                                                BLOCK, "evict_last", 0)
    lz_s = tl.log(z_s)
    lz_t = tl.log(z_t)
    if HAS_TARGET:
        lz1 = tl.log(z1)
        s_g = tl.load(s_row + g, mask=ok, other=0.0).to(tl.float32)
        hard = (m_s - s_g) + lz1
    else:
        lz1 = 0.0
        hard = 0.0

    # ---- the search: x* in (lo, hi], f(lo) > mu (or lo below every key), f(hi) <= mu ----
    lo = (row * 0 - 1).to(tl.int64)
    hi = _keys(m_t) + 1  # nothing above the maximum's key
    hi = tl.where(ok & (mu < 1.0), hi, 0)  # mu = 1: every class is head; unread rows: nothing to search
    ways = tl.arange(0, WAYS).to(tl.int64) + 1
    scols = tl.arange(0, SBLOCK)
    while hi - lo > 1:
        step = (hi - lo + WAYS - 1) // WAYS
        cand = lo + ways * step  # the last is >= hi: f <= mu there
        mass = tl.zeros([WAYS], dtype=tl.float32)
        for start in range(0, n_live, SBLOCK):
            offs = start + scols
            t = tl.load(t_row + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
            p = tl.exp((t - m_t) * inv_temp_t - lz_t)
            p = tl.where(offs < n_cols, p, 0.0)
            above = _keys(t)[:, None] >= cand[None, :]
            mass += tl.sum(tl.where(above, p[:, None], 0.0), 0)
        n_over = tl.sum(tl.where(mass > mu, 1, 0), 0).to(tl.int64)  # f is non-increasing: a prefix of the ways
        new_lo = lo + n_over * step
        hi = tl.minimum(new_lo + step, hi)
        lo = new_lo
    x_star = hi

    # ---- the terms: KL(p || q), KL(q || p), the gaps of head and tail ----
    kl_pq = 0.0
    kl_qp = 0.0
    g_head = 0.0
    g_tail = 0.0
    for start in range(0, n_live, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        s, t = load_logits(s_row, t_row, offs, mask, "evict_last")
        lq = (s - m_s) * inv_temp - lz_s
        lp = (t - m_t) * inv_temp_t - lz_t
        p = tl.exp(lp)
        q = tl.exp(lq)
        delta = lp - lq  # +-inf or NaN where a probability is 0: that term is selected away
        kl_pq += tl.sum(tl.where(p == 0.0, 0.0, p * delta), 0)
        kl_qp += tl.sum(tl.where(q == 0.0, 0.0, -q * delta), 0)
        gap = tl.abs(p - q)
        head = (_keys(t) >= x_star) | (t == m_t)
        g_head += tl.sum(tl.where(mask & head, gap, 0.0), 0)
        g_tail += tl.sum(tl.where(mask & (~head), gap, 0.0), 0)
    total = g_head + g_tail
    total = tl.where(total > 1e-8, total, tl.where(total != total, total, 1e-8))  # the official clamp; NaN stays
    h = g_head / total
    l = g_tail / total
    fwd = tl.where(h == 0.0, 0.0, h * kl_pq)  # a weight of 0 drops its KL (never 0 * inf)
    rev = tl.where(l == 0.0, 0.0, l * kl_qp)
    soft = fwd + rev
    _store_row_outputs(LOSS, SOFT, HARD, row, ok, fill, w, soft, hard, soft_scale, ce_weight)

    # ---- the gradients: kind 2 of divergence_fwd at (a, b) = (h, l), sum G and sum H in closed form ----
    if GRAD_S or GRAD_T:
        _div_dense_grads(s_row, t_row, GS, GT, row, stride_gs, stride_gt, n_cols, n_live, g, ok, fill,
                         m_s, lz_s, m_t, lz_t, lz1, inv_temp, inv_temp_t, h, l, 0.0, 0.0, 0.0, 0.0, rev - h, fwd - l,
                         w * soft_scale * inv_temp, w * soft_scale * inv_temp_t, w * ce_weight, ce_weight,
                         2, HAS_TARGET, GRAD_S, GRAD_T, BLOCK, False)


@triton_op("fastkd::akl_fwd_triton", mutates_args=())
def akl_fwd(
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
    """``akl_fwd`` row op (docs/design.md): ``divergence_fwd``'s arguments and outputs, ``a`` = mu, a dense teacher
    (``teacher_temperature`` > 0: ``p = softmax(t / T_t)``, the head and both KLs at it; 0: at ``temperature``).

    Returns (loss, soft, hard, grad_student, grad_teacher) as ``divergence_fwd``.
    """
    check_akl_op_args(kind, a, topk_mode)
    _check(student, teacher, topk_ids, target, row_weight, temperature, KIND_CODES["jeffreys"], ce_weight, topk_mode)
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
    tgt = target.to(torch.int64).contiguous() if has_target else row_weight  # not read without a target
    if n:
        block, num_warps = div_row_config(v)
        with device_guard(student):
            wrap_triton(_akl_kernel)[(n,)](
                student, teacher, tgt, row_weight, loss_rows, soft_rows, hard_rows, gs, gt,
                student.stride(0), teacher.stride(0),
                gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0, row_weight.stride(0),
                # mu < 1 stays below 1 as a float32 (the kernel selects a head only then)
                v, 1.0 / temperature, inv_temp_t, min(a, 1.0 - 2.0 ** -24) if a < 1.0 else 1.0, soft_scale, ce_weight,
                HAS_TARGET=has_target, GRAD_S=grad_student, GRAD_T=grad_teacher, BLOCK=block,
                SBLOCK=search_block(block, num_warps), WAYS=SEARCH_WAYS, num_warps=num_warps,
            )
    if reduce:
        return loss_rows.sum(), soft_rows.sum(), hard_rows.sum(), gs, gt
    return loss_rows, soft_rows, hard_rows, gs, gt


register_loss_autograd(akl_fwd, {0: 3, 1: 4})
