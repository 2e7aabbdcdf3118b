"""Top-k teacher log-probs: what an inference engine (vLLM, SGLang) serves or an offline store keeps.

``TopKTeacher(indices, logprobs, mode=...)`` stands in for dense teacher logits
as the ``t`` of ``kd_loss``, ``reverse_kl_loss``, ``jsd_loss``, ``skew_kl_loss``
and ``tvd_loss`` (and their modules). Per row (token) it holds K vocabulary ids
and the teacher's log-probabilities of them, already at the distillation
temperature (they are taken as given; ``temperature`` divides the student
logits only).

Structure (shapes, dtypes, devices, mode) is checked here, at construction.
Values are checked at the loss call, where the vocabulary size is known and only
on the rows the loss reads (rows whose target is ``ignore_index`` or whose
sample weight is 0 are never read, so padding tokens may hold anything): ids in
``[-1, V)`` and distinct within a row. Like the other value checks, this runs on
CPU tensors, and on GPU tensors only with ``fastkd.set_value_checks(True)``
(reading values back would synchronise every step); unchecked bad ids there give
an undefined result.
"""
from typing import Optional

import torch

from . import checks as v

__all__ = ["TopKTeacher", "TOPK_MODES"]

TOPK_MODES = ("tail", "renormalize")
# The id of a padding slot (a row with fewer than K ids): it carries no mass and its log-prob is never read.
PAD_ID = -1


class TopKTeacher:
    """Per-token top-k teacher log-probs, ``indices [..., K]`` int64 and ``logprobs [..., K]`` float.

    ``mode="tail"`` (default; TRL's ``loss_add_tail``, Megatron's "ghost token"):
    teacher and student each get one more bucket holding the remaining mass,
    ``p_tail = max(0, 1 - sum_k exp(logprobs[k]))`` and
    ``q_tail = 1 - sum_k q[indices[k]]`` (computed as a log-sum-exp over the ids
    outside the top-k, so it is exact however small), and the divergence is taken
    over the K + 1 buckets.

    ``mode="renormalize"`` (axolotl's ``kd_normalize_topk``): both distributions
    are renormalised over the K ids.

    The student's log-probs come from its logsumexp over the whole vocabulary, so
    its gradient is dense (in ``"renormalize"`` mode it is exactly 0 outside the
    K ids, as the renormalised loss does not depend on them).

    ``indices`` of ``-1`` mark padding slots (rows with fewer than K ids): no
    mass on either side, their ``logprobs`` entries are never read. A row of
    padding only has loss 0 (to rounding) and gradient 0.
    """

    def __init__(self, indices: torch.Tensor, logprobs: torch.Tensor, *, mode: str = "tail"):
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor of token ids, got {type(indices).__name__}")
        if indices.dtype != torch.int64:
            raise TypeError(f"indices must be an int64 tensor of token ids, got {indices.dtype}")
        if not isinstance(logprobs, torch.Tensor):
            raise TypeError(f"logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
        if logprobs.dtype not in v.FLOAT_DTYPES:
            raise TypeError(
                f"logprobs must be a floating tensor (float32, float16, bfloat16 or float64), got {logprobs.dtype}"
            )
        if indices.dim() < 1 or indices.shape[-1] == 0:
            raise ValueError(f"indices must have shape [..., K] with K >= 1, got {tuple(indices.shape)}")
        if indices.shape != logprobs.shape:
            raise ValueError(
                f"indices and logprobs must have the same shape [..., K], "
                f"got {tuple(indices.shape)} and {tuple(logprobs.shape)}"
            )
        if indices.device != logprobs.device:
            raise ValueError(
                f"indices and logprobs must be on the same device, got {indices.device} and {logprobs.device}"
            )
        if mode not in TOPK_MODES:
            raise ValueError(f"mode must be one of {TOPK_MODES}, got {mode!r}")
        self.indices = indices
        self.logprobs = logprobs
        self.mode = mode

    @classmethod
    def from_logits(cls, teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0,
                    mode: str = "tail") -> "TopKTeacher":
        """The top-k of ``log_softmax(teacher_logits / temperature)`` (for tests and online teachers)."""
        v.check_logits("teacher_logits", teacher_logits)
        v.check_positive("temperature", temperature)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= teacher_logits.shape[-1]:
            raise ValueError(f"k must be an int in [1, {teacher_logits.shape[-1]}], got {k!r}")
        log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
        values, ids = log_p.topk(k, dim=-1)
        return cls(ids, values.to(teacher_logits.dtype), mode=mode)

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def check_layout(self, student: torch.Tensor) -> None:
        """The leading shape and device of this teacher against the student logits ``[..., V]``."""
        lead = tuple(student.shape[:-1])
        if tuple(self.indices.shape[:-1]) != lead:
            raise ValueError(
                f"TopKTeacher indices [..., K] must have the leading shape of student_logits {lead}, "
                f"got {tuple(self.indices.shape)}"
            )
        if self.device != student.device:
            raise ValueError(
                f"TopKTeacher must be on the student_logits' device {student.device}, got {self.device}"
            )

    def check_against(self, student: torch.Tensor, read: Optional[torch.Tensor]) -> None:
        """Check this teacher against the student logits ``[..., V]`` it is compared with.

        ``read``: bool ``[N]`` of the rows the loss reads (None: all), or the
        result of not reading values (then only shapes are checked).
        """
        self.check_layout(student)
        if not v.reads_values(self.indices) or self.indices.numel() == 0:
            return
        ids = self.indices.reshape(-1, self.k)
        if read is not None:
            ids = ids[read]
        if ids.numel() == 0:
            return
        num_classes = student.shape[-1]
        lo, hi = int(ids.min()), int(ids.max())
        if lo < PAD_ID or hi >= num_classes:
            bad = lo if lo < PAD_ID else hi
            raise ValueError(
                f"TopKTeacher indices has token id {bad} outside [0, {num_classes}) "
                f"(the student's vocabulary; -1 marks a padding slot)"
            )
        ordered = ids.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != PAD_ID)
        if bool(repeated.any()):
            row = int(repeated.any(dim=1).nonzero()[0])
            token = int(ordered[row, 1:][repeated[row]][0])
            raise ValueError(
                f"TopKTeacher indices must be distinct within a row; a read row repeats token id {token}"
            )

    def __repr__(self) -> str:
        return (f"TopKTeacher(shape={tuple(self.indices.shape)}, logprobs={self.logprobs.dtype}, "
                f"mode={self.mode!r}, device={self.device})")
