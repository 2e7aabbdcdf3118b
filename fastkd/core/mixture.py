"""Several teachers as one (``fastkd.TeacherMixture``), for ``fastkd.fused_linear_kd_loss`` and the logit
losses (every divergence and ``kd_loss``: ``fastkd/losses/teacher_blocks.py``).

Per row, with ``p_i = softmax(t_i / T_t)`` the members' distributions (``T_t`` the teacher
temperature) and weights ``w_i``::

    arithmetic:  p = sum_i w_i p_i                    (w normalised to sum 1)
    geometric:   p = prod_i p_i^(w_i) / Z             (Z normalises; w as given)

Both are formed in log space, one chunk of rows at a time, inside the fused head's loop:
``log p = logsumexp_i(log w_i + log p_i)`` (arithmetic) or ``sum_i w_i log p_i`` (geometric, the
``log Z`` left to the row op's softmax). The chunk's mixed log-probs, times the distillation
temperature ``T``, are the teacher logits the row op takes (``softmax(T log p / T) = p``), so the
mixture never exists as an ``[N, V]`` tensor: only one ``[chunk, V]`` block per member at a time.
"""
import math
from typing import Callable, Optional, Sequence

import torch

__all__ = ["TeacherMixture", "MIXTURE_MODES", "MIXTURE_MODE_CODES", "mix_log_probs", "check_mixture", "mixture_vocab"]

MIXTURE_MODES = ("arithmetic", "geometric")
# divergence_fwd's mixture_mode (docs/design.md): 0 is no mixture
MIXTURE_MODE_CODES = {"arithmetic": 1, "geometric": 2}


class TeacherMixture:
    """Teachers ``[t_1, ..., t_m]`` mixed with ``weights`` (default equal) by ``mode``.

    Each member is a ``(teacher_hidden [..., H_i], teacher_weight [V_t, H_i])`` pair (a head
    each, or ``(hidden, weight, bias)``) or dense teacher logits ``[..., V_t]``; every member
    has the same vocabulary ``V_t`` and the student's leading shape (checked at the loss call).
    ``mode="arithmetic"``: ``p = sum_i w_i p_i`` (``weights`` normalised to sum 1): the mixture
    covers every member's modes. ``mode="geometric"``: ``p`` proportional to
    ``prod_i p_i^(w_i)`` (``weights`` as given): the members' agreement, sharper than each.
    The members are constants (no gradient reaches them). The logit losses (every divergence,
    ``kd_loss``) take a mixture of dense logits in place of ``teacher_logits`` and form it one block
    of rows at a time as well (``fastkd.losses.teacher_blocks``); ``fused_linear_kd_loss`` takes
    pairs and logits.
    """

    def __init__(self, teachers: Sequence, weights: Optional[Sequence[float]] = None, mode: str = "arithmetic"):
        if isinstance(teachers, (torch.Tensor, TeacherMixture)) or not isinstance(teachers, (list, tuple)):
            raise TypeError("teachers must be a list of (teacher_hidden, teacher_weight) pairs or teacher logits "
                            f"tensors, got {type(teachers).__name__}")
        if len(teachers) == 0:
            raise ValueError("teachers is empty: a TeacherMixture needs at least one teacher")
        if mode not in MIXTURE_MODES:
            raise ValueError(f"mode must be one of {MIXTURE_MODES}, got {mode!r}")
        members = []
        for i, t in enumerate(teachers):
            if isinstance(t, torch.Tensor):
                members.append(("logits", t))
            elif isinstance(t, (list, tuple)) and len(t) in (2, 3) and all(
                    x is None or isinstance(x, torch.Tensor) for x in t) and t[0] is not None and t[1] is not None:
                members.append(("pair", t[0], t[1], t[2] if len(t) == 3 else None))
            else:
                raise TypeError(f"teachers[{i}] must be teacher logits [..., V_t] or a (teacher_hidden, "
                                f"teacher_weight[, teacher_bias]) tuple of tensors, got {type(t).__name__}")
        if weights is None:
            weights = [1.0 / len(members)] * len(members) if mode == "arithmetic" else [1.0] * len(members)
        given = weights
        weights = [float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) else None
                   for w in (weights if isinstance(weights, (list, tuple)) else [None])]
        if len(weights) != len(members) or any(w is None or not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"weights must be a list of {len(members)} positive finite Python numbers (one per "
                             f"teacher), got {given!r}")
        if mode == "arithmetic":
            total = sum(weights)
            weights = [w / total for w in weights]
        self.members, self.weights, self.mode = members, weights, mode

    def truncated(self, vocab: int) -> "TeacherMixture":
        """The same mixture over the first ``vocab`` classes of every member (``teacher_vocab="truncate"``)."""
        out = TeacherMixture.__new__(TeacherMixture)
        out.members = [("logits", m[1][..., :vocab]) if m[0] == "logits" else
                       ("pair", m[1], m[2][:vocab], None if m[3] is None else m[3][:vocab]) for m in self.members]
        out.weights, out.mode = self.weights, self.mode
        return out

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        kinds = ", ".join(m[0] for m in self.members)
        return f"TeacherMixture([{kinds}], weights={self.weights}, mode={self.mode!r})"


