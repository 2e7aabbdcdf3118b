"""The teacher's top-k log-probs, from its logits or straight from its head without ``[N, V]`` logits.

    teacher = fastkd.teacher_topk(teacher_hidden, teacher_lm_head.weight, k=64)   # chunked head + row kernel
    loss = fastkd.kd_loss(student_logits, teacher, temperature=1.0)

Per row (token) with logits ``x`` (``x = softcap(logit_scale (h W^T + b))`` for ``teacher_topk``):

* ``indices [..., k]`` int64: the k largest logits, in descending order; equal logits rank by the
  lower id, so every backend gives the same ids (the temperature does not change the order);
* ``logprobs [..., k]`` float32: ``x[id] / T - logsumexp(x / T)`` (normalised over the whole vocabulary);
* ``tail_logprob [...]`` float32: ``log(sum over the non-members c of exp(x_c / T)) - logsumexp(x / T)``,
  the log of the mass outside the top-k, summed over those columns (never ``log1p(-sum exp(logprobs))``,
  which cancels to 0 or below when the top-k hold nearly all the mass);

as a ``TopKTeacher(mode="tail")``. The definition is ``fastkd.core.topk.topk_rows`` (the reference
backend; float64 in, float64 out); the fused backends (``cpu``: C++, ``triton``: CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``) run the row op ``topk_fwd`` (``docs/design.md``, "Teacher top-k"):
one pass per row keeping a running top-k and the online log-sum-exp. ``k <= TOPK_MAX`` (1024) on every
backend.

No gradient: the teacher is frozen, so both functions run under ``no_grad`` and return constants
(inputs that require grad are read, not differentiated). Unlike the usual ``torch.topk`` on
``log_softmax(h @ W.T)`` (TRL's and Megatron's offline top-k, vLLM's ``logprobs``), no ``[N, V]``
tensor exists beyond one chunk of float32 logits, ties are broken the same way on every backend,
and the tail is exact.
"""
import math
from typing import Optional

import torch

from ..core import checks as v
from ..core.rows import row_view
from ..core.topk import TOPK_MAX, TopKTeacher, check_topk_k, topk_rows
from ..dispatch.backend import implementation, resolve
from ..losses.fused_linear_chunks import LOW_PRECISION, chunk_rows, default_chunk_size, head_logits, matmul_operand


def _row_op(name: str):
    """``op(logits [N, V], k, temperature) -> (ids, logprobs, tail, stats)`` of backend ``name``."""
    return topk_rows if name == "reference" else implementation(name).topk_fwd


def topk_from_logits(logits: torch.Tensor, k: int, *, temperature: float = 1.0, backend: str = "auto") -> TopKTeacher:
    """The top-k of ``log_softmax(logits / temperature)`` per row of ``logits [..., V]``, with the exact tail.

    Returns ``TopKTeacher(indices [..., k], logprobs [..., k], mode="tail", tail_logprob=[...])``
    (the module docstring has the formulas). Rows with any row stride are read in place (unit column
    stride; others are copied). No gradient flows to ``logits``.
    """
    v.check_logits("logits", logits)
    check_topk_k(k, logits.shape[-1])
    v.check_positive("temperature", temperature)
    name = resolve("teacher_topk", backend, logits)
    lead = tuple(logits.shape[:-1])
    with torch.no_grad():
        ids, logprobs, tail, _ = _row_op(name)(row_view(logits.detach(), row_strided=True), k, float(temperature))
    return TopKTeacher(ids.reshape(lead + (k,)), logprobs.reshape(lead + (k,)), mode="tail",
                       tail_logprob=tail.reshape(lead))


