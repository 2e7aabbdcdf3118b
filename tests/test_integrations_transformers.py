"""fastkd.integrations.transformers: the compute_loss helper and DistillationTrainer on tiny Llama / Qwen2 /
Cohere / Gemma 2 models built from configs (nothing downloaded), against the loss computed from the models'
own logits; gradient accumulation, DDP and FSDP2 on gloo (CPU, 127.0.0.1), a frozen head, bad input."""
import math
from datetime import timedelta

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers "
                                   "(pip install fastkd[trl])")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install fastkd[trl])")

import fastkd  # noqa: E402
from fastkd import TopKTeacher  # noqa: E402
from fastkd.integrations.transformers import DistillationTrainer, distillation_loss  # noqa: E402
from fastkd.losses import fused_linear_chunks  # noqa: E402
from fastkd.nn import FusedLinearKDLoss  # noqa: E402

import lm_cases  # noqa: E402
from lm_cases import VOCAB, batch, grads, llama, max_grad_err, qwen2, rel_err, shifted_logits  # noqa: E402
from processes import free_port, run_processes  # noqa: E402

one_thread = pytest.fixture(autouse=True)(lm_cases.one_thread)


def unfused(s, t, y, divergence="kl", temperature=1.0, beta=0.5, ce_weight=0.0):
    """The loss from full logits, by hand: mean over the counted rows of the divergence (+ CE)."""
    m = y != -100
    s, t, y = s[m], t[m], y[m]
    log_q = torch.log_softmax(s / temperature, -1)
    log_p = torch.log_softmax(t / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "kl":
        rows = temperature ** 2 * (p * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        rows = (q * (log_q - log_p)).sum(-1)
    elif divergence == "jsd" and beta == 0:
        rows = (p * (log_p - log_q)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        rows = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    loss = rows.mean()
    if ce_weight:
        loss = loss + ce_weight * torch.nn.functional.cross_entropy(s, y)
    return loss


CASES = [
    dict(divergence="kl", temperature=2.0, ce_weight=0.5),
    dict(divergence="reverse_kl"),
    dict(divergence="jsd", beta=0.3, temperature=1.5, ce_weight=0.2),
]


def _compare(student, teacher, inputs, options, drop_ignored=True, teacher_logits=None, tol=1e-10):
    loss_fn = FusedLinearKDLoss(**options)
    parts = distillation_loss(student, teacher, inputs, loss_fn, drop_ignored=drop_ignored)
    parts.loss.backward()
    got = grads(student)
    student.zero_grad()
    s, y = shifted_logits(student, inputs)
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits, _ = shifted_logits(teacher, inputs)
    want = unfused(s, teacher_logits, y, **options)
    want.backward()
    assert rel_err(parts.loss.detach(), want.detach()) < tol
    assert max_grad_err(got, grads(student)) < tol
    student.zero_grad()
    return parts


@pytest.mark.parametrize("drop_ignored", [True, False])
@pytest.mark.parametrize("options", CASES, ids=[c["divergence"] for c in CASES])
def test_helper_equals_the_loss_from_the_logits_float64(options, drop_ignored):
    """Llama student, Qwen2 teacher (another width and depth): value and every student gradient."""
    parts = _compare(llama(), qwen2(), batch(), options, drop_ignored)
    assert parts.soft.requires_grad is False and parts.hard.requires_grad is False


def test_helper_float32():
    student, teacher = llama(dtype=torch.float32), qwen2(dtype=torch.float32)
    _compare(student, teacher, batch(), CASES[2], tol=2e-5)


def test_topk_teacher_from_inputs():
    student, teacher = llama(), qwen2()
    inputs = batch()
    with torch.no_grad():
        t_logits = teacher(input_ids=inputs["input_ids"]).logits  # [B, S, V], aligned with the logits
    topk = TopKTeacher.from_logits(t_logits, 8, temperature=2.0)
    loss_fn = FusedLinearKDLoss(divergence="kl", temperature=2.0, ce_weight=0.3)
    parts = distillation_loss(student, None, {**inputs, "teacher_topk": topk}, loss_fn)
    parts.loss.backward()
    got = grads(student)
    student.zero_grad()
    s, y = shifted_logits(student, inputs)
    shifted = TopKTeacher(topk.indices[:, :-1], topk.logprobs[:, :-1])
    want = fastkd.reference.kd_topk_loss(s, shifted, temperature=2.0, target=y, ce_weight=0.3)
    want.backward()
    assert rel_err(parts.loss.detach(), want.detach()) < 1e-10
    assert max_grad_err(got, grads(student)) < 1e-10


def test_wider_teacher_is_truncated():
    """A teacher head padded past the student's vocabulary (Qwen2.5-style): its first V columns compete."""
    teacher = qwen2(vocab=VOCAB + 6)
    inputs = batch()
    with torch.no_grad():
        t_logits, _ = shifted_logits(teacher, inputs)
    _compare(llama(), teacher, inputs, CASES[0], teacher_logits=t_logits[..., :VOCAB])


def _cohere(scale, seed):
    torch.manual_seed(seed)
    config = transformers.CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, logit_scale=scale,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.CohereForCausalLM(config).double()


def _gemma2(seed):
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       final_logit_softcapping=3.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.Gemma2ForCausalLM(config).double()


def test_logit_scale_and_softcap_from_the_configs():
    """Cohere's logit_scale (student 0.5, teacher 0.25: the ratio folded into the teacher's head) and Gemma 2's
    final softcap, read from the configs; the models' own logits include them. Tied embeddings too."""
    _compare(_cohere(0.5, 0), _cohere(0.25, 1).eval(), batch(), CASES[2])
    _compare(_gemma2(0), _gemma2(1).eval(), batch(), CASES[0])
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        distillation_loss(_gemma2(0), llama(), batch(), FusedLinearKDLoss())


def _micro_grads(student, teacher, inputs, split, loss_fn):
    """Gradients summed over micro-batches of ``split`` rows, each normalised by the whole batch's count."""
    n = (inputs["labels"][:, 1:] != -100).sum()
    rows = inputs["input_ids"].shape[0]
    for i in range(0, rows, split):
        part = {k: x[i:i + split] for k, x in inputs.items()}
        distillation_loss(student, teacher, part, loss_fn, num_items_in_batch=n).loss.backward()
    out = grads(student)
    student.zero_grad()
    return out


def test_gradient_accumulation_equals_one_batch():
    """1 x 8 rows vs 4 x 2 micro-batches with num_items_in_batch: the same gradient (float32). Row lengths
    differ (padding, prompts), so a per-micro-batch mean would not give it."""
    student, teacher = llama(dtype=torch.float32), qwen2(dtype=torch.float32)
    inputs = batch(rows=8)
    inputs["labels"][2, :9] = -100  # a row with few counted tokens
    loss_fn = FusedLinearKDLoss(divergence="jsd", beta=0.5, ce_weight=0.5)
    whole = _micro_grads(student, teacher, inputs, 8, loss_fn)
    assert max_grad_err(_micro_grads(student, teacher, inputs, 2, loss_fn), whole) < 1e-5
    # and a per-micro-batch mean does differ (the test can fail)
    distillation_loss(student, teacher, inputs, loss_fn).loss.backward()
    mean_grads = grads(student)
    student.zero_grad()
    assert max_grad_err(mean_grads, whole) < 1e-5
    for i in range(0, 8, 2):
        part = {k: x[i:i + 2] for k, x in inputs.items()}
        (distillation_loss(student, teacher, part, loss_fn).loss / 4).backward()
    assert max_grad_err(grads(student), whole) > 1e-3


class _Rows(torch.utils.data.Dataset):
    def __init__(self, inputs):
        self.inputs = inputs

    def __len__(self):
        return self.inputs["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: x[i] for k, x in self.inputs.items()}


def _trainer(student, teacher, inputs, tmp_path, loss_fn, **args):
    options = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                   disable_tqdm=True, dataloader_num_workers=0, seed=0)
    options.update(args)
    return DistillationTrainer(model=student, teacher_model=teacher, args=transformers.TrainingArguments(**options),
                               train_dataset=_Rows(inputs), distillation_loss=loss_fn)


def test_trainer_with_gradient_accumulation_takes_the_whole_batch_step(tmp_path):
    """One SGD step through Trainer: batch 8, or 4 accumulated micro-batches of 2: the same parameters."""
    inputs = batch(rows=8)
    inputs["labels"][2, :9] = -100
    loss_fn = FusedLinearKDLoss(divergence="reverse_kl", ce_weight=0.5)
    after = []
    for bs, ga in ((8, 1), (2, 4)):
        student = llama(dtype=torch.float32)
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        trainer = _trainer(student, qwen2(dtype=torch.float32), inputs, tmp_path, loss_fn, max_steps=1,
                           per_device_train_batch_size=bs, gradient_accumulation_steps=ga, optim="sgd",
                           learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0)
        trainer.train()
        after.append({n: p.detach() - before[n] for n, p in student.named_parameters()})
    assert max_grad_err(after[1], after[0]) < 1e-5


def test_trainer_trains_and_logs_soft_and_hard(tmp_path):
    inputs = batch(rows=8)
    loss_fn = FusedLinearKDLoss(divergence="kl", temperature=2.0, ce_weight=0.5)
    student = llama(dtype=torch.float32)
    trainer = _trainer(student, qwen2(dtype=torch.float32), inputs, tmp_path, loss_fn, max_steps=12,
                       per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=3e-3,
                       logging_steps=3)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "soft" in r]
    assert len(logs) == 4
    for r in logs:  # averaged alike over each interval: loss = soft + ce_weight * hard
        assert math.isclose(r["loss"], r["soft"] + 0.5 * r["hard"], rel_tol=1e-4), r
    assert logs[-1]["loss"] < 0.9 * logs[0]["loss"]
    assert trainer.teacher_model.training is False
    # the first interval's loss is the helper's on the batches it saw (at the start: the untrained student)
    first = distillation_loss(llama(dtype=torch.float32), qwen2(dtype=torch.float32), inputs, loss_fn).loss.item()
    assert abs(logs[0]["loss"] - first) < 0.2 * first
    # evaluation: the same loss on the whole set (one batch of 8), from the trained student
    trainer.args.per_device_eval_batch_size = 8
    metrics = trainer.evaluate(eval_dataset=_Rows(inputs))
    with torch.no_grad():
        want = distillation_loss(student, trainer.teacher_model, inputs, loss_fn).loss.item()
    assert math.isclose(metrics["eval_loss"], want, rel_tol=1e-5), (metrics, want)


def test_trainer_with_bf16_autocast_trains_with_bf16_matmuls_and_float32_logits(tmp_path, monkeypatch):
    """``TrainingArguments(bf16=True)`` (autocast on CPU): the fused head sees autocast and rounds its matmul
    inputs to bf16 (as autocast's F.linear would), the logits and loss stay float32; training lowers the loss."""
    from fastkd.losses import fused_linear as fl

    seen = []

    def spy(plan, *args, **kwargs):
        seen.append(plan.mm_dtype)
        return run_chunks(plan, *args, **kwargs)

    run_chunks = fl.run_chunks
    monkeypatch.setattr(fl, "run_chunks", spy)
    loss_fn = FusedLinearKDLoss(divergence="kl", temperature=2.0, ce_weight=0.5)
    trainer = _trainer(llama(dtype=torch.float32), qwen2(dtype=torch.float32), batch(rows=8), tmp_path, loss_fn,
                       max_steps=12, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=3, bf16=True)
    trainer.train()
    assert seen and set(seen) == {torch.bfloat16}
    logs = [r for r in trainer.state.log_history if "soft" in r]
    assert all(math.isfinite(r["loss"]) for r in logs)
    assert logs[-1]["loss"] < 0.95 * logs[0]["loss"]
    for r in logs:
        assert math.isclose(r["loss"], r["soft"] + 0.5 * r["hard"], rel_tol=1e-3), r


@pytest.mark.parametrize("drop_ignored", [True, False])
def test_a_batch_with_no_counted_token_gives_zero(drop_ignored):
    """A micro-batch of prompts only (a rank or accumulation step can get one): loss 0, gradient 0, no NaN."""
    student, teacher = llama(dtype=torch.float32), qwen2(dtype=torch.float32)
    inputs = batch()
    inputs["labels"][:] = -100
    for n in (None, torch.tensor(7)):
        student.zero_grad()
        loss = distillation_loss(student, teacher, inputs, FusedLinearKDLoss(ce_weight=0.5), n,
                                 drop_ignored=drop_ignored).loss
        loss.backward()
        assert loss.item() == 0.0
        assert all(g.abs().max().item() == 0.0 for g in grads(student).values())


def test_frozen_head_gets_no_weight_gradient_work(monkeypatch):
    """A frozen lm_head (LoRA / PEFT students): no g^T h matmul runs and its .grad stays None."""
    calls = []
    original = fused_linear_chunks._accumulate_weight_grad

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_linear_chunks, "_accumulate_weight_grad", counting)
    student, teacher = llama(dtype=torch.float32), qwen2(dtype=torch.float32)
    loss_fn = FusedLinearKDLoss(chunk_size=8)
    distillation_loss(student, teacher, batch(), loss_fn).loss.backward()
    assert len(calls) > 1  # chunks of 8 rows: the counter sees the weight-gradient matmuls
    calls.clear()
    student.zero_grad(set_to_none=True)
    student.lm_head.weight.requires_grad_(False)
    distillation_loss(student, teacher, batch(), loss_fn).loss.backward()
    assert calls == []
    assert student.lm_head.weight.grad is None
    assert student.model.layers[0].mlp.up_proj.weight.grad is not None


def test_bad_input_errors():
    student, teacher = llama(dtype=torch.float32), qwen2(dtype=torch.float32)
    loss_fn = FusedLinearKDLoss()
    with pytest.raises(ValueError, match="model .*no output embeddings"):
        distillation_loss(student.model, teacher, batch(), loss_fn)
    with pytest.raises(ValueError, match="teacher_model .*no output embeddings"):
        distillation_loss(student, teacher.model, batch(), loss_fn)
    with pytest.raises(ValueError, match="vocabulary must be at least the student's"):
        distillation_loss(student, qwen2(vocab=VOCAB - 1, dtype=torch.float32), batch(), loss_fn)
    with pytest.raises(ValueError, match="teacher_model's LM head is on meta"):
        distillation_loss(student, qwen2(dtype=torch.float32).to("meta"), batch(), loss_fn)
    with pytest.raises(ValueError, match="'labels'"):
        distillation_loss(student, teacher, {"input_ids": batch()["input_ids"]}, loss_fn)
    with pytest.raises(ValueError, match="exactly one"):
        distillation_loss(student, None, batch(), loss_fn)
    with pytest.raises(TypeError, match="FusedLinearKDLoss"):
        distillation_loss(student, teacher, batch(), torch.nn.KLDivLoss())
    with pytest.raises(ValueError, match="reduction='none'"):
        distillation_loss(student, teacher, batch(), FusedLinearKDLoss(reduction="none"))


# ----------------------------------------------------------------------------
# data parallel: DDP and FSDP2 on gloo, 2 processes, against one process on the whole batch
# ----------------------------------------------------------------------------

def _single(inputs, loss_fn, n):
    student, teacher = llama(dtype=torch.float32), qwen2(dtype=torch.float32)
    distillation_loss(student, teacher, inputs, loss_fn, num_items_in_batch=n).loss.backward()
    return grads(student)


def _gather_count(counter):
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fpg

    original = fpg.foreach_all_gather

    def counting(*args, **kwargs):
        counter.append(1)
        return original(*args, **kwargs)

    fpg.foreach_all_gather = counting
    return lambda: setattr(fpg, "foreach_all_gather", original)


def _data_parallel_checks(rank, world):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    inputs = batch(rows=8)
    inputs["labels"][2, :9] = -100
    n = (inputs["labels"][:, 1:] != -100).sum()  # the global count, as Trainer gathers it
    mine = {k: x[rank * 4:(rank + 1) * 4] for k, x in inputs.items()}
    failures, checks = [], 0
    for divergence in ("kl", "jsd"):
        loss_fn = FusedLinearKDLoss(divergence=divergence, ce_weight=0.5, chunk_size=8)
        want = _single(inputs, loss_fn, n)
        # DDP: gradients averaged over the ranks, so the loss is multiplied by the world size (as Trainer does)
        ddp = torch.nn.parallel.DistributedDataParallel(llama(dtype=torch.float32))
        (distillation_loss(ddp, qwen2(dtype=torch.float32), mine, loss_fn, n).loss * world).backward()
        err = max_grad_err({k.removeprefix("module."): g for k, g in grads(ddp).items()}, want)
        checks += 1
        if err > 1e-5:
            failures.append(f"DDP {divergence}: gradient error {err}")
        # FSDP2: layers, the head on its own, and the root; the same gradient, gathered whole
        for own_head in (False, True):
            counts = []
            for chunk in (4, None):
                student = llama(dtype=torch.float32)
                for layer in student.model.layers:
                    fully_shard(layer)
                if own_head:
                    fully_shard(student.lm_head)
                fully_shard(student)
                counter = []
                restore = _gather_count(counter)
                try:
                    fn = FusedLinearKDLoss(divergence=divergence, ce_weight=0.5, chunk_size=chunk)
                    (distillation_loss(student, qwen2(dtype=torch.float32), mine, fn, n).loss * world).backward()
                finally:
                    restore()
                counts.append(len(counter))
                got = {k: g.full_tensor() for k, g in grads(student).items()}
                err = max_grad_err(got, want)
                checks += 1
                if err > 1e-5:
                    failures.append(f"FSDP2 {divergence} own_head={own_head} chunk={chunk}: gradient error {err}")
            if counts[0] != counts[1]:
                failures.append(f"FSDP2 own_head={own_head}: {counts[0]} all-gathers with 4-row chunks, "
                                f"{counts[1]} with one chunk (a gather per chunk?)")
    dist.barrier()
    if checks != 10:
        failures.append(f"only {checks} of 10 checks ran")
    return failures


def _entry(rank, world, port):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        failures = _data_parallel_checks(rank, world)
    finally:
        dist.destroy_process_group()
    if failures:
        raise AssertionError(f"rank {rank}: " + "\n".join(failures))


def test_ddp_and_fsdp2_equal_one_process():
    dist = pytest.importorskip("torch.distributed", reason="needs torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is unavailable")
    run_processes(_entry, (2, free_port()), 2, 240, "the 2-process group")
