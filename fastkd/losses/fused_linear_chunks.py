"""The chunk loop of the fused LM head (``fastkd.fused_linear_kd_loss``): matmuls, row op, gradient matmuls.

One pass over the rows in chunks: each chunk's logits are computed in float32, the row op
``divergence_fwd`` returns the chunk's loss and its gradient w.r.t. the logits, and that
gradient goes straight into ``grad_hidden[chunk] = g @ W`` and ``grad_weight += g^T @ h``.

Precision rules (``docs/design.md``, "Fused linear head"):

* the logits are float32 (float64 for float64 inputs), from float32-accumulated matmuls, never
  rounded to bf16 before the softmax;
* ``mm_dtype`` (the autocast dtype, under ``torch.autocast``) rounds the matmul inputs as the
  unfused ``lm_head`` would be rounded; without it the inputs are multiplied in their own dtype;
* the weight and bias gradients accumulate over the chunks in float32 on every device and are
  cast to the weight's dtype once, at the end (a bf16 running sum would round once per chunk).
"""
import math
from types import SimpleNamespace
from typing import Optional

import torch

from ..core.mixture import mix_log_probs

# chunk_size=None: the working block of one chunk (float32 student logits padded to V_t, teacher
# logits and the logit gradient: 4 * (V + 2 V_t) bytes per row) may take as much memory as the
# weight gradient, which the fused path holds anyway, or CHUNK_BUDGET_BYTES if that is larger.
CHUNK_BUDGET_BYTES = 256 * 2**20
# ... but a chunk has at least this many rows: each chunk re-reads the weights (4 passes over
# [V, H]), and a chunk of c rows does 2c flops per weight element read. On a GPU (bf16 ridge
# point ~300 flops/byte) 512 rows keep the matmuls compute bound; a CPU's ridge is far lower.
MIN_CHUNK_ROWS = {"cuda": 512, "cpu": 64}
LOW_PRECISION = (torch.float16, torch.bfloat16)


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


