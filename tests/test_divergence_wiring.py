"""The Python layer of the fused divergences (fastkd.losses.divergence.fused_call), independent of any kernel.

A test op with the arguments of ``fastkd::divergence_fwd`` runs the plain-PyTorch row op
(``fastkd.reference.divergence.divergence_fwd``) with the fused ops' backward (stored gradients
scaled by ``fastkd.core.autograd.scale_stored_grad``), and the
functionals' fused path is compared with the reference functionals: argument plumbing
(rows of 3-D inputs, row weights, reductions, top-k ids and modes, target only when the CE
is wanted, return_parts shapes, teacher gradients) is what is tested here; the kernels are
tested against the same reference in their own files.
"""
import types

import pytest
import torch

import fastkd
from fastkd.reference import divergence as R
from fastkd.losses import divergence as D
from fastkd import functional as F_
from fastkd.losses import classification as C
from fastkd.core.autograd import scale_stored_grad

CALLS = []


class _TestOp(torch.autograd.Function):
    """The reference row op with the fused ops' autograd: stored gradients scaled in backward."""

    @staticmethod
    def forward(ctx, student, teacher, topk_ids, target, *args):
        CALLS.append(dict(target=target.numel(), kind=args[2], coefficients=tuple(args[3:7]), soft_scale=args[7],
                          topk_mode=args[9], contiguous=student.is_contiguous() and teacher.is_contiguous()))
        loss, soft, hard, grad_s, grad_t = R.divergence_fwd(student, teacher, topk_ids, target, *args)
        ctx.save_for_backward(grad_s, grad_t)
        ctx.mark_non_differentiable(soft, hard)
        return loss.float(), soft.float(), hard.float()

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad_s, grad_t = ctx.saved_tensors
        grads = [scale_stored_grad(g, grad_loss) if g.numel() else None for g in (grad_s, grad_t)]
        return (*grads, *([None] * 16))


def _test_op(*args):
    return (*_TestOp.apply(*args), None, None)


@pytest.fixture
def test_backend(monkeypatch):
    """Every fused call of the divergences (and kd's CE path) runs the test op, on backend 'cpu'."""
    impl = types.SimpleNamespace(divergence_fwd=_test_op)
    monkeypatch.setattr(D, "implementation", lambda name: impl)
    monkeypatch.setattr(D, "resolve", lambda loss, backend, *tensors: "cpu")
    monkeypatch.setattr(C, "resolve", lambda loss, backend, *tensors: "cpu")  # dkd_fwd, ats_fwd: the CPU ops
    CALLS.clear()
    return CALLS


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


FUNCTIONS = {
    "reverse_kl": (fastkd.reverse_kl_loss, fastkd.reference.reverse_kl_loss, {}),
    "jsd": (fastkd.jsd_loss, fastkd.reference.jsd_loss, {"beta": 0.3}),
    "skew_rkl": (fastkd.skew_kl_loss, fastkd.reference.skew_kl_loss, {"skew": 0.2, "reverse": True}),
    "tvd": (fastkd.tvd_loss, fastkd.reference.tvd_loss, {}),
    "jeffreys": (fastkd.jeffreys_loss, fastkd.reference.jeffreys_loss, {}),
    "triangular": (fastkd.triangular_loss, fastkd.reference.triangular_loss, {}),
    "entropy_gated_kl": (fastkd.entropy_gated_kl_loss, fastkd.reference.entropy_gated_kl_loss,
                         {"alpha_min": 0.2, "alpha_max": 0.9, "tau": 0.7, "scale": 0.2}),
    "ab_divergence": (fastkd.ab_divergence_loss, fastkd.reference.ab_divergence_loss, {"alpha": -0.2, "beta": 0.9}),
    "renyi": (fastkd.renyi_loss, fastkd.reference.renyi_loss, {"order": 1.5}),
}


