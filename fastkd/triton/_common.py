"""Pieces shared by every Triton kernel family: launch sizes, numerics helpers,
and the autograd rule "backward only scales the gradient stored in forward".

Every fused op computes its input gradients in the forward pass (the loss ends
the graph, so d loss / d input is known there) and stores them; backward then
multiplies them by the incoming gradient, and skips even that when the incoming
gradient is a 0-d tensor equal to 1 (the usual ``loss.backward()``).
"""
from typing import Dict

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

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
    block = max(16, min(MAX_ROW_BLOCK, triton.next_power_of_2(n_cols)))
    num_warps = max(1, min(16, block // 256))
    return block, num_warps


@triton.jit
def online_update(m, z, x):
    """Fold one block ``x`` (masked lanes = -inf) into a running softmax state.

    State: running max ``m`` and ``z = sum exp(x - m)`` of everything folded so
    far. Returns the new ``(m, z)`` plus ``e = exp(x - m_new)`` and the factor
    ``alpha = exp(m_old - m_new)`` that rescales any other running sum weighted
    by ``e``. While every value seen is -inf the max is -inf; subtracting 0
    instead then keeps ``alpha`` and ``e`` at exactly 0 rather than NaN.
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    z_new = z * alpha + tl.sum(e, 0)
    return m_new, z_new, e, alpha


@triton.jit
def log1p_pos(x):
    """log(1 + x) for x >= 0, accurate for tiny x (Goldberg's trick, no libdevice)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def logaddexp(x, y):
    """log(exp(x) + exp(y)) without overflow; -inf when both are -inf."""
    hi = tl.maximum(x, y)
    lo = tl.minimum(x, y)
    hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
    return hi + log1p_pos(tl.exp(lo - hi_safe))


# ----------------------------------------------------------------------------
# Backward: scale a stored gradient by the incoming gradient.
# ----------------------------------------------------------------------------

_SCALE_BLOCK = 1024  # element-wise pass: 4 elements per thread at 8 warps


@triton.jit
def _scale_kernel(X, G, OUT, numel, row_len, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    # out = x * g (g a scalar, or one value per row of length row_len), in float32, stored in x's dtype.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_ROW:
        g = tl.load(G + offs // row_len, mask=mask, other=0.0)
    else:
        g = tl.load(G)
    tl.store(OUT + offs, (x * g).to(OUT.dtype.element_ty), mask=mask)


@triton_op("fastkd::scale_triton", mutates_args=())
def scale(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x * g`` computed in float32 and returned in x's dtype.

    ``g`` is a 0-d tensor, or one value per row of ``x`` (``g.numel() == x.shape[0]``).
    A Triton kernel rather than ``x * g.to(x.dtype)``: rounding a loss weight
    such as 0.9 to bfloat16 first would bias every gradient by ~0.2%.
    """
    x = x.contiguous()
    g = g.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    if numel:
        per_row = g.dim() > 0
        row_len = numel // x.shape[0] if per_row else numel
        grid = (triton.cdiv(numel, _SCALE_BLOCK),)
        wrap_triton(_scale_kernel)[grid](x, g, out, numel, row_len, PER_ROW=per_row, BLOCK=_SCALE_BLOCK, num_warps=8)
    return out


def scale_stored(stored: torch.Tensor, grad: torch.Tensor):
    """The gradient stored in forward, times the incoming gradient ``grad``.

    ``grad`` is 0-d (reduced loss) or one value per row (reduce=False). In eager
    mode a 0-d ``grad`` exactly equal to 1 returns ``stored`` untouched (one
    host sync to save a full pass over the gradient); while compiling we always
    multiply, since data-dependent branches cannot be traced.
    Returns None for an unrequested (empty) gradient.
    """
    if stored.numel() == 0:
        # The 1-D placeholder of an unrequested gradient gives None; a requested
        # gradient of an empty batch is already its own (empty) product.
        return None if stored.dim() == 1 else stored
    if grad.dim() == 0 and not torch.compiler.is_compiling() and bool(grad == 1):
        return stored
    if stored.dtype == torch.float32 and stored.dim() == 1:
        # Per-row float32 gradients (the temperature): a plain product is exact enough.
        return stored * grad
    return scale(stored, grad)


def register_stored_grad_autograd(op, num_inputs: int, out_to_in: Dict[int, int]) -> None:
    """Autograd for an op that returns ``(loss, stored grads...)``.

    ``out_to_in`` maps the output index of each stored gradient to the input it
    is the gradient of. Backward scales each stored gradient by the loss's
    incoming gradient and returns None for every other input (flags, floats,
    row weights: no gradient flows to those).
    """
    outs = list(out_to_in)

    def setup_context(ctx, inputs, output):
        stored = [output[o] for o in outs]
        ctx.save_for_backward(*stored)
        ctx.mark_non_differentiable(*stored)

    def backward(ctx, grad_loss, *_unused):
        grads = [None] * num_inputs
        for o, stored in zip(outs, ctx.saved_tensors):
            grads[out_to_in[o]] = scale_stored(stored, grad_loss)
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """The placeholder for an unrequested gradient: numel 0, like's dtype and device."""
    return torch.empty(0, dtype=like.dtype, device=like.device)
