"""Tests of fastkd.reference against hand computations and the official formulations.

Expected values are computed here independently: with Python floats and
explicit loops (the ``hand_*`` helpers), or with the official code's own
formulation re-written in PyTorch (``official_*``), never by calling the
reference. Everything is tiny, so the file runs in a few seconds on a CPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.core import mask as _mask
from fastkd import reference as R

F64 = torch.float64
INF = float("inf")
NAN = float("nan")


# ----------------------------------------------------------------------------
# independent scalar math (Python floats, explicit loops)
# ----------------------------------------------------------------------------

def lse(xs):
    m = max(xs)
    if m == -INF:
        return -INF
    return m + math.log(sum(math.exp(x - m) for x in xs))


def log_softmax(xs):
    z = lse(xs)
    return [x - z for x in xs]


def kl(log_p, log_q):
    """sum_c p_c (log p_c - log q_c), skipping terms with p_c == 0."""
    total = 0.0
    for a, b in zip(log_p, log_q):
        if a == -INF:
            continue
        total += math.exp(a) * (a - b)
    return total


def hand_kd_rows(s, t, temp):
    if not isinstance(temp, list):
        temp = [temp] * len(s)
    rows = []
    for si, ti, T in zip(s, t, temp):
        log_ps = log_softmax([x / T for x in si])
        log_pt = log_softmax([x / T for x in ti])
        rows.append(T * T * kl(log_pt, log_ps))
    return rows


def hand_dkd_row(s, t, g, alpha, beta, T):
    def parts(x):
        x = [v / T for v in x]
        others = [v for c, v in enumerate(x) if c != g]
        # log(1 - p_g) as log(sum of the other probabilities): exact, no cancellation
        log_b = [x[g] - lse(x), lse(others) - lse(x)]
        return log_b, log_softmax(others)

    b_s, q_s = parts(s)
    b_t, q_t = parts(t)
    return T * T * (alpha * kl(b_t, b_s) + beta * kl(q_t, q_s))


def hand_ats_row(s, t, g, tt, to, ts):
    taus = [tt if c == g else to for c in range(len(t))]
    log_q = log_softmax([v / tau for v, tau in zip(t, taus)])
    log_p = log_softmax([v / ts for v in s])
    return ts * ts * kl(log_q, log_p)


def softmax(xs):
    return [math.exp(v) for v in log_softmax(xs)]


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - ma for x in a], [x - mb for x in b]
    num = sum(x * y for x, y in zip(da, db))
    den = math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)) + 1e-8
    return num / den


def hand_dist(s, t, beta, gamma, tau):
    ys = [softmax([v / tau for v in row]) for row in s]
    yt = [softmax([v / tau for v in row]) for row in t]
    n, c = len(ys), len(ys[0])
    inter = 1 - sum(pearson(ys[i], yt[i]) for i in range(n)) / n
    cols_s = [[ys[i][j] for i in range(n)] for j in range(c)]
    cols_t = [[yt[i][j] for i in range(n)] for j in range(c)]
    intra = 1 - sum(pearson(cols_s[j], cols_t[j]) for j in range(c)) / c
    return tau * tau * (beta * inter + gamma * intra)


def hand_keep(seed, i, ratio):
    """The design.md mask bit for element index i (< 2^32), with Python ints."""
    u = _mask.mix_int(i ^ _mask.mix_int(0 ^ _mask.mix_int(seed)))
    return u >= int(ratio * 2**32)


# ----------------------------------------------------------------------------
# official formulations, re-written in PyTorch
# ----------------------------------------------------------------------------

def official_kd(s, t, T):
    return F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="batchmean") * T**2


def official_dkd(s, t, y, alpha, beta, T):
    """mdistiller's DKD: masked sums for the binary split, -1000 to exclude the target."""
    gt = F.one_hot(y, s.shape[1]).to(s.dtype)
    other = 1 - gt
    ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
    bs = torch.stack([(ps * gt).sum(1), (ps * other).sum(1)], dim=1)
    bt = torch.stack([(pt * gt).sum(1), (pt * other).sum(1)], dim=1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * T**2 / s.shape[0]
    qt = F.softmax(t / T - 1000.0 * gt, dim=1)
    log_qs = F.log_softmax(s / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_qs, qt, reduction="sum") * T**2 / s.shape[0]
    return alpha * tckd + beta * nckd


def official_ats_soft_ce(s, t, y, tt, to, ts):
    tau = torch.full_like(t, to)
    tau[torch.arange(t.shape[0]), y] = tt
    q = F.softmax(t / tau, dim=1)
    return ts**2 * (-(q * F.log_softmax(s / ts, dim=1)).sum(1)).mean(), q


def official_dist(s, t, beta, gamma, tau):
    def rho(a, b):
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    ys, yt = (s / tau).softmax(dim=1), (t / tau).softmax(dim=1)
    inter = tau**2 * (1 - rho(ys, yt).mean())
    intra = tau**2 * (1 - rho(ys.t(), yt.t()).mean())
    return beta * inter + gamma * intra


# ----------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------

S3 = [[1.0, -0.5, 2.0, 0.3], [0.2, 0.1, -1.0, 1.5], [-2.0, 3.0, 0.5, 0.0]]
T3 = [[0.5, 0.0, 1.5, -1.0], [1.0, -0.3, 0.2, 2.5], [0.0, 2.0, 1.0, -0.5]]
Y3 = [2, 3, 1]


def tiny():
    return torch.tensor(S3, dtype=F64), torch.tensor(T3, dtype=F64), torch.tensor(Y3)


def rand(n, c, seed=0, dtype=F64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=dtype) * scale
    t = torch.randn(n, c, generator=g, dtype=dtype) * scale
    y = torch.randint(0, c, (n,), generator=g)
    return s, t, y


# Each logit loss as f(student, teacher, target, **kw) so tables can share tests.
LOGIT_LOSSES = {
    "kd": lambda s, t, y, **kw: R.kd_loss(s, t, 2.0, target=y, **kw),
    "dkd": lambda s, t, y, **kw: R.dkd_loss(s, t, y, alpha=1.0, beta=2.0, temperature=2.0, **kw),
    "ats": lambda s, t, y, **kw: R.ats_loss(s, t, y, target_temperature=3.0, other_temperature=1.5, **kw),
}


def hand_rows(name, s, t, y):
    s, t, y = s.tolist(), t.tolist(), y.tolist()
    if name == "kd":
        return hand_kd_rows(s, t, 2.0)
    if name == "dkd":
        return [hand_dkd_row(a, b, g, 1.0, 2.0, 2.0) for a, b, g in zip(s, t, y)]
    return [hand_ats_row(a, b, g, 3.0, 1.5, 1.0) for a, b, g in zip(s, t, y)]


def close(a, b, rtol=1e-6, atol=1e-9):
    b = torch.as_tensor(b, dtype=a.dtype) if not isinstance(b, torch.Tensor) else b
    torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# hand-computed values
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_hand_values_every_reduction(temp):
    s, t, _ = tiny()
    rows = hand_kd_rows(S3, T3, temp)
    close(R.kd_loss(s, t, temp), sum(rows) / 3)
    close(R.kd_loss(s, t, temp, reduction="sum"), sum(rows))
    close(R.kd_loss(s, t, temp, reduction="mean"), sum(rows) / 12)
    close(R.kd_loss(s, t, temp, reduction="none"), torch.tensor(rows))


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_matches_kl_div_batchmean(temp):
    s, t, _ = rand(6, 9)
    close(R.kd_loss(s, t, temp), official_kd(s, t, temp))
    # KLDivLoss's default "mean" (TAKD) divides by rows * classes, like reduction="mean"
    mean = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="sum") * temp**2 / s.numel()
    close(R.kd_loss(s, t, temp, reduction="mean"), mean)


