"""Fused linear distillation: the language-model head and the loss in one op (issue 11).

::

    loss = fastkd.fused_linear_kd_loss(student_hidden, lm_head.weight, (teacher_hidden, teacher_head.weight),
                                       target, divergence="kl", temperature=2.0, ce_weight=0.5)

The value and gradients are those of the unfused composition::

    s = softcap(logit_scale * (student_hidden @ student_weight.T + student_bias))   # float32
    t = softcap(logit_scale * (teacher_hidden @ teacher_weight.T + teacher_bias))   # float32
    s = pad(s, V_t - V columns of -inf)                                             # V_t >= V
    loss_fn(s, t, target, ...)                                                       # fastkd's divergences

but the ``[N, V]`` logits never exist: the rows are processed in chunks. Per
chunk, the student (and teacher) logits are computed in float32 from
float32-accumulated matmuls (never rounded to bf16 before the softmax), the row
op ``divergence_fwd`` of the chosen backend (``docs/design.md``) returns the
chunk's loss and its gradient w.r.t. the logits, and that gradient goes straight
into ``grad_hidden[chunk] = g @ W`` and ``grad_weight += g^T @ h``. The chunk's
logits and gradient are freed before the next chunk. The row weights (reduction,
``ignore_index``, ``sample_weight``) are those of the whole batch, so the
reduction is global, whatever the chunking.

Gradients are computed in the forward pass and stored (``student_hidden``,
``student_weight``, ``student_bias``); backward only scales them in place by the
incoming gradient (``fastkd.core.autograd.scale_stored_grad``), as the other fused
losses do. With ``reduction="none"`` the per-row incoming gradient cannot be
applied to a stored ``grad_weight`` (a sum over rows), so the forward computes the
losses only and backward runs the chunks again with the row weights multiplied
by the incoming gradient (twice the matmuls).

The teacher is a constant by default: teacher tensors that require grad raise a
``ValueError`` saying to detach them. ``teacher_grad=True`` makes it learn (mutual
learning, co-training): the row op's teacher-logit gradient goes through the
teacher's matmuls in the same chunk loop (``fused_linear_teachers.py`` has the
teacher's forms: pair, shared head, dense logits, top-k, ``TeacherMixture``).
"""
import math
from types import SimpleNamespace
from typing import Optional, Tuple, Union

import torch

from ..core import checks as v
from ..core.autograd import scale_stored_grad
from ..core.checks import FUSED_LINEAR_DIVERGENCES
from ..core.divergence import (KIND_CODES, TOPK_MODE_CODES, LossParts, check_akl_teacher, check_divergence_params,
                               divergence_params, fused_op_args)
from ..core.rows import read_rows, row_weights
from ..core.topk import TopKTeacher
from ..dispatch.backend import implementation, resolve, unavailable_reason
from ..reference import divergence as R
from .fused_linear_chunks import default_chunk_size, run_chunks
from .fused_linear_teachers import mapped_rows, mixture_vocab, teacher_parts, teacher_scale_of

__all__ = ["fused_linear_kd_loss", "DIVERGENCES", "default_chunk_size"]

DIVERGENCES = FUSED_LINEAR_DIVERGENCES
FUSED_OP = "divergence_fwd"

Teacher = Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor, TopKTeacher]

def _probe(like: torch.Tensor, shape) -> torch.Tensor:
    """A tensor of ``shape`` on ``like``'s device with no memory behind it (stride 0), for the shape checks."""
    return like.new_empty(()).expand(*shape)


# ----------------------------------------------------------------------------
# the op: fastkd::fused_linear_fwd (a custom op, so torch.compile(fullgraph=True) traces the call)
# ----------------------------------------------------------------------------

_OP = "fastkd::fused_linear_fwd"
_REDUCE, _NEEDS = 26, slice(29, 32)  # positions of ``reduce`` and the three gradient flags in the op's inputs


