"""Pieces shared by every Triton kernel family: launch sizes and numerics helpers.
(The autograd rule, shared with the compiled backends, is in ``fastkd.core.autograd``.)
"""

import contextlib

import torch
import triton
import triton.language as tl

# Widest class block one loop iteration handles; wider rows loop over blocks.
# 4096 elements = 8 KiB of bf16 per tensor per iteration: big enough that each
# iteration keeps many 16-byte loads in flight, small enough to stay in registers.
MAX_ROW_BLOCK = 4096


def row_config(n_cols: int):
    """(BLOCK, num_warps) for the row kernels (one program per row, loop over class blocks).

    BLOCK: the row width rounded up to a power of two, capped at MAX_ROW_BLOCK
    (a 10-class row does not load 4096 masked lanes).
    num_warps: 8 elements per thread, i.e. one 16-byte load per bf16 tensor per
    iteration, which keeps register use low enough for several resident rows per SM.
    """
    n_cols = int(n_cols)  # under torch.compile: specialise on the class count
    block = max(16, min(MAX_ROW_BLOCK, triton.next_power_of_2(n_cols)))
    num_warps = max(1, min(16, block // 256))
    return block, num_warps


@triton.jit
def online_update_scaled(m, z, x, scale):
    """Fold one block of raw logits ``x`` (masked lanes = -inf) into a running
    softmax state of ``x * scale`` (scale = 1/T > 0).

    State: running max ``m`` of the *raw* values and ``z = sum exp((x - m) * scale)``
    of everything folded so far. Returns the new ``(m, z)`` plus
    ``e = exp((x - m_new) * scale)`` and the factor ``alpha = exp((m_old - m_new) * scale)``
    that rescales any other running sum weighted by ``e``. The max is subtracted
    before scaling: near the max, x - m is exact in float32 whatever the logits'
    common offset, while x * scale would already be rounded to the offset's ulp
    (2.4e-4 at 1e4 / 2). While every value seen is -inf the max is -inf;
    subtracting 0 instead then keeps ``alpha`` and ``e`` at exactly 0 rather than NaN.
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp((m - m_safe) * scale)
    e = tl.exp((x - m_safe) * scale)
    z_new = z * alpha + tl.sum(e, 0)
    return m_new, z_new, e, alpha


@triton.jit
def online_update(m, z, x):
    """``online_update_scaled`` of values that are already scaled (scale 1)."""
    return online_update_scaled(m, z, x, 1.0)


@triton.jit
def load_logits(s_row, t_row, offs, mask, EVICT: tl.constexpr):
    """Both nets' logits at ``offs`` of a row, as float32; -inf where ``mask`` is off, which
    the running maxima and sums ignore. ``EVICT``: the cache hint ("evict_last" where a later
    pass reads the row again, "evict_first" on its last read, "" for none)."""
    s = tl.load(s_row + offs, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    t = tl.load(t_row + offs, mask=mask, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
    return s, t


@triton.jit
def log1p_pos(x):
    """log(1 + x) for x >= 0, accurate for tiny x (Goldberg's trick, no libdevice)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def logaddexp(x, y):
    """log(exp(x) + exp(y)) without overflow; -inf when both are -inf; NaN when either is NaN (the default
    maximum / minimum return the other operand: a NaN row sum became finite, log 2 above the other)."""
    hi = tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)
    lo = tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return hi + log1p_pos(tl.exp(lo - hi_safe))


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [N, C] itself when its elements within a row are adjacent, else a contiguous copy.

    The row kernels take a row stride, so a row slice of a wider tensor
    (``x[:, :C]`` of [N, C + 7]) or rows with any stride run without a copy;
    only a column stride other than 1 (e.g. a transposed tensor) needs one.
    """
    if x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] <= 1):
        return x
    return x.contiguous()


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an unrequested gradient: numel 0, like's dtype and device."""
    return torch.empty(0, dtype=like.dtype, device=like.device)


def device_guard(x: torch.Tensor):
    """The context every launcher runs its kernels in: ``x``'s CUDA device made current.

    A Triton launch goes to the *current* device and its current stream, not the
    device of its pointers: inputs on cuda:1 while cuda:0 is current would run on
    the wrong device. CPU tensors (the interpreter) and meta/fake tensors under
    tracing need nothing. (Under torch.compile Inductor emits its own device guard.)
    """
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()
