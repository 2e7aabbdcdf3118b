"""The row math of the divergence family shared by the dense and top-k kernels (``divergence.py``) and the
vocabulary-parallel shard kernels (``divergence_shard.py``): the per-bucket terms and their derivatives
(``_bucket_terms``), and the statistics pass over a dense row (``_row_stats``)."""
import triton
import triton.language as tl

from ._common import load_logits, logaddexp, online_update_scaled


@triton.jit
def _bucket_terms(lp, lq, a, b, w_p, w_q, log_wp, log_wq, KIND: tl.constexpr):
    """(soft term, G, H) of buckets with teacher log-prob ``lp`` and student log-prob ``lq``.

    Zero-probability terms are selected away with ``== 0`` tests (not ``> 0``), so a
    NaN probability still propagates; a coefficient of 0 is selected away too
    (inf * 0 would be NaN). Lanes with ``lp = lq = -inf`` give exactly 0.
    """
    p = tl.exp(lp)
    q = tl.exp(lq)
    if KIND == 1:  # TVD
        d = p - q
        soft = 0.5 * tl.abs(d)
        sgn = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))  # sign(p - q), sign(0) = 0
        g = -0.5 * q * sgn
        h = 0.5 * p * sgn
    elif KIND == 2:  # two-sided KL a KL(p || q) + b KL(q || p) (Jeffreys: a = b = 1); G drops + b q, H + a p
        delta = lp - lq  # +-inf or NaN where a probability is 0: that side's term is selected away
        # (nested where, not `|`: a, b are the row's gate (w, 1 - w) in kind 7, a scalar the interpreter cannot
        # `|` with a vector)
        kl_p = tl.where(p == 0.0, 0.0, tl.where(a == 0.0, 0.0, a * p * delta))
        kl_q = tl.where(q == 0.0, 0.0, tl.where(b == 0.0, 0.0, -b * q * delta))
        soft = kl_p + kl_q
        g = kl_q - a * p
        h = kl_p - b * q
    elif KIND == 3:  # triangular (p - q)^2 / (p + q): d = (p - q) / (p + q), u = q / (p + q), v = p / (p + q)
        total = p + q
        safe = tl.where(total == 0.0, 1.0, total)  # NaN stays NaN; divisions: 1 / total overflows when subnormal
        dd = (p - q) / safe
        u = q / safe
        v = p / safe
        soft = (p - q) * dd
        # the derivatives of -4pq / (p + q) (of the exact ones less q and p: those cancel on peaked rows)
        g = -4.0 * q * v * v
        h = -4.0 * p * u * u
    elif KIND == 4:  # AB divergence (csrc/divergence_math.h div_ab_terms: the same forms and guards)
        s_ab = a + b
        side_p = tl.abs(a) > tl.abs(b)
        c1 = tl.where(side_p, b, a)
        div = tl.where(side_p, a, b)
        div_safe = tl.where(div == 0.0, 1.0, div)
        k1 = tl.where(div == 0.0, 0.0, -c1 / div_safe)
        k2 = tl.where(div == 0.0, 1.0, s_ab / div_safe)
        q0 = lq == float("-inf")
        p0 = lp == float("-inf")
        delta = lp - lq
        p_hi = lp >= lq  # the exponents from the larger log-prob (its rounding is small) and d
        base = s_ab * tl.where(p_hi, lp, lq)
        qs = tl.exp(tl.where(p_hi, base - s_ab * delta, base))
        ps = tl.exp(tl.where(p_hi, base, base + s_ab * delta))
        pab = tl.exp(tl.where(p_hi, base - b * delta, base + a * delta))
        ad = a * delta
        bd = b * delta
        g = tl.where(_big(ad), (qs - pab) / a, -qs * delta * _p1(ad))
        h = tl.where(_big(bd), (ps - pab) / b, ps * delta * _p1(-bd))
        wv = tl.where(side_p, ps, qs)
        wo = tl.where(side_p, qs, ps)
        e = tl.where(side_p, -delta, delta)
        c1e = c1 * e
        se = s_ab * e
        x1 = tl.where(_big(c1e), (pab - wv - c1e * wv) / (c1 * c1), wv * e * e * _p2(c1e))
        x2 = tl.where(_big(se), (wo - wv - se * wv) / (s_ab * s_ab), wv * e * e * _p2(se))
        soft = k1 * x1 + k2 * x2
        q0_fin = tl.where(s_ab > 0.0, tl.where(b > 0.0, 1.0, 0.0), 0.0)  # a class with q = 0 adds p^s / (b s)
        p0_fin = tl.where(s_ab > 0.0, tl.where(a > 0.0, 1.0, 0.0), 0.0)
        soft_q0 = tl.where(q0_fin != 0.0, ps / (b * s_ab), float("inf"))
        soft_p0 = tl.where(p0_fin != 0.0, qs / (a * s_ab), float("inf"))
        soft = tl.where(q0, tl.where(p0, 0.0, soft_q0), tl.where(p0, soft_p0, soft))
        # (an infinite term is a constant: G = H = 0 there, as the reference's autograd has it)
        g = tl.where(q0, 0.0, tl.where(p0, tl.where(p0_fin != 0.0, g, 0.0), g))
        h = tl.where(p0, 0.0, tl.where(q0, tl.where(q0_fin != 0.0, ps / b, 0.0), h))
    elif KIND == 5 or KIND == 6:  # Renyi: 6 the terms pass (t in soft, summed into U), 5 the gradients at 1 / S
        c = 1.0 - a  # a: the order r; b: 1 reversed; w_p: 1 / S (kind 5)
        rev = b != 0.0
        lx = tl.where(rev, lq, lp)
        ly = tl.where(rev, lp, lq)
        e = ly - lx
        x0 = lx == float("-inf")
        xx = tl.exp(lx)
        xy = tl.exp(lx + c * e)
        ce = c * e
        t = tl.where(_big(ce), (xy - xx) / c, xx * e * _p1(ce))
        t = tl.where(ly == float("-inf"), tl.where(c > 0.0, -xx / c, float("-inf")), t)
        t = tl.where(x0, 0.0, t)
        xy = tl.where(x0, 0.0, xy)
        if KIND == 6:  # U and S summed
            soft = t
            g = xy
            h = t * 0.0
        else:
            # (w_q != 0: a direct row, S < 1/2: the exact r x^r y^c / ((r - 1) S); csrc's div_renyi_grad_terms)
            x_side = tl.where(w_q != 0.0, a * xy * w_p / tl.where(a == 1.0, 1.0, a - 1.0), -a * t * w_p)
            y_side = -xy * w_p
            x_side = tl.where(w_p == 0.0, 0.0, x_side)  # an infinite row (_renyi_row): gradients 0
            y_side = tl.where(w_p == 0.0, 0.0, y_side)
            soft = t * 0.0
            g = tl.where(rev, x_side, y_side)
            h = tl.where(rev, y_side, x_side)
    elif KIND == 7:  # entropy-gated KL: the gate's three sums KL(p || q), KL(q || p), H(p) (no G, H: see _gate)
        delta = lp - lq
        soft = tl.where(p == 0.0, 0.0, p * delta)
        g = tl.where(q == 0.0, 0.0, -q * delta)
        h = tl.where(p == 0.0, 0.0, -p * lp)
    else:
        # log m: exactly log q (w_p == 0) or log p (w_q == 0), else a log-space mixture
        # (no underflow to log 0 for log-probs below -104: Liger's JSD NaN).
        # Where p == q the mixture is exactly log p + log(w_p + w_q) (0 for the family's weights),
        # not logaddexp's rounding: a row of padding only then has loss exactly 0.
        mixed = tl.where(lp == lq, lp + tl.log(w_p + w_q), logaddexp(lp + log_wp, lq + log_wq))
        lm = tl.where(w_p == 0.0, lq, tl.where(w_q == 0.0, lp, mixed))
        no_m = lm == float("-inf")
        lm_safe = tl.where(no_m, 0.0, lm)
        # w_q q / m and w_p p / m; exactly 1 where m is that side alone (as csrc/divergence_math.h), also
        # where its probability is 0: forward KL's G = -a p there (sum G = -(a + b) exactly; inf loss)
        r = tl.where(w_p == 0.0, 1.0, tl.where(no_m, 0.0, tl.exp(log_wq + lq - lm_safe)))
        u = tl.where(w_q == 0.0, 1.0, tl.where(no_m, 0.0, tl.exp(log_wp + lp - lm_safe)))
        kl_p = tl.where(p == 0.0, 0.0, p * (lp - lm))
        kl_q = tl.where(q == 0.0, 0.0, q * (lq - lm))
        ta = tl.where(a == 0.0, 0.0, a * kl_p)
        tb = tl.where(b == 0.0, 0.0, b * kl_q)
        soft = ta + tb
        mass = a * p + b * q
        g = tb - r * mass
        h = ta - u * mass
    return soft, g, h


