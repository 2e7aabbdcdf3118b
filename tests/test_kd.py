"""kd_loss through every fused backend available here, against fastkd.reference."""
import math

import pytest
import torch

import fastkd
from fastkd import reference
from backend_cases import FUSED, TOLERANCES, skip_unless_runs

SHAPES = [(1, 1), (3, 10), (41, 401), (7, 1271), (2, 3, 17), (5, 2, 100)]
WIDE = (1, 131072)
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def make(shape, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * scale).to(dtype).to(device)
    t = (torch.randn(shape, generator=g) * scale).to(dtype).to(device)
    return s, t


def run(fn, s, t, temperature=4.0, grad_teacher=True, **kw):
    s = s.clone().requires_grad_()
    t = t.clone().requires_grad_(grad_teacher)
    loss = fn(s, t, temperature, **kw)
    out = loss.sum() if loss.dim() else loss
    grads = torch.autograd.grad(out, [s, t] if grad_teacher else [s])
    return loss, grads


def assert_close_to_reference(backend, s, t, tol_dtype=torch.float32, temperature=4.0, **kw):
    atol, rtol = TOLERANCES[tol_dtype]
    loss, grads = run(lambda *a, **k: fastkd.kd_loss(*a, backend=backend, **k), s, t, temperature, **kw)
    ref_loss, ref_grads = run(reference.kd_loss, s, t, temperature, **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss.float(), atol=atol, rtol=rtol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference_float32(backend, shape, reduction):
    device = skip_unless_runs("kd", backend)
    s, t = make(shape, torch.float32, device)
    assert_close_to_reference(backend, s, t, reduction=reduction)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("sdtype,tdtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_low_precision_and_mixed_dtypes(backend, sdtype, tdtype):
    device = skip_unless_runs("kd", backend)
    s, _ = make((9, 333), sdtype, device, seed=1)
    _, t = make((9, 333), tdtype, device, seed=2)
    worst = sdtype if sdtype != torch.float32 else tdtype
    assert_close_to_reference(backend, s, t, tol_dtype=worst)


@pytest.mark.parametrize("backend", FUSED)
def test_one_row_of_128k_classes(backend):
    device = skip_unless_runs("kd", backend)
    s, t = make(WIDE, torch.float32, device, seed=3)
    assert_close_to_reference(backend, s, t, temperature=1.0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_and_sample_weight(backend, reduction):
    device = skip_unless_runs("kd", backend)
    s, t = make((4, 6, 50), torch.float32, device, seed=4)
    target = torch.randint(0, 50, (4, 6)).to(device)
    target[0, :3] = -100
    target[2, 5] = -100
    weight = torch.rand(4, 6).to(device)
    assert_close_to_reference(backend, s, t, reduction=reduction, target=target, sample_weight=weight)


@pytest.mark.parametrize("backend", FUSED)
def test_ignored_rows_are_never_read(backend):
    device = skip_unless_runs("kd", backend)
    s, t = make((3, 20), torch.float32, device, seed=5)
    s[1] = float("nan")
    target = torch.tensor([1, -100, 2], device=device)
    loss, (gs, gt) = run(lambda *a, **k: fastkd.kd_loss(*a, backend=backend, **k), s, t, target=target)
    assert torch.isfinite(loss)
    assert torch.all(gs[1] == 0) and torch.all(gt[1] == 0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("per_row", [False, True])
def test_temperature_tensor_gradient(backend, per_row):
    device = skip_unless_runs("kd", backend)
    s, t = make((6, 37), torch.float32, device, seed=6)
    temps = {}
    for name in ("fused", "reference"):
        temp = (torch.linspace(1.5, 6.0, 6) if per_row else torch.tensor(3.0)).to(device).requires_grad_()
        fn = (lambda *a, **k: fastkd.kd_loss(*a, backend=backend, **k)) if name == "fused" else reference.kd_loss
        loss = fn(s, t, temp, target=torch.tensor([0, 1, -100, 3, 4, 5], device=device))
        (g,) = torch.autograd.grad(loss, [temp])
        temps[name] = (loss, g)
    torch.testing.assert_close(temps["fused"][0], temps["reference"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(temps["fused"][1], temps["reference"][1], atol=1e-5, rtol=1e-4)
    assert temps["fused"][1].abs().sum() > 0


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_rows_and_all_ignored_give_zero(backend, reduction):
    device = skip_unless_runs("kd", backend)
    for s, t, target in [
        (*make((0, 10), torch.float32, device), None),
        (*make((3, 10), torch.float32, device), torch.full((3,), -100, device=device)),
    ]:
        loss, (gs, gt) = run(lambda *a, **k: fastkd.kd_loss(*a, backend=backend, **k), s, t,
                             target=target, reduction=reduction)
        assert not torch.isnan(loss).any()
        assert torch.all(loss == 0)
        assert torch.all(gs == 0) and torch.all(gt == 0)


@pytest.mark.parametrize("backend", FUSED)
def test_infinite_logits_confident_rows_and_nan(backend):
    device = skip_unless_runs("kd", backend)
    s, t = make((4, 64), torch.float32, device, seed=7)
    s[0, :10] = float("-inf")  # masked vocabulary in both nets
    t[0, :10] = float("-inf")
    t[1, 5] = float("-inf")  # teacher alone masks a class
    s[2, 3] += 100.0  # a confident row: gap of 100 at T = 1
    t[2, 3] += 100.0
    assert_close_to_reference(backend, s, t, temperature=1.0)
    loss, _ = run(lambda *a, **k: fastkd.kd_loss(*a, backend=backend, **k), s, t, 1.0)
    assert torch.isfinite(loss)
    s[3, 0] = float("nan")
    loss, _ = run(lambda *a, **k: fastkd.kd_loss(*a, backend=backend, **k), s, t, 1.0)
    assert torch.isnan(loss)


def test_hand_computed_value():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 1.0, 0.0]])
    T = 2.0
    ps = [math.exp(x / T) for x in (1.0, 2.0, 3.0)]
    pt = [math.exp(x / T) for x in (3.0, 1.0, 0.0)]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    expected = T * T * sum(q * math.log(q / p) for p, q in zip(ps, pt))
    for backend in ("reference", "cpu"):
        if backend == "cpu" and not fastkd.backends()["cpu"]["available"]:
            continue
        got = fastkd.kd_loss(s, t, T, backend=backend)
        assert abs(got.item() - expected) < 1e-6


@pytest.mark.parametrize("backend", FUSED)
def test_backward_scales_the_stored_gradient(backend):
    device = skip_unless_runs("kd", backend)
    s, t = make((5, 30), torch.float32, device, seed=8)
    s.requires_grad_()
    (g1,) = torch.autograd.grad(fastkd.kd_loss(s, t, backend=backend), [s])
    (g3,) = torch.autograd.grad(3.0 * fastkd.kd_loss(s, t, backend=backend), [s])
    torch.testing.assert_close(g3, 3.0 * g1)
    rows = fastkd.kd_loss(s, t, reduction="none", backend=backend)
    (gr,) = torch.autograd.grad((rows * torch.arange(5.0, device=device)).sum(), [s])
    (gref,) = torch.autograd.grad((reference.kd_loss(s, t, reduction="none") * torch.arange(5.0, device=device)).sum(), [s])
    torch.testing.assert_close(gr, gref, atol=1e-6, rtol=1e-5)


def test_auto_picks_the_compiled_cpu_kernel():
    if not fastkd.backends()["cpu"]["available"]:
        pytest.skip("compiled extension not built")
    s, t = make((4, 10), torch.float32, "cpu")
    loss = fastkd.kd_loss(s.requires_grad_(), t)
    assert "fastkd_kd_fwd" in type(loss.grad_fn).__name__


def test_float64_goes_to_the_reference_and_fused_backends_refuse_it():
    s, t = make((3, 5), torch.float64, "cpu")
    assert fastkd.kd_loss(s, t).dtype == torch.float64
    with pytest.raises(ValueError, match="float64"):
        fastkd.kd_loss(s, t, backend="cpu")


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(backend="gpu"), ValueError, "backend must be one of"),
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=torch.tensor([1.0, 2.0])), ValueError, "temperature"),
        (dict(target=torch.tensor([0, 1])), ValueError, "target must have the leading shape"),
        (dict(target=torch.tensor([0, 1, 10])), ValueError, "target has class index 10"),
        (dict(target=torch.tensor([0.0, 1.0, 2.0])), TypeError, "target must be an integer"),
        (dict(sample_weight=torch.ones(4)), ValueError, "sample_weight must have one weight per row"),
    ],
)
def test_bad_inputs(kwargs, err, match):
    s, t = make((3, 5), torch.float32, "cpu")
    temperature = kwargs.pop("temperature", 4.0)
    with pytest.raises(err, match=match):
        fastkd.kd_loss(s, t, temperature, **kwargs)