def _plan(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_values, topk_ids, target,
          op, chunk, pad, logit_scale, softcap, mm_dtype, temperature, teacher_scale, kind, a, b, w_p, w_q,
          soft_scale, ce_weight, topk_mode, mask_skipped, needs, group=None, teacher_needs=(False,) * 4,
          teacher_grad=False, mixture=None, mapped=None) -> SimpleNamespace:
    """What one pass over the chunks needs (``fused_linear_chunks.run_chunks``)."""
    teacher_kind = "mixture" if mixture is not None else "mapped" if mapped is not None else \
        "pair" if teacher_weight is not None else "topk" if topk_ids is not None else "logits"
    return SimpleNamespace(
        hidden=hidden, weight=weight, bias=bias, n=hidden.shape[0], vocab=weight.shape[0], chunk=chunk, pad=pad,
        compute_dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32,
        logit_scale=logit_scale, softcap=softcap, mm_dtype=mm_dtype, mask_skipped=mask_skipped,
        teacher_kind=teacher_kind, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
        teacher_bias=teacher_bias, teacher_logits=teacher_values if teacher_kind == "logits" else None,
        topk_ids=topk_ids, topk_logprobs=teacher_values if teacher_kind == "topk" else None,
        lead=(mixture.members[0][1] if teacher_kind == "mixture" else mapped_rows(mapped) if teacher_kind == "mapped"
              else teacher_hidden if teacher_kind == "pair" else teacher_values).shape[:-1],
        target=target, op=op, temperature=temperature, teacher_scale=teacher_scale,
        teacher_temperature=temperature / teacher_scale, kind=kind, a=a, b=b, w_p=w_p, w_q=w_q,
        soft_scale=soft_scale, ce_weight=ce_weight, topk_mode=topk_mode, needs=needs, group=group,
        teacher_needs=teacher_needs, teacher_grad=teacher_grad, mixture=mixture, mapped=mapped,
        mixture_vocab=mixture_vocab(mixture) if mixture is not None else 0,
    )


@torch.library.custom_op(_OP, mutates_args=())
def _fused_linear_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], teacher_hidden: Optional[torch.Tensor],
    teacher_weight: Optional[torch.Tensor], teacher_bias: Optional[torch.Tensor],
    teacher_values: Optional[torch.Tensor], topk_ids: Optional[torch.Tensor], target: Optional[torch.Tensor],
    row_weight: torch.Tensor, backend: str, chunk: int, pad: int, logit_scale: Optional[float],
    softcap: Optional[float], mm_dtype: Optional[torch.dtype], temperature: float, teacher_scale: float, kind: int,
    a: float, b: float, w_p: float, w_q: float, soft_scale: float, ce_weight: float, topk_mode: int, reduce: bool,
    mask_skipped: bool, plain_kd: bool, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, soft, hard and the stored gradients of hidden, weight and bias (empty when not wanted).

    ``hidden [N, H]`` and ``weight [V, H]`` (``bias [V]``) of the student; the teacher is a
    ``(teacher_hidden [..., H_t], teacher_weight [V_t, H_t])`` pair, dense logits or top-k
    log-probs ``[..., K]`` (``teacher_values``) with ``topk_ids``; ``row_weight [N]`` carries the
    reduction; ``teacher_scale = temperature / teacher_temperature`` multiplies the teacher's logits.
    ``backend`` names the fused backend whose ``divergence_fwd`` runs each chunk's loss
    (the reference's row op computes its gradient by autograd, which does not run inside a custom
    op: ``_FusedLinearFunction`` runs that one).
    """
    op = _row_op(backend, hidden, plain_kd, kind)
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    plan = _plan(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_values, topk_ids,
                 target, op, chunk, pad, logit_scale, softcap, mm_dtype, temperature, teacher_scale, kind, a, b,
                 w_p, w_q, soft_scale, ce_weight, topk_mode, mask_skipped, needs)
    loss, soft, hard, gh, gw, gb = run_chunks(plan, row_weight, any(needs), reduce)[:6]
    # (a fresh empty tensor per absent gradient: a custom op's outputs may not alias each other)
    return loss, soft, hard, *(hidden.new_empty((0,)) if g is None else g for g in (gh, gw, gb))


@_fused_linear_fwd.register_fake
def _(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_values, topk_ids, target,
      row_weight, backend, chunk, pad, logit_scale, softcap, mm_dtype, temperature, teacher_scale, kind, a, b, w_p,
      w_q, soft_scale, ce_weight, topk_mode, reduce, mask_skipped, plain_kd, need_hidden, need_weight, need_bias):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = hidden.new_empty(() if reduce else (hidden.shape[0],), dtype=acc)
    return (loss, torch.empty_like(loss), torch.empty_like(loss),
            torch.empty_like(hidden) if need_hidden else hidden.new_empty((0,)),
            torch.empty_like(weight) if need_weight else hidden.new_empty((0,)),
            torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.used = False
    ctx.reduce = inputs[_REDUCE]
    ctx.needs = tuple(inputs[_NEEDS])
    ctx.num_inputs = len(inputs)
    if ctx.reduce:  # the gradients are stored: backward scales them
        ctx.save_for_backward(*(g.detach() for g in output[3:]))
    else:  # reduction="none": backward runs the chunks again with row weights times the incoming gradient
        ctx.save_for_backward(*(x for x in inputs if isinstance(x, torch.Tensor)))
        ctx.tensor_positions = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        ctx.inputs = [None if isinstance(x, torch.Tensor) else x for x in inputs]


def _scale(stored: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``scale_stored_grad`` (in place, float32 scale), but float64 gradients get a float64 scale."""
    if stored.dtype == torch.float64:
        return stored.mul_(grad_loss.to(torch.float64))
    return scale_stored_grad(stored, grad_loss)


