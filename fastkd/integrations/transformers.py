"""fastkd's fused LM head in ``transformers``: a ``compute_loss`` helper and a ``Trainer`` (issue 20).

::

    from fastkd.integrations.transformers import DistillationTrainer
    from fastkd.nn import FusedLinearKDLoss

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                  train_dataset=ds, data_collator=collator,  # batches with "labels"
                                  distillation_loss=FusedLinearKDLoss(divergence="kl", temperature=2.0,
                                                                      ce_weight=0.5))
    trainer.train()          # logs "loss", "soft" and "hard"

or, in any trainer's ``compute_loss``::

    parts = distillation_loss(model, teacher, inputs, loss_fn, num_items_in_batch)
    return parts.loss

What the helper does, per batch (``inputs``: ``input_ids``, ``attention_mask``, ``labels`` ``[B, S]``):

* the student's last hidden state ``h`` from its backbone (``model.base_model``: the decoder, or a
  VLM's multimodal wrapper, as TRL does) and its LM head from ``get_output_embeddings()``; the
  student's logits are never computed (``h @ W^T`` exists one chunk of rows at a time, inside
  ``fastkd.fused_linear_kd_loss``);
* the causal shift as HF's causal-LM loss does it: position ``i`` predicts ``labels[:, i + 1]``
  (``h[:, :-1]`` against ``labels[:, 1:]``);
* the teacher under ``torch.no_grad()``: a model (its hidden state and LM head, a ``(hidden, weight)``
  pair: its logits never exist either) or, instead, top-k teacher data in
  ``inputs["teacher_topk"]``: a ``fastkd.TopKTeacher`` of shape ``[B, S, K]`` aligned with the
  model's logits (position ``i`` holds the teacher's distribution of token ``i + 1``);
* only the positions that count are projected (``drop_ignored=True``): rows whose shifted label is
  ``ignore_index`` (prompt, padding) are removed before the head matmuls (a boolean gather). The
  loss and gradients are the same as projecting every row (those rows have weight 0), but the four
  head matmuls shrink with the counted fraction: at 50% prompt tokens they halve
  (``python -m fastkd.bench.fused_linear --ignored 0.5``). The gather has a data-dependent size,
  so on a GPU it reads the count on the host (one synchronisation per step, before the head); the
  saved matmuls (``4 N_ignored V H`` flops) are worth far more on any real vocabulary. TRL does the
  same on GPUs. ``drop_ignored=False`` keeps a step free of host reads;
* ``logit_scale`` / ``final_logit_softcapping`` from the models' configs, read as TRL's
  ``DistillationTrainer`` reads them (``head_options``), unless ``loss_fn`` sets ``logit_scale`` or
  ``softcap`` (then those apply to both heads). fastkd's head takes one scale and one cap: a teacher
  whose scale differs gets the ratio folded into a scaled copy of its (constant) head weight; a
  teacher whose softcap differs raises;
* ``num_items_in_batch`` (what ``transformers.Trainer`` passes to ``compute_loss``: the counted
  tokens of the whole accumulated batch, over every process with ``average_tokens_across_devices``):
  the loss is ``sum / num_items_in_batch`` (``reduction="sum"``, then divided), so ``k``
  micro-batches give the gradient of one batch ``k`` times the size. Without it, ``loss_fn``'s own
  reduction (``"batchmean"``: the mean over counted tokens).

Wrapped models: ``model`` may be wrapped (``DistributedDataParallel``, an FSDP2 ``fully_shard``
root, ``torch.compile``, a PEFT model): the whole loss runs inside the wrapper's ``forward`` (the
"forward redirection" TRL and Lightning use), so DDP's reducer and FSDP's unsharding see one
forward. A head sharded on its own (``fully_shard(model.lm_head)``) is never called, so the fused
loss runs inside its forward too: FSDP gathers its weight once (whatever the number of chunks) and
reduce-scatters its gradient as for any layer. (Gathering the ``DTensor`` with ``full_tensor()``
outside that forward gives each rank its own gradient with no reduce-scatter: 0.86 relative error
on 2 ranks in a test here.) A head weight that is a ``DTensor`` outside FSDP is gathered once per
call with ``full_tensor()``; so is a sharded teacher head (no gradient). A frozen head (``requires_grad=False``: LoRA students)
gets no weight-gradient matmul (the fused head skips it).

Versions checked: transformers 5.25.0, accelerate 1.16.0, torch 2.14 (nothing pinned).
"""
from typing import Optional, Tuple

