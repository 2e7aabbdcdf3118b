"""fastkd's fused head inside TRL's distillation trainers: one change of class (issue 20).

::

    from fastkd.integrations.trl import DistillationTrainer   # instead of: from trl import DistillationTrainer

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(beta=0.5, ...),
                                  train_dataset=prompts, processing_class=tokenizer)
    # or any fastkd divergence, CE, chunking: distillation_loss=FusedLinearKDLoss(divergence="tvd", ...)

* ``DistillationTrainer`` (on-policy, ``trl.DistillationTrainer``): the student generates, the teacher
  scores, and TRL's loss (``_chunked_divergence_loss``: the generalised JSD, chunked) is replaced by
  ``fastkd.fused_linear_kd_loss``. Without ``distillation_loss=``, TRL's ``beta`` and ``temperature``
  map to ``FusedLinearKDLoss(divergence="jsd", beta=beta, temperature=temperature)``: the same
  convention (``m = beta p_teacher + (1 - beta) p_student``, ``beta KL(p || m) + (1 - beta) KL(q || m)``,
  ``beta = 0`` forward KL ``KL(teacher || student)``, ``beta = 1`` reverse KL, no ``T^2``; checked
  against TRL's loss in ``tests/test_integrations_trl.py``). Everything else is TRL's: generation,
  the hidden states (``_get_last_hidden_state``), the forward redirection through DDP / FSDP, the
  token count ``num_items_in_batch`` (completion tokens of the whole generation batch, divided by the
  processes: the loss is ``sum / num_items_in_batch``; without it the mean over the local completion
  tokens), ``logit_scale`` / ``final_logit_softcapping`` read from both configs
  (``fastkd.integrations.transformers.head_options``; fastkd's head takes one softcap for both models,
  so unequal softcaps raise; an unequal scale is folded into a copy of the teacher's head).
  Only completion positions are projected (the masked rows are dropped first, as TRL does on GPUs;
  TRL projects every row on CPUs).
* The entropy metric TRL logs (mean entropy of ``softmax(student logits / T)`` over completion tokens)
  needs the student's logits, which the fused head never keeps: ``fused_linear_kd_loss(...,
  return_entropy=True)`` sums it from each chunk's logits inside the chunk loop (no extra matmul: a
  softmax over the chunk, a few elementwise passes). ``log_entropy=False`` skips it (the logged entropy
  is then 0).
* ``GKDTrainer`` (``trl.experimental.gkd.GKDTrainer``: off-policy or mixed, an ``SFTTrainer`` with a
  teacher): its ``compute_loss`` (full student and teacher logits, ``generalized_jsd_loss``) replaced
  by ``fastkd.integrations.transformers.distillation_loss`` on the batch's ``labels``. TRL's GKD loss
  runs at temperature 1 whatever ``args.temperature`` (which only samples), so the default is
  ``FusedLinearKDLoss(divergence="jsd", beta=args.beta)`` at T = 1, the same loss.

Versions checked: trl 1.16.0, transformers 5.25.0, accelerate 1.16.0, torch 2.14 (nothing pinned).
These subclasses override TRL internals (``_compute_loss``, ``compute_loss``); a TRL release that
renames them would need this module updated (the tests compare against TRL's own loss).
"""
from typing import Optional

import torch
import trl

from ..nn.fused_linear import FusedLinearKDLoss
from .transformers import (_causal_lm, _check_teacher, _head, distillation_loss as _distillation_loss,
                           fused_head_loss, loss_options, teacher_head_pair)

__all__ = ["DistillationTrainer"]  # and GKDTrainer (built on use)
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _check_loss(loss_fn):
    if not isinstance(loss_fn, FusedLinearKDLoss):
        raise TypeError(f"distillation_loss must be a fastkd.nn.FusedLinearKDLoss, got {type(loss_fn).__name__}")
    if loss_fn.kwargs["reduction"] == "none":
        raise ValueError("distillation_loss has reduction='none': a trainer needs a scalar loss")
    return loss_fn


class DistillationTrainer(trl.DistillationTrainer):
    """``trl.DistillationTrainer`` with fastkd's fused head as its loss: the same arguments, plus
    ``distillation_loss`` (a ``fastkd.nn.FusedLinearKDLoss``; ``None``: ``jsd`` with TRL's ``beta`` and
    ``temperature``) and ``log_entropy`` (see the module docstring)."""

    def __init__(self, *args, distillation_loss: Optional[FusedLinearKDLoss] = None, log_entropy: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if distillation_loss is None:
            distillation_loss = FusedLinearKDLoss(divergence="jsd", beta=float(self.beta),
                                                  temperature=float(self.temperature))
        self.distillation_loss = _check_loss(distillation_loss)
        self.log_entropy = log_entropy

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # TRL's _compute_loss up to the loss (same hidden states, same redirection), then fastkd's fused head
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in MULTIMODAL_KEYS if k in inputs}
        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                     **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, logits_to_keep, **multimodal)
        student, teacher = _causal_lm(unwrapped_student), _causal_lm(unwrapped_teacher)
        head, t_head = _head(student, "model"), _head(teacher, "teacher_model")
        _check_teacher(head, t_head, self.distillation_loss.kwargs["teacher_vocab"])
        device = head.weight.device
        keep = loss_mask.to(device) != 0  # only completion positions are projected (a gather)
        target = inputs["completion_ids"].to(device)[keep]
        options, ratio = loss_options(self.distillation_loss, student, teacher, num_items_in_batch)
        hidden = student_hidden.to(device)[keep]
        pair, teacher_bias = teacher_head_pair(t_head, teacher_hidden.to(device)[keep], ratio)
        if self.log_entropy:
            parts, entropy = fused_head_loss(head, hidden, pair, target, options, teacher_bias, num_items_in_batch,
                                             return_entropy=True)
        else:
            parts = fused_head_loss(head, hidden, pair, target, options, teacher_bias, num_items_in_batch)
            entropy = torch.zeros((), device=device)
        return parts.loss, entropy, keep.sum()


_GKD = None


def _gkd_base():
    global _GKD
    if _GKD is None:
        from trl.experimental.gkd import GKDTrainer as base  # experimental in TRL 1.16 (warns on import)

        _GKD = base
    return _GKD


def __getattr__(name):  # GKDTrainer is built on first use: importing trl.experimental warns
    if name == "GKDTrainer":
        cls = type("GKDTrainer", (_GKDMixin, _gkd_base()), {"__module__": __name__, "__doc__": _GKDMixin.__doc__})
        globals()["GKDTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _GKDMixin:
    """``trl.experimental.gkd.GKDTrainer`` with fastkd's fused head as its loss: the same arguments, plus
    ``distillation_loss`` (a ``fastkd.nn.FusedLinearKDLoss``; ``None``: ``jsd`` with ``args.beta`` at
    temperature 1, TRL's GKD loss). On-policy and sequence-level KD batches (``lmbda``, ``seq_kd``) are
    TRL's; the loss sees the batch's ``labels`` (``-100`` on prompt and padding: those rows are dropped
    before the head)."""

    def __init__(self, *args, distillation_loss: Optional[FusedLinearKDLoss] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if distillation_loss is None:
            distillation_loss = FusedLinearKDLoss(divergence="jsd", beta=float(self.beta))
        self.distillation_loss = _check_loss(distillation_loss)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        self.teacher_model.eval()
        with self.accelerator.autocast():  # as the models' own (accelerate-patched) forwards would run
            loss = _distillation_loss(model, self.teacher_model, batch, self.distillation_loss,
                                      num_items_in_batch).loss
        return (loss, {"loss": loss}) if return_outputs else loss
