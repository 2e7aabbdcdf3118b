"""Triton ``topk_fwd``: each row's top-k logits, their log-probs at T and the exact tail (docs/design.md).

The definition is ``fastkd.core.topk.topk_rows`` (ids by descending raw logit, ties to the lower id,
NaN as -inf, -0.0 as 0.0). One program per row, two passes over the logits:

1. per block of ``BLOCK`` columns: the online log-sum-exp (raw maximum, ``sum exp((x - M) / T)``), and
   the block's 64-bit keys ``(order-preserving bits of x) << 32 | (2^32 - 1 - id)``, whose integer
   order is the ranking (larger key: larger logit, or equal logit and lower id; keys are distinct).
   A block whose largest key is below the running k-th key cannot enter and is skipped; otherwise
   it is sorted (``tl.sort``), its best ``KP`` keys (``KP = next_pow2(k)``) are the column-wise
   maxima of the sorted block viewed as ``[BLOCK / KP, KP]``, and they are merged with the running
   ``KP`` best by one sort of the ``2 KP`` keys (again keeping the first half).
2. the tail: ``sum exp((x - M) / T)`` over the columns whose key is below the final k-th key (the
   non-members themselves, never ``z - sum over the members``).

Then ``logprobs = (x[id] - M) / T - log z`` from the logits at the decoded ids and
``tail = log(tail sum) - log z``. On random rows few blocks after the first few pass the k-th key,
so pass 1 costs about one read and the online sums; pass 2 reads the row again.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import device_guard, online_update_scaled, unit_stride_rows

TOPK_MAX = 1024  # fastkd.core.topk.TOPK_MAX: the merge sorts 2 KP <= 2048 keys
# A key below every real one: real keys are >= (bits of -inf) << 32 = -0x7F800001 << 32.
KEY_NONE = -9223372036854775807


@triton.jit
def _keys(x, cols):
    """The ranking keys of logits ``x`` at columns ``cols`` (int64; see the module docstring)."""
    x = tl.where(x != x, float("-inf"), x)  # NaN ranks as -inf
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with 0.0
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order of the floats
    return (ordered.to(tl.int64) << 32) | (4294967295 - cols)


@triton.jit
def _topk_kernel(X, IDS, LP, TAIL, STATS, V, stride_x, inv_t,
                 K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    slots = tl.arange(0, KP)
    top = tl.full([KP], KEY_NONE, tl.int64)  # the best KP keys so far, descending
    kth = tl.full([], KEY_NONE, tl.int64)
    m = tl.full([], float("-inf"), tl.float32)
    z = tl.zeros([], tl.float32)
    for c0 in range(0, V, BLOCK):
        cols = c0 + lanes
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m, z, _, _ = online_update_scaled(m, z, x, inv_t)
        keys = tl.where(mask, _keys(x, cols), KEY_NONE)
        if tl.max(keys, 0) > kth:
            ordered = tl.sort(keys, 0, descending=True)
            best = tl.max(tl.reshape(ordered, (BLOCK // KP, KP)), 0)  # the block's KP best, in order
            both = tl.sort(tl.reshape(tl.join(top, best), (2 * KP,)), 0, descending=True)
            top = tl.max(tl.reshape(both, (2, KP)), 0)
            kth = tl.min(tl.where(slots < K, top, 9223372036854775807), 0)
    base = tl.where(m == float("-inf"), 0.0, m)
    tail = tl.zeros([], tl.float32)
    for c0 in range(0, V, BLOCK):
        cols = c0 + lanes
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        keys = tl.where(mask, _keys(x, cols), KEY_NONE)
        e = tl.exp((x - base) * inv_t)
        tail += tl.sum(tl.where(keys < kth, e, 0.0), 0)
    log_z = tl.log(z)
    ids = 4294967295 - (top & 4294967295)
    out = slots < K
    x_top = tl.load(x_row + ids, mask=out, other=0.0).to(tl.float32)
    tl.store(IDS + row * K + slots, ids, mask=out)
    tl.store(LP + row * K + slots, (x_top - m) * inv_t - log_z, mask=out)  # NaN where m = -inf (log_softmax's)
    tl.store(TAIL + row, tl.log(tail) - log_z)
    tl.store(STATS + 2 * row, m)
    tl.store(STATS + 2 * row + 1, log_z)


def topk_config(n_cols: int, k: int):
    """(KP, BLOCK, num_warps): KP = next_pow2(k) (at least 16); BLOCK = the row width rounded up to a power
    of two within [2 KP, 2048] (a block holds at least the KP it may contribute, twice over so that most
    of a sort's work is the block's); 8 int64 keys per thread."""
    kp = max(16, triton.next_power_of_2(int(k)))
    block = max(2 * kp, min(2048, triton.next_power_of_2(int(n_cols))))
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
    ids = torch.empty((n, k), dtype=torch.int64, device=dev)
    logprobs = torch.empty((n, k), dtype=torch.float32, device=dev)
    tail = torch.empty((n,), dtype=torch.float32, device=dev)
    stats = torch.empty((n, 2), dtype=torch.float32, device=dev)
    if n:
        kp, block, num_warps = topk_config(v, k)
        with device_guard(x):
            wrap_triton(_topk_kernel)[(n,)](x, ids, logprobs, tail, stats, v, x.stride(0), 1.0 / temperature,
                                            K=k, KP=kp, BLOCK=block, num_warps=num_warps)
    return ids, logprobs, tail, stats
