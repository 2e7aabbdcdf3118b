"""The row machinery every vocabulary-parallel loss shares: argument checks, row weights, row
chunks, gradient buffers, the stored-gradient autograd node, and the cross-entropy's sums.
"""
from types import SimpleNamespace
from typing import Optional

import torch

from ..core import checks as v
from ..core.divergence import LossParts
from ..core.rows import compute_dtype, read_rows, row_weights
from ..core.topk import PAD_ID, TopKTeacher
from . import settings
from .comm import check_group_shapes, group_geometry


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
    """The checks of every vocabulary-parallel logit loss that need no global vocabulary size (ids are
    checked once it is known: ``check_global_ids``, ``TopKTeacher.check_against``)."""
    if isinstance(teacher, TopKTeacher):
        v.check_logits("student_logits", student)
        teacher.check_layout(student)
    else:
        v.check_pair(student, teacher)
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    v.check_target(target, stand_in(student, WIDE), ignore_index, required=target_required)
    v.check_sample_weight(sample_weight, student)
    v.check_constant_weight(sample_weight, "distributed")


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
    """``fastkd.core.rows.row_weights`` of ``n`` rows; "mean" divides by counted rows * the *global* vocabulary."""
    rows = torch.zeros((), device=device).expand(n, vocab)  # no memory: only its shape and device are read
    return row_weights(rows, target, ignore_index, sample_weight, reduction, dtype)


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
    tensors that outlive the call). ``out``: the chunk's rows of those buffers (None where not
    wanted), which a body may write its gradients into and return (no copy); a body that returns
    other tensors (float32 math) has them copied in.
    Returns (loss, soft, hard) reduced, the two gradients, and the [N] temperature gradients
    (None when ``body`` gives none).
    """
    grad_s = grad_buffer((n, student.shape[-1]), student) if need_s else None
    grad_t = grad_buffer((n, t_values.shape[-1]), t_values) if need_t else None
    outs, temps = [], []
    for rows in row_chunks(n, whole):
        out = (grad_s[rows] if need_s else None, grad_t[rows] if need_t else None)
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


def target_loss_setup(student, teacher, target, ignore_index, sample_weight, reduction, ce_weight, return_parts,
                      process_group):
    """What DKD and ATS do before their row math (their own parameters checked by the caller): the shared
    checks and the group geometry, then for all rows the dtype, read rows, checked global targets and row
    weights. Returns a namespace: ``use_ce``, ``need_s``, ``need_t``, ``width``, ``offset``, ``vocab``,
    ``dtype``, ``n``, ``read``, ``weight``, ``s``, ``t`` (the logits as ``[N, V_local]``), ``lead``."""
    common_checks(student, teacher, reduction, target, ignore_index, sample_weight, True)
    v.check_ce(ce_weight, return_parts, target)
    rank, world, width = group_geometry(student, process_group)
    vocab = world * width
    dtype = compute_dtype(student, teacher)
    n = v.rows_of(student)
    read = read_rows(student, target, ignore_index, sample_weight)
    check_global_ids("target", target.reshape(n), read, vocab, 0)
    return SimpleNamespace(
        use_ce=ce_weight != 0 or return_parts,  # target is required here
        need_s=torch.is_grad_enabled() and student.requires_grad,
        need_t=torch.is_grad_enabled() and teacher.requires_grad,
        width=width, offset=rank * width, vocab=vocab, dtype=dtype, n=n, read=read,
        weight=row_weight(n, target, ignore_index, sample_weight, reduction, vocab, dtype, student.device),
        s=student.reshape(-1, width), t=teacher.reshape(-1, width), lead=student.shape[:-1])


def run_target_loss(body, c, student, teacher, process_group, reduction, return_parts):
    """DKD's and ATS's loss: ``body(rows, equal)`` over the row chunks, behind the stored-gradient node."""
    def compute():
        equal = check_group_shapes(c.n, c.width, process_group, student.device, (student.dtype, teacher.dtype),
                                   (c.need_s, c.need_t))
        return run_chunks(lambda r, _out: body(r, equal), c.n, student, teacher, c.need_s, c.need_t, reduction,
                          c.lead)

    loss, soft, hard = StoredGradLoss.apply(compute, student, teacher)
    return LossParts(loss, soft, hard) if return_parts else loss


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
