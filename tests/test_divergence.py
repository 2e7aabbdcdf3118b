"""The language-model divergences (reverse KL, generalised JSD, skew KL, TVD, Jeffreys, triangular) on the reference
backend.

Expected values come from independent code: Python-float loops (``hand_*``), the
peers' documented formulas rewritten here (DistiLLM, torchtune), TRL's own
``GKDTrainer.generalized_jsd_loss`` when trl is installed, and dense float64
formulas written out per test. The reference is never its own oracle.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import reference as R

F64 = torch.float64
INF = float("inf")
LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_kl_rev", "tvd", "jeffreys", "triangular",
          "entropy_gated_kl", "alpha_divergence", "ab_divergence", "renyi", "renyi_rev")
# w = 0.2 + 0.7 sigmoid((H / log V - 0.6) / 0.2): both KLs weigh in, and the gate is not saturated on these rows
GATE = {"alpha_min": 0.2, "alpha_max": 0.9, "tau": 0.6, "scale": 0.2}
FUNCS = {
    "forward_kl": (fastkd.forward_kl_loss, {}),
    "reverse_kl": (fastkd.reverse_kl_loss, {}),
    "jsd": (fastkd.jsd_loss, {"beta": 0.3}),
    "skew_kl": (fastkd.skew_kl_loss, {"skew": 0.2}),
    "skew_kl_rev": (fastkd.skew_kl_loss, {"skew": 0.2, "reverse": True}),
    "tvd": (fastkd.tvd_loss, {}),
    "jeffreys": (fastkd.jeffreys_loss, {}),
    "triangular": (fastkd.triangular_loss, {}),
    "entropy_gated_kl": (fastkd.entropy_gated_kl_loss, GATE),
    "alpha_divergence": (fastkd.alpha_divergence_loss, {"alpha": 0.3}),
    "ab_divergence": (fastkd.ab_divergence_loss, {"alpha": 0.2, "beta": 0.7}),
    "renyi": (fastkd.renyi_loss, {"order": 0.5}),
    "renyi_rev": (fastkd.renyi_loss, {"order": 2.0, "reverse": True}),
}
REDUCTIONS = ("batchmean", "sum", "mean", "none")
# dtype -> (relative loss error, relative gradient-norm error) against float64 on the same values
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def call(loss, s, t, **kw):
    fn, params = FUNCS[loss]
    return fn(s, t, **{**params, **kw})


def rel_norm(g, r):
    g, r = g.double(), r.double()
    return ((g - r).norm() / r.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------
# independent math: Python floats, explicit loops
# ----------------------------------------------------------------------------

def hand_softmax(xs, T):
    m = max(x / T for x in xs)
    if m == -INF:
        return [0.0] * len(xs)
    e = [math.exp(x / T - m) if x != -INF else 0.0 for x in xs]
    z = sum(e)
    return [v / z for v in e]


def hand_kl(a, b):
    """sum_c a_c log(a_c / b_c) with 0 log 0 = 0."""
    total = 0.0
    for x, y in zip(a, b):
        if x > 0:
            total += INF if y == 0 else x * math.log(x / y)
    return total


def hand_gate(p, params):
    """The entropy gate w of one row: alpha_min + (alpha_max - alpha_min) sigmoid((H / log V - tau) / scale)."""
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    x = (entropy / math.log(len(p)) - params["tau"]) / params["scale"]
    return params["alpha_min"] + (params["alpha_max"] - params["alpha_min"]) / (1.0 + math.exp(-x))


def hand_ab(p, q, a, b):
    """-(1 / (a b)) sum [p^a q^b - (a / s) p^s - (b / s) q^s] (a, b, s = a + b all nonzero; 0^x = 0 for x > 0,
    inf for x < 0)."""
    s = a + b

    def pw(x, e):
        return x ** e if x > 0 else (0.0 if e > 0 else INF)
    total = 0.0
    for x, y in zip(p, q):
        if x == 0 and y == 0:
            continue
        total += -(pw(x, a) * pw(y, b) - a / s * pw(x, s) - b / s * pw(y, s)) / (a * b)
    return total


def hand_renyi(p, q, r):
    """log(sum p^r q^(1 - r)) / (r - 1) (classes with p = 0 add 0)."""
    total = sum(x ** r * (y ** (1 - r) if y > 0 else (0.0 if r < 1 else INF)) for x, y in zip(p, q) if x > 0)
    return math.log(total) / (r - 1)


def hand_row(loss, s_row, t_row, T, params):
    p, q = hand_softmax(t_row, T), hand_softmax(s_row, T)
    if loss == "alpha_divergence":
        return hand_ab(p, q, params["alpha"], 1 - params["alpha"])
    if loss == "ab_divergence":
        return hand_ab(p, q, params["alpha"], params["beta"])
    if loss in ("renyi", "renyi_rev"):
        return hand_renyi(q, p, params["order"]) if params.get("reverse") else hand_renyi(p, q, params["order"])
    if loss == "forward_kl":
        return hand_kl(p, q)
    if loss == "reverse_kl":
        return hand_kl(q, p)
    if loss == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if loss == "jeffreys":
        return hand_kl(p, q) + hand_kl(q, p)
    if loss == "triangular":
        return sum((x - y) ** 2 / (x + y) for x, y in zip(p, q) if x + y > 0)
    if loss == "entropy_gated_kl":
        w = hand_gate(p, params)
        return w * hand_kl(p, q) + (1 - w) * hand_kl(q, p)
    if loss == "jsd":
        b = params["beta"]
        if b == 0:
            return hand_kl(p, q)
        if b == 1:
            return hand_kl(q, p)
        m = [b * x + (1 - b) * y for x, y in zip(p, q)]
        return b * hand_kl(p, m) + (1 - b) * hand_kl(q, m)
    lam = params["skew"]
    if params.get("reverse"):
        return hand_kl(q, [(1 - lam) * x + lam * y for x, y in zip(p, q)])
    return hand_kl(p, [lam * x + (1 - lam) * y for x, y in zip(p, q)])


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("T", (1.0, 2.5))
def test_matches_hand_computation_with_masked_vocab(loss, T):
    s = [[1.0, -2.0, 0.5, 3.0, -INF], [0.0, 0.0, 0.0, 0.0, 0.0], [2.0, -INF, 1.0, -1.0, 0.3]]
    t = [[0.2, 1.5, -INF, 2.0, -INF], [1.0, -1.0, 2.0, 0.5, -0.5], [2.0, -INF, 1.5, 0.0, 0.1]]
    params = FUNCS[loss][1]
    rows = [hand_row(loss, a, b, T, params) for a, b in zip(s, t)]
    out = call(loss, torch.tensor(s, dtype=F64), torch.tensor(t, dtype=F64), temperature=T, reduction="none")
    expected = torch.tensor(rows, dtype=F64)
    # reverse KL of row 0 is +inf (the student puts mass where the teacher masks), everything else finite
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    assert out.dtype == F64


@pytest.mark.parametrize("beta", (0.0, 0.1, 0.5, 0.9, 1.0))
def test_jsd_beta_values_by_hand(beta):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 7, generator=g, dtype=F64), torch.randn(4, 7, generator=g, dtype=F64)
    rows = [hand_row("jsd", a.tolist(), b.tolist(), 1.5, {"beta": beta}) for a, b in zip(s, t)]
    out = fastkd.jsd_loss(s, t, beta=beta, temperature=1.5)
    assert math.isclose(out.item(), sum(rows) / 4, rel_tol=1e-12)


def test_special_cases_are_the_plain_kls():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, 9, generator=g, dtype=F64), torch.randn(5, 9, generator=g, dtype=F64)
    # kd_loss has the T^2 factor; the reference's float32 row weights (1/5) limit it to ~1e-8 relative
    fwd = R.kd_loss(s, t, 2.0, reduction="sum") / 4.0 / 5
    rev = fastkd.reverse_kl_loss(s, t, temperature=2.0)
    assert torch.equal(fastkd.jsd_loss(s, t, beta=0.0, temperature=2.0), fastkd.skew_kl_loss(s, t, skew=0.0,
                                                                                               temperature=2.0))
    torch.testing.assert_close(fastkd.jsd_loss(s, t, beta=0.0, temperature=2.0), fwd, rtol=1e-13, atol=0)
    torch.testing.assert_close(fastkd.jsd_loss(s, t, beta=1.0, temperature=2.0), rev, rtol=1e-13, atol=0)
    torch.testing.assert_close(fastkd.skew_kl_loss(s, t, skew=0.0, reverse=True, temperature=2.0), rev,
                               rtol=1e-13, atol=0)
    assert fastkd.skew_kl_loss(s, t, skew=1.0).item() == 0.0  # KL(p || p)


# ----------------------------------------------------------------------------
# the peers' code
# ----------------------------------------------------------------------------

def _trl_gkd():
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install trl) - TRL comparison skipped")
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except ImportError:
        GKDTrainer = getattr(trl, "GKDTrainer", None)
        if GKDTrainer is None:
            pytest.skip(f"trl {trl.__version__} has no GKDTrainer")
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", (0.0, 0.1, 0.5, 0.9, 1.0))
@pytest.mark.parametrize("T", (1.0, 2.0))
def test_jsd_matches_trl(beta, T):
    trl_jsd = _trl_gkd()
    g = torch.Generator().manual_seed(5)
    B, L, V = 2, 3, 11
    s = (torch.randn(B, L, V, generator=g, dtype=F64) * 2).requires_grad_()
    t = (torch.randn(B, L, V, generator=g, dtype=F64) * 2).requires_grad_()
    labels = torch.tensor([[1, -100, 4], [-100, 2, 3]])

    def both(a, b):
        return a, torch.autograd.grad(a, [s, t]), b, torch.autograd.grad(b, [s, t])

    # with labels, "batchmean" = sum over tokens with label != -100 / their count: the same here
    out, g_out, ref, g_ref = both(fastkd.jsd_loss(s, t, beta=beta, temperature=T, target=labels),
                                  trl_jsd(s, t, labels=labels, beta=beta, temperature=T))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_out, g_ref):
        assert rel_norm(a, b) < 1e-12
    # without labels TRL's "batchmean" divides by dim 0 only (B), fastkd by all B * L rows
    out = fastkd.jsd_loss(s, t, beta=beta, temperature=T)
    torch.testing.assert_close(out * L, trl_jsd(s, t, beta=beta, temperature=T), rtol=1e-12, atol=1e-14)
    # "sum" and TRL's element-wise "mean" (= sum / (rows * V)) agree as they are
    for reduction in ("sum", "mean"):
        torch.testing.assert_close(fastkd.jsd_loss(s, t, beta=beta, temperature=T, reduction=reduction),
                                   trl_jsd(s, t, beta=beta, temperature=T, reduction=reduction),
                                   rtol=1e-12, atol=1e-14)
    # TRL's "none" is element-wise [B, L, V]; fastkd's per row [B, L]
    torch.testing.assert_close(fastkd.jsd_loss(s, t, beta=beta, temperature=T, reduction="none"),
                               trl_jsd(s, t, beta=beta, temperature=T, reduction="none").sum(-1),
                               rtol=1e-12, atol=1e-14)


def distillm(kind, logits, teacher_logits, labels, lam=0.1):
    """DistiLLM's losses.py (skewed_forward_kl, skewed_reverse_kl, tv_distance), from its documented formulas."""
    p = F.softmax(teacher_logits, dim=-1, dtype=F64)
    q = F.softmax(logits, dim=-1, dtype=F64)
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    if kind == "skew_kl":
        log_m = torch.log(lam * p + (1 - lam) * q)
        x = torch.masked_fill(p * log_m, inf_mask, 0).sum(-1)
    elif kind == "skew_kl_rev":
        log_m = torch.log((1 - lam) * p + lam * q)
        x = torch.masked_fill(q * log_m, inf_mask, 0) - torch.masked_fill(q * F.log_softmax(logits, -1), inf_mask, 0)
        x = x.sum(-1)
    else:
        x = -0.5 * torch.masked_fill((p - q).abs(), inf_mask, 0).sum(-1)
    mask = (labels != -100).to(F64)
    return -(x.reshape(-1) * mask.reshape(-1)).sum() / mask.sum()


