"""The compiled CPU kernels (``backend="cpu"``) in numerically hard corners,
against ``fastkd.reference`` evaluated in float64 on the same input values.

Gradient errors are relative norms, ||g - r|| / ||r||, besides elementwise checks.
"""
import pytest
import torch

import fastkd
from fastkd import reference

F32, F64 = torch.float32, torch.float64

pytestmark = pytest.mark.skipif(not fastkd.backends()["cpu"]["available"], reason="compiled extension not built")


def rel_err(got, want):
    got, want = got.detach().to(F64), want.detach().to(F64)
    return ((got - want).norm() / want.norm()).item()


def kd_with_grads(fn, s, t, temperature):
    s = s.clone().requires_grad_()
    t = t.clone().requires_grad_()
    temperature = temperature.clone().requires_grad_()
    loss = fn(s, t, temperature)
    return (loss, *torch.autograd.grad(loss, [s, t, temperature]))


# (student offset, teacher offset): a common offset, and nets offset apart.
OFFSETS = [(1e3, 1e3), (1e4, 1e4), (-1e4, -1e4), (1e4, -1e3)]


@pytest.mark.parametrize("offset_s,offset_t", OFFSETS)
@pytest.mark.parametrize("T", [2.0, 4.0])
@pytest.mark.parametrize("C", [1000, 5000])  # one statistics chunk, and several merged
def test_kd_large_logit_offset(offset_s, offset_t, T, C):
    """Softmax ignores a common offset of the logits, so must the kernel: the loss,
    dL/ds, dL/dt and dL/dT (which cancels) at offsets of 1e3 and 1e4."""
    g = torch.Generator().manual_seed(int(C + T))
    N = 6
    s = torch.randn(N, C, generator=g) * 3 + offset_s
    t = torch.randn(N, C, generator=g) * 3 + offset_t
    temperature = torch.full((N,), T)
    temperature[1] = T * 1.5  # per-row temperatures
    got = kd_with_grads(lambda *a: fastkd.kd_loss(*a, backend="cpu"), s, t, temperature)
    want = kd_with_grads(reference.kd_loss, s.to(F64), t.to(F64), temperature.to(F64))
    loss, gs, gt, gT = got
    ref_loss, ref_gs, ref_gt, ref_gT = want
    assert abs(loss.item() - ref_loss.item()) <= 5e-6 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    assert rel_err(gs, ref_gs) < 5e-6
    assert rel_err(gt, ref_gt) < 5e-6
    for got_g, ref_g in ((gs, ref_gs), (gt, ref_gt)):
        torch.testing.assert_close(got_g.to(F64), ref_g, atol=1e-6 * ref_g.abs().max().item(), rtol=1e-4)
    # dL/dT is a difference of O(KL) terms (it cancels): per row within 1 %, signs
    # equal (before the shift in kd_math.h: errors of 4x to 50x, signs flipped)
    assert torch.equal(torch.sign(gT), torch.sign(ref_gT).to(F32)), (gT, ref_gT)
    torch.testing.assert_close(gT.to(F64), ref_gT, atol=1e-7, rtol=1e-2)
    assert rel_err(gT, ref_gT) < 1e-3


def grads_of(fn, inputs, wanted):
    """(loss, grads of the inputs flagged in `wanted`); the others do not require grad."""
    leaves = [x.detach().clone().requires_grad_(w) for x, w in zip(inputs, wanted)]
    loss = fn(*leaves)
    need = [x for x in leaves if x.requires_grad]
    return loss, (torch.autograd.grad(loss, need) if need else ())


FLAGS = [(gs, gt) for gs in (False, True) for gt in (False, True)]


@pytest.mark.parametrize("grad_s,grad_t", FLAGS)
@pytest.mark.parametrize("grad_T", [False, True])
def test_kd_every_gradient_combination(grad_s, grad_t, grad_T):
    """Each set of requested gradients takes its own path through the kernel (kept exps,
    per-chunk rescaling): all of them against float64, over several chunks, with a chunk
    that is -inf in both nets, one masked in the teacher only, and an ignored row."""
    g = torch.Generator().manual_seed(3)
    N, C = 5, 2 * 2048 + 300
    s, t = torch.randn(N, C, generator=g) * 3, torch.randn(N, C, generator=g) * 3
    s[0, :2048] = t[0, :2048] = float("-inf")  # a whole chunk masked
    t[1, 2048:4096] = float("-inf")  # teacher masks a whole chunk
    s[2, 100] = t[2, 100] = 40.0  # a confident row
    target = torch.tensor([0, 1, 2, -100, 4])
    temperature = torch.linspace(1.0, 4.0, N)

    def fn_for(backend):
        return lambda a, b, T: fastkd.kd_loss(a, b, T, target=target, backend=backend)

    wanted = (grad_s, grad_t, grad_T)
    loss, grads = grads_of(fn_for("cpu"), (s, t, temperature), wanted)
    # The float64 truth with -inf replaced by -1e4: exp(-1e4 / T) is exactly 0 in float64,
    # so nothing changes but the reference's dL/dT, which is NaN (0 * inf) at -inf logits.
    finite = [x.to(F64).clamp(min=-1e4) for x in (s, t)]
    ref_loss, ref_grads = grads_of(fn_for("reference"), (*finite, temperature.to(F64)), wanted)
    assert abs(loss.item() - ref_loss.item()) <= 2e-6 * abs(ref_loss.item())
    assert ref_loss.item() == fn_for("reference")(s.to(F64), t.to(F64), temperature.to(F64)).item()
    for got_g, ref_g in zip(grads, ref_grads):
        assert rel_err(got_g, ref_g) < 1e-5
        # atol: p_s - p_t of the confident column is a difference of two numbers near 1
        torch.testing.assert_close(got_g.to(F64), ref_g, atol=2e-5 * ref_g.abs().max().item(), rtol=1e-4)
        if got_g.dim() == 2:
            assert torch.all(got_g[3] == 0)  # the ignored row


@pytest.mark.parametrize("grad_s,grad_t", FLAGS)
def test_dist_every_gradient_combination(grad_s, grad_t):
    """DIST's row sweeps sum only the pieces of the requested gradients: each set against float64."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(37, 1271, generator=g) * 3, torch.randn(37, 1271, generator=g) * 3
    kw = dict(beta=1.0, gamma=2.0, temperature=4.0)
    loss, grads = grads_of(lambda a, b: fastkd.dist_loss(a, b, backend="cpu", **kw), (s, t), (grad_s, grad_t))
    ref_loss, ref_grads = grads_of(lambda a, b: reference.dist_loss(a, b, **kw), (s.to(F64), t.to(F64)),
                                   (grad_s, grad_t))
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for got_g, ref_g in zip(grads, ref_grads):
        assert rel_err(got_g, ref_g) < 1e-5
