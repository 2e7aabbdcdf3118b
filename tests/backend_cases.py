"""Shared tables for the backend tests: which fused backends run here, on which device,
and the tolerance of each dtype against the float32/float64 reference."""
import os

import pytest
import torch

from fastkd.dispatch.backend import unavailable_reason

# (dtype, atol, rtol) for fused losses and gradients against the reference
TOLERANCES = {
    torch.float32: (2e-5, 2e-4),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1e-2, 2e-2),
}


def device_for(backend: str) -> str:
    if backend == "cpu":
        return "cpu"
    if backend == "cuda":
        return "cuda"
    # triton: the GPU when there is one, else the interpreter on CPU tensors
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


# every fused backend; tests call skip_unless_runs, so collection never touches a GPU
FUSED = ("cpu", "cuda", "triton")


def skip_unless_runs(loss: str, backend: str) -> torch.device:
    """Skip the current test unless ``backend`` can run ``loss`` here; return its device."""
    device = device_for(backend)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = unavailable_reason(backend, loss, torch.device(device))
    if reason:
        pytest.skip(reason)
    return torch.device(device)
