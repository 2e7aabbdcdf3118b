"""The language-model examples: distill_lm_transfer.py's transfer-set loss against the loss from the models'
own logits, the unused labels of the transfer rows, its batches, a ``--smoke`` run end to end (every method
through ``transformers.Trainer``, the outputs written, fused = unfused = TRL on the loss benchmark); and
distill_lm_onpolicy.py's on-policy steps against TRL's own trainer."""
import csv
import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the example needs transformers (pip install fastkd[trl])")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install fastkd[trl])")
pytest.importorskip("tokenizers", reason="the example trains a BPE tokenizer (pip install fastkd[trl])")

import fastkd  # noqa: E402

import lm_cases  # noqa: E402

STUDENT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
TEACHER = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96)
VOCAB, SEQ = 131, 12


@pytest.fixture(scope="module")
def ex():
    return lm_cases.load_example("distill_lm_transfer")


one_thread = pytest.fixture(autouse=True)(lm_cases.one_thread)


def _trainer(ex, student, teacher, options, tmp_path, ce_weight=0.7, topk=False):
    _, TransferTrainer, _ = ex._trainer_classes()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                          remove_unused_columns=False)
    return TransferTrainer(model=student, args=args, teacher_model=teacher, topk=topk,
                           distillation_loss=fastkd.nn.FusedLinearKDLoss(ce_weight=ce_weight, **options),
                           transfer_loss=fastkd.nn.FusedLinearKDLoss(ce_weight=0.0, **options))


def _batch(labelled_rows=2, rows=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    labels = ids.clone()
    labels[labelled_rows:] = -100
    return dict(input_ids=ids, labels=labels, transfer=torch.arange(rows) >= labelled_rows)


def _models(ex):
    student = ex.build("qwen2", VOCAB, STUDENT, SEQ, 1).double()
    teacher = ex.build("llama", VOCAB, TEACHER, SEQ, 2).double().eval().requires_grad_(False)
    return student, teacher


def _by_hand(s, t, ids, transfer, divergence, temperature, ce_weight, beta=0.5):
    """Sum over every position of the divergence, plus ce_weight x CE on the labelled rows, / positions."""
    s, t, y = s[:, :-1], t[:, :-1], ids[:, 1:]
    log_q, log_p = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "kl":
        rows = temperature ** 2 * (p * (log_p - log_q)).sum(-1)
    elif divergence == "reverse_kl":
        rows = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.log(beta * p + (1 - beta) * q)
        rows = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    ce = torch.nn.functional.cross_entropy(s.transpose(1, 2), y, reduction="none")
    total = rows.sum() + ce_weight * ce[~transfer].sum()
    return total / y.numel()


@pytest.mark.parametrize("options", [dict(divergence="kl", temperature=2.0), dict(divergence="reverse_kl"),
                                     dict(divergence="jsd", beta=0.5, temperature=1.5)])
def test_transfer_loss_equals_the_loss_from_logits(ex, tmp_path, options):
    student, teacher = _models(ex)
    batch = _batch()
    trainer = _trainer(ex, student, teacher, options, tmp_path)
    loss = trainer.compute_loss(student, dict(batch))
    grads = torch.autograd.grad(loss, [p for p in student.parameters()])
    s = student(input_ids=batch["input_ids"]).logits
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits
    ref = _by_hand(s, t, batch["input_ids"], batch["transfer"], options["divergence"],
                   options.get("temperature", 1.0), 0.7)
    ref_grads = torch.autograd.grad(ref, [p for p in student.parameters()])
    assert abs(loss.item() - ref.item()) <= 1e-10 * abs(ref.item())
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= 1e-8 * r.norm() + 1e-14


def test_topk_teacher_is_the_teachers_top16_tail(ex, tmp_path):
    student, teacher = _models(ex)
    batch = _batch(labelled_rows=1, rows=3)
    trainer = _trainer(ex, student, teacher, dict(divergence="kl", temperature=2.0), tmp_path, topk=True)
    loss = trainer.compute_loss(student, dict(batch))
    ids, transfer = batch["input_ids"], batch["transfer"]
    s = student(input_ids=ids).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1]
    top = fastkd.TopKTeacher.from_logits(t, 16, temperature=2.0, mode="tail")
    assert top.mode == "tail" and top.k == 16
    soft = fastkd.kd_loss(s, top, 2.0, reduction="sum")
    ce = torch.nn.functional.cross_entropy(s[~transfer].transpose(1, 2), ids[~transfer][:, 1:], reduction="sum")
    ref = (soft + 0.7 * ce) / ids[:, 1:].numel()
    assert abs(loss.item() - ref.item()) <= 1e-10 * abs(ref.item())