@pytest.mark.parametrize("kind", ("skew_kl", "skew_kl_rev", "tvd"))
def test_matches_distillm(kind):
    g = torch.Generator().manual_seed(6)
    s = (torch.randn(2, 4, 13, generator=g, dtype=F64) * 2).requires_grad_()
    t = torch.randn(2, 4, 13, generator=g, dtype=F64) * 2
    labels = torch.tensor([[1, 2, -100, 3], [-100, -100, 5, 6]])
    if kind == "tvd":
        out = fastkd.tvd_loss(s, t, target=labels)
    else:
        out = fastkd.skew_kl_loss(s, t, skew=0.1, reverse=kind == "skew_kl_rev", target=labels)
    ref = distillm(kind, s, t, labels)
    if kind == "skew_kl":
        # DistiLLM's forward skew KL omits the teacher entropy: ref = KL + H(p), same student gradient
        p = F.softmax(t, -1)
        entropy = -(p * p.log()).sum(-1).reshape(-1)[labels.reshape(-1) != -100].mean()
        torch.testing.assert_close(out + entropy, ref, rtol=1e-12, atol=1e-14)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    g_out, = torch.autograd.grad(out, s)
    g_ref, = torch.autograd.grad(ref, s)
    assert rel_norm(g_out, g_ref) < 1e-12


