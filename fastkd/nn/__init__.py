"""``torch.nn.Module`` wrappers of the fastkd losses, and the trainable parts some methods need.

Logit losses (hold the hyper-parameters, call ``fastkd.functional``):
``KDLoss``, ``DKDLoss`` (with mdistiller's warm-up), ``ATSLoss``, ``DISTLoss``.

Feature methods (own their trainable layers):
``MGDLoss`` (align + generation block), ``SimKD`` (projector + the teacher's classifier).

CTKD (curriculum temperature): ``GradientReversal``, ``CosineCurriculum`` and
``LearnableTemperature``, whose output is passed as ``temperature`` to ``KDLoss``::

    temp = LearnableTemperature()
    curriculum = CosineCurriculum(epochs=10)
    kd = KDLoss()
    ...
    T = temp(lambda_=curriculum(epoch))
    loss = ce + kd(student_logits, teacher_logits, temperature=T)

Formulas and semantics: ``docs/methods.md`` and each functional's docstring.

By family: ``classification`` (logit losses, feature methods), ``ctkd`` (curriculum
temperature), ``divergence`` (language-model divergences), ``fused_linear`` (the LM head
fused with the loss).
"""
from .classification import ATSLoss, DISTLoss, DKDLoss, KDLoss, MGDLoss, SimKD
from .ctkd import CosineCurriculum, GradientReversal, LearnableTemperature
from .divergence import JSDLoss, ReverseKLLoss, SkewKLLoss, TVDLoss
from .fused_linear import FusedLinearKDLoss

__all__ = [
    "KDLoss", "DKDLoss", "ATSLoss", "DISTLoss", "MGDLoss", "SimKD", "GradientReversal", "CosineCurriculum",
    "LearnableTemperature", "ReverseKLLoss", "JSDLoss", "SkewKLLoss", "TVDLoss", "FusedLinearKDLoss",
]
