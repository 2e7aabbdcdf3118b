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

__all__ = ["TopKTeacher", "TOPK_MODES", "TOPK_MAX", "topk_rows", "check_topk_k"]

TOPK_MODES = ("tail", "renormalize")
# The largest k of fastkd.topk_from_logits / fastkd.teacher_topk on every backend (csrc/cpu/topk.cpp's
# kTopkMax and the Triton kernel's sort width follow it): the Triton kernel sorts 2 * next_pow2(k) keys
# per merge, which stays in registers / shared memory up to 2048.
TOPK_MAX = 1024
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

    ``tail_logprob [...]`` (optional, float; None by default): the log of the teacher's mass outside
    the row's top-k, summed over the non-members themselves (``fastkd.teacher_topk`` and
    ``fastkd.topk_from_logits`` give it; exact where ``log(1 - sum_k exp(logprobs[k]))`` cancels,
    that is when the top-k hold nearly all the mass). It is carried for storage and for users; the
    losses do not read it: they keep deriving the teacher's tail bucket from ``logprobs`` as above.
    """

    def __init__(self, indices: torch.Tensor, logprobs: torch.Tensor, *, mode: str = "tail",
                 tail_logprob: Optional[torch.Tensor] = None):
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
        if tail_logprob is not None:
            if not isinstance(tail_logprob, torch.Tensor) or tail_logprob.dtype not in v.FLOAT_DTYPES:
                raise TypeError(f"tail_logprob must be None or a floating tensor [...], got "
                                f"{getattr(tail_logprob, 'dtype', type(tail_logprob).__name__)}")
            if tuple(tail_logprob.shape) != tuple(indices.shape[:-1]):
                raise ValueError(f"tail_logprob must have the leading shape of indices {tuple(indices.shape[:-1])}, "
                                 f"got {tuple(tail_logprob.shape)}")
            if tail_logprob.device != indices.device:
                raise ValueError(f"tail_logprob must be on the indices' device {indices.device}, "
                                 f"got {tail_logprob.device}")
        self.indices = indices
        self.logprobs = logprobs
        self.mode = mode
        self.tail_logprob = tail_logprob

    @classmethod
    def from_logits(cls, teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0,
                    mode: str = "tail") -> "TopKTeacher":
        """The top-k of ``log_softmax(teacher_logits / temperature)`` (for tests and online teachers).

        The definition of ``fastkd.topk_from_logits`` (``topk_rows``: ties to the lower id, the exact
        ``tail_logprob``), in plain PyTorch; log-probs in ``teacher_logits``' dtype."""
        v.check_logits("teacher_logits", teacher_logits)
        v.check_positive("temperature", temperature)
        check_topk_k(k, teacher_logits.shape[-1], limit=None)
        lead = tuple(teacher_logits.shape[:-1])
        ids, logprobs, tail, _ = topk_rows(teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]), k,
                                           float(temperature))
        return cls(ids.reshape(lead + (k,)), logprobs.to(teacher_logits.dtype).reshape(lead + (k,)), mode=mode,
                   tail_logprob=tail.reshape(lead))

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


def check_topk_k(k, width: int, limit: Optional[int] = TOPK_MAX) -> None:
    """``k``: an int in ``[1, width]`` (the row width), and at most ``limit`` (the kernels' TOPK_MAX)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width:
        raise ValueError(f"k must be an int in [1, {width}] (the vocabulary size), got {k!r}")
    if limit is not None and k > limit:
        raise ValueError(f"k = {k} is over the top-k kernels' limit of {limit} (fastkd.core.topk.TOPK_MAX)")


def topk_rows(logits: torch.Tensor, k: int, temperature: float):
    """The definition of a row's top-k (every backend of ``fastkd.topk_from_logits`` matches it).

    ``logits [N, V]`` (any float dtype; math in float64 for float64 input, else float32) ->
    ``(ids [N, k] int64, logprobs [N, k], tail [N], stats [N, 2])`` with, per row, ``x`` the logits:

    * ``ids``: the k largest ``x`` (raw logits: the temperature does not change the order), in
      descending order; equal values rank by the lower id (so every backend gives the same ids);
      NaN ranks as -inf (its row's log-probs are NaN anyway); -0.0 equals 0.0.
    * ``logprobs = x[ids] / T - lse(x / T)`` (normalised over the whole row).
    * ``tail = log(sum over the non-members c of exp(x_c / T)) - lse(x / T)``: the log of the mass
      outside the top-k, summed over the non-members (never ``log1p(-sum exp(logprobs))``, which
      cancels when the top-k hold nearly all the mass); ``-inf`` when ``k == V``.
    * ``stats = (M, log z)``: the row's raw maximum and ``log sum exp((x - b) / T)`` with ``b = M``
      (0 when ``M = -inf``), so ``lse(x / T) = b / T + log z`` (the sharded merge's per-rank numbers).

    As ``log_softmax``, a row with a NaN or +inf logit, or with every logit -inf, gives NaN
    log-probs and tail. A plain-PyTorch oracle: a stable full sort of each row and ``[N, V]``
    temporaries (the kernels keep a running top-k and the online log-sum-exp instead).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype)
    rank = torch.where(torch.isnan(x), float("-inf"), x) + 0.0  # + 0.0: -0.0 becomes 0.0
    ids = torch.sort(rank, dim=1, descending=True, stable=True).indices[:, :k]
    top = torch.amax(x, dim=1, keepdim=True)
    top = torch.where(torch.isnan(top), float("-inf"), top)  # amax propagates NaN; the kernels skip it
    base = torch.where(top == float("-inf"), 0.0, top)
    shifted = (x - base) / temperature
    log_z = torch.logsumexp(shifted, dim=1, keepdim=True)
    logprobs = (x.gather(1, ids) - top) / temperature - log_z
    member = torch.zeros_like(x, dtype=torch.bool).scatter_(1, ids, True)
    tail = torch.logsumexp(shifted.masked_fill(member, float("-inf")), dim=1) - log_z.squeeze(1)
    return ids, logprobs, tail, torch.cat([top, log_z], dim=1)