def _backward_once(ctx) -> None:
    """The stored gradients are scaled in place: one backward, first derivatives only."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "fastkd: double backward (create_graph=True) is not supported by fused_linear_kd_loss: it "
            "stores only the first derivative"
        )
    if ctx.used:
        raise RuntimeError(
            "fastkd: backward ran twice through the same fused_linear_kd_loss (retain_graph=True?). The "
            "stored gradients are scaled in place, so they can be used once; compute the loss again"
        )
    ctx.used = True


def _backward(ctx, grad_loss, *_unused):  # soft, hard and the stored gradients get none
    _backward_once(ctx)
    grads = [None] * ctx.num_inputs
    if grad_loss is None:
        return tuple(grads)
    if ctx.reduce:
        stored = ctx.saved_tensors
    else:
        inputs = list(ctx.inputs)
        for pos, x in zip(ctx.tensor_positions, ctx.saved_tensors):
            inputs[pos] = x
        row_weight = inputs[9]
        # the gradient is linear in the row weights: scale them by the incoming per-row gradient
        inputs[9] = row_weight * grad_loss.reshape(-1).to(row_weight.dtype)
        inputs[_REDUCE] = True
        stored = torch.ops.fastkd.fused_linear_fwd(*inputs)[3:]
    for i, (want, g) in enumerate(zip(ctx.needs, stored)):  # inputs 0, 1, 2: hidden, weight, bias
        if want:
            grads[i] = _scale(g, grad_loss) if ctx.reduce else g
    return tuple(grads)


_fused_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _FusedLinearFunction(torch.autograd.Function):
    """The chunk loop behind a plain ``autograd.Function``, for what the custom op does not take: the
    reference's row op (autograd inside: float64, ``backend="reference"``), ``fastkd.distributed``'s (a process
    group is not an op argument), a teacher that gets gradients (``teacher_grad=True``) and a
    ``TeacherMixture``. ``torch.compile`` does not trace it (a graph break)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits, plan,
                row_weight):
        plan.hidden, plan.weight, plan.bias = hidden, weight, bias
        if plan.shared:  # the student's head is the teacher's
            plan.teacher_weight, plan.teacher_bias = weight, bias
        ctx.reduce = plan.reduction != "none"
        ctx.used = False
        want_grad = any(plan.needs) or any(plan.teacher_needs)
        if ctx.reduce:
            loss, soft, hard, *grads = run_chunks(plan, row_weight, want_grad, True)
            ctx.stored = grads
        else:
            loss, soft, hard, *_ = run_chunks(plan, row_weight, False, False)
            ctx.plan, ctx.row_weight = plan, row_weight
        entropy = plan.entropy if plan.entropy is not None else loss.new_zeros(())
        ctx.mark_non_differentiable(soft, hard, entropy)
        ctx.set_materialize_grads(False)
        return loss, soft, hard, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_soft, _grad_hard, _grad_entropy):
        _backward_once(ctx)
        if grad_loss is None:
            if ctx.reduce:
                return (None,) * 9
            # reduction="none": the rerun's collectives must run on every rank, so run it with 0
            grad_loss = torch.zeros(ctx.row_weight.shape, dtype=ctx.row_weight.dtype, device=ctx.row_weight.device)
        if ctx.reduce:
            grads = [None if g is None else _scale(g, grad_loss) for g in ctx.stored]
            ctx.stored = None
        else:
            weight = ctx.row_weight * grad_loss.reshape(-1).to(ctx.row_weight.dtype)
            grads = list(run_chunks(ctx.plan, weight, True, True)[3:])
            ctx.plan = None
        return (*grads, None, None)


# ----------------------------------------------------------------------------
# the public functional and module
# ----------------------------------------------------------------------------

