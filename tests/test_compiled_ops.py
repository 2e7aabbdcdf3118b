"""The compiled kernels of ATS, DKD, DIST and MGD (``backend="cpu"``, and
``backend="cuda"`` where a GPU is present) against ``fastkd.reference``.

Expected values and gradients come from the reference evaluated in float64 on
the same input values (float16/bfloat16 inputs convert exactly), so the
tolerances below measure only the kernels' float32 arithmetic and the rounding
of gradients stored in the input dtype. CUDA cases skip at run time (never at
import or collection) when no GPU is available.
"""
import pytest
import torch

import fastkd
from fastkd.dispatch import ops as _ops
from fastkd import reference as R

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
NEW_OPS = ("ats_fwd", "dkd_fwd", "dist_fwd", "mgd_mask", "mgd_sq_err")
pytestmark = pytest.mark.skipif(
    not all(_ops.has_kernel(op, "CPU") for op in NEW_OPS), reason="fastkd._C built without these CPU kernels"
)

# Relative tolerance of the loss (float32 math) per device, and of a gradient by the
# dtype it is stored in (float16 / bfloat16 rounding: 2^-11, 2^-8 relative).
LOSS_TOL = {"cpu": 2e-5, "cuda": 1e-4}
GRAD_TOL = {F32: 2e-5, F16: 2e-3, BF16: 1.6e-2}
CUDA_F32_GRAD_TOL = 1e-4  # __expf

SHAPES = [(1, 1), (1, 2), (3, 7), (4, 401), (5, 1271), (2, 3, 7), (1, 131072)]
DTYPES = [(F32, F32), (F16, F16), (BF16, BF16), (F16, F32), (F32, BF16), (BF16, F16)]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if not all(_ops.has_kernel(op, "CUDA") for op in NEW_OPS):
            pytest.skip("fastkd._C built without CUDA kernels")
    return request.param


def close(got, want, tol, what="", noise=None, atol=0.0):
    """|got - want| <= tol * (|want| + max |want|) + 4 max |noise - want| + atol; NaN only where want is NaN.

    ``noise``: how far the float32 reference is from ``want`` (the float64 truth); it
    widens the bound only where the problem itself is ill-conditioned in float32
    (for example DIST with two classes, where rho = +-1 and the gradient is the
    cancellation of two large terms).
    """
    got, want = got.detach().to(F64).cpu(), want.detach().to(F64).cpu()
    assert got.shape == want.shape, what
    scale = want.abs().max().item() if want.numel() else 0.0
    allowed = tol * (want.abs() + scale) + atol + 2e-38  # float32 subnormals may flush to 0
    if noise is not None:
        err32 = (noise.detach().to(F64).cpu() - want).abs().nan_to_num(0.0)
        allowed = allowed + 4 * (err32.max() if err32.numel() else 0.0)
    both_nan = got.isnan() & want.isnan()
    bad = ~((got - want).abs() <= allowed) & ~both_nan
    bad |= got.isnan() != want.isnan()
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} / {bad.numel()} elements differ; worst got "
        f"{got[bad][:4].tolist()} want {want[bad][:4].tolist()} (tol {tol}, scale {scale:.3g})"
    )


def logits(shape, dtype, device, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype).to(device)


def targets(shape, num_classes, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, shape[:-1], generator=g).to(device)


def evaluate(loss, backend, s, t, y=None, upstream=None, **kw):
    """(loss, d/ds, d/dt) of `loss` on `backend`; "reference64" / "reference32": fastkd.reference
    on float64 copies of the inputs / on the inputs themselves (it computes in float32)."""
    if backend.startswith("reference"):
        if backend == "reference64":
            s, t = s.detach().to(F64), t.detach().to(F64)
        fn = getattr(R, f"{loss}_loss")
    else:
        fn = getattr(fastkd, f"{loss}_loss")
        kw = dict(kw, backend=backend)
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    out = fn(s, t, **kw) if loss == "dist" else fn(s, t, y, **kw)
    total = out.sum() if upstream is None else (out * upstream.to(out.dtype)).sum()
    gs, gt = torch.autograd.grad(total, (s, t))
    return out, gs, gt


