"""The row-op contract of the divergence family (``docs/design.md``, "divergence_fwd").

Every KL-type divergence is one formula with four coefficients::

    loss = a * KL(p || m) + b * KL(q || m),   m = w_p * p + w_q * q

which the fused kernels implement once (``fastkd::divergence_fwd``); TVD, the two-sided KL
(Jeffreys: ``a KL(p || q) + b KL(q || p)``) and the triangular discrimination are kinds of their
own, and so is the entropy-gated KL (``w KL(p || q) + (1 - w) KL(q || p)``, ``w`` a per-row gate on the
teacher's entropy: ``entropy_gate``). The adaptive KL (AKL) has a row op of its own, ``akl_fwd``, with
``divergence_fwd``'s schema (``kind`` 8, ``a`` = mu: ``check_akl_op_args``). The integer codes below are the op's ``kind`` and ``topk_mode`` arguments;
``divergence_op_args`` maps a divergence's name and parameters to ``(kind, a, b, w_p, w_q)``.
``check_divergence_args`` is the argument check every divergence makes, on every
backend (the reference and the fused path call it once per call).
"""
import math
from collections import namedtuple
from typing import Tuple

import torch

from . import checks as v
from .rows import read_rows
from .topk import TopKTeacher
from .vocab import MappedTeacher

__all__ = ["LossParts", "KIND_CODES", "TOPK_MODE_CODES", "ENTROPY_GATE_DEFAULTS", "AKL_MU_DEFAULT", "POWER_DEFAULTS",
           "divergence_coefficients", "divergence_op_args", "divergence_params", "fused_op_args", "entropy_gate",
           "renyi_row", "check_divergence_args", "check_divergence_params", "check_akl_teacher", "check_akl_op_args"]

LossParts = namedtuple("LossParts", ["loss", "soft", "hard"])
LossParts.__doc__ = """``return_parts=True`` result: ``loss`` (differentiable) = ``soft + ce_weight * hard``;
``soft`` (the reduced divergence) and ``hard`` (the reduced cross-entropy, 0 without a
target) are detached, in the loss's dtype (float32; float64 for float64 inputs)."""

# Integer codes of the op's ``kind`` and ``topk_mode`` arguments.
KIND_CODES = {"kl_family": 0, "tvd": 1, "jeffreys": 2, "triangular": 3}
# The power divergences: 4 the AB divergence (Amari's alpha divergence is AB at beta = 1 - alpha; the op's
# a, b are alpha, beta), 6 Renyi (a = order, b = 1.0 for reverse=True, else 0.0). 5 is no op argument: the
# kernels' internal code for Renyi's gradient pass at a row's S. Appended, never renumbered.
KIND_CODES["ab_divergence"] = 4
KIND_CODES["renyi"] = 6
KIND_CODES["entropy_gated_kl"] = 7
# adaptive KL (AKL, Wu et al. 2025): its own row op ``akl_fwd`` (divergence_fwd's schema, ``a`` = mu), kind 8
KIND_CODES["akl"] = 8
AKL_MU_DEFAULT = 0.5

# The power divergences' parameters and their defaults: Amari's alpha = 0.5 (4 (1 - sum sqrt(p q))), ABKD's
# (alpha, beta) = (0.2, 0.7) (Wang et al. 2025), Renyi's order 0.5.
POWER_DEFAULTS = {"alpha_divergence": {"alpha": 0.5}, "ab_divergence": {"alpha": 0.2, "beta": 0.7},
                  "renyi": {"order": 0.5, "reverse": False}}