def mixture_vocab(mixture: TeacherMixture) -> int:
    """The members' vocabulary size ``V_t``."""
    m = mixture.members[0]
    return m[1].shape[-1] if m[0] == "logits" else m[2].shape[0]


def check_mixture(mixture: TeacherMixture, lead: tuple, device: torch.device, owner: str = "student_hidden") -> int:
    """Every member's shapes, dtypes and device against the student's leading shape ``lead`` (``owner``: the
    student tensor the messages name); returns ``V_t``."""
    vocab = mixture_vocab(mixture)
    for i, m in enumerate(mixture.members):
        name = f"teachers[{i}]"
        tensors = [("", m[1])] if m[0] == "logits" else [(" hidden", m[1]), (" weight", m[2]), (" bias", m[3])]
        for part, x in tensors:
            if x is None:
                continue
            if not x.is_floating_point():
                raise TypeError(f"{name}{part} must be a floating tensor, got {x.dtype}")
            if x.device != device:
                raise ValueError(f"{name}{part} must be on {owner}'s device {device}, got {x.device}")
        x = m[1]
        if x.dim() < 1 or tuple(x.shape[:-1]) != tuple(lead):
            raise ValueError(f"{name} ({'logits' if m[0] == 'logits' else 'hidden'}) must have the leading shape of "
                             f"{owner} {tuple(lead)}, got {tuple(x.shape)}")
        if m[0] == "pair":
            w, b = m[2], m[3]
            if x.dtype != w.dtype:
                raise TypeError(f"{name} hidden and weight must have the same dtype (as F.linear), got {x.dtype} "
                                f"and {w.dtype}")
            if w.dim() != 2 or w.shape[1] != x.shape[-1]:
                raise ValueError(f"{name} weight must be [V_t, H] with H = {x.shape[-1]} (its hidden size), got "
                                 f"{tuple(w.shape)}")
            if b is not None and tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"{name} bias must be [V_t] = [{w.shape[0]}], got {tuple(b.shape)}")
        width = x.shape[-1] if m[0] == "logits" else m[2].shape[0]
        if width != vocab:
            raise ValueError(f"every teacher of a TeacherMixture must have the same vocabulary: teachers[0] has "
                             f"{vocab} classes, {name} has {width}")
    return vocab


def _row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, dim=-1, keepdim=True)


def mix_log_probs(member_logits, weights: Sequence[float], mode: str, teacher_temperature: float,
                  out: torch.Tensor, row_logsumexp: Callable[[torch.Tensor], torch.Tensor] = _row_logsumexp
                  ) -> torch.Tensor:
    """The mixture's log-probs (up to a per-row constant for "geometric") of one chunk, into ``out``.

    ``member_logits``: an iterable yielding each member's float32 ``[rows, V_t]`` chunk logits in turn,
    owned by the caller's loop (turned into log-probs in place; consumed one at a time, so one member
    block, and the log-sum-exp's transient, is alive besides ``out``). ``row_logsumexp``: each row's
    normaliser ``[rows, 1]`` (over the whole vocabulary: with a vocabulary-sharded head, the group's,
    ``fastkd.distributed.comm.group_logsumexp``).
    """
    for i, logits in enumerate(member_logits):
        if teacher_temperature != 1.0:
            logits.div_(teacher_temperature)
        log_p = logits.sub_(row_logsumexp(logits))
        del logits
        if mode == "arithmetic":
            log_p += math.log(weights[i])
            if i == 0:
                out.copy_(log_p)
            else:
                torch.logaddexp(out, log_p, out=out)
        elif i == 0:
            torch.mul(log_p, weights[0], out=out)
        else:
            out.add_(log_p, alpha=weights[i])
    return out
