"""Triton MGD: the random feature mask generated in-kernel, and the squared error.

Mask: element i of the mask is kept iff ``u(i) >= floor(mask_ratio * 2^32)`` with
the counter hash of ``fastkd/core/mask.py`` (all arithmetic mod 2^32, here in uint32)::

    mix(x) = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    u(i)   = mix(lo32(i) ^ mix(hi32(i) ^ mix(seed)))

``mix(seed)`` is computed once on the host. For x[N, C, H, W] (contiguous, flat
element e) the mask index is ``e // (H*W)`` = n*C + c for the channel mask and
``(e // (C*H*W)) * H*W + e % (H*W)`` = n*H*W + h*W + w for the spatial mask.
Backward regenerates the mask from the seed (d(x*M)/dx = M): nothing is stored.

Squared error: loss = scale * sum((pred - teacher)^2); dL/dpred = 2*scale*(pred - teacher)
= -dL/dteacher, written in the same pass. Each program writes its partial sum
and PyTorch adds the partials (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..core.mask import mask_threshold, mix_int

from ..core.autograd import register_loss_autograd
from ._common import device_guard, empty_grad

# Element-wise passes: 4096 elements per program at 8 warps = 16 per thread,
# i.e. two 16-byte loads of bf16 (four of f32) per tensor: enough in flight per SM.
ELEM_BLOCK = 4096
ELEM_WARPS = 8


@triton.jit
def _mix32(x):
    # "lowbias32" mixer on uint32; products wrap mod 2^32 like the reference's `& MASK32`.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def keep_mask(index, seed_mix, threshold):
    """True where element ``index`` (int64, >= 0) is kept; seed_mix = mix(seed) (uint32)."""
    lo = index.to(tl.uint32)  # int64 -> uint32 truncates: the low 32 bits
    hi = (index >> 32).to(tl.uint32)
    u = _mix32(lo ^ _mix32(hi ^ seed_mix))
    return u >= threshold


@triton.jit(do_not_specialize=["seed_mix", "threshold"])
def _mgd_mask_kernel(
    X, OUT, numel, seed_mix, threshold, HW: tl.constexpr, CHW: tl.constexpr, SPATIAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # HW and CHW are compile-time constants so that the per-element 64-bit divisions
    # below become multiply-shift sequences (one compile per feature-map shape).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if SPATIAL:
        index = (offs // CHW) * HW + offs % HW
    else:
        index = offs // HW
    keep = keep_mask(index, seed_mix.to(tl.uint32), threshold.to(tl.uint32))
    x = tl.load(X + offs, mask=mask, other=0.0)
    # x * M (not where): keeps x * 0 semantics (NaN * 0 = NaN, -x * 0 = -0.0) like the reference.
    tl.store(OUT + offs, x * keep.to(x.dtype), mask=mask)


@triton_op("fastkd::mgd_mask_triton", mutates_args=())
def mgd_mask(x: torch.Tensor, seed: int, mask_ratio: float, spatial: bool) -> torch.Tensor:
    """``x * M`` for x[N, C, H, W], M the MGD keep mask of ``fastkd.core.mask`` (channel
    mask (N, C, 1, 1), or spatial (N, 1, H, W) when ``spatial``)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    if numel:
        _, c, h, w = x.shape
        grid = (triton.cdiv(numel, ELEM_BLOCK),)
        with device_guard(x):  # launch on the input's device
            wrap_triton(_mgd_mask_kernel)[grid](
                x, out, numel, mix_int(seed), mask_threshold(mask_ratio),
                HW=int(h * w), CHW=int(c * h * w), SPATIAL=spatial, BLOCK=ELEM_BLOCK, num_warps=ELEM_WARPS,
            )
    return out


def _mgd_mask_setup(ctx, inputs, output):
    _, ctx.seed, ctx.mask_ratio, ctx.spatial = inputs


def _mgd_mask_backward(ctx, grad):
    # d(x * M)/dx = M: mask the incoming gradient with the regenerated mask.
    return mgd_mask(grad, ctx.seed, ctx.mask_ratio, ctx.spatial), None, None, None


mgd_mask.register_autograd(_mgd_mask_backward, setup_context=_mgd_mask_setup)


@triton.jit
def _sq_err_kernel(P, T, PART, GP, GT, numel, scale, GRAD_P: tl.constexpr, GRAD_T: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(P + offs, mask=mask, other=0.0)
    t = tl.load(T + offs, mask=mask, other=0.0)
    d = p.to(tl.float32) - t.to(tl.float32)
    tl.store(PART + pid, tl.sum(d * d, 0))
    if GRAD_P:
        tl.store(GP + offs, (2.0 * scale * d).to(GP.dtype.element_ty), mask=mask)
    if GRAD_T:
        tl.store(GT + offs, (-2.0 * scale * d).to(GT.dtype.element_ty), mask=mask)


@triton_op("fastkd::mgd_sq_err_triton", mutates_args=())
def mgd_sq_err(
    pred: torch.Tensor, teacher: torch.Tensor, scale: float, grad_pred: bool, grad_teacher: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale * sum((pred - teacher)^2), 2*scale*(pred - teacher), -2*scale*(pred - teacher))``,
    the loss as 0-d float32, each gradient in its input's dtype and shape (empty when not requested)."""
    pred = pred.contiguous()
    teacher = teacher.contiguous()
    numel = pred.numel()
    gp = torch.empty_like(pred) if grad_pred else empty_grad(pred)
    gt = torch.empty_like(teacher) if grad_teacher else empty_grad(teacher)
    n_prog = triton.cdiv(numel, ELEM_BLOCK)
    part = torch.zeros(max(n_prog, 1), dtype=torch.float32, device=pred.device)
    if numel:
        with device_guard(pred):  # launch on the input's device
            wrap_triton(_sq_err_kernel)[(n_prog,)](
                pred, teacher, part, gp, gt, numel, float(scale),
                GRAD_P=grad_pred, GRAD_T=grad_teacher, BLOCK=ELEM_BLOCK, num_warps=ELEM_WARPS,
            )
    return part.sum() * scale, gp, gt


register_loss_autograd(mgd_sq_err, {0: 1, 1: 2})
