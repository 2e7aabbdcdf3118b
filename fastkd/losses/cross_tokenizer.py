"""Distillation across tokenizers: ULD (``uld_loss``), batched, with no full sort of either vocabulary.

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

``hybrid_uld_loss`` runs on the same row driver (``_rows``): per chunk the matched terms and their
derivatives in closed form, the unmatched ULD by ``sorted_l1_batched``, the gradients written into the
stored ``[N, V]`` rows; no autograd graph, no full-size temporary.
"""
import math
from functools import lru_cache
from typing import NamedTuple, Optional

import torch

from ..core.autograd import scale_stored_grad
from ..core import checks
from ..core.checks import BACKENDS, check_constant_weight
from ..core.divergence import divergence_coefficients
from ..core.cross_tokenizer import HybridParts, ULDParts, check_hybrid_args, check_uld_args
from ..core.rows import compute_dtype, row_view, row_weights, wants_grad
from ..dispatch import ops as _ops
from ..reference import cross_tokenizer as R

__all__ = ["uld_loss", "hybrid_uld_loss", "ULDParts", "HybridParts", "sorted_l1_batched"]

_NO_IDS = torch.empty(0, dtype=torch.int64)
SUB_BITS = 4  # mantissa bits in a bucket key: 16 buckets per octave of probability
REFINE_BITS = 7  # more bits per refinement level of the ambiguous buckets (128 cells each)
CHUNK_ELEMENTS = 1 << 22  # rows per chunk: about this many logits of both sides together
# the hybrid's chunks: larger (its per-chunk cost is higher: measured 80 s at 1 << 22 against 28-30 s at
# 1 << 24 on 2048 rows of 32000 + 50000 logits, 2 threads; peak extra 0.37 GB against 0.78 GB)
HYBRID_CHUNK_ELEMENTS = 1 << 24


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
    synchronise the device; the tests set this on CPU tensors to run the GPU's branch)."""
    return x.is_cuda


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


def _sorted_l1(q: torch.Tensor, p: torch.Tensor, want_q: bool, want_p: bool):
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


def _uld_op(k, shards: Optional[Shards] = None):
    """The ULD chunk op of ``_rows``: ``(q, p, want_q, want_p) -> ((row, bound), dL/dq, dL/dp)``; 2 values.
    ``shards``: exact ULD (``k=None``) of vocabulary-parallel rows (the bucket tables summed over the group;
    no sort, which would need the whole rows, on any device)."""
    def op(q, p, want_q, want_p):
        if shards is not None:
            row, g_q, g_p = sorted_l1_batched(q, p, want_q, want_p, reduce_sum=shards.sum)
            return (row, torch.zeros_like(row)), g_q, g_p
        if k is None or k >= max(q.shape[1], p.shape[1]):
            row, g_q, g_p = _sorted_l1(q, p, want_q, want_p)
            return (row, torch.zeros_like(row)), g_q, g_p
        row, bound, g_q, g_p = _topk_l1(q, p, k, want_q, want_p)
        return (row, bound), g_q, g_p
    op.values, op.chunk = 2, CHUNK_ELEMENTS
    return op


def _rows(s, t, weight, target, options, op, shards: Optional[Shards] = None):
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


class _RowsFunction(torch.autograd.Function):
    """``_rows``' loss with its gradients computed in forward and scaled in place in backward. Outputs:
    ``loss, soft, hard`` and ``op``'s further row values (ULD: the bound; the hybrid: matched, unmatched)."""

    @staticmethod
    def forward(ctx, s, t, weight, target, options, op, shards=None):
        temperature, t_temp, ce_weight, reduce, parts, log_probs = options
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        values, hard, grad_s, grad_t = _rows(s, t, weight, target, (temperature, t_temp, ce_weight, parts,
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
    elif not _ops.has_kernel("uld_fwd", "CPU"):
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
    outs = _RowsFunction.apply(s, t, weight, tgt, options, _uld_op(k))
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
    outs = _RowsFunction.apply(s, t, weight, tgt, options, _uld_op(None, shards), shards)
    if reduction == "none":
        outs = tuple(o.reshape(lead) for o in outs)
    return ULDParts(*outs) if return_parts else outs[0]


def _hybrid_op(vm, beta: float, w_m: float, w_u: float):
    """The hybrid's chunk op of ``_rows`` (``vm`` on the rows' device): ``((soft, matched, unmatched), dL/dq, dL/dp)``.

    Matched (``fastkd.core.divergence.divergence_coefficients("jsd", beta) = (a, b, w_p, w_q)``, ``P`` the
    teacher's mass on each matched student id, ``m = w_p P + w_q q``): ``a sum P log(P / m) + b sum q log(q / m)``,
    ``dL/dq = b (log(q / m) + 1) - w_q (a P + b q) / m`` and ``dL/dP = a (log(P / m) + 1) - w_p (a P + b q) / m``
    (a ``0 log 0`` term is 0 and has derivative 0, as the reference's ``kl_terms``), every matched teacher token
    taking its student id's ``dL/dP``; unmatched: ``_sorted_l1``'s sign rows. Temporaries: the chunk's."""
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
            unmatched, g_qr, g_pr = _sorted_l1(q[:, rest_s], p[:, rest_t], want_q, want_p)
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
    outs = _RowsFunction.apply(s, t, weight, tgt, options, op)
    if reduction == "none":
        outs = tuple(o.reshape(lead) for o in outs)
    return HybridParts(*outs) if return_parts else outs[0]
