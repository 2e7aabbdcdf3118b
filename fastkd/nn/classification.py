"""Modules of the classification losses: ``KDLoss``, ``DKDLoss`` (with mdistiller's warm-up),
``ATSLoss``, ``DISTLoss`` (they hold the hyper-parameters and call ``fastkd.functional``), and the
feature methods that own trainable layers: ``MGDLoss`` (align + generation block), ``SimKD``
(projector + the teacher's classifier). Formulas: ``docs/methods.md`` and each functional's docstring.
"""
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from ..core import checks as v
from .base import RowLoss


class KDLoss(RowLoss):
    """Vanilla KD (Hinton et al. 2015), per row::

        loss_i = T^2 * sum_c p_t[c] * (log p_t[c] - log p_s[c]),  p = softmax(logits / T)

    reduced by ``reduction`` (default "batchmean": sum / counted rows); see
    ``fastkd.kd_loss``. Defaults: ``temperature=4.0`` (mdistiller, CIFAR-100;
    ImageNet uses 1), ``ignore_index=-100``, ``backend="auto"``.

    ``forward(student_logits, teacher_logits, target=None, sample_weight=None,
    temperature=None)``: ``target`` marks rows to skip (``ignore_index``) and is the
    class of the optional cross-entropy; a ``temperature`` given here (a number, or
    a tensor from ``LearnableTemperature`` that receives a gradient) replaces the
    module's. ``ce_weight`` adds ``ce_weight * cross_entropy(student_logits, target)``
    (in the same pass with a number temperature, a second pass with a tensor);
    ``return_parts=True`` returns ``LossParts(loss, soft, hard)``; ``process_group``:
    vocabulary-sharded logits (``fastkd.kd_loss``).
    """

    def __init__(self, temperature: float = 4.0, *, teacher_temperature: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, teacher_vocab: str = "truncate",
                 backend: str = "auto", process_group=None):
        v.check_positive("temperature", temperature)
        if teacher_temperature is not None:
            v.check_positive("teacher_temperature", teacher_temperature)
        v.check_teacher_vocab(teacher_vocab)
        super().__init__(reduction, ignore_index, ce_weight, return_parts, backend, process_group)
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.teacher_vocab = teacher_vocab

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None, sample_weight: Optional[torch.Tensor] = None,
                temperature: Union[float, torch.Tensor, None] = None) -> torch.Tensor:
        temperature = self.temperature if temperature is None else temperature
        return functional.kd_loss(student_logits, teacher_logits, temperature, target=target,
                                  teacher_temperature=self.teacher_temperature, teacher_vocab=self.teacher_vocab,
                                  **self.row_options(sample_weight))

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, teacher_temperature={self.teacher_temperature}, reduction={self.reduction!r}, ce_weight={self.ce_weight}, "
                f"return_parts={self.return_parts}, backend={self.backend!r}")


