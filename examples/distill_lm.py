"""Distil a small causal language model with ``fastkd.nn.FusedLinearKDLoss`` (issue 11, "Real client").

    python examples/distill_lm.py [--quick | --tiny] [--teacher-steps N] [--student-steps N] [--out FILE.md]

Needs the ``examples`` extra (``pip install -e ".[examples]"``: ``transformers`` and ``tokenizers``).
``--quick`` is the main job's run (about 1.5 minutes on 2 cores); ``--tiny`` is a smoke run of a few
seconds of training for the tests (tiny models, 3 student steps: no result to read).

Data: the Python standard library's own ``.py`` sources (shipped with every Python, no
download), a fixed sorted file list split 90/10 into train / validation text. A byte-level
BPE tokenizer is trained on the training text with ``tokenizers`` (vocabulary ``V``, not a
multiple of 64); the teacher's head is padded to ``V_t = V`` rounded up to a multiple of 64,
as real tokenizers are, so ``V_t > V``.

Models (``transformers``, built from configs, random init): a Llama teacher and a smaller
Qwen2 student. The teacher is trained first with cross-entropy (a few minutes on CPU; seconds
with ``--quick``), then frozen. Then the same student initialisation is trained three ways
on the same batches (AdamW):

    CE        cross-entropy only (the student's own ``lm_head`` logits)
    fused     FusedLinearKDLoss(divergence="kl", temperature=T, ce_weight=0.5), fed from the
              student's last hidden state and ``lm_head.weight`` and the teacher's pair; the
              [tokens, V] logits never exist
    unfused   the same loss from materialised logits: fastkd.kd_loss(s, t[..., :V]) + 0.5 CE

Reported per method: validation cross-entropy and perplexity, time per step, peak extra
resident memory of one step; and the largest step-by-step difference between the fused and
unfused loss curves (they are the same function: only float32 rounding may differ).

Forward KL and ``V_t > V``: the student's missing columns are ``-inf``, so forward KL is
infinite wherever the teacher puts any mass there. Here the padded teacher columns are never
trained targets, yet a softmax never gives exactly 0, so the teacher is passed with those
columns removed (``teacher.lm_head.weight[:V]``); reverse KL, JSD and TVD are finite with
the padded head as is.

From a ``transformers.Trainer``::

    class DistilTrainer(transformers.Trainer):
        def __init__(self, *a, teacher, **kw):
            super().__init__(*a, **kw)
            self.teacher = teacher.eval().requires_grad_(False)
            self.kd = fastkd.nn.FusedLinearKDLoss(divergence="kl", temperature=2.0, ce_weight=0.5)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")[:, 1:]
            hidden = model.model(**inputs).last_hidden_state[:, :-1]
            with torch.no_grad():
                teacher_hidden = self.teacher.model(**inputs).last_hidden_state[:, :-1]
            loss = self.kd(hidden, model.lm_head.weight, (teacher_hidden, self.teacher.lm_head.weight), labels)
            return (loss, None) if return_outputs else loss

With TRL's on-policy data (GKD-style: the student generates, the teacher scores): generate
``completions = student.generate(prompts, do_sample=True)``, build ``labels`` with the prompt
positions set to -100 (only generated tokens are distilled; ``ignore_index`` skips the rest),
run both models' ``.model`` on the completions as above, and call the same loss, e.g.
``divergence="jsd", beta=0.5`` for TRL's generalised JSD (``GKDTrainer`` with ``lmbda=1``), or
``divergence="reverse_kl"``. The fused loss replaces ``GKDTrainer.generalized_jsd_loss`` on the
logits: override ``compute_loss`` exactly as above.
"""
import argparse
import glob
import math
import os
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastkd  # noqa: E402
from fastkd.bench.memory import PeakRSS  # noqa: E402
from fastkd.nn import FusedLinearKDLoss  # noqa: E402

QUICK = dict(text_bytes=400_000, vocab=1000, seq=64, batch=8, teacher_steps=50, student_steps=20,
             teacher=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=344),
             student=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=172))
FULL = dict(text_bytes=2_000_000, vocab=4000, seq=128, batch=8, teacher_steps=500, student_steps=200,
            teacher=dict(hidden_size=192, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512),
            student=dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256))
