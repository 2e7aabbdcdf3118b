"""Vocabulary parallel: the adaptive KL's rows (``fastkd.akl_loss(process_group=)``; ``docs/design.md``, "The
adaptive KL" and "Distributed losses").

AKL's head is a threshold over the teacher's whole row: ``head = {c : M(t_c) <= mu}`` plus the maxima, ``M(v)``
the teacher mass at logits ``>= v``. A rank holds a column shard, so the threshold is found by radix selection
over order-preserving keys of the teacher's logits (as ``csrc/cuda/akl.cu``), with the shards' mass histograms
all-reduced: per sweep of 8 bits every rank scatter-adds ``p`` into a ``[rows, 256]`` histogram of the next
digit of the keys that match the prefix chosen so far, one SUM all-reduce, and every rank walks the same
reduced histogram, so it picks the same digit (decisions are made only from all-reduced tensors). Keys are
32 bits for float32 math (bf16 and fp16 logits are exact in float32), 64 for float64: 4 or 8 sweeps. Equal
logits are equal keys wherever they live, so a tie group is on one side. Then one SUM of the two KLs and the
gaps by side gives ``(h, l)``, and the gradients are the two-sided KL's at ``(h, l)`` (kind 2), as
``divergence._gated_rows`` does at ``(w, 1 - w)``.
"""
import torch
import torch.distributed as dist

from .comm import all_reduce

DIGIT_BITS = 8
BINS = 1 << DIGIT_BITS


def radix_keys(t: torch.Tensor):
    """``(keys, bits)``: int64 keys of the logits ``t`` whose signed order is the logits' order (``csrc/akl_math.h``'s
    ``akl_key`` shifted by ``2^(bits - 1)``: a negative float's magnitude bits flipped; ``-0.0`` and ``0.0`` one key).
    Float64 logits: 64-bit keys; anything else is keyed as float32 (exact for bf16 and fp16), in ``[-2^31, 2^31)``."""
    if t.dtype == torch.float64:
        bits = (t + 0.0).view(torch.int64)
        return torch.where(bits < 0, bits ^ ((1 << 63) - 1), bits), 64
    bits = (t.to(torch.float32) + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ ((1 << 31) - 1), bits).to(torch.int64), 32


def head_mask(t: torch.Tensor, p: torch.Tensor, t_max: torch.Tensor, mu: float, group) -> torch.Tensor:
    """bool ``[n, V_local]``: this shard's classes in AKL's head (``t`` the logits in the compute dtype, ``p`` their
    probabilities over the whole vocabulary, ``t_max`` [n] the rows' global maxima of ``t``).

    Radix selection, ``bits / 8`` SUM all-reduces of ``[n, 256]`` masses: per sweep the first bin from the top
    whose mass takes the mass above the prefix past ``mu`` is the prefix's next digit; after the last digit the
    prefix is the key of the tail's most probable tie group and the head is every key above it. Masses are
    compared with ``mu`` times the row's summed mass (float64), so rounding of the row's sum never empties the
    tail; a sweep whose bins never pass that (a NaN row) ends the row's search: every key with its prefix is head. ``mu = 1``: every class, no collective.
    """
    if mu >= 1.0:
        return torch.ones(t.shape, dtype=torch.bool, device=t.device)
    n, dev = t.shape[0], t.device
    keys, bits = radix_keys(t)
    # masses in float64, compared with mu times the row's summed mass: a mu within 1e-7 of 1 is then never passed
    # by no bin (in float32, 1 - 2^-26 is 1.0, and a row summing to 1 - 6e-8 stays below the float32 below 1:
    # every class became head); the least probable group's mass-above is the whole row's, always past mu < 1
    p = p.to(torch.float64)
    prefix = torch.full((n, 1), -(1 << (bits - 1)), dtype=torch.int64, device=dev)  # the smallest key: no digit yet
    above = torch.zeros(n, dtype=p.dtype, device=dev)  # the teacher mass of the keys above the prefix
    bound = None  # mu times the row's mass (every key matches the empty prefix of the first sweep)
    searching = torch.ones(n, dtype=torch.bool, device=dev)
    ended = torch.zeros(n, dtype=torch.bool, device=dev)  # rows whose search stopped early (rounding)
    for shift in range(bits - DIGIT_BITS, -1, -DIGIT_BITS):
        # keys with the prefix fall in slots 1..256 by their next digit; the others in slot 0 (below) or 257
        # (above): one shift, one subtraction and a clamp, no mask (the prefix's lower bits are 0)
        slot = ((keys >> shift) - ((prefix >> shift) - 1)).clamp_(0, BINS + 1)
        hist = torch.zeros((n, BINS + 2), dtype=p.dtype, device=dev).scatter_add_(1, slot, p)[:, 1:BINS + 1]
        hist = all_reduce([hist], dist.ReduceOp.SUM, group)[0]
        if bound is None:
            bound = mu * hist.sum(dim=1, keepdim=True)
        # reached[b]: the mass above the prefix plus its bins b and up (non-decreasing as b falls, rounding
        # included: non-negative sums), so the bins passing mu are 0..b and b is their count - 1
        reached = above.unsqueeze(1) + hist.flip(1).cumsum(dim=1).flip(1)
        count = (reached > bound).sum(dim=1)
        found = count > 0
        b = (count - 1).clamp_min(0)
        above_b = torch.cat([reached[:, 1:], above.unsqueeze(1)], dim=1).gather(1, b.unsqueeze(1)).squeeze(1)
        go = searching & found
        ended = ended | (searching & ~found)
        prefix = torch.where(go.unsqueeze(1), prefix + (b.unsqueeze(1) << shift), prefix)
        above = torch.where(go, above_b, above)
        searching = go
    head = torch.where(ended.unsqueeze(1), keys >= prefix, keys > prefix)
    return head | (t == t_max.unsqueeze(1))


