"""``torch.nn.Module`` wrappers of the fastkd losses, and the trainable parts some methods need.

By family: ``classification`` (``KDLoss``, ``DKDLoss`` with mdistiller's warm-up, ``ATSLoss``,
``DISTLoss``; the feature methods ``MGDLoss`` and ``SimKD``, which own their layers), ``ctkd``
(curriculum temperature: ``LearnableTemperature``, ``GradientReversal``, ``CosineCurriculum``),
``cross_tokenizer`` (``ULDLoss``, ``HybridULDLoss``), ``divergence`` (``ForwardKLLoss``, ``ReverseKLLoss``, ``JSDLoss``,
``SkewKLLoss``, ``TVDLoss``, ``JeffreysLoss``, ``TriangularLoss``, ``EntropyGatedKLLoss``, ``AKLLoss``,
``AlphaDivergenceLoss``, ``ABDivergenceLoss``, ``RenyiLoss``) and ``fused_linear``
(``FusedLinearKDLoss``, the LM head fused with the loss); ``base.RowLoss`` holds the row options
they share. Formulas and semantics: ``docs/methods.md`` and each functional's docstring.
"""
from .classification import ATSLoss, DISTLoss, DKDLoss, KDLoss, MGDLoss, SimKD
from .cross_tokenizer import HybridULDLoss, ULDLoss
from .ctkd import CosineCurriculum, GradientReversal, LearnableTemperature
from .divergence import (ABDivergenceLoss, AKLLoss, AlphaDivergenceLoss, EntropyGatedKLLoss, ForwardKLLoss,
                         JeffreysLoss, JSDLoss, RenyiLoss, ReverseKLLoss, SkewKLLoss, TriangularLoss, TVDLoss)
from .fused_linear import FusedLinearKDLoss

__all__ = [
    "KDLoss", "DKDLoss", "ATSLoss", "DISTLoss", "MGDLoss", "SimKD", "GradientReversal", "CosineCurriculum",
    "LearnableTemperature", "ForwardKLLoss", "ReverseKLLoss", "JSDLoss", "SkewKLLoss", "TVDLoss", "JeffreysLoss",
    "TriangularLoss", "EntropyGatedKLLoss", "AKLLoss", "AlphaDivergenceLoss", "ABDivergenceLoss", "RenyiLoss",
    "FusedLinearKDLoss", "ULDLoss", "HybridULDLoss",
]
