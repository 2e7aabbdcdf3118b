"""Test set-up: Triton runs interpreted on CPU tensors unless GPU tests are asked for.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at
collection time, without touching any GPU. On a GPU machine run the suite with
FASTKD_GPU_TESTS=1 (benchmarks/gpu_check.sh does) so Triton compiles for the GPU.
"""
import os

if os.environ.get("FASTKD_GPU_TESTS", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