def test_dkd_hand_values_every_reduction():
    s, t, y = tiny()
    rows = [hand_dkd_row(a, b, g, 1.0, 8.0, 4.0) for a, b, g in zip(S3, T3, Y3)]
    close(R.dkd_loss(s, t, y), sum(rows) / 3)
    close(R.dkd_loss(s, t, y, reduction="sum"), sum(rows))
    close(R.dkd_loss(s, t, y, reduction="mean"), sum(rows) / 12)
    close(R.dkd_loss(s, t, y, reduction="none"), torch.tensor(rows))


@pytest.mark.parametrize("alpha,beta,temp", [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.3, 2.0, 2.0)])
def test_dkd_matches_mdistiller(alpha, beta, temp):
    s, t, y = rand(7, 10, seed=1)
    got = R.dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temp)
    # The -1000 trick leaves ~exp(-1000/T) residues, far below the tolerance; the
    # tolerance is set by the float32 row weights (1/N rounded to float32).
    close(got, official_dkd(s, t, y, alpha, beta, temp), rtol=1e-7)


def test_ats_hand_values_every_reduction():
    s, t, y = tiny()
    rows = [hand_ats_row(a, b, g, 4.0, 2.0, 1.0) for a, b, g in zip(S3, T3, Y3)]
    close(R.ats_loss(s, t, y), sum(rows) / 3)
    close(R.ats_loss(s, t, y, reduction="sum"), sum(rows))
    close(R.ats_loss(s, t, y, reduction="mean"), sum(rows) / 12)
    close(R.ats_loss(s, t, y, reduction="none"), torch.tensor(rows))
    rows2 = [hand_ats_row(a, b, g, 3.0, 1.0, 2.0) for a, b, g in zip(S3, T3, Y3)]
    close(
        R.ats_loss(s, t, y, target_temperature=3.0, other_temperature=1.0, student_temperature=2.0),
        sum(rows2) / 3,
    )


def test_ats_is_official_soft_ce_minus_teacher_entropy():
    s, t, y = rand(5, 8, seed=2)
    soft_ce, q = official_ats_soft_ce(s, t, y, 4.0, 2.0, 1.0)
    entropy = (-(q * q.log()).sum(1)).mean()
    close(R.ats_loss(s, t, y), soft_ce - entropy, rtol=1e-7)
    # same gradient w.r.t. the student as the official soft cross-entropy
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    R.ats_loss(s1, t, y).backward()
    official_ats_soft_ce(s2, t, y, 4.0, 2.0, 1.0)[0].backward()
    close(s1.grad, s2.grad, rtol=1e-7)