import torch
import transformers

from ..core.divergence import LossParts
from ..core.topk import TopKTeacher
from ..losses.fused_linear import fused_linear_kd_loss
from ..nn.fused_linear import FusedLinearKDLoss

__all__ = ["TEACHER_TOPK_KEY", "DistillationTrainer", "distillation_loss", "head_options", "unwrap_model"]

TEACHER_TOPK_KEY = "teacher_topk"
# batch keys that are not model inputs
NON_MODEL_KEYS = ("labels", "shift_labels", TEACHER_TOPK_KEY, "num_items_in_batch", "skip_logits")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _causal_lm(inner: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` inside a PEFT model (``get_base_model()``), or ``inner`` itself."""
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


def _head(causal_lm: torch.nn.Module, name: str) -> torch.nn.Module:
    get = getattr(causal_lm, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{name} ({type(causal_lm).__name__}) has no output embeddings (get_output_embeddings() returned "
            f"{head!r}): the fused head needs the LM head's weight [V, H]; pass a *ForCausalLM model")
    return head


def _backbone(causal_lm: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module that returns ``last_hidden_state`` (``base_model``, as TRL; ``get_decoder()`` otherwise)."""
    base = getattr(causal_lm, "base_model", causal_lm)
    if base is causal_lm:
        get = getattr(causal_lm, "get_decoder", None)
        base = get() if callable(get) else None
    if base is None or base is causal_lm:
        raise ValueError(f"{name} ({type(causal_lm).__name__}) has no backbone apart from its head (base_model, "
                         "get_decoder()): cannot get the last hidden state without the logits")
    return base


def _is_fsdp2(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def run_in_forward(wrapper: torch.nn.Module, fn):
    """``fn()`` run inside ``wrapper``'s forward (DDP, an FSDP2 root), so its hooks see one forward;
    called directly when there is no wrapper to go through."""
    inner = unwrap_model(wrapper)
    if inner is wrapper and not _is_fsdp2(inner):
        return fn()
    had_own = "forward" in inner.__dict__
    original = inner.forward

    def restore():
        if had_own:
            inner.forward = original
        else:
            del inner.forward

    def forward(*_args, **_kwargs):
        restore()  # fn may call the real forward
        return fn()

    inner.forward = forward
    try:
        return wrapper()
    finally:
        if inner.__dict__.get("forward") is forward:
            restore()


def _gathered(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An FSDP2 ``DTensor`` parameter as one plain tensor (one all-gather; differentiable)."""
    if x is not None and type(x).__name__ == "DTensor" and hasattr(x, "full_tensor"):
        return x.full_tensor()
    return x


def head_options(config) -> Tuple[Optional[float], Optional[float]]:
    """``(logit_scale, softcap)`` of a model's logits, read from its config as TRL 1.16's
    ``DistillationTrainer`` reads them: ``logit_scale`` (Cohere), else ``output_multiplier``, else
    ``lm_head_multiplier`` (Falcon-H1), else ``1 / logits_scaling`` (Granite, MiniCPM3; HyperCLOVA X
    multiplies by it); the softcap is ``final_logit_softcapping`` (Gemma 2). ``None`` where absent."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(config, name, None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        scale = scaling if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return (None if scale is None or float(scale) == 1.0 else float(scale),
            None if softcap is None else float(softcap))


def _rows(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Positions ``0 .. S-2`` of ``x [B, S, ...]`` (those that predict a next token), the counted ones only
    when ``keep [B, S-1]`` is given (a gather: ``[n, ...]``)."""
    x = x[:, :-1]
    return x if keep is None else x[keep]


def _check_teacher(student_head, teacher_head, vocab_policy: str) -> None:
    s_dev, t_dev = student_head.weight.device, teacher_head.weight.device
    if s_dev != t_dev:
        raise ValueError(f"teacher_model's LM head is on {t_dev} but the student's is on {s_dev}: put the "
                         "teacher on the student's device (DistillationTrainer moves it there)")
    v_s, v_t = student_head.weight.shape[0], teacher_head.weight.shape[0]
    if v_t < v_s:
        raise ValueError(f"teacher_model's LM head has {v_t} rows but the student's has {v_s}: the teacher's "
                         f"vocabulary must be at least the student's (teacher_vocab='{vocab_policy}' drops or "
                         "masks a wider teacher's extra rows; a narrower one cannot be compared)")


def _model_inputs(inputs) -> dict:
    kw = {k: x for k, x in inputs.items() if k not in NON_MODEL_KEYS}
    kw["use_cache"] = False
    return kw


def distillation_loss(model: torch.nn.Module, teacher_model: Optional[torch.nn.Module], inputs,
                      loss_fn: FusedLinearKDLoss, num_items_in_batch=None, *, drop_ignored: bool = True) -> LossParts:
    """The distillation loss of one batch through the fused head: ``LossParts(loss, soft, hard)``.

    ``model``: the student (a ``*ForCausalLM``, possibly wrapped: DDP, FSDP2, PEFT, compiled);
    ``teacher_model``: a causal LM on the student's device with a vocabulary at least the student's
    (``None`` when ``inputs["teacher_topk"]`` carries a ``fastkd.TopKTeacher``); ``inputs``: the batch
    (``labels`` required: ``-100`` marks prompt and padding, as HF's collators do); ``loss_fn``: a
    ``fastkd.nn.FusedLinearKDLoss`` (divergence, temperature, ``ce_weight``, chunking, backend);
    ``num_items_in_batch``: the loss is ``sum / num_items_in_batch`` (gradient-accumulation and
    data-parallel correct); ``None``: ``loss_fn``'s reduction. ``soft`` and ``hard`` (the divergence
    and the cross-entropy) are detached, on the loss's scale. See the module docstring.
    """
    if not isinstance(loss_fn, FusedLinearKDLoss):
        raise TypeError(f"loss_fn must be a fastkd.nn.FusedLinearKDLoss, got {type(loss_fn).__name__}")
    if loss_fn.kwargs["reduction"] == "none":
        raise ValueError("loss_fn has reduction='none': a trainer needs a scalar loss ('batchmean' or 'sum')")
    labels = inputs.get("labels") if hasattr(inputs, "get") else None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError("inputs must hold 'labels' [B, S] (ignore_index marks prompt and padding positions)")
    topk = inputs.get(TEACHER_TOPK_KEY)
    if (topk is None) == (teacher_model is None):
        raise ValueError("give the teacher as teacher_model or as inputs['teacher_topk'] (a fastkd.TopKTeacher), "
                         f"exactly one; got teacher_model={'None' if teacher_model is None else 'a model'} and "
                         f"teacher_topk={'None' if topk is None else 'a TopKTeacher'}")
    if topk is not None and not isinstance(topk, TopKTeacher):
        raise TypeError(f"inputs['teacher_topk'] must be a fastkd.TopKTeacher, got {type(topk).__name__}")
    student = _causal_lm(unwrap_model(model))
    head = _head(student, "model")
    backbone = _backbone(student, "model")
    teacher = t_head = None
    if teacher_model is not None:
        teacher = _causal_lm(unwrap_model(teacher_model))
        t_head = _head(teacher, "teacher_model")
        _check_teacher(head, t_head, loss_fn.kwargs["teacher_vocab"])
        t_backbone = _backbone(teacher, "teacher_model")
    elif topk.device != head.weight.device:
        raise ValueError(f"inputs['teacher_topk'] is on {topk.device} but the student's LM head is on "
                         f"{head.weight.device}")

    options, t_scale_ratio = loss_options(loss_fn, student, teacher, num_items_in_batch)
    shift_labels = labels[:, 1:]
    keep = shift_labels != options["ignore_index"] if drop_ignored else None  # a gather: a host read on a GPU
    target = shift_labels[keep] if keep is not None else shift_labels
    model_inputs = _model_inputs(inputs)

    teacher_bias = None
    if teacher is not None:
        def teacher_forward():
            return t_backbone(**model_inputs).last_hidden_state

        with torch.no_grad():
            t_hidden = _rows(run_in_forward(teacher_model, teacher_forward), keep)
        teacher_arg, teacher_bias = teacher_head_pair(t_head, t_hidden, t_scale_ratio)
    else:
        teacher_arg = TopKTeacher(_rows(topk.indices, keep), _rows(topk.logprobs, keep), mode=topk.mode)

    def student_loss():
        hidden = _rows(backbone(**model_inputs).last_hidden_state, keep)
        return fused_head_loss(head, hidden, teacher_arg, target, options, teacher_bias, num_items_in_batch)

    return run_in_forward(model, student_loss)


def loss_options(loss_fn: FusedLinearKDLoss, student, teacher, num_items_in_batch) -> Tuple[dict, Optional[float]]:
    """``fused_linear_kd_loss``'s keyword arguments for one call, and the teacher's logit-scale ratio (or None).

    ``loss_fn``'s options, with: ``logit_scale`` / ``softcap`` from the configs (``head_options``) unless
    ``loss_fn`` sets one; ``reduction="sum"`` with ``num_items_in_batch``; ``return_parts=True``."""
    options = dict(loss_fn.kwargs)
    t_scale_ratio = None
    if options["logit_scale"] is None and options["softcap"] is None:
        scale, cap = head_options(student.config)
        if teacher is not None:
            t_scale, t_cap = head_options(teacher.config)
            if t_cap != cap:
                raise ValueError(f"the student's final_logit_softcapping ({cap}) differs from teacher_model's "
                                 f"({t_cap}); fastkd's fused head applies one softcap to both heads")
            if t_scale != scale:
                t_scale_ratio = (1.0 if t_scale is None else t_scale) / (1.0 if scale is None else scale)
        options.update(logit_scale=scale, softcap=cap)
    if num_items_in_batch is not None:
        options["reduction"] = "sum"
    options["return_parts"] = True
    return options, t_scale_ratio


def teacher_head_pair(t_head: torch.nn.Module, t_hidden: torch.Tensor, t_scale_ratio: Optional[float]):
    """``((teacher_hidden, teacher_weight), teacher_bias)`` for the fused head, constants: a sharded weight
    gathered once, the teacher's own logit scale (``t_scale_ratio``) folded into a copy of its weight."""
    with torch.no_grad():
        weight, bias = _gathered(t_head.weight).detach(), _gathered(getattr(t_head, "bias", None))
        bias = None if bias is None else bias.detach()
        if t_scale_ratio is not None:
            weight = weight * t_scale_ratio
            bias = None if bias is None else bias * t_scale_ratio
        if t_hidden.dtype != weight.dtype and torch.is_autocast_enabled(t_hidden.device.type):
            t_hidden = t_hidden.to(weight.dtype)
    return (t_hidden.detach(), weight), bias


def fused_head_loss(head: torch.nn.Module, hidden: torch.Tensor, teacher, target, options: dict, teacher_bias,
                    num_items_in_batch, return_entropy: bool = False):
    """``fused_linear_kd_loss`` on the student's ``head``, inside its forward when it is sharded on its own
    (FSDP2: its weight is then whole); divided by ``num_items_in_batch`` when given (``options`` from
    ``loss_options``). ``return_entropy``: ``(parts, the student's entropy summed over the rows)``."""
    def fused():
        weight, bias = _gathered(head.weight), _gathered(getattr(head, "bias", None))
        h = hidden.to(weight.dtype) if hidden.dtype != weight.dtype and \
            torch.is_autocast_enabled(hidden.device.type) else hidden  # autocast rounds them anyway
        return fused_linear_kd_loss(h, weight, teacher, target, student_bias=bias, teacher_bias=teacher_bias,
                                    return_entropy=return_entropy, **options)

    parts, entropy = run_in_forward(head, fused) if return_entropy else (run_in_forward(head, fused), None)
    if num_items_in_batch is not None:
        n = num_items_in_batch.to(parts.loss.device) if isinstance(num_items_in_batch, torch.Tensor) \
            else float(num_items_in_batch)
        parts = LossParts(parts.loss / n, parts.soft / n, parts.hard / n)
    return (parts, entropy) if return_entropy else parts


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` distilling ``teacher_model`` into ``model`` through fastkd's fused head.

    ``DistillationTrainer(model, args, ..., teacher_model=teacher, distillation_loss=FusedLinearKDLoss(...))``:
    the other arguments are ``transformers.Trainer``'s. ``compute_loss`` is ``distillation_loss`` (this
    module); batches need ``labels`` and, without ``teacher_model``, a ``fastkd.TopKTeacher`` under
    ``"teacher_topk"`` (built by your collator; set ``remove_unused_columns=False`` if it comes from a
    dataset column). ``distillation_loss=None``: forward KL at T = 1 (``FusedLinearKDLoss()``).

    The teacher is moved to the student's device, put in eval mode and run under ``no_grad``; both
    run under ``accelerator.autocast()`` (``bf16=True``: the mixed precision accelerate would give the
    model's own forward, which the backbone call does not go through). The
    token count ``num_items_in_batch`` is always taken (over ``labels[:, 1:]``), so gradient
    accumulation and data parallelism give the gradient of the whole batch; under DDP with
    ``average_tokens_across_devices`` (the default) the loss is multiplied by the number of processes,
    as ``Trainer.compute_loss`` does, since DDP averages the gradients. Logs ``soft`` (the divergence)
    and ``hard`` (the cross-entropy, 0 unless labels and ``ce_weight`` or parts) next to ``loss``,
    averaged over the logging interval the way ``Trainer`` averages ``loss``.
    ``drop_ignored``: see ``distillation_loss``.
    """

    def __init__(self, *args, teacher_model: Optional[torch.nn.Module] = None,
                 distillation_loss: Optional[FusedLinearKDLoss] = None, drop_ignored: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.distillation_loss = FusedLinearKDLoss() if distillation_loss is None else distillation_loss
        if not isinstance(self.distillation_loss, FusedLinearKDLoss):
            raise TypeError("distillation_loss must be a fastkd.nn.FusedLinearKDLoss, got "
                            f"{type(self.distillation_loss).__name__}")
        self.drop_ignored = drop_ignored
        # count the tokens of every accumulated batch (Trainer does only for models that take loss kwargs)
        self.model_accepts_loss_kwargs = True
        self.teacher_model = teacher_model
        if teacher_model is not None:
            device = _head(_causal_lm(unwrap_model(self.model)), "model").weight.device
            if device.type != "meta":
                self.teacher_model = teacher_model.to(device)
            self.teacher_model.eval()
        self._parts = None  # (soft, hard) summed since the last log, on the loss's scale
        self._parts_logged_step = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher_model is not None:
            self.teacher_model.eval()
        # accelerate's mixed precision lives in the model's patched forward, which the backbone call skips
        with self.accelerator.autocast():
            parts = distillation_loss(model, self.teacher_model, inputs, self.distillation_loss, num_items_in_batch,
                                      drop_ignored=self.drop_ignored)
        loss, soft, hard = parts
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # as Trainer.compute_loss: num_items_in_batch counts every process's tokens and DDP averages
            world = self.accelerator.num_processes
            loss, soft, hard = loss * world, soft * world, hard * world
        if model.training:
            # what training_step will log: a loss not normalised by num_items_in_batch is divided by the
            # accumulation steps there
            steps = 1 if num_items_in_batch is not None else self.current_gradient_accumulation_steps
            both = torch.stack([soft, hard]).detach().float() / steps
            self._parts = both if self._parts is None else self._parts + both
        return (loss, {"loss": loss}) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._parts is not None:
            steps = max(self.state.global_step - self._parts_logged_step, 1)
            soft, hard = (self.accelerator.gather(self._parts.unsqueeze(0)).mean(0) / steps).tolist()
            logs = {**logs, "soft": soft, "hard": hard}
            self._parts = None
            self._parts_logged_step = self.state.global_step
        return super().log(logs, start_time)
