"""Triton row passes of the vocabulary-parallel divergences (``fastkd/distributed/``): CUDA tensors.

The same three passes, arguments and results as the CPU ops of
``csrc/cpu/divergence_shard.cpp`` (``docs/design.md``, "Distributed losses"), one
program per row of this rank's shard ``[N, V_local]``, with the all-reduces of
per-row numbers between them done by the caller:

* ``divergence_shard_stats``: raw maxima of s and t and the sums of ``exp((x - max) / T)``
  relative to them (and of ``exp(s - max_s)`` for the cross-entropy): ``[N, 5]``.
* ``divergence_shard_terms``: given the whole-vocabulary ``(M_s, L_s, M_t, L_t, L_1)``, the shard's
  part of the loss, of ``sum G``, ``sum H`` and of TVD's sign masses (``[N, 8]``), G and H written to the
  gradient buffers ``g``, ``h`` when every given one is float32 (empty: not wanted; ``_bucket_terms``: the
  single-process kernel's math). With ``row_direct`` ``[N, 2]`` = ``(coef_s, ce)`` (the KL family
  with ``w_p = 0``, whose ``sum G = -(a + b)`` is known beforehand; no teacher gradient) G's
  buffer receives the student's gradient itself, and the grad pass is not needed.
* ``divergence_shard_grad``: the gradients ``coef_s (G - q sum G) + ce (softmax(s) - onehot)``,
  ``coef_t (H - p sum H)`` (TVD: the sign-mass form ``0.5 coef q div_tvd_factor`` from the logits),
  from the stored G, H in place, or with G, H recomputed from the logits (``RECOMPUTE``). Kind 7
  (entropy-gated KL): the terms pass sums ``KL(p || q)``, ``KL(q || p)``, ``H(p)`` and stores nothing; the
  grad pass evaluates kind 2's G, H at the row's gate ``(w, 1 - w)``, ``w`` in ``row_coef[:, 5]``.

Logits: float32, bfloat16 or float16 (converted after loading; the math is float32). Gradient buffers:
float32 or their input's dtype. G, H are kept between the passes in float32 buffers only: rounded to
bf16, G's error ``|G| eps`` can exceed the gradient ``G - q sum G`` itself (forward KL: ``q - p``), so
with a bf16/fp16 buffer the grad pass evaluates the terms again instead (no ``[N, V]`` temporary).
``row_target`` (int64 ``[N]``, the target's local column or -1; empty: none) puts the CE's one-hot in
before a gradient is rounded to its dtype. Rows with ``row_read`` 0 are not read (stats: max -inf, sums
0; G, H: 0). Not registered as torch ops: they run between collectives inside the distributed
autograd node, never under tracing.
"""
import torch
import triton
import triton.language as tl

from ._common import device_guard, load_logits, row_config, unit_stride_rows
from .divergence_rows import _bucket_terms, _row_stats


