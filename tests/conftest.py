"""Test set-up: Triton runs interpreted on CPU tensors unless GPU tests are asked for.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at
collection time, without touching any GPU. On a GPU machine run the suite with
FASTKD_GPU_TESTS=1 (benchmarks/gpu_check.sh does) so Triton compiles for the GPU.
"""
import os

if os.environ.get("FASTKD_GPU_TESTS", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _setup_module():
    """setup.py's helpers (its setup() runs only as __main__), for the build's CUDA decision."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    spec = importlib.util.spec_from_file_location("fastkd_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_sessionstart(session):
    """FASTKD_REQUIRE_EXTENSION=1: fail at once unless fastkd._C loaded with every CPU kernel and, where
    the build wanted the CUDA kernels (setup.py's cuda_request on this environment: FASTKD_BUILD_CUDA=1,
    as CI sets, or a GPU that torch sees), every CUDA kernel; a CPU-only build nobody asked CUDA of passes."""
    if os.environ.get("FASTKD_REQUIRE_EXTENSION", "0") != "1":
        return
    import pytest
    import torch

    from fastkd.dispatch import backend as _backend
    from fastkd.dispatch import ops as _ops

    if _ops.LOAD_ERROR:
        pytest.exit(f"FASTKD_REQUIRE_EXTENSION=1: {_ops.LOAD_ERROR}", returncode=3)
    ops = sorted({op for names in _backend.LOSS_OPS.values() for op in names})
    keys, why = ("CPU",), "CPU kernels only"
    if torch.version.cuda:
        setup = _setup_module()
        want, _, reason = setup.cuda_request(os.environ, setup.torch_visible_gpus())
        keys, why = (("CPU", "CUDA"), f"CUDA kernels wanted: {reason}") if want else (keys, f"{why}: {reason}")
    missing = [f"fastkd::{op} ({key})" for op in ops for key in keys
               if not _ops.has_kernel(op, key) and not (key == "CUDA" and op in _backend.NO_CUDA_KERNEL)]
    if missing:
        pytest.exit(f"FASTKD_REQUIRE_EXTENSION=1 ({why}): compiled kernels missing: {', '.join(missing)}",
                    returncode=3)
    print(f"FASTKD_REQUIRE_EXTENSION=1: every kernel of {'/'.join(keys)} loaded ({why})")
