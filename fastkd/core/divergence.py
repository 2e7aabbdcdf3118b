"""The row-op contract of the divergence family (``docs/design.md``, "divergence_fwd").

Every KL-type divergence is one formula with four coefficients::

    loss = a * KL(p || m) + b * KL(q || m),   m = w_p * p + w_q * q

which the fused kernels implement once (``fastkd::divergence_fwd``); TVD, the two-sided KL
(Jeffreys: ``a KL(p || q) + b KL(q || p)``) and the triangular discrimination are kinds of their
own. The integer codes below are the op's ``kind`` and ``topk_mode`` arguments;
``divergence_op_args`` maps a divergence's name and parameters to ``(kind, a, b, w_p, w_q)``.
``check_divergence_args`` is the argument check every divergence makes, on every
backend (the reference and the fused path call it once per call).
"""
from collections import namedtuple
from typing import Tuple

from . import checks as v
from .rows import read_rows
from .topk import TopKTeacher

__all__ = ["LossParts", "KIND_CODES", "TOPK_MODE_CODES", "divergence_coefficients", "divergence_op_args",
           "check_divergence_args", "check_divergence_params"]

LossParts = namedtuple("LossParts", ["loss", "soft", "hard"])
LossParts.__doc__ = """``return_parts=True`` result: ``loss`` (differentiable) = ``soft + ce_weight * hard``;
``soft`` (the reduced divergence) and ``hard`` (the reduced cross-entropy, 0 without a
target) are detached, in the loss's dtype (float32; float64 for float64 inputs)."""

# Integer codes of the op's ``kind`` and ``topk_mode`` arguments.
KIND_CODES = {"kl_family": 0, "tvd": 1, "jeffreys": 2, "triangular": 3}
TOPK_MODE_CODES = {None: 0, "tail": 1, "renormalize": 2}


def divergence_coefficients(kind: str, beta: float = 0.5, skew: float = 0.1,
                            reverse: bool = False) -> Tuple[float, float, float, float]:
    """``(a, b, w_p, w_q)`` of ``a KL(p || m) + b KL(q || m)``, ``m = w_p p + w_q q``, for ``kind``.

    ``kind``: "forward_kl", "reverse_kl", "jsd" (``beta``), "skew_kl" (``skew``, ``reverse``).
    """
    if kind == "forward_kl":
        return 1.0, 0.0, 0.0, 1.0
    if kind == "reverse_kl":
        return 0.0, 1.0, 1.0, 0.0
    if kind == "jsd":
        # TRL / Liger special cases: the formula's limit at beta = 0 or 1 is 0, they use the plain KLs
        if beta == 0:
            return divergence_coefficients("forward_kl")
        if beta == 1:
            return divergence_coefficients("reverse_kl")
        return beta, 1.0 - beta, beta, 1.0 - beta
    if kind == "skew_kl":
        return (0.0, 1.0, 1.0 - skew, skew) if reverse else (1.0, 0.0, skew, 1.0 - skew)
    raise ValueError(f"unknown divergence kind {kind!r}")


def divergence_op_args(kind: str, **params) -> Tuple[int, float, float, float, float]:
    """``(kind code, a, b, w_p, w_q)`` of ``divergence_fwd`` for the divergence ``kind`` (a name).

    "tvd" and "triangular" take no coefficients; "jeffreys" is the two-sided KL with
    ``a = b = 1``; "ce" is the cross-entropy alone (``a = b = 0``); the KL family's names
    are those of ``divergence_coefficients``.
    """
    if kind in ("tvd", "triangular"):
        return KIND_CODES[kind], 0.0, 0.0, 0.0, 0.0
    if kind == "jeffreys":
        return KIND_CODES["jeffreys"], 1.0, 1.0, 0.0, 0.0
    if kind == "ce":
        return KIND_CODES["kl_family"], 0.0, 0.0, 0.0, 1.0
    return (KIND_CODES["kl_family"], *divergence_coefficients(kind, **params))


def check_divergence_args(student, teacher, temperature, reduction, target, ignore_index, sample_weight,
                          ce_weight, return_parts, temperature_tensor: bool = False) -> None:
    """The checks every divergence makes (dense or top-k teacher), on every backend."""
    if isinstance(teacher, TopKTeacher):
        v.check_logits("student_logits", student)
        v.check_reduction(reduction)
        v.check_ignore_index(ignore_index)
        v.check_target(target, student, ignore_index, required=False)
        v.check_sample_weight(sample_weight, student)
        teacher.check_against(student, read_rows(student, target, ignore_index, sample_weight)
                              if v.reads_values(teacher.indices) else None)
    else:
        v.check_logit_loss(student, teacher, reduction, target, ignore_index, sample_weight, False)
    if temperature_tensor:
        v.check_temperature_tensor(temperature, student)
    else:
        v.check_positive("temperature", temperature)
    v.check_ce(ce_weight, return_parts, target)


def check_divergence_params(**params) -> None:
    """A divergence's own parameters: ``beta`` (JSD) and ``skew`` in [0, 1], ``reverse`` a bool."""
    for name in ("beta", "skew"):
        if name in params:
            v.check_unit(name, params[name])
    if "reverse" in params and not isinstance(params["reverse"], bool):
        raise TypeError(f"reverse must be a bool, got {type(params['reverse']).__name__}")
