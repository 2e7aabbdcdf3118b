"""CTKD (curriculum temperature): ``GradientReversal``, ``CosineCurriculum`` and
``LearnableTemperature``, whose output is passed as ``temperature`` to ``KDLoss``::

    temp = LearnableTemperature()
    curriculum = CosineCurriculum(epochs=10)
    kd = KDLoss()
    ...
    T = temp(lambda_=curriculum(epoch))
    loss = ce + kd(student_logits, teacher_logits, temperature=T)
"""
import math
from typing import Optional

import torch
from torch import nn

from ..core import checks as v


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``lambda_``."""

    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.view_as(x)  # a view, not x itself: autograd needs a new tensor to attach the backward to

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.lambda_, None


class GradientReversal(nn.Module):
    """Gradient reversal layer as CTKD uses it::

        forward(x) = x,   backward: dL/dx = lambda_ * dL/dy

    A negative ``lambda_`` reverses the gradient (CTKD ramps it from 0 to -1
    with ``CosineCurriculum``), so whatever sits before this layer ascends the
    loss. ``lambda_`` (default -1.0, full reversal) is a plain attribute: set
    it each step, or pass ``lambda_=`` to ``forward`` for one call.
    """

    def __init__(self, lambda_: float = -1.0):
        super().__init__()
        v.check_number("lambda_", lambda_)
        self.lambda_ = lambda_

    def forward(self, x: torch.Tensor, lambda_: Optional[float] = None) -> torch.Tensor:
        lambda_ = self.lambda_ if lambda_ is None else lambda_
        v.check_number("lambda_", lambda_)
        return _ScaleGrad.apply(x, float(lambda_))

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}"


class CosineCurriculum:
    """CTKD's cosine schedule of the gradient-reversal factor::

        lambda(e) = l_min + (l_max - l_min) * (cos(pi * min(e, L) / L) + 1) / 2,  L = epochs

    With the defaults ``l_min=-1, l_max=0`` it goes from 0 at epoch 0 to -1 at
    epoch ``L`` and stays there (CIFAR ``L=10``, ImageNet ``L=5``).
    ``curriculum(epoch)`` returns a float.
    """

    def __init__(self, l_min: float = -1.0, l_max: float = 0.0, epochs: int = 10):
        v.check_number("l_min", l_min)
        v.check_number("l_max", l_max)
        v.check_int("epochs", epochs)
        self.l_min = l_min
        self.l_max = l_max
        self.epochs = epochs

    def __call__(self, epoch: float) -> float:
        v.check_non_negative("epoch", epoch)
        progress = min(epoch, self.epochs) / self.epochs
        return self.l_min + (self.l_max - self.l_min) * (math.cos(math.pi * progress) + 1.0) / 2.0

    def __repr__(self) -> str:
        return f"CosineCurriculum(l_min={self.l_min}, l_max={self.l_max}, epochs={self.epochs})"


class LearnableTemperature(nn.Module):
    """CTKD's learnable distillation temperature, trained adversarially through gradient reversal.

    ``mode="global"``: one parameter ``w`` (init 1)::

        T = t_start + t_end * sigmoid(GRL(w))          (0-d tensor; about 15.6 at init)

    ``mode="instance"``: an MLP on the concatenated logits predicts one value per row::

        T_i = t_start + t_end * sigmoid(GRL(mlp(cat(student_i, teacher_i))))   (shape: leading dims)

    with ``mlp = Linear(2 * num_classes, hidden) -> ReLU -> Linear(hidden, 1)``.
    The logits enter the MLP detached: the predictor only learns through ``T``,
    and no reversed gradient reaches the student's logits through it.

    ``T`` lies in ``(t_start, t_start + t_end)``; defaults ``t_start=1,
    t_end=20``. ``GRL`` is ``self.grl`` (a ``GradientReversal``); ``forward(...,
    lambda_=curriculum(epoch))`` uses that factor for this call (None: the
    layer's ``lambda_`` attribute, default -1). Pass ``T`` as the
    ``temperature`` of ``KDLoss`` / ``fastkd.kd_loss`` (it enters the softmaxes
    and the ``T^2`` factor, and receives a gradient), and put this module's
    parameters in the optimizer: with a negative lambda the step raises the KD
    loss (the harder curriculum).

    ``forward(student_logits=None, teacher_logits=None, lambda_=None)``; the
    logits are only needed (and only read) in instance mode.
    """

    MODES = ("global", "instance")

    def __init__(self, mode: str = "global", t_start: float = 1.0, t_end: float = 20.0,
                 num_classes: Optional[int] = None, hidden: int = 256):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        v.check_positive("t_start", t_start)
        v.check_positive("t_end", t_end)
        v.check_int("hidden", hidden)
        if mode == "instance":
            if num_classes is None:
                raise ValueError("num_classes is required for mode='instance' (the MLP reads both logit vectors)")
            v.check_int("num_classes", num_classes)
        elif num_classes is not None:
            raise ValueError("num_classes is only used by mode='instance'; leave it None for mode='global'")
        self.mode = mode
        self.t_start = t_start
        self.t_end = t_end
        self.num_classes = num_classes
        self.grl = GradientReversal()
        if mode == "global":
            self.w = nn.Parameter(torch.ones(()))
        else:
            self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, student_logits: Optional[torch.Tensor] = None, teacher_logits: Optional[torch.Tensor] = None,
                lambda_: Optional[float] = None) -> torch.Tensor:
        if self.mode == "global":
            raw = self.w
        else:
            if student_logits is None or teacher_logits is None:
                raise ValueError("mode='instance' needs student_logits and teacher_logits")
            v.check_pair(student_logits, teacher_logits)
            if student_logits.shape[-1] != self.num_classes:
                raise ValueError(
                    f"student_logits must have num_classes={self.num_classes} classes, got {student_logits.shape[-1]}"
                )
            features = torch.cat([student_logits, teacher_logits], dim=-1).detach()
            raw = self.mlp(features.to(self.mlp[0].weight.dtype)).squeeze(-1)
        return self.t_start + self.t_end * torch.sigmoid(self.grl(raw, lambda_))

    def extra_repr(self) -> str:
        extra = f", num_classes={self.num_classes}" if self.mode == "instance" else ""
        return f"mode={self.mode!r}, t_start={self.t_start}, t_end={self.t_end}{extra}"
