"""fastkd.integrations.trl against TRL's own trainers on tiny Llama (student) / Qwen2 (teacher) models built
from configs and a word-level tokenizer (nothing downloaded): the same loss, gradients and entropy metric as
TRL's DistillationTrainer (beta 0, 0.5, 1; temperature 1 and 2) and GKDTrainer, and a few training steps."""
import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL integration needs trl (pip install fastkd[trl])")
datasets = pytest.importorskip("datasets", reason="TRL's trainers need datasets (pip install fastkd[trl])")

from fastkd.integrations import trl as fastkd_trl  # noqa: E402
from fastkd.nn import FusedLinearKDLoss  # noqa: E402

import lm_cases  # noqa: E402
from lm_cases import grads, llama, max_grad_err, qwen2, rel_err, tokenizer  # noqa: E402

one_thread = pytest.fixture(autouse=True)(lm_cases.one_thread)


def _sharp(model, factor=20.0):
    """Peaked next-token distributions (a random tiny model's are nearly uniform: every divergence ~0)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def _student():
    return _sharp(llama(dtype=torch.float32, pad_token_id=0, bos_token_id=1, eos_token_id=2))


def _teacher():
    return _sharp(qwen2(dtype=torch.float32))


def _prompts(n=8):
    return datasets.Dataset.from_dict({"prompt": [" ".join(f"w{(i * 7 + j) % 90}" for j in range(3 + i % 3))
                                                  for i in range(n)]})


def _config(tmp_path, **kw):
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_completion_length=5, max_steps=3,
                   report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                   gradient_checkpointing=False)
    options.update(kw)
    return trl.DistillationConfig(**options)


def _generated_batch():
    """What TRL's generation step hands to _compute_loss: left-padded prompts, right-padded completions."""
    g = torch.Generator().manual_seed(3)
    prompt_ids = torch.randint(4, 97, (4, 5), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0
    prompt_ids[0, :2] = 0
    completion_ids = torch.randint(4, 97, (4, 6), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 3:] = 0
    completion_mask[3, 1:] = 0
    completion_ids[completion_mask == 0] = 0
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}


@pytest.mark.parametrize("beta,temperature", [(0.0, 2.0), (0.5, 1.0), (0.5, 2.0), (1.0, 2.0)])
def test_distillation_trainer_loss_equals_trls(tmp_path, beta, temperature):
    """The same batch through TRL's _compute_loss and ours: loss, every student gradient, the entropy sum
    and the token count; with num_items_in_batch and without (the mean over completion tokens)."""
    teacher = _teacher()
    config = _config(tmp_path, beta=beta, temperature=temperature)
    theirs = trl.DistillationTrainer(model=_student(), teacher_model=teacher, args=config,
                                     train_dataset=_prompts(), processing_class=tokenizer())
    ours = fastkd_trl.DistillationTrainer(model=_student(), teacher_model=teacher, args=config,
                                          train_dataset=_prompts(), processing_class=tokenizer())
    assert ours.distillation_loss.kwargs["divergence"] == "jsd"
    inputs = _generated_batch()
    for n in (None, torch.tensor(40.0)):
        results = []
        for trainer in (theirs, ours):
            trainer.model.zero_grad()
            loss, entropy, count = trainer._compute_loss(trainer.model, inputs, n)
            loss.backward()
            results.append((loss.detach(), entropy, count, grads(trainer.model)))
        (l0, e0, c0, g0), (l1, e1, c1, g1) = results
        assert l0.item() > 1e-3  # a divergence that is not ~0
        assert rel_err(l1, l0) < 1e-5
        assert rel_err(e1, e0) < 1e-5
        assert int(c1) == int(c0) == int(inputs["completion_mask"].sum())
        assert max_grad_err(g1, g0) < 1e-4


