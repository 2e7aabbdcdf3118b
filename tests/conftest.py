"""Test set-up: Triton runs interpreted on CPU tensors unless GPU tests are asked for.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at
collection time, without touching any GPU. On a GPU machine run the suite with
FASTKD_GPU_TESTS=1 (benchmarks/gpu_check.sh does) so Triton compiles for the GPU.
"""
import os

if os.environ.get("FASTKD_GPU_TESTS", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionstart(session):
    if os.environ.get("FASTKD_REQUIRE_EXTENSION", "0") != "1":
        return
    import pytest
    import torch

    from fastkd.dispatch import backend as _backend
    from fastkd.dispatch import ops as _ops

    if _ops.LOAD_ERROR:
        pytest.exit(f"FASTKD_REQUIRE_EXTENSION=1: {_ops.LOAD_ERROR}", returncode=3)
    ops = sorted({op for names in _backend.LOSS_OPS.values() for op in names})
    keys = ("CPU", "CUDA") if torch.version.cuda else ("CPU",)
    missing = [f"fastkd::{op} ({key})" for op in ops for key in keys
               if not _ops.has_kernel(op, key) and not (key == "CUDA" and op in _backend.NO_CUDA_KERNEL)]
    if missing:
        pytest.exit(f"FASTKD_REQUIRE_EXTENSION=1: compiled kernels missing: {', '.join(missing)}", returncode=3)