def f32_matmul(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` accumulated and returned in float32 (float64 stays float64), never rounded to bf16;
    into ``out`` (a float32 / float64 buffer of the product's shape) when given."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    if a.device.type == "cuda":  # cuBLAS: bf16/fp16 inputs, fp32 output (torch >= 2.8)
        return torch.mm(a, b, out_dtype=torch.float32) if out is None else torch.mm(a, b, out_dtype=out.dtype, out=out)
    return f32_matmul(a.float(), b.float(), out)


def matmul_operand(x: torch.Tensor, mm_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``x`` as the chunk matmuls take it: rounded to ``mm_dtype`` (autocast) if given; then, on a CPU,
    low-precision values as float32 (torch's CPU has no bf16 x bf16 -> fp32 matmul)."""
    if mm_dtype is not None and x.dtype != mm_dtype and x.dtype != torch.float64:
        x = x.to(mm_dtype)
    return x.float() if x.device.type != "cuda" and x.dtype in LOW_PRECISION else x


def _rounded(x: Optional[torch.Tensor], mm_dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """A bias as autocast's ``F.linear`` would add it: rounded to ``mm_dtype`` (float64 stays)."""
    if x is None or mm_dtype is None or x.dtype == torch.float64:
        return x
    return x.to(mm_dtype)


def chunk_rows(x: torch.Tensor, i0: int, i1: int, lead) -> torch.Tensor:
    """Rows ``i0:i1`` of ``x [..., C]`` flattened over ``lead``, without copying all of ``x`` when it
    cannot be viewed as ``[N, C]`` (such as ``logits[:, :-1]``): then only the chunk is gathered."""
    try:
        return x.view(-1, x.shape[-1])[i0:i1]
    except RuntimeError:
        index = torch.unravel_index(torch.arange(i0, i1, device=x.device), lead)
        return x[index]


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias, scale, softcap, out=None) -> torch.Tensor:
    """``softcap(scale * (h @ W.T + b))`` in float32 (float64 for float64 weights), into ``out`` if given.

    The bias, ``scale`` and ``1 / softcap`` ride in the matmul (``addmm``'s ``beta`` and ``alpha``), so
    the logits are written once by the matmul and, with a softcap, passed over twice more (tanh, times
    the cap) instead of once per option.
    """
    alpha = (1.0 if scale is None else scale) / (1.0 if softcap is None else softcap)
    if h.dtype not in (torch.float32, torch.float64):  # CUDA bf16/fp16 operands: the out_dtype matmul
        s = f32_matmul(h, weight.t(), out)
        if bias is not None:
            s += bias
        if alpha != 1.0:
            s *= alpha
    elif bias is not None:
        b = bias.to(h.dtype)
        s = torch.addmm(b, h, weight.t(), beta=alpha, alpha=alpha, out=out) if out is not None else \
            torch.addmm(b, h, weight.t(), beta=alpha, alpha=alpha)
    elif out is not None:  # beta = 0: out's old contents (even NaN) are ignored
        s = torch.addmm(out, h, weight.t(), beta=0.0, alpha=alpha, out=out)
    else:
        s = torch.mm(h, weight.t())
        if alpha != 1.0:
            s *= alpha
    if softcap is not None:
        s.tanh_().mul_(softcap)
    return s


def _accumulate_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, first: bool,
                            alpha: float) -> None:
    """``grad_w (+)= alpha g^T @ h`` into a float32 (float64) buffer, whatever the operands' dtype
    (``beta = 0`` on the first chunk: the buffer's uninitialised contents are ignored)."""
    beta = 0.0 if first else 1.0
    if g.dtype == grad_w.dtype:
        torch.addmm(grad_w, g.t(), h, beta=beta, alpha=alpha, out=grad_w)
    else:  # CUDA bf16/fp16 operands: cuBLAS accumulates in fp32 and writes fp32 (torch >= 2.8)
        torch.addmm(grad_w, g.t(), h, out_dtype=grad_w.dtype, beta=beta, alpha=alpha, out=grad_w)


def run_chunks(p: SimpleNamespace, row_weight: torch.Tensor, want_grad: bool, reduce: bool):
    """One pass over the chunks: ``(loss, soft, hard, grad_hidden, grad_weight, grad_bias,
    grad_teacher_hidden, grad_teacher_weight, grad_teacher_bias, grad_teacher_logits)``.

    Losses are 0-d sums (``reduce``) or ``[N]``; gradients are None unless ``want_grad``
    (then those of ``p.needs``: hidden, weight, bias, and of ``p.teacher_needs``: the teacher's
    hidden, weight, bias or dense logits), in the inputs' dtypes. A shared head (``p.shared``: the
    teacher's weight is the student's) adds the teacher's weight and bias gradients to the
    student's. Autocast is off inside: the matmul dtype is the plan's (``p.mm_dtype``), the logits
    float32.
    """
    with torch.autocast(p.hidden.device.type, enabled=False):
        return _run_chunks(p, row_weight, want_grad, reduce)


def _softcap_grad_(g: torch.Tensor, capped_times: torch.Tensor, softcap: Optional[float], times: float):
    """``g * (1 - (x / softcap)^2)`` in place, ``x`` the capped logits, given as ``capped_times = times * x``
    (squared in place: it is not used again)."""
    if softcap is None:
        return g
    return g.addcmul_(g, capped_times.square_(), value=-1.0 / (softcap * times) ** 2)


def _group_logsumexp(group):
    """Each row's log-sum-exp over the vocabulary-sharded group's whole row (for a sharded mixture)."""
    from ..distributed.comm import group_logsumexp  # torch.distributed only for those who use a group
    return lambda x: group_logsumexp(x, group)


def _teacher_chunk(p: SimpleNamespace, i0: int, i1: int, t_buf, tw_mm, teacher_bias, keep_rows, want_t: bool):
    """The teacher's chunk logits (times ``p.teacher_scale``) and the matmul operand of its hidden rows (None
    unless the teacher is a pair whose gradients are wanted: ``want_t``; ``keep_rows`` then masks skipped rows)."""
    if p.teacher_kind == "pair":
        th = matmul_operand(chunk_rows(p.teacher_hidden, i0, i1, p.lead), p.mm_dtype).to(tw_mm.dtype)
        if want_t and keep_rows is not None:  # skipped rows add nothing to the teacher's gradients, even if NaN
            th = torch.where(keep_rows, th, torch.zeros((), dtype=th.dtype, device=th.device))
        t = head_logits(th, tw_mm, teacher_bias, p.logit_scale, p.softcap, out=t_buf[:i1 - i0])
        th = th if want_t else None
    elif p.teacher_kind == "logits":
        t = chunk_rows(p.teacher_logits, i0, i1, p.lead).contiguous()
        if p.teacher_scale != 1.0:  # a float32 chunk copy (the user's logits stay as they are, never rounded)
            return t.to(p.compute_dtype) * p.teacher_scale, None
        return t, None
    elif p.teacher_kind == "mixture":
        members = (chunk_rows(m[1], i0, i1, p.lead).to(p.compute_dtype, copy=True) if m[0] == "logits" else
                   head_logits(matmul_operand(chunk_rows(m[1], i0, i1, p.lead), p.mm_dtype).to(w_mm.dtype), w_mm,
                               _rounded(m[3], p.mm_dtype), p.logit_scale, p.softcap)
                   for m, w_mm in zip(p.mixture.members, p.mixture_weights_mm))
        t = mix_log_probs(members, p.mixture.weights, p.mixture.mode, p.teacher_temperature, t_buf[:i1 - i0],
                          *(() if p.group is None else (_group_logsumexp(p.group),)))
        return t.mul_(p.temperature), None  # softmax(T log p / T) = p
    elif p.teacher_kind == "mapped":  # the teacher's chunk (no logit_scale / softcap: another model) projected
        rows = p.mapped.teacher
        if isinstance(rows, (tuple, list)):
            th = matmul_operand(chunk_rows(rows[0], i0, i1, p.lead), p.mm_dtype).to(p.mapped_weight_mm.dtype)
            logits = f32_matmul(th, p.mapped_weight_mm.t())
        else:
            logits = chunk_rows(rows, i0, i1, p.lead)
        return p.mapped.projected_probs(p.teacher_temperature, p.compute_dtype, logits).log_(), None
    else:
        return p.topk_logprobs[i0:i1].contiguous(), None  # [chunk, K]: cheap
    if p.teacher_scale != 1.0:
        t.mul_(p.teacher_scale)
    return t, th


# About 120 lines: one chunk's matmuls, row op and gradient matmuls in the order they run (a chunk's
# temporaries are freed before the next, which helpers holding references would make harder to see).
def _run_chunks(p: SimpleNamespace, row_weight: torch.Tensor, want_grad: bool, reduce: bool):
    n, vocab, dev = p.n, p.vocab, p.hidden.device
    acc = p.compute_dtype
    shape = () if reduce else (n,)
    loss = torch.zeros(shape, dtype=acc, device=dev)
    soft = torch.zeros(shape, dtype=acc, device=dev)
    hard = torch.zeros(shape, dtype=acc, device=dev)
    need_h, need_w, need_b = p.needs if want_grad else (False, False, False)
    t_need_h, t_need_w, t_need_b, t_need_logits = p.teacher_needs if want_grad else (False,) * 4
    # a shared head (teacher=(hidden, None)): the teacher's weight and bias gradients are the student's
    shared = getattr(p, "shared", False)
    want_t = t_need_h or t_need_w or t_need_b or t_need_logits or (shared and p.teacher_grad and (need_w or need_b))
    weight_mm = matmul_operand(p.weight, p.mm_dtype)
    teacher_weight_mm = weight_mm if p.teacher_weight is p.weight else \
        matmul_operand(p.teacher_weight, p.mm_dtype) if p.teacher_weight is not None else None
    if p.teacher_kind == "mapped" and isinstance(p.mapped.teacher, (tuple, list)):
        p.mapped_weight_mm = matmul_operand(p.mapped.teacher[1], p.mm_dtype)  # once, not per chunk
    if p.teacher_kind == "mixture":
        p.mixture_weights_mm = [matmul_operand(m[2], p.mm_dtype) if m[0] == "pair" else None
                                for m in p.mixture.members]
    bias, teacher_bias = (_rounded(b, p.mm_dtype) for b in (p.bias, p.teacher_bias))
    # float32 sums: sharded grad_hidden (summed over the group) and every weight / bias gradient
    h_dtype = torch.float32 if p.group is not None and p.hidden.dtype in LOW_PRECISION else p.hidden.dtype
    grad_h = torch.empty(p.hidden.shape, dtype=h_dtype, device=dev) if need_h else None
    grad_w = torch.empty(p.weight.shape, dtype=acc, device=dev) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None
    t_rows = math.prod(p.lead)
    grad_th = torch.empty((t_rows, p.teacher_hidden.shape[-1]), dtype=acc, device=dev) if t_need_h else None
    grad_tw = torch.empty(p.teacher_weight.shape, dtype=acc, device=dev) if t_need_w else None
    grad_tb = torch.zeros(p.teacher_weight.shape[0], dtype=acc, device=dev) if t_need_b else None
    # the dense teacher logits' gradient in their own dtype (one rounding per chunk, no float32 copy of [N, V_t])
    grad_tl = torch.empty((t_rows, p.teacher_logits.shape[-1]), dtype=p.teacher_logits.dtype, device=dev) \
        if t_need_logits else None
    empty_ids = torch.empty(0, dtype=torch.int64, device=dev)
    entropy = torch.zeros((), dtype=acc, device=dev) if getattr(p, "want_entropy", False) else None
    # One logit buffer per head for the whole loop: a fresh [chunk, V] block per chunk would be new
    # memory each time (a large block goes back to the system when freed), paid in page faults.
    rows = min(p.chunk, n)
    s_buf = torch.empty((rows, vocab), dtype=acc, device=dev)
    t_width = p.teacher_weight.shape[0] if p.teacher_kind == "pair" else \
        p.mixture_vocab if p.teacher_kind == "mixture" else 0
    t_buf = torch.empty((rows, t_width), dtype=acc, device=dev) if t_width else None
    # a MappedTeacher's buckets: the map's distinct student ids, the same in every row
    mapped_ids = p.mapped.vocab_map.student_ids.expand(rows, -1).contiguous() if p.teacher_kind == "mapped" else None
    for i0 in range(0, n, p.chunk):
        i1 = min(n, i0 + p.chunk)
        w_c = row_weight[i0:i1]
        h = p.hidden[i0:i1]
        keep_rows = (w_c != 0).unsqueeze(1) if p.mask_skipped else None
        if keep_rows is not None:
            # rows the loss does not read add nothing to grad_weight even if their hidden state is NaN/inf
            h = torch.where(keep_rows, h, torch.zeros((), dtype=h.dtype, device=dev))
        h_mm = matmul_operand(h, p.mm_dtype).to(weight_mm.dtype)
        s = head_logits(h_mm, weight_mm, bias, p.logit_scale, p.softcap, out=s_buf[:i1 - i0])
        t, th = _teacher_chunk(p, i0, i1, t_buf, teacher_weight_mm, teacher_bias, keep_rows, want_t)
        # teacher_vocab="mask": the student's missing columns (V_t > V) are -inf: no mass, never 0
        s_op = s if p.pad == 0 else torch.nn.functional.pad(s, (0, p.pad), value=float("-inf"))
        ids = p.topk_ids[i0:i1].contiguous() if p.topk_ids is not None else \
            mapped_ids[:i1 - i0] if p.teacher_kind == "mapped" else empty_ids
        tgt = p.target[i0:i1] if p.target is not None else empty_ids
        out = p.op(s_op, t, ids, tgt, w_c, p.temperature, p.kind, p.a, p.b, p.w_p, p.w_q, p.soft_scale,
                   p.ce_weight, p.topk_mode, reduce, want_grad, want_t)
        if entropy is not None:  # H(softmax(z)) = lse(z) - sum q z, z = s / T, of the rows the loss reads
            z = s if p.temperature == 1.0 else s / p.temperature
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            q = (z - lse).exp_()  # one [chunk, V] temporary (two with a temperature); the row dot has none
            rows = lse.squeeze(1) - torch.bmm(q.unsqueeze(1), z.unsqueeze(2)).view(-1)
            entropy += (rows * (w_c != 0)).sum()
            del z, q
        if reduce:
            loss += out[0]
            soft += out[1]
            hard += out[2]
        else:
            loss[i0:i1], soft[i0:i1], hard[i0:i1] = out[0], out[1], out[2]
        if not want_grad:
            del out, s_op, s, t
            continue
        scale = 1.0 if p.logit_scale is None else p.logit_scale  # applied by the gradient matmuls
        g = _softcap_grad_(out[3] if p.pad == 0 else out[3][:, :vocab], s, p.softcap, 1.0)
        gt = out[4] if want_t else None
        del out, s_op, s
        if gt is not None:
            if p.teacher_scale != 1.0:  # t = teacher_scale * (the teacher's capped logits)
                gt.mul_(p.teacher_scale)
            gt = _softcap_grad_(gt, t, p.softcap if p.teacher_kind == "pair" else None, p.teacher_scale)
            if t_need_logits:
                grad_tl[i0:i1] = gt
        del t
        g_mm = g.to(weight_mm.dtype)
        gt_mm = gt.to(teacher_weight_mm.dtype) if th is not None else None
        if shared and gt_mm is not None:  # one pass over the shared weight for both heads' gradients
            g_both, h_both = torch.cat([g_mm, gt_mm]), torch.cat([h_mm, th])
            if need_h or t_need_h:
                part = f32_matmul(g_both, weight_mm) if acc != weight_mm.dtype else g_both @ weight_mm
                if scale != 1.0:
                    part.mul_(scale)
                if need_h:
                    grad_h[i0:i1] = part[:i1 - i0]
                if t_need_h:
                    grad_th[i0:i1] = part[i1 - i0:]
            if need_w:
                _accumulate_weight_grad(grad_w, g_both, h_both, i0 == 0, scale)
            if need_b:
                grad_b.add_(g_both.sum(dim=0), alpha=scale)
            del g_both, h_both
        else:
            if need_h:
                part = f32_matmul(g_mm, weight_mm) if grad_h.dtype != weight_mm.dtype else g_mm @ weight_mm
                grad_h[i0:i1] = part if scale == 1.0 else part.mul_(scale)  # [chunk, H]: small
            if need_w:
                _accumulate_weight_grad(grad_w, g_mm, h_mm, i0 == 0, scale)
            if need_b:
                grad_b.add_(g.sum(dim=0), alpha=scale)
            if gt_mm is not None:
                if t_need_h:
                    part = f32_matmul(gt_mm, teacher_weight_mm) if acc != teacher_weight_mm.dtype else \
                        gt_mm @ teacher_weight_mm
                    grad_th[i0:i1] = part if scale == 1.0 else part.mul_(scale)
                if t_need_w:
                    _accumulate_weight_grad(grad_tw, gt_mm, th, i0 == 0, scale)
                if t_need_b:
                    grad_tb.add_(gt.sum(dim=0), alpha=scale)
        del g, g_mm, gt, gt_mm, th
    if n == 0:
        for buf in (grad_w, grad_tw):
            if buf is not None:
                buf.zero_()
    if p.group is not None and (grad_h is not None or grad_th is not None):
        # the column-parallel heads' input gradients: the only [N, H] collectives (4 N H bytes each in float32)
        from ..distributed.comm import all_reduce

        grad_h, grad_th = (None if g is None else all_reduce([g], torch.distributed.ReduceOp.SUM, p.group,
                                                             in_place=True)[0] for g in (grad_h, grad_th))

    p.entropy = entropy  # the student's summed entropy when asked (a statistic: no gradient)

    def cast(g, like):
        return None if g is None else g.to(like.dtype)

    return (loss, soft, hard, cast(grad_h, p.hidden), cast(grad_w, p.weight), cast(grad_b, p.bias),
            None if grad_th is None else grad_th.reshape(p.teacher_hidden.shape).to(p.teacher_hidden.dtype),
            cast(grad_tw, p.teacher_weight), cast(grad_tb, p.teacher_bias),
            None if grad_tl is None else grad_tl.reshape(p.teacher_logits.shape))