@triton.jit
def _big(y):
    """Where the power forms take their exps (|y| > 1), else the polynomials below."""
    return (y > 1.0) | (y < -1.0)


@triton.jit
def _p1(y):
    """expm1(y) / y for |y| <= 1 (Taylor to y^10; y clamped so an unselected lane stays finite)."""
    y = tl.where(y < -1.0, -1.0, tl.where(y > 1.0, 1.0, y))
    r = 1.0 / 39916800.0
    r = r * y + 1.0 / 3628800.0
    r = r * y + 1.0 / 362880.0
    r = r * y + 1.0 / 40320.0
    r = r * y + 1.0 / 5040.0
    r = r * y + 1.0 / 720.0
    r = r * y + 1.0 / 120.0
    r = r * y + 1.0 / 24.0
    r = r * y + 1.0 / 6.0
    r = r * y + 0.5
    return r * y + 1.0


@triton.jit
def _p2(y):
    """(expm1(y) - y) / y^2 for |y| <= 1 (as _p1)."""
    y = tl.where(y < -1.0, -1.0, tl.where(y > 1.0, 1.0, y))
    r = 1.0 / 479001600.0
    r = r * y + 1.0 / 39916800.0
    r = r * y + 1.0 / 3628800.0
    r = r * y + 1.0 / 362880.0
    r = r * y + 1.0 / 40320.0
    r = r * y + 1.0 / 5040.0
    r = r * y + 1.0 / 720.0
    r = r * y + 1.0 / 120.0
    r = r * y + 1.0 / 24.0
    r = r * y + 1.0 / 6.0
    return r * y + 0.5


