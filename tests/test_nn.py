"""Tests of the fastkd.nn modules.

The logit-loss modules are compared with ``fastkd.reference`` (values and
gradients); MGD and SimKD with the same computation written out here from the
module's own layers; the CTKD pieces with their formulas and with the sign of
a real optimizer step. Value tests run with ``backend="reference"`` and
``backend="auto"`` (on CPU, auto runs the compiled cpu kernel where one exists
and falls back to the reference otherwise). Everything is tiny: a few seconds.
"""
import math

import pytest
import torch
from torch import nn

from fastkd import functional
from fastkd.core import mask as _mask
from fastkd import nn as fnn
from fastkd import reference as R

# "auto" warns once when a loss has no fused CPU kernel yet; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*no fused backend")

BACKENDS = ["reference", "auto"]
TOL = dict(atol=1e-5, rtol=1e-5)


def logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def pair(n=6, c=10, seed=0):
    s = logits(n, c, seed=seed).requires_grad_()
    t = logits(n, c, seed=seed + 1)
    return s, t


def target_with_ignored(n=6, c=10, seed=2):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=g)
    target[1] = -100
    return target


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss.sum(), x)
    return g


# ----------------------------------------------------------------------------
# logit losses
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_kd_loss_matches_reference(backend, reduction):
    s, t = pair()
    target = target_with_ignored()
    weight = torch.linspace(0.5, 2.0, 6)
    module = fnn.KDLoss(2.5, reduction=reduction, backend=backend)
    got = module(s, t, target=target, sample_weight=weight)
    want = R.kd_loss(s, t, 2.5, reduction=reduction, target=target, sample_weight=weight)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), **TOL)
    if reduction == "none":
        assert got.shape == (6,) and got[1] == 0  # the ignored row


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_loss_forward_temperature_overrides_module(backend):
    s, t = pair()
    module = fnn.KDLoss(4.0, backend=backend)
    torch.testing.assert_close(module(s, t), R.kd_loss(s, t, 4.0), **TOL)
    torch.testing.assert_close(module(s, t, temperature=1.5), R.kd_loss(s, t, 1.5), **TOL)
    temp = torch.tensor(2.0, requires_grad=True)
    got = module(s, t, temperature=temp)
    want = R.kd_loss(s, t, temp)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(grad_of(got, temp), grad_of(want, temp), **TOL)
    assert module.temperature == 4.0  # the override is for that call only


@pytest.mark.parametrize("backend", BACKENDS)
def test_dkd_loss_matches_reference(backend):
    s, t = pair()
    target = target_with_ignored()
    module = fnn.DKDLoss(alpha=1.5, beta=6.0, temperature=3.0, backend=backend)
    got = module(s, t, target)
    want = R.dkd_loss(s, t, target, alpha=1.5, beta=6.0, temperature=3.0)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epoch, factor", [(1, 0.05), (10, 0.5), (20, 1.0), (40, 1.0)])
def test_dkd_warmup_factor(backend, epoch, factor):
    s, t = pair()
    target = target_with_ignored()
    module = fnn.DKDLoss(warmup_epochs=20, backend=backend)
    assert module.warmup_factor(epoch) == pytest.approx(factor)
    want = R.dkd_loss(s, t, target) * factor
    got = module(s, t, target, epoch=epoch)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), **TOL)


def test_dkd_warmup_off():
    s, t = pair()
    target = target_with_ignored()
    want = R.dkd_loss(s, t, target)
    torch.testing.assert_close(fnn.DKDLoss(backend="reference")(s, t, target), want)  # epoch None
    no_warmup = fnn.DKDLoss(warmup_epochs=0, backend="reference")
    assert no_warmup.warmup_factor(1) == 1.0
    torch.testing.assert_close(no_warmup(s, t, target, epoch=1), want)


