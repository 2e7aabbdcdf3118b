"""Modules of the cross-tokenizer losses: ``ULDLoss``, ``HybridULDLoss`` (the keyword arguments at construction)."""
from typing import Optional

import torch

from .. import functional
from ..core import checks as v
from ..core.cross_tokenizer import check_k
from ..core.vocab import VocabMap
from .base import RowLoss


class ULDLoss(RowLoss):
    """Universal Logit Distillation: per row ``sum_i |sort(q)_i - sort(p)_i|`` over vocabularies of any sizes.

    ``forward(student_logits [..., V_s], teacher_logits [..., V_t], target=None, sample_weight=None)``.
    Arguments and semantics: ``fastkd.uld_loss`` (``k`` for the top-K version with its bound).
    """

    def __init__(self, *, temperature: float = 1.0, teacher_temperature: Optional[float] = None,
                 reduction: str = "batchmean", ignore_index: int = -100, ce_weight: float = 0.0,
                 return_parts: bool = False, k: Optional[int] = None, backend: str = "auto"):
        v.check_positive("temperature", temperature)
        if teacher_temperature is not None:
            v.check_positive("teacher_temperature", teacher_temperature)
        check_k(k)
        super().__init__(reduction, ignore_index, ce_weight, return_parts, backend, None)
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.k = k

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None, sample_weight: Optional[torch.Tensor] = None):
        options = self.row_options(sample_weight)
        del options["process_group"]
        return functional.uld_loss(student_logits, teacher_logits, temperature=self.temperature,
                                   teacher_temperature=self.teacher_temperature, target=target, k=self.k, **options)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, teacher_temperature={self.teacher_temperature}, k={self.k}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, ce_weight={self.ce_weight}, "
                f"return_parts={self.return_parts}, backend={self.backend!r}")


class HybridULDLoss(RowLoss):
    """GOLD's hybrid: a generalised JSD on the tokens ``vocab_map`` matches, ULD on the rest.

    ``forward(student_logits [..., V_s], teacher_logits [..., V_t], target=None, sample_weight=None)``.
    Arguments and semantics: ``fastkd.hybrid_uld_loss``.
    """

    def __init__(self, vocab_map, *, beta: float = 0.5, matched_weight: Optional[float] = None,
                 unmatched_weight: Optional[float] = None, temperature: float = 1.0,
                 teacher_temperature: Optional[float] = None, reduction: str = "batchmean", ignore_index: int = -100,
                 ce_weight: float = 0.0, return_parts: bool = False, backend: str = "auto"):
        if not isinstance(vocab_map, VocabMap):
            raise TypeError(f"vocab_map must be a fastkd.VocabMap, got {type(vocab_map).__name__}")
        v.check_unit("beta", beta)
        v.check_positive("temperature", temperature)
        if teacher_temperature is not None:
            v.check_positive("teacher_temperature", teacher_temperature)
        super().__init__(reduction, ignore_index, ce_weight, return_parts, backend, None)
        self.vocab_map = vocab_map
        self.beta, self.matched_weight, self.unmatched_weight = beta, matched_weight, unmatched_weight
        self.temperature, self.teacher_temperature = temperature, teacher_temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None, sample_weight: Optional[torch.Tensor] = None):
        options = self.row_options(sample_weight)
        del options["process_group"]
        return functional.hybrid_uld_loss(student_logits, teacher_logits, self.vocab_map, beta=self.beta,
                                          matched_weight=self.matched_weight, unmatched_weight=self.unmatched_weight,
                                          temperature=self.temperature, teacher_temperature=self.teacher_temperature,
                                          target=target, **options)

    def extra_repr(self) -> str:
        return (f"{self.vocab_map!r}, beta={self.beta}, matched_weight={self.matched_weight}, "
                f"unmatched_weight={self.unmatched_weight}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