def test_distillation_trainer_any_divergence_and_no_entropy(tmp_path):
    """distillation_loss= replaces the JSD (here TVD with CE); log_entropy=False logs 0."""
    teacher = _teacher()
    trainer = fastkd_trl.DistillationTrainer(
        model=_student(), teacher_model=teacher, args=_config(tmp_path), train_dataset=_prompts(),
        processing_class=tokenizer(), distillation_loss=FusedLinearKDLoss(divergence="tvd", ce_weight=0.5),
        log_entropy=False)
    loss, entropy, _ = trainer._compute_loss(trainer.model, _generated_batch(), None)
    assert entropy.item() == 0.0
    inputs = _generated_batch()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    c = inputs["completion_ids"].shape[1]
    s = trainer.model(input_ids=ids, attention_mask=mask).logits[:, -c - 1:-1]
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits[:, -c - 1:-1]
    keep = inputs["completion_mask"] != 0
    s, t, y = s[keep].double(), t[keep].double(), inputs["completion_ids"][keep]  # float32 logits, float64 math
    want = 0.5 * (s.softmax(-1) - t.softmax(-1)).abs().sum(-1).mean() + 0.5 * torch.nn.functional.cross_entropy(s, y)
    assert rel_err(loss.detach(), want.detach()) < 5e-5  # float32 logits of +-40 (sharpened heads)
    with pytest.raises(TypeError, match="FusedLinearKDLoss"):
        fastkd_trl.DistillationTrainer(model=_student(), teacher_model=teacher, args=_config(tmp_path),
                                       train_dataset=_prompts(), processing_class=tokenizer(),
                                       distillation_loss=torch.nn.KLDivLoss())


def test_distillation_trainer_trains(tmp_path):
    """On-policy steps (the student generates, the teacher scores) lower the divergence on a fixed batch."""
    teacher = _teacher()
    trainer = fastkd_trl.DistillationTrainer(
        model=_student(), teacher_model=teacher, args=_config(tmp_path, max_steps=16, learning_rate=5e-2, beta=0.5),
        train_dataset=_prompts(), processing_class=tokenizer())
    inputs = _generated_batch()
    with torch.no_grad():
        before = trainer._compute_loss(trainer.model, inputs, None)[0].item()
    trainer.train()
    with torch.no_grad():
        after = trainer._compute_loss(trainer.model, inputs, None)[0].item()
    logs = [r for r in trainer.state.log_history if "loss" in r and "entropy" in r]
    assert len(logs) == 16 and all(r["entropy"] > 0 for r in logs)
    assert after < 0.9 * before, (before, after)


def _gkd(cls, student, teacher, tmp_path, beta):
    from trl.experimental.gkd import GKDConfig

    msgs = [[{"role": "user", "content": " ".join(f"w{(i * 5 + j) % 90}" for j in range(2 + i % 3))},
             {"role": "assistant", "content": " ".join(f"w{(i * 3 + j) % 90}" for j in range(3 + i % 2))}]
            for i in range(8)]
    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_new_tokens=4, max_steps=3,
                     lmbda=0.0, beta=beta, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                     disable_tqdm=True, gradient_checkpointing=False, learning_rate=2e-2,
                     bf16=False)  # GKD's default bf16 wraps the teacher's forward in autocast (accelerate)
    return cls(model=student, teacher_model=teacher, args=args,
               train_dataset=datasets.Dataset.from_dict({"messages": msgs}), processing_class=tokenizer())


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_trainer_loss_equals_trls(tmp_path, beta):
    from trl.experimental.gkd import GKDTrainer

    teacher = _teacher()
    theirs = _gkd(GKDTrainer, _student(), teacher, tmp_path, beta)
    ours = _gkd(fastkd_trl.GKDTrainer, _student(), teacher, tmp_path, beta)
    batch = next(iter(theirs.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompts are masked
    for n in (None, torch.tensor(30)):
        results = []
        for trainer in (theirs, ours):
            trainer.model.zero_grad()
            loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n)
            loss.backward()
            results.append((loss.detach(), grads(trainer.model)))
        assert results[0][0].item() > 1e-3
        assert rel_err(results[1][0], results[0][0]) < 1e-5
        assert max_grad_err(results[1][1], results[0][1]) < 1e-4


def test_gkd_trainer_trains(tmp_path):
    trainer = _gkd(fastkd_trl.GKDTrainer, _student(), _teacher(), tmp_path, 0.5)
    trainer.args.max_steps = 6
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