@pytest.mark.parametrize("epoch, error", [
    (-1, ValueError), ("3", TypeError), (True, TypeError), (math.nan, ValueError),
])
def test_dkd_bad_epoch(epoch, error):
    s, t = pair()
    with pytest.raises(error, match="epoch"):
        fnn.DKDLoss(backend="reference")(s, t, target_with_ignored(), epoch=epoch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ats_loss_matches_reference(backend):
    s, t = pair()
    target = target_with_ignored()
    weight = torch.linspace(0.5, 2.0, 6)
    module = fnn.ATSLoss(5.0, 1.5, 2.0, reduction="sum", backend=backend)
    got = module(s, t, target, sample_weight=weight)
    want = R.ats_loss(s, t, target, target_temperature=5.0, other_temperature=1.5, student_temperature=2.0,
                      reduction="sum", sample_weight=weight)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dist_loss_matches_reference(backend):
    s, t = pair()
    module = fnn.DISTLoss(beta=2.0, gamma=0.5, temperature=4.0, backend=backend)
    got = module(s, t)
    want = R.dist_loss(s, t, beta=2.0, gamma=0.5, temperature=4.0)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(grad_of(got, s), grad_of(want, s), **TOL)


# ----------------------------------------------------------------------------
# MGD
# ----------------------------------------------------------------------------

def feats(n, c, h, w, seed):
    return logits(n, c, h, w, seed=seed, scale=1.0)


def test_mgd_align_only_when_channels_differ():
    different = fnn.MGDLoss(8, 16)
    assert isinstance(different.align, nn.Conv2d)
    assert (different.align.in_channels, different.align.out_channels) == (8, 16)
    assert different.align.kernel_size == (1, 1) and different.align.bias is not None
    assert fnn.MGDLoss(16, 16).align is None
    convs = [m for m in different.generation if isinstance(m, nn.Conv2d)]
    assert [type(m) for m in different.generation] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    for conv in convs:
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (16, 16, (3, 3), (1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_channels, mask_type", [(8, "channel"), (16, "spatial")])
def test_mgd_loss_value(backend, student_channels, mask_type):
    torch.manual_seed(0)
    module = fnn.MGDLoss(student_channels, 16, alpha=0.5, mask_ratio=0.5, mask_type=mask_type, backend=backend)
    s, t = feats(3, student_channels, 5, 4, seed=1), feats(3, 16, 5, 4, seed=2)
    got = module(s, t, generator=torch.Generator().manual_seed(7))

    # The same computation, written out: the module draws its mask seed from the generator.
    seed = _mask.draw_seed(torch.Generator().manual_seed(7))
    x = module.align(s) if module.align is not None else s
    mask = R.mgd_keep_mask(seed, x.shape, 0.5, mask_type)
    assert 0 < mask.sum() < mask.numel()  # the mask really drops something
    want = 0.5 * ((module.generation(x * mask) - t) ** 2).sum() / 3
    torch.testing.assert_close(got, want, **TOL)
    unmasked = 0.5 * ((module.generation(x) - t) ** 2).sum() / 3
    assert not torch.allclose(got, unmasked)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mgd_backward_reaches_align_and_generation(backend):
    torch.manual_seed(0)
    module = fnn.MGDLoss(8, 16, backend=backend)
    s, t = feats(2, 8, 4, 4, seed=3).requires_grad_(), feats(2, 16, 4, 4, seed=4)
    loss = module(s, t, generator=torch.Generator().manual_seed(1))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_mgd_forward_checks_channels():
    module = fnn.MGDLoss(8, 16)
    with pytest.raises(ValueError, match="student_feat"):
        module(feats(2, 4, 4, 4, seed=0), feats(2, 16, 4, 4, seed=1))
    with pytest.raises(ValueError, match="teacher_feat"):
        module(feats(2, 8, 4, 4, seed=0), feats(2, 8, 4, 4, seed=1))


# ----------------------------------------------------------------------------
# SimKD
# ----------------------------------------------------------------------------

def test_simkd_projector_structure():
    module = fnn.SimKD(8, 16, nn.Linear(16, 5), factor=4)
    convs = [m for m in module.projector if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (8, 4, (1, 1), (0, 0)), (4, 4, (3, 3), (1, 1)), (4, 16, (1, 1), (0, 0))]
    assert all(c.bias is None for c in convs)
    assert [type(m) for m in module.projector] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3


@pytest.mark.parametrize("student_hw, teacher_hw, size", [
    ((8, 8), (4, 4), (4, 4)),     # student larger: pool the student
    ((4, 4), (8, 8), (4, 4)),     # teacher larger: pool the teacher
    ((6, 8), (4, 10), (4, 8)),    # each larger in one dim
    ((4, 4), (4, 4), (4, 4)),
])
def test_simkd_pools_larger_map_loss_and_logits(student_hw, teacher_hw, size):
    torch.manual_seed(0)
    classifier = nn.Linear(16, 5)
    module = fnn.SimKD(8, 16, classifier)
    s, t = feats(3, 8, *student_hw, seed=1), feats(3, 16, *teacher_hw, seed=2)
    loss, out = module(s, t)

    projected = module.projector(torch.nn.functional.adaptive_avg_pool2d(s, size))
    t_pooled = torch.nn.functional.adaptive_avg_pool2d(t, size)
    assert projected.shape == (3, 16) + size
    torch.testing.assert_close(loss, ((projected - t_pooled) ** 2).mean(), **TOL)
    torch.testing.assert_close(loss, functional.simkd_loss(projected, t_pooled), **TOL)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, classifier(projected.mean(dim=(2, 3))), **TOL)


def test_simkd_teacher_classifier_not_trained_unless_included():
    torch.manual_seed(0)
    classifier = nn.Linear(16, 5)
    module = fnn.SimKD(8, 16, classifier)
    assert module.teacher_classifier is classifier  # used as given, not copied
    classifier_params = {id(p) for p in classifier.parameters()}
    assert not classifier_params & {id(p) for p in module.parameters()}
    assert not any(k.startswith("_teacher") or "classifier" in k for k in module.state_dict())

    before = classifier.weight.detach().clone()
    projector_before = module.projector[0].weight.detach().clone()
    s, t = feats(4, 8, 4, 4, seed=1), feats(4, 16, 4, 4, seed=2)
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    loss, out = module(s, t)
    (loss + out.logsumexp(dim=1).mean()).backward()
    assert classifier.weight.grad is not None  # the gradient passes through the classifier...
    opt.step()
    assert torch.equal(classifier.weight, before)  # ...but the optimizer does not update it
    assert not torch.equal(module.projector[0].weight, projector_before)

    opt = torch.optim.SGD(list(module.parameters()) + list(classifier.parameters()), lr=0.5)
    loss, out = module(s, t)
    (loss + out.logsumexp(dim=1).mean()).backward()
    opt.step()
    assert not torch.equal(classifier.weight, before)  # the user included it


def test_simkd_forward_checks():
    module = fnn.SimKD(8, 16, nn.Linear(16, 5))
    with pytest.raises(ValueError, match="student_feat"):
        module(feats(2, 4, 4, 4, seed=0), feats(2, 16, 4, 4, seed=1))
    with pytest.raises(ValueError, match="batch size"):
        module(feats(2, 8, 4, 4, seed=0), feats(3, 16, 4, 4, seed=1))
    with pytest.raises(ValueError, match="teacher_feat"):
        module(feats(2, 8, 4, 4, seed=0), logits(2, 16, 4, seed=1))  # 3-D


# ----------------------------------------------------------------------------
# CTKD
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("lam", [-1.0, -0.25, 0.0, 2.0])
def test_gradient_reversal_identity_forward_scaled_backward(lam):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, dtype=torch.float64)
    layer = fnn.GradientReversal(lam)
    y = layer(x)
    assert torch.equal(y, x) and y.shape == x.shape
    y.backward(g)
    torch.testing.assert_close(x.grad, lam * g, rtol=0, atol=0)


def test_gradient_reversal_lambda_settable_and_overridable():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    layer = fnn.GradientReversal()
    assert layer.lambda_ == -1.0
    (layer(x) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, -2 * x.detach())
    x.grad = None
    layer.lambda_ = 0.5  # set each step
    (layer(x) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, 0.5 * 2 * x.detach())
    x.grad = None
    (layer(x, lambda_=3.0) ** 2).sum().backward()  # per-call value, attribute untouched
    torch.testing.assert_close(x.grad, 3.0 * 2 * x.detach())
    assert layer.lambda_ == 0.5
    with pytest.raises(TypeError, match="lambda_"):
        layer(x, lambda_="1")


def test_cosine_curriculum_values():
    c = fnn.CosineCurriculum(epochs=10)
    assert c(0) == pytest.approx(0.0, abs=1e-12)
    assert c(5) == pytest.approx(-0.5)
    assert c(10) == pytest.approx(-1.0)
    assert c(20) == pytest.approx(-1.0)
    assert c(2.5) == pytest.approx(-1 + (math.cos(math.pi / 4) + 1) / 2)
    assert [c(e) for e in range(11)] == sorted([c(e) for e in range(11)], reverse=True)  # ramps down
    custom = fnn.CosineCurriculum(l_min=-2.0, l_max=1.0, epochs=4)
    assert (custom(0), custom(2), custom(4), custom(8)) == pytest.approx((1.0, -0.5, -2.0, -2.0))
    with pytest.raises(ValueError, match="epoch"):
        c(-1)


def test_learnable_temperature_global_initial_value():
    temp = fnn.LearnableTemperature()
    T = temp()
    assert T.dim() == 0 and T.requires_grad
    assert T.item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # about 15.62
    assert T.item() == pytest.approx(15.62, abs=0.01)
    assert [name for name, _ in temp.named_parameters()] == ["w"]
    assert temp.w.item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [-1.0, 1.0])
