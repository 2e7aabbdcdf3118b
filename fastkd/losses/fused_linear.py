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

The teacher is a constant: no gradient reaches it, and teacher tensors that
require grad raise a ``ValueError`` saying to detach them.
"""
import math
from types import SimpleNamespace
from typing import Optional, Tuple, Union

import torch

from ..core import checks as v
from ..core.autograd import scale_stored_grad
from ..core.checks import FUSED_LINEAR_DIVERGENCES
from ..core.divergence import KIND_CODES, TOPK_MODE_CODES, LossParts, divergence_coefficients
from ..core.rows import read_rows, row_weights
from ..core.topk import TopKTeacher
from ..dispatch.backend import implementation, resolve, unavailable_reason
from ..reference import divergence as R

__all__ = ["fused_linear_kd_loss", "DIVERGENCES", "default_chunk_size"]

DIVERGENCES = FUSED_LINEAR_DIVERGENCES
FUSED_OP = "divergence_fwd"

Teacher = Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor, TopKTeacher]

# chunk_size=None: the working block of one chunk (float32 student logits padded to V_t, teacher
# logits and the logit gradient: 4 * (V + 2 V_t) bytes per row) may take as much memory as the
# weight gradient, which the fused path holds anyway, or CHUNK_BUDGET_BYTES if that is larger.
CHUNK_BUDGET_BYTES = 256 * 2**20
# ... but a chunk has at least this many rows: each chunk re-reads the weights (4 passes over
# [V, H]), and a chunk of c rows does 2c flops per weight element read. On a GPU (bf16 ridge
# point ~300 flops/byte) 512 rows keep the matmuls compute bound; a CPU's ridge is far lower.
MIN_CHUNK_ROWS = {"cuda": 512, "cpu": 64}


def default_chunk_size(n: int, vocab: int, teacher_vocab: int, hidden: int, weight_bytes: int,
                       device_type: str) -> int:
    """Rows per chunk for ``chunk_size=None``.

    ``budget = max(V * H * weight.element_size(), 256 MiB)`` (the working block is never
    larger than the weight gradient, or 256 MiB); ``rows = max(budget // (4 (V + 2 V_t)),
    MIN_CHUNK_ROWS[device])``. A batch of at most ``rows`` rows is one chunk (small batches
    then cost exactly the unfused matmuls, with no weight re-read); larger batches are split
    into ``ceil(N / rows)`` chunks of equal size (rounded up to a multiple of 8), so there is
    no small tail chunk.
    """
    if n <= 0:
        return 1
    row_bytes = 4 * (vocab + 2 * teacher_vocab)
    budget = max(vocab * hidden * weight_bytes, CHUNK_BUDGET_BYTES)
    rows = max(budget // row_bytes, MIN_CHUNK_ROWS.get(device_type, 64))
    if n <= rows:
        return n
    chunks = math.ceil(n / rows)
    return min(n, 8 * math.ceil(math.ceil(n / chunks) / 8))


def _probe(like: torch.Tensor, shape) -> torch.Tensor:
    """A tensor of ``shape`` on ``like``'s device with no memory behind it (stride 0), for the shape checks."""
    return like.new_empty(()).expand(*shape)


# ----------------------------------------------------------------------------
# the chunk loop
# ----------------------------------------------------------------------------

def _f32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in float32 (float64 stays float64), never rounded to bf16."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)  # cuBLAS: bf16/fp16 inputs, fp32 output
    return a.float() @ b.float()


def _matmul_weight(w: torch.Tensor) -> torch.Tensor:
    """The weight as the chunk matmuls take it: CPU bf16/fp16 weights as one float32 copy held for the
    call (the CPU has no bf16 x bf16 -> fp32 matmul in torch); anything else as is."""
    return w.float() if w.device.type != "cuda" and w.dtype in (torch.float16, torch.bfloat16) else w


