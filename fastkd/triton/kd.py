"""Triton KD and ATS: one program per row, online softmax over class blocks.

Both losses are a tempered KL divergence of one row::

    a = s * inv_a                      (student, scaled logits)
    b = t * inv_b[c]                   (teacher, scaled logits; per class for ATS)
    p_s = softmax(a), p_t = softmax(b)
    KL  = sum_c p_t (log p_t - log p_s)          (terms with p_t == 0 add 0)
    row loss = w * L2 * KL

KD:  inv_a = inv_b = 1/T (T per row), L2 = T^2.
ATS: inv_a = 1/s_T, inv_b[c] = 1/tau_1 at the target column, 1/tau_2 elsewhere, L2 = s_T^2.

Gradients (r = log p_t - log p_s):
    dKL/da = p_s - p_t                 =>  dL/ds = w * L2 * inv_a * (p_s - p_t)
    dKL/db = p_t * (r - KL)            =>  dL/dt = w * L2 * inv_b * p_t * (r - KL)
    (KD: w*T*(p_s - p_t) and w*T*p_t*(r - KL).)
Temperature (KD only; a = s/T and b = t/T both move with T, da/dT = -a/T):
    dKL/dT = -(1/T) * [sum (p_s - p_t) a + sum p_t (r - KL) b]
    dL/dT  = w * (2T*KL - T*[sum (p_s - p_t) a + sum p_t (r - KL) b])
Since sum (p_s - p_t) = 0 and sum p_t (r - KL) = 0, a and b may be shifted by
any per-row constant; the kernel uses log p_s = a - lse_s and log p_t = b - lse_t,
which are O(1) where the probabilities matter, instead of the raw logits.
Logits with a large common offset (1e4): the row maximum is subtracted from the
raw logits before scaling, log p_s = (s - m_s) / T - log z_s, so nothing is
rounded at the offset's scale (s / T would be, to 2.4e-4 at 1e4 / 2: measured
errors of 2e-4 in the gradients and 1.7e-3 in dL/dT, now 2e-7 and 2e-6).

Passes over a row: pass 1 reads s and t once and keeps running maxima and sums
(lse of both, and sum exp(b - m_t) (b - a) for the KL). Pass 2, only when a
gradient is requested, reads the row again (it was read a moment ago by the
same program, so on a GPU it mostly comes from L2: pass 1 loads with
evict_last, pass 2 with evict_first) and writes the gradients, which need the
final lse. No float32 [N, C] temporaries: only the requested gradients are written.
Rows with weight 0 (ignored, or sample weight 0) are skipped: loss 0, grads 0,
their logits and target are never read. An ATS row with weight != 0 and a target
outside [0, C) reads no logit and gets NaN loss and gradients (as the CUDA kernel).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..core.autograd import register_loss_autograd
from ._common import (
    device_guard,
    empty_grad,
    load_logits,
    online_update,
    online_update_scaled,
    row_config,
    unit_stride_rows,
)


@triton.jit
def _kd_kernel(
    S, T, TEMP, TGT, W, LOSS, GS, GT, GTEMP,
    stride_s, stride_t, stride_gs, stride_gt, stride_temp, stride_w,
    n_cols,
    inv_student_temp, inv_target_temp, inv_other_temp, ats_scale,
    IS_ATS: tl.constexpr,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, GRAD_TEMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride may pass 2^31
    w = tl.load(W + row * stride_w)
    live = w != 0.0
    if IS_ATS:
        inv_a = inv_student_temp
        l2 = ats_scale
        g = tl.load(TGT + row, mask=live, other=-1)  # ignored rows: target never read
        # A counted row with a target outside [0, C) (unchecked under torch.compile or
        # on CUDA without a host sync) reads nothing and gets NaN loss and gradients,
        # as the CUDA kernel does; ignored rows still get 0.
        ok = live & (g >= 0) & (g < n_cols)
    else:
        temp = tl.load(TEMP + row * stride_temp)
        inv_a = 1.0 / temp
        l2 = temp * temp
        g = -1
        ok = live
    fill = tl.where(live, float("nan"), 0.0)
    n_live = tl.where(ok, n_cols, 0)  # skipped and bad rows run no pass-1 iteration
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    cols = tl.arange(0, BLOCK)

    # ---- pass 1: running (max, sum) for both nets, and sum e_t * (b - a) ----
    # Student: running max m_s of the raw logits s, log p_s = (s - m_s) / T - log z_s
    # (the shift comes before the scaling: see online_update_scaled). KD's teacher
    # likewise; ATS's teacher has per-class temperatures, which make its softmax depend
    # on the logits' absolute values, so it is scaled first (b = t / tau_c, m_t in
    # scaled units). Differences of large values are formed in raw units: t - s and
    # m_t - m_s are exact where the logits share a large offset.
    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    acc = 0.0  # sum e_t * (b - a) (KD: t - s, raw), rescaled with the teacher's running max
    for start in range(0, n_live, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        s, t = load_logits(s_row, t_row, offs, mask, "evict_last")  # pass 2 should find the row in L2
        m_s, z_s, _e_s, _alpha_s = online_update_scaled(m_s, z_s, s, inv_a)
        if IS_ATS:
            b = t * tl.where(offs == g, inv_target_temp, inv_other_temp)
            m_t, z_t, e_t, alpha_t = online_update(m_t, z_t, b)
            diff = b - s * inv_a
        else:
            m_t, z_t, e_t, alpha_t = online_update_scaled(m_t, z_t, t, inv_a)
            diff = t - s  # raw units: acc is scaled by 1/T once, after the loop
        # p_t == 0 (teacher -inf, masked lanes) adds exactly 0, not 0 * inf.
        acc = acc * alpha_t + tl.sum(e_t * tl.where(e_t > 0.0, diff, 0.0), 0)
    lz_s = tl.log(z_s)
    lz_t = tl.log(z_t)
    # (KD: acc and the maxima stay in raw units until here. Scaling t - s inside the
    # loop made ptxas spill 4 bytes at BLOCK 4096 / 16 warps; tests/test_triton_compile.py.)
    if IS_ATS:
        m_gap = m_t - m_s * inv_a  # lse_t - lse_s = m_gap + lz_t - lz_s
        mean_diff = acc / z_t  # E_t[b - a]
    else:
        m_gap = (m_t - m_s) * inv_a
        mean_diff = acc / z_t * inv_a  # E_t[t - s] / T
    # KL = E_t[b - a] - lse_t + lse_s
    kl = mean_diff - m_gap - lz_t + lz_s
    tl.store(LOSS + row, tl.where(ok, w * l2 * kl, fill))

    # ---- pass 2: gradients with the final statistics ----
    if GRAD_S or GRAD_T or GRAD_TEMP:
        coef = w * l2  # d(row loss)/dKL
        temp_sum = 0.0  # sum (p_s - p_t) log p_s + sum p_t (r - KL) log p_t
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            s, t = load_logits(s_row, t_row, offs, offs < n_live, "evict_first")  # skipped rows: nothing read
            log_ps = (s - m_s) * inv_a - lz_s
            if IS_ATS:
                inv_b = tl.where(offs == g, inv_target_temp, inv_other_temp)
                log_pt = t * inv_b - m_t - lz_t
            else:
                inv_b = inv_a
                log_pt = (t - m_t) * inv_a - lz_t
            p_s = tl.exp(log_ps)
            p_t = tl.exp(log_pt)
            if GRAD_S:
                gs = tl.where(ok, coef * inv_a * (p_s - p_t), fill)
                tl.store(GS + row * stride_gs + offs, gs.to(GS.dtype.element_ty), mask=mask)
            if GRAD_T or GRAD_TEMP:
                r = tl.where(p_t > 0.0, log_pt - log_ps - kl, 0.0)
            if GRAD_T:
                gt = tl.where(ok, coef * inv_b * p_t * r, fill)
                tl.store(GT + row * stride_gt + offs, gt.to(GT.dtype.element_ty), mask=mask)
            if GRAD_TEMP:
                term_s = tl.where(log_ps > float("-inf"), (p_s - p_t) * log_ps, 0.0)
                term_t = tl.where(p_t > 0.0, p_t * r * log_pt, 0.0)
                temp_sum += tl.sum(tl.where(mask, term_s + term_t, 0.0), 0)
        if GRAD_TEMP:
            # dL/dT = w * (2 T KL - T * temp_sum); here temp = T and l2 = T^2.
            g_temp = w * (2.0 * temp * kl - temp * temp_sum)
            tl.store(GTEMP + row, tl.where(ok, g_temp, fill))


# At BLOCK 4096 with 16 warps ptxas spills one register (4 bytes, stack 8) in the
# single-gradient KD variants (sm_90, tests/test_triton_compile.py); at 8 warps no
# variant spills (at most 108 registers), so KD/ATS cap the row config's warps at 8.
KD_MAX_WARPS = 8


def kd_row_config(n_cols):
    """(BLOCK, num_warps) of the KD/ATS kernel: ``row_config`` with at most KD_MAX_WARPS warps."""
    block, num_warps = row_config(n_cols)
    return block, min(num_warps, KD_MAX_WARPS)


def _launch(student, teacher, temperature, target, row_weight, reduce, grad_student, grad_teacher,
            grad_temperature, ats_args):
    """Allocate outputs and run ``_kd_kernel``; ``ats_args`` is None for KD, else
    (1/s_T, 1/tau_target, 1/tau_other, s_T^2) and ``target`` is the int64 targets."""
    student = unit_stride_rows(student)  # the kernels take row strides: no copy of a row slice
    teacher = unit_stride_rows(teacher)
    n, c = student.shape
    dev = student.device
    loss_rows = torch.empty(n, dtype=torch.float32, device=dev)
    gs = torch.empty_like(student) if grad_student else empty_grad(student)
    gt = torch.empty_like(teacher) if grad_teacher else empty_grad(teacher)
    gtemp = torch.empty(n, dtype=torch.float32, device=dev) if grad_temperature else empty_grad(loss_rows)
    is_ats = ats_args is not None
    if n:
        block, num_warps = kd_row_config(c)
        with device_guard(student):  # launch on the input's device
            wrap_triton(_kd_kernel)[(n,)](
                student, teacher, temperature, target, row_weight, loss_rows, gs, gt, gtemp,
                student.stride(0), teacher.stride(0),
                gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0,
                temperature.stride(0), row_weight.stride(0),
                c, *(ats_args if is_ats else (1.0, 1.0, 1.0, 1.0)),
                IS_ATS=is_ats,
                GRAD_S=grad_student, GRAD_T=grad_teacher, GRAD_TEMP=grad_temperature,
                BLOCK=block, num_warps=num_warps,
            )
    loss = loss_rows.sum() if reduce else loss_rows
    return loss, gs, gt, gtemp


@triton_op("fastkd::kd_fwd_triton", mutates_args=())
def kd_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: torch.Tensor,
    row_weight: torch.Tensor,
    reduce: bool,
    grad_student: bool,
    grad_teacher: bool,
    grad_temperature: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD row op: ``row loss = w * T^2 * sum_c p_t (log p_t - log p_s)``, ``p = softmax(x / T)``.

    student, teacher: [N, C] (any of f32/f16/bf16, may differ); temperature and
    row_weight: float32 [N]. Returns (loss, grad_student, grad_teacher,
    grad_temperature): loss is the 0-d sum (reduce) or the weighted row losses
    [N]; each gradient is d(sum of weighted row losses)/d input in that input's
    dtype, or an empty tensor when not requested.
    """
    # KD reads no target: row_weight stands in for the unused pointer.
    return _launch(student, teacher, temperature, row_weight, row_weight, reduce,
                   grad_student, grad_teacher, grad_temperature, None)


register_loss_autograd(kd_fwd, {0: 1, 1: 2, 2: 3})


@triton_op("fastkd::ats_fwd_triton", mutates_args=())
def ats_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    row_weight: torch.Tensor,
    student_temperature: float,
    target_temperature: float,
    other_temperature: float,
    reduce: bool,
    grad_student: bool,
    grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATS row op: ``row loss = w * s_T^2 * KL(q || softmax(s / s_T))``, ``q = softmax(t / tau)``
    with ``tau = target_temperature`` at column ``target[i]`` and ``other_temperature`` elsewhere.

    target: int [N] (not read for rows with weight 0). Returns (loss, grad_student, grad_teacher).
    """
    ats_args = (1.0 / student_temperature, 1.0 / target_temperature, 1.0 / other_temperature,
                student_temperature * student_temperature)
    # ATS has no temperature tensor: row_weight stands in for the unused pointer.
    loss, gs, gt, _ = _launch(student, teacher, row_weight, target.to(torch.int64).contiguous(), row_weight, reduce,
                              grad_student, grad_teacher, False, ats_args)
    return loss, gs, gt


register_loss_autograd(ats_fwd, {0: 1, 1: 2})