def test_ats_equal_temperatures_is_kd():
    s, t, y = rand(4, 6, seed=3)
    close(
        R.ats_loss(s, t, y, target_temperature=3.0, other_temperature=3.0, student_temperature=3.0),
        R.kd_loss(s, t, 3.0),
    )


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_hand_values(beta, gamma, tau):
    s, t, _ = tiny()
    got = R.dist_loss(s, t, beta=beta, gamma=gamma, temperature=tau)
    assert got.dim() == 0
    close(got, hand_dist(S3, T3, beta, gamma, tau))


def test_dist_matches_official_and_is_float32():
    s, t, _ = rand(6, 5, seed=4, dtype=torch.float32)
    got = R.dist_loss(s, t, beta=1.0, gamma=2.0, temperature=4.0)
    assert got.dtype == torch.float32 and got.dim() == 0
    close(got, official_dist(s.double(), t.double(), 1.0, 2.0, 4.0).float(), rtol=1e-5, atol=1e-7)


def test_dist_flattens_leading_dims_and_identical_inputs():
    s, t, _ = rand(6, 5, seed=5)
    close(R.dist_loss(s.reshape(2, 3, 5), t.reshape(2, 3, 5)), R.dist_loss(s, t))
    # identical distributions: rho = 1 - O(1e-8), so the loss is ~0
    assert abs(R.dist_loss(s, s).item()) < 1e-6


def test_simkd_hand_value_and_mse():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=F64)
    b = torch.tensor([[[[0.5, 2.0], [1.0, -4.0]]]], dtype=F64)
    expected = (0.5**2 + 0 + 2.0**2 + 8.0**2) / 4
    close(R.simkd_loss(a, b), expected)
    x, y, _ = rand(4, 6, seed=6)
    close(R.simkd_loss(x, y), F.mse_loss(x, y))
    assert R.simkd_loss(x.float().half(), y.float()).dtype == torch.float32


# ----------------------------------------------------------------------------
# MGD
# ----------------------------------------------------------------------------

def test_mgd_mask_index_order():
    seed, (n, c, h, w), ratio = 1234, (3, 5, 4, 2), 0.5
    ch = R.mgd_keep_mask(seed, (n, c, h, w), ratio, "channel")
    assert ch.shape == (n, c, 1, 1) and ch.dtype == torch.float32
    for i in range(n):
        for j in range(c):
            assert ch[i, j, 0, 0].item() == float(hand_keep(seed, i * c + j, ratio))
    sp = R.mgd_keep_mask(seed, (n, c, h, w), ratio, "spatial")
    assert sp.shape == (n, 1, h, w)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                assert sp[i, 0, y, x].item() == float(hand_keep(seed, i * h * w + y * w + x, ratio))
    # the bits are not all equal (the test above would be weak otherwise)
    assert 0 < ch.sum() < ch.numel() and 0 < sp.sum() < sp.numel()


def test_mgd_mask_ratio_statistics():
    keep = R.mgd_keep_mask(7, (100, 200, 1, 1), 0.15, "channel")
    assert abs((1 - keep.mean().item()) - 0.15) < 0.01
    assert R.mgd_keep_mask(7, (10, 20, 1, 1), 0.0, "channel").min().item() == 1.0


@pytest.mark.parametrize("mask_type", ["channel", "spatial"])
def test_mgd_hand_value_identity_generation(mask_type):
    g = torch.Generator().manual_seed(0)
    n, c, h, w = 2, 3, 2, 2
    x = torch.randn(n, c, h, w, generator=g, dtype=F64)
    t = torch.randn(n, c, h, w, generator=g, dtype=F64)
    seed, ratio, alpha = 99, 0.4, 0.5
    total = 0.0
    for i in range(n):
        for j in range(c):
            for a in range(h):
                for b in range(w):
                    idx = i * c + j if mask_type == "channel" else i * h * w + a * w + b
                    kept = hand_keep(seed, idx, ratio)
                    total += ((x[i, j, a, b].item() if kept else 0.0) - t[i, j, a, b].item()) ** 2
    got = R.mgd_loss(x, t, lambda z: z, alpha=alpha, mask_ratio=ratio, mask_type=mask_type, seed=seed)
    close(got, alpha * total / n)


def test_mgd_seed_from_generator_and_global_rng():
    x = torch.randn(4, 6, 3, 3)
    t = torch.randn(4, 6, 3, 3)
    gen = lambda z: 2.0 * z  # noqa: E731
    expected_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(7)))
    got = R.mgd_loss(x, t, gen, mask_ratio=0.5, generator=torch.Generator().manual_seed(7))
    close(got, R.mgd_loss(x, t, gen, mask_ratio=0.5, seed=expected_seed))
    torch.manual_seed(3)
    a = R.mgd_loss(x, t, gen, mask_ratio=0.5)
    torch.manual_seed(3)
    b = R.mgd_loss(x, t, gen, mask_ratio=0.5)
    assert a.item() == b.item()
    # different seeds give different masks, hence different losses
    assert R.mgd_loss(x, t, gen, mask_ratio=0.5, seed=1).item() != R.mgd_loss(x, t, gen, mask_ratio=0.5, seed=2).item()