TINY = dict(QUICK, text_bytes=60_000, vocab=300, seq=32, batch=4, teacher_steps=2, student_steps=3,
            teacher=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
            student=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
TEMPERATURE, CE_WEIGHT = 2.0, 0.5


# ----------------------------------------------------------------------------
# data and tokenizer
# ----------------------------------------------------------------------------

def stdlib_text(limit_bytes: int):
    """Train / validation text: the standard library's .py files, sorted, up to ``limit_bytes``."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "*.py")) if os.path.getsize(f) < 200_000)
    texts, total = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            texts.append(fh.read())
        total += len(texts[-1])
        if total >= limit_bytes:
            break
    split = max(1, len(texts) * 9 // 10)
    return "\n".join(texts[:split]), "\n".join(texts[split:])


def train_tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    chunks = [text[i:i + 10_000] for i in range(0, len(text), 10_000)]
    tok.train_from_iterator(chunks, trainer)
    return tok


def encode(tok, text: str) -> torch.Tensor:
    ids = []
    for i in range(0, len(text), 50_000):
        ids.extend(tok.encode(text[i:i + 50_000]).ids)
    return torch.tensor(ids, dtype=torch.int64)


def batches(ids: torch.Tensor, seq: int, batch: int, steps: int, seed: int):
    """``steps`` batches [batch, seq + 1] of random windows (the same for every method with one seed)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([ids[s:s + seq + 1] for s in start.tolist()])


# ----------------------------------------------------------------------------
# models and training
# ----------------------------------------------------------------------------

def build(kind: str, vocab: int, size: dict, seq: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, max_position_embeddings=seq + 1, tie_word_embeddings=False, **size)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=size["num_attention_heads"], **common))
    return Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=size["num_attention_heads"], **common))


