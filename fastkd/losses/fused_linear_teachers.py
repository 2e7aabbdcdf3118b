"""The teacher of ``fastkd.fused_linear_kd_loss``: its forms checked and taken apart, and its options.

A teacher is a ``(teacher_hidden, teacher_weight)`` pair, ``(teacher_hidden, None)`` (a shared head:
the student's weight and bias), dense logits, a ``fastkd.TopKTeacher``, a ``fastkd.TeacherMixture`` or a
``fastkd.MappedTeacher`` (another tokenizer's teacher, projected onto the student's ids per chunk).
``teacher_temperature`` becomes a factor on the teacher's logits (``temperature / teacher_temperature``:
the row op divides both sides by ``temperature``), applied per chunk; ``teacher_grad=True`` lets the
teacher's tensors receive gradients (the row op's teacher-logit gradient, through the teacher's matmuls).
"""
import torch

from ..core import checks as v
from ..core.mixture import TeacherMixture, check_mixture, mixture_vocab
from ..core.topk import TopKTeacher
from ..core.vocab import MappedTeacher

__all__ = ["teacher_parts", "teacher_scale_of", "mixture_vocab", "mapped_rows"]


def mapped_rows(mapped: MappedTeacher) -> torch.Tensor:
    """The tensor whose leading dims are a ``MappedTeacher``'s rows: its hidden states or its logits."""
    return mapped.teacher[0] if isinstance(mapped.teacher, (tuple, list)) else mapped.teacher


def teacher_parts(teacher, teacher_bias, lead, dev, vocab: int, student_weight):
    """``teacher`` checked and taken apart: (kind, V_t, hidden, weight, logits, top-k, mixture, mapped); the
    absent parts None. A ``(teacher_hidden, None)`` pair is a shared head: its weight is ``student_weight``."""
    teacher_hidden = teacher_weight = teacher_logits = topk = mixture = mapped = None
    if isinstance(teacher, MappedTeacher):  # another tokenizer: projected onto the student's ids per chunk
        mapped = teacher
        teacher.check_against(student_weight.new_empty(()).expand(*lead, vocab))
        teacher_kind, teacher_vocab = "mapped", vocab
    elif isinstance(teacher, TeacherMixture):
        mixture = teacher
        teacher_kind, teacher_vocab = "mixture", check_mixture(teacher, lead, dev)
        if teacher_bias is not None:
            raise ValueError("teacher_bias is not used with a TeacherMixture: give each member's bias as "
                             "(teacher_hidden, teacher_weight, teacher_bias)")
    elif isinstance(teacher, TopKTeacher):
        topk = teacher
        teacher_kind, teacher_vocab = "topk", vocab
    elif isinstance(teacher, (tuple, list)):
        if len(teacher) != 2:
            raise ValueError(f"teacher as a tuple must be (teacher_hidden, teacher_weight), got {len(teacher)} items")
        teacher_hidden, teacher_weight = teacher
        if teacher_weight is None:  # a shared head
            if teacher_bias is not None:
                raise ValueError("teacher_bias must be None with a shared head (teacher=(teacher_hidden, None)): "
                                 "the teacher uses student_weight and student_bias")
            teacher_weight = student_weight
        v.check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, lead, dev)
        teacher_kind, teacher_vocab = "pair", teacher_weight.shape[0]
    elif isinstance(teacher, torch.Tensor):
        v.check_logits("teacher", teacher)
        teacher_logits = teacher
        if tuple(teacher.shape[:-1]) != lead:
            raise ValueError(f"teacher logits [..., V_t] must have the leading shape of student_hidden {lead}, "
                             f"got {tuple(teacher.shape)}")
        v.check_same_device("teacher", teacher, dev)
        teacher_kind, teacher_vocab = "logits", teacher.shape[-1]
    else:
        raise TypeError("teacher must be a (teacher_hidden, teacher_weight) pair, (teacher_hidden, None) for a "
                        "shared head, teacher logits [..., V_t], a fastkd.TopKTeacher, a fastkd.TeacherMixture or a "
                        f"fastkd.MappedTeacher, got {type(teacher).__name__}")
    return teacher_kind, teacher_vocab, teacher_hidden, teacher_weight, teacher_logits, topk, mixture, mapped


def teacher_scale_of(temperature, teacher_temperature, teacher_grad, teacher_kind: str, process_group) -> float:
    """``temperature / teacher_temperature``, the factor on the teacher's logits; and the teacher options' checks."""
    if not isinstance(teacher_grad, bool):
        raise TypeError(f"teacher_grad must be a bool, got {type(teacher_grad).__name__}")
    names = {"topk": "TopKTeacher", "mixture": "TeacherMixture", "mapped": "MappedTeacher"}
    if teacher_grad and teacher_kind in names:
        raise ValueError("teacher_grad=True needs a (teacher_hidden, teacher_weight) pair or teacher logits, got a "
                         f"{names[teacher_kind]}")
    if teacher_kind == "mapped" and process_group is not None:
        raise ValueError("a MappedTeacher is not supported with process_group yet (its projection needs the "
                         "teacher's whole vocabulary on each rank)")
    if teacher_temperature is None:
        return 1.0
    v.check_positive("teacher_temperature", teacher_temperature)
    if teacher_kind == "topk":
        raise ValueError("teacher_temperature does not apply to a TopKTeacher: its log-probs are taken as given "
                         "(at the temperature they were computed at); leave it None")
    return float(temperature) / float(teacher_temperature)