def akl_weights(g_head: torch.Tensor, g_tail: torch.Tensor):
    """``(h, l)`` per row: ``g / max(g_head + g_tail, 1e-8)`` (a NaN sum stays NaN: ``clamp_min`` keeps it)."""
    total = (g_head + g_tail).clamp_min(1e-8)
    return g_head / total, g_tail / total


def two_sided_rows(p, q, kl_p, kl_q, sums, w_fwd, w_rev):
    """``w_fwd KL(p || q) + w_rev KL(q || p)`` per row at fixed weights [n] and kind 2's gradients: the loss [n],
    ``d / d(s / T)`` and ``d / d(t / T)`` on the shard. ``kl_p``, ``kl_q``: the shard's terms ``p (lp - lq)``,
    ``q (lq - lp)`` (0 where the probability is 0); ``sums``: their whole-vocabulary row sums. A weight of 0
    drops its KL (never ``0 * inf``)."""
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    fwd = torch.where(w_fwd == 0, zero, w_fwd * sums[0])
    rev = torch.where(w_rev == 0, zero, w_rev * sums[1])
    a, b = w_fwd.unsqueeze(1), w_rev.unsqueeze(1)
    # G = b q (lq - lp) - a p, sum G = rev - a; H = a p (lp - lq) - b q, sum H = fwd - b
    g = torch.where(b == 0, zero, b * kl_q) - a * p - q * (rev - w_fwd).unsqueeze(1)
    h = torch.where(a == 0, zero, a * kl_p) - b * q - p * (fwd - w_rev).unsqueeze(1)
    return fwd + rev, g, h


def akl_rows(t, lp, lq, t_max, mu: float, group):
    """AKL of the dense rows on the shard: ``t`` the teacher's logits (compute dtype), ``lp``, ``lq`` the log-probs
    over the whole vocabulary, ``t_max`` [n] the rows' global teacher maxima. Returns the row losses [n] and
    ``d soft / d(s / T)``, ``d soft / d(t / T)`` (both formed; the caller keeps those it needs).

    Collectives: the head's sweeps (``head_mask``), then one SUM of ``KL(p || q)``, ``KL(q || p)``, ``g_head``,
    ``g_tail``.
    """
    p, q = lp.exp(), lq.exp()
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    head = head_mask(t, p, t_max, mu, group)
    kl_p = torch.where(p == 0, zero, p * (lp - lq))
    kl_q = torch.where(q == 0, zero, q * (lq - lp))
    gap = (p - q).abs()
    red = all_reduce([kl_p.sum(dim=1), kl_q.sum(dim=1), torch.where(head, gap, zero).sum(dim=1),
                      torch.where(head, zero, gap).sum(dim=1)], dist.ReduceOp.SUM, group)
    h, l = akl_weights(red[2], red[3])
    return two_sided_rows(p, q, kl_p, kl_q, red[:2], h, l)