def lm_ce(model, batch: torch.Tensor, vocab: int) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``batch`` (logits restricted to the real vocabulary)."""
    logits = model(input_ids=batch[:, :-1]).logits[..., :vocab]
    return F.cross_entropy(logits.reshape(-1, vocab).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, val_ids: torch.Tensor, seq: int, vocab: int, windows: int = 16) -> float:
    model.eval()
    starts = torch.linspace(0, val_ids.numel() - seq - 2, windows).long().tolist()
    batch = torch.stack([val_ids[s:s + seq + 1] for s in starts])
    loss = lm_ce(model, batch, vocab).item()
    model.train()
    return loss


def train_teacher(teacher, train_ids, cfg, vocab, seed):
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3, weight_decay=0.0)
    for step, batch in enumerate(batches(train_ids, cfg["seq"], cfg["batch"], cfg["teacher_steps"], seed)):
        loss = lm_ce(teacher, batch, vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def student_loss(method, student, teacher, batch, vocab, fused_loss):
    inputs, labels = batch[:, :-1], batch[:, 1:]
    if method == "CE":
        return lm_ce(student, batch, vocab)
    hidden = student.model(input_ids=inputs).last_hidden_state
    with torch.no_grad():
        teacher_hidden = teacher.model(input_ids=inputs).last_hidden_state
    # forward KL: drop the teacher's padded columns (see the module docstring)
    teacher_weight = teacher.lm_head.weight[:vocab]
    if method == "fused":
        return fused_loss(hidden, student.lm_head.weight, (teacher_hidden, teacher_weight), labels)
    logits = student.lm_head(hidden)
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T
    soft = fastkd.kd_loss(logits, teacher_logits, TEMPERATURE, target=labels)
    return soft + CE_WEIGHT * F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1))


def train_student(method, student, teacher, train_ids, val_ids, cfg, vocab, seed):
    fused_loss = FusedLinearKDLoss(divergence="kl", temperature=TEMPERATURE, ce_weight=CE_WEIGHT,
                                   chunk_size=cfg["batch"] * cfg["seq"] // 4)  # 4 chunks: the chunking is exercised
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.0)
    curve, times, peak_mb = [], [], 0.0
    for step, batch in enumerate(batches(train_ids, cfg["seq"], cfg["batch"], cfg["student_steps"], seed + 1)):
        measure = step == 2  # one step after warm-up: peak extra resident memory
        t0 = time.perf_counter()
        with PeakRSS() if measure else _NoPeak() as peak:
            loss = student_loss(method, student, teacher, batch, vocab, fused_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
        if measure:
            peak_mb = max(peak.peak_kb - peak.base_kb, 0) / 1024
        curve.append(loss.item())
    val = evaluate(student, val_ids, cfg["seq"], vocab)
    return dict(method=method, val_ce=val, ppl=math.exp(val), sec=sorted(times[1:])[len(times[1:]) // 2],
                peak_mb=peak_mb, curve=curve)


class _NoPeak:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small models and few steps (about 1.5 min on 2 cores)")
    size.add_argument("--tiny", action="store_true", help="a smoke run for the tests (seconds of training)")
    p.add_argument("--teacher-steps", type=int, default=None)
    p.add_argument("--student-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results table (markdown) here")
    args = p.parse_args(argv)
    cfg = dict(TINY if args.tiny else QUICK if args.quick else FULL)
    if args.teacher_steps is not None:
        cfg["teacher_steps"] = args.teacher_steps
    if args.student_steps is not None:
        cfg["student_steps"] = args.student_steps
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    train_text, val_text = stdlib_text(cfg["text_bytes"])
    tok = train_tokenizer(train_text, cfg["vocab"])
    vocab = tok.get_vocab_size()
    teacher_vocab = 64 * math.ceil((vocab + 1) / 64)  # a padded head, as real tokenizers have: V_t > V
    train_ids, val_ids = encode(tok, train_text), encode(tok, val_text)
    print(f"stdlib text: {len(train_text) / 1e6:.1f} MB train, {len(val_text) / 1e6:.2f} MB val; "
          f"BPE vocabulary V = {vocab}, teacher head V_t = {teacher_vocab}; {train_ids.numel()} train tokens",
          flush=True)

    teacher = build("llama", teacher_vocab, cfg["teacher"], cfg["seq"], args.seed)
    t0 = time.perf_counter()
    train_teacher(teacher, train_ids, cfg, vocab, args.seed)
    teacher.eval().requires_grad_(False)
    teacher_val = evaluate(teacher, val_ids, cfg["seq"], vocab)
    print(f"teacher (Llama, {sum(x.numel() for x in teacher.parameters()) / 1e6:.2f} M params): "
          f"{cfg['teacher_steps']} steps in {time.perf_counter() - t0:.0f} s, val CE {teacher_val:.3f} "
          f"(ppl {math.exp(teacher_val):.1f})", flush=True)

    results = []
    for method in ("CE", "fused", "unfused"):
        student = build("qwen2", vocab, cfg["student"], cfg["seq"], args.seed + 1)  # the same init for every method
        results.append(train_student(method, student, teacher, train_ids, val_ids, cfg, vocab, args.seed))
        r = results[-1]
        print(f"  {method:8s} val CE {r['val_ce']:.3f}  ppl {r['ppl']:7.1f}  {r['sec'] * 1e3:6.0f} ms/step  "
              f"peak extra {r['peak_mb']:5.0f} MB", flush=True)
    n_params = sum(x.numel() for x in student.parameters())
    fused, unfused = results[1]["curve"], results[2]["curve"]
    diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(fused, unfused))
    first = abs(fused[0] - unfused[0]) / abs(unfused[0])

    lines = [
        f"Student: Qwen2, {n_params / 1e6:.2f} M params; teacher: Llama, val CE {teacher_val:.3f} "
        f"(ppl {math.exp(teacher_val):.1f}); {cfg['student_steps']} student steps of {cfg['batch']} x {cfg['seq']} "
        f"tokens; KD: T = {TEMPERATURE}, ce_weight = {CE_WEIGHT}.",
        "",
        "| method | val CE | val ppl | time / step | peak extra memory (one step) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['method']} | {r['val_ce']:.3f} | {r['ppl']:.1f} | {r['sec'] * 1e3:.0f} ms | "
                     f"{r['peak_mb']:.0f} MB |")
    lines += ["", f"fused vs unfused loss curves: relative difference {first:.1e} at step 1, at most {diff:.1e} "
                  f"over {len(fused)} steps (float32 rounding, compounded by the optimizer)",
              f"total {time.perf_counter() - t_start:.0f} s"]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    return results, first, diff


if __name__ == "__main__":
    main()
