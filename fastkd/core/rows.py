"""Rows: how every logit loss sees its input (``docs/design.md``, "Rows and row weights").

Logits ``[..., C]`` are rows ``[N, C]`` (all leading dims flattened). A row's loss is
multiplied by its row weight, which carries ``ignore_index``, ``sample_weight`` and the
reduction's divisor, so every reduction is a plain sum of weighted row losses.
"""
from typing import Optional

import torch


def rows_of(x: torch.Tensor) -> int:
    """N, the number of rows of ``[..., C]``."""
    return x.numel() // x.shape[-1]


def row_view(x: torch.Tensor, row_strided: bool = False) -> torch.Tensor:
    """``[..., C]`` as rows ``[N, C]``: contiguous (a view when it already is), or with ``row_strided``
    any row stride with adjacent elements in a row (the row ops that take a row stride read a row
    slice such as ``teacher[..., :V]`` or a 2-D ``logits[:-1]`` in place, no copy). Leading dims
    that cannot be flattened into one row stride (``logits[:, :-1]`` of ``[B, S, V]`` with B > 1)
    are copied either way."""
    rows = x.reshape(-1, x.shape[-1])
    if row_strided and (rows.stride(-1) == 1 or rows.shape[-1] <= 1):
        return rows
    return rows.contiguous()


def wants_grad(x: torch.Tensor) -> bool:
    """Whether a kernel must produce the gradient of ``x`` (grad mode on and ``x`` requires it)."""
    return torch.is_grad_enabled() and x.requires_grad


def compute_dtype(*tensors) -> torch.dtype:
    """``max(float32, dtypes of the floating tensors)``: the reference's math dtype (float64 stays float64)."""
    dtype = torch.float32
    for x in tensors:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def read_rows(logits, target, ignore_index, sample_weight) -> Optional[torch.Tensor]:
    """bool [N]: the rows a loss reads (target != ignore_index and sample weight != 0); None: all."""
    if target is None and sample_weight is None:
        return None
    n = rows_of(logits)
    read = torch.ones(n, dtype=torch.bool, device=logits.device)
    if target is not None:
        read = read & (target.reshape(n) != ignore_index)
    if sample_weight is not None:
        read = read & (sample_weight.reshape(n) != 0)
    return read


def row_weights(
    logits: torch.Tensor,
    target: Optional[torch.Tensor],
    ignore_index: int,
    sample_weight: Optional[torch.Tensor],
    reduction: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[N] weights (float32, or ``dtype``) that turn summed row losses into the reduced loss.

    ``row_weight[i] = valid[i] * sample_weight[i] / divisor`` with ``divisor`` =
    counted rows ("batchmean"), counted rows * C ("mean"), 1 ("sum", "none").
    A batch with no counted rows gets divisor 1, so the loss is exactly 0.
    """
    n = rows_of(logits)
    num_classes = logits.shape[-1]
    if target is not None:
        valid = (target.reshape(n) != ignore_index).to(dtype)
    else:
        valid = torch.ones(n, dtype=dtype, device=logits.device)
    weight = valid
    if sample_weight is not None:
        # where() rather than a product so that a NaN/inf weight on an ignored row stays ignored
        weight = torch.where(valid > 0, sample_weight.reshape(n).to(dtype), 0.0)
    if reduction in ("batchmean", "mean"):
        counted = valid.sum().clamp_min(1.0)
        if reduction == "mean":
            counted = counted * num_classes
        weight = weight / counted
    return weight


def temperature_rows(temperature, logits: torch.Tensor) -> torch.Tensor:
    """The temperature as a float32 [N] tensor (keeps autograd to a tensor input)."""
    n = rows_of(logits)
    if isinstance(temperature, torch.Tensor):
        t = temperature.to(device=logits.device, dtype=torch.float32)
        return t.reshape(-1).expand(n).contiguous() if t.numel() == 1 else t.reshape(n).contiguous()
    return torch.full((n,), float(temperature), dtype=torch.float32, device=logits.device)




# ----------------------------------------------------------------------------
# shifted logits: [B, L, C] slices along the sequence of a [B, L + k, C] tensor, without a copy
# ----------------------------------------------------------------------------

def gapped_period(*xs: torch.Tensor) -> Optional[int]:
    """``P = L + k`` when every ``x [B, L, C]`` is a slice along dim 1 of a ``[B, P, C]`` tensor with
    adjacent elements in a row (``logits[:, :-1]``: ``P = L + 1``), the same ``P`` for all, else None.

    Such an ``x`` cannot be flattened into ``[B L, C]`` rows of one stride (``reshape`` copies it), but
    it is ``B P - k`` rows of one stride over the tensor it was cut from, ``k`` of them between batch
    elements ("gap rows", which the loss gives row weight 0 and so never reads)."""
    period = None
    for x in xs:
        if x.dim() != 3 or x.shape[0] < 2 or x.shape[1] < 1 or x.stride(2) != 1 or x.stride(1) < x.shape[2]:
            return None
        row, batch = x.stride(1), x.stride(0)
        if batch % row or batch // row <= x.shape[1] or period not in (None, batch // row):
            return None
        period = batch // row
    return period


class GappedRows(torch.autograd.Function):
    """``x [B, L, C]`` (see ``gapped_period``) as ``[B P - k, C]`` rows of one stride, a view of the same
    memory; backward views the rows' gradient back as ``[B, L, C]`` (no copy: the gap rows' part is
    simply not looked at)."""

    @staticmethod
    def forward(ctx, x, period: int):
        batch, length, width = x.shape
        ctx.shape, ctx.period = x.shape, period
        return x.as_strided((batch * period - (period - length), width), (x.stride(1), 1))

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None
        batch, length, width = ctx.shape
        return grad.as_strided((batch, length, width), (ctx.period * grad.stride(0), grad.stride(0), 1)), None


def to_gapped(values: torch.Tensor, period: int, fill) -> torch.Tensor:
    """Per-row ``values [B, L, ...]`` laid out like ``GappedRows``' rows: ``[B P - k, ...]``, gap rows ``fill``."""
    batch, length = values.shape[:2]
    out = values.new_full((batch, period) + tuple(values.shape[2:]), fill)
    out[:, :length] = values
    return out.reshape((batch * period,) + tuple(values.shape[2:]))[:batch * period - (period - length)]


def from_gapped(rows: torch.Tensor, batch: int, length: int, period: int) -> torch.Tensor:
    """The inverse of ``to_gapped`` for per-row results ``[B P - k]``: ``[B, L]``."""
    full = torch.cat([rows, rows.new_zeros(period - length)]) if period > length else rows
    return full.reshape(batch, period)[:, :length]
