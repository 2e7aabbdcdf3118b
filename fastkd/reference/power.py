"""The power divergences' row math in plain PyTorch (Amari's alpha, AB, Renyi): the ground truth of
``divergence_fwd`` kinds 4 and 6 (``docs/design.md``), used by ``reference.divergence``. Each branch of a
``torch.where`` gets inputs it is finite on, so the float64 autograd gradients are clean where the value is."""
import torch


def _psi(c: float, x: torch.Tensor) -> torch.Tensor:
    """``(expm1(c x) - c x) / c^2`` (``x^2 / 2`` at ``c = 0``), a series where ``|c x| < 1e-3``."""
    if c == 0:
        return 0.5 * x * x
    y = c * x
    small = y.abs() < 1e-3
    ys = torch.where(small, y, torch.zeros_like(y))  # each branch gets inputs it is finite on
    yb = torch.where(small, torch.ones_like(y), y)
    series = x * x * (0.5 + ys * (1.0 / 6 + ys * (1.0 / 24 + ys / 120)))
    return torch.where(small, series, (torch.expm1(yb) - yb) / (c * c))


def ab_divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The AB divergence (Cichocki et al. 2011; ABKD) per row, ``a = alpha``, ``b = beta``, ``s = a + b``::

        -(1 / (a b)) sum_c [p^a q^b - (a / s) p^s - (b / s) q^s]

    with its limits where ``a``, ``b`` or ``s`` is 0, evaluated per class as ``q^s (k1 psi_a(d) + k2 psi_s(d))``
    (``d = log p - log q``, ``psi_c(x) = (expm1(c x) - c x) / c^2``, ``k1 = -a / b``, ``k2 = s / b``) when
    ``|b| >= |a|``, else as ``p^s (k1 psi_b(-d) + k2 psi_s(-d))`` (``k1 = -b / a``, ``k2 = s / a``); ``a = b = 0``:
    ``d^2 / 2``. Classes with ``p = q = 0`` add 0; ``q = 0 < p`` adds ``p^s / (b s)`` when ``s > 0`` and
    ``b > 0``, else ``+inf`` (and ``p = 0 < q`` likewise with ``a``).
    """
    a, b = float(alpha), float(beta)
    s = a + b
    p0, q0 = torch.isneginf(log_p), torch.isneginf(log_q)
    dead = p0 | q0
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    lp, lq = torch.where(dead, zero, log_p), torch.where(dead, zero, log_q)  # finite stand-ins, masked below
    d = lp - lq
    if a == 0 and b == 0:
        terms = 0.5 * d * d
    elif abs(b) >= abs(a):
        terms = torch.exp(s * lq) * ((-a / b) * _psi(a, d) + (s / b) * _psi(s, d))
    else:
        terms = torch.exp(s * lp) * ((-b / a) * _psi(b, -d) + (s / a) * _psi(s, -d))
    inf = torch.full((), float("inf"), dtype=log_p.dtype, device=log_p.device)
    lp0, lq0 = torch.where(p0, zero, log_p), torch.where(q0, zero, log_q)
    only_q0 = torch.exp(s * lp0) / (b * s) if (s > 0 and b > 0) else inf
    only_p0 = torch.exp(s * lq0) / (a * s) if (s > 0 and a > 0) else inf
    terms = torch.where(q0, torch.where(p0, zero, only_q0), torch.where(p0, only_p0, terms))
    return terms.sum(dim=1)


def renyi_rows(log_p: torch.Tensor, log_q: torch.Tensor, order: float, reverse: bool = False) -> torch.Tensor:
    """Renyi divergence of order ``r`` per row, ``D_r(p || q) = log(sum p^r q^(1 - r)) / (r - 1)`` (``reverse``:
    ``D_r(q || p)``), as ``-U log1p(c U) / (c U)`` (``log(S) / (r - 1)`` where ``S = sum x^r y^c < 1/2``),
    ``c = 1 - r``, ``U = sum_c x phi_c(log y - log x)``
    (``(x, y) = (p, q)``, reversed ``(q, p)``; ``phi_c(e) = expm1(c e) / c``): ``r -> 1`` is ``KL(x || y)`` with
    no cancellation. ``x = 0`` adds 0 to ``U``; ``y = 0 < x`` gives ``+inf`` for ``r >= 1``."""
    t, xy = renyi_parts(log_p, log_q, order, reverse)
    u, s_direct = t.sum(dim=1), xy.sum(dim=1)
    c = 1.0 - float(order)
    if c == 0:
        return -u
    # S far below 1: 1 + c U keeps only eps of it, the direct sum its digits (as the kernels); each branch gets
    # inputs it is finite on (an unselected log1p(-1) would put NaN in the gradient)
    direct = (s_direct < 0.5) & (u != 0)  # (U = S = 0: a row without buckets, loss 0)
    u_safe = torch.where(direct | torch.isinf(u), torch.zeros_like(u), u)
    z = (c * u_safe).clamp_min(-1.0)
    tiny = z.abs() < 1e-12
    ratio = torch.where(tiny, torch.ones_like(z), torch.log1p(z) / torch.where(tiny, torch.ones_like(z), z))
    soft = torch.where(torch.isinf(u), torch.full_like(u, float("inf")), -u_safe * ratio)
    return torch.where(direct, torch.log(torch.where(direct, s_direct, torch.ones_like(s_direct))) / (-c), soft)


def renyi_parts(log_p: torch.Tensor, log_q: torch.Tensor, order: float, reverse: bool = False):
    """Renyi's per-class parts ``(t, x^r y^c)``, ``t = x phi_c(log y - log x)`` (summed, ``U``), with ``(x, y) = (p,
    q)`` (reversed ``(q, p)``), ``c = 1 - order``; ``x = 0`` gives 0 for both, ``y = 0 < x`` gives ``t = -x / c``
    (``r < 1``) or ``-inf``."""
    lx, ly = (log_q, log_p) if reverse else (log_p, log_q)
    r = float(order)
    c = 1.0 - r
    x0, y0 = torch.isneginf(lx), torch.isneginf(ly)
    zero = torch.zeros((), dtype=lx.dtype, device=lx.device)
    lxs, lys = torch.where(x0 | y0, zero, lx), torch.where(x0 | y0, zero, ly)
    e = lys - lxs
    x = lxs.exp()
    if c == 0:
        phi = e
    else:
        y = c * e
        small = y.abs() < 1e-3
        ys = torch.where(small, y, torch.zeros_like(y))
        yb = torch.where(small, torch.ones_like(y), y)
        phi = torch.where(small, e * (1 + ys * (0.5 + ys * (1.0 / 6 + ys / 24))), torch.expm1(yb) / c)
    t = x * phi
    y0_term = (-lx.exp() / c) if c > 0 else torch.full((), float("-inf"), dtype=lx.dtype, device=lx.device)
    t = torch.where(x0, zero, torch.where(y0, y0_term, t))
    xy = torch.where(x0, zero, torch.exp(lxs + c * e)) if c != 0 else torch.where(x0, zero, x)
    xy = torch.where(y0 & ~x0, torch.zeros_like(xy) if c > 0 else torch.full_like(xy, float("inf")), xy)
    return t, xy
