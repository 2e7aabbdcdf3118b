"""Token correspondences between two vocabularies: ``VocabMap`` and ``MappedTeacher``.

``VocabMap`` holds ``teacher_to_student`` (int64 ``[V_t]``, ``-1`` where a teacher token has no
student counterpart; many teacher tokens may map to one student token). ``MappedTeacher`` stands in
for teacher logits in the divergences (``forward_kl_loss``, ``reverse_kl_loss``, ``jsd_loss``,
``skew_kl_loss``, ``tvd_loss``, ``kd_loss``): the teacher's probabilities are summed onto the matched
student tokens and the divergence runs over those tokens plus, in ``"tail"`` mode, one bucket each side
holding the rest (the teacher's unmatched mass; the student's mass on tokens no teacher token maps to).
"""
from typing import Optional, Tuple, Union

import torch

from . import checks as v
from .topk import TOPK_MODES, TopKTeacher

__all__ = ["VocabMap", "MappedTeacher"]


def _bytes_to_unicode():
    """GPT-2's byte-level alphabet: byte -> printable character (its inverse decodes ``Ġ`` to a space)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    parts = [getattr(backend, name, None) for name in ("decoder", "pre_tokenizer")]
    return any("ByteLevel" in repr(p) for p in parts if p is not None)


def token_bytes(token: str, byte_level: bool) -> bytes:
    """A vocabulary entry as the bytes it stands for: byte-level (``Ġ`` = space) decoded through GPT-2's
    alphabet; otherwise SentencePiece's ``▁`` is a space and ``<0xAB>`` (byte fallback) the byte 0xAB."""
    if byte_level and all(c in _BYTE_DECODER for c in token):
        return bytes(_BYTE_DECODER[c] for c in token)
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("\u2581", " ").encode("utf-8")


def _vocabulary(tokenizer, name: str):
    """``(strings by id, vocabulary size)`` of a ``transformers`` or ``tokenizers`` tokenizer."""
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"{name} must be a transformers or tokenizers tokenizer (with get_vocab()), "
                        f"got {type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1 if vocab else 0
    if hasattr(tokenizer, "get_vocab_size"):
        size = max(size, tokenizer.get_vocab_size())
    elif hasattr(tokenizer, "__len__"):
        size = max(size, len(tokenizer))
    return vocab, size


