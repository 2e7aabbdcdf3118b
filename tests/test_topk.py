"""fastkd.TopKTeacher: top-k teacher log-probs as the teacher of kd_loss and the LM divergences.

Expected values: Python-float loops over the K (+1) buckets, the eager PyTorch
path written out here (full log_softmax, gather, tail bucket, KL over K + 1), and
TRL's server-distillation ``_add_tail_bucket`` when trl is installed.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import reference as R

F64 = torch.float64
INF = float("inf")
DIVERGENCES = {
    "kd": lambda s, t, **kw: fastkd.kd_loss(s, t, kw.pop("temperature", 1.0), **kw),
    "reverse_kl": fastkd.reverse_kl_loss,
    "jsd": lambda s, t, **kw: fastkd.jsd_loss(s, t, beta=0.3, **kw),
    "skew_kl": lambda s, t, **kw: fastkd.skew_kl_loss(s, t, skew=0.2, **kw),
    "skew_kl_rev": lambda s, t, **kw: fastkd.skew_kl_loss(s, t, skew=0.2, reverse=True, **kw),
    "tvd": fastkd.tvd_loss,
}
MODES = ("tail", "renormalize")


def rel_norm(g, r):
    g, r = g.double(), r.double()
    return ((g - r).norm() / r.norm().clamp_min(1e-300)).item()


def teacher(ids, logprobs, mode="tail", dtype=F64):
    return fastkd.TopKTeacher(torch.tensor(ids), torch.tensor(logprobs, dtype=dtype), mode=mode)


# ----------------------------------------------------------------------------
# independent math: Python floats
# ----------------------------------------------------------------------------

def hand_buckets(s_row, ids, lps, T, mode):
    """(p, q) over the buckets of one row, as plain probabilities."""
    m = max(x / T for x in s_row)
    z = sum(math.exp(x / T - m) for x in s_row)
    q_all = [math.exp(x / T - m) / z for x in s_row]
    kept = [(i, lp) for i, lp in zip(ids, lps) if i != -1]
    p = [math.exp(lp) for _, lp in kept]
    q = [q_all[i] for i, _ in kept]
    if mode == "renormalize":
        sp, sq = sum(p), sum(q)
        return [x / sp for x in p] if sp else p, [x / sq for x in q] if sq else q
    chosen = {i for i, _ in kept}
    q_tail = sum(v for c, v in enumerate(q_all) if c not in chosen)
    return p + [max(0.0, 1.0 - sum(p))], q + [q_tail]


def hand_kl(a, b):
    return sum(x * math.log(x / y) if y > 0 else INF for x, y in zip(a, b) if x > 0)


def hand_loss(name, p, q, T):
    if name == "kd":
        return T * T * hand_kl(p, q)
    if name == "reverse_kl":
        return hand_kl(q, p)
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if name == "jsd":
        m = [0.3 * x + 0.7 * y for x, y in zip(p, q)]
        return 0.3 * hand_kl(p, m) + 0.7 * hand_kl(q, m)
    if name == "skew_kl":
        return hand_kl(p, [0.2 * x + 0.8 * y for x, y in zip(p, q)])
    return hand_kl(q, [0.8 * x + 0.2 * y for x, y in zip(p, q)])


S_ROWS = [[1.0, -0.5, 2.0, 0.3, -1.0, 0.7], [0.0, 3.0, -2.0, 1.0, 0.5, -0.2], [0.4, 0.1, -0.3, 2.2, 1.1, 0.0]]
IDS = [[2, 0, 5], [1, -1, 3], [-1, -1, -1]]  # a padding slot, and a row of padding only
LPS = [[-0.6, -1.5, -2.5], [-0.2, float("nan"), -2.0], [0.0, 0.0, 0.0]]  # padding log-probs are never read


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", (1.0, 2.0))
def test_matches_hand_computation(name, mode, T):
    s = torch.tensor(S_ROWS, dtype=F64, requires_grad=True)
    out = DIVERGENCES[name](s, teacher(IDS, LPS, mode), temperature=T, reduction="none")
    expected = [hand_loss(name, *hand_buckets(r, i, lp, T, mode), T) for r, i, lp in zip(S_ROWS, IDS, LPS)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-14)
    # padding only: no mass on either side (p = q = the tail); a mixture's log m rounds log(0.3 + 0.7)
    assert abs(out[2].item()) < 1e-15
    g, = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(g).all() and (g[2] == 0).all()


def test_topk_log_probs_buckets():
    x = torch.tensor(S_ROWS, dtype=F64)
    ids = torch.tensor(IDS)
    lps = torch.tensor(LPS, dtype=F64)
    log_p, log_q = R.topk_log_probs(x, ids, lps, "tail")
    assert log_p.shape == log_q.shape == (3, 4)
    p, q = hand_buckets(S_ROWS[0], IDS[0], LPS[0], 1.0, "tail")
    torch.testing.assert_close(log_p[0].exp(), torch.tensor(p, dtype=F64), rtol=1e-13, atol=0)
    torch.testing.assert_close(log_q[0].exp(), torch.tensor(q, dtype=F64), rtol=1e-13, atol=0)
    assert torch.isneginf(log_p[1, 1]) and torch.isneginf(log_q[1, 1])  # the padding slot
    log_p, log_q = R.topk_log_probs(x, ids, lps, "renormalize")
    assert log_p.shape == (3, 3)
    torch.testing.assert_close(log_q[:2].exp().sum(1), torch.ones(2, dtype=F64))
    assert torch.isneginf(log_q[2]).all() and torch.isneginf(log_p[2]).all()


# ----------------------------------------------------------------------------
# against the eager PyTorch path and TRL
# ----------------------------------------------------------------------------

def eager_tail_kl(s, ids, lps, T):
    """The usual eager path: full log_softmax, gather, tail = log(1 - sum exp), KL over K + 1 (float64)."""
    log_q_all = F.log_softmax(s.double() / T, dim=-1)
    log_q = log_q_all.gather(-1, ids)
    log_p = lps.double()
    tail_p = torch.log1p(-log_p.exp().sum(-1, keepdim=True))
    tail_q = torch.log1p(-log_q.exp().sum(-1, keepdim=True))
    log_p, log_q = torch.cat([log_p, tail_p], -1), torch.cat([log_q, tail_q], -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("dtype", (F64, torch.float32, torch.bfloat16, torch.float16))
def test_kd_matches_eager_path_3d(dtype):
    g = torch.Generator().manual_seed(1)
    B, L, V, K, T = 2, 3, 300, 8, 2.0
    s = (torch.randn(B, L, V, generator=g) * 2).to(dtype).requires_grad_()
    t_logits = torch.randn(B, L, V, generator=g) * 2
    tk = fastkd.TopKTeacher.from_logits(t_logits.double(), K)  # log-probs at T = 1, taken as given
    target = torch.tensor([[1, -100, 2], [3, 4, -100]])
    weight = torch.tensor([[1.0, 5.0, 0.5], [2.0, 0.0, 1.0]])
    out = fastkd.kd_loss(s, tk, T, target=target, sample_weight=weight)
    s64 = s.detach().double().requires_grad_()
    rows = eager_tail_kl(s64, tk.indices, tk.logprobs, T) * T * T
    counted = (target != -100).double()
    ref = (rows * counted * weight.double()).sum() / counted.sum()
    tol = 1e-12 if dtype == F64 else 2e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    g_out, = torch.autograd.grad(out, s)
    g_ref, = torch.autograd.grad(ref, s64)
    assert g_out.dtype == dtype
    assert rel_norm(g_out, g_ref) < {F64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    # the student gradient is dense in tail mode: classes outside the top-k move too
    outside = torch.ones(B, L, V, dtype=torch.bool).scatter_(-1, tk.indices, False)
    assert (g_ref[outside & (counted * weight > 0).unsqueeze(-1)] != 0).all()


def test_tail_matches_trl_add_tail_bucket():
    pytest.importorskip("trl", reason="trl is not installed (pip install trl) - TRL comparison skipped")
    try:
        from trl.experimental.server_distillation.server_distillation_trainer import _add_tail_bucket
    except ImportError:
        pytest.skip("this trl has no server_distillation _add_tail_bucket")
    g = torch.Generator().manual_seed(2)
    s = torch.randn(5, 200, generator=g, dtype=F64)
    tk = fastkd.TopKTeacher.from_logits(torch.randn(5, 200, generator=g, dtype=F64) * 2, 6)
    log_q_k = F.log_softmax(s, -1).gather(-1, tk.indices)
    valid = torch.ones_like(tk.indices, dtype=torch.bool)
    trl_q, _ = _add_tail_bucket(log_q_k, valid)
    trl_p, _ = _add_tail_bucket(tk.logprobs, valid)
    log_p, log_q = R.topk_log_probs(s, tk.indices, tk.logprobs, "tail")
    # TRL clamps the top-k log-sum at -1e-7; every tail here is far above that, so they agree
    torch.testing.assert_close(log_q, trl_q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_p, trl_p, rtol=1e-12, atol=1e-12)


def test_renormalize_over_all_ids_is_the_dense_loss():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 12, generator=g, dtype=F64), torch.randn(4, 12, generator=g, dtype=F64)
    ids = torch.stack([torch.randperm(12, generator=g) for _ in range(4)])
    tk = fastkd.TopKTeacher(ids, F.log_softmax(t / 1.5, -1).gather(-1, ids), mode="renormalize")
    for name in ("reverse_kl", "jsd", "skew_kl", "skew_kl_rev", "tvd"):
        dense = DIVERGENCES[name](s, t, temperature=1.5)
        torch.testing.assert_close(DIVERGENCES[name](s, tk, temperature=1.5), dense, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fastkd.kd_loss(s, tk, 1.5), R.kd_loss(s, t, 1.5, reduction="sum") / 4,
                               rtol=1e-12, atol=0)


def test_padding_equals_a_shorter_row():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(1, 30, generator=g, dtype=F64)
    full = fastkd.TopKTeacher(torch.tensor([[4, 9, 1]]), torch.tensor([[-0.5, -1.5, -3.0]], dtype=F64))
    padded = fastkd.TopKTeacher(torch.tensor([[-1, 4, -1, 9, 1]]),
                                torch.tensor([[7.0, -0.5, float("nan"), -1.5, -3.0]], dtype=F64))
    for mode in MODES:
        full.mode = padded.mode = mode
        for fn in DIVERGENCES.values():
            torch.testing.assert_close(fn(s, padded), fn(s, full), rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------
# gradients, temperature, numerics
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_student_and_teacher(name, mode):
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 2, 7, generator=g, dtype=F64).requires_grad_()
    ids = torch.tensor([[[0, 3, -1], [6, 2, 4]], [[1, 5, 0], [-1, 2, 3]]])
    lps = (F.log_softmax(torch.randn(2, 2, 7, generator=g, dtype=F64), -1).gather(-1, ids.clamp_min(0)) - 0.1)
    lps = lps.requires_grad_()
    target = torch.tensor([[1, -100], [2, 3]])

    def f(a, b):
        return DIVERGENCES[name](a, fastkd.TopKTeacher(ids, b, mode=mode), temperature=1.3, target=target)

    assert torch.autograd.gradcheck(f, (s, lps))


def test_renormalize_student_gradient_is_zero_outside_the_ids():
    s = torch.randn(3, 20, dtype=F64, requires_grad=True)
    tk = fastkd.TopKTeacher.from_logits(torch.randn(3, 20, dtype=F64), 5, mode="renormalize")
    g, = torch.autograd.grad(fastkd.jsd_loss(s, tk), s)
    outside = torch.ones(3, 20, dtype=torch.bool).scatter_(-1, tk.indices, False)
    assert (g[outside] == 0).all() and (g[~outside] != 0).any()


def test_temperature_divides_the_student_only_and_kd_keeps_t2():
    s = torch.tensor([S_ROWS[0]], dtype=F64)
    tk = teacher([IDS[0]], [LPS[0]])
    p, q = hand_buckets(S_ROWS[0], IDS[0], LPS[0], 3.0, "tail")
    assert math.isclose(fastkd.kd_loss(s, tk, 3.0).item(), 9.0 * hand_kl(p, q), rel_tol=1e-12)
    assert math.isclose(fastkd.reverse_kl_loss(s, tk, temperature=3.0).item(), hand_kl(q, p), rel_tol=1e-12)
    # a tensor temperature (CTKD) gets its gradient through the student softmax and the T^2 factor
    temp = torch.tensor(3.0, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda T: fastkd.kd_loss(s, tk, T), (temp,))


@pytest.mark.parametrize("mode", MODES)
def test_confident_student_and_tiny_tails_in_float32(mode):
    """A student with gaps of 100 and a teacher whose top-k holds all but 1e-9 of the mass: no inf, no NaN."""
    V = 1000
    s = torch.zeros(2, V)
    s[0, 7] = 100.0  # the student's mass sits on one id of the top-k
    s[1, 500] = 100.0  # ... or on one id outside it
    ids = torch.tensor([[7, 3, 2, 1], [7, 3, 2, 1]])
    lps = torch.log(torch.tensor([[1 - 3e-9, 1e-9, 5e-10, 5e-10]] * 2, dtype=F64))
    for name, fn in DIVERGENCES.items():
        x = s.clone().requires_grad_()
        out = fn(x, fastkd.TopKTeacher(ids, lps.float(), mode=mode), reduction="none")
        x64 = s.double().requires_grad_()
        ref = fn(x64, fastkd.TopKTeacher(ids, lps.float().double(), mode=mode), reduction="none")
        g, = torch.autograd.grad(out.sum(), x)
        g64, = torch.autograd.grad(ref.sum(), x64)
        assert torch.isfinite(ref).all(), name
        assert torch.isfinite(out).all() and torch.isfinite(g).all(), name
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
        assert (g.double() - g64).norm() <= 1e-4 * g64.norm() + 1e-6, name


def test_skipped_rows_are_never_read():
    s = torch.randn(3, 10, dtype=F64)
    s[1] = float("nan")
    ids = torch.tensor([[0, 1], [5, 5], [3, 99]])  # rows 1 and 2 repeat an id / are out of range, but are skipped
    lps = torch.tensor([[-0.5, -1.0], [float("nan"), 3.0], [-0.1, -0.2]], dtype=F64)
    target = torch.tensor([2, -100, 4])
    weight = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    x = s.clone().requires_grad_()
    for fn in DIVERGENCES.values():
        out = fn(x, fastkd.TopKTeacher(ids, lps), target=target, sample_weight=weight)
        g, = torch.autograd.grad(out, x)
        assert torch.isfinite(out) and (g[1:] == 0).all()
        out = fn(x, fastkd.TopKTeacher(ids, lps), target=target, sample_weight=weight, reduction="sum")
        torch.testing.assert_close(out, fn(s[:1], fastkd.TopKTeacher(ids[:1], lps[:1]), reduction="sum"),
                                   rtol=1e-14, atol=0)


def test_ce_weight_and_parts_with_a_topk_teacher():
    s = torch.randn(4, 10, dtype=F64)
    target = torch.tensor([1, 2, -100, 4])
    tk = fastkd.TopKTeacher.from_logits(torch.randn(4, 10, dtype=F64), 3)
    parts = fastkd.jsd_loss(s, tk, target=target, ce_weight=0.5, return_parts=True)
    torch.testing.assert_close(parts.hard, F.cross_entropy(s, target))
    torch.testing.assert_close(parts.loss, parts.soft + 0.5 * parts.hard)


# ----------------------------------------------------------------------------
# errors and the losses that do not take a TopKTeacher
# ----------------------------------------------------------------------------

def test_construction_errors():
    ids = torch.tensor([[0, 1]])
    lps = torch.tensor([[-0.1, -2.0]])
    cases = [
        ((ids.tolist(), lps), TypeError, "indices must be a torch.Tensor"),
        ((ids.int(), lps), TypeError, "indices must be an int64 tensor"),
        ((ids, lps.tolist()), TypeError, "logprobs must be a torch.Tensor"),
        ((ids, ids), TypeError, "logprobs must be a floating tensor"),
        ((ids, lps[:, :1]), ValueError, "indices and logprobs must have the same shape"),
        ((torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0)), ValueError, "K >= 1"),
        ((torch.tensor(3), torch.tensor(-1.0)), ValueError, "K >= 1"),
        ((ids, lps.to("meta")), ValueError, "must be on the same device"),
    ]
    for args, exc, message in cases:
        with pytest.raises(exc, match=message):
            fastkd.TopKTeacher(*args)
    with pytest.raises(ValueError, match="mode must be one of"):
        fastkd.TopKTeacher(ids, lps, mode="tail_bucket")
    with pytest.raises(ValueError, match="k must be an int in"):
        fastkd.TopKTeacher.from_logits(torch.randn(2, 5), 6)
    assert "mode='tail'" in repr(fastkd.TopKTeacher(ids, lps))


def test_loss_call_errors():
    s = torch.randn(2, 10)
    ok = torch.tensor([[0, 1], [2, 3]])
    lps = torch.tensor([[-0.5, -1.0], [-0.3, -2.0]])
    for fn in DIVERGENCES.values():
        with pytest.raises(ValueError, match="token id 10 outside \\[0, 10\\)"):
            fn(s, fastkd.TopKTeacher(torch.tensor([[0, 10], [2, 3]]), lps))
        with pytest.raises(ValueError, match="token id -2 outside"):
            fn(s, fastkd.TopKTeacher(torch.tensor([[0, -2], [2, 3]]), lps))
        with pytest.raises(ValueError, match="distinct within a row; a read row repeats token id 3"):
            fn(s, fastkd.TopKTeacher(torch.tensor([[0, 1], [3, 3]]), lps))
        fn(s, fastkd.TopKTeacher(torch.tensor([[0, 1], [-1, -1]]), lps))  # repeated padding is fine
        with pytest.raises(ValueError, match="leading shape of student_logits \\(2,\\)"):
            fn(s, fastkd.TopKTeacher(ok[:1], lps[:1]))
        with pytest.raises(ValueError, match="TopKTeacher must be on the student_logits' device"):
            fn(s.to("meta"), fastkd.TopKTeacher(ok, lps))
    with pytest.raises(ValueError, match="tensor temperature"):
        fastkd.kd_loss(s, fastkd.TopKTeacher(ok, lps), torch.tensor(2.0), backend="cpu")


def test_other_losses_reject_a_topk_teacher_naming_it():
    s = torch.randn(2, 10)
    tk = fastkd.TopKTeacher(torch.tensor([[0, 1], [2, 3]]), torch.tensor([[-0.5, -1.0], [-0.3, -2.0]]))
    target = torch.tensor([0, 1])
    for call in (lambda: fastkd.dkd_loss(s, tk, target), lambda: fastkd.ats_loss(s, tk, target),
                 lambda: fastkd.dist_loss(s, tk), lambda: fastkd.nn.DKDLoss()(s, tk, target),
                 lambda: fastkd.nn.DISTLoss()(s, tk),
                 # before any sharded path: process_group does not bypass the check
                 lambda: fastkd.dkd_loss(s, tk, target, process_group=object()),
                 lambda: fastkd.ats_loss(s, tk, target, process_group=object()),
                 lambda: fastkd.dist_loss(s, tk, process_group=object())):
        with pytest.raises(TypeError, match="needs dense teacher logits.*TopKTeacher works with kd_loss"):
            call()


def test_modules_take_a_topk_teacher():
    s = torch.randn(2, 3, 10)
    tk = fastkd.TopKTeacher.from_logits(torch.randn(2, 3, 10), 4)
    assert torch.equal(fastkd.nn.JSDLoss(beta=0.3)(s, tk), fastkd.jsd_loss(s, tk, beta=0.3))
    assert torch.equal(fastkd.nn.KDLoss(2.0)(s, tk), fastkd.kd_loss(s, tk, 2.0))
    assert fastkd.TopKTeacher is fastkd.core.topk.TopKTeacher