def _kd_row_op(kd_fwd):
    """``kd_fwd`` behind ``divergence_fwd``'s signature, for forward KL alone (``T^2 KL``, no CE, no top-k)."""

    def op(student, teacher, topk_ids, target, row_weight, temperature, kind, a, b, w_p, w_q, soft_scale,
           ce_weight, topk_mode, reduce, grad_student, grad_teacher):
        temp = torch.full((student.shape[0],), temperature, dtype=torch.float32, device=student.device)
        loss, grad_s, grad_t, _ = kd_fwd(student, teacher, temp, row_weight, reduce, grad_student, grad_teacher,
                                         False)
        return loss, loss, torch.zeros_like(loss), grad_s, grad_t

    return op


def _row_backend(backend: str, hidden: torch.Tensor, weight: torch.Tensor, plain_kd: bool, kind: int = 0) -> str:
    """The backend whose row op runs each chunk: "reference" or a fused backend's name (AKL: its own op, ``akl_fwd``).

    ``plain_kd``: the loss is forward KL with ``T^2`` alone on float32 dense chunks without padding
    (``divergence="kl"``, no ``ce_weight``, no parts, no top-k, ``V_t == V``): exactly ``kd_fwd``'s row
    loss, so a fused backend that has ``kd_fwd`` but not yet ``divergence_fwd`` runs it (``_row_op``)."""
    v.check_backend(backend)
    akl = kind == KIND_CODES["akl"]
    return resolve("kd" if plain_kd else "fused_linear_akl" if akl else "fused_linear_kd", backend, hidden, weight)


def _row_op(name: str, hidden: torch.Tensor, plain_kd: bool, kind: int = 0):
    """The ``divergence_fwd`` of backend ``name`` (``_row_backend``'s answer); AKL's ``akl_fwd`` (same signature)."""
    if name == "reference":
        return R.akl_fwd if kind == KIND_CODES["akl"] else R.divergence_fwd
    if plain_kd and unavailable_reason(name, "fused_linear_kd", hidden.device) is not None:
        return _kd_row_op(implementation(name).kd_fwd)
    return getattr(implementation(name), "akl_fwd" if kind == KIND_CODES["akl"] else FUSED_OP)


