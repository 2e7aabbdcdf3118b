"""The collectives of the vocabulary-parallel losses: one all-reduce helper, counted, and the group checks.

``all_reduce`` (and ``all_gather``, for the sharded teacher top-k) are the only places ``fastkd.distributed``
communicates, so ``comm_stats`` /
``count_comm`` count every byte; ``check_group_shapes`` makes the ranks agree on rows,
shard widths, dtypes and gradients wanted before any per-row collective.
"""
import contextlib

import torch
import torch.distributed as dist

from ..core import checks as v


# Per-row numbers each collective carries (the benchmark prints the byte formula from this table).
PER_ROW_FLOATS = {
    "divergence, dense teacher": "MAX: 2 (max s, max t); SUM: 2 + 2 with CE (sum exp s, t; CE: sum exp s at T=1, "
                                 "s[target]); SUM: 2 + 1 with teacher grad (soft, sum G; sum H) + 3 with a "
                                 "tensor temperature's grad (sum (q - p) a, sum H b, sum p b); TVD's third round: "
                                 "1 + 5 with any grad (soft; the sign masses q_lt, q_gt, p_lt, p_gt, tie)",
    "divergence, top-k teacher": "MAX: 1 + 1 tail (max s; max s over non-ids); SUM: 1 + 1 tail + 2 with CE + K "
                                 "(sum exp s; sum exp over non-ids; CE; s[ids])",
    "akl": "MAX: 2 and SUM: 2 + 2 with CE (as a dense teacher); then the head's sweeps, SUM: 256 each (a mass "
           "histogram of the next 8-bit digit of the teacher's keys), 4 for float32 math, 8 for float64, none at "
           "mu = 1; SUM: 4 (KL(p || q), KL(q || p), g_head, g_tail)",
    "dkd": "MAX: 4 (max s, t over all and non-target classes); SUM: 6 (their sums of exp, s[g], t[g]) + 2 with CE "
           "(sum exp s at T=1, s[target]); SUM: 2 + 1 with teacher grad",
    "ats": "MAX: 2 (max s, max t / tau); SUM: 2 (sums of exp) + 2 with CE (sum exp s at T=1, s[target]); "
           "SUM: 2 + 1 with teacher grad",
    "teacher top-k (all-gather)": "k' int64 + k' + 3 float32, rounded up to 8 bytes (k' = min(k, V_local): ids; "
                                  "raw logits, tail, max, log z); each rank receives world times that",
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


def all_reduce(parts, op, group, in_place=False):
    """All-reduce a list of tensors as one flat buffer (one collective); returns the reduced parts.

    The only place this module communicates, so ``comm_stats`` counts everything.
    ``in_place``: one contiguous tensor, reduced where it is (no copy: ``grad_hidden``).
    """
    if in_place:
        (flat,) = parts
        if not flat.is_contiguous():
            raise ValueError("all_reduce(in_place=True) takes one contiguous tensor")
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


def all_gather(x, group):
    """``[world, *x.shape]``: every rank's ``x`` (one collective, counted as ``x``'s bytes, the all-reduces' rule)."""
    out = x.new_empty((dist.get_world_size(group),) + tuple(x.shape))
    _STATS.bytes += x.numel() * x.element_size()
    _STATS.calls += 1
    dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out


def group_logsumexp(x: torch.Tensor, group) -> torch.Tensor:
    """``[rows, 1]``: the log-sum-exp of each row of ``x [rows, width]`` over the whole vocabulary, ``x``
    being this rank's shard of it (one all-gather of the local ``[rows]`` log-sum-exps; a row of
    ``-inf`` everywhere gives ``-inf``)."""
    local = torch.logsumexp(x, dim=-1)
    return torch.logsumexp(all_gather(local, group), dim=0).unsqueeze(-1)


class AllReduceSum(torch.autograd.Function):
    """Differentiable SUM all-reduce for a loss every rank evaluates (data parallel, DIST).

    Backward is the SUM all-reduce of the incoming gradients: rank r then holds
    ``d(sum over ranks of the replicated loss) / d(its inputs)``, that is ``P`` times
    its share of the gradient of the global loss; DDP's gradient averaging (divide by
    P) turns it into exactly the single-process gradient.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduce([x.clone()], dist.ReduceOp.SUM, group)[0]

    @staticmethod
    def backward(ctx, g):
        return all_reduce([g.contiguous()], dist.ReduceOp.SUM, ctx.group)[0], None




def group_geometry(student: torch.Tensor, process_group):
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


_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_CALL_SLOTS = 1024  # 4 codes per dtype, 2 per gradient flag: room for 3 dtypes and 3 flags (512)


def check_group_shapes(rows: int, width: int, group, device, dtypes=(), grads=()) -> torch.Tensor:
    """One MAX all-reduce of (rows, -rows, width, -width), before any per-row collective.

    Vocabulary-parallel ranks must hold the same rows and equally wide shards, and make the same
    call: inputs of the same ``dtypes`` (they choose the row chunks: float32, bf16 or fp16 logits on
    the shard kernels take one) and the same gradients wanted (``grads``: bools, which add per-row numbers).
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