def test_bad_logits():
    s, t = make((3, 5), torch.float32, "cpu")
    with pytest.raises(ValueError, match="same shape"):
        fastkd.kd_loss(s, t[:, :4])
    with pytest.raises(TypeError, match="student_logits must be a floating"):
        fastkd.kd_loss(s.long(), t)
    with pytest.raises(TypeError, match="teacher_logits must be a torch.Tensor"):
        fastkd.kd_loss(s, [1, 2])
    with pytest.raises(ValueError, match="requires grad"):
        fastkd.kd_loss(s, t, sample_weight=torch.ones(3, requires_grad=True), backend="cpu")
    with pytest.raises(ValueError, match="unavailable"):
        fastkd.kd_loss(s, t, backend="cuda")


def test_opcheck_and_compile_of_the_cpu_op():
    if not fastkd.backends()["cpu"]["available"]:
        pytest.skip("compiled extension not built")
    s, t = make((6, 70), torch.float32, "cpu")
    temp = torch.full((6,), 2.0)
    weight = torch.full((6,), 1 / 6)
    for reduce in (True, False):
        torch.library.opcheck(
            torch.ops.fastkd.kd_fwd.default,
            (s.clone().requires_grad_(), t.clone().requires_grad_(), temp.clone().requires_grad_(), weight,
             reduce, True, True, True),
        )

    def step(s, t, temp):
        return fastkd.kd_loss(s, t, temp, backend="cpu")

    compiled = torch.compile(step, fullgraph=True)
    sc, tc = s.clone().requires_grad_(), t.clone()
    T = torch.tensor(3.0, requires_grad=True)
    loss = compiled(sc, tc, T)
    loss.backward()
    se = s.clone().requires_grad_()
    Te = torch.tensor(3.0, requires_grad=True)
    ref = reference.kd_loss(se, t, Te)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(sc.grad, se.grad)
    torch.testing.assert_close(T.grad, Te.grad)


def test_reused_cpu_gradient_buffers_are_fully_rewritten():
    """Large CPU gradients come from a cache of freed buffers: stale values must never leak."""
    if not fastkd.backends()["cpu"]["available"]:
        pytest.skip("compiled extension not built")
    shape = (64, 20000)  # 5 MB of float32: above the cache's minimum size
    for step, ignored in enumerate(([], [0, 5, 63])):
        s, t = make(shape, torch.float32, "cpu", seed=10 + step)
        target = torch.zeros(shape[0], dtype=torch.long)
        target[ignored] = -100
        loss, (gs, gt) = run(lambda *a, **k: fastkd.kd_loss(*a, backend="cpu", **k), s, t, target=target)
        ref_loss, (rs, rt) = run(reference.kd_loss, s, t, target=target)
        torch.testing.assert_close(gs, rs, atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(gt, rt, atol=2e-6, rtol=1e-4)
        assert torch.all(gs[ignored] == 0)
        del gs, gt  # back to the cache for the next step
    torch.ops.fastkd.empty_grad_cache()
