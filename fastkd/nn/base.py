"""``RowLoss``: what every module of a row loss (KD, DKD, ATS, the divergences) holds."""
from typing import Optional

import torch
from torch import nn

from ..core import checks as v


class RowLoss(nn.Module):
    """The row options of a logit loss, checked at construction (a bad one fails early; the
    functional checks again per call) and passed to the functional at each call."""

    def __init__(self, reduction: str, ignore_index: int, ce_weight: float, return_parts: bool, backend: str,
                 process_group):
        super().__init__()
        v.check_row_args(reduction, ignore_index, backend)
        v.check_ce(ce_weight, return_parts, target=0)  # the target comes with each call
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.return_parts = return_parts
        self.backend = backend
        self.process_group = process_group

    def row_options(self, sample_weight: Optional[torch.Tensor]) -> dict:
        """The keyword arguments of the functional that every call passes."""
        return dict(reduction=self.reduction, ignore_index=self.ignore_index, sample_weight=sample_weight,
                    ce_weight=self.ce_weight, return_parts=self.return_parts, process_group=self.process_group,
                    backend=self.backend)