@triton.jit
def _renyi_row(u, s_direct, order, rev):
    """Renyi (kind 6) of a row from ``U`` and ``sum x^r y^c``: ``(soft, sum G, sum H, 1 / S)`` (csrc/divergence_math.h's
    ``div_renyi_row``): ``S = 1 + c U`` (c = 1 - r, clamped at 0), ``soft = -U log1p(c U) / (c U)``; where the
    direct sum is below 1/2, ``S`` is that sum and ``soft = log(S) / (r - 1)``."""
    c = 1.0 - order
    x = c * u
    x = tl.where(x < -1.0, -1.0, x)
    x_safe = tl.where(x == 0.0, 1.0, x)
    ratio = tl.where(c == 0.0, 1.0, tl.where(x == 0.0, 1.0, _log1p(x) / x_safe))
    direct = (s_direct < 0.5) & (u != 0.0)  # (U = S = 0: a row without buckets, loss 0)
    inv_s = 1.0 / tl.where(direct, s_direct, 1.0 + x)
    soft = tl.where(tl.abs(u) == float("inf"), float("inf"), -u * ratio)
    soft = tl.where(direct, tl.log(s_direct) / (order - 1.0), soft)
    x_side = tl.where(direct, order / tl.where(order == 1.0, 1.0, order - 1.0), -order * u * inv_s)
    y_side = -1.0
    # an infinite row is a constant: gradients 0 (1 / S = 0 tells kind 5)
    inf_row = soft == float("inf")
    inv_s = tl.where(inf_row, 0.0, inv_s)
    x_side = tl.where(inf_row, 0.0, x_side)
    y_side = tl.where(inf_row, 0.0, y_side)
    sum_g = tl.where(rev != 0.0, x_side, y_side)
    sum_h = tl.where(rev != 0.0, y_side, x_side)
    return soft, sum_g, sum_h, inv_s, tl.where(direct, 1.0, 0.0)


@triton.jit
def _gate(kl_pq, kl_qp, ent, alpha_min, alpha_max, tau, scale, log_v):
    """Entropy-gated KL (kind 7) of a row from its three sums: ``(w, 1 - w, soft, sum G, sum H)``, with
    ``w = alpha_min + (alpha_max - alpha_min) sigmoid((H / log V - tau) / scale)`` (``H / log V`` = 0 for
    ``V = 1``: ``log_v`` = 0) and the sums of kind 2 at ``(a, b) = (w, 1 - w)`` (csrc/divergence_math.h's
    ``div_gate_row``; a weight of 0 drops its KL, never 0 * inf). The gradients then run as kind 2."""
    h_norm = tl.where(log_v > 0.0, ent / tl.where(log_v > 0.0, log_v, 1.0), 0.0)
    x = (h_norm - tau) / scale
    e = tl.exp(-tl.abs(x))
    sig = tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))  # NaN x: NaN
    wg = alpha_min + (alpha_max - alpha_min) * sig
    ug = 1.0 - wg
    fwd = tl.where(wg == 0.0, 0.0, wg * kl_pq)
    rev = tl.where(ug == 0.0, 0.0, ug * kl_qp)
    return wg, ug, fwd + rev, rev - wg, fwd - ug