class VocabMap:
    """Which student token each teacher token is: ``teacher_to_student`` int64 ``[V_t]``, ``-1`` unmatched.

    ``VocabMap(teacher_to_student, student_vocab_size)`` for a hand-made map;
    ``VocabMap.from_tokenizers(student_tokenizer, teacher_tokenizer)`` matches entries by the bytes they
    stand for (byte-level ``Ġ`` and SentencePiece ``▁`` both become a space, ``<0x0A>`` byte
    fallback a byte), so ``"Ġthe"`` (GPT-2, Qwen, Llama 3) and ``"▁the"`` (Llama 2, Mistral) match.
    Several teacher entries with the same bytes all map to the student's (lowest) id: many to one.

    ``matched_fraction``: the share of teacher tokens with a student counterpart (GOLD's hybrid weight).
    TRL's GOLD matches the raw strings of ``get_vocab()`` (``"Ġthe"`` never matches ``"▁the"``).
    """

    def __init__(self, teacher_to_student: torch.Tensor, student_vocab_size: int):
        if not isinstance(teacher_to_student, torch.Tensor) or teacher_to_student.dtype != torch.int64:
            raise TypeError("teacher_to_student must be an int64 tensor [V_t] of student ids (-1: unmatched), got "
                            f"{getattr(teacher_to_student, 'dtype', type(teacher_to_student).__name__)}")
        if teacher_to_student.dim() != 1 or teacher_to_student.numel() == 0:
            raise ValueError(f"teacher_to_student must have shape [V_t], V_t >= 1, got {tuple(teacher_to_student.shape)}")
        v.check_int("student_vocab_size", student_vocab_size)
        lo, hi = int(teacher_to_student.min()), int(teacher_to_student.max())
        if lo < -1 or hi >= student_vocab_size:
            raise ValueError(f"teacher_to_student has student id {lo if lo < -1 else hi} outside [-1, "
                             f"{student_vocab_size}) (-1 marks an unmatched teacher token)")
        if hi < 0:
            raise ValueError("teacher_to_student matches no token (every entry is -1): nothing to compare; "
                             "use fastkd.uld_loss, which needs no token correspondence")
        self.teacher_to_student = teacher_to_student
        self.student_vocab_size = int(student_vocab_size)
        matched = teacher_to_student >= 0
        self.matched_teacher = matched.nonzero().squeeze(1)  # teacher ids with a counterpart
        self.student_ids, bucket = torch.unique(teacher_to_student[matched], return_inverse=True)
        self.bucket = bucket  # [matched teacher tokens]: index into student_ids
        # the ids on neither side of a match (the hybrid's ULD terms), found once here: a loss call on a GPU
        # would synchronise the host to find them (data-dependent sizes)
        self.unmatched_teacher = (~matched).nonzero().squeeze(1)
        hit = torch.zeros(self.student_vocab_size, dtype=torch.bool, device=teacher_to_student.device)
        hit[self.student_ids] = True
        self.unmatched_student = (~hit).nonzero().squeeze(1)

    @property
    def teacher_vocab_size(self) -> int:
        return self.teacher_to_student.numel()

    @property
    def matched_fraction(self) -> float:
        return self.matched_teacher.numel() / self.teacher_vocab_size

    def to(self, device) -> "VocabMap":
        return VocabMap(self.teacher_to_student.to(device), self.student_vocab_size)

    @classmethod
    def from_tokenizers(cls, student_tokenizer, teacher_tokenizer) -> "VocabMap":
        student_vocab, student_size = _vocabulary(student_tokenizer, "student_tokenizer")
        teacher_vocab, teacher_size = _vocabulary(teacher_tokenizer, "teacher_tokenizer")
        s_bytes, t_bytes = _is_byte_level(student_tokenizer), _is_byte_level(teacher_tokenizer)
        by_bytes = {}
        for token, sid in sorted(student_vocab.items(), key=lambda kv: kv[1]):
            by_bytes.setdefault(token_bytes(token, s_bytes), sid)
        table = torch.full((teacher_size,), -1, dtype=torch.int64)
        for token, tid in teacher_vocab.items():
            table[tid] = by_bytes.get(token_bytes(token, t_bytes), -1)
        if not bool((table >= 0).any()):
            raise ValueError("the two tokenizers share no token (after normalising the Ġ and ▁ space markers); "
                             "use fastkd.uld_loss, which needs no token correspondence")
        return cls(table, student_size)

    def __repr__(self) -> str:
        return (f"VocabMap(V_t={self.teacher_vocab_size}, V_s={self.student_vocab_size}, "
                f"matched={self.matched_teacher.numel()} ({self.matched_fraction:.1%}), "
                f"student tokens hit={self.student_ids.numel()})")


class _MappedTopK(TopKTeacher):
    """The projected teacher as top-k buckets: its ids are the map's distinct student ids (valid by
    construction), so only the layout is checked (a value check would sort ``[N, V_m]`` ids per call)."""

    def check_against(self, student, read) -> None:
        self.check_layout(student)


