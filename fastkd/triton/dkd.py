"""Triton DKD (decoupled KD): one program per row, TCKD and NCKD from one pass of row statistics.

With x = logits / T for each net, g the target class, and ' meaning "over the
non-target classes c != g":

    lse' = logsumexp(x_c, c != g)        lse = logaddexp(lse', x_g)
    log p_g     = x_g - lse
    log (1-p_g) = lse' - lse             (stable: no 1 - p, no epsilon)
    log q_c     = x_c - lse'             (non-target distribution, c != g)
    TCKD = p_tg (log p_tg - log p_sg) + (1-p_tg) (log(1-p_tg) - log(1-p_sg))
    NCKD = sum_{c != g} q_t (log q_t - log q_s) = E_{q_t}[b - a] - lse'_t + lse'_s
    row loss = w * T^2 * (alpha * TCKD + beta * NCKD)        (a = s/T, b = t/T)

The pass keeps the running max and sum of the *non-target* classes only (the
target lane is masked to -inf) and reads x_g with one scalar load, so lse' is
exact even when p_g rounds to 1 (a gap of 100 at T=1: exp(-100) relative to the
max would underflow if lse' were taken relative to the max over all classes).

Gradients (dL/ds = w*T * dRow/da, dL/dt = w*T * dRow/db; d = p_sg - p_tg):
    dTCKD/da_g = d                         dTCKD/da_c = -d * q_sc          (c != g)
    dNCKD/da_g = 0                         dNCKD/da_c = m_t q_sc - q_tc
    D = (R_g - R_r) * p_tg (1 - p_tg),  R_g = log p_tg - log p_sg,  R_r = log(1-p_tg) - log(1-p_sg)
    dTCKD/db_g = D                         dTCKD/db_c = -D * q_tc
    dNCKD/db_g = 0                         dNCKD/db_c = q_tc (log q_tc - log q_sc - NCKD)
(d uses 1-p forms when the probabilities are near 1, where p_sg - p_tg would cancel.)
m_t = sum' q_tc is 1, or 0 when every non-target teacher logit is -inf (a masked
vocabulary, a one-hot teacher): NCKD is then 0 whatever the student. Where a net's
lse' is -inf, log q is taken against +inf (q = 0) instead of -inf - -inf = NaN.
Both are the conventions of csrc/dkd_math.h, so the backends agree on such rows.

Pass 2 (only if a gradient is requested) re-reads the row, mostly from L2,
and writes the gradients. Rows with weight 0 are skipped: loss 0, grads 0,
target never read. A counted row with a target outside [0, C) reads no logit and
gets NaN loss and gradients (the CUDA kernel's rule; no host-side check needed).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..core.autograd import register_loss_autograd
from ._common import device_guard, empty_grad, logaddexp, online_update, row_config, unit_stride_rows

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _dkd_kernel(
    S, T, TGT, W, LOSS, GS, GT,
    stride_s, stride_t, stride_gs, stride_gt, stride_w,
    n_cols, inv_temp, alpha, beta, temp,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(W + row * stride_w)
    live = w != 0.0
    g = tl.load(TGT + row, mask=live, other=0)  # ignored rows: target never read
    # A counted row whose target is out of range (a bad label the Python layer did not
    # check: torch.compile, or CUDA inputs checked without a host sync) reads nothing
    # and gets NaN loss and gradients, as the CUDA kernel; ignored rows get 0.
    ok = live & (g >= 0) & (g < n_cols)
    fill = tl.where(live, float("nan"), 0.0)
    n_live = tl.where(ok, n_cols, 0)  # skipped and bad rows run no pass-1 iteration
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    a_g = tl.load(s_row + g, mask=ok, other=0.0).to(tl.float32) * inv_temp
    b_g = tl.load(t_row + g, mask=ok, other=0.0).to(tl.float32) * inv_temp
    cols = tl.arange(0, BLOCK)

    # ---- pass 1: non-target running (max, sum) of both nets, sum e_t (b - a) ----
    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    acc = 0.0
    for start in range(0, n_live, BLOCK):
        offs = start + cols
        mask = (offs < n_cols) & (offs != g)
        # evict_last: pass 2 re-reads the row and should find it in L2
        a = tl.load(s_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_last").to(tl.float32) * inv_temp
        b = tl.load(t_row + offs, mask=mask, other=NEG_INF, eviction_policy="evict_last").to(tl.float32) * inv_temp
        m_s, z_s, _e_s, _al_s = online_update(m_s, z_s, a)
        m_t, z_t, e_t, alpha_t = online_update(m_t, z_t, b)
        diff = tl.where(e_t == 0.0, 0.0, b - a)  # (== 0, not > 0: a NaN stays NaN, as in csrc/kd_math.h)
        acc = acc * alpha_t + tl.sum(e_t * diff, 0)
    lse_os = m_s + tl.log(z_s)  # lse over c != g (-inf when there is no such class)
    lse_ot = m_t + tl.log(z_t)
    lse_s = logaddexp(lse_os, a_g)
    lse_t = logaddexp(lse_ot, b_g)
    lp_sg = a_g - lse_s
    lp_tg = b_g - lse_t
    l1_sg = lse_os - lse_s  # log(1 - p_sg)
    l1_tg = lse_ot - lse_t
    p_sg = tl.exp(lp_sg)
    p_tg = tl.exp(lp_tg)
    q1_s = tl.exp(l1_sg)  # 1 - p_sg
    q1_t = tl.exp(l1_tg)
    tckd = tl.where(p_tg == 0.0, 0.0, p_tg * (lp_tg - lp_sg)) + tl.where(q1_t == 0.0, 0.0, q1_t * (l1_tg - l1_sg))
    # No non-target teacher mass (C == 1, a one-hot or masked teacher): the non-target
    # distribution is empty, NCKD = 0 and its student gradient vanishes (m_t = 0).
    has_t = z_t != 0.0  # (a NaN sum counts as mass: NaN NCKD, not 0)
    nckd = tl.where(has_t, acc / z_t - lse_ot + lse_os, 0.0)
    m_t = tl.where(has_t, 1.0, 0.0)
    # q_c = exp(x_c - lse'): where lse' = -inf every x_c (c != g) is -inf too and
    # -inf - -inf would be NaN; subtracting +inf instead gives q = 0, the right value.
    norm_s = tl.where(lse_os == float("-inf"), float("inf"), lse_os)
    norm_t = tl.where(lse_ot == float("-inf"), float("inf"), lse_ot)
    scale = w * temp * temp
    tl.store(LOSS + row, tl.where(ok, scale * (alpha * tckd + beta * nckd), fill))

    # ---- pass 2: gradients ----
    if GRAD_S or GRAD_T:
        coef = w * temp  # w * T^2 * (1/T)
        # p_sg - p_tg, from whichever side of 1/2 keeps the operands small
        d = tl.where(p_sg + p_tg > 1.0, q1_t - q1_s, p_sg - p_tg)
        pq_t = tl.exp(lp_tg + l1_tg)  # p_tg (1 - p_tg)
        big_d = tl.where(pq_t == 0.0, 0.0, ((lp_tg - lp_sg) - (l1_tg - l1_sg)) * pq_t)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            load_mask = offs < n_live
            is_g = offs == g
            a = tl.load(s_row + offs, mask=load_mask, other=NEG_INF, eviction_policy="evict_first").to(tl.float32)
            b = tl.load(t_row + offs, mask=load_mask, other=NEG_INF, eviction_policy="evict_first").to(tl.float32)
            a = a * inv_temp
            b = b * inv_temp
            log_qs = a - norm_s
            log_qt = b - norm_t
            q_s = tl.where(is_g, 0.0, tl.exp(log_qs))
            q_t = tl.where(is_g, 0.0, tl.exp(log_qt))
            if GRAD_S:
                gs = tl.where(is_g, alpha * d, (beta * m_t - alpha * d) * q_s - beta * q_t)
                gs = tl.where(ok, coef * gs, fill)
                tl.store(GS + row * stride_gs + offs, gs.to(GS.dtype.element_ty), mask=mask)
            if GRAD_T:
                nc = tl.where(q_t == 0.0, 0.0, q_t * (log_qt - log_qs - nckd))
                gt = tl.where(is_g, alpha * big_d, -alpha * big_d * q_t + beta * nc)
                gt = tl.where(ok, coef * gt, fill)
                tl.store(GT + row * stride_gt + offs, gt.to(GT.dtype.element_ty), mask=mask)


@triton_op("fastkd::dkd_fwd_triton", mutates_args=())
def dkd_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    row_weight: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
    reduce: bool,
    grad_student: bool,
    grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DKD row op: ``row loss = w * T^2 * (alpha * TCKD + beta * NCKD)`` (see module docstring).

    student, teacher: [N, C]; target: int [N] (not read where row_weight is 0);
    row_weight: float32 [N]. Returns (loss 0-d or [N], grad_student, grad_teacher).
    """
    student = unit_stride_rows(student)  # the kernels take row strides: no copy of a row slice
    teacher = unit_stride_rows(teacher)
    target = target.to(torch.int64).contiguous()
    n, c = student.shape
    loss_rows = torch.empty(n, dtype=torch.float32, device=student.device)
    gs = torch.empty_like(student) if grad_student else empty_grad(student)
    gt = torch.empty_like(teacher) if grad_teacher else empty_grad(teacher)
    if n:
        block, num_warps = row_config(c)
        with device_guard(student):  # launch on the input's device
            wrap_triton(_dkd_kernel)[(n,)](
                student, teacher, target, row_weight, loss_rows, gs, gt,
                student.stride(0), teacher.stride(0),
                gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0,
                row_weight.stride(0),
                c, 1.0 / temperature, float(alpha), float(beta), float(temperature),
                GRAD_S=grad_student, GRAD_T=grad_teacher, BLOCK=block, num_warps=num_warps,
            )
    loss = loss_rows.sum() if reduce else loss_rows
    return loss, gs, gt


register_loss_autograd(dkd_fwd, {0: 1, 1: 2})