def test_reverse_kl_matches_torchtune():
    """torchtune's ReverseKLLoss (from its documented formula): KL(q || p) / count(labels != ignore)."""
    g = torch.Generator().manual_seed(7)
    s = (torch.randn(6, 17, generator=g, dtype=F64) * 2).requires_grad_()
    t = torch.randn(6, 17, generator=g, dtype=F64) * 2
    labels = torch.tensor([0, -100, 3, 4, -100, 9])
    q = F.softmax(s, -1)
    inf_mask = torch.isinf(s) | torch.isinf(t)
    prod = torch.masked_fill(q * F.log_softmax(t, -1), inf_mask, 0) - torch.masked_fill(q * F.log_softmax(s, -1),
                                                                                          inf_mask, 0)
    mask = (labels != -100).to(F64)
    ref = -(prod.sum(-1) * mask).sum() / mask.sum()
    out = fastkd.reverse_kl_loss(s, t, target=labels)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    assert rel_norm(torch.autograd.grad(out, s)[0], torch.autograd.grad(ref, s)[0]) < 1e-12


# ----------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck(loss):
    g = torch.Generator().manual_seed(8)
    s = torch.randn(2, 3, 5, generator=g, dtype=F64).requires_grad_()
    t = torch.randn(2, 3, 5, generator=g, dtype=F64).requires_grad_()
    target = torch.tensor([[0, -100, 4], [2, 1, 3]])
    weight = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.5, 3.0]], dtype=F64)

    def f(a, b):
        return call(loss, a, b, temperature=1.7, target=target, sample_weight=weight, ce_weight=0.3)

    if loss == "entropy_gated_kl":  # the gate is a constant in the gradients: exact for the student alone
        t = t.detach()
    assert torch.autograd.gradcheck(f, (s, t))
    assert torch.autograd.gradgradcheck(f, (s, t)) if loss != "tvd" else True


# ----------------------------------------------------------------------------
# the matrix: reductions x ignore/weights x T x ce_weight x dtypes x 3-D
# ----------------------------------------------------------------------------

def dense_rows(loss, s, t, T):
    """Per-row divergence in float64, written out densely (no masked vocab in these inputs)."""
    params = FUNCS[loss][1]
    log_p, log_q = F.log_softmax(t.double() / T, -1), F.log_softmax(s.double() / T, -1)
    p, q = log_p.exp(), log_q.exp()

    def kl(a, log_a, log_b):
        return (a * (log_a - log_b)).sum(-1)

    if loss == "forward_kl":
        return kl(p, log_p, log_q)
    if loss == "reverse_kl":
        return kl(q, log_q, log_p)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if loss == "jeffreys":
        return ((p - q) * (log_p - log_q)).sum(-1)
    if loss == "triangular":
        return ((p - q) ** 2 / (p + q)).sum(-1)
    if loss == "entropy_gated_kl":
        h = -(p * log_p).sum(-1) / math.log(p.shape[-1])
        w = params["alpha_min"] + (params["alpha_max"] - params["alpha_min"]) * torch.sigmoid(
            (h - params["tau"]) / params["scale"])
        w = w.detach()  # the gate is a constant in the gradients (documented)
        return w * kl(p, log_p, log_q) + (1 - w) * kl(q, log_q, log_p)
    if loss in ("alpha_divergence", "ab_divergence"):  # the general case's formula, densely
        a = params["alpha"]
        b = params.get("beta", 1 - a)
        sab = a + b
        return -(p ** a * q ** b - a / sab * p ** sab - b / sab * q ** sab).sum(-1) / (a * b)
    if loss in ("renyi", "renyi_rev"):
        r = params["order"]
        x, y = (q, p) if params.get("reverse") else (p, q)
        return (x ** r * y ** (1 - r)).sum(-1).log() / (r - 1)
    if loss == "jsd":
        b = params["beta"]
        log_m = (b * p + (1 - b) * q).log()
        return b * kl(p, log_p, log_m) + (1 - b) * kl(q, log_q, log_m)
    lam = params["skew"]
    if params.get("reverse"):
        return kl(q, log_q, ((1 - lam) * p + lam * q).log())
    return kl(p, log_p, (lam * p + (1 - lam) * q).log())


def expected_loss(loss, s, t, T, reduction, target, weight, ce_weight):
    """The documented reduction, written with explicit masks."""
    rows = dense_rows(loss, s, t, T)
    if ce_weight:
        ce = F.cross_entropy(s.double().reshape(-1, s.shape[-1]), target.reshape(-1).clamp_min(0),
                             reduction="none").reshape(rows.shape)
        rows = rows + ce_weight * ce
    counted = torch.ones_like(rows) if target is None else (target != -100).double()
    w = counted if weight is None else counted * weight.double()
    rows = torch.where(w != 0, rows, torch.zeros_like(rows)) * w
    if reduction == "none":
        return rows
    n = counted.sum().clamp_min(1)
    return {"sum": rows.sum(), "batchmean": rows.sum() / n, "mean": rows.sum() / (n * s.shape[-1])}[reduction]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("rows", ("plain", "ignore", "weights"))
@pytest.mark.parametrize("T,ce_weight", ((1.0, 0.0), (2.0, 0.0), (2.0, 0.5)))
@pytest.mark.parametrize("dtypes", ((F64, F64), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float16), (torch.bfloat16, torch.float32)),
                         ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_matrix(loss, rows, T, ce_weight, dtypes):
    for reduction in REDUCTIONS:
        _matrix_case(loss, reduction, rows, T, ce_weight, dtypes)


def _matrix_case(loss, reduction, rows, T, ce_weight, dtypes):
    g = torch.Generator().manual_seed(9)
    shape = (2, 3, 37)
    s = (torch.randn(shape, generator=g) * 3).to(dtypes[0]).requires_grad_()
    t = (torch.randn(shape, generator=g) * 3).to(dtypes[1]).requires_grad_()
    target = torch.randint(0, 37, shape[:-1], generator=g)
    weight = None
    if rows == "ignore":
        target[0, 1] = target[1, 2] = -100
    if rows == "weights":
        weight = torch.tensor([[0.5, 0.0, 2.0], [1.0, 3.0, 0.25]])
        target[1, 0] = -100
    needs_target = rows != "plain" or ce_weight != 0
    tgt = target if needs_target else None
    out = call(loss, s, t, temperature=T, reduction=reduction, target=tgt, sample_weight=weight,
               ce_weight=ce_weight)
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    ref = expected_loss(loss, s64, t64, T, reduction, tgt, weight, ce_weight)
    assert out.dtype == (F64 if F64 in dtypes else torch.float32)
    assert out.shape == ref.shape
    # the inputs are exact in float64, so only the compute precision (float32) separates the two
    loss_tol = 1e-10 if F64 in dtypes else TOL[torch.float32][0]
    torch.testing.assert_close(out.double(), ref, rtol=loss_tol, atol=loss_tol)
    grads = torch.autograd.grad(out.sum(), [s, t])
    refs = torch.autograd.grad(ref.sum(), [s64, t64])
    for x, gr, r in zip((s, t), grads, refs):
        assert gr.dtype == x.dtype
        err = rel_norm(gr, r)
        grad_tol = 1e-10 if x.dtype == F64 else TOL[x.dtype][1]  # rounding of the stored gradient
        assert err < grad_tol, f"gradient relative norm error {err:.2e}"
        torch.testing.assert_close(gr.double(), r, rtol=grad_tol * 10, atol=grad_tol * r.abs().max().item())


