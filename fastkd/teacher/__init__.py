"""The teacher's side of distillation: its top-k next-token log-probs, from its logits or fused with its head.

``topk_from_logits(logits, k)`` and ``teacher_topk(hidden, weight, k)`` (``topk.py``) return a
``fastkd.TopKTeacher`` (with the exact ``tail_logprob``) that ``kd_loss``, the divergences and
``fused_linear_kd_loss`` take as their teacher, or that an offline cache stores.
"""
from .topk import teacher_topk, topk_from_logits

__all__ = ["teacher_topk", "topk_from_logits"]
