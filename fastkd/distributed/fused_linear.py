"""Vocabulary parallel: the row op of ``fastkd.fused_linear_kd_loss(process_group=)``."""
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist

from .divergence import divergence_rows
from .rows import run_chunks
from .shard_kernels import kernels_take_all_rows


# ----------------------------------------------------------------------------
# vocabulary parallel: the row op of fused_linear_kd_loss(process_group=)
# ----------------------------------------------------------------------------

# fused_linear_kd_loss's divergence names -> (kind, params) of divergence_rows
_FUSED_LINEAR_KINDS = {
    "kl": ("forward_kl", {}),
    "reverse_kl": ("reverse_kl", {}),
    "jsd": ("jsd", None),  # params: beta
    "skew_kl": ("skew_kl", None),  # params: skew, reverse=False
    "skew_reverse_kl": ("skew_kl", None),  # params: skew, reverse=True
    "tvd": ("tvd", {}),
    "jeffreys": ("jeffreys", {}),
    "triangular": ("triangular", {}),
    "entropy_gated_kl": ("entropy_gated_kl", None),  # params: alpha_min, alpha_max, tau, scale (gate=)
    "alpha_divergence": ("alpha_divergence", None),  # params (gate=): alpha
    "ab_divergence": ("ab_divergence", None),  # params (gate=): alpha, beta
    "renyi": ("renyi", None),  # params (gate=): order, reverse
    "akl": ("akl", None),  # params (gate=): mu (distributed/akl.py: the head's radix sweeps)
}


def fused_linear_row_op(divergence: str, beta: float, skew: float, topk_mode: Optional[str], use_ce: bool,
                        process_group, width: int, equal: torch.Tensor, gate: Optional[dict] = None):
    """``fastkd.fused_linear_kd_loss``'s row op over a vocabulary-sharded group.

    Returns ``op`` with ``divergence_fwd``'s signature (``docs/design.md``), run on one chunk
    of this rank's logits ``[rows, V_local]``: the same loss, soft, hard (global over the
    group, replicated) and this rank's slice of the gradient w.r.t. the chunk's logits, from
    ``divergence_rows`` (three collectives per row chunk of the chunk). The divergence and its
    parameters are bound here; the numeric ``kind``/``a``/``b``/``w_p``/``w_q`` codes the fused
    loop passes are ignored. ``equal``: ``check_group_shapes`` of the whole call. Rows with
    weight 0 are not read (the fused ops' skipped-row rule). ``grad_teacher`` (``teacher_grad=True``):
    this rank's slice of the gradient w.r.t. the chunk's teacher logits too.
    """
    kind, params = _FUSED_LINEAR_KINDS[divergence]
    if kind == "jsd":
        params = {"beta": 0.5 if beta is None else beta}
    elif kind == "skew_kl":
        params = {"skew": skew, "reverse": divergence == "skew_reverse_kl"}
    elif kind in ("entropy_gated_kl", "alpha_divergence", "ab_divergence", "renyi", "akl"):
        params = dict(gate or {})
    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)

    def op(student, teacher, topk_ids, target, row_weight, temperature, _kind, _a, _b, _w_p, _w_q, soft_scale,
           ce_weight, _topk_mode, reduce, grad_student, grad_teacher):
        n = student.shape[0]
        c = SimpleNamespace(kind=kind, params=params, T=float(temperature), soft_scale=float(soft_scale),
                            mode=topk_mode, use_ce=use_ce, ce_weight=float(ce_weight), width=width,
                            offset=rank * width, vocab=world * width, need_s=grad_student, need_t=grad_teacher,
                            need_temp=False,
                            dtype=student.dtype, group=process_group)
        read = row_weight != 0

        def body(r, out):
            return divergence_rows(c, student[r], teacher[r], topk_ids[r] if topk_mode is not None else None,
                                    target[r] if use_ce else None, read[r], row_weight[r], equal, out=out)

        loss, soft, hard, grad_s, grad_t, _ = run_chunks(body, n, student, teacher, grad_student, grad_teacher,
                                                          "sum" if reduce else "none", (n,),
                                                          whole=kernels_take_all_rows(c, student, teacher))
        return loss, soft, hard, grad_s, grad_t

    return op