class DKDLoss(RowLoss):
    """Decoupled KD (Zhao et al. 2022) with mdistiller's linear warm-up::

        loss = min(epoch / warmup_epochs, 1) * mean_i (alpha * TCKD_i + beta * NCKD_i)

    (TCKD and NCKD as in ``fastkd.dkd_loss``, each including ``T^2``). Epochs
    are 1-indexed as in mdistiller: with the default ``warmup_epochs=20`` the
    factor is 0.05 at epoch 1 and 1 from epoch 20 on. ``warmup_epochs=0`` means
    no warm-up, and ``epoch=None`` applies no factor. Defaults (CIFAR-100):
    ``alpha=1, beta=8, temperature=4, warmup_epochs=20``; ImageNet uses
    ``temperature=1, warmup_epochs=1`` and ``beta`` 0.5 (R34->R18) or 2 (R50->MV1).

    ``forward(student_logits, teacher_logits, target, epoch=None, sample_weight=None)``.
    ``ce_weight`` adds ``ce_weight * cross_entropy(student_logits, target)`` (not
    warmed up: the factor multiplies the DKD term only, as in mdistiller);
    ``return_parts=True`` returns ``LossParts(loss, soft, hard)``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: float = 20,
                 *, reduction: str = "batchmean", ignore_index: int = -100, ce_weight: float = 0.0,
                 return_parts: bool = False, backend: str = "auto", process_group=None):
        v.check_non_negative("alpha", alpha)
        v.check_non_negative("beta", beta)
        v.check_positive("temperature", temperature)
        v.check_non_negative("warmup_epochs", warmup_epochs)
        super().__init__(reduction, ignore_index, ce_weight, return_parts, backend, process_group)
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup_epochs = warmup_epochs

    def warmup_factor(self, epoch: Optional[float]) -> float:
        """``min(epoch / warmup_epochs, 1)``; 1 when ``epoch`` is None or ``warmup_epochs`` is 0."""
        if epoch is None:
            return 1.0
        v.check_non_negative("epoch", epoch)
        if self.warmup_epochs == 0:
            return 1.0
        return min(epoch / self.warmup_epochs, 1.0)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                epoch: Optional[float] = None, sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        factor = self.warmup_factor(epoch)
        # DKD is linear in (alpha, beta): warming up the coefficients scales the DKD term
        # alone (not the cross-entropy) and costs no extra pass over the gradient.
        return functional.dkd_loss(student_logits, teacher_logits, target, alpha=self.alpha * factor,
                                   beta=self.beta * factor, temperature=self.temperature,
                                   **self.row_options(sample_weight))

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
                f"warmup_epochs={self.warmup_epochs}, reduction={self.reduction!r}, backend={self.backend!r}")


class ATSLoss(RowLoss):
    """Asymmetric temperature scaling (Li et al. 2022), KL form, per row::

        q = softmax(t / tau),  tau_c = target_temperature if c == target else other_temperature
        loss_i = s^2 * KL(q || softmax(student / s)),  s = student_temperature

    Defaults ``target_temperature=4, other_temperature=2, student_temperature=1``.
    The official code reports the soft cross-entropy, which differs from this KL
    by the teacher entropy only (same gradient). See ``fastkd.ats_loss``.

    ``forward(student_logits, teacher_logits, target, sample_weight=None)``.
    ``ce_weight`` / ``return_parts``: as ``KDLoss``.
    """

    def __init__(self, target_temperature: float = 4.0, other_temperature: float = 2.0,
                 student_temperature: float = 1.0, *, reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto",
                 process_group=None):
        v.check_positive("target_temperature", target_temperature)
        v.check_positive("other_temperature", other_temperature)
        v.check_positive("student_temperature", student_temperature)
        super().__init__(reduction, ignore_index, ce_weight, return_parts, backend, process_group)
        self.target_temperature = target_temperature
        self.other_temperature = other_temperature
        self.student_temperature = student_temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return functional.ats_loss(student_logits, teacher_logits, target, target_temperature=self.target_temperature,
                                   other_temperature=self.other_temperature,
                                   student_temperature=self.student_temperature, **self.row_options(sample_weight))

    def extra_repr(self) -> str:
        return (f"target_temperature={self.target_temperature}, other_temperature={self.other_temperature}, "
                f"student_temperature={self.student_temperature}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


class DISTLoss(nn.Module):
    """DIST (Huang et al. 2022) on the whole [N, C] batch::

        y = softmax(logits / tau),  rho = Pearson correlation (1e-8 added to the product of norms)
        loss = beta * tau^2 * (1 - mean_i rho(y_s[i, :], y_t[i, :]))
             + gamma * tau^2 * (1 - mean_c rho(y_s[:, c], y_t[:, c]))

    Defaults ``beta = gamma = 1``, ``temperature=1`` (ImageNet; CIFAR-100 uses
    4). The official configs weight the whole term by 2. See ``fastkd.dist_loss``.

    ``forward(student_logits, teacher_logits)``.
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, backend: str = "auto",
                 process_group=None):
        super().__init__()
        v.check_non_negative("beta", beta)
        v.check_non_negative("gamma", gamma)
        v.check_positive("temperature", temperature)
        v.check_backend(backend)
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature
        self.backend = backend
        self.process_group = process_group  # data parallel: intra-class statistics over the global batch

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return functional.dist_loss(
            student_logits, teacher_logits, beta=self.beta, gamma=self.gamma, temperature=self.temperature,
            process_group=self.process_group, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, backend={self.backend!r}"


# ----------------------------------------------------------------------------
# feature methods
# ----------------------------------------------------------------------------

class MGDLoss(nn.Module):
    """Masked generative distillation (Yang et al. 2022)::

        loss = alpha * sum((generation(align(student) * M) - teacher)^2) / N

    ``align`` is a 1x1 conv with bias from ``student_channels`` to
    ``teacher_channels``, created only when the two differ (``None``
    otherwise, as in the official code). ``generation`` is
    conv3x3(Ct->Ct, pad 1) -> ReLU -> conv3x3(Ct->Ct, pad 1). ``M`` drops whole
    channels (``mask_type="channel"``, classification) or spatial positions
    (``"spatial"``, detection / segmentation) with probability ``mask_ratio``.
    Defaults (classification): ``alpha=7e-5, mask_ratio=0.15``; detection uses
    ``alpha=2e-5, mask_ratio=0.65``, segmentation ``2e-5, 0.75``.

    Both layers are trained with the student (put this module's parameters in
    the student's optimizer). ``forward(student_feat, teacher_feat,
    generator=None)``: features are (N, C, H, W); the mask's seed is drawn from
    ``generator`` (the global RNG if None). See ``fastkd.mgd_loss``.
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, alpha: float = 7e-5,
                 mask_ratio: float = 0.15, mask_type: str = "channel", backend: str = "auto"):
        super().__init__()
        v.check_int("student_channels", student_channels)
        v.check_int("teacher_channels", teacher_channels)
        v.check_non_negative("alpha", alpha)
        v.check_mask_args(mask_ratio, mask_type)
        v.check_backend(backend)
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.alpha = alpha
        self.mask_ratio = mask_ratio
        self.mask_type = mask_type
        self.backend = backend
        self.align = nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else None
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
        )

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        # Channel counts are checked here so a mismatch is a ValueError, not a conv error.
        v.check_feature("student_feat", student_feat, self.student_channels)
        v.check_feature("teacher_feat", teacher_feat, self.teacher_channels)
        return functional.mgd_loss(
            student_feat, teacher_feat, self.generation, align=self.align, alpha=self.alpha,
            mask_ratio=self.mask_ratio, mask_type=self.mask_type, generator=generator, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
                f"alpha={self.alpha}, mask_ratio={self.mask_ratio}, mask_type={self.mask_type!r}, "
                f"backend={self.backend!r}")


class SimKD(nn.Module):
    """SimKD (Chen et al. 2022): project the student feature, reuse the teacher's classifier.

    The larger of the two feature maps is average-pooled to the smaller spatial
    size (height and width separately), then::

        f_s  = projector(student_feat)
        loss = mean((f_s - teacher_feat)^2)                 (fastkd.simkd_loss)
        logits = teacher_classifier(flatten(avgpool(f_s)))

    ``projector`` (no conv bias, ``f = factor``, ``m = teacher_channels // f``):
    conv1x1(Cs->m) BN ReLU, conv3x3(m->m, pad 1) BN ReLU, conv1x1(m->Ct) BN ReLU.
    SimKD trains only the projector (no CE); at inference the student's
    prediction is ``logits``.

    ``teacher_classifier`` (e.g. the teacher's final ``nn.Linear``) is used as
    given: it is neither copied nor registered as a submodule, so it is not in
    ``parameters()``, ``state_dict()`` or ``.to()`` of this module, and an
    optimizer over ``SimKD.parameters()`` never updates it. Freeze it
    (``teacher_classifier.requires_grad_(False)``) so backward does not fill its
    ``.grad``; the gradient still reaches the projector through it.

    ``forward(student_feat, teacher_feat)`` returns ``(loss, logits)``.
    """

    def __init__(self, student_channels: int, teacher_channels: int,
                 teacher_classifier: Callable[[torch.Tensor], torch.Tensor], factor: int = 2):
        super().__init__()
        v.check_int("student_channels", student_channels)
        v.check_int("teacher_channels", teacher_channels)
        if not callable(teacher_classifier):
            raise TypeError(f"teacher_classifier must be callable (a module), got {type(teacher_classifier).__name__}")
        v.check_int("factor", factor)
        mid = teacher_channels // factor
        if mid < 1:
            raise ValueError(
                f"factor must be <= teacher_channels ({teacher_channels}) so that the projector's "
                f"middle width teacher_channels // factor is at least 1, got {factor}"
            )
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.factor = factor
        # A tuple hides the module from nn.Module's registration (see the class docstring).
        self._teacher_classifier = (teacher_classifier,)
        self.projector = nn.Sequential(
            nn.Conv2d(student_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, teacher_channels, 1, bias=False), nn.BatchNorm2d(teacher_channels), nn.ReLU(),
        )

    @property
    def teacher_classifier(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self._teacher_classifier[0]

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor):
        v.check_feature("student_feat", student_feat, self.student_channels)
        v.check_feature("teacher_feat", teacher_feat, self.teacher_channels)
        if student_feat.shape[0] != teacher_feat.shape[0]:
            raise ValueError(
                f"student_feat and teacher_feat must have the same batch size, "
                f"got {student_feat.shape[0]} and {teacher_feat.shape[0]}"
            )
        size = (min(student_feat.shape[2], teacher_feat.shape[2]), min(student_feat.shape[3], teacher_feat.shape[3]))
        if tuple(student_feat.shape[2:]) != size:
            student_feat = F.adaptive_avg_pool2d(student_feat, size)
        if tuple(teacher_feat.shape[2:]) != size:
            teacher_feat = F.adaptive_avg_pool2d(teacher_feat, size)
        projected = self.projector(student_feat)
        loss = functional.simkd_loss(projected, teacher_feat)
        logits = self.teacher_classifier(torch.flatten(F.adaptive_avg_pool2d(projected, 1), 1))
        return loss, logits

    def extra_repr(self) -> str:
        return (f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
                f"factor={self.factor}")
