"""On a GPU: a training step of every loss runs with no host synchronisation
(``torch.cuda.set_sync_debug_mode("error")``) and can be captured in a CUDA graph.
Skipped without a CUDA device; benchmarks/gpu_check.sh runs it with FASTKD_GPU_TESTS=1."""
import pytest
import torch

import fastkd
from backend_cases import skip_unless_runs

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ("cuda", "triton")


def _gpu_device(backend):
    device = skip_unless_runs("kd", backend)
    if device.type != "cuda":  # the Triton interpreter on CPU tensors has no stream to sync
        pytest.skip("needs a CUDA GPU")
    return device


def _data(device):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(64, 4096 + 17, generator=g) * 2).to(device, torch.bfloat16).requires_grad_()
    t = (torch.randn(64, 4096 + 17, generator=g) * 2).to(device, torch.bfloat16)
    target = torch.randint(0, 4096, (64,), generator=g).to(device)
    target[::7] = -100
    weight = torch.rand(64, generator=g).to(device)
    return s, t, target, weight


def _losses(s, t, target, weight, backend):
    temp = torch.full((1,), 3.0, device=s.device, requires_grad=True)
    return {
        "kd": lambda: 0.9 * fastkd.kd_loss(s, t, 4.0, target=target, sample_weight=weight, backend=backend),
        "kd_temp": lambda: 0.9 * fastkd.kd_loss(s, t, temp, backend=backend),
        "ats": lambda: 0.5 * fastkd.ats_loss(s, t, target, backend=backend),
        "dkd": lambda: 0.5 * fastkd.dkd_loss(s, t, target, backend=backend),
        "dist": lambda: 0.5 * fastkd.dist_loss(s, t, backend=backend),
    }


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_training_step_has_no_host_sync(backend):
    device = _gpu_device(backend)
    s, t, target, weight = _data(device)
    steps = _losses(s, t, target, weight, backend)
    for step in steps.values():  # warm up (Triton compiles, allocator fills)
        step().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for name, step in steps.items():
            s.grad = None
            step().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("loss", ["kd", "kd_temp", "ats", "dkd", "dist"])
def test_training_step_captures_in_a_cuda_graph(backend, loss):
    device = _gpu_device(backend)
    s, t, target, weight = _data(device)
    step = _losses(s, t, target, weight, backend)[loss]

    def train_step():
        s.grad = None
        out = step()
        out.backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            train_step()
    torch.cuda.current_stream().wait_stream(side)
    eager_loss, eager_grad = train_step().detach().clone(), s.grad.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_loss = step()
        (graph_grad,) = torch.autograd.grad(graph_loss, s)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph_loss, eager_loss)
    torch.testing.assert_close(graph_grad, eager_grad)