@triton.jit
def _log1p(x):
    """log(1 + x) for x > -1, accurate for tiny |x| (Goldberg: the rounding of 1 + x cancels)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def _stats_update(m, z, z1, x, inv_temp, HAS_TARGET: tl.constexpr):
    """Fold raw logits ``x`` into (raw max ``m``, ``z = sum exp((x - m) / T)``, ``z1 = sum exp(x - m)``).

    One raw maximum serves both temperatures (shift before scaling, as KD);
    ``z1`` (the T = 1 sum of the cross-entropy) only when a target is given.
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    z = z * tl.exp((m - m_safe) * inv_temp) + tl.sum(tl.exp((x - m_safe) * inv_temp), 0)
    if HAS_TARGET:
        z1 = z1 * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
    return m_new, z, z1


@triton.jit
def _row_stats(s_row, t_row, n_live, n_cols, inv_temp, HAS_TARGET: tl.constexpr, BLOCK: tl.constexpr,
               EVICT: tl.constexpr, CROSS: tl.constexpr = 0):
    """``_row_stats_tt`` with the teacher at the student's temperature (the shard kernels)."""
    return _row_stats_tt(s_row, t_row, n_live, n_cols, inv_temp, inv_temp, HAS_TARGET, BLOCK, EVICT, CROSS)


@triton.jit
def _row_stats_tt(s_row, t_row, n_live, n_cols, inv_temp, inv_temp_t, HAS_TARGET: tl.constexpr,
                  BLOCK: tl.constexpr, EVICT: tl.constexpr, CROSS: tl.constexpr = 0):
    """Pass 1 of a dense row: the raw maxima and sums (student at 1/T and, with a target, at 1;
    teacher at its own 1/T_t, ``inv_temp_t``), (m_s, z_s, z1, m_t, z_t, kl). ``n_live`` = 0 reads nothing.

    ``kl``: CROSS 1: KL(p || q), 2: KL(q || p), from KD's cross term: the weighting net's sum of
    e (d_w - d_o), ``d = x - m`` each net's logits minus its own running maximum (raw units; t - s
    would lose |t - s| eps with the nets at different large offsets), shifted as the maxima move;
    0 with CROSS 0. The teacher's d is taken times ``T / T_t`` (so d is in the student's raw units;
    exactly 1 when T_t = T: the same bits as without a teacher temperature).
    """
    cols = tl.arange(0, BLOCK)
    t_ratio = inv_temp_t / inv_temp
    m_s = float("-inf")
    z_s = 0.0
    z1 = 0.0
    m_t = float("-inf")
    z_t = 0.0
    acc = 0.0
    for start in range(0, n_live, BLOCK):
        offs = start + cols
        s, t = load_logits(s_row, t_row, offs, offs < n_cols, EVICT)
        m_s_old = m_s
        m_t_old = m_t
        z_s_old = z_s
        z_t_old = z_t
        if CROSS == 2:
            m_s, z_s, e_s, alpha_s = online_update_scaled(m_s, z_s, s, inv_temp)
            if HAS_TARGET:  # as _stats_update: the T = 1 sum on the same raw max
                m_safe = tl.where(m_s == float("-inf"), 0.0, m_s)
                z1 = z1 * tl.exp(m_s_old - m_safe) + tl.sum(tl.exp(s - m_safe), 0)
        else:
            m_s, z_s, z1 = _stats_update(m_s, z_s, z1, s, inv_temp, HAS_TARGET)
        m_t, z_t, e_t, alpha_t = online_update_scaled(m_t, z_t, t, inv_temp_t)
        if CROSS != 0:
            d = ((s - tl.where(m_s == float("-inf"), 0.0, m_s))
                 - (t - tl.where(m_t == float("-inf"), 0.0, m_t)) * t_ratio)
            gap = (tl.where(m_t == m_t_old, 0.0, m_t - m_t_old) * t_ratio
                   - tl.where(m_s == m_s_old, 0.0, m_s - m_s_old))
            # earlier terms' d moves by gap (d_o - d_w by -gap); a zero probability adds exactly 0, not 0 * inf
            if CROSS == 2:
                acc = (acc + tl.where(z_s_old > 0.0, z_s_old * gap, 0.0)) * alpha_s
                acc += tl.sum(e_s * tl.where(e_s > 0.0, d, 0.0), 0)
            else:
                acc = (acc - tl.where(z_t_old > 0.0, z_t_old * gap, 0.0)) * alpha_t
                acc += tl.sum(e_t * tl.where(e_t > 0.0, -d, 0.0), 0)
    if CROSS == 1:  # E_p[d_t T / T_t - d_s] / T - (log z_t - log z_s)
        kl = acc / z_t * inv_temp - tl.log(z_t) + tl.log(z_s)
    elif CROSS == 2:
        kl = acc / z_s * inv_temp - tl.log(z_s) + tl.log(z_t)
    else:
        kl = 0.0
    return m_s, z_s, z1, m_t, z_t, kl
