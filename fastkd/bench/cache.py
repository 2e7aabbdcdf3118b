"""Throughput of the teacher cache: encode + write, and read + decode + collate, in tokens per second.

    python -m fastkd.bench.cache [--tokens N] [--vocab V] [--k K] [--seq-len S] [--reps R]

The rows are synthetic (random ids, log-probs of a random language-model-like row), so
this measures the cache alone; the teacher's forward and ``teacher_topk`` come on top
(``examples/distill_offline.py`` reports a whole build's throughput).
"""
import argparse
import shutil
import tempfile

import torch

from ..cache import TeacherCache, TeacherCacheWriter, collate
from ..core.topk import TopKTeacher
from .timing import median_seconds


def synthetic_sequences(tokens: int, vocab: int, k: int, seq_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, tokens, seq_len):
        s = min(seq_len, tokens - start)
        ids = (torch.randint(0, vocab, (s, 1), generator=g) + torch.arange(k) * (vocab // k)) % vocab  # distinct
        logprobs = -torch.rand(s, k, generator=g).mul(12).sort(dim=1).values - 0.5
        tail = torch.full((s,), -3.0)
        out.append((torch.randint(0, vocab, (s,), generator=g), TopKTeacher(ids, logprobs, tail_logprob=tail)))
    return out


def run(tokens: int, vocab: int, k: int, seq_len: int, reps: int):
    seqs = synthetic_sequences(tokens, vocab, k, seq_len)
    rows = []
    for encoding in ("int8", "float16"):
        directory = tempfile.mkdtemp(prefix="fastkd-bench-cache-")
        try:
            def write():
                shutil.rmtree(directory, ignore_errors=True)
                with TeacherCacheWriter(directory, vocab_size=vocab, k=k, logprob_encoding=encoding,
                                        shard_tokens=1 << 16) as w:
                    for ids, t in seqs:
                        w.add(ids, t)

            write_s = median_seconds(write, reps)

            def read():
                cache = TeacherCache(directory)  # checksums verified on each shard's first read
                for batch in torch.utils.data.DataLoader(cache, batch_size=8, collate_fn=collate):
                    pass

            read_s = median_seconds(read, reps)
            per_token = TeacherCache(directory).bytes_per_token
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        rows.append((encoding, tokens / write_s, tokens / read_s, per_token))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 17)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"teacher cache, {args.tokens} tokens, V = {args.vocab}, k = {args.k}, sequences of {args.seq_len}")
    print("| encoding | write (tokens/s) | read + collate (tokens/s) | bytes/token |")
    print("|---|---|---|---|")
    for encoding, w, r, b in run(args.tokens, args.vocab, args.k, args.seq_len, args.reps):
        print(f"| {encoding} | {w:,.0f} | {r:,.0f} | {b:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