def test_ce_weight_is_cross_entropy():
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(8, 21, generator=g), torch.randn(8, 21, generator=g)
    target = torch.randint(0, 21, (8,), generator=g)
    target[3] = -100
    for loss in LOSSES:
        parts = call(loss, s, t, target=target, ce_weight=0.7, return_parts=True)
        ce = F.cross_entropy(s, target, ignore_index=-100)
        torch.testing.assert_close(parts.hard, ce, rtol=1e-6, atol=0)
        torch.testing.assert_close(parts.soft, call(loss, s, t, target=target), rtol=1e-6, atol=0)
        torch.testing.assert_close(parts.loss, parts.soft + 0.7 * parts.hard, rtol=1e-6, atol=0)


def test_return_parts():
    s = torch.randn(2, 4, 9, requires_grad=True)
    t = torch.randn(2, 4, 9)
    target = torch.randint(0, 9, (2, 4))
    for loss in LOSSES:
        parts = call(loss, s, t, target=target, ce_weight=0.5, return_parts=True, reduction="none")
        assert isinstance(parts, fastkd.LossParts) and parts._fields == ("loss", "soft", "hard")
        assert parts.loss.requires_grad and not parts.soft.requires_grad and not parts.hard.requires_grad
        assert parts.soft.dtype == parts.hard.dtype == torch.float32
        assert parts.soft.shape == parts.hard.shape == (2, 4)
        no_target = call(loss, s, t, return_parts=True)
        assert no_target.hard.item() == 0.0 and torch.equal(no_target.loss.detach(), no_target.soft)
        assert call(loss, s.double(), t.double(), return_parts=True).soft.dtype == F64


# ----------------------------------------------------------------------------
# numerics: confident rows, masked vocab, log-probs below -104, NaN
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("beta", (0.1, 0.5, 0.9))
def test_no_nan_far_below_minus_104(loss, beta):
    """Liger's open JSD bug: both log-probs below about -104 with 0 < beta < 1 gave NaN (exp underflows)."""
    V = 64
    s = torch.zeros(3, V)
    t = torch.zeros(3, V)
    s[:, 1:] = -150.0  # student: log-probs of -150 everywhere but class 0
    t[:, 1:] = -130.0
    t[1, 0] = -130.0
    t[1, 5] = 0.0  # teacher confident elsewhere: gaps of 150 and 130 on either side
    s[2, :] = torch.linspace(-300, 0, V)  # log-probs down to -300
    if loss.startswith("renyi"):
        pytest.skip("Renyi's S = sum p^r q^(1 - r) of these rows (e^-140, e^+130) is outside float32's range: +inf "
                    "(documented; test_renyi_out_of_float32_range)")
    params = {**FUNCS[loss][1], **({"beta": beta} if loss == "jsd" else {})}
    fn = FUNCS[loss][0]
    x, y = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = fn(x, y, reduction="none", **params)
    grads = torch.autograd.grad(out.sum(), [x, y])
    x64, y64 = s.double().requires_grad_(), t.double().requires_grad_()
    ref = fn(x64, y64, reduction="none", **params)
    refs = torch.autograd.grad(ref.sum(), [x64, y64])
    assert torch.isfinite(ref).all()
    assert torch.isfinite(out).all() and all(torch.isfinite(gr).all() for gr in grads)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    # float32 log-probs near -300 carry an absolute error of about 300 * eps (relative 1e-3 here), and a
    # saturated JSD (disjoint p, q) has a true gradient near 1e-17: relative plus a float32-sized absolute bound
    for gr, r in zip(grads, refs):
        assert (gr.double() - r).norm() <= 1e-3 * r.norm() + 1e-6


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_confident_rows(loss, dtype):
    """Logit gaps of 100: the student (or the teacher) puts all its float32 mass on one class."""
    g = torch.Generator().manual_seed(11)
    V = 50
    s = torch.randn(4, V, generator=g)
    t = torch.randn(4, V, generator=g)
    s[0, 3] += 100
    t[1, 7] += 100
    s[2, 9] += 100
    t[2, 9] += 100
    s[3, 1] += 100
    t[3, 2] += 100
    if loss == "renyi_rev":  # order 2: S = sum q^2 / p of rows 1 and 3 is e^100 (inf in float32: documented)
        s, t = s[[0, 2]], t[[0, 2]]
    x, y = s.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()
    out = call(loss, x, y, reduction="none")
    grads = torch.autograd.grad(out.sum(), [x, y])
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    ref = call(loss, x64, y64, reduction="none")
    refs = torch.autograd.grad(ref.sum(), [x64, y64])
    assert torch.isfinite(out).all() and all(torch.isfinite(gr).all() for gr in grads)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad_tol = 1e-5 if dtype == torch.float32 else 1e-2
    for gr, r in zip(grads, refs):
        if loss == "renyi_rev":  # rows 0, 2: a saturated student (q one-hot), true gradients near 1e-43: absolute
            assert (gr.double() - r).abs().max() < grad_tol * 1e-1
            continue
        assert rel_norm(gr, r) < grad_tol


