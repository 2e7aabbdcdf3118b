"""The knobs of ``fastkd.distributed``, read at each call (set them as ``fastkd.distributed.NAME = value``)."""

# Which shard kernels run the dense-teacher divergences (float32 math; float32, bf16 or fp16 logits): "auto" =
# the compiled CPU ops (csrc/cpu/divergence_shard.cpp) for CPU tensors, the Triton ones
# (fastkd/triton/divergence_shard.py) for CUDA tensors; "triton" = Triton for CPU tensors too (the tests,
# under TRITON_INTERPRET=1); "off" = the PyTorch math everywhere (the tests run it on CPU tensors too).
SHARD_KERNELS = "auto"

# The local math runs on row chunks so that its [rows, V_local] float32 temporaries stay a fraction of
# [N, V_local]. The chunks depend on N alone: every rank issues the same collectives whatever its width.
CHUNK_MIN_ROWS = 64
CHUNK_MAX = 16

NAMES = ("SHARD_KERNELS", "CHUNK_MIN_ROWS", "CHUNK_MAX")