def test_learnable_temperature_step_direction(backend, lam):
    s, t = logits(16, 10, seed=5), logits(16, 10, seed=6, scale=6.0)
    kd = fnn.KDLoss(backend=backend)
    temp = fnn.LearnableTemperature()
    opt = torch.optim.SGD(temp.parameters(), lr=0.5)

    loss = kd(s, t, temperature=temp(lambda_=lam))
    loss.backward()
    # The reversal is exact: d(loss)/dw = lam * d(loss)/dT * t_end * sigmoid'(w).
    T0 = torch.tensor(1 + 20 * torch.sigmoid(torch.tensor(1.0)).item(), requires_grad=True)
    (dloss_dT,) = torch.autograd.grad(R.kd_loss(s, t, T0), T0)
    sig = torch.sigmoid(torch.tensor(1.0))
    torch.testing.assert_close(temp.w.grad, lam * dloss_dT * 20 * sig * (1 - sig), **TOL)
    assert dloss_dT.abs() > 1e-3  # the test is meaningful: the loss does depend on T here

    opt.step()
    with torch.no_grad():
        after = kd(s, t, temperature=temp())
    if lam < 0:
        assert after > loss.detach()  # adversarial: the temperature ascends the KD loss
    else:
        assert after < loss.detach()


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_temperature_instance(backend):
    torch.manual_seed(0)
    temp = fnn.LearnableTemperature("instance", num_classes=10, hidden=16)
    kd = fnn.KDLoss(backend=backend)
    s, t = pair(n=6, c=10)
    T = temp(s, t, lambda_=-1.0)
    assert T.shape == (6,) and T.requires_grad
    assert bool(((T > 1) & (T < 21)).all())
    loss = kd(s, t, temperature=T)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in temp.named_parameters()}
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
    # The logits enter the MLP detached: the student's gradient is the KD gradient at fixed T.
    torch.testing.assert_close(s.grad, grad_of(R.kd_loss(s, t, T.detach()), s), **TOL)

    temp.zero_grad()
    kd(s.detach(), t, temperature=temp(s, t, lambda_=1.0)).backward()
    for name, p in temp.named_parameters():
        torch.testing.assert_close(p.grad, -grads[name], **TOL)

    s3, t3 = logits(2, 3, 10, seed=8), logits(2, 3, 10, seed=9)
    T3 = temp(s3, t3)
    assert T3.shape == (2, 3)
    assert torch.isfinite(kd(s3, t3, temperature=T3))


