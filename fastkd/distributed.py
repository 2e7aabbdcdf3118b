"""Distillation losses over ``torch.distributed`` process groups (issue 12).

Two kinds of parallelism, one keyword (``process_group``):

* **Vocabulary parallel** (Megatron layout, tensor parallelism): every rank holds
  *all* rows, and the last dim of its logits is its contiguous vocabulary shard
  ``[r * V_local, (r + 1) * V_local)`` in rank order (equal shards: ``V = P *
  V_local``; Megatron pads the vocabulary to a multiple of P). ``target`` and
  top-k ids are global token ids, identical on every rank, as are
  ``sample_weight`` and the ``TopKTeacher`` log-probs. The loss equals the
  single-process loss over the concatenated vocabulary, on every rank, and each
  rank's gradient is the matching slice of the single-process gradient.
  Functions: ``kd_loss``, ``reverse_kl_loss``, ``jsd_loss``, ``skew_kl_loss``,
  ``tvd_loss`` (all with ``ce_weight``, ``return_parts`` and a ``TopKTeacher``),
  ``dkd_loss``, ``ats_loss`` (with ``ce_weight`` and ``return_parts``).
* **Data parallel** (``dist_loss``): rows are sharded (any count per rank, 0
  included), classes are not; the intra-class Pearson term is taken over the
  global batch (see ``dist_loss``).

How the vocabulary-parallel losses work. A row's loss needs whole-row
quantities (the log-sum-exps), so each rank computes them from its shard with
three all-reduces of per-row numbers, never of logits:

1. MAX of the raw per-row maxima (student, teacher, and the set a log-sum-exp is
   taken over: the non-target classes of DKD, the non-top-k ids of a tail bucket);
2. SUM of the sums of exponentials at those global shifts, of the logits at global
   ids (the target, the top-k ids: only the owning rank adds a non-zero), and of
   the cross-entropy's sum at T = 1;
3. SUM of the per-row partial divergences and of the partial sums of their
   derivatives (``sum G``, ``sum H`` of ``docs/design.md``), which the softmax
   chain rule needs (``dL/ds_c = (G_c - q_c sum G) / T``).

Elementwise derivatives ``G``, ``H`` come from autograd of the reference's own
row math (``fastkd._reference_divergence.soft_rows``) on the local shard, so the
special cases (zero-probability terms, ``log m`` in log space, ``beta`` 0 and 1)
are the reference's exactly; the forward KL (KD, ATS, JSD with beta = 0) uses
its closed form ``G = -p``, ``H = p (log p - log q)`` instead (no autograd pass).
A top-k teacher needs no third round: the bucket log-probs are all-reduced
(``K`` numbers per row), and every rank evaluates the bucket math identically. The gradients are formed in the forward pass and
stored in the input dtype (one ``[N, V_local]`` buffer per input that requires
grad); backward only scales them, in place (``docs/design.md``, "Autograd and
gradient memory"): a stored gradient is used once (``retain_graph`` raises).

Communication per call, in bytes (``comm_stats``; ``e`` = 4 for float32 math, 8
for float64): ``e * N * (r1 + r2 + r3 + K) + 32`` with ``r1 + r2 + r3`` the
number of per-row numbers (listed in ``PER_ROW_FLOATS``) and ``K``
the top-k width (0 for dense teachers); the 32 bytes are the shape check (four
int64: rows with the input dtypes and gradient flags, and shard width, ``_check_group_shapes``). It does not depend on
``V``. Calls: 1, then 2 or 3 per row chunk (below), at most 49 (4 on the shard kernels
with float32 logits).

Memory: the local math runs on row chunks (at most ``CHUNK_MAX`` = 16 chunks of at
least ``CHUNK_MIN_ROWS`` = 64 rows; the split depends on ``N`` and the dtypes only, so
every rank issues the same collectives: the shape check makes ranks agree on both), each chunk's
float32 temporaries (about 12 x ``[rows, V_local]`` for a dense teacher with both
gradients) freed before the next. The shard kernels on float32 logits make no
``[rows, V_local]`` temporaries (they write into the gradient buffers), so they take
all rows in one chunk: three collectives per call, not three per chunk.
What outlives the call: the stored gradients, in the input dtype. Measured peak (RSS high-water
mark) over the inputs, ``[1024, 32000]`` float32 in a group of one process: 2.08 x ``[N, V]``
for KD with both gradients (the two gradients), 1.00 x with the student's only, 2.0 x for a
top-32 teacher (PyTorch math: one gradient and the chunk temporaries).
Math in float32 (float64 for float64 inputs), whatever the input dtype.

Values are checked where reading them is free (CPU tensors; ``fastkd.set_value_checks``):
target and top-k ids in ``[0, V)`` (``V`` the global vocabulary), equal shard widths.
"""
import contextlib
from types import SimpleNamespace
from typing import Optional, Union

import torch
import torch.distributed as dist

from . import _reference_divergence as R
from . import _validation as v
from .topk import PAD_ID, TopKTeacher

__all__ = [
    "kd_loss", "reverse_kl_loss", "jsd_loss", "skew_kl_loss", "tvd_loss", "dkd_loss", "ats_loss",
    "dist_loss", "comm_stats", "reset_comm_stats", "count_comm", "PER_ROW_FLOATS",
]

Teacher = Union[torch.Tensor, TopKTeacher]

# Per-row numbers each collective carries (the benchmark prints the byte formula from this table).
PER_ROW_FLOATS = {
    "divergence, dense teacher": "MAX: 2 (max s, max t); SUM: 2 + 2 with CE (sum exp s, t; CE: sum exp s at T=1, "
                                 "s[target]); SUM: 2 + 1 with teacher grad (soft, sum G; sum H) + 3 with a "
                                 "tensor temperature's grad (sum (q - p) a, sum H b, sum p b); TVD's third round: "
                                 "1 + 5 with any grad (soft; the sign masses q_lt, q_gt, p_lt, p_gt, tie)",
    "divergence, top-k teacher": "MAX: 1 + 1 tail (max s; max s over non-ids); SUM: 1 + 1 tail + 2 with CE + K "
                                 "(sum exp s; sum exp over non-ids; CE; s[ids])",
    "dkd": "MAX: 4 (max s, t over all and non-target classes); SUM: 6 (their sums of exp, s[g], t[g]) + 2 with CE "
           "(sum exp s at T=1, s[target]); SUM: 2 + 1 with teacher grad",
    "ats": "MAX: 2 (max s, max t / tau); SUM: 2 (sums of exp) + 2 with CE (sum exp s at T=1, s[target]); "
           "SUM: 2 + 1 with teacher grad",
    "every call": "+ 4 int64 in one MAX call first (rows, -rows, width, -width: equal rows, dtypes, gradients "
                  "wanted and shards)",
}


# ----------------------------------------------------------------------------
# collectives, counted
# ----------------------------------------------------------------------------

class CommStats:
    """Bytes and calls of the collectives this module issued (this process)."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0

    def __repr__(self):
        return f"CommStats(bytes={self.bytes}, calls={self.calls})"


_STATS = CommStats()


def comm_stats() -> CommStats:
    """The running totals of this module's collectives (bytes sent per rank, calls)."""
    return _STATS


def reset_comm_stats() -> None:
    _STATS.bytes = 0
    _STATS.calls = 0


@contextlib.contextmanager
def count_comm():
    """``with count_comm() as c: ...``: ``c.bytes``, ``c.calls`` of the collectives inside."""
    before_bytes, before_calls = _STATS.bytes, _STATS.calls
    c = CommStats()
    try:
        yield c
    finally:
        c.bytes, c.calls = _STATS.bytes - before_bytes, _STATS.calls - before_calls


def _all_reduce(parts, op, group, in_place=False):
    """All-reduce a list of tensors as one flat buffer (one collective); returns the reduced parts.

    The only place this module communicates, so ``comm_stats`` counts everything.
    ``in_place``: one contiguous tensor, reduced where it is (no copy: ``grad_hidden``).
    """
    if in_place:
        (flat,) = parts
        if not flat.is_contiguous():
            raise ValueError("_all_reduce(in_place=True) takes one contiguous tensor")
        _STATS.bytes += flat.numel() * flat.element_size()
        _STATS.calls += 1
        dist.all_reduce(flat, op=op, group=group)
        return [flat]
    flat = torch.cat([p.reshape(-1) for p in parts])
    _STATS.bytes += flat.numel() * flat.element_size()
    _STATS.calls += 1
    dist.all_reduce(flat, op=op, group=group)
    out, start = [], 0
    for p in parts:
        out.append(flat[start:start + p.numel()].view(p.shape))
        start += p.numel()
    return out


