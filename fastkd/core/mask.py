"""The MGD random mask, defined identically for every backend.

A counter-based hash instead of a stateful generator: the reference, the C++,
CUDA and Triton kernels all compute the same keep/drop decision for element
``i`` from ``(seed, i)`` alone, so backends agree bit for bit and backward
regenerates the mask instead of storing it.

    h(x)  = "lowbias32" integer mixer (xor-shift / multiply, all mod 2^32)
    u(i)  = h(lo32(i) ^ h(hi32(i) ^ h(seed)))          (uint32)
    keep  = u(i) >= threshold,  threshold = floor(mask_ratio * 2^32)

so P(drop) = mask_ratio up to 2^-32.
"""
import torch

MASK32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B


def mask_threshold(mask_ratio: float) -> int:
    """Integer threshold on the uint32 hash that drops a fraction ``mask_ratio``."""
    return min(int(mask_ratio * 4294967296.0), MASK32)


def _mix(x: torch.Tensor) -> torch.Tensor:
    # int64 tensors holding uint32 values; products fit in int64 before masking.
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


def mix_int(x: int) -> int:
    """Python-int version of the mixer (used to pre-mix the seed once)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


def mask_hash(seed: int, index: torch.Tensor) -> torch.Tensor:
    """uint32 hash (as int64) of each element index under ``seed``."""
    index = index.to(torch.int64)
    lo = index & MASK32
    hi = (index >> 32) & MASK32
    return _mix(lo ^ _mix(hi ^ mix_int(seed)))


def keep_mask(seed: int, count: int, mask_ratio: float, device=None) -> torch.Tensor:
    """Boolean keep mask of ``count`` elements (True = kept)."""
    index = torch.arange(count, dtype=torch.int64, device=device)
    return mask_hash(seed, index) >= mask_threshold(mask_ratio)


def draw_seed(generator=None) -> int:
    """The mask seed for one MGD call, drawn from ``generator`` (the global RNG if None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))