def test_mgd_with_align_and_conv_generation():
    torch.manual_seed(0)
    align = torch.nn.Conv2d(3, 5, 1).double()
    generation = torch.nn.Sequential(
        torch.nn.Conv2d(5, 5, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(5, 5, 3, padding=1)
    ).double()
    s = torch.randn(2, 3, 4, 4, dtype=F64)
    t = torch.randn(2, 5, 4, 4, dtype=F64)
    got = R.mgd_loss(s, t, generation, align=align, alpha=7e-5, seed=5)
    mask = R.mgd_keep_mask(5, (2, 5, 4, 4), 0.15, "channel", dtype=F64)
    expected = 7e-5 * ((generation(align(s) * mask) - t) ** 2).sum() / 2
    close(got, expected)


# ----------------------------------------------------------------------------
# IPW weights
# ----------------------------------------------------------------------------

def test_ipw_hand_values():
    kd = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, -1.0]]
    aux = [[0.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    y = [0, 1, 2, 1]
    raw = [softmax(a)[g] / softmax(k)[g] for k, a, g in zip(kd, aux, y)]
    kd_t, aux_t, y_t = torch.tensor(kd, dtype=F64), torch.tensor(aux, dtype=F64), torch.tensor(y)
    w = R.ipw_weights(kd_t, aux_t, y_t, clip=None, normalize=False)
    assert w.dtype == torch.float32 and w.shape == (4,)
    close(w, torch.tensor(raw, dtype=torch.float32), rtol=1e-6)
    # the teacher under-weights the true class of row 1 (aux is sure, kd is not): weight > 1
    assert w[1] > 1 > w[0]
    normed = [r / (sum(raw) / 4) for r in raw]
    close(R.ipw_weights(kd_t, aux_t, y_t, clip=None), torch.tensor(normed, dtype=torch.float32))
    clipped = [min(max(r, 0.6), 1.5) for r in raw]
    assert clipped != raw  # the clip range really bites on this data
    close(R.ipw_weights(kd_t, aux_t, y_t, clip=(0.6, 1.5), normalize=False), torch.tensor(clipped, dtype=torch.float32))
    normed_clipped = [r / (sum(clipped) / 4) for r in clipped]
    close(R.ipw_weights(kd_t, aux_t, y_t, clip=(0.6, 1.5)), torch.tensor(normed_clipped, dtype=torch.float32))


def test_ipw_ignore_detach_shape_and_all_ignored():
    kd, aux, y = rand(6, 5, seed=8)
    y = y.reshape(2, 3).clone()
    y[0, 1] = -100
    kd3 = kd.reshape(2, 3, 5).requires_grad_()
    aux3 = aux.reshape(2, 3, 5).requires_grad_()
    w = R.ipw_weights(kd3, aux3, y)
    assert w.shape == (2, 3) and not w.requires_grad
    assert w[0, 1].item() == 0.0
    close(w.sum(), torch.tensor(5.0, dtype=torch.float32), rtol=1e-6)  # mean 1 over the 5 counted rows
    none = R.ipw_weights(kd3, aux3, torch.full((2, 3), -100))
    assert torch.equal(none, torch.zeros(2, 3))
    kd_nan = kd.clone()
    kd_nan[2, 0] = NAN
    w = R.ipw_weights(kd_nan, aux, y.reshape(-1), normalize=False)
    assert torch.isnan(w[2]) and torch.isfinite(w[[0, 3, 4, 5]]).all()


# ----------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------

def gradcheck(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_kd_with_tensor_temperature():
    s, t, _ = rand(3, 5, seed=10)
    gradcheck(lambda a, b: R.kd_loss(a, b, 2.5), s, t)
    gradcheck(lambda a, b, T: R.kd_loss(a, b, T), s, t, torch.tensor(2.5, dtype=F64))
    gradcheck(lambda a, b, T: R.kd_loss(a, b, T, reduction="none"), s, t, torch.tensor([1.5, 3.0, 0.7], dtype=F64))


def test_kd_temperature_gradient_is_full_derivative():
    # d/dT of T^2 * KL(T): compare autograd with a central difference of hand values.
    s, t, _ = tiny()
    T = torch.tensor(3.0, dtype=F64, requires_grad=True)
    R.kd_loss(s, t, T).backward()
    h = 1e-5
    fd = (sum(hand_kd_rows(S3, T3, 3.0 + h)) - sum(hand_kd_rows(S3, T3, 3.0 - h))) / (2 * h) / 3
    assert abs(T.grad.item() - fd) < 1e-7
    # per-row tensor temperatures give each row its own temperature
    temps = [1.0, 2.0, 5.0]
    close(R.kd_loss(s, t, torch.tensor(temps, dtype=F64), reduction="none"), torch.tensor(hand_kd_rows(S3, T3, temps)))


@pytest.mark.parametrize("name", list(LOGIT_LOSSES))
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_gradcheck_logit_losses(name, reduction):
    fn = LOGIT_LOSSES[name]
    s, t, y = rand(4, 5, seed=11)
    y[1] = -100
    w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=F64)
    gradcheck(lambda a, b: fn(a, b, y, reduction=reduction, sample_weight=w), s, t)


def test_gradcheck_dkd_default_temperature():
    s, t, y = rand(3, 6, seed=12)
    gradcheck(lambda a, b: R.dkd_loss(a, b, y), s, t)


def test_gradcheck_dist_simkd_mgd():
    s, t, _ = rand(4, 5, seed=13)
    gradcheck(lambda a, b: R.dist_loss(a, b, beta=1.0, gamma=2.0, temperature=2.0), s, t)
    gradcheck(lambda a, b: R.simkd_loss(a, b), s, t)
    torch.manual_seed(0)
    gen = torch.nn.Conv2d(3, 3, 3, padding=1).double()
    fs = torch.randn(2, 3, 3, 3, dtype=F64)
    ft = torch.randn(2, 3, 3, 3, dtype=F64)
    for mask_type in ("channel", "spatial"):
        gradcheck(lambda a, b: R.mgd_loss(a, b, gen, alpha=0.1, mask_ratio=0.3, mask_type=mask_type, seed=4), fs, ft)


def test_kd_gradient_closed_form():
    # d(batchmean KD)/ds = T * (softmax(s/T) - softmax(t/T)) / N
    s, t, _ = tiny()
    s.requires_grad_()
    R.kd_loss(s, t, 2.0).backward()
    expected = [[2.0 * (a - b) / 3 for a, b in zip(softmax([v / 2 for v in si]), softmax([v / 2 for v in ti]))]
                for si, ti in zip(S3, T3)]
    close(s.grad, torch.tensor(expected, dtype=F64))


# ----------------------------------------------------------------------------
# reductions, ignore_index, sample_weight, empty batches
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LOGIT_LOSSES))
def test_reductions_and_sample_weight(name):
    fn = LOGIT_LOSSES[name]
    s, t, y = rand(5, 6, seed=20)
    rows = hand_rows(name, s, t, y)
    w = [0.5, 2.0, 0.0, 1.0, 3.0]
    wt = torch.tensor(w, dtype=F64)
    weighted = [r * x for r, x in zip(rows, w)]
    close(fn(s, t, y, sample_weight=wt), sum(weighted) / 5)
    close(fn(s, t, y, sample_weight=wt, reduction="sum"), sum(weighted))
    close(fn(s, t, y, sample_weight=wt, reduction="mean"), sum(weighted) / 30)
    close(fn(s, t, y, sample_weight=wt, reduction="none"), torch.tensor(weighted))


