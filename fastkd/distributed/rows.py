"""The row machinery every vocabulary-parallel loss shares: argument checks, row weights, row
chunks, gradient buffers, the stored-gradient autograd node, and the cross-entropy's sums.
"""
from typing import Optional

import torch
import torch.distributed as dist

from ..core import checks as v
from ..core.rows import compute_dtype, read_rows
from ..core.topk import PAD_ID, TopKTeacher
from . import settings
from .comm import all_reduce


# ----------------------------------------------------------------------------
# the stored-gradient autograd node shared by every vocabulary-parallel loss
# ----------------------------------------------------------------------------

class StoredGradLoss(torch.autograd.Function):
    """Runs ``compute()`` (``run_chunks``' six results) in forward; backward scales.

    The gradients are the gradients of ``loss`` (the row weights are in them);
    backward multiplies them by the incoming gradient in float32, in place (nothing
    else references them), so a training step holds one gradient per input.
    ``temperature``: a tensor temperature (or None); its gradient is stored per row
    ([N], weighted) and summed to a 1-element temperature's shape in backward.
    """

    @staticmethod
    def forward(ctx, compute, student, teacher, temperature=None):
        loss, soft, hard, grad_s, grad_t, grad_temp = compute()
        ctx.grads = [grad_s, grad_t]
        ctx.shapes = [student.shape, teacher.shape]
        ctx.grad_temp = grad_temp
        ctx.temp_like = temperature.detach() if grad_temp is not None else None
        ctx.mark_non_differentiable(soft, hard)
        return loss, soft, hard

    @staticmethod
    def backward(ctx, grad_loss, _soft, _hard):
        if ctx.grads is None:
            raise RuntimeError("fastkd.distributed: the stored gradient was already used; a second backward "
                               "through the same loss (retain_graph=True) is not supported")
        grads, ctx.grads = ctx.grads, None
        g = grad_loss.reshape(-1, 1)  # [-1, 1]: a float32 scale, not cast to a bf16 gradient's dtype first
        skip = v.on_host(g) and g.numel() == 1 and bool(g == 1)  # free on CPU; never read on a GPU
        out = []
        for stored, shape in zip(grads, ctx.shapes):
            if stored is None:
                out.append(None)
                continue
            if not skip:
                torch.mul(stored, g, out=stored)
            out.append(stored.view(shape) if stored.numel() else stored)
        grad_temp = None
        if ctx.grad_temp is not None:  # [N] rows times the incoming (per-row or scalar) gradient
            rows = ctx.grad_temp * grad_loss.reshape(-1).to(ctx.grad_temp.dtype)
            like = ctx.temp_like
            grad_temp = (rows.sum() if like.numel() == 1 else rows).reshape(like.shape).to(like.dtype)
            ctx.grad_temp = ctx.temp_like = None
        return None, out[0], out[1], grad_temp


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

MINUS_INF = float("-inf")
WIDE = 1 << 40  # stand-in vocabulary width for structural checks before the global width is known


def stand_in(student: torch.Tensor, width: int) -> torch.Tensor:
    """A tensor shaped like the student with a last dim of ``width``, no memory (for the shared checks)."""
    return student.new_zeros(()).expand(*student.shape[:-1], width)


def safe_shift(m: torch.Tensor) -> torch.Tensor:
    """A row maximum usable as a shift: 0 where it is -inf (an empty or fully masked set)."""
    return torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)


