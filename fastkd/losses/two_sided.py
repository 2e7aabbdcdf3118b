"""The blends of the two KLs, ``w KL(p || q) + (1 - w) KL(q || p)`` per row: Jeffreys (both, ``w = 1``
each), the entropy-gated KL (``w`` from the teacher's entropy) and AKL (``w`` from the gaps on the
teacher's head and tail). Same rows, options and backends as every divergence (``fastkd.losses.divergence``,
whose ``_divergence_loss`` runs them).
"""
from typing import Optional

import torch

from ..core.divergence import check_akl_teacher, check_divergence_args, check_divergence_params
from ..core.topk import TopKTeacher
from .akl_topk import akl_topk_loss
from .divergence import _DETAIL, Teacher, _divergence_loss, check_teacher_temperature

__all__ = ["jeffreys_loss", "entropy_gated_kl_loss", "akl_loss"]


def jeffreys_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    teacher_vocab: str = "truncate",
    process_group=None,
    backend: str = "auto",
):
    params = {}
    return _divergence_loss("jeffreys", params, student_logits, teacher_logits, temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)

def entropy_gated_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    alpha_min: float = 0.0,
    alpha_max: float = 1.0,
    tau: float = 0.5,
    scale: float = 0.1,
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    teacher_vocab: str = "truncate",
    process_group=None,
    backend: str = "auto",
):
    params = {"alpha_min": alpha_min, "alpha_max": alpha_max, "tau": tau, "scale": scale}
    return _divergence_loss("entropy_gated_kl", params, student_logits, teacher_logits, temperature, reduction,
                            target, ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)

def akl_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    *,
    mu: float = 0.5,
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    process_group=None,
    teacher_vocab: str = "truncate",
    backend: str = "auto",
):
    params = {"mu": mu}
    check_akl_teacher(teacher_logits, process_group, topk=True)  # a group: dense logits (the docstring says why)
    if isinstance(teacher_logits, TopKTeacher):  # the head over the buckets (fastkd.losses.akl_topk)
        check_divergence_params(**params)
        check_teacher_temperature(teacher_logits, temperature, teacher_temperature, process_group)
        check_divergence_args(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                              sample_weight, ce_weight, return_parts)
        return akl_topk_loss(student_logits, teacher_logits, float(mu), temperature, reduction, target,
                             ignore_index, sample_weight, ce_weight, return_parts, backend)
    return _divergence_loss("akl", params, student_logits, teacher_logits, temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, process_group, backend,
                            teacher_vocab, teacher_temperature)


jeffreys_loss.__doc__ = """Jeffreys divergence (the symmetrised KL), per row::

        KL(p || q) + KL(q || p) = sum_c (p_c - q_c) (log p_c - log q_c)

    Both mode covering and mode seeking (orda-kernel's Jeffreys). A class that one net
    masks (probability 0) while the other gives it mass makes the loss +inf, as either KL
    is; classes both nets mask add exactly 0. Gradient (``l = log``, ``x = s / T``):
    ``dL/dx_c = (q_c - p_c) + q_c (l q_c - l p_c - KL(q || p))``, the teacher's the same
    with p and q swapped. Two passes over the row would do (both KLs are cross terms of
    the statistics pass); the fused kernels take three, as JSD (README, "passes").
""" + _DETAIL

entropy_gated_kl_loss.__doc__ = """Entropy-gated KL, per row::

        w = alpha_min + (alpha_max - alpha_min) * sigmoid((H(p) / log V - tau) / scale)
        loss = w KL(p || q) + (1 - w) KL(q || p)

    The teacher's normalised entropy ``H(p) / log V`` (in [0, 1]; 0 for ``V = 1``) decides
    between mode covering (forward KL, where the teacher is unsure: ``w -> alpha_max``) and mode
    seeking (reverse KL, where it is sure: ``w -> alpha_min``), as orda-kernel's entropy-gated
    blend. ``alpha_min``, ``alpha_max`` in [0, 1] (either order), ``tau`` finite, ``scale > 0``;
    the defaults are fastkd's. ``V`` is the whole vocabulary (with ``process_group``, the
    entropy and ``log V`` are the whole vocabulary's: the row sums are all-reduced).

    ``w`` depends on the teacher alone and is a constant in both gradients: the student gradient
    (frozen teacher) is exact, ``dL/dx_c = w (q_c - p_c) + (1 - w) q_c (l q_c - l p_c - KL(q || p))``
    (``x = s / T``, ``l = log``); a teacher gradient is that of the blend at fixed ``w`` (the gate's own
    derivative, ``(KL(p || q) - KL(q || p)) dw/dH dH/dy``, is omitted, as AKL omits its weights').
    The fused kernels sum ``KL(p || q)``, ``KL(q || p)`` and ``H(p)`` in the pass after the
    statistics and write the gradients in a third: the passes of Jeffreys. Against a
    ``TopKTeacher``, ``H(p)`` is the buckets' (the K probabilities and the tail bucket; renormalised:
    the K), still divided by ``log V``.
""" + _DETAIL