def check(loss, device, s, t, y=None, upstream=None, grad_atol=0.0, **kw):
    got, gs, gt = evaluate(loss, device, s, t, y, upstream, **kw)
    want, ws, wt = evaluate(loss, "reference64", s, t, y, upstream, **kw)
    ref32 = evaluate(loss, "reference32", s, t, y, upstream, **kw)
    assert got.dtype == F32 and gs.dtype == s.dtype and gt.dtype == t.dtype
    assert got.device.type == device
    close(got, want, LOSS_TOL[device], f"{loss} loss", ref32[0])
    for name, g, w, x, n in (("student", gs, ws, s, ref32[1]), ("teacher", gt, wt, t, ref32[2])):
        tol = CUDA_F32_GRAD_TOL if device == "cuda" and x.dtype == F32 else GRAD_TOL[x.dtype]
        close(g, w, tol, f"{loss} grad {name}", n, atol=grad_atol)
    return got, gs, gt


LOGIT_LOSSES = {
    "ats": dict(target_temperature=4.0, other_temperature=2.0, student_temperature=1.5),
    "dkd": dict(alpha=1.0, beta=8.0, temperature=4.0),
    "dist": dict(beta=1.0, gamma=2.0, temperature=4.0),
}


# ----------------------------------------------------------------------------
# values and gradients against the reference
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss", list(LOGIT_LOSSES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
def test_matches_reference(loss, shape, dtypes, device):
    if loss == "dkd" and shape[-1] < 2:
        pytest.skip("DKD needs two classes")
    if loss == "dist" and shape[-1] == 2:
        pytest.skip("test_dist_two_classes: an absolute tolerance")
    if shape[-1] > 100000 and dtypes not in DTYPES[:3]:
        pytest.skip("the wide row runs with one dtype per net")
    s, t = logits(shape, dtypes[0], device), logits(shape, dtypes[1], device, seed=5)
    y = targets(shape, shape[-1], device) if loss != "dist" else None
    check(loss, device, s, t, y, **LOGIT_LOSSES[loss])