@triton.jit
def _shard_stats_kernel(S, T, READ, OUT, stride_s, stride_t, n_cols, inv_temp,
                        HAS_CE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * stride may pass 2^31
    live = tl.load(READ + row) != 0.0
    n_live = tl.where(live, n_cols, 0)  # an unread row runs no iteration
    m_s, z_s, z1, m_t, z_t, _ = _row_stats(S + row * stride_s, T + row * stride_t, n_live, n_cols, inv_temp,
                                           HAS_CE, BLOCK, "")  # (no KL: CROSS 0)
    out = OUT + row * 5
    tl.store(out, m_s)
    tl.store(out + 1, z_s)
    tl.store(out + 2, m_t)
    tl.store(out + 3, z_t)
    tl.store(out + 4, z1)


@triton.jit
def _shard_terms_kernel(S, T, STATS, READ, DIRECT, TARGET, SUMS, G, H, stride_s, stride_t, stride_g, stride_h,
                        n_cols, inv_temp, a, b, w_p, w_q,
                        KIND: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, STORE_GRAD: tl.constexpr,
                        ONE_HOT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    live = tl.load(READ + row) != 0.0
    n_live = tl.where(live, n_cols, 0)
    m_s = tl.load(STATS + row * 5)
    l_s = tl.load(STATS + row * 5 + 1)
    m_t = tl.load(STATS + row * 5 + 2)
    l_t = tl.load(STATS + row * 5 + 3)
    if STORE_GRAD:  # sum G = -(a + b) (w_p = 0): G's buffer gets coef_s (G - q sum G) + ce softmax(s)
        l_1 = tl.load(STATS + row * 5 + 4)
        c_s = tl.load(DIRECT + row * 2)
        ce = tl.load(DIRECT + row * 2 + 1)
    log_wp = tl.log(w_p)  # -inf for 0: the mixture then reduces to the other side exactly
    log_wq = tl.log(w_q)
    cols = tl.arange(0, BLOCK)
    soft = 0.0
    sum_g = 0.0
    sum_h = 0.0
    q_lt = 0.0  # TVD's sign masses (csrc/divergence_math.h, DivTvdSums)
    q_gt = 0.0
    p_lt = 0.0
    p_gt = 0.0
    tie = 0.0
    for start in range(0, n_cols, BLOCK):  # every column: an unread row gets zeros
        offs = start + cols
        mask = offs < n_cols
        read = offs < n_live
        s, t = load_logits(S + row * stride_s, T + row * stride_t, offs, read, "")
        lq = (s - m_s) * inv_temp - l_s
        lp = (t - m_t) * inv_temp - l_t
        term, gq, hp = _bucket_terms(lp, lq, a, b, w_p, w_q, log_wp, log_wq, KIND)
        gq = tl.where(read, gq, 0.0)
        hp = tl.where(read, hp, 0.0)
        soft += tl.sum(tl.where(read, term, 0.0), 0)
        sum_g += tl.sum(gq, 0)
        sum_h += tl.sum(hp, 0)
        if KIND == 1:
            q = tl.where(read, tl.exp(lq), 0.0)
            p = tl.where(read, tl.exp(lp), 0.0)
            q_lt += tl.sum(tl.where(q < p, q, 0.0), 0)
            q_gt += tl.sum(tl.where(q > p, q, 0.0), 0)
            p_lt += tl.sum(tl.where(p < q, p, 0.0), 0)
            p_gt += tl.sum(tl.where(p > q, p, 0.0), 0)
            tie += tl.sum(tl.where(p == q, p, 0.0), 0)
        if GRAD_S:
            if STORE_GRAD:
                g = c_s * (gq + (a + b) * tl.exp(lq)) + tl.where(ce == 0.0, 0.0, ce * tl.exp((s - m_s) - l_1))
                if ONE_HOT:  # the CE's one-hot, at the target's local column (-1: none here)
                    g = tl.where(offs == tl.load(TARGET + row), g - ce, g)
                tl.store(G + row * stride_g + offs, tl.where(read, g, 0.0), mask=mask)  # (cast to G's dtype)
            else:
                tl.store(G + row * stride_g + offs, gq, mask=mask)
        if GRAD_T:
            tl.store(H + row * stride_h + offs, hp, mask=mask)
    # (a NaN or all -inf row, which the zero-probability selects may hide, is made NaN by the caller from
    # the lse: a test here cost a stack frame or a spill)
    out = SUMS + row * 8
    tl.store(out, soft)
    tl.store(out + 1, sum_g)
    tl.store(out + 2, sum_h)
    if KIND == 1:
        tl.store(out + 3, q_lt)
        tl.store(out + 4, q_gt)
        tl.store(out + 5, p_lt)
        tl.store(out + 6, p_gt)
        tl.store(out + 7, tie)


@triton.jit
def _tvd_factor(x, y, x_lt, x_gt, tie):
    """csrc/divergence_math.h's div_tvd_factor: the TVD gradient's bracket (times 0.5 x coef)."""
    return tl.where(x > y, tie + 2.0 * x_lt, tl.where(x < y, -(tie + 2.0 * x_gt), x_lt - x_gt))


@triton.jit
def _shard_grad_kernel(S, T, STATS, COEF, READ, TARGET, G, H, stride_s, stride_t, stride_g, stride_h, n_cols,
                       inv_temp, a, b, w_p, w_q,
                       KIND: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, RECOMPUTE: tl.constexpr,
                       ONE_HOT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    live = tl.load(READ + row) != 0.0
    n_live = tl.where(live, n_cols, 0)  # an unread row keeps the zeros of _shard_terms_kernel
    m_s = tl.load(STATS + row * 5)
    l_s = tl.load(STATS + row * 5 + 1)
    m_t = tl.load(STATS + row * 5 + 2)
    l_t = tl.load(STATS + row * 5 + 3)
    l_1 = tl.load(STATS + row * 5 + 4)
    coef = COEF + row * 10
    sum_g = tl.load(coef)
    sum_h = tl.load(coef + 1)
    c_s = tl.load(coef + 2)
    c_t = tl.load(coef + 3)
    ce = tl.load(coef + 4)
    q_lt = tl.load(coef + 5)
    q_gt = tl.load(coef + 6)
    p_lt = tl.load(coef + 7)
    p_gt = tl.load(coef + 8)
    tie = tl.load(coef + 9)
    log_wp = tl.log(w_p)
    log_wq = tl.log(w_q)
    cols = tl.arange(0, BLOCK)
    # RECOMPUTE (bf16/fp16 buffers): the terms pass wrote nothing, so an unread row's zeros are written here
    for start in range(0, n_cols if RECOMPUTE else n_live, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        read = offs < n_live
        q = 0.0
        p = 0.0
        # TVD's bracket and the recomputed terms need both nets; the KL family's stored G, H only the one
        # differentiated
        if GRAD_S or KIND == 1 or RECOMPUTE:
            s = tl.load(S + row * stride_s + offs, mask=read, other=float("-inf")).to(tl.float32)
            lq = (s - m_s) * inv_temp - l_s
            q = tl.exp(lq)
        if GRAD_T or KIND == 1 or RECOMPUTE:
            t = tl.load(T + row * stride_t + offs, mask=read, other=float("-inf")).to(tl.float32)
            lp = (t - m_t) * inv_temp - l_t
            p = tl.exp(lp)
        if KIND == 7:  # entropy-gated: kind 2's G, H at the row's gate (w, 1 - w) (w in the masses' place)
            _, gq, hp = _bucket_terms(lp, lq, q_lt, 1.0 - q_lt, w_p, w_q, log_wp, log_wq, 2)
        elif KIND == 6:  # Renyi: kind 5's G, H at the row's 1 / S (in the masses' place)
            _, gq, hp = _bucket_terms(lp, lq, a, b, q_lt, q_gt, log_wp, log_wq, 5)  # (1 / S, direct)
        elif RECOMPUTE and KIND != 1:  # the buffers hold no G, H (bf16/fp16): the terms pass's math again
            _, gq, hp = _bucket_terms(lp, lq, a, b, w_p, w_q, log_wp, log_wq, KIND)
        if GRAD_S:
            if KIND == 1:  # TVD: the sign-mass form (G - q sum G cancels on a peaked row's largest class)
                g = 0.5 * c_s * q * _tvd_factor(q, p, q_lt, q_gt, tie)
            elif RECOMPUTE or KIND == 7 or KIND == 6:
                g = c_s * (gq - q * sum_g)
            else:
                g = c_s * (tl.load(G + row * stride_g + offs, mask=mask, other=0.0) - q * sum_g)
            g += tl.where(ce == 0.0, 0.0, ce * tl.exp((s - m_s) - l_1))  # the CE's softmax at T = 1
            if ONE_HOT:  # the CE's one-hot, at the target's local column (-1: none here)
                g = tl.where(offs == tl.load(TARGET + row), g - ce, g)
            if RECOMPUTE:
                g = tl.where(read, g, 0.0)
            tl.store(G + row * stride_g + offs, g, mask=mask)  # (cast to G's dtype)
        if GRAD_T:
            if KIND == 1:
                h = 0.5 * c_t * p * _tvd_factor(p, q, p_lt, p_gt, tie)
            elif RECOMPUTE or KIND == 7 or KIND == 6:
                h = c_t * (hp - p * sum_h)
            else:
                h = c_t * (tl.load(H + row * stride_h + offs, mask=mask, other=0.0) - p * sum_h)
            if RECOMPUTE:
                h = tl.where(read, h, 0.0)
            tl.store(H + row * stride_h + offs, h, mask=mask)


DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the logits the kernels take (math in float32)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"fastkd: {name} must be a float32, bfloat16 or float16 2-D tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    return unit_stride_rows(x)


def divergence_shard_stats(student, teacher, temperature: float, ce: bool, row_read) -> torch.Tensor:
    s, t = _rows(student, "student"), _rows(teacher, "teacher")
    n, v = s.shape
    out = torch.empty((n, 5), dtype=torch.float32, device=s.device)
    if n:
        block, warps = row_config(v)
        with device_guard(s):
            _shard_stats_kernel[(n,)](s, t, row_read, out, s.stride(0), t.stride(0), v, 1.0 / temperature,
                                      HAS_CE=ce, BLOCK=block, num_warps=warps)
    return out


def _out_rows(x: torch.Tensor, like: torch.Tensor, name: str) -> int:
    """Row stride of a gradient buffer ``x`` (shaped like its input ``like``, float32 or ``like``'s dtype, unit
    column stride) or 0 if empty."""
    if x.numel() == 0:
        return 0
    if x.dtype not in (torch.float32, like.dtype) or x.shape != like.shape or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"fastkd: {name} must be empty or {tuple(like.shape)} in float32 or {like.dtype} with unit "
                         f"column stride, got {x.dtype} {tuple(x.shape)}")
    return x.stride(0)


def _stored(g: torch.Tensor, h: torch.Tensor) -> bool:
    """Whether G, H are kept in the buffers between the passes: every given one is float32."""
    return all(x.numel() == 0 or x.dtype == torch.float32 for x in (g, h))


def _targets(row_target: torch.Tensor, n: int) -> bool:
    """Whether a one-hot is asked for: ``row_target`` int64 ``[n]`` (empty: none)."""
    if row_target.numel() == 0:
        return False
    if row_target.shape != (n,) or row_target.dtype != torch.int64 or not row_target.is_contiguous():
        raise ValueError(f"fastkd: row_target must be empty or a contiguous int64 vector of {n} rows, got "
                         f"{row_target.dtype} {tuple(row_target.shape)}")
    return True


def divergence_shard_terms(student, teacher, row_stats, temperature: float, kind: int, a: float, b: float,
                           w_p: float, w_q: float, row_read, row_direct, row_target, g, h) -> torch.Tensor:
    s, t = _rows(student, "student"), _rows(teacher, "teacher")
    n, v = s.shape
    stride_g, stride_h = _out_rows(g, s, "g"), _out_rows(h, t, "h")
    one_hot = _targets(row_target, n)
    direct = row_direct.numel() > 0
    if direct and not (kind == 0 and w_p == 0.0 and g.numel() > 0 and h.numel() == 0 and row_direct.shape == (n, 2)
                       and row_direct.dtype == torch.float32 and row_direct.is_contiguous()):
        raise ValueError("fastkd: row_direct (contiguous float32 [N, 2]) needs the KL family with w_p = 0 (sum G "
                         "known), a g buffer and no h (with a teacher gradient the grad pass runs anyway)")
    sums = torch.zeros((n, 8), dtype=torch.float32, device=s.device)  # (the KL family leaves the masses 0)
    store = _stored(g, h)  # G, H kept in float32 buffers only; the direct gradient goes into any
    if n:
        block, warps = row_config(v)
        with device_guard(s):
            _shard_terms_kernel[(n,)](s, t, row_stats, row_read, row_direct if direct else row_read,
                                      row_target if one_hot else row_read, sums, g, h, s.stride(0), t.stride(0),
                                      stride_g, stride_h, v, 1.0 / temperature, a, b, w_p, w_q, KIND=kind,
                                      # kind 7 keeps no G, H (they need the row's gate): the grad pass evaluates
                                      # (kind 6 likewise: they need the row's S)
                                      GRAD_S=g.numel() > 0 and (store or direct) and kind not in (6, 7),
                                      GRAD_T=h.numel() > 0 and store and kind not in (6, 7),
                                      STORE_GRAD=direct, ONE_HOT=one_hot and direct, BLOCK=block, num_warps=warps)
    return sums


def divergence_shard_grad(student, teacher, row_stats, temperature: float, kind: int, a: float, b: float,
                          w_p: float, w_q: float, row_coef, row_read, row_target, g, h) -> None:
    s, t = _rows(student, "student"), _rows(teacher, "teacher")
    n, v = s.shape
    stride_g, stride_h = _out_rows(g, s, "g"), _out_rows(h, t, "h")
    one_hot = _targets(row_target, n)
    if n:
        block, warps = row_config(v)
        with device_guard(s):
            _shard_grad_kernel[(n,)](s, t, row_stats, row_coef, row_read, row_target if one_hot else row_read, g, h,
                                     s.stride(0), t.stride(0), stride_g, stride_h, v, 1.0 / temperature, a, b, w_p,
                                     w_q, KIND=kind, GRAD_S=g.numel() > 0, GRAD_T=h.numel() > 0,
                                     RECOMPUTE=not _stored(g, h) or kind in (6, 7), ONE_HOT=one_hot and g.numel() > 0,
                                     BLOCK=block, num_warps=warps)