@pytest.mark.parametrize("name", list(LOGIT_LOSSES))
def test_ignore_index(name):
    fn = LOGIT_LOSSES[name]
    s, t, y = rand(5, 6, seed=21)
    rows = hand_rows(name, s, t, y)
    y_ign = y.clone()
    y_ign[[1, 3]] = -1
    # ignored rows are never read: NaN logits and out-of-range targets there change nothing
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[1] = NAN
    t_bad[3, 0] = INF
    s_bad.requires_grad_()
    loss = fn(s_bad, t_bad, y_ign, ignore_index=-1)
    close(loss, (rows[0] + rows[2] + rows[4]) / 3)
    loss.backward()
    assert torch.equal(s_bad.grad[[1, 3]], torch.zeros(2, 6, dtype=F64))
    assert s_bad.grad[[0, 2, 4]].abs().sum() > 0
    none = fn(s, t, y_ign, ignore_index=-1, reduction="none")
    close(none, torch.tensor([rows[0], 0.0, rows[2], 0.0, rows[4]]))
    close(fn(s, t, y_ign, ignore_index=-1, reduction="mean"), (rows[0] + rows[2] + rows[4]) / 18)


@pytest.mark.parametrize("name", list(LOGIT_LOSSES))
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_all_rows_ignored_is_zero_with_zero_grads(name, reduction):
    fn = LOGIT_LOSSES[name]
    s, t, _ = rand(3, 4, seed=22, dtype=torch.float32)
    s.requires_grad_()
    t.requires_grad_()
    y = torch.full((3,), -100)
    loss = fn(s, t, y, reduction=reduction)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("name", list(LOGIT_LOSSES))
def test_zero_rows(name):
    s = torch.zeros(0, 4, requires_grad=True)
    t = torch.zeros(0, 4)
    y = torch.zeros(0, dtype=torch.long)
    loss = LOGIT_LOSSES[name](s, t, y)
    assert loss.item() == 0.0
    loss.backward()
    assert LOGIT_LOSSES[name](s, t, y, reduction="none").shape == (0,)
    d = R.dist_loss(torch.zeros(0, 4, requires_grad=True), t)
    assert d.item() == 0.0