@pytest.mark.parametrize("teacher_kind", ["dense", "tail", "renormalize"])
@pytest.mark.parametrize("reduction", ["batchmean", "none", "mean"])
@pytest.mark.parametrize("loss", sorted(FUNCTIONS))
def test_fused_path_matches_the_reference(test_backend, loss, reduction, teacher_kind):
    fused, ref, params = FUNCTIONS[loss]
    torch.manual_seed(0)
    s = torch.randn(2, 5, 40).mul(2).transpose(0, 1)  # 3-D, non-contiguous
    t = torch.randn(5, 2, 40)
    target = torch.randint(0, 40, (5, 2))
    target[1, 0] = -100
    weight = torch.rand(5, 2)
    teacher = t if teacher_kind == "dense" else fastkd.TopKTeacher.from_logits(t, 6, mode=teacher_kind)
    t_values = teacher if teacher_kind == "dense" else teacher.logprobs
    s_ref, t_ref = s.double().requires_grad_(), t_values.double().requires_grad_()
    teacher_ref = t_ref if teacher_kind == "dense" else fastkd.TopKTeacher(teacher.indices, t_ref, mode=teacher_kind)
    s_f, t_f = s.clone().requires_grad_(), t_values.clone().requires_grad_()
    teacher_f = t_f if teacher_kind == "dense" else fastkd.TopKTeacher(teacher.indices, t_f, mode=teacher_kind)
    kw = dict(temperature=2.0, reduction=reduction, target=target, sample_weight=weight, ce_weight=0.25, **params)
    out = fused(s_f, teacher_f, return_parts=True, **kw)
    expected = ref(s_ref, teacher_ref, return_parts=True, **kw)
    assert test_backend and test_backend[-1]["target"] == 10 and test_backend[-1]["contiguous"]
    assert test_backend[-1]["topk_mode"] == fastkd.core.divergence.TOPK_MODE_CODES[None if teacher_kind == "dense" else teacher_kind]
    for got, want in zip(out, expected):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    assert not out.soft.requires_grad and not out.hard.requires_grad
    g = torch.randn(out.loss.shape, dtype=torch.float64)
    out.loss.backward(g.float())
    expected.loss.backward(g)
    assert _rel(s_f.grad, s_ref.grad) < 1e-5
    assert _rel(t_f.grad, t_ref.grad) < 1e-5


def test_target_reaches_the_op_only_when_the_cross_entropy_is_wanted(test_backend):
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    target = torch.tensor([1, -100, 3, 4])
    fastkd.jsd_loss(s, t, target=target)  # target only skips rows: not passed
    assert test_backend[-1]["target"] == 0
    fastkd.jsd_loss(s, t, target=target, ce_weight=0.1)
    assert test_backend[-1]["target"] == 4
    parts = fastkd.jsd_loss(s, t, target=target, return_parts=True)
    assert test_backend[-1]["target"] == 4 and isinstance(parts, fastkd.LossParts)
    assert fastkd.jsd_loss(s, t, return_parts=True).hard == 0


@pytest.mark.parametrize("loss", ["kd", "dkd", "ats"])
def test_classification_losses_with_ce_match_the_reference(test_backend, monkeypatch, loss):
    # kd with a float temperature runs as forward KL with soft_scale T^2 in one op call;
    # dkd/ats (and kd with a tensor temperature) add a CE-only pass (a = b = 0) to their own op.
    torch.manual_seed(1)
    s, t = torch.randn(6, 30) * 3, torch.randn(6, 30) * 3
    target = torch.randint(0, 30, (6,))
    target[2] = -100
    fused = getattr(F_, f"{loss}_loss")
    ref = getattr(fastkd.reference, f"{loss}_loss")
    if loss == "kd":
        args, kw = (s, t, 2.0), dict(target=target)
    else:
        args, kw = (s, t, target), {}
    s_f = s.clone().requires_grad_()
    out = fused(s_f, *args[1:], ce_weight=0.4, return_parts=True, **kw)
    s_r = s.double().requires_grad_()
    expected = ref(s_r, args[1].double(), *args[2:], ce_weight=0.4, return_parts=True, **kw)
    kinds = [(c["coefficients"], c["soft_scale"]) for c in test_backend]
    if loss == "kd":
        assert kinds == [((1.0, 0.0, 0.0, 1.0), 4.0)]
    else:
        assert kinds == [((0.0, 0.0, 0.0, 1.0), 1.0)]  # CE alone
    for got, want in zip(out, expected):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    out.loss.backward()
    expected.loss.backward()
    assert _rel(s_f.grad, s_r.grad) < 1e-5


def test_ce_weight_needs_a_target_and_return_parts_a_bool():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    for fn in (fastkd.kd_loss, fastkd.jsd_loss):
        with pytest.raises(ValueError, match="ce_weight=0.5 adds a cross-entropy term, which needs target"):
            fn(s, t, ce_weight=0.5)
        with pytest.raises(TypeError, match="return_parts must be a bool"):
            fn(s, t, return_parts=1)
    with pytest.raises(ValueError, match="ce_weight=0.5"):
        fastkd.nn.KDLoss(ce_weight=0.5)(s, t)


def test_dkd_module_warms_up_the_dkd_term_only():
    torch.manual_seed(2)
    s, t, target = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    module = fastkd.nn.DKDLoss(warmup_epochs=4, ce_weight=1.0, return_parts=True, backend="reference")
    parts = module(s, t, target, epoch=1)
    full = fastkd.reference.dkd_loss(s, t, target, return_parts=True)
    torch.testing.assert_close(parts.soft, 0.25 * full.soft)
    torch.testing.assert_close(parts.hard, full.hard)
    torch.testing.assert_close(parts.loss, 0.25 * full.soft + full.hard)
