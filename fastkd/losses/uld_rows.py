"""The row machinery of ULD and the hybrid (``fastkd.losses.cross_tokenizer``): sorted L1 of probability
rows without a sort, the row-chunk driver with both gradients computed in forward, and its
vocabulary-parallel form.

``uld_loss(s, t)``: per row ``sum_i |a_i - b_i|`` with ``a``, ``b`` the student's and the teacher's
probabilities sorted in descending order, the shorter zero-padded (formulas, ``k``'s bound:
``fastkd.reference.cross_tokenizer``). Exact (``k=None``) without sorting, from the identity
(``N_q(u) = #{c : q_c > u}``, the counting function of a row; 1-D optimal transport)::

    sum_i |a_i - b_i| = integral_0^1 |N_q(u) - N_p(u)| du

Per row chunk, in PyTorch (CPU tensors; GPU tensors sort each row instead: ``sorted_l1_by_sort``, no host
synchronisation), the passes over ``[rows, V_s]`` and ``[rows, V_t]``:

1. ``q = softmax(s / T)``, ``p = softmax(t / T_t)``;
2. each probability's bucket: the top bits of its float (exponent and 4 mantissa bits: 16 buckets
   per octave, ``[lo_k, hi_k)``), and per row and bucket the count and the sum of each side
   (two ``scatter_add``; ``[rows, 2048]`` float64 tables for float32);
3. per bucket (table-sized math): ``C_q``, ``C_p`` = counts above the bucket; on the bucket
   ``integral N_q = C_q (hi - lo) + sum_q - cnt_q lo``. Where ``C_q >= C_p + cnt_p`` (or the
   reverse) ``N_q - N_p`` keeps one sign across the bucket, so the bucket adds
   ``|integral N_q - integral N_p|`` and every gradient in it is that sign: ``+1`` for the dominant
   side's probabilities, ``-1`` for the other's (``d/da_i |a_i - b_i| = sign(a_i - b_i)``);
4. the elements of the other ("ambiguous") buckets, where the counting functions may cross, are
   refined by 7 more bits of their floats per level (MSD radix, those elements only), the same test
   per cell, down to the last bit, where a cell holds one value and its integral is exact: no sort;
   an element's gradient sign is the sign of ``N_q - N_p`` over its cell;
5. the gradient ``dL/ds = w q (g - sum_c q_c g_c) / T`` (``g = +-1``), and the teacher's alike,
   written into the stored gradient rows (``[N, V]``, the only full-size output).

Ambiguous buckets hold a few percent of the elements when the two rows' shapes differ; in the worst
case (student equal to the teacher) every level refines the whole row (three levels for float32).
On CPU tensors ``backend="auto"`` runs the C++ kernel ``fastkd::uld_fwd`` instead (``csrc/cpu/uld.cpp``:
the same identity, 64 buckets per octave, the ambiguous elements sorted), for exact ULD of logits or of
log-probs taken as given (``inputs="log_probs"``: the merged rows of ``fastkd.merge_aligned``).

``k=K``: ``torch.topk`` of each side (issue 21's fused selection, ``fastkd.topk_from_logits``,
plugs in here), the K pairs exactly plus the two tails' masses as one pair; the bound
``2 min(A, B)`` comes back in ``ULDParts.bound``.

Rows and weights as the divergences (``docs/design.md``, "Row weights"); skipped rows are not
read; a read row whose log-sum-exp is not finite (NaN or +inf logits, a row of -inf) gets a NaN
loss and NaN gradients. Gradients are computed in the forward pass and scaled in place in backward
(usable once, as the fused losses).

``hybrid_uld_loss`` runs on the same row driver (``rows_with_grads``): per chunk the matched terms and their
derivatives in closed form, the unmatched ULD by ``sorted_l1_batched``, the gradients written into the
stored ``[N, V]`` rows; no autograd graph, no full-size temporary.
"""
from functools import lru_cache
from typing import NamedTuple, Optional

import torch

from ..core.autograd import scale_stored_grad
from ..core.rows import compute_dtype

__all__ = ["sorted_l1", "sorted_l1_batched", "sorted_l1_by_sort", "Shards", "uld_op", "RowsFunction", "CHUNK_ELEMENTS"]

SUB_BITS = 4  # mantissa bits in a bucket key: 16 buckets per octave of probability
REFINE_BITS = 7  # more bits per refinement level of the ambiguous buckets (128 cells each)
CHUNK_ELEMENTS = 1 << 22  # rows per chunk: about this many logits of both sides together


