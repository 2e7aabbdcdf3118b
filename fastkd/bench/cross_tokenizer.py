"""ULD across vocabularies on the CPU: fastkd against TRL's GOLD ``ULDLoss`` and against fused KD.

    python -m fastkd.bench.cross_tokenizer [--batch 8] [--seq 256] [--vs 32000] [--vt 50000] [--threads 2]
                                           [--reps 3] [--skip-trl] [--csv out.csv]

Forward + backward (student gradient), float32 logits ``[B, S, V_s]`` and ``[B, S, V_t]``, every row
counted. Providers: ``fastkd uld`` (``backend="auto"``: the CPU kernel ``fastkd::uld_fwd``),
``fastkd uld batched`` (the PyTorch path without a sort), ``fastkd uld log_probs`` / ``... batched``
(``inputs="log_probs"`` on log-softmaxed rows: the kernel, the batched path; the student's log-softmax
included), ``fastkd uld k=64``
(top-64 and the tail masses), ``fastkd hybrid`` (``hybrid_uld_loss``, PyTorch row chunks with the
gradients computed in forward, half the teacher's tokens matched), ``trl uld`` (TRL's ``ULDLoss``: a softmax and a full sort of both
vocabularies per position, a Python loop per sequence; one timed call, it takes tens of seconds),
``fastkd kd`` (``kd_loss`` with T = 1 on ``[B S, V_s]`` both sides: the fused-KD yardstick).
Peak extra memory: the resident set's peak during one call over the inputs (``PeakRSS``), against
one ``[B S, V_s]`` float32 gradient.
"""
import argparse
import csv
import sys
import types

import torch

import fastkd
from fastkd.bench.memory import PeakRSS
from fastkd.bench.timing import median_seconds
from fastkd.losses import uld_rows as U


def _batched(s, t, log_probs: bool = False):
    """The batched PyTorch path of ``uld_loss`` (what ``backend="auto"`` runs off the CPU kernel)."""
    weight = torch.full((s.shape[0] * s.shape[1],), 1.0 / (s.shape[0] * s.shape[1]))
    rows = (s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]))
    return U.RowsFunction.apply(*rows, weight, None, (1.0, 1.0, 0.0, True, False, log_probs), U.uld_op(None))[0]


def _trl_loss():
    try:
        from trl.experimental.gold.gold_trainer import ULDLoss
    except Exception as exc:  # TRL missing or without GOLD
        return None, f"{type(exc).__name__}: {exc}"
    config = dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                  uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                  use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False,
                  uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    return ULDLoss(types.SimpleNamespace(**config)), None


def providers(s, t, skip_trl: bool):
    vs, vt = s.shape[-1], t.shape[-1]
    table = torch.full((vt,), -1, dtype=torch.int64)
    table[: vt // 2] = torch.randperm(vs)[: vt // 2] if vt // 2 <= vs else torch.randint(0, vs, (vt // 2,))
    vocab_map = fastkd.VocabMap(table, vs)
    t_log = torch.log_softmax(t, -1)
    out = {
        "fastkd uld": lambda x: fastkd.uld_loss(x, t),
        "fastkd uld batched": lambda x: _batched(x, t),
        # log-prob rows as merge_aligned gives them (here the logits' log-softmax): the kernel and the batched path
        "fastkd uld log_probs": lambda x: fastkd.uld_loss(torch.log_softmax(x, -1), t_log, inputs="log_probs"),
        "fastkd uld log_probs batched": lambda x: _batched(torch.log_softmax(x, -1), t_log, log_probs=True),
        "fastkd uld k=64": lambda x: fastkd.uld_loss(x, t, k=64),
        "fastkd hybrid": lambda x: fastkd.hybrid_uld_loss(x, t, vocab_map),
        "fastkd kd": lambda x: fastkd.kd_loss(x, t[..., :vs], temperature=1.0),
    }
    if not skip_trl:
        loss, why = _trl_loss()
        if loss is None:
            print(f"trl uld skipped ({why})", file=sys.stderr)
        else:
            labels = torch.zeros(s.shape[:2], dtype=torch.int64)
            out["trl uld"] = lambda x: loss(x, t, labels, labels, labels, labels)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vs", type=int, default=32000)
    parser.add_argument("--vt", type=int, default=50000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated providers to run")
    parser.add_argument("--csv", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    s = torch.randn(args.batch, args.seq, args.vs) * 2
    t = torch.randn(args.batch, args.seq, args.vt) * 2
    grad_mb = s.numel() * 4 / 2**20
    rows = []
    wanted = args.only.split(",") if args.only else None
    chosen = providers(s, t, args.skip_trl or (wanted is not None and "trl uld" not in wanted))
    if wanted:
        chosen = {k: v for k, v in chosen.items() if k in wanted}
    for name, fn in chosen.items():
        x = s.clone().requires_grad_()

        def step():
            x.grad = None
            fn(x).backward()

        reps = 1 if name == "trl uld" else args.reps
        seconds = median_seconds(step, reps, warmup=0 if name == "trl uld" else 1)
        x.grad = None
        with PeakRSS() as peak:
            step()
        extra = (peak.peak_kb - peak.base_kb) / 1024
        rows.append({"provider": name, "shape": f"{args.batch}x{args.seq} Vs={args.vs} Vt={args.vt}",
                     "threads": torch.get_num_threads(), "seconds": round(seconds, 4),
                     "peak_extra_mb": round(extra, 1), "grad_mb": round(grad_mb, 1)})
        print(f"{name:20s} {seconds:8.3f} s   peak +{extra:7.1f} MB (one gradient: {grad_mb:.0f} MB)", flush=True)
    by = {r["provider"]: r["seconds"] for r in rows}
    if "fastkd uld" in by:
        if "trl uld" in by:
            print(f"fastkd uld vs trl uld: {by['trl uld'] / by['fastkd uld']:.1f}x faster")
        if "fastkd kd" in by:
            print(f"fastkd uld / fastkd kd: {by['fastkd uld'] / by['fastkd kd']:.2f}x")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
