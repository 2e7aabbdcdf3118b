"""Argument checks shared by the reference and the dispatching functionals.

Every check raises ``ValueError`` (or ``TypeError`` for a wrong kind of
object) whose message names the argument and what was wrong with it.
"""
import math
from typing import Optional

import torch

from .rows import rows_of, wants_grad

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("batchmean", "sum", "mean", "none")
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
# the divergence= names of fused_linear_kd_loss
FUSED_LINEAR_DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "jeffreys", "triangular")
FUSED_LINEAR_DIVERGENCES += ("entropy_gated_kl",)
FUSED_LINEAR_DIVERGENCES += ("akl",)  # its own row op, akl_fwd (dense teachers)
FUSED_LINEAR_DIVERGENCES += ("alpha_divergence", "ab_divergence", "renyi")

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


def check_non_negative(name: str, value) -> None:
    """A weight of a loss term (``ce_weight``, DKD's ``alpha`` / ``beta``, ...): a finite number >= 0."""
    check_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


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
    flat = sample_weight.dim() == 1 and sample_weight.numel() == rows_of(logits)
    if tuple(sample_weight.shape) != lead and not flat:
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
    check_ignore_index(ignore_index)
    check_target(target, student, ignore_index, required=target_required)
    check_sample_weight(sample_weight, student)


def check_ce(ce_weight, return_parts, target) -> None:
    """``ce_weight`` (a number >= 0; != 0 needs ``target``) and ``return_parts`` (a bool)."""
    check_non_negative("ce_weight", ce_weight)
    if ce_weight != 0 and target is None:
        raise ValueError(f"ce_weight={ce_weight} adds a cross-entropy term, which needs target (one class per row)")
    if not isinstance(return_parts, bool):
        raise TypeError(f"return_parts must be a bool, got {type(return_parts).__name__}")



def check_constant_weight(sample_weight, backend: str) -> None:
    """A fused backend treats ``sample_weight`` as a constant: refuse one that wants a gradient."""
    if sample_weight is not None and wants_grad(sample_weight):
        if backend == "distributed":
            raise ValueError("sample_weight requires grad, but the distributed losses treat it as a constant; "
                             "pass sample_weight.detach()")
        raise ValueError(
            f"sample_weight requires grad, but backend '{backend}' treats it as a constant; "
            "pass sample_weight.detach(), or backend='reference' to differentiate it"
        )


def check_kd_args(student, teacher, temperature, reduction, target, ignore_index, sample_weight, ce_weight,
                  return_parts) -> None:
    """``kd_loss`` with dense teacher logits, on every backend."""
    check_logit_loss(student, teacher, reduction, target, ignore_index, sample_weight, False)
    check_temperature_tensor(temperature, student)
    check_ce(ce_weight, return_parts, target)


def check_dkd_args(student, teacher, target, alpha, beta, temperature, reduction, ignore_index, sample_weight,
                   ce_weight, return_parts) -> None:
    """``dkd_loss``, on every backend."""
    check_logit_loss(student, teacher, reduction, target, ignore_index, sample_weight, True)
    check_non_negative("alpha", alpha)
    check_non_negative("beta", beta)
    check_positive("temperature", temperature)
    check_dkd_classes(student)
    check_ce(ce_weight, return_parts, target)


def check_ats_args(student, teacher, target, target_temperature, other_temperature, student_temperature,
                   reduction, ignore_index, sample_weight, ce_weight, return_parts) -> None:
    """``ats_loss``, on every backend."""
    check_logit_loss(student, teacher, reduction, target, ignore_index, sample_weight, True)
    check_positive("target_temperature", target_temperature)
    check_positive("other_temperature", other_temperature)
    check_positive("student_temperature", student_temperature)
    check_ce(ce_weight, return_parts, target)


def check_dist_args(student, teacher, beta, gamma, temperature) -> None:
    """``dist_loss``, on every backend."""
    check_pair(student, teacher)
    check_non_negative("beta", beta)
    check_non_negative("gamma", gamma)
    check_positive("temperature", temperature)


def check_unit(name: str, value) -> None:
    check_number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# ----------------------------------------------------------------------------
# MGD (feature maps)
# ----------------------------------------------------------------------------

MASK_TYPES = ("channel", "spatial")


def check_mask_args(mask_ratio, mask_type) -> None:
    check_number("mask_ratio", mask_ratio)
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def check_feature(name: str, x, channels: Optional[int] = None) -> None:
    """A 4-D floating feature map (N, C, H, W), with ``channels`` channels if given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D feature map (N, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (as constructed), got {x.shape[1]}")


def mgd_check_args(student_feat, teacher_feat, generation, align, alpha, mask_ratio, mask_type, generator) -> None:
    """Argument checks of ``mgd_loss``, on every backend."""
    check_feature("student_feat", student_feat)
    check_feature("teacher_feat", teacher_feat)
    if student_feat.device != teacher_feat.device:
        raise ValueError(
            f"student_feat and teacher_feat must be on the same device, got {student_feat.device} and "
            f"{teacher_feat.device}"
        )
    if not callable(generation):
        raise TypeError(f"generation must be callable (a module), got {type(generation).__name__}")
    if align is not None and not callable(align):
        raise TypeError(f"align must be callable (a module) or None, got {type(align).__name__}")
    check_non_negative("alpha", alpha)
    check_mask_args(mask_ratio, mask_type)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def mgd_check_aligned(x, teacher_feat, aligned: bool) -> None:
    """The (aligned) student feature must have the teacher's shape."""
    if x.dim() != 4 or x.shape != teacher_feat.shape:
        what = "align(student_feat)" if aligned else "student_feat"
        hint = "" if aligned else "; pass align= (a 1x1 conv) to map student channels to the teacher's"
        raise ValueError(
            f"{what} must have the shape of teacher_feat {tuple(teacher_feat.shape)}, "
            f"got {tuple(x.shape)}{hint}"
        )


