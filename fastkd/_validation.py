"""Argument checks shared by the reference and the dispatching functionals.

Every check raises ``ValueError`` (or ``TypeError`` for a wrong kind of
object) whose message names the argument and what was wrong with it.
"""
import math
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("batchmean", "sum", "mean", "none")

# Value checks (target indices in range, tensor temperatures > 0) must read tensor
# values on the host. On CPU tensors that is free; on a GPU it would synchronise
# every training step (and break CUDA-graph capture), so there they are off by
# default and the kernels define the result instead (a counted row with an
# out-of-range target gives a NaN loss and NaN gradients). set_value_checks(True)
# turns them on for GPU tensors too, for debugging.
_check_device_values = False


def set_value_checks(enabled: bool) -> None:
    """Check tensor values (targets in range, temperatures > 0) on GPU tensors too.

    Off by default: those checks read the values back on the host, a
    synchronisation per call that stalls the GPU's launch queue and fails under
    CUDA-graph capture. On CPU tensors the checks always run (they cost nothing
    extra there). Under ``torch.compile`` they are skipped on every device.
    """
    global _check_device_values
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _check_device_values = enabled


# Devices whose tensor values the host reads without a synchronisation.
HOST_DEVICES = ("cpu",)


def on_host(x: torch.Tensor) -> bool:
    """Whether reading the values of ``x`` on the host is free (no device synchronisation)."""
    return x.device.type in HOST_DEVICES


def reads_values(x: torch.Tensor) -> bool:
    """Whether argument checks may read the values of ``x`` on the host."""
    if torch.compiler.is_compiling() or x.device.type == "meta":
        return False
    return on_host(x) or _check_device_values


def check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {x.dtype}"
        )
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape [..., C] with at least one dim, got a 0-d tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has 0 classes (last dim is 0); need at least one class")


def check_pair(student, teacher, student_name="student_logits", teacher_name="teacher_logits") -> None:
    check_logits(student_name, student)
    check_logits(teacher_name, teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"{student_name} and {teacher_name} must have the same shape, "
            f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"{student_name} and {teacher_name} must be on the same device, "
            f"got {student.device} and {teacher.device}"
        )


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_positive(name: str, value, allow_tensor: bool = False) -> None:
    """A strictly positive finite float (or, if allowed, a tensor of them)."""
    if isinstance(value, torch.Tensor):
        if not allow_tensor:
            raise TypeError(f"{name} must be a Python number, got a tensor")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if reads_values(value):
            if value.numel() and not bool((value > 0).all()):
                raise ValueError(f"{name} must be > 0 everywhere, got min {value.min().item()}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value > 0) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def check_target(target, logits: torch.Tensor, ignore_index: int, required: bool) -> None:
    if target is None:
        if required:
            raise ValueError("target is required for this loss (one class index per row)")
        return
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target must have the leading shape of the logits {tuple(logits.shape[:-1])}, "
            f"got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target must be on the logits' device {logits.device}, got {target.device}")
    if target.numel() == 0 or not reads_values(target):
        return
    counted = target[target != ignore_index]
    if counted.numel():
        lo, hi = int(counted.min()), int(counted.max())
        num_classes = logits.shape[-1]
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"target has class index {bad} outside [0, {num_classes}) "
                f"(and it is not ignore_index={ignore_index})"
            )


def check_sample_weight(sample_weight, logits: torch.Tensor) -> None:
    if sample_weight is None:
        return
    if not isinstance(sample_weight, torch.Tensor):
        raise TypeError(f"sample_weight must be a torch.Tensor, got {type(sample_weight).__name__}")
    if not sample_weight.is_floating_point():
        raise TypeError(f"sample_weight must be a floating tensor, got {sample_weight.dtype}")
    lead = tuple(logits.shape[:-1])
    if tuple(sample_weight.shape) != lead and not (sample_weight.dim() == 1 and sample_weight.numel() == rows_of(logits)):
        raise ValueError(
            f"sample_weight must have one weight per row, shape {lead}, got {tuple(sample_weight.shape)}"
        )
    if sample_weight.device != logits.device:
        raise ValueError(
            f"sample_weight must be on the logits' device {logits.device}, got {sample_weight.device}"
        )


def check_temperature_tensor(temperature, logits: torch.Tensor, name: str = "temperature") -> None:
    """A tensor temperature is a scalar or one value per row."""
    if not isinstance(temperature, torch.Tensor):
        check_positive(name, temperature)
        return
    check_positive(name, temperature, allow_tensor=True)
    n = rows_of(logits)
    lead = tuple(logits.shape[:-1])
    ok = temperature.numel() == 1 or tuple(temperature.shape) in (lead, (n,), lead + (1,), (n, 1))
    if not ok:
        raise ValueError(
            f"{name} must be a number, a 1-element tensor or one value per row {lead}, "
            f"got shape {tuple(temperature.shape)}"
        )
    if temperature.device != logits.device and temperature.numel() != 1:
        raise ValueError(f"{name} must be on the logits' device {logits.device}, got {temperature.device}")


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


def check_dkd_classes(logits: torch.Tensor) -> None:
    if logits.shape[-1] < 2:
        raise ValueError(
            f"student_logits must have at least 2 classes for DKD (it splits target and "
            f"non-target classes), got {logits.shape[-1]}"
        )


def check_logit_loss(student, teacher, reduction, target, ignore_index, sample_weight, target_required) -> None:
    """The checks every logit loss (KD, DKD, ATS) makes, on every backend."""
    check_pair(student, teacher)
    check_reduction(reduction)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_target(target, student, ignore_index, required=target_required)
    check_sample_weight(sample_weight, student)


def check_ce(ce_weight, return_parts, target) -> None:
    """``ce_weight`` (a number; != 0 needs ``target``) and ``return_parts`` (a bool)."""
    check_number("ce_weight", ce_weight)
    if ce_weight != 0 and target is None:
        raise ValueError(f"ce_weight={ce_weight} adds a cross-entropy term, which needs target (one class per row)")
    if not isinstance(return_parts, bool):
        raise TypeError(f"return_parts must be a bool, got {type(return_parts).__name__}")