# About 150 lines, most of them argument checks (every message names its argument) in the order a reader
# meets the arguments; the work is the op's (fastkd::fused_linear_fwd) or _FusedLinearFunction's.
def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: Teacher,
    target: Optional[torch.Tensor] = None,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    teacher_grad: bool = False,
    beta: Optional[float] = None,  # jsd (None: 0.5), ab_divergence (None: 0.7)
    skew: float = 0.1, mu: float = 0.5,  # skew_kl; akl
    alpha_min: float = 0.0, alpha_max: float = 1.0, tau: float = 0.5, scale: float = 0.1,  # entropy_gated_kl
    alpha: Optional[float] = None, order: float = 0.5, reverse: bool = False,  # the power divergences
    ce_weight: float = 0.0,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    logit_scale: Optional[float] = None,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    sample_weight: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    return_parts: bool = False,
    teacher_vocab: str = "truncate",
    backend: str = "auto",
    process_group=None,
    return_entropy: bool = False,
):
    # --- arguments (every message names the argument) ---
    v.check_matrix("student_hidden", student_hidden, 0)
    dev = student_hidden.device
    lead = tuple(student_hidden.shape[:-1])
    v.check_head("student", student_hidden, student_weight, student_bias, None, dev)
    vocab = student_weight.shape[0]
    v.check_fused_linear_options(divergence, temperature, beta, skew, ce_weight, logit_scale, softcap, reduction)
    gate = divergence_params(divergence, alpha_min=alpha_min, alpha_max=alpha_max, tau=tau, scale=scale, alpha=alpha,
                             beta=beta, order=order, reverse=reverse, mu=mu)  # the gate's, AKL's or a power one's
    check_divergence_params(**gate)
    v.check_ignore_index(ignore_index)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")

    v.check_teacher_vocab(teacher_vocab)
    teacher_kind, t_vocab, teacher_hidden, teacher_weight, teacher_logits, topk, mixture, mapped = teacher_parts(
        teacher, teacher_bias, lead, dev, vocab, student_weight)
    check_akl_teacher(teacher, process_group, divergence)  # AKL: dense teachers (with a group: logits, pairs)
    shared = isinstance(teacher, (tuple, list)) and len(teacher) == 2 and teacher[1] is None  # (hidden, None)
    if shared:
        teacher_bias = student_bias
    teacher_scale = teacher_scale_of(temperature, teacher_temperature, teacher_grad, teacher_kind, process_group)
    if teacher_bias is not None and teacher_kind != "pair":
        raise ValueError("teacher_bias is used only with a (teacher_hidden, teacher_weight) teacher")
    if t_vocab < vocab:
        raise ValueError(f"the teacher's vocabulary ({t_vocab}) must be at least the student's "
                         f"(student_weight has V = {vocab} rows)")
    if t_vocab > vocab and teacher_vocab == "truncate" and process_group is None:
        # the teacher's columns past V go; its softmax is then over the first V (renormalised)
        teacher_weight = teacher_weight[:vocab] if teacher_weight is not None else None
        teacher_bias = teacher_bias[:vocab] if teacher_bias is not None else None
        teacher_logits = teacher_logits[..., :vocab] if teacher_logits is not None else None
        mixture = mixture.truncated(vocab) if mixture is not None else None
        t_vocab = vocab
    teacher_vocab = t_vocab
    sharded = process_group is not None
    if sharded:
        from .. import distributed as D  # torch.distributed is imported only by those who use it

        if backend not in ("auto", "reference"):
            v.check_backend(backend)
            raise ValueError(f"backend '{backend}' cannot be chosen with process_group: each chunk's loss runs "
                             "on fastkd.distributed's shard kernels (chosen by device); pass backend='auto' "
                             "(or 'reference')")
        if teacher_vocab != vocab:
            raise ValueError(f"with process_group the teacher's vocabulary shard ({teacher_vocab} columns) must be "
                             f"as wide as student_weight's ({vocab} rows): pad both vocabularies to the same "
                             "multiple of the group size")
        rank, world, _ = D.comm.group_geometry(_probe(student_hidden, lead + (vocab,)), process_group)
    global_vocab = world * vocab if sharded else vocab  # target and top-k ids are global ids
    constants = [("teacher.logprobs", topk.logprobs if topk is not None else None), ("sample_weight", sample_weight)]
    if not teacher_grad:  # with teacher_grad=True the teacher's tensors get their gradients
        constants += [("teacher_hidden", teacher_hidden), ("teacher", teacher_logits)]
        constants += [] if shared else [("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)]
    if mixture is not None:
        constants += [(f"teachers[{i}]", x) for i, m in enumerate(mixture.members) for x in m[1:]]
    if mapped is not None:
        constants += [("MappedTeacher", x) for x in (mapped.teacher if isinstance(mapped.teacher, (tuple, list))
                                                     else (mapped.teacher,))]
    for name, x in constants:
        v.check_teacher_constant(name, x)

    # Shape-only stand-ins for the logits (no memory): the student's [..., V] for target and top-k ids,
    # the composition's padded [..., V_t] for the row weights ("mean" divides by counted rows * V_t).
    student_probe = _probe(student_hidden, lead + (global_vocab,))
    v.check_target(target, student_probe, ignore_index, required=False)
    v.check_sample_weight(sample_weight, student_probe)
    if sample_weight is not None:
        v.check_same_device("sample_weight", sample_weight, dev)
    v.check_ce(ce_weight, return_parts, target)
    if topk is not None:
        read = read_rows(student_probe, target, ignore_index, sample_weight) \
            if v.reads_values(topk.indices) else None
        topk.check_against(student_probe, read)

    f64 = any(x is not None and x.dtype == torch.float64
              for x in (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_logits))
    if f64 and backend not in ("auto", "reference"):
        raise ValueError(f"backend '{backend}' computes in float32 and does not take float64 inputs; use "
                         "backend='reference' (or 'auto') for float64")
    pass_target = target is not None and (ce_weight != 0 or return_parts)
    plain_kd = (divergence == "kl" and ce_weight == 0 and not pass_target and topk is None and mapped is None
                and teacher_vocab == vocab and (teacher_logits is None or teacher_logits.dtype == torch.float32))
    n = math.prod(lead)
    # Grad mode decides, as for any torch op: under no_grad / inference_mode only the forward matmuls run.
    needs = tuple(torch.is_grad_enabled() and x is not None and x.requires_grad
                  for x in (student_hidden, student_weight, student_bias))
    # the teacher's hidden, weight, bias, logits (a shared head's weight and bias gradients are the student's)
    teacher_needs = tuple(teacher_grad and torch.is_grad_enabled() and x is not None and x.requires_grad
                          for x in (teacher_hidden, None if shared else teacher_weight,
                                    None if shared else teacher_bias, teacher_logits))
    # Autocast: the matmul inputs are rounded to the autocast dtype, as the unfused lm_head's would be;
    # the logits, the loss and the gradient sums stay float32 (docs/design.md, "Fused linear head").
    mm_dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) and not f64 else None
    row_weight = row_weights(_probe(student_hidden, lead + (global_vocab if sharded else teacher_vocab,)), target,
                             ignore_index, sample_weight, reduction, torch.float64 if f64 else torch.float32)
    if chunk_size is None:
        chunk_size = default_chunk_size(n, vocab, teacher_vocab, student_weight.shape[1],
                                        student_weight.element_size(), dev.type)
    kind, a, b, w_p, w_q, soft_scale = fused_op_args(divergence, temperature, beta, skew, gate)
    hidden = student_hidden.reshape(n, student_hidden.shape[-1])
    if not hidden.is_contiguous():
        hidden = hidden.contiguous()
    teacher_values = topk.logprobs.reshape(n, topk.k) if topk is not None else teacher_logits
    topk_ids = topk.indices.reshape(n, topk.k) if topk is not None else None
    target_rows = target.reshape(n).to(torch.int64) if pass_target else None
    pad = teacher_vocab - vocab if teacher_kind != "topk" else 0
    logit_scale = None if logit_scale is None else float(logit_scale)
    softcap = None if softcap is None else float(softcap)
    topk_mode = TOPK_MODE_CODES[topk.mode if topk is not None else mapped.topk_mode if mapped is not None else None]
    mask_skipped = target is not None or sample_weight is not None
    if sharded:
        teacher_dtype = (mixture.members[0][1] if mixture is not None else
                         teacher_values if teacher_hidden is None else teacher_hidden).dtype
        equal = D.comm.check_group_shapes(n, vocab, process_group, dev,  # before any per-row collective
                                          (student_hidden.dtype, student_weight.dtype, teacher_dtype), needs)
        op = D.fused_linear_row_op(divergence, beta, skew, topk.mode if topk is not None else None, pass_target,
                                   process_group, vocab, equal, gate=gate)
        name = None
    else:
        name = "reference" if f64 else _row_backend(backend, student_hidden, student_weight, plain_kd, kind)
        op = _row_op(name, student_hidden, plain_kd, kind)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    if return_entropy and sharded:
        raise ValueError("return_entropy=True is not supported with process_group yet")
    entropy = None
    if name in (None, "reference") or teacher_grad or mixture is not None or mapped is not None or return_entropy:
        plan = _plan(hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                     teacher_values, topk_ids, target_rows, op, chunk_size, pad, logit_scale, softcap, mm_dtype,
                     float(temperature), teacher_scale, kind, a, b, w_p, w_q, soft_scale, float(ce_weight),
                     topk_mode, mask_skipped, needs, group=process_group, teacher_needs=teacher_needs,
                     teacher_grad=teacher_grad, mixture=mixture, mapped=mapped)
        plan.reduction, plan.shared, plan.want_entropy = reduction, shared, return_entropy
        loss, soft, hard, entropy = _FusedLinearFunction.apply(
            hidden, student_weight, student_bias, teacher_hidden if teacher_needs[0] else None,
            teacher_weight if teacher_needs[1] else None, teacher_bias if teacher_needs[2] else None,
            teacher_logits if teacher_needs[3] else None, plan, row_weight)
    else:
        loss, soft, hard, *_ = torch.ops.fastkd.fused_linear_fwd(
            hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_values,
            topk_ids, target_rows, row_weight, name, chunk_size, pad, logit_scale, softcap, mm_dtype,
            float(temperature), teacher_scale, kind, a, b, w_p, w_q, soft_scale, float(ce_weight), topk_mode,
            reduction != "none", mask_skipped, plain_kd, *needs)
        soft, hard = soft.detach(), hard.detach()  # for logging: not differentiable
    if reduction == "none":
        loss, soft, hard = (x.reshape(lead) for x in (loss, soft, hard))
    out = LossParts(loss, soft, hard) if return_parts else loss
    return (out, entropy.float()) if return_entropy else out


fused_linear_kd_loss.__doc__ = """The LM head and a distillation loss in one op; the ``[N, V]`` logits never exist.

    ``student_hidden [..., H_s]`` (rows = leading dims), ``student_weight [V, H_s]``
    (``lm_head.weight``), ``teacher``: a ``(teacher_hidden [..., H_t], teacher_weight [V_t, H_t])``
    pair, teacher logits ``[..., V_t]``, or a ``fastkd.TopKTeacher`` (ids in ``[0, V)``).

    Value and gradients are those of the unfused composition (float32 logits from
    float32-accumulated matmuls, never rounded to bf16)::

        s = softcap(logit_scale * (student_hidden @ student_weight.T + student_bias)), padded to V_t with -inf
        t = softcap(logit_scale * (teacher_hidden @ teacher_weight.T + teacher_bias))
        loss = divergence(s, t, ...)

    ``divergence``: ``"kl"`` (``fastkd.kd_loss``: ``T^2 KL(p || q)``), ``"reverse_kl"``,
    ``"jsd"`` (``beta``), ``"skew_kl"`` / ``"skew_reverse_kl"`` (``skew``), ``"tvd"``, ``"jeffreys"``,
    ``"triangular"``, ``"entropy_gated_kl"`` (``alpha_min``, ``alpha_max``, ``tau``, ``scale``; its gate's
    ``log V`` is the composition's width), ``"alpha_divergence"`` (``alpha``), ``"ab_divergence"`` (``alpha``,
    ``beta``; None: 0.2, 0.7), ``"renyi"`` (``order``, ``reverse``), ``"akl"`` (``mu``; dense teachers, its own
    row op ``akl_fwd``; with ``process_group``, ``fastkd.distributed.akl``'s sharded head) (``fastkd.reverse_kl_loss``,
    ``fastkd.jeffreys_loss`` etc.: no ``T^2``). ``ce_weight`` adds
    ``ce_weight * cross_entropy(s, target)`` at T = 1; ``return_parts=True`` returns
    ``LossParts(loss, soft, hard)`` (``hard``: the row-weighted CE, 0 without ``target``).

    ``logit_scale`` multiplies and ``softcap`` applies ``softcap * tanh(x / softcap)``
    to the logits computed here (student, and a ``(hidden, weight)`` teacher) before
    the temperature; dense teacher logits and top-k log-probs are taken as given.
    ``teacher_vocab`` says what a teacher wider than the student (``V_t > V``: a head
    padded past the tokenizer, as Qwen2.5-7B's 152064 rows for 151665 tokens) means:
    ``"truncate"`` (default) drops the teacher's rows past ``V`` (its softmax then over
    the first ``V``, so every divergence compares the shared vocabulary; cheaper too);
    ``"mask"`` keeps them and gives the student ``-inf`` logits there (no mass: forward
    KL is infinite where the teacher puts mass on them, as the KL is; reverse KL ignores
    that mass; TVD counts it; ``"mean"`` divides by ``V_t``).

    ``target``, ``ignore_index``, ``sample_weight``, ``reduction`` as ``kd_loss``, over
    all rows of the batch whatever the chunking (``"mean"`` divides by counted rows *
    ``V_t``, the composition's width). Rows skipped by the loss (``ignore_index``,
    weight 0) add nothing to any gradient, even with NaN hidden states.

    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias``; by default
    teacher tensors (and ``sample_weight``) that require grad raise ``ValueError`` (detach
    them). ``float`` ``temperature`` only.

    Teachers beyond a frozen head:

    * ``teacher_temperature`` (default: ``temperature``): ``p = softmax(t / teacher_temperature)``,
      ``q = softmax(s / temperature)`` (the teacher's logits times ``temperature /
      teacher_temperature``, one multiply per chunk). Not with a ``TopKTeacher``, whose
      log-probs are taken as given.
    * ``teacher_grad=True`` (mutual learning, co-training, online distillation): a
      ``(teacher_hidden, teacher_weight)`` teacher (and ``teacher_bias``) or dense teacher
      logits may require grad and get the gradient of the loss, computed in the same chunk
      loop as the student's (the row op's teacher-logit gradient, then ``g_t @ W_t`` and
      ``g_t^T @ h_t``); the CE term reaches the student only. Not with top-k teachers or a
      ``TeacherMixture``. With ``process_group`` the teacher's weight (bias) gradient is this rank's
      slice and its hidden gradient the whole (summed over the group, as the student's).
    * A shared head, ``teacher=(teacher_hidden, None)`` (self-distillation, early exits, the
      same model on two views): the teacher's logits use ``student_weight`` and
      ``student_bias``. Frozen (default), the teacher path is a constant (as
      ``student_weight.detach()``); with ``teacher_grad=True`` the weight and bias gradients
      hold both heads' contributions, summed by one matmul over the stacked rows per chunk
      (one pass over the weight gradient), and ``teacher_hidden`` gets its gradient.
    * ``fastkd.TeacherMixture([...], weights, mode)``: several teachers (pairs or dense
      logits, one vocabulary), mixed per chunk in log space (``fastkd.core.mixture``): never an
      ``[N, V]`` tensor. With ``process_group``: members are shards, normalised over the group.
    * ``fastkd.MappedTeacher(teacher, vocab_map)`` (another tokenizer): the teacher's chunk
      (``(hidden, weight)`` or dense logits over ``V_t``; no ``logit_scale`` / ``softcap``) at
      ``teacher_temperature``, summed onto the matched student ids per chunk, then a top-k teacher
      over those ids (its ``mode``). Not with ``process_group``.

    ``return_entropy=True`` returns ``(loss or parts, entropy)``: ``entropy`` is the sum over the rows
    the loss reads of the student's ``H(softmax(s / temperature))`` (float32, no gradient; TRL's
    entropy metric), from each chunk's logits (no extra matmul). Not with ``process_group``.

    ``teacher_grad=True``, ``TeacherMixture``, ``MappedTeacher`` and ``return_entropy`` run the chunk
    loop behind a plain ``autograd.Function`` (a graph break under ``torch.compile``);
    ``teacher_temperature`` and the frozen shared head run in the traced custom op. A learning
    teacher adds its own gradients to the peak memory: its float32 weight-gradient sum (cast to its
    dtype once), one more chunk block for its logit gradient, and with a shared head the stacked
    ``[2 chunk, V]`` gradient block.

    ``chunk_size``: rows per chunk (``None``: ``fastkd.losses.fused_linear.default_chunk_size``,
    the working block at most the size of the weight gradient or 256 MiB, and at least
    512 rows on CUDA / 64 on CPU). Peak extra memory: the weight gradient plus one
    chunk's float32 student, teacher and gradient blocks (``4 (V + 2 V_t)`` bytes per
    row). ``backend``: which ``divergence_fwd`` runs the loss on each chunk ("auto",
    "reference", "cpu", "cuda", "triton"); the matmuls always run in torch.

    Training conditions, as the unfused ``lm_head`` + loss would behave:

    * grad mode: under ``torch.no_grad()`` / ``torch.inference_mode()`` only the forward
      matmuls and the loss run (no gradient matmul, no ``[V, H]`` gradient), whatever
      ``requires_grad`` says;
    * autocast: inside ``torch.autocast(device, dtype)`` the matmul inputs are rounded to
      ``dtype`` (as autocast's ``F.linear`` would round them); the logits stay float32, and
      the gradients come back in the inputs' own dtypes (float32 weights: float32 sums);
    * bf16/fp16 weights: on CUDA the logits come from ``torch.mm(..., out_dtype=
      torch.float32)``; on CPU the weights are multiplied as a float32 copy held for the
      call; on every device the weight and bias gradients accumulate over the chunks in
      float32 and are cast to the weight's dtype once (a bf16 running sum would round once
      per chunk: 4.4e-3 relative error at 13 chunks where one GEMM has 1.7e-3);
    * ``torch.compile(fullgraph=True)`` traces it (the chunk loop is the custom op
      ``fastkd::fused_linear_fwd``) on the fused backends; the reference row op
      (``backend="reference"``, float64) and ``process_group`` run behind a plain
      ``autograd.Function``, which ``torch.compile`` does not trace (a graph break).

    ``process_group`` (``torch.distributed``): a vocabulary-sharded head (Megatron's
    column-parallel LM head). ``student_weight`` (and ``student_bias``, a
    ``(teacher_hidden, teacher_weight)`` teacher's weight, or dense teacher logits) hold this
    rank's contiguous rows ``[r V_local, (r + 1) V_local)`` of the vocabulary, in rank order,
    equally wide on every rank (student and teacher alike: no ``V_t > V`` padding);
    ``student_hidden``, ``target``, ``sample_weight`` and ``TopKTeacher`` inputs are the same on
    every rank (ids global). The loss is the single-process loss over the concatenated
    vocabulary, on every rank; ``grad_weight`` / ``grad_bias`` are this rank's slice of the
    single-process gradient, and ``grad_hidden`` the whole of it: the shards' parts are summed
    over the group (one ``[N, H]`` SUM all-reduce in float32, what a column-parallel linear's
    backward does). Each chunk's loss runs on ``fastkd.distributed``'s shard kernels (dense
    float32 teachers; PyTorch math for top-k teachers and float64) with O(rows) communication;
    an explicit fused ``backend`` raises. ``teacher_vocab`` does not apply (the shards are
    equally wide).
"""