def teacher_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, temperature: float = 1.0,
                 bias: Optional[torch.Tensor] = None, logit_scale: Optional[float] = None,
                 softcap: Optional[float] = None, chunk_size: Optional[int] = None, process_group=None,
                 backend: str = "auto") -> TopKTeacher:
    """``topk_from_logits(softcap(logit_scale (hidden @ weight.T + bias)), k)`` without the ``[N, V]`` logits.

    ``hidden [..., H]``, ``weight [V, H]`` (the teacher's ``lm_head.weight``), ``bias [V]``. The rows
    run in chunks (``chunk_size`` rows; None: as many as fit 256 MiB of float32 logits, at least 64 on
    a CPU and 512 on a GPU, in equal chunks): each chunk's logits are computed in float32 (as
    ``fused_linear_kd_loss`` computes them: float32 accumulation, bf16/fp16 operands never rounded in
    between; under ``torch.autocast`` the operands are rounded to its dtype first), then the row op
    selects the top-k. Peak memory: one chunk of logits plus the ``[N, k]`` results.

    ``process_group``: a vocabulary-sharded head (the convention of ``fused_linear_kd_loss(process_group=)``):
    rank r holds rows ``[r V_local, (r + 1) V_local)`` of the weight (and bias); the returned ids are
    global and every rank gets the same result. Each rank takes its shard's top-k, then one all-gather
    per chunk sends ``12 k' + 12`` bytes per row (``k' = min(k, V_local)`` int64 ids and ``k' + 3`` float32)
    and every rank merges the candidates (``fastkd.distributed.topk``).

    No gradient flows to any input (the teacher is frozen). ``backend`` picks the row op (float64
    weights run on the reference).
    """
    v.check_head("", hidden, weight, bias, None, hidden.device)
    dev, vocab = hidden.device, weight.shape[0]
    v.check_positive("temperature", temperature)
    v.check_optional_number("logit_scale", logit_scale, positive=False)
    v.check_optional_number("softcap", softcap, positive=True)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    f64 = weight.dtype == torch.float64 or (bias is not None and bias.dtype == torch.float64)
    acc = torch.float64 if f64 else torch.float32
    name = resolve("teacher_topk", backend, torch.empty(0, dtype=acc, device=dev))
    lead = tuple(hidden.shape[:-1])
    n = math.prod(lead)
    if process_group is not None:
        from ..distributed import topk as sharded  # torch.distributed is imported only by those who use it

        rank, world = sharded.geometry(process_group, n, vocab, dev, (hidden.dtype, weight.dtype))
        check_topk_k(k, world * vocab)
    else:
        check_topk_k(k, vocab)
    if chunk_size is None:  # no weight gradient to match here: the 256 MiB budget alone
        chunk_size = default_chunk_size(n, vocab, 0, hidden=0, weight_bytes=0, device_type=dev.type)
    # under autocast the operands are rounded as autocast's F.linear would round them; the logits stay float32
    mm_dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) and not f64 else None
    op = _row_op(name)
    ids = torch.empty((n, k), dtype=torch.int64, device=dev)
    logprobs = torch.empty((n, k), dtype=acc, device=dev)
    tail = torch.empty((n,), dtype=acc, device=dev)
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        w = matmul_operand(weight.detach(), mm_dtype)
        b = bias.detach() if bias is not None else None
        if b is not None and mm_dtype is not None and b.dtype != torch.float64:
            b = b.to(mm_dtype)
        if b is not None and b.dtype in LOW_PRECISION and dev.type != "cuda":
            b = b.float()
        buf = torch.empty((min(chunk_size, n), vocab), dtype=acc, device=dev)  # one logit block for every chunk
        for i0 in range(0, n, chunk_size):
            i1 = min(n, i0 + chunk_size)
            h = matmul_operand(chunk_rows(hidden.detach(), i0, i1, lead), mm_dtype).to(w.dtype)
            s = head_logits(h, w, b, logit_scale, softcap, out=buf[:i1 - i0])
            if process_group is not None:
                out = sharded.merge_topk(s, k, float(temperature), op, process_group, rank, world)
            else:
                out = op(s, k, float(temperature))
            ids[i0:i1], logprobs[i0:i1], tail[i0:i1] = out[0], out[1], out[2]
            del h, s, out
    return TopKTeacher(ids.reshape(lead + (k,)), logprobs.reshape(lead + (k,)), mode="tail",
                       tail_logprob=tail.reshape(lead))


__all__ = ["teacher_topk", "topk_from_logits", "TOPK_MAX"]
