"""Which backend runs a loss: availability, reasons, and the "auto" choice.

Backends: "reference" (plain PyTorch, always), "cpu" and "cuda" (compiled
``fastkd._C``), "triton" (``fastkd.triton``: CUDA tensors, or CPU tensors when
``TRITON_INTERPRET=1`` is set for testing). "auto" picks the fastest backend
that implements the loss for the tensors' device; when that is the reference
only because a compiled backend is missing, it warns once, naming the reason.
"""
import os
import warnings
from typing import Dict, Optional

import torch

from ..core.checks import BACKENDS
from . import ops as _ops

# The ops each fused backend must provide to run a loss (docs/design.md).
LOSS_OPS = {
    "kd": ("kd_fwd",),
    "ats": ("ats_fwd",),
    "dkd": ("dkd_fwd",),
    "dist": ("dist_fwd",),
    "mgd": ("mgd_mask", "mgd_sq_err"),
    # the language-model divergences (fastkd/losses/divergence.py): one op for the family
    "forward_kl": ("divergence_fwd",),
    "reverse_kl": ("divergence_fwd",),
    "jsd": ("divergence_fwd",),
    "skew_kl": ("divergence_fwd",),
    "tvd": ("divergence_fwd",),
    "jeffreys": ("divergence_fwd",),
    "triangular": ("divergence_fwd",),
    "entropy_gated_kl": ("divergence_fwd",),
    "akl": ("akl_fwd",),  # adaptive KL: its own row op with divergence_fwd's signature
    "alpha_divergence": ("divergence_fwd",),
    "ab_divergence": ("divergence_fwd",),
    "renyi": ("divergence_fwd",),
    "kd_topk": ("divergence_fwd",),
    "fused_linear_kd": ("divergence_fwd",),  # fastkd/losses/fused_linear.py: the row op on each chunk
    "fused_linear_akl": ("akl_fwd",),  # fused_linear_kd_loss(divergence="akl")
    # a loss with ce_weight / return_parts: the cross-entropy comes from divergence_fwd
    # (in the same pass for kd with a float temperature, a second pass otherwise)
    "kd+ce": ("kd_fwd", "divergence_fwd"),
    "ats+ce": ("ats_fwd", "divergence_fwd"),
    "dkd+ce": ("dkd_fwd", "divergence_fwd"),
    # fastkd.teacher_topk / topk_from_logits (fastkd/teacher/topk.py): the row op on each chunk of logits
    "teacher_topk": ("topk_fwd",),
}
# Ops with CPU and Triton kernels only (no CUDA C++ kernel: on CUDA tensors "auto" runs Triton).
NO_CUDA_KERNEL = ("topk_fwd",)
# The backends whose divergence_fwd reads rows with any row stride (CUDA's takes contiguous rows).
ROW_STRIDED_BACKENDS = ("cpu", "triton")
# The divergences that run a row op of their own, with divergence_fwd's signature (docs/design.md).
ROW_OPS = {"akl": "akl_fwd"}
# How messages name the LOSS_OPS keys that are not a public function's name.
_CALLS = {
    "kd_topk": "kd_loss with a TopKTeacher",
    "fused_linear_kd": "fused_linear_kd_loss",
    "fused_linear_akl": "fused_linear_kd_loss with divergence='akl'",
    "kd+ce": "kd_loss with ce_weight / return_parts",
    "ats+ce": "ats_loss with ce_weight / return_parts",
    "dkd+ce": "dkd_loss with ce_weight / return_parts",
    "teacher_topk": "teacher_topk / topk_from_logits",
}


def describe(loss: str) -> str:
    """``loss`` (a ``LOSS_OPS`` key) as the call a user made: "kd", "kd_loss with a TopKTeacher", ..."""
    return _CALLS.get(loss, loss)


# What "auto" tries on CUDA tensors, per loss, first choice first. Neither GPU
# backend has been timed on a GPU yet, so this is a reasoned default, not a
# measurement: the compiled CUDA kernels first (no JIT compilation on the first
# call or on each new class count, and a lighter launch than Triton's Python
# launcher, which matters at small shapes), Triton second (it is the fallback
# for a build without CUDA kernels). Both are checked against the reference in
# the tests (CUDA C++ kernels also on the CPU through HIP-CPU, Triton through its
# interpreter). Once `python -m fastkd.bench --device cuda` results are committed,
# each loss's order follows its measured winner (README, "Backends").
AUTO_CUDA_ORDER = {loss: ("cuda", "triton") for loss in LOSS_OPS}

_triton_module = None
_triton_error: Optional[str] = None
_warned = set()