@lru_cache(maxsize=8)
def _layout(dtype: torch.dtype, device: torch.device):
    """(int view dtype, shift, bucket count, bucket edges float64 [B + 1]) of the probabilities' floats."""
    ints, mantissa, bias = (torch.int64, 52, 1023) if dtype == torch.float64 else (torch.int32, 23, 127)
    shift = mantissa - SUB_BITS
    buckets = (bias + 1) << SUB_BITS  # keys of the values in [0, 2)
    edges = (torch.arange(buckets + 1, dtype=torch.int64) << shift).to(ints).view(dtype).double()
    return ints, shift, buckets, edges.to(device)


def _keys(x: torch.Tensor, ints, shift: int) -> torch.Tensor:
    """The bucket of each probability (in [0, 1]: the key is below the bucket count)."""
    return (x.view(ints) >> shift).long()


def _cell_integrals(cnt_q, cnt_p, sum_q, sum_p, above_q, above_p, lo, hi):
    """Per cell: ``integral |N_q - N_p|`` where its sign is known (else 0), which cells know it, and the
    sign of ``N_q - N_p`` there (``+1``: the student's counting function is the larger)."""
    int_q = above_q * (hi - lo) + sum_q - cnt_q * lo
    int_p = above_p * (hi - lo) + sum_p - cnt_p * lo
    q_dom, p_dom = above_q >= above_p + cnt_p, above_p >= above_q + cnt_q
    resolved = q_dom | p_dom
    return torch.where(resolved, (int_q - int_p).abs(), 0.0), resolved, q_dom