def _rows(x: torch.Tensor, i0: int, i1: int, lead) -> torch.Tensor:
    """Rows ``i0:i1`` of ``x [..., C]`` flattened over ``lead``, without copying all of ``x`` when it
    cannot be viewed as ``[N, C]`` (such as ``logits[:, :-1]``): then only the chunk is gathered."""
    flat = x.view(-1, x.shape[-1]) if _viewable(x) else None
    if flat is not None:
        return flat[i0:i1]
    index = torch.unravel_index(torch.arange(i0, i1, device=x.device), lead)
    return x[index]


def _viewable(x: torch.Tensor) -> bool:
    try:
        x.view(-1, x.shape[-1])
        return True
    except RuntimeError:
        return False


def _head_logits(h: torch.Tensor, weight: torch.Tensor, bias, scale, softcap) -> torch.Tensor:
    """``softcap(scale * (h @ W.T + b))`` in float32 (float64 for float64 weights)."""
    s = _f32_matmul(h, weight.t())
    if bias is not None:
        s += bias
    if scale is not None:
        s *= scale
    if softcap is not None:
        s.div_(softcap).tanh_().mul_(softcap)
    return s


# About 85 lines: one chunk's matmuls, row op and gradient matmuls in the order they run (a chunk's
# temporaries are freed before the next, which helpers holding references would make harder to see).
def _run_chunks(p: SimpleNamespace, row_weight: torch.Tensor, want_grad: bool, reduce: bool):
    """One pass over the chunks: returns ``(loss, soft, hard, grad_hidden, grad_weight, grad_bias)``.

    Losses are 0-d sums (``reduce``) or ``[N]``; gradients are None unless ``want_grad``
    (then those of ``p.needs``: hidden, weight, bias).
    """
    n, vocab, dev = p.n, p.vocab, p.hidden.device
    acc = p.compute_dtype
    shape = () if reduce else (n,)
    loss = torch.zeros(shape, dtype=acc, device=dev)
    soft = torch.zeros(shape, dtype=acc, device=dev)
    hard = torch.zeros(shape, dtype=acc, device=dev)
    need_h, need_w, need_b = p.needs if want_grad else (False, False, False)
    # sharded: every rank adds its shard's part of grad_hidden; summed over the group in float32
    h_dtype = torch.float32 if p.group is not None and p.hidden.dtype in (torch.float16, torch.bfloat16) \
        else p.hidden.dtype
    grad_h = torch.empty(p.hidden.shape, dtype=h_dtype, device=dev) if need_h else None
    # CPU low-precision weights are multiplied as a float32 copy (p.weight_mm): accumulate in float32 there
    grad_w = torch.empty(p.weight.shape, dtype=p.weight_mm.dtype, device=dev) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None
    empty_ids = torch.empty(0, dtype=torch.int64, device=dev)
    for i0 in range(0, n, p.chunk):
        i1 = min(n, i0 + p.chunk)
        w_c = row_weight[i0:i1]
        h = p.hidden[i0:i1]
        if p.mask_skipped:
            # rows the loss does not read add nothing to grad_weight even if their hidden state is NaN/inf
            h = torch.where((w_c != 0).unsqueeze(1), h, torch.zeros((), dtype=h.dtype, device=dev))
        h_mm = h.to(p.weight_mm.dtype)
        s = _head_logits(h_mm, p.weight_mm, p.bias, p.logit_scale, p.softcap)
        if p.teacher_kind == "pair":
            th = _rows(p.teacher_hidden, i0, i1, p.lead).to(p.teacher_weight_mm.dtype)
            t = _head_logits(th, p.teacher_weight_mm, p.teacher_bias, p.logit_scale, p.softcap)
            del th
        elif p.teacher_kind == "logits":
            t = _rows(p.teacher_logits, i0, i1, p.lead).contiguous()
        else:
            t = p.topk_logprobs[i0:i1].contiguous()  # [chunk, K]: cheap
        # the student's missing columns (V_t > V) are -inf: no mass, never 0
        s_op = s if p.pad == 0 else torch.nn.functional.pad(s, (0, p.pad), value=float("-inf"))
        ids = p.topk_ids[i0:i1].contiguous() if p.topk_ids is not None else empty_ids
        tgt = p.target[i0:i1] if p.target is not None else empty_ids
        out = p.op(s_op, t, ids, tgt, w_c, p.temperature, p.kind, p.a, p.b, p.w_p, p.w_q, p.soft_scale,
                   p.ce_weight, p.topk_mode, reduce, want_grad, False)
        del t
        if reduce:
            loss += out[0]
            soft += out[1]
            hard += out[2]
        else:
            loss[i0:i1], soft[i0:i1], hard[i0:i1] = out[0], out[1], out[2]
        if want_grad:
            g = out[3] if p.pad == 0 else out[3][:, :vocab]
            del out, s_op
            if p.softcap is not None:
                # d softcap(x) / dx = 1 - tanh^2 = 1 - (s / softcap)^2 (s: the capped logits, reused in place)
                g = g.mul_(s.div_(p.softcap).square_().neg_().add_(1.0))
            if p.logit_scale is not None:
                g = g.mul_(p.logit_scale)
            del s
            g_mm = g.to(p.weight_mm.dtype)
            if need_h:
                grad_h[i0:i1] = _f32_matmul(g_mm, p.weight_mm) if p.group is not None else g_mm @ p.weight_mm
            if need_w:
                if i0 == 0:
                    torch.mm(g_mm.t(), h_mm, out=grad_w)
                else:
                    grad_w.addmm_(g_mm.t(), h_mm)
            if need_b:
                grad_b += g.sum(dim=0)
            del g, g_mm
        else:
            del out, s_op, s
    if n == 0:
        if need_w:
            grad_w.zero_()
    if grad_h is not None and p.group is not None:
        # the column-parallel head's input gradient: the only [N, H] collective (4 N H bytes in float32)
        from ..distributed.comm import all_reduce

        grad_h = all_reduce([grad_h], torch.distributed.ReduceOp.SUM, p.group, in_place=True)[0].to(p.hidden.dtype)
    if grad_w is not None:
        grad_w = grad_w.to(p.weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(p.bias_dtype)
    return loss, soft, hard, grad_h, grad_w, grad_b


def _scale(stored: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """``scale_stored_grad`` (in place, float32 scale), but float64 gradients get a float64 scale."""
    if stored.dtype == torch.float64:
        return stored.mul_(grad_loss.to(torch.float64))
    return scale_stored_grad(stored, grad_loss)


class _FusedLinearKD(torch.autograd.Function):
    """Autograd of the fused head + loss (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan, row_weight):
        plan.hidden, plan.weight, plan.bias = hidden, weight, bias
        plan.weight_mm = _matmul_weight(weight)
        plan.needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        want_grad = any(plan.needs)
        ctx.reduce = plan.reduction != "none"
        ctx.used = False
        if ctx.reduce:
            loss, soft, hard, gh, gw, gb = _run_chunks(plan, row_weight, want_grad, True)
            ctx.stored = (gh, gw, gb)
        else:
            loss, soft, hard, *_ = _run_chunks(plan, row_weight, False, False)
            ctx.plan, ctx.row_weight = plan, row_weight
        plan.weight_mm = None if ctx.reduce else plan.weight_mm
        ctx.mark_non_differentiable(soft, hard)
        ctx.set_materialize_grads(False)
        return loss, soft, hard

    @staticmethod
    def backward(ctx, grad_loss, _grad_soft, _grad_hard):
        if torch.is_grad_enabled():
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
        if grad_loss is None:
            if ctx.reduce or ctx.plan.group is None:
                return None, None, None, None, None
            # sharded, reduction="none": the rerun's collectives must run on every rank, so run it with 0
            grad_loss = torch.zeros(ctx.row_weight.shape, dtype=ctx.row_weight.dtype, device=ctx.row_weight.device)
        if ctx.reduce:
            grads = [None if g is None else _scale(g, grad_loss) for g in ctx.stored]
            ctx.stored = None
        else:
            # the row weights times the incoming per-row gradient: the gradient is linear in them
            p = ctx.plan
            weight = ctx.row_weight * grad_loss.reshape(-1).to(ctx.row_weight.dtype)
            grads = list(_run_chunks(p, weight, True, True)[3:])
            ctx.plan = None
        return grads[0], grads[1], grads[2], None, None


# ----------------------------------------------------------------------------
# the public functional and module
# ----------------------------------------------------------------------------

def _divergence_params(divergence: str, temperature: float, beta: float, skew: float):
    """``(kind, a, b, w_p, w_q, soft_scale)`` of ``divergence_fwd`` for ``divergence``."""
    if divergence == "tvd":
        return KIND_CODES["tvd"], 0.0, 0.0, 0.0, 0.0, 1.0
    if divergence == "kl":  # kd_loss: Hinton's T^2
        return (KIND_CODES["kl_family"], *divergence_coefficients("forward_kl"), float(temperature) ** 2)
    if divergence == "reverse_kl":
        coeff = divergence_coefficients("reverse_kl")
    elif divergence == "jsd":
        coeff = divergence_coefficients("jsd", beta=beta)
    else:
        coeff = divergence_coefficients("skew_kl", skew=skew, reverse=divergence == "skew_reverse_kl")
    return (KIND_CODES["kl_family"], *coeff, 1.0)


def _kd_row_op(kd_fwd):
    """``kd_fwd`` behind ``divergence_fwd``'s signature, for forward KL alone (``T^2 KL``, no CE, no top-k)."""

    def op(student, teacher, topk_ids, target, row_weight, temperature, kind, a, b, w_p, w_q, soft_scale,
           ce_weight, topk_mode, reduce, grad_student, grad_teacher):
        temp = torch.full((student.shape[0],), temperature, dtype=torch.float32, device=student.device)
        loss, grad_s, grad_t, _ = kd_fwd(student, teacher, temp, row_weight, reduce, grad_student, grad_teacher,
                                         False)
        return loss, loss, torch.zeros_like(loss), grad_s, grad_t

    return op


def _row_op(backend: str, hidden: torch.Tensor, weight: torch.Tensor, plain_kd: bool):
    """The ``divergence_fwd`` that runs each chunk: the reference, or a fused backend's op.

    ``plain_kd``: the loss is forward KL with ``T^2`` alone on float32 dense chunks without padding
    (``divergence="kl"``, no ``ce_weight``, no parts, no top-k, ``V_t == V``): exactly ``kd_fwd``'s row
    loss, so a fused backend that has ``kd_fwd`` but not yet ``divergence_fwd`` runs it with ``kd_fwd``.
    """
    v.check_backend(backend)
    loss = "fused_linear_kd"  # fastkd.dispatch.backend.LOSS_OPS: needs divergence_fwd
    if plain_kd and backend != "reference":
        name = resolve("kd", backend, hidden, weight)
        if name != "reference":
            if unavailable_reason(name, loss, hidden.device) is None:
                return getattr(implementation(name), FUSED_OP)
            return _kd_row_op(implementation(name).kd_fwd)
        return R.divergence_fwd
    name = resolve(loss, backend, hidden, weight)
    return R.divergence_fwd if name == "reference" else getattr(implementation(name), FUSED_OP)


def _teacher_parts(teacher, teacher_bias, lead, dev, vocab: int):
    """``teacher`` checked and taken apart: (kind, V_t, hidden, weight, logits, top-k); the absent parts None."""
    teacher_hidden = teacher_weight = teacher_logits = topk = None
    if isinstance(teacher, TopKTeacher):
        topk = teacher
        teacher_kind, teacher_vocab = "topk", vocab
    elif isinstance(teacher, (tuple, list)):
        if len(teacher) != 2:
            raise ValueError(f"teacher as a tuple must be (teacher_hidden, teacher_weight), got {len(teacher)} items")
        teacher_hidden, teacher_weight = teacher
        v.check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, lead, dev)
        teacher_kind, teacher_vocab = "pair", teacher_weight.shape[0]
    elif isinstance(teacher, torch.Tensor):
        v.check_logits("teacher", teacher)
        teacher_logits = teacher
        if tuple(teacher.shape[:-1]) != lead:
            raise ValueError(f"teacher logits [..., V_t] must have the leading shape of student_hidden {lead}, "
                             f"got {tuple(teacher.shape)}")
        v.check_same_device("teacher", teacher, dev)
        teacher_kind, teacher_vocab = "logits", teacher.shape[-1]
    else:
        raise TypeError("teacher must be a (teacher_hidden, teacher_weight) pair, teacher logits [..., V_t] or a "
                        f"fastkd.TopKTeacher, got {type(teacher).__name__}")
    return teacher_kind, teacher_vocab, teacher_hidden, teacher_weight, teacher_logits, topk


# About 130 lines, most of them argument checks (every message names its argument) in the order a reader
# meets the arguments; the work is _FusedLinearKD's.
def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: Teacher,
    target: Optional[torch.Tensor] = None,
    *,
    divergence: str = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
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
    backend: str = "auto",
    process_group=None,
):
    # --- arguments (every message names the argument) ---
    v.check_matrix("student_hidden", student_hidden, 0)
    dev = student_hidden.device
    lead = tuple(student_hidden.shape[:-1])
    v.check_head("student", student_hidden, student_weight, student_bias, None, dev)
    vocab = student_weight.shape[0]
    v.check_fused_linear_options(divergence, temperature, beta, skew, ce_weight, logit_scale, softcap, reduction)
    v.check_ignore_index(ignore_index)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")

    teacher_kind, teacher_vocab, teacher_hidden, teacher_weight, teacher_logits, topk = _teacher_parts(
        teacher, teacher_bias, lead, dev, vocab)
    if teacher_bias is not None and teacher_kind != "pair":
        raise ValueError("teacher_bias is used only with a (teacher_hidden, teacher_weight) teacher")
    if teacher_vocab < vocab:
        raise ValueError(f"the teacher's vocabulary ({teacher_vocab}) must be at least the student's "
                         f"(student_weight has V = {vocab} rows); the student's missing columns count as -inf")
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
    for name, x in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias), ("teacher", teacher_logits),
                    ("teacher.logprobs", topk.logprobs if topk is not None else None),
                    ("sample_weight", sample_weight)):
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
    plain_kd = (divergence == "kl" and ce_weight == 0 and not pass_target and topk is None
                and teacher_vocab == vocab and (teacher_logits is None or teacher_logits.dtype == torch.float32))
    compute_dtype = torch.float64 if f64 else torch.float32
    n = math.prod(lead)
    equal = None
    if sharded:
        teacher_values = topk.logprobs if topk is not None else (
            teacher_hidden if teacher_logits is None else teacher_logits)
        wants = tuple(torch.is_grad_enabled() and x is not None and x.requires_grad
                      for x in (student_hidden, student_weight, student_bias))
        equal = D.comm.check_group_shapes(n, vocab, process_group, dev,  # before any per-row collective
                                      (student_hidden.dtype, student_weight.dtype, teacher_values.dtype), wants)
        op = D.fused_linear_row_op(divergence, beta, skew, topk.mode if topk is not None else None, pass_target,
                                   process_group, vocab, equal)
    else:
        op = R.divergence_fwd if f64 else _row_op(backend, student_hidden, student_weight, plain_kd)
    row_weight = row_weights(_probe(student_hidden, lead + (global_vocab if sharded else teacher_vocab,)), target,
                               ignore_index, sample_weight, reduction, compute_dtype)
    if chunk_size is None:
        chunk_size = default_chunk_size(n, vocab, teacher_vocab, student_weight.shape[1],
                                        student_weight.element_size(), dev.type)
    kind, a, b, w_p, w_q, soft_scale = _divergence_params(divergence, temperature, beta, skew)

    # everything one pass over the chunks needs (tensors flattened to rows)
    plan = SimpleNamespace(
        n=n, lead=lead, vocab=vocab, chunk=chunk_size, compute_dtype=compute_dtype, reduction=reduction,
        pad=teacher_vocab - vocab if teacher_kind != "topk" else 0,
        logit_scale=None if logit_scale is None else float(logit_scale),
        softcap=None if softcap is None else float(softcap),
        bias_dtype=student_bias.dtype if student_bias is not None else None,
        mask_skipped=target is not None or sample_weight is not None,
        teacher_kind=teacher_kind,
        teacher_hidden=teacher_hidden,
        teacher_weight_mm=_matmul_weight(teacher_weight) if teacher_weight is not None else None,
        teacher_bias=teacher_bias, teacher_logits=teacher_logits,
        topk_ids=topk.indices.reshape(n, topk.k) if topk is not None else None,
        topk_logprobs=topk.logprobs.reshape(n, topk.k) if topk is not None else None,
        topk_mode=TOPK_MODE_CODES[topk.mode] if topk is not None else TOPK_MODE_CODES[None],
        target=target.reshape(n).to(torch.int64) if pass_target else None,
        op=op, temperature=float(temperature), kind=kind, a=a, b=b, w_p=w_p, w_q=w_q, soft_scale=soft_scale,
        ce_weight=float(ce_weight), group=process_group,
    )
    hidden = student_hidden.reshape(n, student_hidden.shape[-1])
    if not hidden.is_contiguous():
        hidden = hidden.contiguous()
    loss, soft, hard = _FusedLinearKD.apply(hidden, student_weight, student_bias, plan, row_weight)
    if reduction == "none":
        loss, soft, hard = (x.reshape(lead) for x in (loss, soft, hard))
    return LossParts(loss, soft, hard) if return_parts else loss


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
    ``"jsd"`` (``beta``), ``"skew_kl"`` / ``"skew_reverse_kl"`` (``skew``), ``"tvd"``
    (``fastkd.reverse_kl_loss`` etc.: no ``T^2``). ``ce_weight`` adds
    ``ce_weight * cross_entropy(s, target)`` at T = 1; ``return_parts=True`` returns
    ``LossParts(loss, soft, hard)`` (``hard``: the row-weighted CE, 0 without ``target``).

    ``logit_scale`` multiplies and ``softcap`` applies ``softcap * tanh(x / softcap)``
    to the logits computed here (student, and a ``(hidden, weight)`` teacher) before
    the temperature; dense teacher logits and top-k log-probs are taken as given.
    ``V_t > V`` (a teacher vocabulary padded to a multiple of 64): the student's
    missing columns are ``-inf`` (no mass; forward KL is then infinite where the
    teacher puts mass on them, as the KL is).

    ``target``, ``ignore_index``, ``sample_weight``, ``reduction`` as ``kd_loss``, over
    all rows of the batch whatever the chunking (``"mean"`` divides by counted rows *
    ``V_t``, the composition's width). Rows skipped by the loss (``ignore_index``,
    weight 0) add nothing to any gradient, even with NaN hidden states.

    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias``
    only; teacher tensors (and ``sample_weight``) that require grad raise
    ``ValueError`` (detach them). ``float`` ``temperature`` only.

    ``chunk_size``: rows per chunk (``None``: ``fastkd.losses.fused_linear.default_chunk_size``,
    the working block at most the size of the weight gradient or 256 MiB, and at least
    512 rows on CUDA / 64 on CPU). Peak extra memory: the weight gradient plus one
    chunk's float32 student, teacher and gradient blocks (``4 (V + 2 V_t)`` bytes per
    row). bf16/fp16 weights: on CUDA the logits come from ``torch.mm(..., out_dtype=
    torch.float32)`` and the backward matmuls run in the weight's dtype (cuBLAS fp32
    accumulation); on CPU they are multiplied as a float32 copy of the weights held for
    the call. ``backend``: which ``divergence_fwd`` runs the loss on each chunk
    ("auto", "reference", "cpu", "cuda", "triton"); the matmuls always run in torch.

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
    backward does). Each chunk's loss runs in PyTorch on the shard with O(rows) communication
    (``fastkd.distributed``); an explicit fused ``backend`` raises.
"""
