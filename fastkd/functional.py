"""Every loss as a function, as ``torch.nn.functional`` holds torch's (also re-exported as ``fastkd.*``).

Defined by family in ``fastkd.losses``; ``simkd_loss`` and ``ipw_weights`` are the
reference's own (cheap, or not logit-sized: no fused kernel needed). The teacher's side,
``teacher_topk`` and ``topk_from_logits`` (``fastkd.teacher``), is re-exported here too.
"""
from .losses.align import merge_aligned
from .losses.classification import ats_loss, dist_loss, dkd_loss, kd_loss, mgd_loss
from .losses.cross_tokenizer import hybrid_uld_loss, uld_loss
from .losses.divergence import forward_kl_loss, jsd_loss, reverse_kl_loss, skew_kl_loss, triangular_loss, tvd_loss
from .losses.power import ab_divergence_loss, alpha_divergence_loss, renyi_loss
from .losses.two_sided import akl_loss, entropy_gated_kl_loss, jeffreys_loss
from .losses.fused_linear import fused_linear_kd_loss
from .reference.classification import ipw_weights, simkd_loss
from .teacher.topk import teacher_topk, topk_from_logits

__all__ = ["kd_loss", "dkd_loss", "ats_loss", "dist_loss", "mgd_loss", "simkd_loss", "ipw_weights",
           "forward_kl_loss", "reverse_kl_loss", "jsd_loss", "skew_kl_loss", "tvd_loss", "jeffreys_loss",
           "triangular_loss", "entropy_gated_kl_loss", "akl_loss", "alpha_divergence_loss", "ab_divergence_loss",
           "renyi_loss", "fused_linear_kd_loss", "teacher_topk", "topk_from_logits",
           "uld_loss", "hybrid_uld_loss", "merge_aligned"]