akl_loss.__doc__ = """Adaptive KL (AKL, Wu et al., COLING 2025), per row::

        head = the teacher's most probable classes holding mass mu (the most probable always in)
        g_head = sum_head |p - q|,  g_tail = sum_tail |p - q|
        h = g_head / max(g_head + g_tail, 1e-8),  l = g_tail / max(g_head + g_tail, 1e-8)
        loss = h KL(p || q) + l KL(q || p)

    As the official ``get_ratio`` / ``AKL`` (distillm style), with ``temperature`` (the official code has
    T = 1; no ``T^2``). The head without a sort: with ``M(v)`` the teacher mass of the classes whose logit is
    ``>= v``, the head is ``{c : M(t_c) <= mu}`` plus the classes at the maximum. Without ties this is the
    official sorted cumulative sum; tied logits are in or out of the head together (the official code splits
    them in its sort's order). ``mu`` in (0, 1]: 1 makes every class head (``l = 0``: ``h`` times forward
    KL), a tiny ``mu`` only the maxima. ``-inf`` logits are classes of probability 0 here, in the head's mass
    and gaps as in the KLs (tail unless ``mu = 1``); the official ``get_ratio`` replaces infinite logits by 0
    before its softmax (for the ratio only), which gives them mass there. ``h`` and ``l`` are constants in the gradients (the official code
    detaches the student's probabilities there): the student gradient is the two-sided KL's at ``(h, l)``,
    ``dL/dx_c = h (q_c - p_c) + l q_c (l q_c - l p_c - KL(q || p))`` (``x = s / T``, ``l`` = log); a
    teacher gradient is the blend's at fixed ``(h, l)`` too.

    The fused kernels run their own row op ``akl_fwd`` (``divergence_fwd``'s signature, ``a = mu``). The head
    is a threshold on the teacher's logits found by selection: the CPU takes one mass histogram of the
    teacher's log-probs (2048 bins from the maximum down to ``p = (1 - mu) / 2V``, below which no class can
    be head) in its terms pass and sorts only the boundary bin's classes; CUDA four radix passes of 8-bit digits over order-preserving keys (256-bin mass
    histograms in shared memory); Triton a 16-ary search over the keys (up to 9 passes of the teacher alone).
    Passes over the row: CPU 4 (statistics; terms + histogram; head gaps + boundary bin; gradients from
    the kept values), CUDA 7 (statistics, 4 radix, terms, gradients), Triton 3 + up to 9 teacher-only
    search passes.

    A ``TopKTeacher`` (an offline cache's top-k; ``fastkd.losses.akl_topk``): the classes are its buckets,
    the K members and, in ``"tail"`` mode, the tail bucket (the teacher's mass outside the top-k, the
    student's exact). The head is found among the members as above; the tail bucket ranks last (each of its
    tokens is less probable than every member), so it is head only at ``mu = 1``. So where the top-k hold
    less than ``mu`` the head is the K members (the dense head would go on into the tail's tokens), and
    ``g_tail`` counts the tail bucket's ``|p - q|`` once (the dense ``g_tail`` sums it token by token: at
    least as large). ``"renormalize"``: both renormalised over the K, no tail bucket. Cost: the forward and
    reverse KL on the top-k row op (row weights times ``h``, ``l``), one more read of the student for its
    log-sum-exps (in blocks of rows), and the cross-entropy, where wanted, a pass of its own.
    ``MappedTeacher`` raises (map it to top-k buckets yourself: ``MappedTeacher.as_topk``).

    ``process_group`` (vocabulary parallel: each rank a contiguous column shard of dense student and teacher
    logits; ``fastkd.distributed.akl``): the loss over the whole vocabulary on every rank and each rank's
    gradient slices, exact against one process. The head's threshold by radix selection over order-preserving
    keys of the teacher's logits with all-reduced mass histograms: per 8-bit digit one SUM all-reduce of a
    ``[rows, 256]`` histogram (4 for float32 math, bf16 and fp16 logits included; 8 for float64; none at
    ``mu = 1``), every rank deciding the digit from the same reduced histogram, so tied logits (on any ranks)
    stay together; the row maximum from the MAX round every sharded divergence makes; then one SUM of the two
    KLs and the gaps by side. Per row chunk 3 + 4 collectives (float64: 3 + 8), ``8 + 4 x 256`` numbers per
    row (float64: ``8 + 8 x 256``; +2 with the CE); PyTorch on the shard (no shard kernels). A ``TopKTeacher``
    or ``MappedTeacher`` with ``process_group`` raises (the buckets' head runs on one process), as does a
    ``teacher_temperature`` other than ``temperature``. The fused head (``fused_linear_kd_loss(divergence=
    "akl")``) takes dense teachers (logits or ``(hidden, weight)``), with ``process_group`` too (the same
    sharded rows per chunk).
""" + _DETAIL
