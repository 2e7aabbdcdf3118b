"""Triton backend: every fused row op registered as a ``torch.library.triton_op``.

Each op (``torch.ops.fastkd.<name>_triton``) returns the loss and the input
gradients it was asked for, computed in the forward pass; its autograd only
scales them. The names exported here are the autograd-aware ops themselves,
called with the signatures of ``docs/design.md``.
"""
from .dkd import dkd_fwd
from .kd import ats_fwd, kd_fwd

__all__ = ["kd_fwd", "ats_fwd", "dkd_fwd"]