def _load_triton():
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        if not hasattr(torch.library, "triton_op"):
            _triton_error = (
                f"the Triton backend needs torch >= 2.6 (torch.library.triton_op and wrap_triton); "
                f"this is torch {torch.__version__}"
            )
            return None
        try:
            from .. import triton as module

            _triton_module = module
        except Exception as exc:  # triton missing or incompatible
            _triton_error = f"fastkd.triton could not be imported ({type(exc).__name__}: {exc})"
    return _triton_module


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, loss: Optional[str] = None, device: Optional[torch.device] = None) -> Optional[str]:
    """None if backend ``name`` can run ``loss`` on ``device``, else why not (a sentence)."""
    ops = LOSS_OPS[loss] if loss else ()
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):
        if _ops.LOAD_ERROR:
            return _ops.LOAD_ERROR
        key = "CPU" if name == "cpu" else "CUDA"
        if name == "cuda":
            if not _ops.has_kernel("kd_fwd", "CUDA"):
                return ("fastkd._C was built without CUDA kernels (they are built when torch sees a GPU at build "
                        "time, or with FASTKD_BUILD_CUDA=1; never without a CUDA torch and nvcc)")
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        if device is not None and device.type != name:
            return f"backend '{name}' runs on {name} tensors, got tensors on {device}"
        missing = [op for op in ops if not _ops.has_kernel(op, key)]
        if missing:
            return f"backend '{name}' has no {loss} kernel yet (missing fastkd::{', fastkd::'.join(missing)})"
        return None
    if name == "triton":
        module = _load_triton()
        if module is None:
            return _triton_error
        if not torch.cuda.is_available() and not _interpret():
            return "Triton needs a CUDA device (or TRITON_INTERPRET=1 to run interpreted on CPU tensors, for testing)"
        if device is not None:
            if device.type == "cpu" and not _interpret():
                return "backend 'triton' runs on CPU tensors only with TRITON_INTERPRET=1 (testing)"
            if device.type not in ("cpu", "cuda"):
                return f"backend 'triton' cannot run on {device}"
        missing = [op for op in ops if not hasattr(module, op)]
        if missing:
            return f"backend 'triton' has no {loss} kernel yet"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def backends() -> Dict[str, Dict[str, object]]:
    """Availability of each backend on this machine.

    Returns ``{name: {"available": bool, "reason": str or None, "losses": [...]}}``
    where ``losses`` lists the losses the backend implements here ("kd_topk": ``kd_loss``
    with a ``TopKTeacher``; a backend that has "kd" and any divergence also runs
    ``ce_weight`` / ``return_parts``).
    """
    report = {}
    for name in BACKENDS[1:]:
        reason = unavailable_reason(name)
        losses = [loss for loss in LOSS_OPS
                  if "+" not in loss and reason is None and unavailable_reason(name, loss) is None]
        report[name] = {"available": reason is None, "reason": reason, "losses": losses}
    return report


def resolve(loss: str, backend: str, *tensors: torch.Tensor) -> str:
    """The backend that runs ``loss`` on ``tensors`` (raising if an explicit one cannot)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    has_f64 = any(t.dtype == torch.float64 for t in tensors)
    return _resolve(loss, backend, str(tensors[0].device), has_f64)


# Evaluated once per call site when torch.compile traces (its answer depends only on
# the installation and the arguments), so dispatch adds no graph break.
@torch.compiler.assume_constant_result
def _resolve(loss: str, backend: str, device_name: str, has_f64: bool) -> str:
    device = torch.device(device_name)
    if backend == "reference":
        return backend
    if backend != "auto":
        if has_f64:
            raise ValueError(
                f"backend '{backend}' computes in float32 and does not take float64 inputs; "
                "use backend='reference' (or 'auto') for float64"
            )
        reason = unavailable_reason(backend, loss, device)
        if reason:
            raise ValueError(f"backend '{backend}' is unavailable for {describe(loss)}: {reason}")
        return backend
    if has_f64:  # exact float64 math is only in the reference
        return "reference"
    order = ("cpu",) if device.type == "cpu" else AUTO_CUDA_ORDER[loss] if device.type == "cuda" else ()
    reasons = []
    for name in order:
        reason = unavailable_reason(name, loss, device)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    if reasons:
        key = (loss, device.type, tuple(reasons))
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"fastkd: no fused backend for {describe(loss)} on {device.type} tensors ({'; '.join(reasons)}); "
                "using the slower reference implementation",
                stacklevel=4,
            )
    return "reference"


def implementation(name: str):
    """The object whose attributes are the row ops (kd_fwd, ...) of a fused backend."""
    if name == "triton":
        return _load_triton()
    return torch.ops.fastkd
