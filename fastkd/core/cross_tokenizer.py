"""The cross-tokenizer contract: ULD's result type and its argument checks (``docs/design.md``, "Across tokenizers").

Student and teacher rows pair up one to one (same leading shape) but their vocabularies may
differ (``V_s != V_t``); ``fastkd.align_tokens`` and the merge make the rows pair up when the two
tokenizers cut the text differently.
"""
from collections import namedtuple

from . import checks as v
from .vocab import VocabMap

__all__ = ["ULDParts", "HybridParts", "check_uld_args", "check_hybrid_args", "check_k"]

INPUTS = ("logits", "log_probs")
ULDParts = namedtuple("ULDParts", ["loss", "soft", "hard", "bound"])
ULDParts.__doc__ = """``return_parts=True`` result of ``uld_loss``: ``loss = soft + ce_weight * hard`` (differentiable);
``soft`` (the reduced ULD term), ``hard`` (the reduced cross-entropy, 0 without a target) and
``bound`` are detached. With ``k=K`` the exact ULD lies in ``[soft, soft + bound]`` (reduced with the
same row weights); ``k=None`` is exact and ``bound`` is 0."""


def check_k(k) -> None:
    """``k``: None (exact) or an int >= 1 (the K largest probabilities of each side compared exactly)."""
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be None or an int >= 1, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be None or an int >= 1, got {k}")


def check_uld_args(student, teacher, temperature, teacher_temperature, reduction, target, ignore_index,
                   sample_weight, ce_weight, return_parts, k, inputs="logits") -> None:
    """The checks of ``uld_loss`` / ``hybrid_uld_loss`` on every backend: logits of any two vocabulary
    sizes with the same leading shape (one student row per teacher row), on one device."""
    v.check_logits("student_logits", student)
    v.check_logits("teacher_logits", teacher)
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            "student_logits [..., V_s] and teacher_logits [..., V_t] must have the same leading shape (one "
            f"teacher row per student row; align sequences first with fastkd.align_tokens), got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on the same device, got {student.device} and {teacher.device}"
        )
    v.check_reduction(reduction)
    v.check_ignore_index(ignore_index)
    v.check_target(target, student, ignore_index, required=False)
    v.check_sample_weight(sample_weight, student)
    v.check_positive("temperature", temperature)
    if teacher_temperature is not None:
        v.check_positive("teacher_temperature", teacher_temperature)
    v.check_ce(ce_weight, return_parts, target)
    check_k(k)
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    if inputs == "log_probs" and (temperature != 1 or teacher_temperature not in (None, 1)):
        raise ValueError("inputs='log_probs' takes the rows as given: temperature and teacher_temperature must be 1 "
                         "(apply them to the logits before the log-softmax and the merge)")


HybridParts = namedtuple("HybridParts", ["loss", "soft", "hard", "matched", "unmatched"])
HybridParts.__doc__ = """``return_parts=True`` result of ``hybrid_uld_loss``: ``loss = soft + ce_weight * hard``,
``soft = w_m matched + w_u unmatched``; ``matched`` (the divergence on the matched tokens) and
``unmatched`` (ULD on the rest) reduced with the row weights, unweighted by ``w_m``, ``w_u``; all but
``loss`` detached."""


def check_hybrid_args(student, teacher, vocab_map, beta, matched_weight, unmatched_weight) -> None:
    """``hybrid_uld_loss``'s own arguments: the map against both vocabularies, ``beta``, the weights."""
    if not isinstance(vocab_map, VocabMap):
        raise TypeError(f"vocab_map must be a fastkd.VocabMap, got {type(vocab_map).__name__}")
    v.check_logits("student_logits", student)
    v.check_logits("teacher_logits", teacher)
    if teacher.shape[-1] != vocab_map.teacher_vocab_size or student.shape[-1] != vocab_map.student_vocab_size:
        raise ValueError(
            f"vocab_map maps {vocab_map.teacher_vocab_size} teacher tokens onto {vocab_map.student_vocab_size} "
            f"student tokens, but the logits have {teacher.shape[-1]} (teacher) and {student.shape[-1]} (student)"
        )
    v.check_unit("beta", beta)
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError("matched_weight and unmatched_weight must both be None (GOLD's weighting by the matched "
                         "fraction) or both numbers")
    if matched_weight is not None:
        v.check_non_negative("matched_weight", matched_weight)
        v.check_non_negative("unmatched_weight", unmatched_weight)