# The entropy-gated KL's parameters and their defaults (fastkd's choice: the gate opens around half the
# maximal normalised entropy and spans the whole [reverse KL, forward KL] range).
ENTROPY_GATE_DEFAULTS = {"alpha_min": 0.0, "alpha_max": 1.0, "tau": 0.5, "scale": 0.1}
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
    ``a = b = 1``; "ab_divergence" passes ``(alpha, beta)`` as ``(a, b)``, "alpha_divergence" ``(alpha,
    1 - alpha)`` (the same kind); "renyi" ``(order, 1.0 if reverse else 0.0)``; "entropy_gated_kl" passes ``(alpha_min, alpha_max, tau, scale)`` in their place; "ce" is the cross-entropy alone (``a = b = 0``); the KL family's names
    are those of ``divergence_coefficients``.
    """
    if kind in ("tvd", "triangular"):
        return KIND_CODES[kind], 0.0, 0.0, 0.0, 0.0
    if kind == "jeffreys":
        return KIND_CODES["jeffreys"], 1.0, 1.0, 0.0, 0.0
    if kind == "ce":
        return KIND_CODES["kl_family"], 0.0, 0.0, 0.0, 1.0
    if kind == "akl":  # akl_fwd: a = mu (the teacher's head mass), the others unused
        return KIND_CODES[kind], float(params.get("mu", AKL_MU_DEFAULT)), 0.0, 0.0, 0.0
    if kind == "alpha_divergence":  # Amari's alpha divergence: AB at beta = 1 - alpha
        alpha = float(params.get("alpha", POWER_DEFAULTS[kind]["alpha"]))
        return KIND_CODES["ab_divergence"], alpha, 1.0 - alpha, 0.0, 0.0
    if kind == "ab_divergence":
        g = {**POWER_DEFAULTS[kind], **params}
        return KIND_CODES[kind], float(g["alpha"]), float(g["beta"]), 0.0, 0.0
    if kind == "renyi":  # a = order, b = 1 for the reverse direction
        g = {**POWER_DEFAULTS[kind], **params}
        return KIND_CODES[kind], float(g["order"]), 1.0 if g["reverse"] else 0.0, 0.0, 0.0
    if kind == "entropy_gated_kl":  # the op's a, b, w_p, w_q carry alpha_min, alpha_max, tau, scale
        g = {**ENTROPY_GATE_DEFAULTS, **params}
        return KIND_CODES[kind], float(g["alpha_min"]), float(g["alpha_max"]), float(g["tau"]), float(g["scale"])
    return (KIND_CODES["kl_family"], *divergence_coefficients(kind, **params))


def check_divergence_args(student, teacher, temperature, reduction, target, ignore_index, sample_weight,
                          ce_weight, return_parts, temperature_tensor: bool = False) -> None:
    """The checks every divergence makes (dense, top-k or mapped teacher), on every backend."""
    if isinstance(teacher, MappedTeacher):
        teacher.check_against(student)
        v.check_reduction(reduction)
        v.check_ignore_index(ignore_index)
        v.check_target(target, student, ignore_index, required=False)
        v.check_sample_weight(sample_weight, student)
    elif isinstance(teacher, TopKTeacher):
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


def entropy_gate(entropy, num_classes: int, alpha_min: float, alpha_max: float, tau: float, scale: float):
    """The entropy-gated KL's weight of ``KL(p || q)`` per row (a tensor like ``entropy``)::

        w = alpha_min + (alpha_max - alpha_min) sigmoid((H(p) / log V - tau) / scale)

    ``H(p) / log V`` (the normalised entropy, in [0, 1]) is 0 for ``V = 1``. The reference, the
    PyTorch sharded path and the shard kernels' caller use it; the kernels have the same formula
    (``csrc/divergence_math.h``, ``div_gate_weight``; Triton ``_gate``).
    """
    h_norm = entropy / math.log(num_classes) if num_classes > 1 else torch.zeros_like(entropy)
    return alpha_min + (alpha_max - alpha_min) * torch.sigmoid((h_norm - tau) / scale)


def renyi_row(u, s_direct, order: float, reverse: bool):
    """Renyi's row numbers from ``U = sum_c x phi_c(log y - log x)`` and ``s_direct = sum_c x^r y^(1 - r)`` (tensors
    of rows): ``(soft, sum G, sum H, 1 / S)``, ``S = 1 + c U`` (``c = 1 - order``, clamped at 0), ``soft = -U
    log1p(c U) / (c U)`` (``-U`` at ``c U = 0``; ``+inf`` for an infinite ``U``); where ``s_direct < 1/2``, ``S =
    s_direct`` and ``soft = log(S) / (order - 1)`` (``1 + c U`` keeps only eps of a small ``S``); the last: 1.0 on
    those direct rows (their x side's gradient is then the exact ``r x^r y^c / ((r - 1) S)``), else 0.0. The
    shard kernels' caller uses it; the kernels have the same
    formula (``csrc/divergence_math.h`` ``div_renyi_row``, Triton ``_renyi_row``)."""
    c = 1.0 - float(order)
    x = (c * u).clamp_min(-1.0) if c != 0 else torch.zeros_like(u)
    tiny = x == 0
    ratio = torch.where(tiny, torch.ones_like(x), torch.log1p(x) / torch.where(tiny, torch.ones_like(x), x))
    direct = (s_direct < 0.5) & (u != 0)  # (U = S = 0: a row without buckets, loss 0)
    inv_s = 1.0 / torch.where(direct, s_direct, 1.0 + x)
    soft = torch.where(torch.isinf(u), torch.full_like(u, float("inf")), -u * ratio)
    if c != 0:
        soft = torch.where(direct, torch.log(s_direct) / (float(order) - 1.0), soft)
    # the x side's sum: -r U / S, or on a direct row r / (r - 1) (the kernels' div_renyi_grad_terms)
    x_side = torch.where(direct, torch.full_like(u, float(order) / (float(order) - 1.0) if c != 0 else 0.0),
                         -float(order) * u * inv_s)
    minus_one = torch.full_like(u, -1.0)
    inf_row = soft == float("inf")  # a constant: gradients 0 (1 / S = 0 tells the kernels' kind 5)
    inv_s, x_side = torch.where(inf_row, 0.0, inv_s), torch.where(inf_row, 0.0, x_side)
    minus_one = torch.where(inf_row, 0.0, minus_one)
    flag = direct.to(u.dtype)
    return (soft, x_side, minus_one, inv_s, flag) if reverse else (soft, minus_one, x_side, inv_s, flag)


def divergence_params(divergence: str, *, alpha_min=0.0, alpha_max=1.0, tau=0.5, scale=0.1, alpha=None, beta=None,
                      order=0.5, reverse=False, mu=AKL_MU_DEFAULT) -> dict:
    """The parameters of ``divergence`` beyond ``beta`` / ``skew`` (``fastkd.fused_linear_kd_loss`` and its
    module take them all as keywords): AKL's ``mu``, a power divergence's (``alpha``, ``beta`` None: its
    default), or else the entropy gate's (always, so that they are checked)."""
    if divergence == "akl":
        return {"mu": mu}
    power = POWER_DEFAULTS.get(divergence)
    if power is None:
        return {"alpha_min": alpha_min, "alpha_max": alpha_max, "tau": tau, "scale": scale}
    given = {"alpha": alpha, "beta": beta, "order": order, "reverse": reverse}
    return {k: (power[k] if given[k] is None else given[k]) for k in power}


def fused_op_args(divergence: str, temperature: float, beta: float, skew: float, gate=None):
    """``(kind, a, b, w_p, w_q, soft_scale)`` of ``divergence_fwd`` for ``fastkd.fused_linear_kd_loss``'s
    ``divergence`` (``gate``: ``divergence_params``; ``beta`` None: JSD's 0.5)."""
    if divergence in ("tvd", "jeffreys", "triangular"):
        return (*divergence_op_args(divergence), 1.0)
    if divergence in ("entropy_gated_kl", "alpha_divergence", "ab_divergence", "renyi", "akl"):
        return (*divergence_op_args(divergence, **(gate or {})), 1.0)
    if divergence == "kl":  # kd_loss: Hinton's T^2
        return (KIND_CODES["kl_family"], *divergence_coefficients("forward_kl"), float(temperature) ** 2)
    if divergence == "reverse_kl":
        coeff = divergence_coefficients("reverse_kl")
    elif divergence == "jsd":
        coeff = divergence_coefficients("jsd", beta=0.5 if beta is None else beta)
    else:
        coeff = divergence_coefficients("skew_kl", skew=skew, reverse=divergence == "skew_reverse_kl")
    return (KIND_CODES["kl_family"], *coeff, 1.0)


def check_divergence_params(**params) -> None:
    """A divergence's own parameters: ``beta`` (JSD) and ``skew`` in [0, 1], ``reverse`` a bool; the
    power divergences' ``alpha`` and (with an ``alpha``: AB's) ``beta`` finite,
    ``order`` finite and > 0; the entropy gate's ``alpha_min``, ``alpha_max`` in [0, 1] (either order), ``tau``
    finite, ``scale`` > 0; AKL's ``mu`` in (0, 1]."""
    power = "alpha" in params  # the AB divergence's beta (with its alpha) is any finite real, JSD's in [0, 1]
    for name in ("skew", "alpha_min", "alpha_max") if power else ("beta", "skew", "alpha_min", "alpha_max"):
        if name in params:
            v.check_unit(name, params[name])
    if "tau" in params:
        v.check_number("tau", params["tau"])
    for name in ("alpha", "beta"):  # the power divergences': any finite real
        if name in params:
            v.check_number(name, params[name])
    if "order" in params:
        v.check_positive("order", params["order"])
    if "scale" in params:
        v.check_positive("scale", params["scale"])
    if "mu" in params:  # AKL's head mass
        v.check_number("mu", params["mu"])
        if not 0.0 < params["mu"] <= 1.0:
            raise ValueError(f"mu must be in (0, 1] (the teacher's head mass), got {params['mu']}")
    if "reverse" in params and not isinstance(params["reverse"], bool):
        raise TypeError(f"reverse must be a bool, got {type(params['reverse']).__name__}")


def check_akl_teacher(teacher, process_group, divergence: str = "akl", topk: bool = False) -> None:
    """AKL takes dense teacher logits (and, with ``topk`` (``akl_loss``), a ``TopKTeacher``: its head over the
    buckets, on one process): the head is a threshold over the teacher's whole distribution. With
    ``process_group``, dense logits only (each rank a vocabulary shard; the threshold by all-reduced mass
    histograms, ``fastkd.distributed.akl``). Nothing to check for another ``divergence`` (the fused head's name)."""
    from .vocab import MappedTeacher

    if divergence != "akl":
        return
    if process_group is not None and isinstance(teacher, (TopKTeacher, MappedTeacher)):
        raise ValueError(f"akl_loss with process_group takes dense teacher logits (this rank's vocabulary shard), "
                         f"got a {type(teacher).__name__}: the head over a TopKTeacher's buckets runs on one "
                         "process only (and a MappedTeacher's projection needs the whole vocabulary)")
    if isinstance(teacher, MappedTeacher) or (isinstance(teacher, TopKTeacher) and not topk):
        raise TypeError(f"{'akl_loss' if topk else 'AKL'} takes dense teacher logits"
                        f"{' or a TopKTeacher' if topk else ''}, got a {type(teacher).__name__}: AKL's head (the "
                        "teacher's most probable classes holding mass mu) is defined over the whole vocabulary"
                        + ("" if topk else " (akl_loss takes a TopKTeacher: its head over the buckets)"))


def check_akl_op_args(kind: int, mu: float, topk_mode: int) -> None:
    """``akl_fwd``'s own arguments: ``kind`` 8 (``KIND_CODES["akl"]``), ``a = mu`` in (0, 1], a dense teacher."""
    if kind != KIND_CODES["akl"]:
        raise ValueError(f"fastkd: akl_fwd kind must be {KIND_CODES['akl']} (AKL), got {kind}")
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"fastkd: akl_fwd a (mu) must be in (0, 1], got {mu}")
    if topk_mode != 0:
        raise ValueError(f"fastkd: akl_fwd takes a dense teacher (topk_mode 0), got topk_mode {topk_mode}")
