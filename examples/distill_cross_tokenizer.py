"""Distil across tokenizers (issue 23): a teacher with a 4000-token BPE, a student with a 1000-token BPE.

    python examples/distill_cross_tokenizer.py [--seeds 3] [--teacher-steps N] [--student-steps N] [--out FILE.md]

Data: the Python standard library's ``.py`` sources (``distill_lm.stdlib_text``, no download), split
90/10. Two byte-level BPE tokenizers are trained on the same training text with ``tokenizers``: 4000
tokens for the teacher, 1000 for the student. A small Llama teacher is trained with cross-entropy on
its own tokens, then frozen; a smaller Qwen2 student is trained from the same initialisation on the
same character windows in three ways (AdamW):

    CE       the student's next-token cross-entropy on its own tokens
    ULD      CE + fastkd.uld_loss on the aligned, merged distributions
    hybrid   CE + fastkd.hybrid_uld_loss (generalised JSD on the shared tokens, ULD on the rest)

Each batch is a set of character windows of the training text, tokenized by both tokenizers with
offsets; ``fastkd.align_tokens`` groups the positions of both sides between common cuts (the first
group, which holds the unpredicted first token, is dropped), ``fastkd.merge_aligned`` ("observed":
the first token's predictive distribution times the later tokens' probabilities) gives one row per
group on each side, and the loss compares them (``inputs="log_probs"``, padding groups masked with
``Alignment.target()``). Reported: validation bits per byte (the student's cross-entropy on the
validation text, in bits, over its bytes: the only figure comparable across tokenizers), mean and
spread over the seeds, and the teacher's.
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastkd  # noqa: E402
from distill_lm import build, stdlib_text, train_tokenizer  # noqa: E402

CFG = dict(text_bytes=1_000_000, window=320, batch=8, teacher_steps=400, student_steps=200, lr=3e-3,
           teacher=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=344),
           student=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=172))
DISTILL_WEIGHT = 1.0


def tokenize(tok, texts):
    """Padded ids [B, L], offsets [B, L, 2] and mask [B, L] of each text."""
    enc = [tok.encode(t) for t in texts]
    width = max(len(e.ids) for e in enc)
    ids = torch.zeros(len(texts), width, dtype=torch.int64)
    offsets = torch.zeros(len(texts), width, 2, dtype=torch.int64)
    mask = torch.zeros(len(texts), width, dtype=torch.bool)
    for i, e in enumerate(enc):
        n = len(e.ids)
        ids[i, :n], offsets[i, :n], mask[i, :n] = torch.tensor(e.ids), torch.tensor(e.offsets).reshape(-1, 2), True
    return ids, offsets, mask


def windows(text, size, batch, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(text) - size, (batch,), generator=g).tolist()
        yield [text[s:s + size] for s in starts]


def ce(model, ids, mask, vocab, reduction="mean"):
    logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1, :vocab].float()
    target = torch.where(mask[:, 1:], ids[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), reduction=reduction), logits


def predictive(logits, ids, group):
    """``logits [B, L - 1, V]`` (position i - 1 predicts token i): per token i >= 1 its predictive
    log-probs, its id and its group - 1 (group 0, which holds the unpredicted first token, is dropped)."""
    return logits.log_softmax(-1), ids[:, 1:], torch.where(group[:, 1:] > 0, group[:, 1:] - 1, -1)


def distill_term(method, s_logits, t_logits, side_s, side_t, vocab_map):
    (s_ids, s_off, s_mask), (t_ids, t_off, t_mask) = side_s, side_t
    al = fastkd.align_tokens(s_off, t_off, s_mask, t_mask)
    groups = int(al.num_groups.max()) - 1
    if groups < 1:
        return s_logits.sum() * 0.0
    s_lp, s_tok, s_group = predictive(s_logits, s_ids, al.student_group)
    t_lp, t_tok, t_group = predictive(t_logits, t_ids, al.teacher_group)
    s_rows = fastkd.merge_aligned(s_lp, s_tok, s_group, "observed", num_groups=groups)
    t_rows = fastkd.merge_aligned(t_lp, t_tok, t_group, "observed", num_groups=groups)
    target = torch.where(torch.arange(groups) < (al.num_groups - 1).unsqueeze(1), 0, -100)
    if method == "uld":
        return fastkd.uld_loss(s_rows, t_rows, inputs="log_probs", target=target)
    return fastkd.hybrid_uld_loss(s_rows, t_rows, vocab_map, inputs="log_probs", target=target)


@torch.no_grad()
def bits_per_byte(model, tok, text, vocab, window=2000, count=12):
    """Cross-entropy of ``model`` on ``count`` windows of ``text``, in bits per byte of the predicted tokens."""
    model.eval()
    nats = bytes_ = 0.0
    for start in torch.linspace(0, len(text) - window - 1, count).long().tolist():
        piece = text[start:start + window]
        ids, offsets, mask = tokenize(tok, [piece])
        loss, _ = ce(model, ids, mask, vocab, reduction="sum")
        nats += loss.item()
        bytes_ += sum(len(piece[a:b].encode()) for a, b in offsets[0, 1:].tolist())
    model.train()
    return nats / math.log(2) / bytes_


def train(model, tok, vocab, text, steps, seed, teacher=None, teacher_tok=None, method="ce", vocab_map=None):
    opt = torch.optim.AdamW(model.parameters(), lr=CFG["lr"], weight_decay=0.0)
    for texts in windows(text, CFG["window"], CFG["batch"], steps, seed):
        ids, off, mask = tokenize(tok, texts)
        loss, logits = ce(model, ids, mask, vocab)
        if method != "ce":
            t_ids, t_off, t_mask = tokenize(teacher_tok, texts)
            with torch.no_grad():
                t_logits = teacher(input_ids=t_ids, attention_mask=t_mask.long()).logits[:, :-1].float()
            loss = loss + DISTILL_WEIGHT * distill_term(method, logits, t_logits, (ids, off, mask),
                                                        (t_ids, t_off, t_mask), vocab_map)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--teacher-steps", type=int, default=CFG["teacher_steps"])
    p.add_argument("--student-steps", type=int, default=CFG["student_steps"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_text, val_text = stdlib_text(CFG["text_bytes"])
    t_tok, s_tok = train_tokenizer(train_text, 4000), train_tokenizer(train_text, 1000)
    vt, vs = t_tok.get_vocab_size(), s_tok.get_vocab_size()
    vocab_map = fastkd.VocabMap.from_tokenizers(s_tok, t_tok)
    print(f"tokenizers: teacher {vt}, student {vs}; {vocab_map}", flush=True)
    window = CFG["window"]
    teacher = build("llama", vt, CFG["teacher"], window, seed=1234)
    t0 = time.time()
    train(teacher, t_tok, vt, train_text, args.teacher_steps, seed=1234)
    teacher.eval().requires_grad_(False)
    teacher_bpb = bits_per_byte(teacher, t_tok, val_text, vt)
    print(f"teacher: {teacher_bpb:.4f} bits/byte ({time.time() - t0:.0f} s)", flush=True)
    results = {m: [] for m in ("ce", "uld", "hybrid")}
    for seed in range(args.seeds):
        for method in results:
            t0 = time.time()
            student = build("qwen2", vs, CFG["student"], window, seed=seed)
            train(student, s_tok, vs, train_text, args.student_steps, seed=100 + seed, teacher=teacher,
                  teacher_tok=t_tok, method=method, vocab_map=vocab_map)
            bpb = bits_per_byte(student, s_tok, val_text, vs)
            results[method].append(bpb)
            print(f"seed {seed} {method:7s} {bpb:.4f} bits/byte ({time.time() - t0:.0f} s)", flush=True)
    lines = [f"Teacher (Llama, {vt}-token BPE, {args.teacher_steps} steps): {teacher_bpb:.4f} bits/byte. "
             f"Student: Qwen2, {vs}-token BPE, {args.student_steps} steps, {args.seeds} seeds; {vocab_map}.", "",
             "| method | validation bits/byte (mean) | spread (stdev) | per seed |", "|---|---|---|---|"]
    for method, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {method} | {statistics.mean(values):.4f} | {spread:.4f} | "
                     f"{', '.join(f'{x:.4f}' for x in values)} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# Distillation across tokenizers (`python examples/distill_cross_tokenizer.py`)\n\n" + table + "\n")
    return results


if __name__ == "__main__":
    main()