def masked_max(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    return (x if keep is None else x.masked_fill(~keep, MINUS_INF)).amax(dim=1)


def masked_sum_exp(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    e = x.exp()
    return (e if keep is None else e.masked_fill(~keep, 0.0)).sum(dim=1)


_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_CALL_SLOTS = 1024  # 4 codes per dtype, 2 per gradient flag: room for 3 dtypes and 3 flags (512)


def check_group_shapes(rows: int, width: int, group, device, dtypes=(), grads=()) -> torch.Tensor:
    """One MAX all-reduce of (rows, -rows, width, -width), before any per-row collective.

    Vocabulary-parallel ranks must hold the same rows and equally wide shards, and make the same
    call: inputs of the same ``dtypes`` (they choose the row chunks: float32 logits on the shard
    kernels take one) and the same gradients wanted (``grads``: bools, which add per-row numbers).
    Otherwise the per-row collectives that follow would pair different rows, or differ in size and
    hang. Dtypes and flags ride in the row entries (``rows * 1024 + code``). Where values are
    readable (CPU tensors) a mismatch raises here, naming both counts. On a GPU nothing is read on
    the host: the returned 0-d bool (True when the shards are equal) NaNs the loss and gradients
    (``poison``) where widths differ; unequal row counts, dtypes or flags cannot be detected there
    without a host read (the next collectives differ in size: NCCL errors or hangs).
    """
    code = 0
    for dtype in dtypes:
        code = code * 4 + _DTYPE_CODES.get(dtype, 0)
    for flag in grads:
        code = code * 2 + int(bool(flag))
    assert code < _CALL_SLOTS, (dtypes, grads)
    x = torch.full((4,), rows * _CALL_SLOTS + code, dtype=torch.int64, device=device)  # no host-to-device copy
    x[2:].fill_(width)
    x[1::2].neg_()
    x = all_reduce([x], dist.ReduceOp.MAX, group)[0]
    if v.reads_values(x):
        most, least, widest, narrowest = int(x[0]), -int(x[1]), int(x[2]), -int(x[3])
        most_rows, least_rows = most // _CALL_SLOTS, least // _CALL_SLOTS
        if most_rows == least_rows and most != least:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"student_logits: every rank of a vocabulary-parallel group must pass inputs of the same "
                             f"dtypes and requires_grad (this rank: {names}, gradients wanted {list(map(bool, grads))}"
                             f"; another rank differs)")
        if most_rows != least_rows:
            raise ValueError(f"student_logits: every rank of a vocabulary-parallel group must hold the same rows "
                             f"(this rank {rows}, most {most_rows}, fewest {least_rows}); shard the vocabulary, "
                             f"not the rows")
        if widest != narrowest:
            raise ValueError(f"student_logits: every rank must hold a vocabulary shard of the same width "
                             f"(this rank {width}, widest {widest}, narrowest {narrowest})")
    return x[2] == -x[3]


def check_global_ids(name: str, ids: torch.Tensor, read: Optional[torch.Tensor], vocab: int, lo: int) -> None:
    """Ids of read rows in [lo, vocab) (lo = -1 admits top-k padding), on CPU only (free there)."""
    if ids.numel() == 0 or not v.reads_values(ids):
        return
    sel = ids if read is None else ids[read]
    if sel.numel() == 0:
        return
    small, big = int(sel.min()), int(sel.max())
    if small < lo or big >= vocab:
        raise ValueError(f"{name} has token id {small if small < lo else big} outside [0, {vocab}) "
                         f"(global ids over the concatenated vocabulary of the process group)")


def common_checks(student, teacher, reduction, target, ignore_index, sample_weight, target_required):
    if isinstance(teacher, TopKTeacher):
        v.check_logits("student_logits", student)
        # shapes and device here; ids (range over the global vocabulary, distinct in read rows) once V is known
        lead = tuple(student.shape[:-1])
        if tuple(teacher.indices.shape[:-1]) != lead:
            raise ValueError(f"TopKTeacher indices [..., K] must have the leading shape of student_logits {lead}, "
                             f"got {tuple(teacher.indices.shape)}")
        if teacher.device != student.device:
            raise ValueError(f"TopKTeacher must be on the student_logits' device {student.device}, "
                             f"got {teacher.device}")
    else:
        v.check_pair(student, teacher)
    v.check_reduction(reduction)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    v.check_target(target, stand_in(student, WIDE), ignore_index, required=target_required)
    v.check_sample_weight(sample_weight, student)
    if sample_weight is not None and torch.is_grad_enabled() and sample_weight.requires_grad:
        raise ValueError("sample_weight requires grad, but the distributed losses treat it as a constant; "
                         "pass sample_weight.detach()")


def ids_in_range(ids: torch.Tensor, read: Optional[torch.Tensor], vocab: int, lo: int) -> torch.Tensor:
    """bool [N]: the row's ids ([N, k]) are in [lo, vocab), or the row is not read (a device-side test)."""
    ok = ((ids >= lo) & (ids < vocab)).all(dim=1)
    return ok if read is None else ok | ~read


def poison(weight: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """NaN row weights where ``ok`` is False: unequal shards, or a read row with an id outside [0, V).

    Where values are readable these raise first; on a GPU (no host reads) the row's loss and
    gradients are NaN instead of silently wrong, as the fused kernels do (``docs/design.md``).
    """
    return torch.where(ok, weight, torch.full((), float("nan"), dtype=weight.dtype, device=weight.device))


def row_weight(n, target, ignore_index, sample_weight, reduction, vocab, dtype, device):
    """The contract's row weights; "mean" divides by counted rows * the *global* vocabulary."""
    valid = torch.ones(n, dtype=torch.bool, device=device) if target is None else target.reshape(n) != ignore_index
    weight = valid.to(dtype)
    if sample_weight is not None:
        weight = torch.where(valid, sample_weight.reshape(n).to(dtype), torch.zeros((), dtype=dtype, device=device))
    if reduction in ("batchmean", "mean"):
        counted = valid.sum().clamp_min(1).to(dtype)
        weight = weight / (counted * vocab if reduction == "mean" else counted)
    return weight


def local_columns(ids: torch.Tensor, offset: int, width: int):
    """(owned bool, local column clamped into range) of global ``ids`` for the shard at ``offset``."""
    local = ids - offset
    own = (ids != PAD_ID) & (local >= 0) & (local < width)
    return own, local.clamp(0, width - 1)


def gather_owned(x: torch.Tensor, own: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """x[row, col] where this shard owns the id, else 0 (the SUM all-reduce then gives the owner's value)."""
    return torch.where(own, x.gather(1, col), torch.zeros((), dtype=x.dtype, device=x.device))


def row_chunks(n: int, whole: bool = False):
    """The row slices the local math runs on; ``whole``: one slice of every row."""
    count = 1 if whole else max(1, min(settings.CHUNK_MAX, -(-n // settings.CHUNK_MIN_ROWS)))
    size = max(1, -(-n // count))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)] or [slice(0, 0)]


def grad_buffer(shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient buffer in ``like``'s dtype and device. CPU: from the extension's cache of
    recently freed gradient buffers, as the fused ops' (``csrc/cpu/grad_buffers.cpp``): a fresh large
    buffer's first touch faults once per 4 KiB page (30 ms of a 100 ms KD step at [1024, 16000])."""
    if like.device.type == "cpu" and hasattr(torch.ops.fastkd, "grad_buffer"):
        return torch.ops.fastkd.grad_buffer(list(shape), like.dtype)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def run_chunks(body, n, student, t_values, need_s, need_t, reduction, lead, whole=False):
    """``body(rows, out)`` -> weighted (loss, soft, hard) rows and float gradient rows (and optionally the
    rows' temperature gradients [rows]), per chunk (``row_chunks(n, whole)``).

    Gradients go into one buffer per input, in the input's dtype (the only [N, V_local]
    tensors that outlive the call). ``out``: the chunk's rows of those buffers where they are
    float32 (else None), which a body may write its gradients into and return (no copy).
    Returns (loss, soft, hard) reduced, the two gradients, and the [N] temperature gradients
    (None when ``body`` gives none).
    """
    grad_s = grad_buffer((n, student.shape[-1]), student) if need_s else None
    grad_t = grad_buffer((n, t_values.shape[-1]), t_values) if need_t else None
    outs, temps = [], []
    for rows in row_chunks(n, whole):
        out = (grad_s[rows] if need_s and grad_s.dtype == torch.float32 else None,
               grad_t[rows] if need_t and grad_t.dtype == torch.float32 else None)
        loss_r, soft_r, hard_r, gs, gt, *grad_temp = body(rows, out)
        outs.append((loss_r, soft_r, hard_r))
        if grad_temp and grad_temp[0] is not None:
            temps.append(grad_temp[0])
        if need_s and gs is not out[0]:
            grad_s[rows] = gs
        if need_t and gt is not out[1]:
            grad_t[rows] = gt
    loss, soft, hard = (torch.cat(parts) for parts in zip(*outs))

    def reduce(r):
        return r.reshape(lead) if reduction == "none" else r.sum()

    return reduce(loss), reduce(soft), reduce(hard), grad_s, grad_t, (torch.cat(temps) if temps else None)


def forward_kl_and_grads(lp: torch.Tensor, lq: torch.Tensor, need_p: bool):
    """``soft_and_grads`` of ``KL(p || q)`` in closed form (KD, ATS, JSD beta = 0): no autograd pass.

    Row sum of ``p (log p - log q)`` (0 where p == 0), ``G = -p`` and ``H = p (log p - log q)``
    (the derivatives w.r.t. log q and log p up to multiples of q and p, which the softmax
    projection ``G - q sum G`` removes, as it removes the ``+ p`` of the exact ``H``).
    """
    p = lp.exp()
    h = p * torch.where(p == 0, torch.zeros((), dtype=lp.dtype, device=lp.device), lp - lq)
    return h.sum(dim=1), p.neg_(), (h if need_p else None)


def soft_and_grads(fn, lp: torch.Tensor, lq: torch.Tensor, need_p: bool):
    """Per-row ``fn(lp, lq)`` [N] and its elementwise derivatives w.r.t. ``lq`` (and ``lp``) by autograd."""
    with torch.enable_grad():
        lq = lq.detach().requires_grad_(True)
        lp = lp.detach().requires_grad_(need_p)
        rows = fn(lp, lq)
        grads = torch.autograd.grad(rows.sum(), [lq, lp] if need_p else [lq])
    return rows.detach(), grads[0], (grads[1] if need_p else None)




# ----------------------------------------------------------------------------
# vocabulary parallel: DKD and ATS (the target column lives on one rank)
# ----------------------------------------------------------------------------

def target_column(tgt: torch.Tensor, offset: int, width: int, shape, device):
    """(owned [N, 1], local column [N, 1], one-hot bool [N, V_local] of the target in this shard)."""
    own, col = local_columns(tgt.unsqueeze(1), offset, width)
    is_g = torch.zeros(shape, dtype=torch.bool, device=device)
    is_g.scatter_(1, col, own)  # one index per row: no two writes to a cell
    return own, col, is_g


def rows_and_target(s_all, t_all, target, read_all, rows, dtype):
    """A chunk of rows in the compute dtype with skipped rows zeroed, and their safe targets (as the reference).

    ``s_all``, ``t_all``: the logits as [N, V_local] (reshaped once: a copy for non-contiguous rows).
    """
    s = s_all[rows].to(dtype)
    t = t_all[rows].to(dtype)
    tgt = target.reshape(-1)[rows].to(torch.int64)
    read = read_all[rows]
    keep = read.unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=s.device)
    return torch.where(keep, s, zero), torch.where(keep, t, zero), torch.where(read, tgt, torch.zeros_like(tgt)), read


def target_prologue(student, teacher, target, ignore_index, sample_weight, reduction, vocab):
    """What DKD and ATS compute once for all rows: dtype, read rows, checked targets, row weights."""
    dtype = compute_dtype(student, teacher)
    n_all = v.rows_of(student)
    read_all = read_rows(student, target, ignore_index, sample_weight)
    check_global_ids("target", target.reshape(n_all), read_all, vocab, 0)
    weight_all = row_weight(n_all, target, ignore_index, sample_weight, reduction, vocab, dtype, student.device)
    width = student.shape[-1]
    return dtype, n_all, read_all, weight_all, student.reshape(-1, width), teacher.reshape(-1, width)


def check_ce_args(ce_weight, return_parts) -> None:
    v.check_number("ce_weight", ce_weight)
    if not isinstance(return_parts, bool):
        raise TypeError(f"return_parts must be a bool, got {type(return_parts).__name__}")


def ce_sums(s: torch.Tensor, m_s: torch.Tensor, own: torch.Tensor, col: torch.Tensor):
    """The cross-entropy's two numbers per row for the SUM round (T = 1, raw student logits):
    ``sum exp(s - m_s)`` at the global raw maximum ``m_s`` [N, 1], and ``s[target]`` (its owner adds it)."""
    return [(s - m_s).exp().sum(dim=1), gather_owned(s, own, col).squeeze(1)]


def ce_rows(m_s: torch.Tensor, z1: torch.Tensor, s_target: torch.Tensor) -> torch.Tensor:
    """``lse(s) - s[target]`` per row from the all-reduced ``ce_sums``."""
    return (m_s.squeeze(1) - s_target) + z1.log()


def add_ce_grad(grad, s, m_s, z1, own, col, wce) -> None:
    """``grad += wce * (softmax(s) - onehot(target))`` in place; the one-hot only on the target's owner."""
    grad.add_(wce * ((s - m_s).exp() / z1.unsqueeze(1)))
    grad.scatter_add_(1, col, torch.where(own, -wce, torch.zeros((), dtype=grad.dtype, device=grad.device)))
