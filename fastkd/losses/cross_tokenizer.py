"""Distillation across tokenizers: ULD (``uld_loss``) and GOLD's hybrid (``hybrid_uld_loss``), batched,
with no full sort of either vocabulary on CPU tensors (the algorithm and the row driver:
``fastkd.losses.uld_rows``).

On CPU tensors ``backend="auto"`` runs the C++ kernel ``fastkd::uld_fwd`` (``csrc/cpu/uld.cpp``: the same
identity, 64 buckets per octave, the ambiguous elements sorted), for exact ULD of logits or of log-probs
taken as given (``inputs="log_probs"``: the merged rows of ``fastkd.merge_aligned``); elsewhere, and for
``k=K`` (``torch.topk`` of each side, the K pairs exactly plus the two tails' masses as one pair; the
bound ``2 min(A, B)`` in ``ULDParts.bound``), the batched PyTorch row driver.

Rows and weights as the divergences (``docs/design.md``, "Row weights"); skipped rows are not
read; a read row whose log-sum-exp is not finite (NaN or +inf logits, a row of -inf) gets a NaN
loss and NaN gradients. Gradients are computed in the forward pass and scaled in place in backward
(usable once, as the fused losses).

``hybrid_uld_loss`` runs on the same row driver: per chunk the matched terms and their derivatives in
closed form, the unmatched ULD by the sorted L1, the gradients written into the stored ``[N, V]`` rows;
no autograd graph, no full-size temporary.
"""
import math
from typing import Optional

import torch

from ..core import checks
from ..core.checks import BACKENDS, check_constant_weight
from ..core.divergence import divergence_coefficients
from ..core.cross_tokenizer import HybridParts, ULDParts, check_hybrid_args, check_uld_args
from ..core.rows import row_view, row_weights, wants_grad
from ..dispatch import ops as _ops
from ..reference import cross_tokenizer as R
from .uld_rows import RowsFunction, Shards, sorted_l1, sorted_l1_batched, uld_op

__all__ = ["uld_loss", "hybrid_uld_loss", "ULDParts", "HybridParts", "sorted_l1_batched"]

_NO_IDS = torch.empty(0, dtype=torch.int64)
# the hybrid's chunks: larger (its per-chunk cost is higher: measured 80 s at 1 << 22 against 28-30 s at
# 1 << 24 on 2048 rows of 32000 + 50000 logits, 2 threads; peak extra 0.37 GB against 0.78 GB)
HYBRID_CHUNK_ELEMENTS = 1 << 24


# A constant of the installation: evaluated once when torch.compile traces (no graph break), as dispatch's _resolve.
@torch.compiler.assume_constant_result
def _uld_kernel_built() -> bool:
    return _ops.has_kernel("uld_fwd", "CPU")


