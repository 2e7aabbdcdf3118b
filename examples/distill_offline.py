"""Offline distillation: the teacher's top-k cached on disk once, then a student trained from the cache.

    python examples/distill_offline.py [--quick] [--teacher-cache DIR] [--encoding int8|float16] [--out FILE.md]

1. A byte-level BPE tokenizer and a small Llama teacher are trained on the Python standard
   library's own sources (no download), as in ``examples/distill_lm.py``.
2. The training text, cut into sequences, goes through the teacher once:
   ``fastkd.teacher_topk`` of its last hidden state (k = 16) into a ``fastkd.cache``
   (``--teacher-cache DIR``, default a temporary directory; the command-line equivalent is
   ``python -m fastkd.cache build``). Reported: build throughput and bytes per token.
3. The same student initialisation is trained on the same batches twice with
   ``fused_linear_kd_loss`` (top-k teacher, tail mode, plus 0.5 CE):
   ``online``: the teacher in memory, its top-k computed every step;
   ``cache``: the teacher's top-k read from the cache (``TeacherCache`` + ``collate``).
   Reported: time per step (median), the largest difference between the two loss curves
   (the cache's encoding error is all that separates them), validation cross-entropy.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastkd  # noqa: E402
from fastkd.cache import TeacherCache, TeacherCacheWriter, collate  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distill_lm import build, encode, evaluate, stdlib_text, train_teacher, train_tokenizer  # noqa: E402

QUICK = dict(text_bytes=300_000, vocab=1000, seq=64, batch=8, teacher_steps=40, student_steps=12, k=16,
             teacher=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=344),
             student=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=172))
FULL = dict(text_bytes=2_000_000, vocab=4000, seq=128, batch=8, teacher_steps=400, student_steps=150, k=16,
            teacher=dict(hidden_size=192, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512),
            student=dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256))
CE_WEIGHT = 0.5


def teacher_rows(teacher, input_ids: torch.Tensor, k: int) -> fastkd.TopKTeacher:
    """The teacher's top-k for a batch ``[B, S]``, from its hidden states (no ``[tokens, V]`` logits)."""
    with torch.no_grad():
        hidden = teacher.model(input_ids=input_ids).last_hidden_state
        top = fastkd.teacher_topk(hidden.reshape(-1, hidden.shape[-1]), teacher.lm_head.weight, k)
    shape = tuple(input_ids.shape) + (k,)
    return fastkd.TopKTeacher(top.indices.reshape(shape), top.logprobs.reshape(shape),
                              tail_logprob=top.tail_logprob.reshape(shape[:-1]))


def build_cache(teacher, sequences, directory, k, encoding, batch):
    vocab = teacher.lm_head.weight.shape[0]
    t0 = time.perf_counter()
    with TeacherCacheWriter(directory, vocab_size=vocab, k=k, logprob_encoding=encoding,
                            teacher="distill_offline.py Llama") as writer:
        for b0 in range(0, len(sequences), batch):
            ids = torch.stack(sequences[b0:b0 + batch])
            top = teacher_rows(teacher, ids, k)
            for row in range(ids.shape[0]):
                writer.add(ids[row], fastkd.TopKTeacher(top.indices[row], top.logprobs[row],
                                                        tail_logprob=top.tail_logprob[row]))
    seconds = time.perf_counter() - t0
    return TeacherCache(directory), sum(len(s) for s in sequences) / seconds


def train_student(source, student, teacher, cache, cfg, seed):
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(cache, batch_size=cfg["batch"], shuffle=True, generator=order,
                                         collate_fn=collate)
    curve, times = [], []
    while len(curve) < cfg["student_steps"]:
        for batch in loader:
            t0 = time.perf_counter()
            top = teacher_rows(teacher, batch["input_ids"], cfg["k"]) if source == "online" else batch["teacher"]
            hidden = student.model(input_ids=batch["input_ids"]).last_hidden_state
            loss = fastkd.fused_linear_kd_loss(hidden, student.lm_head.weight, top, batch["target"],
                                               ce_weight=CE_WEIGHT)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            curve.append(loss.item())
            if len(curve) == cfg["student_steps"]:
                break
    return curve, statistics.median(times[1:] or times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run (under a minute on 2 cores)")
    parser.add_argument("--teacher-cache", default=None, help="where to write the cache (default: a temporary dir)")
    parser.add_argument("--encoding", choices=["int8", "float16"], default="int8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the table here (Markdown)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    torch.manual_seed(args.seed)
    train_text, val_text = stdlib_text(cfg["text_bytes"])
    tok = train_tokenizer(train_text, cfg["vocab"])
    vocab = tok.get_vocab_size()
    train_ids, val_ids = encode(tok, train_text), encode(tok, val_text)
    teacher = build("llama", vocab, cfg["teacher"], cfg["seq"], args.seed)
    train_teacher(teacher, train_ids, cfg, vocab, args.seed)
    teacher.eval().requires_grad_(False)
    usable = train_ids.numel() // cfg["seq"] * cfg["seq"]
    sequences = list(train_ids[:usable].split(cfg["seq"]))[:cfg["student_steps"] * cfg["batch"]]

    directory = args.teacher_cache or tempfile.mkdtemp(prefix="fastkd-cache-")
    cache, tokens_per_s = build_cache(teacher, sequences, directory, cfg["k"], args.encoding, cfg["batch"])
    results = {}
    for source in ("online", "cache"):
        student = build("qwen2", vocab, cfg["student"], cfg["seq"], args.seed + 1)
        curve, step_s = train_student(source, student, teacher, cache, cfg, args.seed + 2)
        results[source] = (curve, step_s, evaluate(student, val_ids, cfg["seq"], vocab))
    (c_on, t_on, v_on), (c_off, t_off, v_off) = results["online"], results["cache"]
    diff = max(abs(a - b) / abs(a) for a, b in zip(c_on, c_off))
    lines = [
        f"Offline distillation ({'quick' if args.quick else 'full'} run, {args.encoding} cache, k = {cfg['k']}, "
        f"V = {vocab}, {len(sequences)} sequences of {cfg['seq']} tokens, {cfg['student_steps']} student steps)",
        "",
        f"cache: {cache.num_tokens} tokens, {cache.bytes_per_token:.1f} bytes/token, "
        f"built at {tokens_per_s:,.0f} tokens/s (teacher forward + teacher_topk + encoding + writing)",
        "",
        "| teacher | time per step (median) | final training loss | validation CE |",
        "|---|---|---|---|",
        f"| online (in memory) | {1000 * t_on:.1f} ms | {c_on[-1]:.4f} | {v_on:.4f} |",
        f"| cache | {1000 * t_off:.1f} ms ({t_off / t_on:.2f}x) | {c_off[-1]:.4f} | {v_off:.4f} |",
        "",
        f"largest relative difference between the two loss curves: {diff:.2e}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return diff


if __name__ == "__main__":
    main()