def test_learnable_temperature_instance_checks():
    temp = fnn.LearnableTemperature("instance", num_classes=10)
    with pytest.raises(ValueError, match="student_logits"):
        temp()
    with pytest.raises(ValueError, match="num_classes"):
        temp(logits(2, 7), logits(2, 7))


# ----------------------------------------------------------------------------
# bad constructor arguments
# ----------------------------------------------------------------------------

LIN = nn.Linear(16, 5)


@pytest.mark.parametrize("build, error, name", [
    (lambda: fnn.KDLoss(0.0), ValueError, "temperature"),
    (lambda: fnn.KDLoss("4"), TypeError, "temperature"),
    (lambda: fnn.KDLoss(reduction="avg"), ValueError, "reduction"),
    (lambda: fnn.KDLoss(ignore_index=1.5), TypeError, "ignore_index"),
    (lambda: fnn.KDLoss(backend="gpu"), ValueError, "backend"),
    (lambda: fnn.DKDLoss(alpha=math.inf), ValueError, "alpha"),
    (lambda: fnn.DKDLoss(beta=None), TypeError, "beta"),
    (lambda: fnn.DKDLoss(temperature=-1.0), ValueError, "temperature"),
    (lambda: fnn.DKDLoss(warmup_epochs=-1), ValueError, "warmup_epochs"),
    (lambda: fnn.DKDLoss(warmup_epochs="20"), TypeError, "warmup_epochs"),
    (lambda: fnn.ATSLoss(target_temperature=0), ValueError, "target_temperature"),
    (lambda: fnn.ATSLoss(other_temperature=-2.0), ValueError, "other_temperature"),
    (lambda: fnn.ATSLoss(student_temperature=math.nan), ValueError, "student_temperature"),
    (lambda: fnn.ATSLoss(reduction="total"), ValueError, "reduction"),
    (lambda: fnn.DISTLoss(beta="1"), TypeError, "beta"),
    (lambda: fnn.DISTLoss(gamma=math.nan), ValueError, "gamma"),
    (lambda: fnn.DISTLoss(temperature=0.0), ValueError, "temperature"),
    (lambda: fnn.DISTLoss(backend=None), ValueError, "backend"),
    (lambda: fnn.MGDLoss(0, 16), ValueError, "student_channels"),
    (lambda: fnn.MGDLoss(8, 16.0), TypeError, "teacher_channels"),
    (lambda: fnn.MGDLoss(8, 16, alpha="x"), TypeError, "alpha"),
    (lambda: fnn.MGDLoss(8, 16, mask_ratio=1.0), ValueError, "mask_ratio"),
    (lambda: fnn.MGDLoss(8, 16, mask_type="pixel"), ValueError, "mask_type"),
    (lambda: fnn.MGDLoss(8, 16, backend="cuda:0"), ValueError, "backend"),
    (lambda: fnn.SimKD(8, 16, "fc"), TypeError, "teacher_classifier"),
    (lambda: fnn.SimKD(True, 16, LIN), TypeError, "student_channels"),
    (lambda: fnn.SimKD(8, 16, LIN, factor=0), ValueError, "factor"),
    (lambda: fnn.SimKD(8, 16, LIN, factor=32), ValueError, "factor"),
    (lambda: fnn.GradientReversal("-1"), TypeError, "lambda_"),
    (lambda: fnn.CosineCurriculum(epochs=0), ValueError, "epochs"),
    (lambda: fnn.CosineCurriculum(l_min=math.inf), ValueError, "l_min"),
    (lambda: fnn.CosineCurriculum(l_max=None), TypeError, "l_max"),
    (lambda: fnn.LearnableTemperature("batch"), ValueError, "mode"),
    (lambda: fnn.LearnableTemperature(t_start=0.0), ValueError, "t_start"),
    (lambda: fnn.LearnableTemperature(t_end=-1.0), ValueError, "t_end"),
    (lambda: fnn.LearnableTemperature("instance"), ValueError, "num_classes"),
    (lambda: fnn.LearnableTemperature("instance", num_classes=0), ValueError, "num_classes"),
    (lambda: fnn.LearnableTemperature(num_classes=10), ValueError, "num_classes"),
    (lambda: fnn.LearnableTemperature("instance", num_classes=10, hidden=0), ValueError, "hidden"),
])
def test_bad_constructor_args(build, error, name):
    with pytest.raises(error, match=name):
        build()
