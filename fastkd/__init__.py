"""fastkd: fused knowledge-distillation losses for PyTorch.

    import fastkd
    loss = fastkd.kd_loss(student_logits, teacher_logits, temperature=4.0)

Losses: ``kd_loss``, ``dkd_loss``, ``ats_loss``, ``dist_loss``, ``mgd_loss``,
``simkd_loss``, and ``ipw_weights`` for IPWD's per-sample weights; the
language-model divergences ``forward_kl_loss``, ``reverse_kl_loss``, ``jsd_loss``, ``skew_kl_loss``,
``tvd_loss``, ``jeffreys_loss``, ``triangular_loss``, ``entropy_gated_kl_loss``, ``alpha_divergence_loss``,
``ab_divergence_loss``, ``renyi_loss`` (``TopKTeacher`` for top-k
teachers), ``akl_loss`` (adaptive KL), ``uld_loss`` and
``hybrid_uld_loss`` (teacher and student with different tokenizers), ``fused_linear_kd_loss``
(the LM head fused with the loss; ``process_group=`` for sharded vocabularies); the teacher's side:
``teacher_topk`` (its top-k log-probs from its head, no ``[N, V]`` logits) and ``topk_from_logits``; modules in
``fastkd.nn``; plain-PyTorch versions in ``fastkd.reference``.
``fastkd.backends()`` says which kernels this installation can run;
``fastkd.set_value_checks(True)`` also checks target / temperature values on
GPU tensors (off by default there: it would synchronise every step).
"""
__version__ = "0.1.0"

from . import cache, nn, reference  # noqa: E402  (fastkd.nn usable after `import fastkd`, as torch.nn)
from .core.checks import set_value_checks  # noqa: E402
from .core.cross_tokenizer import HybridParts, ULDParts  # noqa: E402
from .core.divergence import LossParts  # noqa: E402
from .core.topk import TopKTeacher  # noqa: E402
from .core.mixture import TeacherMixture  # noqa: E402
from .core.vocab import MappedTeacher, VocabMap  # noqa: E402
from .dispatch.backend import backends  # noqa: E402
from .losses.align import Alignment, align_tokens, token_offsets  # noqa: E402
from .functional import (  # noqa: E402
    ab_divergence_loss,
    akl_loss,
    alpha_divergence_loss,
    ats_loss,
    dist_loss,
    dkd_loss,
    entropy_gated_kl_loss,
    forward_kl_loss,
    fused_linear_kd_loss,
    ipw_weights,
    jeffreys_loss,
    jsd_loss,
    kd_loss,
    merge_aligned,
    mgd_loss,
    renyi_loss,
    reverse_kl_loss,
    simkd_loss,
    skew_kl_loss,
    teacher_topk,
    topk_from_logits,
    triangular_loss,
    tvd_loss,
    hybrid_uld_loss,
    uld_loss,
)

__all__ = [
    "kd_loss", "dkd_loss", "ats_loss", "dist_loss", "mgd_loss", "simkd_loss", "ipw_weights",
    "forward_kl_loss", "reverse_kl_loss", "jsd_loss", "skew_kl_loss", "tvd_loss", "jeffreys_loss", "triangular_loss",
    "entropy_gated_kl_loss", "akl_loss", "alpha_divergence_loss", "ab_divergence_loss", "renyi_loss",
    "TopKTeacher", "LossParts", "fused_linear_kd_loss", "teacher_topk", "topk_from_logits",
    "uld_loss", "ULDParts", "VocabMap", "MappedTeacher", "hybrid_uld_loss", "HybridParts", "TeacherMixture",
    "align_tokens", "merge_aligned", "Alignment", "token_offsets",
    "backends", "set_value_checks", "nn", "reference", "cache", "__version__",
]
