"""Sequence alignment across tokenizers: which positions of each side cover the same text, and the merge.

Two tokenizers cut one text at different places. ``align_tokens(student_offsets, teacher_offsets)``
groups each side's positions between the text offsets where both cut (GOLD's walk over the
byte offsets, batched): group ``g`` of a sequence is the run of student positions and the run of
teacher positions that end at its ``g``-th common cut. ``merge_aligned`` turns the per-position
distributions of a group into one (GOLD's "observed" / "bayesian"), so both sides have one row per
group and any cross-tokenizer loss (``uld_loss``, ``hybrid_uld_loss`` with ``inputs="log_probs"``)
pairs them. All batched: index tensors, no Python loop per position or sequence.
"""
from typing import NamedTuple, Optional

import torch

from ..core import checks as v

__all__ = ["Alignment", "align_tokens", "merge_aligned", "token_offsets", "MERGE_STRATEGIES"]

MERGE_STRATEGIES = ("observed", "bayesian")


class Alignment(NamedTuple):
    """``align_tokens``' result: ``student_group [B, S]`` / ``teacher_group [B, T]`` int64 (the group of each
    position, ``-1`` for padding), ``num_groups [B]``, ``valid [B, G]`` bool (``G = max num_groups``)."""

    student_group: torch.Tensor
    teacher_group: torch.Tensor
    num_groups: torch.Tensor
    valid: torch.Tensor

    def target(self, ignore_index: int = -100) -> torch.Tensor:
        """``[B, G]``: 0 on real groups, ``ignore_index`` on padding (the losses' ``target`` for masking rows)."""
        return torch.where(self.valid, 0, ignore_index)


def _groups(ends: torch.Tensor, mask: torch.Tensor, other_ends: torch.Tensor, other_mask: torch.Tensor):
    """Group of each position: it closes a group where its end is also one of the other side's ends
    (the last of equal ends: zero-width tokens join the group they end in)."""
    big = torch.iinfo(torch.int64).max
    # padding anywhere (left or right) takes the last real end before it (-1 before any): still sorted
    other = torch.where(other_mask, other_ends, -1).cummax(1).values
    at = torch.searchsorted(other, ends.contiguous()).clamp_(max=other.shape[1] - 1)
    common = (other.gather(1, at) == ends) & mask
    following = torch.cat([ends[:, 1:], torch.full_like(ends[:, :1], big)], 1)
    following_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
    closes = common & ~(following_mask & (following == ends))
    group = closes.long().cumsum(1) - closes.long()
    return torch.where(mask, group, -1), closes.sum(1)


def align_tokens(student_offsets: torch.Tensor, teacher_offsets: torch.Tensor,
                 student_mask: Optional[torch.Tensor] = None,
                 teacher_mask: Optional[torch.Tensor] = None) -> Alignment:
    """Groups of positions to merge, from the two tokenizers' offsets into the same text.

    ``student_offsets [B, S, 2]`` and ``teacher_offsets [B, T, 2]`` (or ``[S, 2]``, ``[T, 2]``): each
    token's ``(start, end)`` character or byte offsets (``token_offsets``, a fast tokenizer's
    ``return_offsets_mapping``, GOLD's byte offsets); ``*_mask [B, S]`` marks the real positions
    (default: all). A position closes a group where its end is an end of the other side too (the
    last of equal ends), so each group's student and teacher runs cover the same text. Equal to
    GOLD's ``_align_by_byte_offsets`` for nondecreasing ends whose last ends agree (GOLD then has no
    leftover group); raises where a sequence's ends decrease or its last ends differ (the offsets do
    not cover the same text).
    """
    squeeze = isinstance(student_offsets, torch.Tensor) and student_offsets.dim() == 2
    ends, masks = [], []
    for name, offsets, mask in (("student_offsets", student_offsets, student_mask),
                                ("teacher_offsets", teacher_offsets, teacher_mask)):
        if not isinstance(offsets, torch.Tensor) or offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor [B, S, 2] of (start, end) offsets")
        if offsets.dim() == 2:
            offsets = offsets.unsqueeze(0)
            mask = mask.unsqueeze(0) if mask is not None else None
        if offsets.dim() != 3 or offsets.shape[-1] != 2:
            raise ValueError(f"{name} must have shape [B, S, 2] (or [S, 2]), got {tuple(offsets.shape)}")
        mask = torch.ones(offsets.shape[:2], dtype=torch.bool, device=offsets.device) if mask is None else mask.bool()
        if mask.shape != offsets.shape[:2]:
            raise ValueError(f"the mask of {name} must have shape {tuple(offsets.shape[:2])}, got {tuple(mask.shape)}")
        end = offsets[..., 1].long()
        previous = torch.cat([torch.full_like(end[:, :1], torch.iinfo(torch.int64).min), end[:, :-1]], 1)
        if v.reads_values(end) and bool(((end < previous) & mask).any()):
            row = int(((end < previous) & mask).any(1).nonzero()[0])
            raise ValueError(f"{name}: the token ends of sequence {row} decrease; offsets must follow the text")
        ends.append(end)
        masks.append(mask)
    if ends[0].shape[0] != ends[1].shape[0]:
        raise ValueError(f"student_offsets and teacher_offsets must hold the same number of sequences, got "
                         f"{ends[0].shape[0]} and {ends[1].shape[0]}")
    last = [torch.where(m, e, -1).max(1).values for e, m in zip(ends, masks)]
    if v.reads_values(last[0]) and not torch.equal(last[0], last[1]):
        row = int((last[0] != last[1]).nonzero()[0])
        raise ValueError(
            f"student_offsets and teacher_offsets do not cover the same text: sequence {row} ends at offset "
            f"{int(last[0][row])} for the student and {int(last[1][row])} for the teacher"
        )
    s_group, count = _groups(ends[0], masks[0], ends[1], masks[1])
    t_group, _ = _groups(ends[1], masks[1], ends[0], masks[0])
    width = int(count.max()) if count.numel() else 0
    valid = torch.arange(width, device=count.device) < count.unsqueeze(1)
    if squeeze:
        return Alignment(s_group[0], t_group[0], count[0], valid[0])
    return Alignment(s_group, t_group, count, valid)