def test_transfer_rows_labels_are_not_used(ex, tmp_path):
    """The transfer rows' tokens are never a target: any labels there give the same loss and gradient."""
    student, teacher = _models(ex)
    trainer = _trainer(ex, student, teacher, dict(divergence="kl"), tmp_path)
    batch = _batch()
    other = dict(batch, labels=batch["labels"].clone())
    other["labels"][2:] = torch.randint(0, VOCAB, other["labels"][2:].shape)
    a = trainer.compute_loss(student, dict(batch))
    ga = torch.autograd.grad(a, list(student.parameters()))
    b = trainer.compute_loss(student, other)
    gb = torch.autograd.grad(b, list(student.parameters()))
    assert a.item() == b.item()
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    # the labelled rows' labels are used (ce_weight > 0)
    changed = dict(batch, labels=batch["labels"].clone())
    changed["labels"][0, 3] = (changed["labels"][0, 3] + 1) % VOCAB
    assert trainer.compute_loss(student, changed).item() != a.item()


def test_batches_hold_the_labelled_subset_only_where_labelled(ex):
    seqs = torch.arange(400 * 8).view(400, 8)
    cfg = dict(labelled=0.05, batch=6, labelled_rows=2, student_steps=30)
    n, batches = ex.student_batches(seqs, cfg, seed=3)
    assert n == 20
    labelled = {int(b["input_ids"][i, 0]) // 8 for b in batches["ce"] for i in range(6)}
    assert len(labelled) == n  # 180 draws cycle through the 20 labelled sequences
    for b in batches["kd"]:
        assert b["transfer"].tolist() == [False, False, True, True, True, True]
        assert {int(x) // 8 for x in b["input_ids"][:2, 0]} <= labelled
        assert torch.equal(b["labels"][:2], b["input_ids"][:2]) and (b["labels"][2:] == -100).all()
    drawn = {int(x) // 8 for b in batches["kd"] for x in b["input_ids"][2:, 0]}
    assert len(drawn - labelled) > 100  # the transfer rows come from all the text
    _, again = ex.student_batches(seqs, cfg, seed=3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches["kd"], again["kd"]))


def test_smoke_run_writes_the_tables_and_the_plot(ex, tmp_path):
    summary, runs, bench = ex.main(["--smoke", "--out-dir", str(tmp_path)])
    methods = [m for m in ex.METHODS if m != ex.ALL_LABELS]
    assert [r["method"] for r in summary] == methods
    for r in runs:
        assert math.isfinite(r["ppl"]) and 1 < r["ppl"] < 2 * 384  # a trained tokenizer of about 384 ids
        assert r["best_ppl"] <= r["ppl"] and r["step_ms"] > 0
    # fused, unfused and TRL compute the same losses
    for loss in ("forward KL", "JSD 0.5"):
        values = [b["value"] for b in bench if b["loss"] == loss]
        assert len(values) >= 2 and max(values) - min(values) <= 1e-5 * abs(values[0])
    for name in ("lm-transfer-quick.md", "lm-transfer-quick.csv", "lm-transfer-quick.png",
                 "lm-transfer-bench-quick.csv"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "lm-transfer-quick.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "lm-transfer-quick.csv") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == methods
    md = (tmp_path / "lm-transfer-quick.md").read_text()
    assert "| teacher |" in md and "| forward KL |" in md and "fastkd fused" in md


def test_onpolicy_example_matches_trls_own_loss(capsys):
    """examples/distill_lm_onpolicy.py: two on-policy steps through fastkd.integrations.trl and through TRL's
    own trainer from the same student give the same logged losses (the same generations: one seed)."""
    pytest.importorskip("trl", reason="the on-policy example needs trl (pip install fastkd[trl])")
    pytest.importorskip("datasets", reason="TRL's trainers need datasets (pip install fastkd[trl])")
    module = lm_cases.load_example("distill_lm_onpolicy")
    losses, before, after, theirs = module.main(["--steps", "2", "--trl", "--divergence", "jsd"])
    assert len(losses) == len(theirs) == 2 and all(x > 0 for x in losses)
    assert max(abs(a - b) for a, b in zip(losses, theirs)) <= 1e-5 * max(losses)
    assert math.isfinite(before) and math.isfinite(after)
    assert "trl.DistillationTrainer (beta = 0.5" in capsys.readouterr().out