def test_kd_target_only_skips_ignored_rows():
    s, t, y = rand(4, 5, seed=23)
    close(R.kd_loss(s, t, 2.0, target=y), R.kd_loss(s, t, 2.0))
    y[0] = -100
    close(R.kd_loss(s, t, 2.0, target=y), R.kd_loss(s[1:], t[1:], 2.0))


# ----------------------------------------------------------------------------
# -inf, NaN, confident logits
# ----------------------------------------------------------------------------

def test_kd_neg_inf_logits():
    s = torch.tensor([[1.0, -INF, 0.5, 2.0], [0.0, 1.0, -INF, 0.3]], dtype=F64, requires_grad=True)
    t = torch.tensor([[0.5, -INF, -INF, 1.0], [-INF, 2.0, -INF, 0.0]], dtype=F64)
    loss = R.kd_loss(s, t, 2.0)
    close(loss, sum(hand_kd_rows(s.tolist(), t.tolist(), 2.0)) / 2)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    ps = [softmax([v / 2 for v in r]) for r in s.tolist()]
    pt = [softmax([v / 2 for v in r]) for r in t.tolist()]
    expected = [[2.0 * (a - b) / 2 for a, b in zip(x, y)] for x, y in zip(ps, pt)]
    close(s.grad, torch.tensor(expected, dtype=F64))
    # a student -inf where the teacher has mass is an infinite divergence, not NaN
    bad = R.kd_loss(torch.tensor([[-INF, 0.0]]), torch.tensor([[0.0, 0.0]]))
    assert bad.item() == INF