def merge_aligned(log_probs: torch.Tensor, token_ids: torch.Tensor, group: torch.Tensor,
                  strategy: str = "observed", num_groups: Optional[int] = None) -> torch.Tensor:
    """One distribution per aligned group: ``[B, G, V]`` log-probabilities (not renormalised, as GOLD's).

    ``log_probs [B, S, V]``: row ``i`` the distribution paired with ``token_ids[:, i]`` (as GOLD pairs them:
    the caller shifts); ``group [B, S]`` from ``align_tokens`` (``-1``: not in any group). For a group of
    positions ``i_1 < ... < i_m``:

    * ``"observed"``: ``log p_{i_1} + sum_{j > 1} log p_{i_j}[token_{i_j}]`` (the first position's
      distribution times the later actual tokens' probabilities);
    * ``"bayesian"``: ``log p_{i_m} + sum_{j < m} log p_{i_j}[token_{i_j}]`` (the last position's times
      the earlier ones').

    A one-position group is that position's row. Groups past a sequence's count are ``-inf`` rows (mask
    them: ``Alignment.target()``). Differentiable in ``log_probs``. GOLD multiplies probabilities and
    clamps each token's at 1e-8; here the sum of log-probabilities is exact.
    """
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"strategy must be one of {MERGE_STRATEGIES}, got {strategy!r}")
    v.check_logits("log_probs", log_probs)
    squeeze = log_probs.dim() == 2
    if squeeze:
        log_probs, token_ids, group = log_probs.unsqueeze(0), token_ids.unsqueeze(0), group.unsqueeze(0)
    if log_probs.dim() != 3 or token_ids.shape != log_probs.shape[:2] or group.shape != log_probs.shape[:2]:
        raise ValueError(f"log_probs [B, S, V], token_ids [B, S] and group [B, S] must agree, got "
                         f"{tuple(log_probs.shape)}, {tuple(token_ids.shape)} and {tuple(group.shape)}")
    b, s, vocab = log_probs.shape
    count = int(group.max()) + 1 if num_groups is None else num_groups
    inside = group >= 0
    g = group.clamp(min=0)
    position = torch.arange(s, device=group.device).expand(b, s)
    init, how = (s, "amin") if strategy == "observed" else (-1, "amax")
    base = torch.full((b, count), init, dtype=torch.int64, device=group.device)
    base.scatter_reduce_(1, g, torch.where(inside, position, init), how)
    empty = (base < 0) | (base >= s)
    base = base.clamp(0, s - 1)
    token = log_probs.gather(2, token_ids.clamp(0, vocab - 1).long().unsqueeze(2)).squeeze(2)
    token = torch.where(inside, token, 0.0)
    sums = log_probs.new_zeros(b, count).scatter_add(1, g, token)
    scalars = sums - token.gather(1, base)  # every actual token's log-prob in the group but the base's
    merged = log_probs.gather(1, base.unsqueeze(2).expand(b, count, vocab)) + scalars.unsqueeze(2)
    merged = torch.where(empty.unsqueeze(2), float("-inf"), merged)
    return merged[0] if squeeze else merged


def token_offsets(tokenizer, text: str, add_special_tokens: bool = False) -> torch.Tensor:
    """``[S, 2]`` int64 character offsets of ``text``'s tokens from a fast ``transformers`` tokenizer or a
    ``tokenizers.Tokenizer`` (Python tokenizers give no offsets: a clear error)."""
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size"):  # tokenizers.Tokenizer
        return torch.tensor(tokenizer.encode(text, add_special_tokens=add_special_tokens).offsets,
                            dtype=torch.int64).reshape(-1, 2)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} gives no token offsets (a Python 'slow' tokenizer, or not a tokenizer); "
            "align_tokens needs offsets: load the tokenizer with use_fast=True (a tokenizers-backed one)"
        )
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    return torch.tensor(encoded["offset_mapping"], dtype=torch.int64).reshape(-1, 2)
