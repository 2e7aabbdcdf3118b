"""``python -m fastkd.cache build`` and ``inspect``: run a teacher over text into a cache, and look at one.

``build`` tokenizes the text files, concatenates the documents (the tokenizer's EOS
between them) and cuts the token stream into sequences of ``--seq-len`` tokens (the
last one shorter), then runs a ``transformers`` causal LM over them in batches of
``--batch-size`` and stores ``fastkd.teacher_topk`` of its last hidden state (the
teacher's logits never exist as a ``[tokens, V]`` tensor). The sequences are the same
on every run, so ``--resume`` continues a killed build from the last complete shard
and produces the same files as an uninterrupted build. With ``--num-writers N``,
writer ``w`` (a data-parallel rank) takes the sequences ``i`` with ``i % N == w``.
"""
import argparse
import json
import os
import sys
import time
from typing import List

import torch

from .store import TeacherCache, TeacherCacheWriter

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- inputs ------------------------------------------------------------------------------------

def load_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` (a ``tokenizer.json`` file) or a ``transformers`` tokenizer (a directory)."""
    if os.path.isfile(path):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _encode(tokenizer, text: str) -> List[int]:
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos_id(tokenizer):
    if hasattr(tokenizer, "encode_batch"):
        for name in ("</s>", "<|endoftext|>", "<eos>", "[EOS]"):
            if tokenizer.token_to_id(name) is not None:
                return tokenizer.token_to_id(name)
        return None
    return tokenizer.eos_token_id


def read_documents(files: List[str]) -> List[str]:
    """``.jsonl`` files: one document per line (its ``"text"``); other files: one document each."""
    docs = []
    for path in files:
        if path.endswith(".jsonl"):
            with open(path) as f:
                docs.extend(json.loads(line)["text"] for line in f if line.strip())
        else:
            with open(path) as f:
                docs.append(f.read())
    return docs


def token_sequences(files: List[str], tokenizer, seq_len: int) -> List[torch.Tensor]:
    stream: List[int] = []
    eos = _eos_id(tokenizer)
    for doc in read_documents(files):
        stream.extend(_encode(tokenizer, doc))
        if eos is not None:
            stream.append(eos)
    ids = torch.tensor(stream, dtype=torch.int64)
    return list(ids.split(seq_len))


def load_teacher(spec: str, dtype: torch.dtype, seed: int):
    """A model directory (``from_pretrained``), or a ``config.json`` (random weights from ``seed``: for tests)."""
    import transformers

    if os.path.isfile(spec):
        config = transformers.AutoConfig.from_pretrained(os.path.dirname(spec) or ".")
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(spec)
    return model.to(dtype).eval()


def head_of(model):
    """``(backbone, head weight, head bias, logit_scale, softcap)`` of a causal LM.

    The backbone (``base_model``) gives the last hidden state; the head's scale and soft-cap
    are read from the config as the trainers' integration reads them (``head_options``).
    """
    from ..integrations.transformers import head_options

    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    base = getattr(model, "base_model", model)
    if base is model:
        raise ValueError(f"{type(model).__name__} has no backbone (base_model) apart from its head")
    return (base, head.weight, getattr(head, "bias", None), *head_options(model.config))


# --- build -------------------------------------------------------------------------------------

class Progress:
    """One status line on stderr: tokens done, tokens/s, ETA."""

    def __init__(self, total: int, done: int = 0):
        self.total, self.done, self.start, self.last = total, done, time.perf_counter(), 0.0
        self.first = done

    def update(self, tokens: int, force: bool = False):
        self.done += tokens
        now = time.perf_counter()
        if force or now - self.last > 0.5:
            rate = (self.done - self.first) / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"\r{self.done}/{self.total} tokens  {rate:,.0f} tokens/s  ETA {eta:,.0f} s   ",
                  end="", file=sys.stderr, flush=True)
            self.last = now


def build(args) -> TeacherCache:
    from ..teacher import teacher_topk

    tokenizer = load_tokenizer(args.tokenizer)
    sequences = token_sequences(args.data, tokenizer, args.seq_len)[args.writer::args.num_writers]
    model = load_teacher(args.teacher, DTYPES[args.dtype], args.seed)
    base, weight, bias, logit_scale, softcap = head_of(model)
    vocab = weight.shape[0]
    writer = TeacherCacheWriter(args.out, vocab_size=vocab, k=args.k, logprob_encoding=args.logprob_encoding,
                                temperature=args.temperature, tokenizer=os.path.abspath(args.tokenizer),
                                teacher=args.teacher, shard_tokens=args.shard_tokens, writer=args.writer,
                                resume=args.resume)
    done = writer.num_sequences
    progress = Progress(sum(len(s) for s in sequences), sum(len(s) for s in sequences[:done]))
    # restart at the batch that holds the first missing sequence: the same batches as an uninterrupted run
    first = done - done % args.batch_size
    with writer, torch.inference_mode():
        for b0 in range(first, len(sequences), args.batch_size):
            batch = sequences[b0:b0 + args.batch_size]
            full = [s for s in batch if len(s) == args.seq_len]
            groups = [g for g in (full, [s for s in batch if len(s) != args.seq_len]) if g]  # the short last alone
            at = b0
            for group in groups:
                hidden = base(input_ids=torch.stack(group)).last_hidden_state
                top = teacher_topk(hidden.reshape(-1, hidden.shape[-1]), weight, args.k,
                                   temperature=args.temperature, bias=bias, logit_scale=logit_scale,
                                   softcap=softcap)
                rows = 0
                for seq in group:
                    n = len(seq)
                    if at >= done:
                        writer.add(seq, _rows(top, rows, rows + n))
                        progress.update(n)
                    rows += n
                    at += 1
    progress.update(0, force=True)
    print(file=sys.stderr)
    return TeacherCache(args.out)


def _rows(top, a: int, b: int):
    from ..core.topk import TopKTeacher

    return TopKTeacher(top.indices[a:b], top.logprobs[a:b], mode="tail", tail_logprob=top.tail_logprob[a:b])


# --- inspect -----------------------------------------------------------------------------------

def inspect(args) -> str:
    cache = TeacherCache(args.dir, verify=not args.no_verify)
    h = cache.header
    lines = [
        f"{args.dir}: {len(cache)} sequences, {cache.num_tokens} tokens in {len(cache.shards)} shards",
        f"vocabulary {cache.vocab_size}, k = {cache.k}, temperature {cache.temperature}",
        f"teacher {h['teacher']}, tokenizer {h['tokenizer']}",
        "encodings: " + ", ".join(f"{k} {v}" for k, v in h["encodings"].items()),
        f"{cache.bytes_per_token:.1f} bytes per token (uint32 ids + float32 log-probs: {8 * cache.k})",
    ]
    if len(cache):
        ids, teacher = cache[0]
        tokenizer_path = args.tokenizer or h["tokenizer"]
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path and os.path.exists(tokenizer_path) else None
        show = (lambda i: repr(tokenizer.decode([int(i)]))) if tokenizer is not None else str
        lines.append("sequence 0, first positions (next token: teacher's top 5, probabilities):")
        for pos in range(min(args.rows, len(ids) - 1)):
            top = [(int(i), float(p)) for i, p in zip(teacher.indices[pos, :5], teacher.logprobs[pos, :5].exp())
                   if i >= 0]
            tops = ", ".join(f"{show(i)} {p:.3f}" for i, p in top)
            lines.append(f"  {show(ids[pos])} -> {show(ids[pos + 1])}: {tops}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastkd.cache", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run a teacher over text files into a cache")
    b.add_argument("--teacher", required=True, help="a model directory, or a config.json (random weights)")
    b.add_argument("--data", required=True, nargs="+", help="text files (.jsonl: one {'text': ...} per line)")
    b.add_argument("--tokenizer", required=True, help="a tokenizer directory or tokenizer.json")
    b.add_argument("--k", type=int, default=64)
    b.add_argument("--out", required=True)
    b.add_argument("--temperature", type=float, default=1.0)
    b.add_argument("--seq-len", type=int, default=1024)
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    b.add_argument("--logprob-encoding", choices=["int8", "float16"], default="int8")
    b.add_argument("--shard-tokens", type=int, default=1 << 20)
    b.add_argument("--writer", type=int, default=0, help="this writer's number (its data-parallel rank)")
    b.add_argument("--num-writers", type=int, default=1)
    b.add_argument("--seed", type=int, default=0, help="for a config.json teacher's random weights")
    b.add_argument("--resume", action="store_true", help="continue a killed build of the same command")
    i = sub.add_parser("inspect", help="summarise a cache and decode a sample row")
    i.add_argument("dir")
    i.add_argument("--tokenizer", default=None, help="default: the one the index names")
    i.add_argument("--rows", type=int, default=8)
    i.add_argument("--no-verify", action="store_true", help="skip the checksum of the shard read")
    args = parser.parse_args(argv)
    if args.command == "build":
        if not 0 <= args.writer < args.num_writers:
            parser.error(f"--writer must be in [0, --num-writers = {args.num_writers}), got {args.writer}")
        for name in ("k", "seq_len", "batch_size", "shard_tokens"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1")
        cache = build(args)
        print(cache)
    else:
        print(inspect(args))
    return 0
