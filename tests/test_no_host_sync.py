"""No host synchronisation in a training step on GPU tensors, and backward's memory.

On a GPU, reading a tensor's value on the host (``.item()``, ``float(t)``,
``bool(t)``, boolean-mask indexing, ``nonzero``) waits for the device: it
stalls the launch queue every step and fails under CUDA-graph capture. The
Python layer reads values only of tensors on ``fastkd.core.checks.HOST_DEVICES``
(the CPU, where it is free). Here the CPU is taken off that list, so the very
code path that GPU tensors take runs on CPU tensors, with every host read made
to raise. The GPU tests (tests/test_gpu_sync.py) check the same with
``torch.cuda.set_sync_debug_mode("error")`` and a CUDA-graph capture.
"""
import pytest
import torch

import fastkd
from fastkd.core import checks as _validation
from backend_cases import FUSED, skip_unless_runs

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "nonzero")


@pytest.fixture
def gpu_path(monkeypatch):
    """Take the CPU off the free-host-read devices and make every host read raise."""
    monkeypatch.setattr(_validation, "HOST_DEVICES", ())
    reads = []

    def forbid(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, forbid(name))
    getitem = torch.Tensor.__getitem__

    def indexed(self, index):
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
            reads.append("boolean-mask indexing")
            raise AssertionError("boolean-mask indexing reads the mask on the host")
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", indexed)
    return reads


def _inputs(device, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 300, generator=g) * 2).to(device).requires_grad_(requires_grad)
    t = (torch.randn(6, 300, generator=g) * 2).to(device)
    target = torch.randint(0, 300, (6,), generator=g).to(device)
    target[2] = -100
    weight = torch.rand(6, generator=g).to(device)
    return s, t, target, weight


def _steps(s, t, target, weight, backend):
    """Forward + backward of every logit loss as a training loop uses them (a loss weight != 1)."""
    temp = torch.full((1,), 3.0, device=s.device, requires_grad=True)
    yield lambda: 0.9 * fastkd.kd_loss(s, t, 4.0, target=target, sample_weight=weight, backend=backend)
    yield lambda: 0.9 * fastkd.kd_loss(s, t, temp, target=target, backend=backend)
    yield lambda: fastkd.kd_loss(s, t, 2.0, reduction="none", backend=backend).mean()
    yield lambda: 0.5 * fastkd.ats_loss(s, t, target, sample_weight=weight, backend=backend)
    yield lambda: 0.5 * fastkd.dkd_loss(s, t, target, backend=backend)
    yield lambda: 0.5 * fastkd.dist_loss(s, t, backend=backend)
    yield lambda: 0.5 * fastkd.nn.DKDLoss(warmup_epochs=5, backend=backend)(s, t, target, epoch=2)
    yield lambda: fastkd.nn.KDLoss(temperature=2.0, backend=backend)(s, t)


@pytest.mark.parametrize("backend", FUSED)
def test_logit_losses_read_no_values_on_the_gpu_path(backend, gpu_path):
    device = skip_unless_runs("kd", backend)
    s, t, target, weight = _inputs(device)
    for step in _steps(s, t, target, weight, backend):
        s.grad = None
        step().backward()
        assert s.grad is not None
    assert gpu_path == []


@pytest.mark.parametrize("backend", FUSED)
def test_mgd_reads_no_values_on_the_gpu_path(backend, gpu_path, monkeypatch):
    device = skip_unless_runs("mgd", backend)
    # The mask seed is drawn from a CPU generator (the default, whatever the features' device):
    # a host value that involves no GPU, so the forbidden-read patch must not see it.
    monkeypatch.setattr(fastkd.core.mask, "draw_seed", lambda generator=None: 1234)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, generator=g).to(device).requires_grad_()
    y = torch.randn(2, 4, 5, 5, generator=g).to(device)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).to(device)
    loss = fastkd.mgd_loss(x, y, conv, backend=backend)
    (0.5 * loss).backward()
    assert x.grad is not None and gpu_path == []


def test_value_checks_still_run_on_the_cpu():
    s, t, target, _ = _inputs("cpu")
    target[0] = 300
    with pytest.raises(ValueError, match="target has class index 300"):
        fastkd.ats_loss(s, t, target)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fastkd.kd_loss(s, t, torch.tensor([-1.0]))


def test_value_checks_are_off_on_the_gpu_path_unless_asked(monkeypatch):
    monkeypatch.setattr(_validation, "HOST_DEVICES", ())
    s, t, target, _ = _inputs("cpu")
    target[0] = 300
    # off: the kernel defines the result (the CPU op still refuses the bad target itself)
    with pytest.raises(RuntimeError, match=r"target\[0\] = 300"):
        fastkd.ats_loss(s, t, target, backend="cpu")
    fastkd.set_value_checks(True)
    try:
        with pytest.raises(ValueError, match="target has class index 300"):
            fastkd.ats_loss(s, t, target, backend="cpu")
    finally:
        fastkd.set_value_checks(False)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastkd.set_value_checks(1)


# ----------------------------------------------------------------------------
# backward scales the stored gradient in place
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", FUSED)
def test_backward_returns_the_stored_gradient_scaled_in_place(backend, dtype):
    device = skip_unless_runs("kd", backend)
    s, t, _, _ = _inputs(device, requires_grad=False)
    s = s.to(dtype).requires_grad_()
    impl = fastkd.dispatch.backend.implementation(backend)
    n = s.shape[0]
    temp = torch.full((n,), 2.0, device=device)
    weight = torch.full((n,), 1.0 / n, device=device)
    loss, stored, _, _ = impl.kd_fwd(s, t.to(dtype), temp, weight, True, True, False, False)
    expected = stored.float() * 0.9
    (grad,) = torch.autograd.grad(loss, s, torch.tensor(0.9, device=device))
    assert grad.data_ptr() == stored.data_ptr(), "backward allocated a second [N, C] gradient"
    assert not grad.requires_grad and grad.grad_fn is None
    # computed in float32: 0.9 is not first rounded to bfloat16
    torch.testing.assert_close(grad.float(), expected.to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_backward_with_per_row_gradient_scales_in_place(backend):
    device = skip_unless_runs("kd", backend)
    s, t, _, _ = _inputs(device)
    impl = fastkd.dispatch.backend.implementation(backend)
    n = s.shape[0]
    temp = torch.full((n,), 2.0, device=device)
    weight = torch.ones(n, device=device)
    rows, stored, _, _ = impl.kd_fwd(s, t, temp, weight, False, True, False, False)
    expected = stored * torch.arange(n, device=device).unsqueeze(1)
    (grad,) = torch.autograd.grad(rows, s, torch.arange(n, dtype=torch.float32, device=device))
    assert grad.data_ptr() == stored.data_ptr()
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_raises(backend):
    device = skip_unless_runs("kd", backend)
    s, t, _, _ = _inputs(device)
    loss = fastkd.kd_loss(s, t, backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, s, create_graph=True)


@pytest.mark.parametrize("backend", FUSED)
def test_second_backward_through_the_same_graph_raises(backend):
    device = skip_unless_runs("kd", backend)
    s, t, _, _ = _inputs(device)
    loss = 0.5 * fastkd.kd_loss(s, t, backend=backend)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    torch.testing.assert_close(s.grad, first)  # the failed second call added nothing
