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