@pytest.mark.parametrize("loss", LOSSES)
def test_masked_vocab_terms_are_exactly_zero(loss):
    """-inf logits on either side: no NaN, and a class masked on both sides gets gradient exactly 0."""
    s = torch.tensor([[1.0, 2.0, -INF, 0.5, -INF], [0.3, -INF, -INF, 1.0, 2.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([[0.0, -INF, -INF, 1.0, 2.0], [1.0, -INF, 0.0, 2.0, 0.1]], dtype=F64, requires_grad=True)
    if loss == "forward_kl":  # finite where the student covers the teacher's support: the mirror of reverse KL
        s, t = t, s
    if loss in ("jeffreys", "entropy_gated_kl"):  # finite only where both nets mask the same classes
        t = torch.where(torch.isneginf(s), s, t.detach().nan_to_num(neginf=0.5)).detach().requires_grad_()
    out = call(loss, s, t, reduction="none")
    gs, gt = torch.autograd.grad(out.sum(), [s, t])
    assert not torch.isnan(out).any()
    finite = torch.isfinite(out)
    # where the loss is finite, no gradient entry is NaN; classes masked on both sides get exactly 0
    assert not torch.isnan(gs[finite]).any() and not torch.isnan(gt[finite]).any()
    both = torch.isneginf(s) & torch.isneginf(t) & finite.unsqueeze(1)  # (an infinite row's gradient is not)
    assert both.any() and (gs[both] == 0).all() and (gt[both] == 0).all()
    # a class masked on both sides contributes nothing: dropping it leaves the row's loss unchanged (not the
    # entropy gate's: its log V counts every class of the row, masked or not)
    for row, dropped in ((0, 2), (1, 1)) if loss != "entropy_gated_kl" else ():
        cols = [c for c in range(5) if c != dropped]
        alone = call(loss, s.detach()[row:row + 1, cols], t.detach()[row:row + 1, cols], reduction="none")
        torch.testing.assert_close(alone, out.detach()[row:row + 1], rtol=1e-14, atol=0)


def test_jsd_finite_where_one_side_masks():
    """The teacher masks a class the student uses: the JSD is finite (m > 0 there), reverse KL is inf."""
    s = torch.tensor([[1.0, 2.0, 0.5]], dtype=F64, requires_grad=True)
    t = torch.tensor([[0.0, -INF, 1.0]], dtype=F64)
    out = fastkd.jsd_loss(s, t, beta=0.5)
    expected = hand_row("jsd", s[0].tolist(), t[0].tolist(), 1.0, {"beta": 0.5})
    assert math.isclose(out.item(), expected, rel_tol=1e-12)
    assert torch.isfinite(torch.autograd.grad(out, s)[0]).all()
    assert fastkd.reverse_kl_loss(s, t).item() == INF


@pytest.mark.parametrize("loss", LOSSES)
def test_nan_propagates_and_skipped_rows_are_not_read(loss):
    s = torch.randn(4, 6, dtype=F64)
    t = torch.randn(4, 6, dtype=F64)
    s[0, 2] = float("nan")
    out = call(loss, s, t, reduction="none")
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()
    # the NaN row ignored (target) or weighted 0: loss finite, gradient 0 there, its target never used
    s[1, 0] = INF
    t[1, 3] = float("nan")
    x, y = s.clone().requires_grad_(), t.clone().requires_grad_()
    target = torch.tensor([-100, 1, 2, 3])
    weight = torch.tensor([1.0, 0.0, 1.0, 2.0], dtype=F64)
    out = call(loss, x, y, target=target, sample_weight=weight, ce_weight=0.5, reduction="sum")
    gs, gt = torch.autograd.grad(out, [x, y])
    assert torch.isfinite(out)
    assert (gs[:2] == 0).all() and (gt[:2] == 0).all()
    clean = call(loss, s[2:], t[2:], target=target[2:], sample_weight=weight[2:], ce_weight=0.5, reduction="sum")
    torch.testing.assert_close(out, clean, rtol=1e-14, atol=0)


def test_batchmean_counts_all_leading_dims_and_empty_batches():
    s, t = torch.randn(3, 4, 10), torch.randn(3, 4, 10)
    for loss in LOSSES:
        torch.testing.assert_close(call(loss, s, t), call(loss, s, t, reduction="sum") / 12)
        empty = call(loss, s, t, target=torch.full((3, 4), -100))
        assert empty.item() == 0.0
        zero_rows = call(loss, torch.randn(0, 10), torch.randn(0, 10))
        assert zero_rows.item() == 0.0


# ----------------------------------------------------------------------------
# API: backends, errors, modules
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss", LOSSES)
def test_auto_runs_without_a_warning_and_matches_the_reference(loss):
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused CPU op exists: no fallback warning
        out = call(loss, s, t)
    torch.testing.assert_close(out, call(loss, s, t, backend="reference"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", LOSSES)
def test_explicit_backend_that_cannot_run_says_why(loss):
    name = loss.replace("_rev", "")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=f"backend 'cuda' is unavailable for {name}"):
            call(loss, torch.randn(2, 5), torch.randn(2, 5), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        call(loss, torch.randn(2, 5), torch.randn(2, 5), backend="fast")


@pytest.mark.parametrize("loss", LOSSES)
def test_bad_arguments(loss):
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    target = torch.tensor([0, 1, 2])
    cases = [
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=torch.tensor(2.0)), TypeError, "temperature must be a Python number"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(ce_weight=0.5), ValueError, "ce_weight=0.5 adds a cross-entropy term, which needs target"),
        (dict(ce_weight=float("nan"), target=target), ValueError, "ce_weight must be finite"),
        (dict(return_parts=1), TypeError, "return_parts must be a bool"),
        (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (dict(target=torch.tensor([0, 5, 1])), ValueError, "target has class index 5 outside"),
        (dict(sample_weight=torch.ones(4)), ValueError, "sample_weight must have one weight per row"),
    ]
    for kwargs, exc, message in cases:
        with pytest.raises(exc, match=message):
            call(loss, s, t, **kwargs)
    with pytest.raises(ValueError, match="must have the same shape"):
        call(loss, s, torch.randn(3, 4))  # a narrower teacher (a wider one is truncated: teacher_vocab)
    with pytest.raises(ValueError, match="must have the same shape"):
        call(loss, s, torch.randn(2, 6))
    with pytest.raises(TypeError, match="student_logits must be a floating tensor"):
        call(loss, s.long(), t)
    with pytest.raises(TypeError, match="teacher_logits must be a torch.Tensor"):
        call(loss, s, [1.0])


def test_bad_divergence_parameters():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    for value, exc in ((-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("0.5", TypeError)):
        with pytest.raises(exc, match="beta must"):
            fastkd.jsd_loss(s, t, beta=value)
        with pytest.raises(exc, match="skew must"):
            fastkd.skew_kl_loss(s, t, skew=value)
    with pytest.raises(TypeError, match="reverse must be a bool"):
        fastkd.skew_kl_loss(s, t, reverse=1)


MODULES = {
    "forward_kl": (fastkd.nn.ForwardKLLoss, {}),
    "reverse_kl": (fastkd.nn.ReverseKLLoss, {}),
    "jsd": (fastkd.nn.JSDLoss, {"beta": 0.3}),
    "skew_kl": (fastkd.nn.SkewKLLoss, {"skew": 0.2}),
    "skew_kl_rev": (fastkd.nn.SkewKLLoss, {"skew": 0.2, "reverse": True}),
    "tvd": (fastkd.nn.TVDLoss, {}),
    "jeffreys": (fastkd.nn.JeffreysLoss, {}),
    "triangular": (fastkd.nn.TriangularLoss, {}),
    "entropy_gated_kl": (fastkd.nn.EntropyGatedKLLoss, GATE),
    "alpha_divergence": (fastkd.nn.AlphaDivergenceLoss, {"alpha": 0.3}),
    "ab_divergence": (fastkd.nn.ABDivergenceLoss, {"alpha": 0.2, "beta": 0.7}),
    "renyi": (fastkd.nn.RenyiLoss, {"order": 0.5}),
    "renyi_rev": (fastkd.nn.RenyiLoss, {"order": 2.0, "reverse": True}),
}


@pytest.mark.parametrize("loss", LOSSES)
def test_modules_match_functionals(loss):
    cls, params = MODULES[loss]
    s, t = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    target = torch.tensor([[1, -100, 2], [3, 4, 5]])
    weight = torch.rand(2, 3)
    module = cls(temperature=2.0, reduction="sum", ce_weight=0.25, **params)
    expected = call(loss, s, t, temperature=2.0, reduction="sum", target=target, sample_weight=weight,
                    ce_weight=0.25)
    assert torch.equal(module(s, t, target, sample_weight=weight), expected)
    parts = cls(return_parts=True, **params)(s, t, target)
    assert isinstance(parts, fastkd.LossParts)
    assert "temperature=2.0" in repr(module) and "ce_weight=0.25" in repr(module)
    for kwargs, exc, message in ((dict(temperature=-1.0), ValueError, "temperature"),
                                 (dict(reduction="x"), ValueError, "reduction"),
                                 (dict(backend="x"), ValueError, "backend"),
                                 (dict(ce_weight="a"), TypeError, "ce_weight"),
                                 (dict(return_parts=None), TypeError, "return_parts")):
        with pytest.raises(exc, match=message):
            cls(**params, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda' is unavailable"):
            cls(backend="cuda", **params)(s, t)


def test_module_parameter_errors():
    with pytest.raises(ValueError, match="beta must be in"):
        fastkd.nn.JSDLoss(beta=2.0)
    with pytest.raises(ValueError, match="skew must be in"):
        fastkd.nn.SkewKLLoss(skew=-1.0)
    with pytest.raises(TypeError, match="reverse must be a bool"):
        fastkd.nn.SkewKLLoss(reverse="yes")
    for kwargs, message in ((dict(alpha_min=-0.1), "alpha_min must be in"), (dict(alpha_max=1.5), "alpha_max must be in"),
                            (dict(tau=float("nan")), "tau must be finite"), (dict(scale=0.0), "scale must be")):
        with pytest.raises(ValueError, match=message):
            fastkd.nn.EntropyGatedKLLoss(**kwargs)
        with pytest.raises(ValueError, match=message):
            fastkd.entropy_gated_kl_loss(torch.randn(2, 5), torch.randn(2, 5), **kwargs)
        with pytest.raises(ValueError, match=message):
            fastkd.fused_linear_kd_loss(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 5),
                                        divergence="entropy_gated_kl", **kwargs)


def test_public_names():
    for name in ("forward_kl_loss", "reverse_kl_loss", "jsd_loss", "skew_kl_loss", "tvd_loss", "jeffreys_loss",
                 "triangular_loss", "entropy_gated_kl_loss"):
        assert getattr(fastkd, name) is getattr(fastkd.functional, name)
        assert name in fastkd.__all__ and name in fastkd.functional.__all__ and name in R.__all__
        assert "T^2" in getattr(fastkd, name).__doc__
    for name in ("ForwardKLLoss", "ReverseKLLoss", "JSDLoss", "SkewKLLoss", "TVDLoss", "JeffreysLoss", "TriangularLoss",
                 "EntropyGatedKLLoss"):
        assert name in fastkd.nn.__all__


def test_no_host_reads_on_the_gpu_path(monkeypatch):
    """With value checks off (as on GPU tensors), a training step reads no tensor value on the host."""
    from fastkd.core import checks as _validation

    monkeypatch.setattr(_validation, "HOST_DEVICES", ())
    s = torch.randn(2, 3, 40, requires_grad=True)
    t = torch.randn(2, 3, 40)
    target = torch.tensor([[1, -100, 2], [3, 4, 5]])
    weight = torch.tensor([[1.0, 2.0, 0.0], [0.5, 1.0, 1.0]])
    tk = fastkd.TopKTeacher.from_logits(t, 5)

    def forbid(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")
        return read

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    for loss in LOSSES:
        for teacher in (t, tk):
            out = call(loss, s, teacher, target=target, sample_weight=weight, ce_weight=0.1, return_parts=True)
            out.loss.backward()
    fastkd.kd_loss(s, tk, 2.0, target=target, sample_weight=weight).backward()


# ----------------------------------------------------------------------------
# the entropy-gated KL: its gate, its limits, w a constant in the gradients
# ----------------------------------------------------------------------------

def test_entropy_gate_limits_and_blend():
    """alpha_min = alpha_max = 1 is forward KL and = 0 reverse KL exactly; in between the per-row blend of the two
    with w from the teacher's normalised entropy (a peaked teacher row -> w near alpha_min, a flat one -> alpha_max)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 50, generator=g, dtype=F64)
    t = torch.randn(4, 50, generator=g, dtype=F64)
    t[0] *= 30.0  # peaked: normalised entropy near 0
    t[1] *= 0.01  # flat: near 1
    kw = dict(temperature=1.5, reduction="none")
    fwd, rev = fastkd.forward_kl_loss(s, t, **kw), fastkd.reverse_kl_loss(s, t, **kw)
    one = dict(alpha_min=1.0, alpha_max=1.0)
    torch.testing.assert_close(fastkd.entropy_gated_kl_loss(s, t, **one, **kw), fwd, rtol=1e-14, atol=0)
    torch.testing.assert_close(fastkd.entropy_gated_kl_loss(s, t, alpha_min=0.0, alpha_max=0.0, **kw), rev,
                               rtol=1e-14, atol=0)
    out = fastkd.entropy_gated_kl_loss(s, t, alpha_min=0.1, alpha_max=0.8, tau=0.5, scale=0.05, **kw)
    p = torch.softmax(t / 1.5, -1)
    h = -(p * p.log()).sum(-1) / math.log(50)
    w = 0.1 + 0.7 * torch.sigmoid((h - 0.5) / 0.05)
    torch.testing.assert_close(out, w * fwd + (1 - w) * rev, rtol=1e-13, atol=0)
    assert w[0] < 0.11 and w[1] > 0.79  # the peaked row seeks the mode, the flat one covers
    # alpha_min > alpha_max inverts the gate (allowed): the peaked row then leans to the forward KL
    inv = fastkd.entropy_gated_kl_loss(s, t, alpha_min=1.0, alpha_max=0.0, tau=0.5, scale=0.05, **kw)
    w_inv = 1.0 - torch.sigmoid((h - 0.5) / 0.05)
    torch.testing.assert_close(inv, w_inv * fwd + (1 - w_inv) * rev, rtol=1e-13, atol=0)
    assert w_inv[0] > 0.99 and w_inv[1] < 0.01


def test_entropy_gate_is_a_constant_in_the_gradients():
    """Both gradients are those of w KL(p || q) + (1 - w) KL(q || p) at w fixed (detached): the student's is then
    exact (w does not depend on it), the teacher's omits dw/dt (documented); differs from the full derivative."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 40, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(3, 40, generator=g, dtype=F64, requires_grad=True)
    out = fastkd.entropy_gated_kl_loss(s, t, **GATE, temperature=2.0, reduction="sum")
    gs, gt = torch.autograd.grad(out, [s, t])

    def blend(s, t, detach):
        log_p, log_q = F.log_softmax(t / 2.0, -1), F.log_softmax(s / 2.0, -1)
        p, q = log_p.exp(), log_q.exp()
        h = -(p * log_p).sum(-1) / math.log(40)
        w = GATE["alpha_min"] + (GATE["alpha_max"] - GATE["alpha_min"]) * torch.sigmoid((h - GATE["tau"]) / GATE["scale"])
        w = w.detach() if detach else w
        return (w * (p * (log_p - log_q)).sum(-1) + (1 - w) * (q * (log_q - log_p)).sum(-1)).sum()

    es, et = torch.autograd.grad(blend(s, t, True), [s, t])
    torch.testing.assert_close(gs, es, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(gt, et, rtol=1e-12, atol=1e-15)
    fs, ft = torch.autograd.grad(blend(s, t, False), [s, t])
    torch.testing.assert_close(gs, fs, rtol=1e-12, atol=1e-15)  # the student's is the exact derivative
    assert rel_norm(gt, ft) > 1e-4  # the teacher's is not (the gate's derivative is left out)


# ----------------------------------------------------------------------------
# the power divergences (Amari's alpha, AB, Renyi): closed forms, limits, special cases
# ----------------------------------------------------------------------------

def abkd_formula(p, q, a, b):
    """The AB divergence per row with its special cases as the AB-divergence papers write them (Cichocki et al.
    2011; ABKD's ``ab_div``), in float64 from the probabilities (rows with p, q > 0 everywhere: ABKD masks
    non-finite log-ratios to 0, fastkd gives the exact value, so only finite cases are compared)."""
    lp, lq = p.log(), q.log()
    if a == 0 and b == 0:
        return 0.5 * ((lp - lq) ** 2).sum(-1)
    if a == 0:  # (1 / b^2) sum [q^b log(q^b / p^b) - q^b + p^b]
        return (q ** b * (b * (lq - lp)) - q ** b + p ** b).sum(-1) / b ** 2
    if b == 0:  # (1 / a^2) sum [p^a log(p^a / q^a) - p^a + q^a]
        return (p ** a * (a * (lp - lq)) - p ** a + q ** a).sum(-1) / a ** 2
    if a + b == 0:  # (1 / a^2) sum [log(q^a / p^a) + (q^a / p^a)^-1 - 1]
        return (a * (lq - lp) + (q / p) ** (-a) - 1).sum(-1) / a ** 2
    s = a + b
    return -(p ** a * q ** b - a / s * p ** s - b / s * q ** s).sum(-1) / (a * b)


def _power_rows(seed=21, n=4, v=37):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=F64) * 2, torch.randn(n, v, generator=g, dtype=F64) * 2


@pytest.mark.parametrize("a, b", [(0.0, 0.7), (0.6, 0.0), (0.0, 0.0), (0.4, -0.4), (-1.2, 1.2), (0.2, 0.7),
                                  (-0.3, 1.1), (1.5, -0.5), (0.0, -0.6), (-0.5, 0.0)])
def test_ab_special_cases_match_the_official_formulas(a, b):
    s, t = _power_rows()
    p, q = F.softmax(t / 1.5, -1), F.softmax(s / 1.5, -1)
    out = fastkd.ab_divergence_loss(s, t, alpha=a, beta=b, temperature=1.5, reduction="none")
    torch.testing.assert_close(out, abkd_formula(p, q, a, b), rtol=1e-12, atol=1e-13)


def test_ab_known_members():
    s, t = _power_rows(22)
    kw = dict(temperature=2.0, reduction="none")
    p, q = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    torch.testing.assert_close(fastkd.ab_divergence_loss(s, t, alpha=1.0, beta=0.0, **kw),
                               fastkd.forward_kl_loss(s, t, **kw), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fastkd.ab_divergence_loss(s, t, alpha=0.0, beta=1.0, **kw),
                               fastkd.reverse_kl_loss(s, t, **kw), rtol=1e-12, atol=1e-14)
    hellinger4 = 4 * (1 - (p * q).sqrt().sum(-1))
    torch.testing.assert_close(fastkd.ab_divergence_loss(s, t, alpha=0.5, beta=0.5, **kw), hellinger4, rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(fastkd.alpha_divergence_loss(s, t, alpha=0.5, **kw), hellinger4, rtol=1e-12, atol=0)
    torch.testing.assert_close(fastkd.alpha_divergence_loss(s, t, alpha=0.3, **kw),
                               fastkd.ab_divergence_loss(s, t, alpha=0.3, beta=0.7, **kw), rtol=0, atol=0)
    r = 0.5  # Renyi of order 1/2: -2 log sum sqrt(p q); order 2 reversed: log sum q^2 / p
    torch.testing.assert_close(fastkd.renyi_loss(s, t, order=r, **kw), -2 * (p * q).sqrt().sum(-1).log(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(fastkd.renyi_loss(s, t, order=2.0, reverse=True, **kw), (q * q / p).sum(-1).log(),
                               rtol=1e-12, atol=0)


def _fused_and_ref(fn, backend, s, t, **kw):
    """The loss and student gradient of a fused backend on float32 logits, and the float64 reference's on the
    same values."""
    device = torch.device("cpu")
    x = s.float().to(device).requires_grad_()
    out = fn(x, t.float().to(device), backend=backend, **kw)
    (g,) = torch.autograd.grad(out, [x])
    x64 = s.float().double().requires_grad_()
    ref = fn(x64, t.float().double(), backend="reference", **kw)
    (g64,) = torch.autograd.grad(ref, [x64])
    return out.double().detach(), g.double(), ref.detach(), g64


POWER_LIMITS = [  # (function, parameters, the limit it approaches)
    (fastkd.alpha_divergence_loss, {"alpha": 1e-6}, "reverse_kl"),
    (fastkd.alpha_divergence_loss, {"alpha": 1 - 1e-6}, "forward_kl"),
    (fastkd.ab_divergence_loss, {"alpha": 1e-6, "beta": 1.0}, "reverse_kl"),
    (fastkd.ab_divergence_loss, {"alpha": 1.0, "beta": -1e-6}, "forward_kl"),
    (fastkd.renyi_loss, {"order": 1 + 1e-6}, "forward_kl"),
    (fastkd.renyi_loss, {"order": 1 - 1e-6}, "forward_kl"),
    (fastkd.renyi_loss, {"order": 1 + 1e-6, "reverse": True}, "reverse_kl"),
    (fastkd.ab_divergence_loss, {"alpha": 0.4, "beta": -0.4 + 1e-5}, None),  # 0 < |s| small: no cancellation
    (fastkd.ab_divergence_loss, {"alpha": 1e-7, "beta": 2e-7}, None),  # a, b, s all near 0: d^2 / 2
    (fastkd.ab_divergence_loss, {"alpha": -2e-4, "beta": 3e-4}, None),
]


@pytest.mark.parametrize("backend", ("cpu", "triton"))
@pytest.mark.parametrize("fn, params, limit", POWER_LIMITS,
                         ids=[f"{f.__name__}-{p}" for f, p, _ in POWER_LIMITS])
def test_power_divergence_limits_in_float32(fn, params, limit, backend):
    """Near the limits of their parameters the fused float32 kernels stay within float32 rounding of float64
    (the forms have no cancellation there), and the value is that of the limit (KL) to O(distance)."""
    from backend_cases import skip_unless_runs

    skip_unless_runs({"alpha_divergence_loss": "alpha_divergence", "ab_divergence_loss": "ab_divergence",
                      "renyi_loss": "renyi"}[fn.__name__], backend)
    s, t = _power_rows(23, n=3, v=2 * 2048 + 9)
    out, g, ref, g64 = _fused_and_ref(fn, backend, s, t, temperature=1.5, **params)
    assert abs(out.item() - ref.item()) <= 2e-6 * abs(ref.item())
    assert rel_norm(g, g64) < 2e-6
    if limit is not None:
        kl = getattr(fastkd, f"{limit}_loss")(s.float().double(), t.float().double(), temperature=1.5)
        assert abs(ref.item() - kl.item()) <= 2e-5 * abs(kl.item())
    else:  # a, b, s near 0 together: sum (lp - lq)^2 / 2 to first order
        lp, lq = F.log_softmax(t.float().double() / 1.5, -1), F.log_softmax(s.float().double() / 1.5, -1)
        if max(abs(v) for v in params.values()) < 1e-3:
            half_sq = 0.5 * ((lp - lq) ** 2).sum(-1).mean()
            assert abs(ref.item() - half_sq.item()) <= 1e-2 * half_sq.item()


@pytest.mark.parametrize("r", (0.5, 2.0, 3.5))
@pytest.mark.parametrize("reverse", (False, True))
def test_renyi_by_formula(r, reverse):
    s, t = _power_rows(24)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    x, y = (q, p) if reverse else (p, q)
    out = fastkd.renyi_loss(s, t, order=r, reverse=reverse, reduction="none")
    torch.testing.assert_close(out, (x ** r * y ** (1 - r)).sum(-1).log() / (r - 1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ("reference", "cpu", "triton"))
def test_power_divergences_with_one_sided_mass_are_inf_never_nan(backend):
    """A class with mass on one side only: Amari alpha < 0 with p = 0 (and alpha > 1 with q = 0), Renyi of order >= 1
    with q = 0 < p: +inf; AB with s, a, b > 0 stays finite (p^s / (b s)); classes both nets mask add 0."""
    if backend != "reference":
        from backend_cases import skip_unless_runs
        skip_unless_runs("ab_divergence", backend)
    s, t = torch.randn(3, 2 * 2048 + 3, dtype=torch.float32), torch.randn(3, 2 * 2048 + 3, dtype=torch.float32)
    t[0, 5] = -INF  # p = 0 < q
    s[1, 4097] = -INF  # q = 0 < p (past the first block)
    s[2, 7], t[2, 7] = -INF, -INF  # both: adds 0
    cases = [(fastkd.alpha_divergence_loss, {"alpha": -0.5}, [True, False, False]),
             (fastkd.alpha_divergence_loss, {"alpha": 1.5}, [False, True, False]),
             (fastkd.ab_divergence_loss, {"alpha": 0.2, "beta": 0.7}, [False, False, False]),
             (fastkd.ab_divergence_loss, {"alpha": 0.0, "beta": 0.0}, [True, True, False]),
             (fastkd.renyi_loss, {"order": 2.0}, [False, True, False]),
             (fastkd.renyi_loss, {"order": 0.5}, [False, False, False])]
    for fn, params, infinite in cases:
        out = fn(s, t, reduction="none", backend=backend, **params)
        assert not out.isnan().any(), (fn.__name__, params)
        assert out.isinf().tolist() == infinite, (fn.__name__, params, out)
        ref = fn(s.double(), t.double(), reduction="none", backend="reference", **params)
        finite = ~ref.isinf()
        torch.testing.assert_close(out.double()[finite], ref[finite], rtol=2e-5, atol=0)


def test_power_parameter_errors():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    for fn, kwargs, exc, message in (
            (fastkd.alpha_divergence_loss, dict(alpha=float("nan")), ValueError, "alpha must be finite"),
            (fastkd.ab_divergence_loss, dict(beta=float("inf")), ValueError, "beta must be finite"),
            (fastkd.ab_divergence_loss, dict(alpha="a"), TypeError, "alpha must be a number"),
            (fastkd.renyi_loss, dict(order=0.0), ValueError, "order"),
            (fastkd.renyi_loss, dict(order=float("inf")), ValueError, "order"),
            (fastkd.renyi_loss, dict(reverse=1), TypeError, "reverse must be a bool")):
        with pytest.raises(exc, match=message):
            fn(s, t, **kwargs)
        module = {"alpha_divergence_loss": fastkd.nn.AlphaDivergenceLoss, "ab_divergence_loss":
                  fastkd.nn.ABDivergenceLoss, "renyi_loss": fastkd.nn.RenyiLoss}[fn.__name__]
        with pytest.raises(exc, match=message):
            module(**kwargs)
        divergence = fn.__name__[:-len("_loss")]
        with pytest.raises(exc, match=message):
            fastkd.fused_linear_kd_loss(torch.randn(2, 3), torch.randn(5, 3), torch.randn(2, 5),
                                        divergence=divergence, **kwargs)
    # AB's beta is any real (JSD's is in [0, 1])
    assert torch.isfinite(fastkd.ab_divergence_loss(s, t, alpha=0.5, beta=-2.0))


def test_renyi_out_of_float32_range():
    """Rows whose S = sum p^r q^(1 - r) leaves float32's range (the divergence above about 87 / |1 - r|) give +inf on
    the fused backends, never NaN, and the rows around them are unaffected; float64 (the reference) is finite."""
    s, t = torch.zeros(3, 64), torch.zeros(3, 64)
    s[:, 1:] = -400.0
    t[:, 1:] = -400.0
    t[1, 0], t[1, 5] = -400.0, 0.0  # the nets confident on different classes: D about 400
    for order, reverse in ((0.5, False), (2.0, True)):
        out = fastkd.renyi_loss(s, t, order=order, reverse=reverse, reduction="none")
        ref = fastkd.renyi_loss(s.double(), t.double(), order=order, reverse=reverse, reduction="none")
        assert not out.isnan().any() and torch.isfinite(ref).all()
        assert out[1] == INF and ref[1] > 87 / abs(1 - order)
        torch.testing.assert_close(out[[0, 2]].double(), ref[[0, 2]], rtol=1e-5, atol=1e-6)