def test_dkd_and_ats_neg_inf_logits():
    s = torch.tensor([[1.0, -INF, 0.5, 2.0], [0.0, 1.0, -0.5, 0.3]], dtype=F64, requires_grad=True)
    t = torch.tensor([[0.5, -INF, -INF, 1.0], [-INF, 2.0, -INF, 0.0]], dtype=F64, requires_grad=True)
    y = torch.tensor([0, 0])  # row 1: the teacher gives the target class probability 0
    loss = R.dkd_loss(s, t, y, beta=2.0)
    expected = sum(hand_dkd_row(a, b, g, 1.0, 2.0, 4.0) for a, b, g in zip(s.tolist(), t.tolist(), [0, 0])) / 2
    close(loss, expected)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    s.grad = None
    t.grad = None
    loss = R.ats_loss(s, t, y)
    close(loss, sum(hand_ats_row(a, b, g, 4.0, 2.0, 1.0) for a, b, g in zip(s.tolist(), t.tolist(), [0, 0])) / 2)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("name", list(LOGIT_LOSSES) + ["dist"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_propagates(name, where):
    s, t, y = rand(3, 4, seed=30, dtype=torch.float32)
    (s if where == "student" else t)[1, 2] = NAN
    if name == "dist":
        assert torch.isnan(R.dist_loss(s, t))
        return
    fn = LOGIT_LOSSES[name]
    assert torch.isnan(fn(s, t, y))
    rows = fn(s, t, y, reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()


def test_nan_propagates_features():
    a = torch.randn(2, 3, 2, 2)
    b = torch.randn(2, 3, 2, 2)
    a[0, 0, 0, 0] = NAN
    assert torch.isnan(R.simkd_loss(a, b))
    assert torch.isnan(R.mgd_loss(a, b, lambda z: z, mask_ratio=0.0))


@pytest.mark.parametrize("gap", [100.0, 120.0])
def test_confident_logits_float32(gap):
    s = torch.tensor([[gap, 0.0, 0.0], [0.0, gap, -3.0], [gap, 0.0, 1.0]])
    t = torch.tensor([[0.0, gap, 0.0], [0.0, gap, 0.0], [gap, 1.0, 0.0]])
    y = torch.tensor([0, 1, 0])
    S, T_ = s.tolist(), t.tolist()
    kd = R.kd_loss(s, t, 1.0, reduction="none")
    close(kd, torch.tensor(hand_kd_rows(S, T_, 1.0)), rtol=1e-5, atol=1e-5)
    assert kd[0].item() > 99.0  # the teacher's class has student log-prob ~ -gap
    dkd = R.dkd_loss(s, t, y, temperature=1.0, reduction="none")
    close(dkd, torch.tensor([hand_dkd_row(a, b, g, 1.0, 8.0, 1.0) for a, b, g in zip(S, T_, [0, 1, 0])]),
          rtol=1e-5, atol=1e-5)
    ats = R.ats_loss(s, t, y, target_temperature=1.0, other_temperature=1.0, reduction="none")
    close(ats, kd, rtol=1e-6, atol=1e-6)
    for loss in (kd.sum(), dkd.sum(), ats.sum(), R.dist_loss(s, t)):
        assert torch.isfinite(loss)
    sg = s.clone().requires_grad_()
    R.dkd_loss(sg, t, y, temperature=1.0).backward()
    assert torch.isfinite(sg.grad).all()


def test_official_dkd_breaks_where_reference_does_not():
    # documents why the stable log(1 - p_g) matters: the official float32 code gives NaN here
    s = torch.tensor([[120.0, 0.0, 0.0]])
    t = torch.tensor([[120.0, 0.0, 0.0]])
    y = torch.tensor([0])
    assert not torch.isfinite(official_dkd(s, t, y, 1.0, 8.0, 1.0))
    assert torch.isfinite(R.dkd_loss(s, t, y, temperature=1.0))


# ----------------------------------------------------------------------------
# shapes and dtypes
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(LOGIT_LOSSES))
def test_3d_logits_are_rows(name):
    fn = LOGIT_LOSSES[name]
    s, t, y = rand(6, 7, seed=40)
    y[4] = -100
    s3, t3, y3 = s.reshape(2, 3, 7), t.reshape(2, 3, 7), y.reshape(2, 3)
    close(fn(s3, t3, y3), fn(s, t, y))
    none = fn(s3, t3, y3, reduction="none")
    assert none.shape == (2, 3)
    close(none.reshape(-1), fn(s, t, y, reduction="none"))
    w = torch.rand(2, 3, dtype=F64)
    close(fn(s3, t3, y3, sample_weight=w), fn(s, t, y, sample_weight=w.reshape(-1)))
    close(fn(s3, t3, y3, sample_weight=w.reshape(-1)), fn(s, t, y, sample_weight=w.reshape(-1)))


def test_kd_3d_divides_by_all_rows_not_dim0():
    s, t, _ = rand(6, 7, seed=41)
    s3, t3 = s.reshape(2, 3, 7), t.reshape(2, 3, 7)
    flat = official_kd(s, t, 2.0)
    close(R.kd_loss(s3, t3, 2.0), flat)
    # F.kl_div on 3-D "batchmean" divides by B=2 only: 3x larger
    kl3 = F.kl_div(F.log_softmax(s3 / 2, -1), F.softmax(t3 / 2, -1), reduction="batchmean") * 4
    close(kl3, 3 * flat)


@pytest.mark.parametrize("sd,td", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                   (torch.float16, torch.bfloat16)])
def test_low_precision_inputs_accumulate_in_float32(sd, td):
    s, t, y = rand(4, 9, seed=42, dtype=torch.float32)
    s, t = s.to(sd), t.to(td)
    for name, fn in LOGIT_LOSSES.items():
        got = fn(s, t, y)
        assert got.dtype == torch.float32, name
        close(got, fn(s.double(), t.double(), y).float(), rtol=1e-5, atol=1e-6)
    got = R.dist_loss(s, t)
    assert got.dtype == torch.float32
    close(got, R.dist_loss(s.double(), t.double()).float(), rtol=1e-5, atol=1e-6)
    assert R.kd_loss(s.float(), t.float()).dtype == torch.float32
    assert R.kd_loss(s.double(), t.double()).dtype == F64


def test_target_dtypes():
    s, t, y = rand(4, 5, seed=43)
    ref = R.dkd_loss(s, t, y)
    for dt in (torch.int32, torch.int16, torch.uint8):
        close(R.dkd_loss(s, t, y.to(dt)), ref)


# ----------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------

_s, _t, _y = rand(3, 4, seed=50, dtype=torch.float32)
_f = torch.randn(2, 3, 4, 4)
_ident = lambda z: z  # noqa: E731

BAD = [
    ("kd-student-list", lambda: R.kd_loss([[1.0]], _t), TypeError, "student_logits"),
    ("kd-student-int", lambda: R.kd_loss(_s.long(), _t), TypeError, "student_logits"),
    ("kd-teacher-shape", lambda: R.kd_loss(_s, _t[:, :3]), ValueError, "teacher_logits"),
    ("kd-temp-zero", lambda: R.kd_loss(_s, _t, 0.0), ValueError, "temperature"),
    ("kd-temp-neg", lambda: R.kd_loss(_s, _t, -2.0), ValueError, "temperature"),
    ("kd-temp-str", lambda: R.kd_loss(_s, _t, "4"), TypeError, "temperature"),
    ("kd-temp-shape", lambda: R.kd_loss(_s, _t, torch.ones(2)), ValueError, "temperature"),
    ("kd-temp-tensor-neg", lambda: R.kd_loss(_s, _t, torch.tensor([1.0, -1.0, 2.0])), ValueError, "temperature"),
    ("kd-reduction", lambda: R.kd_loss(_s, _t, reduction="avg"), ValueError, "reduction"),
    ("kd-target-float", lambda: R.kd_loss(_s, _t, target=_y.float()), TypeError, "target"),
    ("kd-target-shape", lambda: R.kd_loss(_s, _t, target=_y[:2]), ValueError, "target"),
    ("kd-target-range", lambda: R.kd_loss(_s, _t, target=torch.tensor([0, 4, 1])), ValueError, "target"),
    ("kd-sw-shape", lambda: R.kd_loss(_s, _t, sample_weight=torch.ones(2)), ValueError, "sample_weight"),
    ("kd-sw-int", lambda: R.kd_loss(_s, _t, sample_weight=torch.ones(3, dtype=torch.long)), TypeError, "sample_weight"),
    ("kd-ignore-float", lambda: R.kd_loss(_s, _t, target=_y, ignore_index=1.5), TypeError, "ignore_index"),
    ("dkd-no-target", lambda: R.dkd_loss(_s, _t, None), ValueError, "target"),
    ("dkd-one-class", lambda: R.dkd_loss(_s[:, :1], _t[:, :1], torch.zeros(3, dtype=torch.long)), ValueError, "student_logits"),
    ("dkd-temp", lambda: R.dkd_loss(_s, _t, _y, temperature=0.0), ValueError, "temperature"),
    ("dkd-temp-tensor", lambda: R.dkd_loss(_s, _t, _y, temperature=torch.tensor(2.0)), TypeError, "temperature"),
    ("dkd-alpha-nan", lambda: R.dkd_loss(_s, _t, _y, alpha=NAN), ValueError, "alpha"),
    ("dkd-beta-str", lambda: R.dkd_loss(_s, _t, _y, beta="8"), TypeError, "beta"),
    ("dkd-target-range", lambda: R.dkd_loss(_s, _t, torch.tensor([0, -1, 1])), ValueError, "target"),
    ("ats-tt", lambda: R.ats_loss(_s, _t, _y, target_temperature=0.0), ValueError, "target_temperature"),
    ("ats-to", lambda: R.ats_loss(_s, _t, _y, other_temperature=-1.0), ValueError, "other_temperature"),
    ("ats-ts", lambda: R.ats_loss(_s, _t, _y, student_temperature=INF), ValueError, "student_temperature"),
    ("ats-no-target", lambda: R.ats_loss(_s, _t, None), ValueError, "target"),
    ("dist-temp", lambda: R.dist_loss(_s, _t, temperature=0.0), ValueError, "temperature"),
    ("dist-shape", lambda: R.dist_loss(_s, _t[:2]), ValueError, "teacher_logits"),
    ("dist-beta", lambda: R.dist_loss(_s, _t, beta="1"), TypeError, "beta"),
    ("dist-gamma", lambda: R.dist_loss(_s, _t, gamma=INF), ValueError, "gamma"),
    ("mgd-student-3d", lambda: R.mgd_loss(_f[0], _f, _ident), ValueError, "student_feat"),
    ("mgd-teacher-3d", lambda: R.mgd_loss(_f, _f[0], _ident), ValueError, "teacher_feat"),
    ("mgd-student-int", lambda: R.mgd_loss(_f.long(), _f, _ident), TypeError, "student_feat"),
    ("mgd-ratio-one", lambda: R.mgd_loss(_f, _f, _ident, mask_ratio=1.0), ValueError, "mask_ratio"),
    ("mgd-ratio-neg", lambda: R.mgd_loss(_f, _f, _ident, mask_ratio=-0.1), ValueError, "mask_ratio"),
    ("mgd-mask-type", lambda: R.mgd_loss(_f, _f, _ident, mask_type="pixel"), ValueError, "mask_type"),
    ("mgd-channels", lambda: R.mgd_loss(_f[:, :2], _f, _ident), ValueError, "align"),
    ("mgd-align-shape", lambda: R.mgd_loss(_f, _f, _ident, align=lambda z: z[:, :2]), ValueError, "align"),
    ("mgd-generation", lambda: R.mgd_loss(_f, _f, None), TypeError, "generation"),
    ("mgd-gen-shape", lambda: R.mgd_loss(_f, _f, lambda z: z[:, :1]), ValueError, "generation"),
    ("mgd-seed-neg", lambda: R.mgd_loss(_f, _f, _ident, seed=-1), ValueError, "seed"),
    ("mgd-seed-float", lambda: R.mgd_loss(_f, _f, _ident, seed=1.5), TypeError, "seed"),
    ("mgd-generator", lambda: R.mgd_loss(_f, _f, _ident, generator=3), TypeError, "generator"),
    ("mgd-alpha", lambda: R.mgd_loss(_f, _f, _ident, alpha=NAN), ValueError, "alpha"),
    ("mask-type", lambda: R.mgd_keep_mask(1, (1, 2, 3, 3), 0.1, "row"), ValueError, "mask_type"),
    ("simkd-shape", lambda: R.simkd_loss(_f, _f[:, :2]), ValueError, "projected_student"),
    ("simkd-list", lambda: R.simkd_loss([1.0], _f), TypeError, "projected_student"),
    ("simkd-int", lambda: R.simkd_loss(_f, _f.long()), TypeError, "teacher_feat"),
    ("ipw-clip-zero", lambda: R.ipw_weights(_s, _t, _y, clip=(0.0, 1.0)), ValueError, "clip"),
    ("ipw-clip-order", lambda: R.ipw_weights(_s, _t, _y, clip=(2.0, 1.0)), ValueError, "clip"),
    ("ipw-clip-kind", lambda: R.ipw_weights(_s, _t, _y, clip=1.0), TypeError, "clip"),
    ("ipw-no-target", lambda: R.ipw_weights(_s, _t, None), ValueError, "target"),
    ("ipw-normalize", lambda: R.ipw_weights(_s, _t, _y, normalize="yes"), TypeError, "normalize"),
    ("ipw-shape", lambda: R.ipw_weights(_s, _t[:, :2], _y), ValueError, "kd_logits"),
]


@pytest.mark.parametrize("fn,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()
