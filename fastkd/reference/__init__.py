"""Plain-PyTorch references of every fastkd loss: the ground truth of the fused backends.

They mirror each method's official semantics (``docs/methods.md``) and
favour obviousness over speed (each materialises its ``[N, C]`` temporaries); math in
``max(float32, input dtypes)``, so float64 inputs give float64 losses and
``torch.autograd.gradcheck`` works. ``backend="reference"`` of every public loss runs
these. Conventions shared by every logit loss: ``fastkd.reference.classification``.

* ``classification``: KD, DKD, ATS, DIST, MGD, SimKD, IPWD's weights;
* ``cross_tokenizer``: ULD (sorted probabilities, vocabularies of different sizes);
* ``divergence``: the language-model divergences, top-k teachers, and
  ``divergence_fwd``, the fused row op in plain PyTorch.
"""
from .classification import (
    ats_loss,
    dist_loss,
    dkd_loss,
    ipw_weights,
    kd_loss,
    mgd_keep_mask,
    mgd_loss,
    simkd_loss,
)
from .cross_tokenizer import hybrid_uld_loss, uld_loss
from .divergence import (
    LossParts,
    akl_loss,
    entropy_gated_kl_loss,
    alpha_divergence_loss,
    ab_divergence_loss,
    renyi_loss,
    forward_kl_loss,
    jeffreys_loss,
    jsd_loss,
    kd_topk_loss,
    reverse_kl_loss,
    skew_kl_loss,
    topk_log_probs,
    triangular_loss,
    tvd_loss,
)

__all__ = [
    "kd_loss", "dkd_loss", "ats_loss", "dist_loss", "mgd_loss", "mgd_keep_mask", "simkd_loss", "ipw_weights",
    "forward_kl_loss", "reverse_kl_loss", "jsd_loss", "skew_kl_loss", "tvd_loss", "jeffreys_loss",
    "triangular_loss", "entropy_gated_kl_loss", "akl_loss", "alpha_divergence_loss", "ab_divergence_loss",
    "renyi_loss", "kd_topk_loss", "topk_log_probs", "LossParts", "uld_loss", "hybrid_uld_loss",
]