@pytest.mark.parametrize("loss", ["ats", "dkd"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_ignore_index_and_sample_weight(loss, reduction, device):
    shape = (3, 5, 37)
    s, t = logits(shape, F32, device), logits(shape, F32, device, seed=5)
    y = targets(shape, 37, device)
    y[0, 1] = y[2, 4] = -100
    s[0, 1] = float("nan")  # an ignored row is never read
    t[2, 4] = float("nan")
    w = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(3)).to(device) + 0.5
    up = torch.randn(shape[:-1], generator=torch.Generator().manual_seed(4)).to(device) if reduction == "none" else None
    got, gs, gt = check(loss, device, s, t, y, upstream=up, reduction=reduction, sample_weight=w, **LOGIT_LOSSES[loss])
    assert gs[0, 1].eq(0).all() and gt[2, 4].eq(0).all() and gs[2, 4].eq(0).all()
    if reduction == "none":
        assert got.shape == shape[:-1] and got[0, 1] == 0 and got[2, 4] == 0


@pytest.mark.parametrize("loss", ["ats", "dkd"])
def test_custom_ignore_index_is_never_read(loss, device):
    s, t = logits((4, 9), F16, device), logits((4, 9), BF16, device, seed=2)
    y = torch.tensor([3, 12345, 0, 12345], device=device)  # out of range: a read would fail or give NaN
    got, gs, gt = check(loss, device, s, t, y, ignore_index=12345, **LOGIT_LOSSES[loss])
    assert torch.isfinite(got) and gs[1].eq(0).all() and gt[3].eq(0).all()


@pytest.mark.parametrize("op", ["ats_fwd", "dkd_fwd"])
def test_op_rejects_out_of_range_target_of_counted_row(op):
    s, t = logits((2, 5), F32, "cpu"), logits((2, 5), F32, "cpu")
    args = (1.0, 4.0, 2.0) if op == "ats_fwd" else (1.0, 8.0, 4.0)
    fn = getattr(torch.ops.fastkd, op)
    weight = torch.tensor([0.5, 0.5])
    with pytest.raises(RuntimeError, match=r"target\[1\] = 5 is outside \[0, 5\)"):
        fn(s, t, torch.tensor([0, 5]), weight, *args, True, True, True)
    # the same target on an ignored row (weight 0) is never read
    loss, gs, _ = fn(s, t, torch.tensor([0, 5]), torch.tensor([0.5, 0.0]), *args, True, True, True)
    assert torch.isfinite(loss) and gs[1].eq(0).all()


@pytest.mark.parametrize("loss", ["ats", "dkd"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_all_rows_ignored_is_zero_with_zero_grads(loss, reduction, device):
    s, t = logits((3, 11), F32, device), logits((3, 11), F16, device, seed=2)
    y = torch.full((3,), -100, device=device)
    got, gs, gt = evaluate(loss, device, s, t, y, reduction=reduction, **LOGIT_LOSSES[loss])
    assert got.eq(0).all() and not got.isnan().any()
    assert gs.eq(0).all() and gt.eq(0).all()


@pytest.mark.parametrize("loss", list(LOGIT_LOSSES))
def test_zero_rows(loss, device):
    s, t = logits((0, 5), F32, device), logits((0, 5), F32, device)
    y = torch.zeros((0,), dtype=torch.int64, device=device) if loss != "dist" else None
    got, gs, gt = evaluate(loss, device, s, t, y, **LOGIT_LOSSES[loss])
    assert got.item() == 0.0 and gs.shape == (0, 5) and gt.shape == (0, 5)


@pytest.mark.parametrize("loss", list(LOGIT_LOSSES))
@pytest.mark.parametrize("confident", ["both", "teacher", "student"])
def test_confident_logits_gap_100(loss, confident, device):
    """A logit gap of 100 at temperature 1: p_g rounds to 1 in float32; the answer stays exact."""
    n, c = 4, 50
    s, t = logits((n, c), F32, device, scale=1.0), logits((n, c), F32, device, scale=1.0, seed=3)
    y = targets((n, c), c, device)
    rows = torch.arange(n, device=device)
    if confident in ("both", "teacher"):
        t[rows, y] += 100.0
    if confident in ("both", "student"):
        s[rows, y] += 100.0
    kw = {"ats": dict(target_temperature=1.0, other_temperature=1.0), "dkd": dict(temperature=1.0),
          "dist": dict(temperature=1.0)}[loss]
    # A one-hot net's exact gradients underflow or cancel (|grad| ~ 1e-44), while the terms
    # that cancel are logits of ~100: float32 leaves residues of ~100 eps w ~ 1e-6 on the
    # confident entries (w = 1/4 here, and the gradients' natural scale is w * O(1)).
    got, gs, gt = check(loss, device, s, t, y if loss != "dist" else None, grad_atol=2e-6, **kw)
    assert torch.isfinite(got) and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("loss", list(LOGIT_LOSSES))
def test_negative_infinite_logits(loss, device):
    """-inf logits are legal: classes with zero teacher probability contribute 0."""
    n, c = 5, 13
    s, t = logits((n, c), F32, device), logits((n, c), F32, device, seed=3)
    y = torch.tensor([0, 4, 7, 12, 2], device=device)
    inf = float("-inf")
    t[0, 3] = t[1, 5:9] = t[3, 0] = inf          # teacher -inf off the target
    s[1, 5:7] = inf                               # student -inf only where the teacher is too
    t[2, 7] = inf                                 # teacher -inf at the target (p_tg = 0)
    t[4, :2] = t[4, 3:] = inf                     # all teacher mass on the target
    if loss == "dkd":  # (the reference's NCKD is NaN there: test_dkd_teacher_without_non_target_mass)
        t[4, 5] = 0.0
    got, gs, gt = check(loss, device, s, t, y if loss != "dist" else None, **LOGIT_LOSSES[loss])
    assert torch.isfinite(got)
    assert gt[0, 3] == 0 and gt[1, 5:9].eq(0).all() and gs[1, 5:7].eq(0).all()


@pytest.mark.parametrize("loss", list(LOGIT_LOSSES))
def test_nan_propagates(loss, device):
    s, t = logits((3, 8), F32, device), logits((3, 8), F32, device, seed=3)
    s[1, 2] = float("nan")
    y = targets((3, 8), 8, device) if loss != "dist" else None
    got, _, _ = evaluate(loss, device, s, t, y, **LOGIT_LOSSES[loss])
    assert got.isnan().all()


def test_dkd_teacher_without_non_target_mass(device):
    """Teacher logits -inf off the target: p_tg = 1 and the non-target distribution is
    empty, so NCKD = 0 for every student (fastkd.reference gives NaN: -inf - -inf) and
    the loss is alpha T^2 TCKD = alpha T^2 (-log p_sg), whose gradient is KD-like."""
    n, c, temp, alpha = 3, 9, 2.0, 1.5
    s = logits((n, c), F32, device)
    y = torch.tensor([0, 4, 8], device=device)
    t = torch.full((n, c), float("-inf"), device=device)
    t[torch.arange(n, device=device), y] = torch.tensor([3.0, -1.0, 0.0], device=device)
    got, gs, gt = evaluate("dkd", device, s, t, y, alpha=alpha, beta=8.0, temperature=temp)
    s64 = s.detach().to(F64).cpu().requires_grad_()
    want = alpha * temp**2 * -torch.log_softmax(s64 / temp, 1)[torch.arange(n), y.cpu()].mean()
    (want_gs,) = torch.autograd.grad(want, s64)
    close(got, want, LOSS_TOL[device], "loss")
    close(gs, want_gs, 1e-5, "grad student")
    assert gt.eq(0).all()


def test_dkd_gradient_formulas_extreme_alpha_beta(device):
    """TCKD and NCKD gradients apart (alpha or beta 0), including p_g near 1 at T = 1."""
    s, t = logits((6, 30), F32, device, scale=4.0), logits((6, 30), F32, device, scale=4.0, seed=8)
    y = targets((6, 30), 30, device)
    s[0, y[0]] += 15.0
    t[1, y[1]] += 15.0
    for alpha, beta in ((1.0, 0.0), (0.0, 1.0), (2.5, 0.5)):
        check("dkd", device, s, t, y, alpha=alpha, beta=beta, temperature=1.0)


@pytest.mark.parametrize("shape", [(1, 2), (3, 2), (50, 2)], ids=str)
@pytest.mark.parametrize("dtypes", DTYPES[:3], ids=lambda d: str(d[0])[6:])
def test_dist_two_classes(shape, dtypes, device):
    """Two classes: every row's rho is +-1, so its gradient is the cancellation of terms of
    size ~tau^2 beta / (N D_i) to ~1e-6 or less, below float32 resolution relative to itself."""
    s, t = logits(shape, dtypes[0], device), logits(shape, dtypes[1], device, seed=5)
    check("dist", device, s, t, grad_atol=2e-5, **LOGIT_LOSSES["dist"])


def test_dist_identical_inputs_and_many_rows(device):
    # rho = 1 for every row and class: loss ~0 (absolute tolerance), gradients ~0
    s = logits((64, 33), F32, device)
    got, gs, gt = evaluate("dist", device, s, s.clone())
    assert abs(got.item()) < 1e-5 and gs.abs().max() < 1e-5 and gt.abs().max() < 1e-5
    # several row slices of the class statistics
    s, t = logits((2500, 70), F32, device), logits((2500, 70), F16, device, seed=4)
    check("dist", device, s, t, beta=0.5, gamma=3.0, temperature=2.0)


def test_dist_is_deterministic_and_thread_count_independent():
    s, t = logits((2100, 600), F32, "cpu"), logits((2100, 600), F32, "cpu", seed=4)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(evaluate("dist", "cpu", s, t, gamma=2.0))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_dist_is_deterministic_on_cuda(device):
    if device != "cuda":
        pytest.skip("CUDA only")
    s, t = logits((3000, 501), F32, device), logits((3000, 501), BF16, device, seed=4)
    first = evaluate("dist", device, s, t)
    for _ in range(2):
        for a, b in zip(first, evaluate("dist", device, s, t)):
            assert torch.equal(a, b)


def test_auto_backend_picks_cpu_for_new_losses():
    s, t = logits((2, 5), F32, "cpu"), logits((2, 5), F32, "cpu")
    report = fastkd.backends()["cpu"]
    assert {"ats", "dkd", "dist", "mgd"} <= set(report["losses"])
    y = targets((2, 5), 5, "cpu")
    assert torch.equal(fastkd.dkd_loss(s, t, y), fastkd.dkd_loss(s, t, y, backend="cpu"))


# ----------------------------------------------------------------------------
# MGD
# ----------------------------------------------------------------------------

MASK_CASES = [
    ((2, 3, 4, 5), 0, 0.15),
    ((3, 16, 7, 7), 12345, 0.5),
    ((1, 64, 1, 1), 2**40 + 7, 0.75),  # only the seed's low 32 bits enter the hash, as in _mask.py
    ((4, 5, 9, 3), 99, 0.0),
    ((2, 8, 6, 6), 7, 0.999),
    ((0, 3, 4, 4), 1, 0.5),
]


def bits(x):
    return x.view({F64: torch.int64, F32: torch.int32, F16: torch.int16, BF16: torch.int16}[x.dtype])


@pytest.mark.parametrize("shape,seed,ratio", MASK_CASES, ids=str)
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
def test_mgd_mask_bit_for_bit(shape, seed, ratio, spatial, dtype, device):
    if device == "cuda" and dtype == F64:
        pytest.skip("float64 goes to the reference backend")
    x = logits(shape, dtype, device)
    if x.numel():
        x.view(-1)[::7] = float("nan")  # x * 0 must stay NaN, as the reference's x * M
        x.view(-1)[3::11] = float("-inf")
    mask = R.mgd_keep_mask(seed, shape, ratio, "spatial" if spatial else "channel", device=device, dtype=dtype)
    got, want = torch.ops.fastkd.mgd_mask(x, seed, ratio, spatial), x * mask
    assert got.dtype == dtype and got.shape == x.shape
    # every bit, signed zeros included; NaN payloads are torch's rounding detail (bf16: 0xFFFF)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(bits(got)[~nan], bits(want)[~nan])


@pytest.mark.parametrize("spatial", [False, True])
def test_mgd_mask_backward_regenerates_mask(spatial, device):
    x = logits((3, 6, 5, 4), F32, device).requires_grad_()
    up = logits((3, 6, 5, 4), F32, device, seed=9)
    torch.ops.fastkd.mgd_mask(x, 31, 0.4, spatial).backward(up)
    mask = R.mgd_keep_mask(31, x.shape, 0.4, "spatial" if spatial else "channel", device=device)
    assert torch.equal(x.grad, up * mask)


@pytest.mark.parametrize("dtypes", [(F32, F32), (F16, F32), (BF16, BF16)], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 7, 33, 29), (0, 4, 2, 2)], ids=str)
def test_mgd_sq_err(dtypes, shape, device):
    p, t = logits(shape, dtypes[0], device), logits(shape, dtypes[1], device, seed=2)
    loss, gp, gt = torch.ops.fastkd.mgd_sq_err(p, t, 0.25, True, True)
    diff = p.to(F64) - t.to(F64)
    close(loss, 0.25 * (diff * diff).sum(), LOSS_TOL[device], "loss")
    assert loss.dtype == F32 and gp.dtype == p.dtype and gt.dtype == t.dtype
    close(gp, 0.5 * diff, GRAD_TOL[p.dtype], "grad pred")
    close(gt, -0.5 * diff, GRAD_TOL[t.dtype], "grad teacher")
    loss2, gp2, gt2 = torch.ops.fastkd.mgd_sq_err(p, t, 0.25, False, False)
    assert torch.equal(loss2, loss) and gp2.numel() == 0 and gt2.numel() == 0


@pytest.mark.parametrize("mask_type", ["channel", "spatial"])
def test_mgd_loss_matches_reference(mask_type, device):
    torch.manual_seed(0)
    conv = lambda: torch.nn.Conv2d(6, 6, 3, padding=1)  # noqa: E731
    gen = torch.nn.Sequential(conv(), torch.nn.ReLU(), conv())
    align = torch.nn.Conv2d(4, 6, 1)
    gen, align = gen.to(device), align.to(device)
    s = logits((3, 4, 5, 5), F32, device).requires_grad_()
    t = logits((3, 6, 5, 5), F32, device, seed=2)
    results = []
    for backend in (device, "reference"):
        g = torch.Generator().manual_seed(11)
        loss = fastkd.mgd_loss(
            s, t, gen, align=align, mask_ratio=0.5, mask_type=mask_type, generator=g, backend=backend
        )
        params = [s] + list(gen.parameters()) + list(align.parameters())
        results.append((loss, torch.autograd.grad(loss, params)))
    (got, got_g), (want, want_g) = results
    close(got, want, LOSS_TOL[device], "mgd loss")
    for a, b in zip(got_g, want_g):
        close(a, b, 1e-5 if device == "cpu" else 1e-4, "mgd grad")


# ----------------------------------------------------------------------------
# torch.library and torch.compile
# ----------------------------------------------------------------------------

def _op_cases():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 9, generator=g, requires_grad=True)
    t = torch.randn(4, 9, generator=g, requires_grad=True)
    y = torch.tensor([1, 8, 0, 3])
    w = torch.tensor([0.25, 0.0, 0.5, 0.25])
    x = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    p = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    q = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    ops = torch.ops.fastkd
    return {
        "ats_fwd": (ops.ats_fwd.default, (s, t, y, w, 1.5, 4.0, 2.0, True, True, True)),
        "ats_fwd_rows": (ops.ats_fwd.default, (s, t, y, w, 1.0, 3.0, 1.0, False, True, False)),
        "dkd_fwd": (ops.dkd_fwd.default, (s, t, y, w, 1.0, 8.0, 4.0, True, True, True)),
        "dkd_fwd_rows": (ops.dkd_fwd.default, (s, t, y, w, 0.5, 2.0, 1.0, False, False, True)),
        "dist_fwd": (ops.dist_fwd.default, (s, t, 1.0, 2.0, 4.0, True, True)),
        "mgd_mask": (ops.mgd_mask.default, (x, 5, 0.5, False)),
        "mgd_mask_spatial": (ops.mgd_mask.default, (x, 2**33 + 1, 0.3, True)),
        "mgd_sq_err": (ops.mgd_sq_err.default, (p, q, 0.1, True, True)),
    }


@pytest.mark.parametrize("case", list(_op_cases()))
def test_opcheck(case):
    op, args = _op_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_forward_backward():
    """One compiled graph calls every new cpu op; values and gradients equal eager."""

    def step(s, t, y, x, feat_t):
        a = fastkd.ats_loss(s, t, y, backend="cpu")
        d = fastkd.dkd_loss(s, t, y, reduction="sum", backend="cpu")
        r = fastkd.dist_loss(s, t, backend="cpu")
        masked = torch.ops.fastkd.mgd_mask(x, 17, 0.5, False)
        m = torch.ops.fastkd.mgd_sq_err(masked * 2.0, feat_t, 0.5, True, False)[0]
        return a + 0.5 * d + r + m

    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 21, generator=g)
    t = torch.randn(6, 21, generator=g)
    y = torch.randint(0, 21, (6,), generator=g)
    x = torch.randn(2, 3, 4, 4, generator=g)
    ft = torch.randn(2, 3, 4, 4, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        s_, x_ = s.clone().requires_grad_(), x.clone().requires_grad_()
        out = fn(s_, t, y, x_, ft)
        out.backward()
        results.append((out, s_.grad, x_.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