class _AllReduceSum(torch.autograd.Function):
    """Differentiable SUM all-reduce for a loss every rank evaluates (data parallel, DIST).

    Backward is the SUM all-reduce of the incoming gradients: rank r then holds
    ``d(sum over ranks of the replicated loss) / d(its inputs)``, that is ``P`` times
    its share of the gradient of the global loss; DDP's gradient averaging (divide by
    P) turns it into exactly the single-process gradient.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce([x.clone()], dist.ReduceOp.SUM, group)[0]

    @staticmethod
    def backward(ctx, g):
        return _all_reduce([g.contiguous()], dist.ReduceOp.SUM, ctx.group)[0], None


# ----------------------------------------------------------------------------
# the stored-gradient autograd node shared by every vocabulary-parallel loss
# ----------------------------------------------------------------------------

class _StoredGradLoss(torch.autograd.Function):
    """Runs ``compute()`` (``_run_chunks``' six results) in forward; backward scales.

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

_MINUS_INF = float("-inf")
_WIDE = 1 << 40  # stand-in vocabulary width for structural checks before the global width is known


def _stand_in(student: torch.Tensor, width: int) -> torch.Tensor:
    """A tensor shaped like the student with a last dim of ``width``, no memory (for the shared checks)."""
    return student.new_zeros(()).expand(*student.shape[:-1], width)


def _group_geometry(student: torch.Tensor, process_group):
    if process_group is None:
        raise ValueError("process_group must be a torch.distributed process group (got None); "
                         "use the fastkd.* losses for one process")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    width = student.shape[-1]
    if width >= 1 << 24:
        raise ValueError(f"student_logits has a vocabulary shard of {width} columns; at most 2^24 are supported")
    return rank, world, width


def _safe_shift(m: torch.Tensor) -> torch.Tensor:
    """A row maximum usable as a shift: 0 where it is -inf (an empty or fully masked set)."""
    return torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)


