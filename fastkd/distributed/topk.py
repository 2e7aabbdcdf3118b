"""The teacher's top-k over a vocabulary-sharded head (``fastkd.teacher_topk(process_group=...)``).

Rank r holds the logits of columns ``[r V_local, (r + 1) V_local)`` (the ``fused_linear_kd_loss``
convention). Per chunk of rows, each rank runs the row op on its shard (``k' = min(k, V_local)``
entries, so ``k`` may exceed a shard), then one all-gather of, per row, its ``k'`` global ids, their
raw logits, its tail and its ``(M_r, log z_r)`` (``lse_r = b_r / T + log z_r``, ``b_r = M_r`` or 0
when ``-inf``): ``k'`` int64 and ``k' + 3`` float32 (``12 k' + 12`` bytes, rounded up to 8) per row
and rank, whatever ``V``; each rank receives ``world`` times that. Every rank then merges
the same numbers identically:

* global shift ``b = max_r M_r``; ``rel_r = log z_r + (b_r - b) / T``; ``log Z = logsumexp_r rel_r``;
* the top-k of the ``world k'`` candidates by (raw logit descending, id ascending): candidates are
  laid out rank by rank, each rank's already in that order, so a stable sort on the logits alone
  keeps the lower id first among equals: the ids the single-process op gives;
* ``logprobs = (x - b) / T - log Z`` from the raw logits;
* tail = ``logsumexp`` over the ranks' tails moved to the global shift (``tail_r + rel_r``) and over
  the candidates not selected, minus ``log Z``: a sum over the non-members, never a difference.
"""
import torch

from .comm import all_gather, check_group_shapes, group_geometry


def geometry(process_group, rows: int, vocab: int, device, dtypes):
    """(rank, world) of ``process_group``, after the ranks agree on rows, shard width and dtypes (raises on CPU)."""
    rank, world, _ = group_geometry(torch.empty((0, vocab), device="meta"), process_group)
    check_group_shapes(rows, vocab, process_group, device, dtypes)
    return rank, world


def _pack(ids, raw, tail, stats):
    """One int64 block per row: ids, then the float values' bits (float32 in pairs; float64 as they are)."""
    floats = torch.cat([raw, tail.unsqueeze(1), stats], dim=1)
    if floats.dtype == torch.float32 and floats.shape[1] % 2:
        floats = torch.nn.functional.pad(floats, (0, 1))
    return torch.cat([ids, floats.contiguous().view(torch.int64)], dim=1)


def merge_topk(logits: torch.Tensor, k: int, temperature: float, op, group, rank: int, world: int):
    """This rank's shard ``logits [rows, V_local]`` -> the whole vocabulary's ``(ids, logprobs, tail)``."""
    rows, v_local = logits.shape
    kl = min(k, v_local)
    ids, _, tail, stats = op(logits, kl, temperature)
    raw = logits.gather(1, ids)  # the ranking key, exactly as the row op compared it
    block = all_gather(_pack(ids + rank * v_local, raw, tail.to(raw.dtype), stats.to(raw.dtype)), group)
    gids = block[..., :kl]  # [world, rows, kl]
    floats = block[..., kl:].contiguous().view(raw.dtype)
    x, tails, top, log_z = floats[..., :kl], floats[..., kl], floats[..., kl + 1], floats[..., kl + 2]
    neg_inf = float("-inf")
    top_g = top.amax(dim=0)
    base_r = torch.where(top == neg_inf, 0.0, top)
    base = torch.where(top_g == neg_inf, 0.0, top_g)
    rel = log_z + (base_r - base) / temperature  # [world, rows]
    log_total = torch.logsumexp(rel, dim=0)
    # candidates rank by rank ([rows, world kl]); a stable sort by the logit keeps the lower id first among equals
    cand_x = x.permute(1, 0, 2).reshape(rows, world * kl)
    cand_id = gids.permute(1, 0, 2).reshape(rows, world * kl)
    key = torch.where(torch.isnan(cand_x), neg_inf, cand_x) + 0.0  # as topk_rows: NaN as -inf, -0.0 as 0.0
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    chosen, rest = order[:, :k], order[:, k:]
    out_ids = cand_id.gather(1, chosen)
    shifted = (cand_x - base.unsqueeze(1)) / temperature
    logprobs = shifted.gather(1, chosen) - log_total.unsqueeze(1)
    # a rank whose shard has no mass (rel = -inf) adds nothing, whatever its own tail (NaN there: 0 / 0)
    rank_tails = torch.where(rel == neg_inf, neg_inf, tails + rel).t()  # [rows, world]
    out_tail = torch.logsumexp(torch.cat([rank_tails, shifted.gather(1, rest)], dim=1), dim=1) - log_total
    return out_ids, logprobs, out_tail