def mgd_check_generated(pred, teacher_feat) -> None:
    if pred.shape != teacher_feat.shape:
        raise ValueError(
            f"generation output must have the shape of teacher_feat {tuple(teacher_feat.shape)}, "
            f"got {tuple(pred.shape)}"
        )


# ----------------------------------------------------------------------------
# module constructors (the functionals check again at call time; these fail early)
# ----------------------------------------------------------------------------

def check_backend(backend) -> None:
    # Availability depends on the tensors' device, so only the name is checked here.
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_row_args(reduction, ignore_index, backend) -> None:
    check_reduction(reduction)
    check_ignore_index(ignore_index)
    check_backend(backend)


# ----------------------------------------------------------------------------
# the fused LM head (fused_linear_kd_loss)
# ----------------------------------------------------------------------------

def check_matrix(name: str, x, dim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {x.dtype}")
    if dim == 2 and x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [V, H] head weight, got shape {tuple(x.shape)}")
    if dim == 1 and x.dim() != 1:
        raise ValueError(f"{name} must be a 1-D [V] bias, got shape {tuple(x.shape)}")
    if dim == 0 and x.dim() < 1:
        raise ValueError(f"{name} must have shape [..., H], got a 0-d tensor")


def check_teacher_constant(name: str, x) -> None:
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but fused_linear_kd_loss treats the teacher (and sample_weight) as a "
            f"constant and no gradient would reach it; pass {name}.detach() (or freeze the teacher with "
            "requires_grad_(False))"
        )


def check_same_device(name: str, x: torch.Tensor, device: torch.device, owner: str = "student_hidden") -> None:
    if x.device != device:
        raise ValueError(f"{name} must be on {owner}'s device {device}, got {x.device}")


def check_head(prefix: str, hidden, weight, bias, lead, device) -> None:
    """``{prefix}_hidden [..., H]``, ``{prefix}_weight [V, H]``, ``{prefix}_bias [V]`` (``hidden``, ... for prefix "")."""
    h_name, w_name, b_name = (f"{prefix}_{x}" if prefix else x for x in ("hidden", "weight", "bias"))
    check_matrix(h_name, hidden, 0)
    check_matrix(w_name, weight, 2)
    if lead is not None and tuple(hidden.shape[:-1]) != lead:
        raise ValueError(f"{h_name} must have the leading shape of student_hidden {lead}, "
                         f"got {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{h_name} has {hidden.shape[-1]} features but {w_name} [V, H] has "
                         f"H = {weight.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} has 0 rows (an empty vocabulary)")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{h_name} and {w_name} must have the same dtype (as F.linear), "
                        f"got {hidden.dtype} and {weight.dtype}")
    owner = "student_hidden" if prefix else "hidden"
    check_same_device(h_name, hidden, device, owner)
    check_same_device(w_name, weight, device, owner)
    if bias is not None:
        check_matrix(b_name, bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{b_name} must have shape [{weight.shape[0]}] (one per row of "
                             f"{w_name}), got {tuple(bias.shape)}")
        check_same_device(b_name, bias, device, owner)


def check_optional_number(name: str, value, positive: bool) -> None:
    if value is None:
        return
    if positive:
        check_positive(name, value)
    else:
        check_number(name, value)


TEACHER_VOCABS = ("truncate", "mask")


def check_teacher_vocab(teacher_vocab) -> None:
    if teacher_vocab not in TEACHER_VOCABS:
        raise ValueError(f"teacher_vocab must be one of {TEACHER_VOCABS}, got {teacher_vocab!r}")


def check_fused_linear_options(divergence, temperature, beta, skew, ce_weight, logit_scale, softcap, reduction) -> None:
    """The numeric options, shared by the functional and the module's constructor."""
    if divergence not in FUSED_LINEAR_DIVERGENCES:
        raise ValueError(f"divergence must be one of {FUSED_LINEAR_DIVERGENCES}, got {divergence!r}")
    check_positive("temperature", temperature)
    if beta is not None:  # None: the divergence's default (JSD 0.5, AB 0.7)
        (check_number if divergence == "ab_divergence" else check_unit)("beta", beta)
    check_unit("skew", skew)
    check_non_negative("ce_weight", ce_weight)
    check_optional_number("logit_scale", logit_scale, positive=False)
    check_optional_number("softcap", softcap, positive=True)
    check_reduction(reduction)