def _resolve(backend, student, teacher, kernel_case: bool = False) -> str:
    """"reference" (sort, autograd), "cpu" (``fastkd::uld_fwd``: exact ULD on CPU tensors) or
    "batched" (this module's PyTorch path, any device). ``kernel_case``: the call is one the op computes."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    f64 = torch.float64 in (student.dtype, teacher.dtype)
    if backend == "reference" or (backend == "auto" and f64):
        return "reference"
    reason = None if kernel_case else "it computes exact ULD (k=None) only"
    if student.device.type != "cpu":
        reason = f"it runs on CPU tensors, got {student.device}"
    elif not _uld_kernel_built():
        reason = _ops.LOAD_ERROR or "this build of fastkd._C has no fastkd::uld_fwd"
    if backend == "auto":
        return "batched" if reason else "cpu"
    if backend == "cpu" and not f64 and reason is None:
        return "cpu"
    if backend == "cpu":
        raise ValueError(f"backend 'cpu' cannot run this ULD call: {reason or 'it computes in float32'}; "
                         "backend='auto' picks the batched PyTorch path, 'reference' the sort-based definition")
    raise ValueError(
        f"backend '{backend}' has no ULD kernel yet; backend='auto' runs the CPU kernel or fastkd's batched "
        "PyTorch path (no full sort; any device), backend='reference' the sort-based definition"
    )


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    k: Optional[int] = None,
    inputs: str = "logits",
    process_group=None,
    backend: str = "auto",
):
    """Universal Logit Distillation (Boizard et al. 2024) between vocabularies of any two sizes.

    Per row, ``q = softmax(s / temperature)`` over the student's ``V_s`` classes and
    ``p = softmax(t / teacher_temperature)`` over the teacher's ``V_t`` (``teacher_temperature``
    defaults to ``temperature``)::

        uld = sum_i |sort(q)_i - sort(p)_i|     (descending; the shorter padded with zeros)

    No token correspondence is needed: ``s [..., V_s]`` and ``t [..., V_t]`` share only the leading
    shape (one teacher row per student row: ``fastkd.align_tokens`` pairs positions first). No
    ``T^2`` factor. Gradients reach the student and, when it requires grad, the teacher: through the
    sort permutation, ``d uld / d q_c = sign(q_c - p_(rank of c))``, then the softmax.

    ``k=None`` (default): exact. ``k=K``: the K largest of each side exactly, the rest by their
    masses ``A``, ``B``: ``sum_{i <= K} |a_i - b_i| + |A - B|``, a lower bound of the exact value,
    which lies within ``2 min(A, B)`` above it; ``return_parts=True`` returns
    ``ULDParts(loss, soft, hard, bound)`` with that bound (reduced like ``soft``; 0 with ``k=None``).

    Rows, ``reduction`` (``"mean"`` divides by counted rows * ``max(V_s, V_t)``), ``target`` /
    ``ignore_index`` / ``sample_weight`` (skipped rows never read) and ``ce_weight`` (the student's
    cross-entropy at T = 1, same reduction): as ``fastkd.jsd_loss``.

    Differs from TRL's ``GOLDTrainer`` ``ULDLoss``: TRL divides each sequence's sum by its length
    and averages the sequences (equal to ``"batchmean"`` here when all sequences have the same
    number of counted rows); TRL takes its ``uld_crossentropy_weight`` term on the student's own
    shifted labels. TRL sorts both vocabularies per position (and loops per sequence); here no full
    sort runs (``fastkd.losses.cross_tokenizer``'s docstring states the passes).

    ``inputs="log_probs"``: the rows are log-probabilities taken as given, not renormalised (e.g. the
    merged distributions of ``fastkd.merge_aligned``; values above 0 are read as 0, the temperatures
    must be 1: apply them before merging); ``q = exp(s)``, ``p = exp(t)``.

    ``process_group`` (``torch.distributed``): vocabulary parallel. The last dim of each side is this
    rank's contiguous, equally wide slice of its vocabulary (the student's and the teacher's widths may
    differ); ``target`` holds global ids. The loss is that of the whole rows, on every rank; each rank gets
    its columns' gradients. It runs the batched path's bucket algorithm with the count and sum tables
    summed over the group (a SUM all-reduce of ``[rows, 2048]`` float64 tables per chunk and side, and of
    each refinement level's tables), plus per row the group's softmax (MAX and SUM), ``sum q g`` and the
    CE's log-sum-exp and target logit: no sort (a sort would need the whole rows). ``k`` must be None;
    ``backend="auto"``. On GPU tensors it reads the refinement's sizes on the host (``nonzero``): one
    synchronisation per level. ``hybrid_uld_loss`` and ``MappedTeacher`` take no group (the token map
    crosses the shards).

    ``backend``: ``"auto"`` runs the CPU kernel ``fastkd::uld_fwd`` (``csrc/cpu/uld.cpp``: CPU tensors,
    ``k=None``, logits or log-probs) or else the batched PyTorch path (float64 inputs: the reference);
    ``"cpu"`` the kernel only; ``"reference"`` the sort-based definition (autograd through
    ``torch.sort``). No CUDA or Triton kernel yet: GPU tensors run the batched path's sync-free branch (a
    sort of each chunk row; no host read in the step).
    """
    if process_group is not None:
        return _uld_sharded(student_logits, teacher_logits, temperature, teacher_temperature, reduction, target,
                            ignore_index, sample_weight, ce_weight, return_parts, k, inputs, process_group, backend)
    check_uld_args(student_logits, teacher_logits, temperature, teacher_temperature, reduction, target, ignore_index,
                   sample_weight, ce_weight, return_parts, k, inputs)
    name = _resolve(backend, student_logits, teacher_logits, k is None)
    if name == "reference":
        return R.compute_uld(student_logits, teacher_logits, temperature, teacher_temperature, reduction, target,
                             ignore_index, sample_weight, ce_weight, return_parts, k, inputs)
    check_constant_weight(sample_weight, "auto")
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    weight = row_weights(student_logits, target, ignore_index, sample_weight, reduction)
    if reduction == "mean":  # divided by counted rows * V_s; ULD's width is max(V_s, V_t)
        weight = weight * (s.shape[1] / max(s.shape[1], t.shape[1]))
    tgt = target.reshape(-1).to(torch.int64) if target is not None else None
    t_temp = temperature if teacher_temperature is None else teacher_temperature
    if name == "cpu":
        wants_ce = tgt is not None and (ce_weight != 0 or return_parts)
        s, t = row_view(student_logits), row_view(teacher_logits)
        loss, soft, hard, _, _ = torch.ops.fastkd.uld_fwd(
            s, t, tgt.contiguous() if wants_ce else _NO_IDS, weight, float(temperature), float(t_temp),
            float(ce_weight), reduction != "none", wants_grad(s), wants_grad(t), inputs == "log_probs")
        outs = [loss, soft.detach(), hard.detach(), torch.zeros_like(soft)]
        if reduction == "none":
            outs = [o.reshape(lead) for o in outs]
        return ULDParts(*outs) if return_parts else outs[0]
    options = (float(temperature), float(t_temp), float(ce_weight), reduction != "none", return_parts,
               inputs == "log_probs")
    outs = RowsFunction.apply(s, t, weight, tgt, options, uld_op(k))
    if reduction == "none":
        outs = tuple(o.reshape(lead) for o in outs)
    return ULDParts(*outs) if return_parts else outs[0]


def _uld_sharded(student, teacher, temperature, teacher_temperature, reduction, target, ignore_index, sample_weight,
                 ce_weight, return_parts, k, inputs, process_group, backend):
    """``uld_loss(process_group=)``: vocabulary-parallel rows (the batched path with the group's sums)."""
    from ..distributed.comm import check_group_shapes, group_geometry
    from ..distributed.rows import check_global_ids, poison

    # the target holds global ids (checked below against the group's vocabulary), and with it the CE term
    check_uld_args(student, teacher, temperature, teacher_temperature, reduction, None, ignore_index,
                   sample_weight, 0.0, False, k, inputs)
    if backend not in ("auto",):
        checks.check_backend(backend)
        raise ValueError(f"backend '{backend}' cannot be chosen with process_group: the vocabulary-parallel ULD "
                         "runs the batched PyTorch path with the group's sums; pass backend='auto'")
    if k is not None:
        raise ValueError("k must be None with process_group (the top-k of a row would need its whole vocabulary)")
    rank, world, width = group_geometry(student, process_group)
    t_width = teacher.shape[-1]
    vs, vt = world * width, world * t_width
    lead = student.shape[:-1]
    n = math.prod(lead)
    checks.check_target(target, torch.zeros((), device=student.device).expand(*lead, vs), ignore_index,
                        required=False)
    checks.check_ce(ce_weight, return_parts, target)
    check_constant_weight(sample_weight, "distributed")
    s, t = student.reshape(n, width), teacher.reshape(n, t_width)
    need = (wants_grad(student), wants_grad(teacher))
    # equally wide shards of both sides on every rank, the same rows, dtypes and wanted gradients
    equal = check_group_shapes(n, width, process_group, student.device, (student.dtype, teacher.dtype), need) & \
        check_group_shapes(n, t_width, process_group, student.device)
    rows = torch.zeros((), device=student.device).expand(n, vs)  # shape only: "mean" divides by rows * V_s
    weight = poison(row_weights(rows, target, ignore_index, sample_weight, reduction), equal)
    if reduction == "mean":  # ULD's width is max(V_s, V_t)
        weight = weight * (vs / max(vs, vt))
    tgt = None
    if target is not None:
        tgt = target.reshape(n).to(torch.int64)
        check_global_ids("target", tgt, weight != 0, vs, 0)
    t_temp = temperature if teacher_temperature is None else teacher_temperature
    options = (float(temperature), float(t_temp), float(ce_weight), reduction != "none", return_parts,
               inputs == "log_probs")
    shards = Shards(process_group, rank * width)
    outs = RowsFunction.apply(s, t, weight, tgt, options, uld_op(None, shards), shards)
    if reduction == "none":
        outs = tuple(o.reshape(lead) for o in outs)
    return ULDParts(*outs) if return_parts else outs[0]


def _hybrid_op(vm, beta: float, w_m: float, w_u: float):
    """The hybrid's chunk op of ``_rows`` (``vm`` on the rows' device): ``((soft, matched, unmatched), dL/dq, dL/dp)``.

    Matched (``fastkd.core.divergence.divergence_coefficients("jsd", beta) = (a, b, w_p, w_q)``, ``P`` the
    teacher's mass on each matched student id, ``m = w_p P + w_q q``): ``a sum P log(P / m) + b sum q log(q / m)``,
    ``dL/dq = b (log(q / m) + 1) - w_q (a P + b q) / m`` and ``dL/dP = a (log(P / m) + 1) - w_p (a P + b q) / m``
    (a ``0 log 0`` term is 0 and has derivative 0, as the reference's ``kl_terms``), every matched teacher token
    taking its student id's ``dL/dP``; unmatched: ``sorted_l1``'s sign rows. Temporaries: the chunk's."""
    a, b, w_p, w_q = divergence_coefficients("jsd", beta=beta)
    rest_s, rest_t = vm.unmatched_student, vm.unmatched_teacher
    has_rest = rest_s.numel() > 0 and rest_t.numel() > 0  # GOLD: no unmatched term when either side has none
    every_s = vm.student_ids.numel() == vm.student_vocab_size  # every column matched: no gather, no scatter
    every_t = vm.matched_teacher.numel() == vm.teacher_vocab_size

    def xlog(x, log_m, coef):  # (coef sum x log(x / m), coef (log(x / m) + 1)), 0 where x == 0
        log_ratio = torch.where(x == 0, 0.0, x.log() - log_m)
        return coef * (x * log_ratio).sum(1, dtype=torch.float64), torch.where(x == 0, 0.0, coef * (log_ratio + 1))

    def op(q, p, want_q, want_p):
        p_m = p if every_t else p.index_select(1, vm.matched_teacher)
        big_p = q.new_zeros(q.shape[0], vm.student_ids.numel()).index_add_(1, vm.bucket, p_m)
        q_m = q if every_s else q.index_select(1, vm.student_ids)
        mix = w_p * big_p + w_q * q_m
        log_m, pull = mix.log(), a * big_p + b * q_m
        ratio = torch.where(pull == 0, 0.0, pull / mix)
        matched = torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
        g_qm, g_pm = -w_q * ratio, -w_p * ratio
        if a != 0:  # skipped rather than multiplied by 0 (an inf term times 0 would be NaN)
            value, d = xlog(big_p, log_m, a)
            matched, g_pm = matched + value, g_pm + d
        if b != 0:
            value, d = xlog(q_m, log_m, b)
            matched, g_qm = matched + value, g_qm + d
        g_q = g_qm.mul_(w_m) if every_s else torch.zeros_like(q).index_copy_(1, vm.student_ids, g_qm.mul_(w_m))
        g_p = None
        if want_p:
            g_pm = g_pm.mul_(w_m).index_select(1, vm.bucket)
            g_p = g_pm if every_t else torch.zeros_like(p).index_copy_(1, vm.matched_teacher, g_pm)
        unmatched = torch.zeros_like(matched)
        if has_rest:
            unmatched, g_qr, g_pr = sorted_l1(q[:, rest_s], p[:, rest_t], want_q, want_p)
            g_q[:, rest_s] = w_u * g_qr
            if want_p:
                g_p[:, rest_t] = w_u * g_pr
        return (w_m * matched + w_u * unmatched, matched, unmatched), g_q, g_p

    op.values, op.chunk = 3, HYBRID_CHUNK_ELEMENTS
    return op


def hybrid_uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    vocab_map,
    *,
    beta: float = 0.5,
    matched_weight: Optional[float] = None,
    unmatched_weight: Optional[float] = None,
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    reduction: str = "batchmean",
    target: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    sample_weight: Optional[torch.Tensor] = None,
    ce_weight: float = 0.0,
    return_parts: bool = False,
    inputs: str = "logits",
    backend: str = "auto",
):
    """GOLD's hybrid ULD (TRL ``GOLDTrainer`` with ``uld_use_hybrid_loss``): tokens the two vocabularies
    share compared directly, the rest by ULD.

    Per row, ``q = softmax(s / temperature)``, ``p = softmax(t / teacher_temperature)``; with the
    ``fastkd.VocabMap``'s distinct matched student ids ``j`` and ``P_j = sum_{map(c) = j} p_c``::

        matched   = sum_j beta P_j log(P_j / M_j) + (1 - beta) q_j log(q_j / M_j),  M = beta P + (1 - beta) q
        unmatched = uld(q on the student ids no teacher token maps to, p on the unmatched teacher ids)
        loss      = w_m matched + w_u unmatched

    (the generalised JSD's terms on the masses as they are: not renormalised, no tail, as GOLD;
    ``beta = 0`` / ``1``: the forward / reverse KL terms). ``w_m = vocab_map.matched_fraction`` (matched
    teacher tokens / ``V_t``) and ``w_u = 1 - w_m`` (GOLD's adaptive weighting), or the fixed
    ``matched_weight`` and ``unmatched_weight``. ``return_parts=True``: ``HybridParts(loss, soft, hard,
    matched, unmatched)``. Rows, reductions, ``ce_weight``, ``inputs``: as ``fastkd.uld_loss``.

    Equal to GOLD's where the definitions overlap (a one-to-one map; TRL's ``log(clamp(x, 1e-8))``
    only matters for probabilities below 1e-8, which it raises to 1e-8; TRL's per-sequence mean as
    ``uld_loss`` says). A many-to-one map sums the teacher's tokens onto their student token (GOLD's
    string match is one-to-one). ``backend="auto"``: row chunks in PyTorch (any device), both gradients
    computed in the forward pass (``dL/dq`` of the matched terms in closed form, the unmatched ULD's sign
    rows from ``sorted_l1_batched``: no sort), no ``[N, V]`` tensor but the gradients, no autograd graph;
    usable once, as ``uld_loss``. Float64 inputs and ``"reference"``: the sort-based definition by autograd.
    """
    check_hybrid_args(student_logits, teacher_logits, vocab_map, beta, matched_weight, unmatched_weight)
    check_uld_args(student_logits, teacher_logits, temperature, teacher_temperature, reduction, target, ignore_index,
                   sample_weight, ce_weight, return_parts, None, inputs)
    name = _resolve(backend, student_logits, teacher_logits)
    if name == "reference":
        return R.compute_hybrid(student_logits, teacher_logits, vocab_map, beta, matched_weight, unmatched_weight,
                                temperature, teacher_temperature, reduction, target, ignore_index, sample_weight,
                                ce_weight, return_parts, inputs)
    check_constant_weight(sample_weight, "auto")
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    weight = row_weights(student_logits, target, ignore_index, sample_weight, reduction)
    if reduction == "mean":  # divided by counted rows * V_s; the width is max(V_s, V_t)
        weight = weight * (s.shape[1] / max(s.shape[1], t.shape[1]))
    tgt = target.reshape(-1).to(torch.int64) if target is not None else None
    t_temp = temperature if teacher_temperature is None else teacher_temperature
    vm = vocab_map.to(s.device) if vocab_map.teacher_to_student.device != s.device else vocab_map
    op = _hybrid_op(vm, float(beta), *R.hybrid_weights(vm, matched_weight, unmatched_weight))
    options = (float(temperature), float(t_temp), float(ce_weight), reduction != "none", return_parts,
               inputs == "log_probs")
    outs = RowsFunction.apply(s, t, weight, tgt, options, op)
    if reduction == "none":
        outs = tuple(o.reshape(lead) for o in outs)
    return HybridParts(*outs) if return_parts else outs[0]