def _masked_max(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    return (x if keep is None else x.masked_fill(~keep, _MINUS_INF)).amax(dim=1)


def _masked_sum_exp(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    e = x.exp()
    return (e if keep is None else e.masked_fill(~keep, 0.0)).sum(dim=1)


_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_CALL_SLOTS = 1024  # 4 codes per dtype, 2 per gradient flag: room for 3 dtypes and 3 flags (512)


def _check_group_shapes(rows: int, width: int, group, device, dtypes=(), grads=()) -> torch.Tensor:
    """One MAX all-reduce of (rows, -rows, width, -width), before any per-row collective.

    Vocabulary-parallel ranks must hold the same rows and equally wide shards, and make the same
    call: inputs of the same ``dtypes`` (they choose the row chunks: float32 logits on the shard
    kernels take one) and the same gradients wanted (``grads``: bools, which add per-row numbers).
    Otherwise the per-row collectives that follow would pair different rows, or differ in size and
    hang. Dtypes and flags ride in the row entries (``rows * 1024 + code``). Where values are
    readable (CPU tensors) a mismatch raises here, naming both counts. On a GPU nothing is read on
    the host: the returned 0-d bool (True when the shards are equal) NaNs the loss and gradients
    (``_poison``) where widths differ; unequal row counts, dtypes or flags cannot be detected there
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
    x = _all_reduce([x], dist.ReduceOp.MAX, group)[0]
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


def _check_global_ids(name: str, ids: torch.Tensor, read: Optional[torch.Tensor], vocab: int, lo: int) -> None:
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


def _common_checks(student, teacher, reduction, target, ignore_index, sample_weight, target_required):
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
    v.check_target(target, _stand_in(student, _WIDE), ignore_index, required=target_required)
    v.check_sample_weight(sample_weight, student)
    if sample_weight is not None and torch.is_grad_enabled() and sample_weight.requires_grad:
        raise ValueError("sample_weight requires grad, but the distributed losses treat it as a constant; "
                         "pass sample_weight.detach()")


def _ids_in_range(ids: torch.Tensor, read: Optional[torch.Tensor], vocab: int, lo: int) -> torch.Tensor:
    """bool [N]: the row's ids ([N, k]) are in [lo, vocab), or the row is not read (a device-side test)."""
    ok = ((ids >= lo) & (ids < vocab)).all(dim=1)
    return ok if read is None else ok | ~read


def _poison(weight: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """NaN row weights where ``ok`` is False: unequal shards, or a read row with an id outside [0, V).

    Where values are readable these raise first; on a GPU (no host reads) the row's loss and
    gradients are NaN instead of silently wrong, as the fused kernels do (``docs/design.md``).
    """
    return torch.where(ok, weight, torch.full((), float("nan"), dtype=weight.dtype, device=weight.device))


def _row_weight(n, target, ignore_index, sample_weight, reduction, vocab, dtype, device):
    """The contract's row weights; "mean" divides by counted rows * the *global* vocabulary."""
    valid = torch.ones(n, dtype=torch.bool, device=device) if target is None else target.reshape(n) != ignore_index
    weight = valid.to(dtype)
    if sample_weight is not None:
        weight = torch.where(valid, sample_weight.reshape(n).to(dtype), torch.zeros((), dtype=dtype, device=device))
    if reduction in ("batchmean", "mean"):
        counted = valid.sum().clamp_min(1).to(dtype)
        weight = weight / (counted * vocab if reduction == "mean" else counted)
    return weight


def _local_columns(ids: torch.Tensor, offset: int, width: int):
    """(owned bool, local column clamped into range) of global ``ids`` for the shard at ``offset``."""
    local = ids - offset
    own = (ids != PAD_ID) & (local >= 0) & (local < width)
    return own, local.clamp(0, width - 1)


def _gather_owned(x: torch.Tensor, own: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """x[row, col] where this shard owns the id, else 0 (the SUM all-reduce then gives the owner's value)."""
    return torch.where(own, x.gather(1, col), torch.zeros((), dtype=x.dtype, device=x.device))


# The local math runs on row chunks so that its [rows, V_local] float32 temporaries stay a fraction of
# [N, V_local]. The chunks depend on N alone: every rank issues the same collectives whatever its width.
CHUNK_MIN_ROWS = 64
CHUNK_MAX = 16


def _row_chunks(n: int, whole: bool = False):
    """The row slices the local math runs on; ``whole``: one slice of every row."""
    count = 1 if whole else max(1, min(CHUNK_MAX, -(-n // CHUNK_MIN_ROWS)))
    size = max(1, -(-n // count))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)] or [slice(0, 0)]


def _grad_buffer(shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient buffer in ``like``'s dtype and device. CPU: from the extension's cache of
    recently freed gradient buffers, as the fused ops' (``csrc/cpu/grad_buffers.cpp``): a fresh large
    buffer's first touch faults once per 4 KiB page (30 ms of a 100 ms KD step at [1024, 16000])."""
    if like.device.type == "cpu" and hasattr(torch.ops.fastkd, "grad_buffer"):
        return torch.ops.fastkd.grad_buffer(list(shape), like.dtype)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _run_chunks(body, n, student, t_values, need_s, need_t, reduction, lead, whole=False):
    """``body(rows, out)`` -> weighted (loss, soft, hard) rows and float gradient rows (and optionally the
    rows' temperature gradients [rows]), per chunk (``_row_chunks(n, whole)``).

    Gradients go into one buffer per input, in the input's dtype (the only [N, V_local]
    tensors that outlive the call). ``out``: the chunk's rows of those buffers where they are
    float32 (else None), which a body may write its gradients into and return (no copy).
    Returns (loss, soft, hard) reduced, the two gradients, and the [N] temperature gradients
    (None when ``body`` gives none).
    """
    grad_s = _grad_buffer((n, student.shape[-1]), student) if need_s else None
    grad_t = _grad_buffer((n, t_values.shape[-1]), t_values) if need_t else None
    outs, temps = [], []
    for rows in _row_chunks(n, whole):
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


def _forward_kl_and_grads(lp: torch.Tensor, lq: torch.Tensor, need_p: bool):
    """``_soft_and_grads`` of ``KL(p || q)`` in closed form (KD, ATS, JSD beta = 0): no autograd pass.

    Row sum of ``p (log p - log q)`` (0 where p == 0), ``G = -p`` and ``H = p (log p - log q)``
    (the derivatives w.r.t. log q and log p up to multiples of q and p, which the softmax
    projection ``G - q sum G`` removes, as it removes the ``+ p`` of the exact ``H``).
    """
    p = lp.exp()
    h = p * torch.where(p == 0, torch.zeros((), dtype=lp.dtype, device=lp.device), lp - lq)
    return h.sum(dim=1), p.neg_(), (h if need_p else None)


def _soft_and_grads(fn, lp: torch.Tensor, lq: torch.Tensor, need_p: bool):
    """Per-row ``fn(lp, lq)`` [N] and its elementwise derivatives w.r.t. ``lq`` (and ``lp``) by autograd."""
    with torch.enable_grad():
        lq = lq.detach().requires_grad_(True)
        lp = lp.detach().requires_grad_(need_p)
        rows = fn(lp, lq)
        grads = torch.autograd.grad(rows.sum(), [lq, lp] if need_p else [lq])
    return rows.detach(), grads[0], (grads[1] if need_p else None)


# ----------------------------------------------------------------------------
# vocabulary parallel: the divergences (dense and top-k teachers), with the cross-entropy
# ----------------------------------------------------------------------------

def _divergence(student, teacher: Teacher, temperature, reduction, target, ignore_index, sample_weight,
                ce_weight, return_parts, process_group, kind, soft_scale_t2=False, **params):
    _common_checks(student, teacher, reduction, target, ignore_index, sample_weight, ce_weight != 0)
    tensor_temp = isinstance(temperature, torch.Tensor)
    if tensor_temp:
        if not soft_scale_t2 or isinstance(teacher, TopKTeacher):
            raise TypeError("a tensor temperature (CTKD) is taken by the vocabulary-parallel kd_loss with dense "
                            "teacher logits only; pass temperature as a Python number")
        v.check_temperature_tensor(temperature, student)
    else:
        v.check_positive("temperature", temperature)
    v.check_number("ce_weight", ce_weight)
    if not isinstance(return_parts, bool):
        raise TypeError(f"return_parts must be a bool, got {type(return_parts).__name__}")
    rank, world, width = _group_geometry(student, process_group)
    topk = isinstance(teacher, TopKTeacher)
    t_in = teacher.logprobs if topk else teacher
    T = 1.0 if tensor_temp else float(temperature)  # a tensor temperature: per-row rows below instead
    soft_scale = T * T if soft_scale_t2 else 1.0
    use_ce = target is not None and (ce_weight != 0 or return_parts)
    need_temp = tensor_temp and torch.is_grad_enabled() and temperature.requires_grad
    need_s = torch.is_grad_enabled() and student.requires_grad
    need_t = torch.is_grad_enabled() and t_in.requires_grad
    lead = student.shape[:-1]

    dtype = R._compute_dtype(student, t_in)
    dev = student.device
    offset, vocab = rank * width, world * width
    s_all = student.reshape(-1, width)
    n_all = s_all.shape[0]
    t_all = t_in.reshape(n_all, t_in.shape[-1])  # (not -1: N may be 0)
    read_all = R._read_rows(student, target, ignore_index, sample_weight)
    if topk:  # ids in [-1, V) and distinct within each read row (CPU; free there)
        teacher.check_against(_stand_in(student, vocab), read_all)
    if use_ce:
        _check_global_ids("target", target.reshape(n_all), read_all, vocab, 0)
    weight_all = _row_weight(n_all, target, ignore_index, sample_weight, reduction, vocab, dtype, dev)
    ids_all = teacher.indices.reshape(n_all, teacher.indices.shape[-1]) if topk else None
    temp_all = None
    if tensor_temp:  # one value per row, in the compute dtype (its gradient is formed here, by hand)
        temp_all = temperature.detach().to(device=dev, dtype=dtype).reshape(-1)
        temp_all = temp_all.expand(n_all) if temp_all.numel() == 1 else temp_all

    c = SimpleNamespace(kind=kind, params=params, T=T, soft_scale=soft_scale, mode=teacher.mode if topk else None,
                        use_ce=use_ce, ce_weight=float(ce_weight), width=width, offset=offset, vocab=vocab,
                        need_s=need_s, need_t=need_t, need_temp=need_temp, dtype=dtype, group=process_group)
    tgt_all = target.reshape(n_all).to(torch.int64) if use_ce else None

    def compute():
        equal = _check_group_shapes(n_all, width, process_group, dev, (student.dtype, t_in.dtype),
                                    (need_s, need_t, need_temp))

        def body(r, out):
            return _divergence_rows(c, s_all[r], t_all[r], ids_all[r] if topk else None,
                                    tgt_all[r] if use_ce else None, None if read_all is None else read_all[r],
                                    weight_all[r], equal, None if temp_all is None else temp_all[r], out)

        return _run_chunks(body, n_all, student, t_in, need_s, need_t, reduction, lead,
                           whole=temp_all is None and _kernels_take_all_rows(c, s_all, t_all))

    loss, soft, hard = _StoredGradLoss.apply(compute, student, t_in, temperature if tensor_temp else None)
    return R.LossParts(loss, soft, hard) if return_parts else loss


# Which shard kernels run the dense-teacher divergences (float32 math): "auto" = the compiled CPU ops
# (csrc/cpu/divergence_shard.cpp) for CPU tensors, the Triton ones (fastkd/triton/divergence_shard.py) for
# CUDA tensors; "triton" = Triton for CPU tensors too (the tests, under TRITON_INTERPRET=1); "off" = the
# PyTorch math everywhere (the tests run it on CPU tensors too).
SHARD_KERNELS = "auto"


def shard_kernels(c, s: torch.Tensor):
    """The shard ops ``_divergence_rows`` runs on (a namespace with ``divergence_shard_stats``, ``_terms``,
    ``_grad``), or None for the PyTorch math: a top-k teacher, float64 math, ``SHARD_KERNELS = "off"``, or
    the kernels missing (no compiled CPU ops; no Triton)."""
    if SHARD_KERNELS == "off" or c.mode is not None or c.dtype != torch.float32:
        return None
    if s.device.type == "cuda" or SHARD_KERNELS == "triton":
        try:
            from .triton import divergence_shard as ops
        except ImportError:
            return None
        return ops
    if s.device.type != "cpu":
        return None
    try:
        from . import _C  # noqa: F401  (registers the ops)
    except ImportError:
        return None
    return torch.ops.fastkd if hasattr(torch.ops.fastkd, "divergence_shard_stats") else None


def _kernels_take_all_rows(c, s: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether the shard kernels run these rows with no ``[rows, V_local]`` temporaries (float32 logits
    and gradients: nothing to convert; a rare column-strided input is copied whole), so one row chunk,
    one round of collectives, is enough."""
    return s.dtype == t.dtype == torch.float32 and shard_kernels(c, s) is not None


def _gap_scale(z: torch.Tensor, m: torch.Tensor, m_all: torch.Tensor, inv_t: float) -> torch.Tensor:
    """A sum of exps relative to this shard's max ``m``, moved to the group's max ``m_all``: 0 stays 0 (an
    empty or all -inf shard, whose max is -inf), NaN stays NaN."""
    gap = torch.where(m == m_all, torch.zeros_like(m), m - m_all)
    return torch.where(z == 0, z, z * (gap * inv_t).exp())


def _divergence_rows_kernel(ops, c, s, t, tgt, read, weight, equal, out):
    """``_divergence_rows`` of a dense teacher on the shard kernels ``ops`` (the same collectives and results).

    (1) ``divergence_shard_stats``: this shard's raw maxima and sums of exps relative to them; MAX
    all-reduce of the maxima, the sums moved to the group's maxima (``_gap_scale``), SUM all-reduce
    (with the CE's sum at T = 1 and ``s[target]``). (2) ``divergence_shard_terms``: the shard's part
    of the loss, sum G, sum H (TVD: its sign masses), with G and H kept; SUM all-reduce.
    (3) ``divergence_shard_grad``: G, H made the gradients in place; the CE's one-hot is added here,
    on the owning rank. Forward KL's student gradient (``sum G`` known) comes from (2) directly
    when no teacher gradient is wanted: no pass (3).
    """
    dev, width, offset, group, T = s.device, c.width, c.offset, c.group, c.T
    f32 = torch.float32
    s, t = s.to(f32), t.to(f32)
    s = s if s.stride(-1) == 1 else s.contiguous()
    t = t if t.stride(-1) == 1 else t.contiguous()
    n = s.shape[0]
    read_f = torch.ones(n, dtype=f32, device=dev) if read is None else read.to(f32)
    use_ce = c.use_ce
    if use_ce and read is not None:
        tgt = torch.where(read, tgt, torch.zeros_like(tgt))

    stats = ops.divergence_shard_stats(s, t, T, use_ce, read_f)  # [n, 5]: m_s, z_s, m_t, z_t, z_s at T = 1
    m_s, z_s, m_t, z_t, z_1 = stats.unbind(1)
    big_s, big_t = _all_reduce([m_s, m_t], dist.ReduceOp.MAX, group)
    sums = [_gap_scale(z_s, m_s, big_s, 1.0 / T), _gap_scale(z_t, m_t, big_t, 1.0 / T)]
    if use_ce:
        t_own, t_col = _local_columns(tgt.unsqueeze(1), offset, width)
        sums += [_gap_scale(z_1, m_s, big_s, 1.0), _gather_owned(s, t_own, t_col).squeeze(1)]
    sums = _all_reduce(sums, dist.ReduceOp.SUM, group)
    l_s, l_t = sums[0].log(), sums[1].log()
    l_1 = sums[2].log() if use_ce else torch.zeros_like(l_s)
    # a NaN logit (or an all -inf row) in either net: the kernels' zero-probability selects may hide it
    # (skew KL of an all-NaN student row came out finite), the whole-vocabulary lse does not
    nan_rows = ~((l_s > float("-inf")) & (l_t > float("-inf")))
    nan_rows = nan_rows if read is None else nan_rows & read

    if c.kind == "tvd":
        code, a, b, w_p, w_q = R.KIND_CODES["tvd"], 0.0, 0.0, 0.0, 0.0
    else:
        code, (a, b, w_p, w_q) = R.KIND_CODES["kl_family"], R.divergence_coefficients(c.kind, **c.params)
    row_stats = torch.stack([big_s, l_s, big_t, l_t, l_1], dim=1)
    tvd = c.kind == "tvd"
    zeros = torch.zeros(n, dtype=f32, device=dev)
    ok = equal
    if use_ce:
        ok = ok & _ids_in_range(tgt.unsqueeze(1), read, c.vocab, 0)
    weight = _poison(weight, ok)
    coef = weight * (c.soft_scale / T)
    ce = weight * c.ce_weight if use_ce and c.ce_weight != 0 and c.need_s else zeros
    # forward KL (w_p = 0): sum G = -(a + b) is known, so the terms pass writes the student's gradient and
    # the grad pass is skipped (with a teacher gradient it runs anyway, for both)
    direct_s = c.need_s and not c.need_t and not tvd and w_p == 0.0

    def buffer(want, given):  # the caller's float32 gradient rows, else a new one ([0]: not wanted)
        if not want:
            return torch.empty(0, dtype=f32, device=dev)
        return given if given is not None else torch.empty(s.shape, dtype=f32, device=dev)

    g, h = buffer(c.need_s, out[0]), buffer(c.need_t, out[1])
    direct = torch.stack([coef, ce], dim=1) if direct_s else torch.empty(0, dtype=f32, device=dev)
    part = ops.divergence_shard_terms(s, t, row_stats, T, code, a, b, w_p, w_q, read_f, direct, g, h)
    if tvd:  # the gradients come from the sign masses (q_lt, q_gt, p_lt, p_gt, tie), not from sum G, sum H
        red = _all_reduce([part[:, 0]] + ([part[:, 3:]] if c.need_s or c.need_t else []), dist.ReduceOp.SUM, group)
        sum_g = sum_h = zeros
        # (a NaN in one net: its sign comparisons are all False, so the other net's gradient is 0 there, as
        # in the single-process losses and the reference)
        masses = red[1] if len(red) > 1 else torch.zeros((n, 5), dtype=f32, device=dev)
    else:
        red = _all_reduce([part[:, 0], part[:, 1]] + ([part[:, 2]] if c.need_t else []), dist.ReduceOp.SUM, group)
        sum_g, sum_h = red[1], (red[2] if c.need_t else zeros)
        masses = torch.zeros((n, 5), dtype=f32, device=dev)
    soft = red[0] * c.soft_scale
    soft = torch.where(nan_rows, torch.full_like(soft, float("nan")), soft)
    hard = torch.zeros_like(soft)
    if use_ce:
        hard = (big_s - sums[3]) + l_1  # lse(s) - s[target], T = 1
        if read is not None:  # an unread row's statistics are empty (-inf): its CE is 0, not -inf * 0
            hard = torch.where(read, hard, torch.zeros_like(hard))
    rows = soft + c.ce_weight * hard if c.ce_weight != 0 else soft
    if (c.need_s and not direct_s) or c.need_t:
        row_coef = torch.cat([torch.stack([sum_g, sum_h, coef, coef, ce], dim=1), masses], dim=1)
        ops.divergence_shard_grad(s, t, row_stats, T, code, row_coef, read_f, g, h)
    if c.need_s and use_ce and c.ce_weight != 0:
        g.scatter_add_(1, t_col, torch.where(t_own, -ce.unsqueeze(1), torch.zeros((), dtype=f32, device=dev)))
    return rows * weight, soft * weight, hard * weight, (g if c.need_s else None), (h if c.need_t else None), None


def _tvd_factor(x, y, x_lt, x_gt, tie):
    """csrc/divergence_math.h's div_tvd_factor: the TVD gradient's bracket (times 0.5 x), per row sums [n, 1]."""
    return torch.where(x > y, tie + 2.0 * x_lt, torch.where(x < y, -(tie + 2.0 * x_gt), x_lt - x_gt))


def _tvd_rows(lp, lq, need_s, need_t, group):
    """TVD of the dense rows (log-probs over the shard): the row sums and d soft / d(s / T), d soft / d(t / T).

    Third round: the loss part and the five sign masses (q where q < p, q > p; p where p < q, p > q;
    p where p == q) instead of sum G, sum H: the form ``G - q sum G`` cancels on a peaked row's largest
    class (1e-5 relative in float32), the sign-mass bracket does not (as the CPU op, divergence_math.h).
    """
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    parts = [(0.5 * (p - q).abs()).sum(dim=1)]
    if need_s or need_t:
        parts.append(torch.stack([torch.where(q < p, q, zero).sum(dim=1), torch.where(q > p, q, zero).sum(dim=1),
                                  torch.where(p < q, p, zero).sum(dim=1), torch.where(p > q, p, zero).sum(dim=1),
                                  torch.where(p == q, p, zero).sum(dim=1)], dim=1))
    red = _all_reduce(parts, dist.ReduceOp.SUM, group)
    grad_a = grad_b = None
    if need_s or need_t:
        # (a NaN in one net: its sign comparisons are all False, so the other net's gradient is 0 there, as
        # in the single-process losses and the reference)
        q_lt, q_gt, p_lt, p_gt, tie = red[1].unsqueeze(2).unbind(1)
        if need_s:
            grad_a = 0.5 * q * _tvd_factor(q, p, q_lt, q_gt, tie)
        if need_t:
            grad_b = 0.5 * p * _tvd_factor(p, q, p_lt, p_gt, tie)
    return red[0], grad_a, grad_b


def _divergence_rows(c, s, t, ids, tgt, read, weight, equal, temp=None, out=(None, None)):
    """One chunk of rows of a vocabulary-parallel divergence (and its cross-entropy): three collectives.

    ``s`` [n, V_local] student logits and ``t`` (teacher logits [n, V_local] or top-k log-probs
    [n, K]) in any float dtype; ``ids`` [n, K] global top-k ids or None; ``tgt`` [n] int64 global
    targets (None without the CE); ``read`` bool [n] (None: every row) and ``weight`` [n] the
    contract's row weights; ``equal`` the 0-d bool of ``_check_group_shapes``; ``out``: float32
    buffers the shard kernels may write the gradients into (``_run_chunks``). ``c``: the call's
    constants (built in ``_divergence``, ``fused_linear_kd_loss``'s sharded row op). Returns the
    row-weighted (loss, soft, hard) [n] and the weighted gradients w.r.t. ``s`` and ``t`` (None
    where not requested), in ``c.dtype``, and the weighted ``d loss_row / d temp_row`` [n] when
    ``temp`` (the rows' temperatures, [n]: ``kd_loss`` with a tensor temperature, so forward KL
    with ``T^2``, dense teacher) is given and ``c.need_temp``, else None.
    """
    ops = shard_kernels(c, s) if temp is None else None
    if ops is not None:
        return _divergence_rows_kernel(ops, c, s, t, tgt, read, weight, equal, out)
    dtype, dev, width, offset, vocab = c.dtype, s.device, c.width, c.offset, c.vocab
    # T broadcasts over a row ([n, 1] for a tensor temperature); the row scales are [n] or floats
    t_rows = c.T if temp is None else temp
    T = c.T if temp is None else temp.unsqueeze(1)
    scale_rows = c.soft_scale if temp is None else temp * temp
    need_temp = temp is not None and c.need_temp
    topk, use_ce, need_s, need_t, process_group = c.mode is not None, c.use_ce, c.need_s, c.need_t, c.group
    kind, params, ce_weight = c.kind, c.params, c.ce_weight
    s, t = s.to(dtype), t.to(dtype)
    if read is not None:  # skipped rows are never read: zeros in their place, before any arithmetic
        keep = read.unsqueeze(1)
        s = torch.where(keep, s, torch.zeros((), dtype=dtype, device=dev))
        t = torch.where(keep, t, torch.zeros((), dtype=dtype, device=dev))
        if topk:
            ids = torch.where(keep, ids, torch.full((), PAD_ID, dtype=ids.dtype, device=dev))
        if use_ce:
            tgt = torch.where(read, tgt, torch.zeros_like(tgt))
    tail = c.mode == "tail"
    if topk:
        pad = ids == PAD_ID
        own, col = _local_columns(ids, offset, width)
        # count of owned ids per local column (scatter_add: unowned slots add 0 at a clamped column)
        members = torch.zeros(s.shape, dtype=torch.int32, device=dev)
        members.scatter_add_(1, col, own.to(torch.int32))
        non_member = members == 0
        del members

    # 1. MAX of the raw row maxima (the shifts)
    maxima = [s.amax(dim=1)]
    if not topk:
        maxima.append(t.amax(dim=1))
    if tail:
        maxima.append(_masked_max(s, non_member))
    maxima = _all_reduce(maxima, dist.ReduceOp.MAX, process_group)
    m_s = _safe_shift(maxima[0]).unsqueeze(1)
    a = (s - m_s) / T  # student logits / T, shifted in raw units first (precision at large offsets)

    # 2. SUM of the sums of exponentials and of the logits at global ids
    sums = [a.exp().sum(dim=1)]
    if not topk:
        m_t = _safe_shift(maxima[1]).unsqueeze(1)
        b = (t - m_t) / T
        sums.append(b.exp().sum(dim=1))
    if tail:
        m_tail = _safe_shift(maxima[-1]).unsqueeze(1)
        a_tail = (s - m_tail) / T
        sums.append(_masked_sum_exp(a_tail, non_member))
    if use_ce:
        t_own, t_col = _local_columns(tgt.unsqueeze(1), offset, width)
        sums.append((s - m_s).exp().sum(dim=1))
        sums.append(_gather_owned(s, t_own, t_col).squeeze(1))
    if topk:
        sums.append(_gather_owned(a, own, col))
    sums = _all_reduce(sums, dist.ReduceOp.SUM, process_group)
    log_z = sums[0].log().unsqueeze(1)
    lq = a - log_z  # log q over the shard (q = softmax(s / T) over the whole vocabulary)

    grad_a = grad_b = grad_temp = None
    if not topk and kind == "tvd":
        soft, grad_a, grad_b = _tvd_rows(b - sums[1].log().unsqueeze(1), lq, need_s, need_t, process_group)
    elif not topk:
        lp = b - sums[1].log().unsqueeze(1)
        if R.divergence_coefficients(kind, **params) == (1.0, 0.0, 0.0, 1.0):
            part, g, h = _forward_kl_and_grads(lp, lq, need_t or need_temp)  # KD's forward KL: closed form
        else:
            part, g, h = _soft_and_grads(lambda lp_, lq_: R.soft_rows(lp_, lq_, kind, **params), lp, lq,
                                         need_t)
        # 3. SUM of the partial divergences and of sum G, sum H
        red = [part, g.sum(dim=1)] + ([h.sum(dim=1)] if need_t else [])
        if need_temp:
            # d KL / d T = -(S1 + S2 - KL S3) / T, S1 = sum (q - p) a, S2 = sum H b, S3 = sum p b (a = s / T,
            # b = t / T; d KL / d a = q - p, d KL / d b = H - p KL; the shifts cancel: both sum to 0)
            # a zero probability adds 0 (as in the loss): its logit may be -inf, and 0 * -inf is NaN
            p, q, zero = -g, lq.exp(), torch.zeros((), dtype=dtype, device=dev)

            def where_positive(w, x):  # row sums of x where the probability w > 0
                return torch.where(w > 0, x, zero).sum(dim=1)

            red += [where_positive(q, q * a) - where_positive(p, p * a), where_positive(p, h * b),
                    where_positive(p, p * b)]
        red = _all_reduce(red, dist.ReduceOp.SUM, process_group)
        if need_temp:
            s1, s2, s3 = red[-3:]
            grad_temp = t_rows * (2.0 * red[0] - s1 - s2 + red[0] * s3)  # d (T^2 KL) / d T
        soft = red[0]
        if need_s:
            grad_a = g - lq.exp() * red[1].unsqueeze(1)
        if need_t:
            grad_b = h - lp.exp() * red[2].unsqueeze(1)
    else:
        lq_tail = None
        if tail:
            # log q_tail = lse(s / T over the non-ids) - lse(s / T), each sum at its own shift: exact
            # however small the tail (never 1 - sum_k q_k); a row of padding only: the whole row, 0
            lq_tail = (m_tail - m_s) / T + sums[1].log().unsqueeze(1) - log_z
            lq_tail = torch.where(pad.all(dim=1, keepdim=True), torch.zeros((), dtype=dtype, device=dev), lq_tail)
        soft, grad_a, grad_b = _topk_buckets(c.mode, kind, params, sums, a, lq, t, pad, own, col,
                                             non_member if tail else None, a_tail if tail else None,
                                             lq_tail, need_s, need_t)
    soft = soft * scale_rows
    hard = torch.zeros_like(soft)
    if use_ce:
        z1, s_target = sums[-3 if topk else -2], sums[-2 if topk else -1]
        hard = (m_s.squeeze(1) - s_target) + z1.log()  # lse(s) - s[target], T = 1
    ok = equal
    if topk:
        ok = ok & _ids_in_range(ids, read, vocab, PAD_ID)
    if use_ce:
        ok = ok & _ids_in_range(tgt.unsqueeze(1), read, vocab, 0)
    weight = _poison(weight, ok)
    rows = soft + ce_weight * hard if ce_weight != 0 else soft

    grad_s = grad_t = None
    if need_s:
        gs = grad_a * (weight * (scale_rows / t_rows)).unsqueeze(1)
        if use_ce and ce_weight != 0:
            wce = (weight * ce_weight).unsqueeze(1)
            gs = gs + wce * ((s - m_s).exp() / z1.unsqueeze(1))  # softmax(s) at T = 1
            gs.scatter_add_(1, t_col, torch.where(t_own, -wce, torch.zeros((), dtype=dtype, device=dev)))
        grad_s = gs
    if need_t:
        # dense teacher: d/dt = (H - p sum H) / T; top-k log-probs: no 1/T (they are not divided by T)
        scale = weight * (scale_rows if topk else scale_rows / t_rows)
        grad_t = grad_b * scale.unsqueeze(1)
    if grad_temp is not None:
        grad_temp = grad_temp * weight
    return rows * weight, soft * weight, hard * weight, grad_s, grad_t, grad_temp


def _topk_buckets(mode, kind, params, sums, a, lq, logprobs, pad, own, col, non_member, a_tail, lq_tail,
                  need_s, need_t):
    """Divergence over the top-k buckets (replicated, [N, K(+1)]) and the local gradient slices.

    Every rank holds the same all-reduced bucket log-probs, so the bucket math (the
    reference's ``topk_log_probs`` with the whole-vocabulary sums supplied) runs
    identically everywhere and needs no third collective. Returns
    (soft [N], d soft / d a [N, V_local], d soft / d logprobs [N, K]).
    """
    dtype = a.dtype
    minus_inf = torch.full((), _MINUS_INF, dtype=dtype, device=a.device)
    log_z = sums[0].unsqueeze(1).log()
    a_ids = sums[-1]  # [N, K]: a (= s / T shifted) at the ids, from their owners
    only_pad = pad.all(dim=1, keepdim=True)
    with torch.enable_grad():
        x_ids = a_ids.detach().requires_grad_(need_s)  # leaf: log q_k + log Z (tail) or before renormalising
        lp_in = logprobs.detach().requires_grad_(need_t)
        log_p = torch.where(pad, minus_inf, lp_in)
        if mode == "renormalize":
            log_p, log_q = R._log_normalize(log_p), R._log_normalize(torch.where(pad, minus_inf, x_ids))
            leaves = [x_ids]
        else:
            log_q = torch.where(pad, minus_inf, x_ids - log_z)
            lse_p = R._logsumexp_near_zero(log_p)
            full = lse_p >= 0
            log_p_tail = torch.where(full, minus_inf, R._log1mexp(torch.where(full, torch.full_like(lse_p, -1.0), lse_p)))
            # the tail's log q comes from the whole-vocabulary sums (a leaf here; chained in below)
            lq_tail = lq_tail.detach().requires_grad_(need_s)
            log_p = torch.cat([log_p, log_p_tail], dim=1)
            log_q = torch.cat([log_q, lq_tail], dim=1)
            leaves = [x_ids, lq_tail]
        rows = R.soft_rows(log_p, log_q, kind, **params)
        wanted = ([*leaves] if need_s else []) + ([lp_in] if need_t else [])
        grads = list(torch.autograd.grad(rows.sum(), wanted, allow_unused=True)) if wanted else []
    rows = rows.detach()
    grad_a = grad_lp = None
    if need_s:
        g_ids = grads[0] if grads[0] is not None else torch.zeros_like(a_ids)
        g_ids = torch.where(pad, torch.zeros((), dtype=dtype, device=a.device), g_ids)
        if mode == "renormalize":
            grad_a = torch.zeros_like(a)  # exactly 0 outside the ids
        else:
            g_tail = torch.where(only_pad, torch.zeros((), dtype=dtype, device=a.device), grads[1])
            # d/da_c: member c = id_k: g_k - q_c sum g; non-member: softmax_tail(c) g_tail - q_c sum g
            total = g_ids.sum(dim=1, keepdim=True) + g_tail
            tail_log_z = sums[1].unsqueeze(1).log()
            grad_a = torch.where(non_member, (a_tail - tail_log_z).exp() * g_tail,
                                 torch.zeros((), dtype=dtype, device=a.device)) - lq.exp() * total
        grad_a.scatter_add_(1, col, torch.where(own, g_ids, torch.zeros((), dtype=dtype, device=a.device)))
    if need_t:
        grad_lp = grads[-1]
        grad_lp = torch.where(pad, torch.zeros((), dtype=dtype, device=a.device), grad_lp)
    return rows, grad_a, grad_lp


# ----------------------------------------------------------------------------
# public vocabulary-parallel losses (signatures as fastkd.*, plus process_group)
# ----------------------------------------------------------------------------

def kd_loss(student_logits, teacher_logits: Teacher, temperature: float = 4.0, *, process_group,
            reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
            return_parts=False):
    """``fastkd.kd_loss`` over a vocabulary-sharded process group: ``T^2 KL(p || q)``.

    ``temperature``: a number, or (dense teacher logits) a tensor of one value or one per row
    that receives a gradient (CTKD): ``d (T^2 KL) / dT = T (2 KL - S1 - S2 + KL S3)`` with the
    row sums ``S1 = sum (q - p) a``, ``S2 = sum p (log p - log q) b``, ``S3 = sum p b``
    (``a = s / T``, ``b = t / T``), all-reduced with the third round's other sums.
    """
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "forward_kl", soft_scale_t2=True)


def reverse_kl_loss(student_logits, teacher_logits: Teacher, *, process_group, temperature=1.0,
                    reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
                    return_parts=False):
    """``fastkd.reverse_kl_loss`` over a vocabulary-sharded process group."""
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "reverse_kl")


def jsd_loss(student_logits, teacher_logits: Teacher, *, process_group, beta=0.5, temperature=1.0,
             reduction="batchmean", target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0,
             return_parts=False):
    """``fastkd.jsd_loss`` over a vocabulary-sharded process group."""
    R._check_unit("beta", beta)
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "jsd", beta=beta)


def skew_kl_loss(student_logits, teacher_logits: Teacher, *, process_group, skew=0.1, reverse=False,
                 temperature=1.0, reduction="batchmean", target=None, ignore_index=-100, sample_weight=None,
                 ce_weight=0.0, return_parts=False):
    """``fastkd.skew_kl_loss`` over a vocabulary-sharded process group."""
    R.check_skew_args(skew, reverse)
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "skew_kl", skew=skew, reverse=reverse)


def tvd_loss(student_logits, teacher_logits: Teacher, *, process_group, temperature=1.0, reduction="batchmean",
             target=None, ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    """``fastkd.tvd_loss`` over a vocabulary-sharded process group."""
    return _divergence(student_logits, teacher_logits, temperature, reduction, target, ignore_index,
                       sample_weight, ce_weight, return_parts, process_group, "tvd")


# ----------------------------------------------------------------------------
# vocabulary parallel: the row op of fused_linear_kd_loss(process_group=)
# ----------------------------------------------------------------------------

# fused_linear_kd_loss's divergence names -> (kind, params) of _divergence_rows
_FUSED_LINEAR_KINDS = {
    "kl": ("forward_kl", {}),
    "reverse_kl": ("reverse_kl", {}),
    "jsd": ("jsd", None),  # params: beta
    "skew_kl": ("skew_kl", None),  # params: skew, reverse=False
    "skew_reverse_kl": ("skew_kl", None),  # params: skew, reverse=True
    "tvd": ("tvd", {}),
}


def fused_linear_row_op(divergence: str, beta: float, skew: float, topk_mode: Optional[str], use_ce: bool,
                        process_group, width: int, equal: torch.Tensor):
    """``fastkd.fused_linear_kd_loss``'s row op over a vocabulary-sharded group.

    Returns ``op`` with ``divergence_fwd``'s signature (``docs/design.md``), run on one chunk
    of this rank's logits ``[rows, V_local]``: the same loss, soft, hard (global over the
    group, replicated) and this rank's slice of the gradient w.r.t. the chunk's logits, from
    ``_divergence_rows`` (three collectives per row chunk of the chunk). The divergence and its
    parameters are bound here; the numeric ``kind``/``a``/``b``/``w_p``/``w_q`` codes the fused
    loop passes are ignored. ``equal``: ``_check_group_shapes`` of the whole call. Rows with
    weight 0 are not read (the fused ops' skipped-row rule).
    """
    kind, params = _FUSED_LINEAR_KINDS[divergence]
    if kind == "jsd":
        params = {"beta": beta}
    elif kind == "skew_kl":
        params = {"skew": skew, "reverse": divergence == "skew_reverse_kl"}
    rank = dist.get_rank(process_group)
    world = dist.get_world_size(process_group)

    def op(student, teacher, topk_ids, target, row_weight, temperature, _kind, _a, _b, _w_p, _w_q, soft_scale,
           ce_weight, _topk_mode, reduce, grad_student, grad_teacher):
        if grad_teacher:
            raise ValueError("fused_linear_kd_loss: the teacher is a constant (no teacher gradient)")
        n = student.shape[0]
        c = SimpleNamespace(kind=kind, params=params, T=float(temperature), soft_scale=float(soft_scale),
                            mode=topk_mode, use_ce=use_ce, ce_weight=float(ce_weight), width=width,
                            offset=rank * width, vocab=world * width, need_s=grad_student, need_t=False,
                            need_temp=False,
                            dtype=student.dtype, group=process_group)
        read = row_weight != 0

        def body(r, out):
            return _divergence_rows(c, student[r], teacher[r], topk_ids[r] if topk_mode is not None else None,
                                    target[r] if use_ce else None, read[r], row_weight[r], equal, out=out)

        loss, soft, hard, grad_s, *_ = _run_chunks(body, n, student, teacher, grad_student, False,
                                                   "sum" if reduce else "none", (n,),
                                                   whole=_kernels_take_all_rows(c, student, teacher))
        return loss, soft, hard, grad_s, None

    return op


# ----------------------------------------------------------------------------
# vocabulary parallel: DKD and ATS (the target column lives on one rank)
# ----------------------------------------------------------------------------

def _target_column(tgt: torch.Tensor, offset: int, width: int, shape, device):
    """(owned [N, 1], local column [N, 1], one-hot bool [N, V_local] of the target in this shard)."""
    own, col = _local_columns(tgt.unsqueeze(1), offset, width)
    is_g = torch.zeros(shape, dtype=torch.bool, device=device)
    is_g.scatter_(1, col, own)  # one index per row: no two writes to a cell
    return own, col, is_g


def _rows_and_target(s_all, t_all, target, read_all, rows, dtype):
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


def _target_prologue(student, teacher, target, ignore_index, sample_weight, reduction, vocab):
    """What DKD and ATS compute once for all rows: dtype, read rows, checked targets, row weights."""
    dtype = R._compute_dtype(student, teacher)
    n_all = v.rows_of(student)
    read_all = R._read_rows(student, target, ignore_index, sample_weight)
    _check_global_ids("target", target.reshape(n_all), read_all, vocab, 0)
    weight_all = _row_weight(n_all, target, ignore_index, sample_weight, reduction, vocab, dtype, student.device)
    width = student.shape[-1]
    return dtype, n_all, read_all, weight_all, student.reshape(-1, width), teacher.reshape(-1, width)


def _check_ce_args(ce_weight, return_parts) -> None:
    v.check_number("ce_weight", ce_weight)
    if not isinstance(return_parts, bool):
        raise TypeError(f"return_parts must be a bool, got {type(return_parts).__name__}")


def _ce_sums(s: torch.Tensor, m_s: torch.Tensor, own: torch.Tensor, col: torch.Tensor):
    """The cross-entropy's two numbers per row for the SUM round (T = 1, raw student logits):
    ``sum exp(s - m_s)`` at the global raw maximum ``m_s`` [N, 1], and ``s[target]`` (its owner adds it)."""
    return [(s - m_s).exp().sum(dim=1), _gather_owned(s, own, col).squeeze(1)]


def _ce_rows(m_s: torch.Tensor, z1: torch.Tensor, s_target: torch.Tensor) -> torch.Tensor:
    """``lse(s) - s[target]`` per row from the all-reduced ``_ce_sums``."""
    return (m_s.squeeze(1) - s_target) + z1.log()


def _add_ce_grad(grad, s, m_s, z1, own, col, wce) -> None:
    """``grad += wce * (softmax(s) - onehot(target))`` in place; the one-hot only on the target's owner."""
    grad.add_(wce * ((s - m_s).exp() / z1.unsqueeze(1)))
    grad.scatter_add_(1, col, torch.where(own, -wce, torch.zeros((), dtype=grad.dtype, device=grad.device)))


def dkd_loss(student_logits, teacher_logits, target, *, process_group, alpha=1.0, beta=8.0, temperature=4.0,
             reduction="batchmean", ignore_index=-100, sample_weight=None, ce_weight=0.0, return_parts=False):
    """``fastkd.dkd_loss`` over a vocabulary-sharded process group (``target``: global class ids).

    Per side (student, teacher; ``x = logits / T``, ``g`` the target) the row needs
    ``lse(x)``, ``lse(x over c != g)`` and ``x[g]``: the first two from MAX/SUM
    all-reduces at their own shifts, ``x[g]`` from its owner. TCKD is then a
    replicated [N, 2] computation; NCKD is summed over the shards. ``ce_weight`` /
    ``return_parts``: as ``fastkd.dkd_loss`` (CE at T = 1 on the raw student logits;
    its two per-row numbers ride in the SUM round, no extra collective).
    """
    student, teacher = student_logits, teacher_logits
    _common_checks(student, teacher, reduction, target, ignore_index, sample_weight, True)
    v.check_number("alpha", alpha)
    v.check_number("beta", beta)
    v.check_positive("temperature", temperature)
    _check_ce_args(ce_weight, return_parts)
    use_ce = ce_weight != 0 or return_parts  # target is required here
    rank, world, width = _group_geometry(student, process_group)
    if world * width < 2:
        raise ValueError(f"student_logits must have at least 2 classes over the process group for DKD, "
                         f"got {world * width}")
    T = float(temperature)
    need_s = torch.is_grad_enabled() and student.requires_grad
    need_t = torch.is_grad_enabled() and teacher.requires_grad
    lead = student.shape[:-1]

    offset, vocab = rank * width, world * width
    dtype, n_all, read_all, weight_all, s_all, t_all = _target_prologue(
        student, teacher, target, ignore_index, sample_weight, reduction, vocab)

    def body(r, equal):
        s, t, tgt, read = _rows_and_target(s_all, t_all, target, read_all, r, dtype)
        dev = s.device
        own, col, is_g = _target_column(tgt, offset, width, s.shape, dev)
        other = ~is_g
        maxima = _all_reduce([s.amax(dim=1), _masked_max(s, other), t.amax(dim=1), _masked_max(t, other)],
                             dist.ReduceOp.MAX, process_group)
        sides = []
        sums = []
        for x, m_all, m_oth in ((s, maxima[0], maxima[1]), (t, maxima[2], maxima[3])):
            m_all, m_oth = _safe_shift(m_all).unsqueeze(1), _safe_shift(m_oth).unsqueeze(1)
            a = (x - m_all) / T
            o = ((x - m_oth) / T).masked_fill(is_g, _MINUS_INF)
            sides.append((a, o, m_all, m_oth))
            sums += [a.exp().sum(dim=1), o.exp().sum(dim=1), _gather_owned(a, own, col).squeeze(1)]
        m_s = sides[0][2]  # the student's global raw maximum (safe), [N, 1]: the CE's shift
        if use_ce:
            sums += _ce_sums(s, m_s, own, col)
        sums = _all_reduce(sums, dist.ReduceOp.SUM, process_group)
        logs = []  # per side: (log p[g] [N], log(1 - p[g]) [N], log softmax over c != g [N, V_local], P, Q)
        for i, (a, o, m_all, m_oth) in enumerate(sides):
            z_all, z_oth, a_g = sums[3 * i], sums[3 * i + 1], sums[3 * i + 2]
            lz_all, lz_oth = z_all.log(), z_oth.log()
            log_pg = a_g - lz_all
            log_rest = (m_oth - m_all).squeeze(1) / T + lz_oth - lz_all  # lse(x over c != g) - lse(x)
            empty = torch.isneginf(lz_oth).unsqueeze(1)  # no mass outside g: NCKD 0 (not -inf - -inf)
            log_other = torch.where(empty, o, o - lz_oth.unsqueeze(1))
            logs.append((log_pg, log_rest, log_other, a - lz_all.unsqueeze(1)))
        (pg_s, rest_s, oth_s, lq_all), (pg_t, rest_t, oth_t, lp_all) = logs
        scale = T * T
        with torch.enable_grad():  # TCKD, replicated: derivatives w.r.t. the four per-row log-probs
            leaves = [x.detach().requires_grad_(True) for x in (pg_s, rest_s, pg_t, rest_t)]
            tckd = scale * alpha * R._kl_terms(torch.stack(leaves[2:], dim=1),
                                               torch.stack(leaves[:2], dim=1)).sum(dim=1)
            g_tckd = torch.autograd.grad(tckd.sum(), leaves)
        tckd = tckd.detach()
        nckd_part, g_l, h_l = _soft_and_grads(
            lambda lp_, lq_: scale * beta * R._kl_terms(lp_, lq_).sum(dim=1), oth_t, oth_s, need_t)
        red = _all_reduce([nckd_part, g_l.sum(dim=1)] + ([h_l.sum(dim=1)] if need_t else []),
                          dist.ReduceOp.SUM, process_group)
        soft = tckd + red[0]
        hard = _ce_rows(m_s, sums[6], sums[7]) if use_ce else torch.zeros_like(soft)
        rows = soft + ce_weight * hard if ce_weight != 0 else soft
        weight = _poison(weight_all[r], equal & _ids_in_range(tgt.unsqueeze(1), read, vocab, 0))

        def chain(g_pg, g_rest, g_local, sum_local, log_all, log_other):
            # d/dx_c = -(gA + gB) P_c + [c = g] gA + Q_c (gB - sum gL) + gL_c   (x = logits / T)
            p_all, q_oth = log_all.exp(), log_other.exp()
            grad = g_local - (g_pg + g_rest).unsqueeze(1) * p_all + q_oth * (g_rest - sum_local).unsqueeze(1)
            grad.scatter_add_(1, col, torch.where(own, g_pg.unsqueeze(1), torch.zeros((), dtype=dtype, device=dev)))
            return grad * (weight / T).unsqueeze(1)

        grad_s = chain(g_tckd[0], g_tckd[1], g_l, red[1], lq_all, oth_s) if need_s else None
        if need_s and ce_weight != 0:
            _add_ce_grad(grad_s, s, m_s, sums[6], own, col, (weight * ce_weight).unsqueeze(1))
        grad_t = chain(g_tckd[2], g_tckd[3], h_l, red[2], lp_all, oth_t) if need_t else None
        return rows * weight, soft * weight, hard * weight, grad_s, grad_t

    def compute():
        equal = _check_group_shapes(n_all, width, process_group, student.device, (student.dtype, teacher.dtype),
                                    (need_s, need_t))
        return _run_chunks(lambda r, _out: body(r, equal), n_all, student, teacher, need_s, need_t, reduction,
                           lead)

    loss, soft, hard = _StoredGradLoss.apply(compute, student, teacher)
    return R.LossParts(loss, soft, hard) if return_parts else loss


def ats_loss(student_logits, teacher_logits, target, *, process_group, target_temperature=4.0,
             other_temperature=2.0, student_temperature=1.0, reduction="batchmean", ignore_index=-100,
             sample_weight=None, ce_weight=0.0, return_parts=False):
    """``fastkd.ats_loss`` over a vocabulary-sharded process group (``target``: global class ids).

    The teacher's per-class temperature is ``target_temperature`` in the one column
    (on one rank) holding the target; the rest is ``kd_loss``'s forward KL with the
    teacher maximum taken in scaled units (the temperatures differ per column).
    ``ce_weight`` / ``return_parts``: as ``fastkd.ats_loss`` (CE at T = 1 on the raw
    student logits, two more per-row numbers in the SUM round).
    """
    student, teacher = student_logits, teacher_logits
    _common_checks(student, teacher, reduction, target, ignore_index, sample_weight, True)
    for name, value in (("target_temperature", target_temperature), ("other_temperature", other_temperature),
                        ("student_temperature", student_temperature)):
        v.check_positive(name, value)
    _check_ce_args(ce_weight, return_parts)
    use_ce = ce_weight != 0 or return_parts  # target is required here
    rank, world, width = _group_geometry(student, process_group)
    st = float(student_temperature)
    need_s = torch.is_grad_enabled() and student.requires_grad
    need_t = torch.is_grad_enabled() and teacher.requires_grad
    lead = student.shape[:-1]

    offset, vocab = rank * width, world * width
    dtype, n_all, read_all, weight_all, s_all, t_all = _target_prologue(
        student, teacher, target, ignore_index, sample_weight, reduction, vocab)

    def body(r, equal):
        s, t, tgt, read = _rows_and_target(s_all, t_all, target, read_all, r, dtype)
        dev = s.device
        own, col, is_g = _target_column(tgt, offset, width, s.shape, dev)
        tau = torch.where(is_g, torch.full((), float(target_temperature), dtype=dtype, device=dev),
                          torch.full((), float(other_temperature), dtype=dtype, device=dev))
        y = t / tau
        m_s, m_y = _all_reduce([s.amax(dim=1), y.amax(dim=1)], dist.ReduceOp.MAX, process_group)
        m_s = _safe_shift(m_s).unsqueeze(1)
        a = (s - m_s) / st
        b = y - _safe_shift(m_y).unsqueeze(1)
        sums = _all_reduce([a.exp().sum(dim=1), b.exp().sum(dim=1)] + (_ce_sums(s, m_s, own, col) if use_ce else []),
                           dist.ReduceOp.SUM, process_group)
        z_s, z_y = sums[0], sums[1]
        lps, lq = a - z_s.log().unsqueeze(1), b - z_y.log().unsqueeze(1)  # student, teacher log-probs
        part, g, h = _forward_kl_and_grads(lq, lps, need_t)
        red = _all_reduce([part, g.sum(dim=1)] + ([h.sum(dim=1)] if need_t else []), dist.ReduceOp.SUM,
                          process_group)
        scale = st * st
        weight = _poison(weight_all[r], equal & _ids_in_range(tgt.unsqueeze(1), read, vocab, 0))
        w = (weight * scale).unsqueeze(1)
        grad_s = (g - lps.exp() * red[1].unsqueeze(1)) * (w / st) if need_s else None
        if need_s and ce_weight != 0:
            _add_ce_grad(grad_s, s, m_s, sums[2], own, col, (weight * ce_weight).unsqueeze(1))
        grad_t = (h - lq.exp() * red[2].unsqueeze(1)) * w / tau if need_t else None
        soft = scale * red[0]
        hard = _ce_rows(m_s, sums[2], sums[3]) if use_ce else torch.zeros_like(soft)
        rows = soft + ce_weight * hard if ce_weight != 0 else soft
        return rows * weight, soft * weight, hard * weight, grad_s, grad_t

    def compute():
        equal = _check_group_shapes(n_all, width, process_group, student.device, (student.dtype, teacher.dtype),
                                    (need_s, need_t))
        return _run_chunks(lambda r, _out: body(r, equal), n_all, student, teacher, need_s, need_t, reduction,
                           lead)

    loss, soft, hard = _StoredGradLoss.apply(compute, student, teacher)
    return R.LossParts(loss, soft, hard) if return_parts else loss


# ----------------------------------------------------------------------------
# data parallel: DIST over the global batch
# ----------------------------------------------------------------------------

def _sqrt0(x: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 at 0 (as ``Tensor.norm`` of a zero vector), not inf * 0 = NaN."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def dist_loss(student_logits, teacher_logits, *, process_group, beta=1.0, gamma=1.0, temperature=1.0):
    """``fastkd.dist_loss`` over the global batch of a data-parallel process group.

    Rows are sharded (any number per rank, 0 included), classes are not. The result,
    on every rank, is single-process DIST on the concatenation of all ranks' rows:
    the inter-class term averages the per-row correlations over the global rows, and
    the intra-class correlations of each class use the global means and centred
    moments, all-reduced in two rounds (``[C] + [C] + 2`` then ``3 [C]`` numbers;
    centring before the products keeps the reference's two-pass precision).

    Gradients and DDP: the all-reduces are differentiable with a SUM all-reduce
    backward, so rank r's input gradient is ``P`` (the world size) times its share of
    the gradient of the global loss; DDP averages parameter gradients over the ``P``
    ranks, so one DDP step equals one single-process step on the concatenated batch,
    with no rescaling. Without DDP (summing gradients yourself), divide by ``P``.
    Every rank must call backward (it communicates).
    """
    v.check_pair(student_logits, teacher_logits)
    v.check_number("beta", beta)
    v.check_number("gamma", gamma)
    v.check_positive("temperature", temperature)
    if process_group is None:
        raise ValueError("process_group must be a torch.distributed process group (got None); "
                         "use fastkd.dist_loss for one process")
    dtype = R._compute_dtype(student_logits, teacher_logits)
    C = student_logits.shape[-1]
    s = student_logits.reshape(-1, C).to(dtype)
    t = teacher_logits.reshape(-1, C).to(dtype)
    T = float(temperature)
    y_s, y_t = torch.softmax(s / T, dim=1), torch.softmax(t / T, dim=1)
    # inter-class: per-row Pearson over the classes (local), averaged over the global rows
    cs, ct = y_s - y_s.mean(dim=1, keepdim=True), y_t - y_t.mean(dim=1, keepdim=True)
    rho_rows = (cs * ct).sum(dim=1) / (cs.norm(dim=1) * ct.norm(dim=1) + 1e-8)
    n_local = torch.full((1,), float(s.shape[0]), dtype=dtype, device=s.device)
    first = _AllReduceSum.apply(torch.cat([rho_rows.sum().reshape(1), n_local, y_s.sum(dim=0), y_t.sum(dim=0)]),
                                process_group)
    rho_sum, n = first[0], first[1]
    n_safe = n.clamp_min(1)
    mean_s, mean_t = first[2:2 + C] / n_safe, first[2 + C:] / n_safe
    # intra-class: per-class Pearson over the global rows, from centred moments
    ds, dt = y_s - mean_s, y_t - mean_t
    second = _AllReduceSum.apply(torch.cat([(ds * dt).sum(dim=0), (ds * ds).sum(dim=0), (dt * dt).sum(dim=0)]),
                                 process_group)
    s_st, s_ss, s_tt = second[:C], second[C:2 * C], second[2 * C:]
    rho_cols = s_st / (_sqrt0(s_ss) * _sqrt0(s_tt) + 1e-8)
    scale = T * T
    inter = scale * (1.0 - rho_sum / n_safe)
    intra = scale * (1.0 - rho_cols.mean())
    loss = beta * inter + gamma * intra
    return torch.where(n > 0, loss, torch.zeros_like(loss))  # an empty global batch: 0, as the reference
