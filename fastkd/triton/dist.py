"""Triton DIST: Pearson relations of the softmaxes, inter-class (per row) and
intra-class (per class, over the batch).

    y_s = softmax(s / tau), y_t = softmax(t / tau)          (rows of [N, C])
    rho(x, y) = <x - mean x, y - mean y> / (||x - mean x|| ||y - mean y|| + 1e-8)
    loss = tau^2 * (beta * (1 - mean_i rho(y_s[i,:], y_t[i,:]))
                  + gamma * (1 - mean_c rho(y_s[:,c], y_t[:,c])))

Passes over the logits, and why there are that many:
  1. ``_dist_lse_kernel`` (one read, per row): the softmax normaliser of each
     row (lse of s/tau and t/tau). Every later y needs it.
  2. ``_dist_stats_kernel`` (one read, tiles of [rows, classes]): each class's
     correlation needs that class's mean over the *whole* batch, which is known
     only once every row has been seen: a grid-wide barrier, i.e. a kernel
     boundary. This pass computes, per class and per slice of rows, the mean,
     centred second moments and co-moment of (y_s, y_t) with Chan's parallel
     merge (stable, no sum(y^2) - n*mean^2 cancellation); the slices are merged
     in PyTorch on [slices, C]. The same tiles also give each row's centred
     inter-class sums (a row's mean is exactly 1/C), written per class block
     and summed in PyTorch.
  3. ``_dist_grad_kernel`` (only if a gradient is requested, per row, two
     sweeps): the softmax backward dL/dx = y * (g - <y, g>) / tau needs the
     row's dot product <y, g>, and g involves the per-class statistics of pass 2,
     so a first sweep accumulates <y, g> and a second sweep (the same row again,
     mostly from L2) writes the gradient.
Without gradients the logits are read twice; with them four times (the fourth
mostly from L2). No float32 [N, C] temporaries: [N] and [C] statistics, plus the
per-class-block row partials [3, ceil(C / 128), N] (at most 3/128 of [N, C] for N >= 16).

Gradient of rho w.r.t. its first argument (n_x, n_y the centred norms, D = n_x n_y + 1e-8,
cov the centred inner product; zero where n_x == 0, as torch's norm backward):
    d rho / d x_k = (y_k - mean y) / D - cov * n_y * (x_k - mean x) / (n_x * D^2)
so, per element, with row coefficients A_i, B_i and class coefficients U_c, V_c:
    g_s[i,c] = A_i (y_t - 1/C) + Bs_i (y_s - 1/C) + U_c (y_t - mu_t[c]) + Vs_c (y_s - mu_s[c])
    A_i = -tau^2 beta / (N D_i),    Bs_i = tau^2 beta cov_i n_t,i / (N n_s,i D_i^2)
    U_c = -tau^2 gamma / (C D_c),   Vs_c = tau^2 gamma cov_c n_t,c / (C n_s,c D_c^2)
(the teacher's swaps s and t).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..core.autograd import register_loss_autograd
from ._common import device_guard, empty_grad, load_logits, online_update, row_config, unit_stride_rows

EPS = 1e-8
# Pass-2 tile: 2048 elements per tensor (16 per thread at 4 warps), normally
# 16 rows by 128 classes (a 256-byte bf16 segment per row, whole cache lines);
# a batch of fewer than 16 rows gets fewer, wider tile rows instead of masked lanes.
STATS_TILE = 2048
STATS_BLOCK_R = 16
STATS_WARPS = 4
# Enough programs to fill a large GPU when there are few class blocks (e.g. 19
# classes of a dense-prediction map with millions of rows).
STATS_TARGET_PROGRAMS = 1024


@triton.jit
def _dist_lse_kernel(S, T, LSE, stride_s, stride_t, n_rows, n_cols, inv_temp, BLOCK: tl.constexpr):
    # LSE[0, i] = logsumexp(s_i / tau), LSE[1, i] = logsumexp(t_i / tau)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        s, t = load_logits(S + row * stride_s, T + row * stride_t, offs, mask, "")
        m_s, z_s, _e_s, _al_s = online_update(m_s, z_s, s * inv_temp)
        m_t, z_t, _e_t, _al_t = online_update(m_t, z_t, t * inv_temp)
    tl.store(LSE + row, m_s + tl.log(z_s))
    tl.store(LSE + n_rows + row, m_t + tl.log(z_t))


@triton.jit
def _dist_stats_kernel(
    S, T, LSE, ROWPART, COLPART,
    stride_s, stride_t, n_rows, n_cols, rows_per_slice, inv_temp, inv_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (class block cb, row slice rs).
    # ROWPART[k, cb, i] (k = 0..2): sum over this block's classes of
    #   (y_s - 1/C)(y_t - 1/C), (y_s - 1/C)^2, (y_t - 1/C)^2.
    # COLPART[k, rs, c] (k = 0..4): over this slice's rows, mean y_s, mean y_t,
    #   sum (y_s - mean)^2, sum (y_t - mean)^2, sum (y_s - mean)(y_t - mean).
    cb = tl.program_id(0).to(tl.int64)  # 64-bit: offsets below are products of sizes
    rs = tl.program_id(1).to(tl.int64)
    n_blocks = tl.num_programs(0).to(tl.int64)
    n_slices = tl.num_programs(1).to(tl.int64)
    cls = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < n_cols
    r_begin = rs * rows_per_slice
    r_end = tl.minimum(r_begin + rows_per_slice, n_rows)
    cnt = 0.0
    mean_s = tl.zeros([BLOCK_C], tl.float32)
    mean_t = tl.zeros([BLOCK_C], tl.float32)
    m2_s = tl.zeros([BLOCK_C], tl.float32)
    m2_t = tl.zeros([BLOCK_C], tl.float32)
    co = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(r_begin, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < r_end
        m2d = rmask[:, None] & cmask[None, :]
        lse_s = tl.load(LSE + rows, mask=rmask, other=0.0)
        lse_t = tl.load(LSE + n_rows + rows, mask=rmask, other=0.0)
        s = tl.load(S + rows[:, None] * stride_s + cls[None, :], mask=m2d, other=float("-inf")).to(tl.float32)
        t = tl.load(T + rows[:, None] * stride_t + cls[None, :], mask=m2d, other=float("-inf")).to(tl.float32)
        ys = tl.exp(s * inv_temp - lse_s[:, None])  # masked lanes: exp(-inf) = 0
        yt = tl.exp(t * inv_temp - lse_t[:, None])
        # inter-class partial sums, centred by the exact row mean 1/C
        xs = tl.where(m2d, ys - inv_c, 0.0)
        xt = tl.where(m2d, yt - inv_c, 0.0)
        part = ROWPART + cb * n_rows + rows
        tl.store(part, tl.sum(xs * xt, 1), mask=rmask)
        tl.store(part + n_blocks * n_rows, tl.sum(xs * xs, 1), mask=rmask)
        tl.store(part + 2 * n_blocks * n_rows, tl.sum(xt * xt, 1), mask=rmask)
        # this tile's per-class statistics, then Chan's merge into the running ones
        nb = tl.minimum(r_end - r0, BLOCK_R).to(tl.float32)
        tmean_s = tl.sum(ys, 0) / nb
        tmean_t = tl.sum(yt, 0) / nb
        ds = tl.where(m2d, ys - tmean_s[None, :], 0.0)
        dt = tl.where(m2d, yt - tmean_t[None, :], 0.0)
        new = cnt + nb
        delta_s = tmean_s - mean_s
        delta_t = tmean_t - mean_t
        f = cnt * nb / new
        mean_s += delta_s * (nb / new)
        mean_t += delta_t * (nb / new)
        m2_s += tl.sum(ds * ds, 0) + delta_s * delta_s * f
        m2_t += tl.sum(dt * dt, 0) + delta_t * delta_t * f
        co += tl.sum(ds * dt, 0) + delta_s * delta_t * f
        cnt = new
    out = COLPART + rs * n_cols + cls
    step = n_slices * n_cols
    tl.store(out, mean_s, mask=cmask)
    tl.store(out + step, mean_t, mask=cmask)
    tl.store(out + 2 * step, m2_s, mask=cmask)
    tl.store(out + 3 * step, m2_t, mask=cmask)
    tl.store(out + 4 * step, co, mask=cmask)


@triton.jit
def _dist_net_grad(sweep: tl.constexpr, y, y_other, c, c_other, a_i, b_i, u, v, inv_c, inv_temp, dot, G, offs, mask):
    """One net's part of a sweep of _dist_grad_kernel (the other net's values primed below):
    g = A (y' - 1/C) + B (y - 1/C) + U c' + V c with c = y - mu; sweep 0 adds <y, g> to ``dot``
    and returns it, sweep 1 writes y (g - dot) / tau at ``G + offs``."""
    g = a_i * (y_other - inv_c) + b_i * (y - inv_c) + u * c_other + v * c
    if sweep == 0:
        dot += tl.sum(tl.where(mask, y * g, 0.0), 0)
    else:
        tl.store(G + offs, (y * (g - dot) * inv_temp).to(G.dtype.element_ty), mask=mask)
    return dot


@triton.jit
def _dist_grad_kernel(
    S, T, ROWC, COLC, GS, GT,
    stride_s, stride_t, stride_gs, stride_gt, n_rows, n_cols, inv_temp, inv_c,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr,
):
    # ROWC[k, i]: lse_s, lse_t, A, Bs, Bt.   COLC[k, c]: mu_s, mu_t, Us, Ut, Vs, Vt.
    # g_s = A (y_t - 1/C) + Bs (y_s - 1/C) + Us (y_t - mu_t) + Vs (y_s - mu_s)
    # g_t = A (y_s - 1/C) + Bt (y_t - 1/C) + Ut (y_s - mu_s) + Vt (y_t - mu_t)
    # dL/ds = y_s (g_s - <y_s, g_s>) / tau   (and likewise for t)
    # The differences are formed explicitly (not folded into per-class constants):
    # the coefficients grow like 1/norm, and a class whose values are all equal
    # (e.g. N == 1) has exactly-zero differences that must stay zero.
    row = tl.program_id(0).to(tl.int64)
    lse_s = tl.load(ROWC + row)
    lse_t = tl.load(ROWC + n_rows + row)
    a_i = tl.load(ROWC + 2 * n_rows + row)
    bs_i = tl.load(ROWC + 3 * n_rows + row)
    bt_i = tl.load(ROWC + 4 * n_rows + row)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    cols = tl.arange(0, BLOCK)
    dot_s = 0.0
    dot_t = 0.0
    for sweep in tl.static_range(2):  # sweep 0: <y, g>; sweep 1: write the gradient
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            mask = offs < n_cols
            s, t = load_logits(s_row, t_row, offs, mask, "")
            ys = tl.exp(s * inv_temp - lse_s)  # masked lanes: 0
            yt = tl.exp(t * inv_temp - lse_t)
            cs = ys - tl.load(COLC + offs, mask=mask, other=0.0)
            ct = yt - tl.load(COLC + n_cols + offs, mask=mask, other=0.0)
            if GRAD_S:
                u = tl.load(COLC + 2 * n_cols + offs, mask=mask, other=0.0)
                v = tl.load(COLC + 4 * n_cols + offs, mask=mask, other=0.0)
                dot_s = _dist_net_grad(sweep, ys, yt, cs, ct, a_i, bs_i, u, v, inv_c, inv_temp, dot_s,
                                       GS + row * stride_gs, offs, mask)
            if GRAD_T:
                u = tl.load(COLC + 3 * n_cols + offs, mask=mask, other=0.0)
                v = tl.load(COLC + 5 * n_cols + offs, mask=mask, other=0.0)
                dot_t = _dist_net_grad(sweep, yt, ys, ct, cs, a_i, bt_i, u, v, inv_c, inv_temp, dot_t,
                                       GT + row * stride_gt, offs, mask)


def _rho_and_coefs(cov, var_x, var_y, weight):
    """rho = cov / (n_x n_y + eps) and the gradient coefficients of ``weight * (1 - rho)``:
    ``own_x`` multiplies (x - mean x) in dL/dx, ``cross`` multiplies (y - mean y)."""
    nx = var_x.clamp_min(0).sqrt()
    ny = var_y.clamp_min(0).sqrt()
    den = nx * ny + EPS
    rho = cov / den
    cross = -weight / den
    # d rho / d x has -cov * n_y / (n_x * D^2); torch's norm backward gives 0 at n_x == 0.
    own_x = torch.where(nx > 0, weight * cov * ny / (nx * den * den), torch.zeros_like(nx))
    own_y = torch.where(ny > 0, weight * cov * nx / (ny * den * den), torch.zeros_like(ny))
    return rho, cross, own_x, own_y


@triton_op("fastkd::dist_fwd_triton", mutates_args=())
def dist_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    beta: float,
    gamma: float,
    temperature: float,
    grad_student: bool,
    grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DIST op on the whole [N, C] batch (see module docstring). Returns the 0-d
    float32 loss and the requested gradients (empty tensors otherwise); an empty
    batch gives loss 0."""
    student = unit_stride_rows(student)  # the kernels take row strides: no copy of a row slice
    teacher = unit_stride_rows(teacher)
    n, c = student.shape
    dev = student.device
    gs = torch.empty_like(student) if grad_student else empty_grad(student)
    gt = torch.empty_like(teacher) if grad_teacher else empty_grad(teacher)
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=dev), gs, gt
    inv_temp = 1.0 / temperature
    scale = temperature * temperature

    # pass 1: row normalisers
    lse = torch.empty((2, n), dtype=torch.float32, device=dev)
    block, num_warps = row_config(c)
    with device_guard(student):  # launch on the input's device
        wrap_triton(_dist_lse_kernel)[(n,)](
            student, teacher, lse, student.stride(0), teacher.stride(0), n, c, inv_temp,
            BLOCK=block, num_warps=num_warps,
        )

    # pass 2: inter-class row sums and per-slice class statistics
    block_r = min(STATS_BLOCK_R, triton.next_power_of_2(int(n)))
    block_c = STATS_TILE // block_r
    n_cblocks = triton.cdiv(c, block_c)
    n_slices = max(1, min(triton.cdiv(n, block_r), STATS_TARGET_PROGRAMS // n_cblocks))
    rows_per_slice = triton.cdiv(triton.cdiv(n, n_slices), block_r) * block_r
    n_slices = triton.cdiv(n, rows_per_slice)
    rowpart = torch.empty((3, n_cblocks, n), dtype=torch.float32, device=dev)
    colpart = torch.empty((5, n_slices, c), dtype=torch.float32, device=dev)
    with device_guard(student):  # launch on the input's device
        wrap_triton(_dist_stats_kernel)[(n_cblocks, n_slices)](
            student, teacher, lse, rowpart, colpart,
            student.stride(0), teacher.stride(0), n, c, rows_per_slice, inv_temp, 1.0 / c,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=STATS_WARPS,
        )
    cov_r, var_rs, var_rt = rowpart.sum(dim=1)
    # Chan's merge of the row slices: total mean, plus the spread of slice means.
    first_row = torch.arange(n_slices, device=dev, dtype=torch.float32) * rows_per_slice
    counts = (n - first_row).clamp(max=rows_per_slice).unsqueeze(1)
    mean_s_k, mean_t_k, m2_s_k, m2_t_k, co_k = colpart
    mu_s = (counts * mean_s_k).sum(0) / n
    mu_t = (counts * mean_t_k).sum(0) / n
    dev_s = mean_s_k - mu_s
    dev_t = mean_t_k - mu_t
    var_cs = m2_s_k.sum(0) + (counts * dev_s * dev_s).sum(0)
    var_ct = m2_t_k.sum(0) + (counts * dev_t * dev_t).sum(0)
    cov_c = co_k.sum(0) + (counts * dev_s * dev_t).sum(0)

    rho_r, a_r, bs_r, bt_r = _rho_and_coefs(cov_r, var_rs, var_rt, scale * beta / n)
    rho_c, u_c, vs_c, vt_c = _rho_and_coefs(cov_c, var_cs, var_ct, scale * gamma / c)
    loss = scale * (beta * (1.0 - rho_r.mean()) + gamma * (1.0 - rho_c.mean()))

    # pass 3: gradients
    if grad_student or grad_teacher:
        rowc = torch.stack([lse[0], lse[1], a_r, bs_r, bt_r]).contiguous()
        # A cross coefficient multiplies the *other* net's centred values; where those
        # are all exactly 0 (a constant class) the product is 0 whatever the coefficient.
        u_s = torch.where(var_ct > 0, u_c, torch.zeros_like(u_c))
        u_t = torch.where(var_cs > 0, u_c, torch.zeros_like(u_c))
        colc = torch.stack([mu_s, mu_t, u_s, u_t, vs_c, vt_c]).contiguous()
        with device_guard(student):  # launch on the input's device
            wrap_triton(_dist_grad_kernel)[(n,)](
                student, teacher, rowc, colc, gs, gt,
                student.stride(0), teacher.stride(0),
                gs.stride(0) if grad_student else 0, gt.stride(0) if grad_teacher else 0,
                n, c, inv_temp, 1.0 / c,
                GRAD_S=grad_student, GRAD_T=grad_teacher, BLOCK=block, num_warps=num_warps,
            )
    return loss.to(torch.float32), gs, gt


register_loss_autograd(dist_fwd, {0: 1, 1: 2})
