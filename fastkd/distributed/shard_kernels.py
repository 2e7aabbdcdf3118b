"""The fused shard kernels of the dense-teacher divergences (float32, bfloat16 and float16 logits, float32
math): which run, and the three passes around the collectives (``docs/design.md``, "Shard kernels").
"""
import torch
import torch.distributed as dist

from ..core.divergence import KIND_CODES, divergence_op_args, entropy_gate, renyi_row
from ..dispatch import ops
from . import settings
from .comm import all_reduce
from .rows import gather_owned, ids_in_range, local_columns, poison

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the logits the shard kernels read as they are


def shard_kernels(c, s: torch.Tensor):
    """The shard ops ``divergence_rows`` runs on (a namespace with ``divergence_shard_stats``, ``_terms``,
    ``_grad``), or None for the PyTorch math: a top-k teacher, AKL (its head: ``distributed/akl.py``), float64
    math (a float64 input),
    ``SHARD_KERNELS = "off"``, or the kernels missing (no compiled CPU ops; no Triton). Float32 math is
    float32, bfloat16 or float16 logits, which the kernels read as they are."""
    if settings.SHARD_KERNELS == "off" or c.mode is not None or c.dtype != torch.float32 or c.kind == "akl":
        return None
    if s.device.type == "cuda" or settings.SHARD_KERNELS == "triton":
        try:
            from ..triton import divergence_shard
        except ImportError:
            return None
        return divergence_shard
    if s.device.type != "cpu":
        return None
    if ops.LOAD_ERROR is not None:
        return None
    return torch.ops.fastkd if hasattr(torch.ops.fastkd, "divergence_shard_stats") else None


