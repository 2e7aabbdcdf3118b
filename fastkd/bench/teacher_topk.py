"""The teacher's top-k from its head: ``fastkd.teacher_topk`` against ``torch.topk`` on materialised logits (issue 21).

    python -m fastkd.bench --teacher-topk
    python -m fastkd.bench.teacher_topk [--rows 2048] [--vocab 128256] [--hidden 1024] [--k 64] [--rounds 3]
                                        [--threads N] [--csv FILE]

Providers, on the same float32 ``hidden [N, H]`` and ``weight [V, H]`` (CPU):

- ``fused``: ``fastkd.teacher_topk(hidden, weight, k)`` (default chunk size, the CPU row op);
- ``torch``: ``torch.topk(torch.log_softmax(hidden @ weight.T, -1), k)``, the usual offline top-k
  (it gives no exact tail; its log-probs are the same numbers).

Both run in one process, alternated (the order flips every round, so a change of load on a shared
machine reaches both alike); time = the median over ``--rounds`` (with the range). Peak memory = the
growth of the resident set over one call (VmHWM reset before it, ``fastkd.bench.memory.PeakRSS``),
above the inputs: what the call adds (its outputs included). The two results are compared (ids
equal except where float32 ties differ, log-probs to 1e-4) so a fast wrong answer cannot pass.
"""
import argparse
import csv
import statistics
import time

import torch

import fastkd
from fastkd.bench.memory import PeakRSS

PROVIDERS = ("fused", "torch")


def _inputs(n, h, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * h ** -0.5


def _call(provider, hidden, weight, k):
    if provider == "fused":
        t = fastkd.teacher_topk(hidden, weight, k)
        return t.indices, t.logprobs
    logprobs, ids = torch.topk(torch.log_softmax(hidden @ weight.T, dim=-1), k, dim=-1)
    return ids, logprobs


def run(rows=2048, vocab=128256, hidden=1024, k=64, rounds=3):
    """{provider: {"times": [s], "peak_mb": float}} and the largest log-prob difference between them."""
    h, w = _inputs(rows, hidden, vocab)
    out, results = {}, {}
    for p in PROVIDERS:  # warm-up, memory and the answers
        _call(p, h, w, k)
        with PeakRSS() as mem:
            ids, lp = _call(p, h, w, k)
        results[p] = (ids, lp)
        out[p] = {"times": [], "peak_mb": (mem.peak_kb - mem.base_kb) / 1024}
        del ids, lp
    (ids_f, lp_f), (ids_t, lp_t) = results["fused"], results["torch"]
    diff = (lp_f - lp_t).abs().max().item()
    same_ids = (ids_f == ids_t).float().mean().item()
    if diff > 1e-4 or same_ids < 0.999:
        raise AssertionError(f"teacher_topk and torch.topk disagree: max log-prob difference {diff}, "
                             f"{same_ids:.4%} of the ids equal")
    del results
    for r in range(rounds):
        for p in (PROVIDERS if r % 2 == 0 else PROVIDERS[::-1]):
            t0 = time.perf_counter()
            _call(p, h, w, k)
            out[p]["times"].append(time.perf_counter() - t0)
    return out, diff, same_ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastkd.bench.teacher_topk", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out, diff, same_ids = run(args.rows, args.vocab, args.hidden, args.k, args.rounds)
    shape = f"[{args.rows}, {args.vocab}] H={args.hidden} k={args.k} float32 CPU, {torch.get_num_threads()} threads"
    print(f"teacher top-k, {shape}")
    print(f"{'provider':<8} {'median s':>9} {'range s':>17} {'peak MB over inputs':>20}")
    for p in PROVIDERS:
        ts = out[p]["times"]
        print(f"{p:<8} {statistics.median(ts):9.3f} {min(ts):8.3f}-{max(ts):8.3f} {out[p]['peak_mb']:20.0f}")
    f, t = out["fused"], out["torch"]
    ratios = [b / a for a, b in zip(f["times"], t["times"])]
    print(f"speed-up fused over torch: {statistics.median(ratios):.2f}x (per round {min(ratios):.2f}-{max(ratios):.2f}); "
          f"memory: {f['peak_mb'] / max(t['peak_mb'], 1e-9):.1%} of torch's; max |log-prob diff| {diff:.1e}, "
          f"ids equal {same_ids:.4%}")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["provider", "rows", "vocab", "hidden", "k", "median_s", "min_s", "max_s", "peak_mb"])
            for p in PROVIDERS:
                ts = out[p]["times"]
                wr.writerow([p, args.rows, args.vocab, args.hidden, args.k, statistics.median(ts), min(ts), max(ts),
                             out[p]["peak_mb"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
