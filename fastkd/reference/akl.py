"""The adaptive KL's reference (AKL, Wu et al., COLING 2025): the teacher's head by a real sort, the gap
weights (``fastkd.reference.divergence.akl_rows`` uses them; the fused op ``akl_fwd`` is tested against them)."""
import torch

__all__ = ["akl_head", "akl_weights"]


def akl_head(log_p: torch.Tensor, mu: float) -> torch.Tensor:
    """AKL's teacher head ``[N, C]`` (bool), by a real sort (the official ``get_ratio``'s ``torch.sort`` and
    ``cumsum``): with ``M_c = sum_j p_j [l p_j >= l p_c]`` (the mass at or above class c, ties counted together),
    the head is ``{c : M_c <= mu}`` plus the row's maxima; ``mu >= 1``: every class (``M <= 1`` exactly, not
    as a rounded cumsum). The official code splits ties by the sort's order; here tied classes are in or out
    together. ``l p`` orders as the teacher's logits (equal logits, equal log-probs)."""
    if mu >= 1.0:
        return torch.ones_like(log_p, dtype=torch.bool)
    n_cols = log_p.shape[1]
    sorted_lp, order = log_p.sort(dim=1, descending=True)
    cum = log_p.exp().gather(1, order).cumsum(dim=1)
    # a class's M is the cumsum at the last member of its tie group: index count(l p >= l p_c) - 1
    ascending = sorted_lp.flip(1).contiguous()
    at_or_above = n_cols - torch.searchsorted(ascending, log_p.contiguous(), right=False)
    mass = cum.gather(1, at_or_above.clamp(1, n_cols) - 1)  # (clamped: a NaN row searches anywhere)
    return (mass <= mu) | (log_p == log_p.max(dim=1, keepdim=True).values)


def akl_weights(log_p: torch.Tensor, log_q: torch.Tensor, mu: float):
    """``(h, l)`` per row, detached: ``g_head / max(g_head + g_tail, 1e-8)`` and ``g_tail / ...``, ``g = sum |p - q|``
    over the teacher's head (``akl_head``) and tail (the official ``get_ratio``'s clamp)."""
    with torch.no_grad():
        gap = (log_p.exp() - log_q.exp()).abs()
        head = akl_head(log_p, mu)
        zero = torch.zeros((), dtype=gap.dtype, device=gap.device)
        g_head = torch.where(head, gap, zero).sum(dim=1)
        g_tail = torch.where(head, zero, gap).sum(dim=1)
        total = (g_head + g_tail).clamp_min(1e-8)
        return g_head / total, g_tail / total