def kernels_take_all_rows(c, s: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether the shard kernels run these rows: they make no ``[rows, V_local]`` temporaries (bf16/fp16
    logits are converted after loading, the gradients written into the caller's buffers in their dtype; a
    rare column-strided input is copied whole), so one row chunk, one round of collectives, is enough."""
    return s.dtype in KERNEL_DTYPES and t.dtype in KERNEL_DTYPES and shard_kernels(c, s) is not None


def _gap_scale(z: torch.Tensor, m: torch.Tensor, m_all: torch.Tensor, inv_t: float) -> torch.Tensor:
    """A sum of exps relative to this shard's max ``m``, moved to the group's max ``m_all``: 0 stays 0 (an
    empty or all -inf shard, whose max is -inf), NaN stays NaN."""
    gap = torch.where(m == m_all, torch.zeros_like(m), m - m_all)
    return torch.where(z == 0, z, z * (gap * inv_t).exp())


# About 85 lines: the three kernel passes with the collectives between them, in the order they run.
def divergence_rows_kernel(ops, c, s, t, tgt, read, weight, equal, out):
    """``divergence_rows`` of a dense teacher on the shard kernels ``ops`` (the same collectives and results).

    (1) ``divergence_shard_stats``: this shard's raw maxima and sums of exps relative to them; MAX
    all-reduce of the maxima, the sums moved to the group's maxima (``_gap_scale``), SUM all-reduce
    (with the CE's sum at T = 1 and ``s[target]``). (2) ``divergence_shard_terms``: the shard's part
    of the loss, sum G, sum H (TVD: its sign masses), with G and H kept; SUM all-reduce.
    (3) ``divergence_shard_grad``: the gradients, from the G, H of (2) where they are float32 buffers,
    else with G, H recomputed (bf16/fp16 buffers: ``docs/design.md``, "Shard kernels"); the CE's one-hot
    on the owning rank (``row_target``). Forward KL's student gradient (``sum G`` known) comes from (2)
    directly when no teacher gradient is wanted: no pass (3). ``s``, ``t``: float32, bf16 or fp16 rows, read
    as they are; ``out``: the gradient buffers' rows (float32 or the input's dtype) written in place.
    """
    dev, width, offset, group, T = s.device, c.width, c.offset, c.group, c.T
    f32 = torch.float32
    s = s if s.stride(-1) == 1 else s.contiguous()
    t = t if t.stride(-1) == 1 else t.contiguous()
    n = s.shape[0]
    read_f = torch.ones(n, dtype=f32, device=dev) if read is None else read.to(f32)
    use_ce = c.use_ce
    if use_ce and read is not None:
        tgt = torch.where(read, tgt, torch.zeros_like(tgt))

    stats = ops.divergence_shard_stats(s, t, T, use_ce, read_f)  # [n, 5]: m_s, z_s, m_t, z_t, z_s at T = 1
    m_s, z_s, m_t, z_t, z_1 = stats.unbind(1)
    big_s, big_t = all_reduce([m_s, m_t], dist.ReduceOp.MAX, group)
    sums = [_gap_scale(z_s, m_s, big_s, 1.0 / T), _gap_scale(z_t, m_t, big_t, 1.0 / T)]
    if use_ce:
        t_own, t_col = local_columns(tgt.unsqueeze(1), offset, width)
        sums += [_gap_scale(z_1, m_s, big_s, 1.0), gather_owned(s, t_own, t_col).squeeze(1).to(f32)]
    sums = all_reduce(sums, dist.ReduceOp.SUM, group)
    l_s, l_t = sums[0].log(), sums[1].log()
    l_1 = sums[2].log() if use_ce else torch.zeros_like(l_s)
    # a NaN logit (or an all -inf row) in either net: the kernels' zero-probability selects may hide it
    # (skew KL of an all-NaN student row came out finite), the whole-vocabulary lse does not
    nan_rows = ~((l_s > float("-inf")) & (l_t > float("-inf")))
    nan_rows = nan_rows if read is None else nan_rows & read

    code, a, b, w_p, w_q = divergence_op_args(c.kind, **c.params)
    row_stats = torch.stack([big_s, l_s, big_t, l_t, l_1], dim=1)
    tvd, gated = c.kind == "tvd", c.kind == "entropy_gated_kl"
    zeros = torch.zeros(n, dtype=f32, device=dev)
    ok = equal
    if use_ce:
        ok = ok & ids_in_range(tgt.unsqueeze(1), read, c.vocab, 0)
    weight = poison(weight, ok)
    coef = weight * (c.soft_scale / T)
    ce = weight * c.ce_weight if use_ce and c.ce_weight != 0 and c.need_s else zeros
    # forward KL (w_p = 0): sum G = -(a + b) is known, so the terms pass writes the student's gradient and
    # the grad pass is skipped (with a teacher gradient it runs anyway, for both)
    direct_s = c.need_s and not c.need_t and code == KIND_CODES["kl_family"] and w_p == 0.0

    def buffer(want, given, x):  # the caller's gradient rows, else a new one in x's dtype ([0]: not wanted)
        if not want:
            return torch.empty(0, dtype=f32, device=dev)
        return given if given is not None else torch.empty(x.shape, dtype=x.dtype, device=dev)

    g, h = buffer(c.need_s, out[0], s), buffer(c.need_t, out[1], t)
    direct = torch.stack([coef, ce], dim=1) if direct_s else torch.empty(0, dtype=f32, device=dev)
    # the CE's one-hot (-ce at the target's local column, -1 on the other ranks), put in by the kernels
    # before a gradient is rounded to bf16/fp16
    one_hot = c.need_s and use_ce and c.ce_weight != 0
    target = torch.where(t_own, t_col, -1).squeeze(1) if one_hot else torch.empty(0, dtype=torch.int64, device=dev)
    part = ops.divergence_shard_terms(s, t, row_stats, T, code, a, b, w_p, w_q, read_f, direct, target, g, h)
    if tvd:  # the gradients come from the sign masses (q_lt, q_gt, p_lt, p_gt, tie), not from sum G, sum H
        red = all_reduce([part[:, 0]] + ([part[:, 3:]] if c.need_s or c.need_t else []), dist.ReduceOp.SUM, group)
        sum_g = sum_h = zeros
        # (a NaN in one net: its sign comparisons are all False, so the other net's gradient is 0 there, as
        # in the single-process losses and the reference)
        masses = red[1] if len(red) > 1 else torch.zeros((n, 5), dtype=f32, device=dev)
    elif gated:  # KL(p || q), KL(q || p), H(p) over the whole vocabulary: the gate w, kind 2's sums at (w, 1 - w)
        red = all_reduce([part[:, 0], part[:, 1], part[:, 2]], dist.ReduceOp.SUM, group)
        w = entropy_gate(red[2], c.vocab, a, b, w_p, w_q)  # (the op's a, b, w_p, w_q: alpha_min, ..., scale)
        fwd, rev = torch.where(w == 0, zeros, w * red[0]), torch.where(w == 1, zeros, (1.0 - w) * red[1])
        red[0], sum_g, sum_h = fwd + rev, rev - w, fwd - (1.0 - w)
        masses = torch.cat([w.unsqueeze(1), torch.zeros((n, 4), dtype=f32, device=dev)], dim=1)  # w for the grad
    elif code == KIND_CODES["renyi"]:  # U over the whole vocabulary: the row's S, kind 5's sums; 1 / S for the grad
        red = all_reduce([part[:, 0], part[:, 1]], dist.ReduceOp.SUM, group)  # U, S
        red[0], sum_g, sum_h, inv_s, direct = renyi_row(red[0], red[1], a, b != 0)
        masses = torch.cat([inv_s.unsqueeze(1), direct.unsqueeze(1), torch.zeros((n, 3), dtype=f32, device=dev)], 1)
    else:
        red = all_reduce([part[:, 0], part[:, 1]] + ([part[:, 2]] if c.need_t else []), dist.ReduceOp.SUM, group)
        sum_g, sum_h = red[1], (red[2] if c.need_t else zeros)
        masses = torch.zeros((n, 5), dtype=f32, device=dev)
    soft = red[0] * c.soft_scale
    soft = torch.where(nan_rows, torch.full_like(soft, float("nan")), soft)
    hard = torch.zeros_like(soft)
    if use_ce:
        hard = (big_s - sums[3]) + l_1  # lse(s) - s[target], T = 1
        if read is not None:  # an unread row's statistics are empty (-inf): its CE is 0, not -inf * 0
            hard = torch.where(read, hard, torch.zeros_like(hard))
    rows = soft + c.ce_weight * hard if c.ce_weight != 0 else soft
    if (c.need_s and not direct_s) or c.need_t:
        row_coef = torch.cat([torch.stack([sum_g, sum_h, coef, coef, ce], dim=1), masses], dim=1)
        ops.divergence_shard_grad(s, t, row_stats, T, code, a, b, w_p, w_q, row_coef, read_f, target, g, h)
    return rows * weight, soft * weight, hard * weight, (g if c.need_s else None), (h if c.need_t else None), None