def sorted_l1_batched(q: torch.Tensor, p: torch.Tensor, want_q: bool = True, want_p: bool = True,
                      reduce_sum=None):
    """Exact ``sum_i |sort(q)_i - sort(p)_i|`` per row and its sign gradients, without a full sort.

    ``q [n, V_s]``, ``p [n, V_t]`` probability rows (float32 or float64, >= 0, no NaN). Returns
    ``(loss [n] float64, g_q [n, V_s], g_p [n, V_t])`` with ``g = +-1`` the derivative of the loss
    with respect to each probability (module docstring, steps 2-4). ``g_q`` is computed whatever
    ``want_q`` says (the ambiguous elements are found from it); ``g_p`` only when wanted.

    ``reduce_sum`` (vocabulary-parallel rows: ``q``, ``p`` this rank's columns of each row): sums a list
    of count and sum tables over the group. Every table is built from the local elements and summed,
    so the cells, the loss and the loop (run while any cell is ambiguous anywhere) are the group's.
    """
    n = q.shape[0]
    ints, shift, buckets, edges = _layout(q.dtype, q.device)
    lo, hi = edges[:-1], edges[1:]
    kq, kp = _keys(q, ints, shift), _keys(p, ints, shift)

    def table(keys, x):
        counts = torch.zeros(n, buckets, dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, keys, torch.ones((), dtype=x.dtype, device=x.device).expand_as(x))
        sums = torch.zeros(n, buckets, dtype=x.dtype, device=x.device).scatter_add_(1, keys, x)
        counts, sums = counts.double(), sums.double()
        return counts, sums, counts.sum(1, keepdim=True) - counts.cumsum(1)

    cnt_q, sum_q, above_q = table(kq, q)
    cnt_p, sum_p, above_p = table(kp, p)
    if reduce_sum is not None:
        cnt_q, sum_q, cnt_p, sum_p = reduce_sum([cnt_q, sum_q, cnt_p, sum_p])
        above_q = cnt_q.sum(1, keepdim=True) - cnt_q.cumsum(1)
        above_p = cnt_p.sum(1, keepdim=True) - cnt_p.cumsum(1)
    part, resolved, q_dom = _cell_integrals(cnt_q, cnt_p, sum_q, sum_p, above_q, above_p, lo, hi)
    loss = part.sum(1)
    sign_q = torch.where(resolved, torch.where(q_dom, 1.0, -1.0), 0.0).to(q.dtype)  # 0: an ambiguous bucket
    g_q = sign_q.gather(1, kq)
    g_p = (-sign_q).gather(1, kp) if want_p else None
    amb = ~resolved & (cnt_q + cnt_p > 0)
    if not bool(amb.any()):
        return loss, g_q, g_p
    # Refine the ambiguous buckets by more bits of the floats (MSD radix), only their elements, down to
    # the last bit, where a cell holds one value and its integral is exact whatever the counts.
    rq, cq = (g_q == 0).nonzero(as_tuple=True)
    rp, cp = amb.gather(1, kp).nonzero(as_tuple=True)
    ids = amb.flatten().cumsum(0) - 1  # compact id of each ambiguous (row, bucket)
    cells = amb.flatten().nonzero().squeeze(1)
    group_row, prefix = cells // buckets, cells % buckets
    group_above_q, group_above_p = above_q.flatten()[cells], above_p.flatten()[cells]
    bits = torch.cat([q[rq, cq].view(ints), p[rp, cp].view(ints)]).long()
    values = torch.cat([q[rq, cq], p[rp, cp]]).double()
    is_q = torch.cat([torch.ones_like(rq, dtype=torch.bool), torch.zeros_like(rp, dtype=torch.bool)])
    where = torch.arange(bits.numel(), device=q.device)  # position in [q elements, p elements]
    group = ids[torch.cat([rq * buckets + kq[rq, cq], rp * buckets + kp[rp, cp]])]
    level_shift, nq = shift, rq.numel()
    while group_row.numel():  # (one process: as long as an element is left; a group: anywhere)
        step = min(REFINE_BITS, level_shift)
        level_shift -= step
        width, groups = 1 << step, group_row.numel()
        cell = group * width + ((bits >> level_shift) & (width - 1))
        tables = [torch.zeros(groups * width, dtype=torch.float64, device=q.device) for _ in range(4)]
        tables[0].index_add_(0, cell[is_q], torch.ones_like(values[is_q]))
        tables[1].index_add_(0, cell[~is_q], torch.ones_like(values[~is_q]))
        tables[2].index_add_(0, cell[is_q], values[is_q])
        tables[3].index_add_(0, cell[~is_q], values[~is_q])
        if reduce_sum is not None:
            tables = reduce_sum(tables)
        c_q, c_p, s_q, s_p = (x.view(groups, width) for x in tables)
        a_q = group_above_q.unsqueeze(1) + c_q.sum(1, keepdim=True) - c_q.cumsum(1)
        a_p = group_above_p.unsqueeze(1) + c_p.sum(1, keepdim=True) - c_p.cumsum(1)
        sub = (prefix.unsqueeze(1) << step) | torch.arange(width, device=q.device)
        lo_c, hi_c = ((x << level_shift).to(ints).view(q.dtype).double() for x in (sub, sub + 1))
        part, done, q_dom = _cell_integrals(c_q, c_p, s_q, s_p, a_q, a_p, lo_c, hi_c)
        if level_shift == 0:  # one value per cell: exact; exact ties between the sides take sign(a_q - a_p)
            part = torch.where(done, part, (a_q - a_p).abs() * (hi_c - lo_c))
            q_dom = torch.where(done, q_dom, a_q >= a_p)
            done = torch.ones_like(done)
        loss.index_add_(0, group_row, part.sum(1))
        cell_done, cell_sign = done.flatten()[cell], torch.where(q_dom.flatten()[cell], 1.0, -1.0)
        settled = cell_done & is_q
        g_q[rq[where[settled]], cq[where[settled]]] = cell_sign[settled].to(q.dtype)
        settled = cell_done & ~is_q
        if want_p:
            g_p[rp[where[settled] - nq], cp[where[settled] - nq]] = -cell_sign[settled].to(p.dtype)
        amb = ~done & (c_q + c_p > 0)
        keep = ~cell_done
        ids = amb.flatten().cumsum(0) - 1
        cells = amb.flatten().nonzero().squeeze(1)
        group_row, prefix = group_row[cells // width], sub.flatten()[cells]
        group_above_q, group_above_p = a_q.flatten()[cells], a_p.flatten()[cells]
        bits, values, is_q, where, group = bits[keep], values[keep], is_q[keep], where[keep], ids[cell[keep]]
    return loss, g_q, g_p


def _no_host_reads(x: torch.Tensor) -> bool:
    """Whether the batched path must avoid reading values on the host for ``x`` (a GPU tensor: each read would
    synchronise the device; the tests set this on CPU tensors to run the GPU's branch), or while torch.compile
    traces (data-dependent shapes would break the graph; the sync-free branch has none)."""
    return x.is_cuda or torch.compiler.is_compiling()


def sorted_l1_by_sort(q: torch.Tensor, p: torch.Tensor, want_q: bool = True, want_p: bool = True):
    """``sorted_l1_batched``'s result by a sort of each row: no data-dependent shapes, so no host
    synchronisation (the bucket refinement's ``nonzero`` would synchronise a GPU once per level and chunk).
    Used for GPU tensors; ``O(V log V)`` per row and ``[n, V]`` sort temporaries (the chunk's). An exact
    tie ``a_i == b_i`` takes gradient 0 (any value in [-1, 1] is a subgradient there; the batched path
    takes the counting functions' sign)."""
    a, ia = q.sort(dim=1, descending=True)
    b, ib = p.sort(dim=1, descending=True)
    width = max(a.shape[1], b.shape[1])
    diff = torch.nn.functional.pad(a, (0, width - a.shape[1])) - torch.nn.functional.pad(b, (0, width - b.shape[1]))
    loss = diff.abs().sum(1, dtype=torch.float64)
    sign = diff.sign_()
    g_q = torch.empty_like(q).scatter_(1, ia, sign[:, :a.shape[1]])
    g_p = torch.empty_like(p).scatter_(1, ib, sign[:, :b.shape[1]].neg()) if want_p else None
    return loss, g_q, g_p


def sorted_l1(q: torch.Tensor, p: torch.Tensor, want_q: bool, want_p: bool):
    """Exact ULD of probability rows: by sort on GPUs (no host synchronisation), else without a sort."""
    return (sorted_l1_by_sort if _no_host_reads(q) else sorted_l1_batched)(q, p, want_q, want_p)


def _topk_l1(q: torch.Tensor, p: torch.Tensor, k: int, want_q: bool, want_p: bool):
    """``uld_K``, its bound and sign gradients (``fastkd.reference.cross_tokenizer``): the K largest of each
    side by ``torch.topk`` (where issue 21's fused selection plugs in), the rest by their masses."""
    a, ia = q.topk(min(k, q.shape[1]), dim=1)
    b, ib = p.topk(min(k, p.shape[1]), dim=1)
    a_pad = torch.nn.functional.pad(a, (0, k - a.shape[1]))
    b_pad = torch.nn.functional.pad(b, (0, k - b.shape[1]))
    head = a_pad - b_pad
    tail_a = q.scatter(1, ia, 0.0).sum(1)  # summed over the rest itself: no 1 - sum(head) cancellation
    tail_b = p.scatter(1, ib, 0.0).sum(1)
    loss = head.abs().double().sum(1) + (tail_a - tail_b).abs().double()
    bound = 2 * torch.minimum(tail_a, tail_b).double()
    tail_sign = torch.sign(tail_a - tail_b).unsqueeze(1)
    g_q = tail_sign.expand_as(q).clone().scatter_(1, ia, torch.sign(head[:, :a.shape[1]])) if want_q else None
    g_p = (-tail_sign).expand_as(p).clone().scatter_(1, ib, -torch.sign(head[:, :b.shape[1]])) if want_p else None
    return loss, bound, g_q, g_p


class Shards(NamedTuple):
    """Vocabulary-parallel rows (``uld_loss(process_group=)``): each rank holds a contiguous, equally wide
    slice of the student's and of the teacher's columns; ``offset`` is this rank's first student column."""
    group: object
    offset: int

    def sum(self, tables):
        from ..distributed.comm import all_reduce  # torch.distributed only for those who pass a group
        return all_reduce(tables, torch.distributed.ReduceOp.SUM, self.group)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax of each row over the group's whole row (a row of NaN, +inf or only -inf: NaN)."""
        from ..distributed.comm import all_reduce
        m = all_reduce([x.amax(1, keepdim=True)], torch.distributed.ReduceOp.MAX, self.group)[0]
        e = (x - m).exp_()
        return e.div_(self.sum([e.sum(1, keepdim=True)])[0])

    def logsumexp(self, x: torch.Tensor) -> torch.Tensor:
        from ..distributed.comm import group_logsumexp
        return group_logsumexp(x, self.group).squeeze(1)


def _probabilities(x, y, temperature, t_temp, log_probs, shards: Optional[Shards] = None):
    """``(q, p, bad [n, 1], any bad)`` of a chunk of rows: softmax at the temperatures, or the given
    log-probabilities' exps (not renormalised; values above 0 read as 0). Bad rows (NaN or +inf logits, a
    row of -inf: the softmax row is NaN) are zeroed here; the caller makes their outputs NaN. ``shards``:
    the rows are this rank's columns; softmax and badness are the group's."""
    if log_probs:
        q, p = x.clamp(max=0.0).exp(), y.clamp(max=0.0).exp()
        sums = [q.sum(1, keepdim=True), p.sum(1, keepdim=True)]
        if shards is not None:
            sums = shards.sum(sums)
        bad = sums[0].isnan() | sums[1].isnan()
    else:
        x, y = x / temperature if temperature != 1 else x, y / t_temp if t_temp != 1 else y
        softmax = shards.softmax if shards is not None else (lambda r: torch.softmax(r, dim=1))
        q, p = softmax(x), softmax(y)
        bad = q[:, :1].isnan() | p[:, :1].isnan()
    # a GPU applies the masks unconditionally (reading `bad.any()` would synchronise the host)
    any_bad = True if _no_host_reads(x) else bool(bad.any())
    if any_bad:
        q, p = torch.where(bad, 0.0, q), torch.where(bad, 0.0, p)
    return q, p, bad, any_bad


def uld_op(k, shards: Optional[Shards] = None):
    """The ULD chunk op of ``rows_with_grads``: ``(q, p, want_q, want_p) -> ((row, bound), dL/dq, dL/dp)``; 2 values.
    ``shards``: exact ULD (``k=None``) of vocabulary-parallel rows (the bucket tables summed over the group;
    no sort, which would need the whole rows, on any device)."""
    def op(q, p, want_q, want_p):
        if shards is not None:
            row, g_q, g_p = sorted_l1_batched(q, p, want_q, want_p, reduce_sum=shards.sum)
            return (row, torch.zeros_like(row)), g_q, g_p
        if k is None or k >= max(q.shape[1], p.shape[1]):
            row, g_q, g_p = sorted_l1(q, p, want_q, want_p)
            return (row, torch.zeros_like(row)), g_q, g_p
        row, bound, g_q, g_p = _topk_l1(q, p, k, want_q, want_p)
        return (row, bound), g_q, g_p
    op.values, op.chunk = 2, CHUNK_ELEMENTS
    return op


def rows_with_grads(s, t, weight, target, options, op, shards: Optional[Shards] = None):
    """Row losses and the weighted gradients of ``op``'s loss, chunk by chunk (arguments checked; rows ``[N, V]``).

    ``op(q, p, want_q, want_p) -> (rows, g_q, g_p)``: per chunk of probability rows (about ``op.chunk``
    logits), the unweighted row losses (a tuple of ``op.values`` tensors ``[n]``, the first the soft loss)
    and the derivatives ``dL/dq``, ``dL/dp`` (which this function turns into the logits' gradients in
    place). Returns ``(rows [n] float64 each, hard, grad_s,
    grad_t)``; the gradients are the only ``[N, V]`` outputs, every other tensor is a chunk's.
    ``shards``: vocabulary-parallel rows (``target`` global ids); the row sums (softmax, ``sum q g``, the
    CE's log-sum-exp and target logit) are the group's, the gradients this rank's columns.
    """
    temperature, t_temp, ce_weight, parts, log_probs, want_s, want_t = options
    n, vs, vt = s.shape[0], s.shape[1], t.shape[1]
    dtype = compute_dtype(s, t)
    hard = torch.zeros(n, dtype=torch.float64, device=s.device)
    outs = [torch.zeros_like(hard) for _ in range(op.values)]
    grad_s = torch.empty_like(s, memory_format=torch.contiguous_format) if want_s else None
    grad_t = torch.empty_like(t, memory_format=torch.contiguous_format) if want_t else None
    # skipped rows (weight 0) are never read: on CPU only the read rows are gathered, chunk by chunk; on a
    # GPU (where finding them would synchronise the host) every row is processed and the skipped ones are
    # masked to 0 before any arithmetic (`gpu_skip`): their outputs are 0 all the same
    gpu_skip = (weight == 0).unsqueeze(1) if _no_host_reads(s) else None
    kept = torch.arange(n, device=s.device) if gpu_skip is not None else (weight != 0).nonzero().squeeze(1)
    if kept.numel() < n:
        for g in (grad_s, grad_t):
            if g is not None:
                g.zero_()
    wants_ce = target is not None and (ce_weight != 0 or parts)
    step = max(1, op.chunk // (vs + vt))
    for i in range(0, kept.numel(), step):
        rows = kept[i:i + step] if kept.numel() < n else slice(i, min(n, i + step))
        w = weight[rows].to(dtype)
        x, y = s[rows].to(dtype), t[rows].to(dtype)
        if gpu_skip is not None:
            x, y = x.masked_fill(gpu_skip[rows], 0.0), y.masked_fill(gpu_skip[rows], 0.0)
        q, p, bad, any_bad = _probabilities(x, y, temperature, t_temp, log_probs, shards)
        values, g_q, g_p = op(q, p, want_s, want_t)
        for out, v in zip(outs, values):
            out[rows] = torch.where(bad.squeeze(1), float("nan"), v.double()) if any_bad else v.double()
        if wants_ce:
            tgt = target[rows].unsqueeze(1)
            if gpu_skip is not None:  # a skipped row's target (ignore_index) is no column
                tgt = tgt.masked_fill(gpu_skip[rows], 0)
            if shards is None:
                lse1, target_logit, owned = torch.logsumexp(x, dim=1), x.gather(1, tgt).squeeze(1), None
            else:  # the target's column is on one rank: its logit comes from there
                owned = (tgt >= shards.offset) & (tgt < shards.offset + vs)
                tgt = (tgt - shards.offset).clamp_(0, vs - 1)
                lse1 = shards.logsumexp(x)
                target_logit = shards.sum([torch.where(owned, x.gather(1, tgt), 0.0).squeeze(1)])[0]
            hard[rows] = (lse1 - target_logit).double()
        w_col = w.unsqueeze(1)
        for want, g, prob, temp, out in ((want_s, g_q, q, temperature, grad_s), (want_t, g_p, p, t_temp, grad_t)):
            if not want:
                continue
            # dL/dx = w q (g - sum q g) / T, in place over g = dL/dq (log-probs as given: w q g)
            if not log_probs:
                dots = torch.einsum("ij,ij->i", prob, g).unsqueeze(1)
                g.sub_(dots if shards is None else shards.sum([dots])[0])
            g.mul_(prob).mul_(w_col / temp)
            if log_probs:  # a log-prob above 0 is read as 0: a constant there
                g.masked_fill_((x if out is grad_s else y) > 0, 0.0)
            if out is grad_s and ce_weight != 0:
                ce = (x - lse1.unsqueeze(1)).exp_()
                ce.scatter_add_(1, tgt, torch.full_like(w_col, -1.0) if owned is None else -owned.to(ce.dtype))
                g.add_(ce.mul_(w_col * ce_weight))
            if any_bad:
                g = torch.where(bad, float("nan"), g)
            out[rows] = g
    return outs, hard, grad_s, grad_t


class RowsFunction(torch.autograd.Function):
    """``rows_with_grads``' loss with its gradients computed in forward and scaled in place in backward. Outputs:
    ``loss, soft, hard`` and ``op``'s further row values (ULD: the bound; the hybrid: matched, unmatched)."""

    @staticmethod
    def forward(ctx, s, t, weight, target, options, op, shards=None):
        temperature, t_temp, ce_weight, reduce, parts, log_probs = options
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        values, hard, grad_s, grad_t = rows_with_grads(s, t, weight, target, (temperature, t_temp, ce_weight, parts,
                                                                     log_probs, want_s, want_t), op, shards)
        w = weight.double()
        out_dtype = torch.float64 if compute_dtype(s, t) == torch.float64 else torch.float32
        soft, hard = values[0] * w, hard * w
        loss = soft + ce_weight * hard if ce_weight != 0 else soft.clone()
        outs = [loss, soft, hard] + [v * w for v in values[1:]]
        if reduce:
            outs = [o.sum() for o in outs]
        outs = [o.to(out_dtype) for o in outs]
        ctx.mark_non_differentiable(*outs[1:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*(g for g in (grad_s, grad_t) if g is not None))
        ctx.wants = (want_s, want_t)
        ctx.used = False
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.used:
            raise RuntimeError("fastkd: backward ran twice through uld_loss / hybrid_uld_loss (retain_graph=True?); "
                               "its stored gradient is scaled in place and can be used once (or use "
                               "backend='reference')")
        ctx.used = True
        stored = list(ctx.saved_tensors)
        grads = [scale_stored_grad(stored.pop(0), grad_loss) if want else None for want in ctx.wants]
        return grads[0], grads[1], None, None, None, None, None
