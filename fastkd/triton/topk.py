"""Triton ``topk_fwd``: each row's top-k logits, their log-probs at T and the exact tail (docs/design.md).

The definition is ``fastkd.core.topk.topk_rows`` (ids by descending raw logit, ties to the lower id,
NaN as -inf, -0.0 as 0.0). One program per row, two passes over the logits:

1. per block of ``BLOCK`` columns: the online log-sum-exp (raw maximum, ``sum exp((x - M) / T)``), and
   the block's 64-bit keys ``(order-preserving bits of x) << 32 | (2^32 - 1 - id)``, whose integer
   order is the ranking (larger key: larger logit, or equal logit and lower id; keys are distinct).
   The running top-k is a set of k keys in registers; while the block's largest key beats the set's
   smallest (the current k-th), it replaces it (a block max, a set min and two selects per entry).
   A block whose maximum cannot enter costs that maximum only.
2. the tail: ``sum exp((x - M) / T)`` over the columns whose key is below the final k-th key (the
   non-members themselves, never ``z - sum over the members``).

The launcher sorts the ``[N, k]`` keys (descending), decodes the ids and forms
``logprobs = (x[id] - M) / T - log z``; ``tail = log(tail sum) - log z``. Cost: on a random row about
``k (1 + ln(V / k))`` entries replace one (``k = 64``, ``V = 128256``: ~550 block-wide max
reductions, a few passes' worth of register work over the row); an ascending row makes every column
enter (``V`` reductions of a block: the worst case, not seen with real logits). An earlier version
sorted every block with ``tl.sort`` (a bitonic sort of 2048 keys, 66 stages per block, and under
``TRITON_INTERPRET=1`` 6 s a sort).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import device_guard, online_update_scaled, unit_stride_rows

TOPK_MAX = 1024  # fastkd.core.topk.TOPK_MAX: the set of KP <= 1024 keys stays in registers
# A key below every real one: real keys are >= (bits of -inf) << 32 = -0x7F800001 << 32.
KEY_NONE = tl.constexpr(-9223372036854775807)
KEY_MAX = tl.constexpr(9223372036854775807)


@triton.jit
def _keys(x, cols):
    """The ranking keys of logits ``x`` at columns ``cols`` (int64; see the module docstring)."""
    x = tl.where(x != x, float("-inf"), x)  # NaN ranks as -inf
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with 0.0
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order of the floats
    return (ordered.to(tl.int64) << 32) | (4294967295 - cols)


@triton.jit
def _topk_kernel(X, KEYS, TAIL, STATS, V, stride_x, inv_t,
                 K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    slots = tl.arange(0, KP)
    # the best K keys so far, unordered; empty slots hold distinct keys below every real one, and the
    # slots past K (KP > K) the largest int64, so the minimum over the slots is the current k-th key
    top = tl.where(slots < K, KEY_NONE + slots.to(tl.int64), KEY_MAX)
    kth = tl.min(top, 0)
    m = tl.full([], float("-inf"), tl.float32)
    z = tl.zeros([], tl.float32)
    for c0 in range(0, V, BLOCK):
        cols = c0 + lanes
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m, z, _, _ = online_update_scaled(m, z, x, inv_t)
        keys = tl.where(mask, _keys(x, cols), KEY_NONE - 1)
        best = tl.max(keys, 0)
        while best > kth:  # the block's best enters, in place of the k-th; skipped blocks cost the max only
            top = tl.where(top == kth, best, top)
            kth = tl.min(top, 0)
            keys = tl.where(keys == best, KEY_NONE - 1, keys)
            best = tl.max(keys, 0)
    base = tl.where(m == float("-inf"), 0.0, m)
    tail = tl.zeros([], tl.float32)
    for c0 in range(0, V, BLOCK):
        cols = c0 + lanes
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        keys = tl.where(mask, _keys(x, cols), KEY_NONE - 1)
        e = tl.exp((x - base) * inv_t)
        tail += tl.sum(tl.where(keys < kth, e, 0.0), 0)
    log_z = tl.log(z)
    tl.store(KEYS + row * K + slots, top, mask=slots < K)
    tl.store(TAIL + row, tl.log(tail) - log_z)
    tl.store(STATS + 2 * row, m)
    tl.store(STATS + 2 * row + 1, log_z)


def topk_config(n_cols: int, k: int):
    """(KP, BLOCK, num_warps): KP = next_pow2(k) (at least 16); BLOCK = the row width rounded up to a power
    of two, at most 2048; 8 keys per thread (int64: 16 registers)."""
    kp = max(16, triton.next_power_of_2(int(k)))
    block = max(16, min(2048, triton.next_power_of_2(int(n_cols))))
    return kp, block, max(1, min(8, block // 256))


@triton_op("fastkd::topk_fwd_triton", mutates_args=())
def topk_fwd(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                         torch.Tensor]:
    """``topk_fwd`` row op: ``(ids [N, k] int64, logprobs [N, k] f32, tail [N] f32, stats [N, 2] f32)``."""
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fastkd: logits must be a float32, bfloat16 or float16 2-D tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    n, v = logits.shape
    if not 1 <= k <= min(v, TOPK_MAX):
        raise ValueError(f"fastkd: k must be in [1, min(V, {TOPK_MAX})] with V = {v}, got {k}")
    x = unit_stride_rows(logits)  # row slices run in place; other layouts are copied
    dev = x.device
    keys = torch.empty((n, k), dtype=torch.int64, device=dev)
    tail = torch.empty((n,), dtype=torch.float32, device=dev)
    stats = torch.empty((n, 2), dtype=torch.float32, device=dev)
    if n:
        kp, block, num_warps = topk_config(v, k)
        with device_guard(x):
            wrap_triton(_topk_kernel)[(n,)](x, keys, tail, stats, v, x.stride(0), 1.0 / temperature,
                                            K=k, KP=kp, BLOCK=block, num_warps=num_warps)
    # the k keys in order (an [N, k] sort), their ids, and the log-probs from the logits at those ids
    ids = 4294967295 - (keys.sort(dim=1, descending=True).values & 4294967295)
    top = stats[:, :1]
    logprobs = (x.gather(1, ids).float() - top) * (1.0 / temperature) - stats[:, 1:]  # NaN where max = -inf
    return ids, logprobs, tail, stats
