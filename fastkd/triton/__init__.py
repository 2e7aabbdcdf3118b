"""Triton backend: every fused row op registered as a ``torch.library.triton_op``.

Each op (``torch.ops.fastkd.<name>_triton``) returns the loss and the input
gradients it was asked for, computed in the forward pass; its autograd only
scales them by the incoming gradient (``fastkd.core.autograd.register_loss_autograd``, shared with the compiled backends).
The names exported here are those autograd-aware ops, called with the
signatures of ``docs/design.md``:

    kd_fwd, ats_fwd      kd.py    one program per row, online softmax over class blocks
    dkd_fwd              dkd.py   same layout; TCKD and NCKD from one pass of row statistics
    dist_fwd             dist.py  row lse pass, class-statistics pass, gradient pass
    divergence_fwd       divergence.py  LM divergences (KL family, TVD, top-k teacher, fused CE): stats, terms, gradients
    akl_fwd              akl.py   adaptive KL: stats, a 16-ary key search for the teacher's head, terms, gradients
    mgd_mask, mgd_sq_err mgd.py   element-wise; the mask is hashed in-kernel from the seed
    topk_fwd             topk.py  the teacher's top-k per row: sorted 64-bit keys merged per block, tail pass

Launch sizes and the reason for each are next to their constants
(``_common.row_config``, ``dist.STATS_*``, ``mgd.ELEM_*``).
"""
from .akl import akl_fwd
from .dist import dist_fwd
from .divergence import divergence_fwd
from .dkd import dkd_fwd
from .kd import ats_fwd, kd_fwd
from .mgd import mgd_mask, mgd_sq_err
from .topk import topk_fwd

__all__ = ["kd_fwd", "ats_fwd", "dkd_fwd", "dist_fwd", "divergence_fwd", "akl_fwd", "mgd_mask", "mgd_sq_err", "topk_fwd"]