class MappedTeacher:
    """A teacher with another vocabulary, seen through a ``VocabMap``: ``MappedTeacher(teacher, vocab_map)``.

    ``teacher``: logits ``[..., V_t]``, or a ``(hidden [..., H], weight [V_t, H])`` pair (projected here).
    Per row, ``p = softmax(t / T)`` (T: the loss's temperature) is summed onto the matched student ids,
    ``P_j = sum_{c : map(c) = j} p_c``. ``mode="tail"`` (default): the buckets are those ids plus a tail,
    ``P_tail = 1 - sum_j P_j`` (the unmatched teacher mass) against the student's mass on every other id
    (as ``TopKTeacher(mode="tail")``); ``"renormalize"``: both renormalised over the matched ids.
    The student's log-probs come from its whole vocabulary, its gradient is dense. The teacher's tail is
    ``1 - sum_j P_j`` (as ``TopKTeacher``'s): where the student has no unmatched token but the teacher
    does, its tail faces an empty student bucket (forward KL infinite): use ``"renormalize"`` there. A map
    that matches every token on both sides runs as ``"renormalize"`` (the same pair, no rounding residue).

    Implemented as a ``TopKTeacher`` over the ``V_m`` matched student ids (every divergence backend runs
    it, the fused ones included). A constant teacher on a fused backend is projected one block of rows at
    a time (``fastkd.losses.teacher_blocks``; for a pair, the block's logits by one matmul): no ``[N, V_m]``
    (nor ``[N, V_t]``) tensor. A teacher that requires grad, and the reference, form the whole projection
    (PyTorch, differentiable in the teacher). The projection is not inside the row op's kernel.
    ``fastkd.fused_linear_kd_loss`` takes it too and projects it chunk by chunk (a constant teacher there).
    """

    def __init__(self, teacher: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], vocab_map: VocabMap, *,
                 mode: str = "tail"):
        if not isinstance(vocab_map, VocabMap):
            raise TypeError(f"vocab_map must be a fastkd.VocabMap, got {type(vocab_map).__name__}")
        if mode not in TOPK_MODES:
            raise ValueError(f"mode must be one of {TOPK_MODES}, got {mode!r}")
        if isinstance(teacher, (tuple, list)):
            if len(teacher) != 2:
                raise ValueError("teacher must be logits [..., V_t] or a (hidden, weight) pair")
            v.check_logits("teacher hidden", teacher[0])
            v.check_matrix("teacher weight", teacher[1], 2)
            if teacher[1].shape[1] != teacher[0].shape[-1]:
                raise ValueError(f"teacher weight [V_t, H] must match the hidden size {teacher[0].shape[-1]}, "
                                 f"got {tuple(teacher[1].shape)}")
            width, device = teacher[1].shape[0], teacher[0].device
        else:
            v.check_logits("teacher_logits", teacher)
            width, device = teacher.shape[-1], teacher.device
        if width != vocab_map.teacher_vocab_size:
            raise ValueError(f"the teacher has {width} classes but vocab_map maps {vocab_map.teacher_vocab_size} "
                             "teacher tokens")
        if vocab_map.teacher_to_student.device != device:
            vocab_map = vocab_map.to(device)
        self.teacher, self.vocab_map, self.mode = teacher, vocab_map, mode

    def logits(self) -> torch.Tensor:
        if isinstance(self.teacher, torch.Tensor):
            return self.teacher
        hidden, weight = self.teacher
        return hidden @ weight.t()

    def check_against(self, student: torch.Tensor) -> None:
        v.check_logits("student_logits", student)
        hidden = self.teacher if isinstance(self.teacher, torch.Tensor) else self.teacher[0]
        if tuple(hidden.shape[:-1]) != tuple(student.shape[:-1]):
            raise ValueError(f"MappedTeacher must have the leading shape of student_logits {tuple(student.shape[:-1])}, "
                             f"got {tuple(hidden.shape[:-1])}")
        if hidden.device != student.device:
            raise ValueError(f"MappedTeacher must be on the student_logits' device {student.device}, got {hidden.device}")
        if student.shape[-1] != self.vocab_map.student_vocab_size:
            raise ValueError(f"student_logits has {student.shape[-1]} classes but vocab_map maps onto "
                             f"{self.vocab_map.student_vocab_size} student tokens")

    def projected_probs(self, temperature: float, dtype: Optional[torch.dtype] = None,
                        logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``P [..., V_m]``: the teacher's probabilities (of ``logits``, default its own) summed onto the
        matched student ids (``student_ids``)."""
        t = self.logits() if logits is None else logits
        dtype = dtype or torch.promote_types(t.dtype, torch.float32)
        vm = self.vocab_map
        p = torch.softmax(t.to(dtype) / temperature, dim=-1)
        out = p.new_zeros(p.shape[:-1] + (vm.student_ids.numel(),))
        return out.index_add(-1, vm.bucket, p.index_select(-1, vm.matched_teacher))

    @property
    def topk_mode(self) -> str:
        """The buckets' mode: ``mode``, or ``"renormalize"`` when every token is matched on both sides (both
        tails are then exactly empty, which "tail" mode would see as the rounding residue of ``1 - sum P``: an
        infinite forward KL against the student's exact 0; renormalising is the same pair, exactly)."""
        vm = self.vocab_map
        whole = vm.student_ids.numel() == vm.student_vocab_size and vm.matched_teacher.numel() == vm.teacher_vocab_size
        return "renormalize" if whole else self.mode

    def as_topk(self, temperature: float) -> TopKTeacher:
        """This teacher as top-k buckets over the matched student ids, at ``temperature``."""
        probs = self.projected_probs(temperature)
        ids = self.vocab_map.student_ids.expand(probs.shape)
        return _MappedTopK(ids, probs.log(), mode=self.topk_mode)

    def __repr__(self) -> str:
        return f"MappedTeacher({self.vocab_map!r}, mode={self.mode!r})"
