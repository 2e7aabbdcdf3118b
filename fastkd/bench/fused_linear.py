"""Fused linear distillation on the CPU: time per step and peak extra memory (issue 11).

    python -m fastkd.bench --fused-linear
    python -m fastkd.bench.fused_linear [--shapes 2048x512,512x512] [--vocab 128256] [--steps 3]
                                        [--providers fused,unfused,unfused_fastkd,matmuls,liger] [--csv FILE]
    python -m fastkd.bench.fused_linear --ignored 0.5 --providers fused,fused_dropped   # prompt rows

One training step (forward + backward, float32) of forward KL (T = 1) between a
student head ``[V, H]`` and a teacher head ``[V, H]`` on ``N`` rows, per provider:

- ``fused``: ``fastkd.fused_linear_kd_loss(h, W, (h_t, W_t), divergence="kl")``, default chunk size.
- ``fused_dropped``: the same after dropping the rows whose target is ``-100`` (``h[keep]``, as
  ``fastkd.integrations`` does before the head): with ``--ignored F`` the first ``F N`` rows are
  ignored (a prompt); ``fused`` projects them and gives them weight 0, ``fused_dropped`` never
  projects them. Same loss and gradients.
- ``unfused``: plain eager PyTorch, ``kl_div(log_softmax(h @ W.T), log_softmax(h_t @ W_t.T))``.
- ``unfused_fastkd``: the same head matmuls, then ``fastkd.kd_loss(..., temperature=1)`` on the logits.
- ``matmuls``: the four head matmuls alone (student and teacher forward, ``g @ W`` and ``g^T @ h``),
  the floor any fused path pays on a CPU.
- ``trl``: TRL's chunked head (``trl.trainer.distillation_trainer._chunked_divergence_loss``, beta = 0:
  forward KL, the rows with target -100 masked), when importable (``fastkd[trl]``).
- ``liger``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=0,
  weight_soft_loss=1, compiled=True)`` (forward KL, its batchmean over rows), when importable.

Each provider runs in its own process (memory figures are process-wide) and warms up (Liger
compiles there); then the driver steps the providers in turn, ``--steps`` rounds with the order
rotating, so a change of load on a shared machine reaches every provider alike; time = median,
with the range, and each ratio is the median of the per-round ratios (with their range). Peak extra memory = the
growth of the resident set (VmHWM after ``malloc_trim``, fastkd's gradient cache emptied) over
the timed steps, above the inputs: what the step adds, gradients included. Prints a table with
the ratios the issue targets and writes one CSV row per (shape, provider).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import fastkd
from fastkd.bench.memory import PeakRSS
from fastkd.losses.fused_linear import default_chunk_size, fused_linear_kd_loss

PROVIDERS = ("fused", "unfused", "unfused_fastkd", "matmuls", "liger", "trl")
# also: "fused_dropped" (--ignored), "fused_entropy" (return_entropy=True), "fused_mutual" / "unfused_mutual" (a teacher that learns: teacher_grad=True)
IGNORED = 0.0  # --ignored: the fraction of rows (the first ones) whose target is -100


def _inputs(n, h, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(n, h, generator=g)
    student_weight = (torch.randn(v, h, generator=g) * h ** -0.5).requires_grad_(True)
    teacher_hidden = torch.randn(n, h, generator=g)
    teacher_weight = torch.randn(v, h, generator=g) * h ** -0.5
    target = torch.randint(0, v, (n,), generator=g)
    target[:int(n * IGNORED)] = -100
    return student_hidden.requires_grad_(True), student_weight, teacher_hidden, teacher_weight, target


def _step_fn(provider, h, w, th, tw, target):
    """A function running one forward + backward; returns the loss value."""
    if provider == "fused":
        def step():
            loss = fused_linear_kd_loss(h, w, (th, tw), target, divergence="kl", temperature=1.0)
            loss.backward()
            return loss.item()
    elif provider == "fused_entropy":  # and the student's entropy (TRL's metric) from the chunks' logits
        def step():
            loss, _ = fused_linear_kd_loss(h, w, (th, tw), target, divergence="kl", temperature=1.0,
                                           return_entropy=True)
            loss.backward()
            return loss.item()
    elif provider == "fused_dropped":
        def step():
            keep = target != -100  # a data-dependent gather (a host read on a GPU)
            loss = fused_linear_kd_loss(h[keep], w, (th[keep], tw), target[keep], divergence="kl", temperature=1.0)
            loss.backward()
            return loss.item()
    elif provider in ("fused_mutual", "unfused_mutual"):  # the teacher learns too (deep mutual learning)
        th.requires_grad_(True)
        tw.requires_grad_(True)

        def step():
            if provider == "fused_mutual":
                loss = fused_linear_kd_loss(h, w, (th, tw), target, divergence="kl", temperature=1.0,
                                            teacher_grad=True)
            else:
                s, t = h @ w.T, th @ tw.T
                loss = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                                  log_target=True, reduction="batchmean")
                del s, t
            loss.backward()
            return loss.item()
    elif provider in ("unfused", "unfused_fastkd"):
        def step():
            s = h @ w.T
            with torch.no_grad():
                t = th @ tw.T
            if provider == "unfused":
                loss = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1),
                                                  log_target=True, reduction="batchmean")
            else:
                loss = fastkd.kd_loss(s, t, temperature=1.0)
            del t
            loss.backward()
            return loss.item()
    elif provider == "matmuls":
        def step():
            with torch.no_grad():
                s = h @ w.T
                t = th @ tw.T
                del t
                gh = s @ w  # the logit gradient stands in for s
                gw = s.T @ h
                del s
            h.grad, w.grad = gh, gw
            return 0.0
    elif provider == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def step():
            mask = (target != -100).unsqueeze(0)
            loss = _chunked_divergence_loss(h.unsqueeze(0), th.unsqueeze(0), w, tw, mask, 0.0)[0]
            loss.backward()
            return loss.item()
    elif provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(beta=0.0, weight_hard_loss=0.0, weight_soft_loss=1.0, compiled=True)

        def step():
            loss = loss_fn(h, w, th, tw, target)
            loss.backward()
            return loss.item()
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return step


def worker(provider, n, h, v):
    """A provider's process: warm up, then one timed step per "step" line on stdin (its seconds on stdout);
    "done" prints the peak memory and the loss as JSON. The driver alternates the providers step by step,
    so a change of machine load reaches every provider alike."""
    hs, w, th, tw, target = _inputs(n, h, v)
    step = _step_fn(provider, hs, w, th, tw, target)
    value = step()  # warm-up (compilation, lazy initialisation)
    hs.grad = w.grad = None
    if hasattr(torch.ops.fastkd, "empty_grad_cache"):
        torch.ops.fastkd.empty_grad_cache()
    print("ready", flush=True)
    with PeakRSS() as peak:
        for line in sys.stdin:
            if line.strip() != "step":
                break
            hs.grad = w.grad = None
            t0 = time.perf_counter()
            value = step()
            print(time.perf_counter() - t0, flush=True)
    print(json.dumps({"peak_extra_mb": max(peak.peak_kb - peak.base_kb, 0) / 1024, "loss": value,
                      "threads": torch.get_num_threads()}), flush=True)


# Phases of a fused step, by the ops that make them (torch.profiler's self CPU time per op name).
PHASES = (
    ("matmuls", ("aten::mm", "aten::addmm", "aten::matmul", "aten::bmm")),
    ("loss kernel", ("fastkd::divergence_fwd", "fastkd::kd_fwd")),
    ("allocation", ("aten::empty", "aten::empty_strided", "aten::zeros", "aten::new_empty", "aten::zero_",
                    "aten::fill_")),
)


def profile(n, h, v, steps=1):
    """Where one fused step's time goes: self CPU seconds per phase (matmuls, the loss kernel, allocation,
    and every other op: elementwise passes, copies, reductions), from ``torch.profiler``."""
    hs, w, th, tw, target = _inputs(n, h, v)
    step = _step_fn("fused", hs, w, th, tw, target)
    step()  # warm-up
    hs.grad = w.grad = None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            hs.grad = w.grad = None
            step()
        wall = (time.perf_counter() - t0) / steps
    totals = {name: 0.0 for name, _ in PHASES}
    totals["elementwise and other ops"] = 0.0
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / steps
        phase = next((name for name, ops in PHASES if event.key in ops), "elementwise and other ops")
        totals[phase] += seconds
    totals["python and launch (wall minus ops)"] = max(wall - sum(totals.values()), 0.0)
    return wall, totals


def _spread(xs):
    return f"{min(xs):.2f}-{max(xs):.2f}"


def run_shape(n, h, v, providers, steps):
    """Every provider in its own process, stepped in turn (the order rotating each round)."""
    procs = {}
    for provider in providers:
        cmd = [sys.executable, "-m", "fastkd.bench.fused_linear", "--worker", provider, str(n), str(h), str(v),
               "--ignored", str(IGNORED)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "ready":  # warm-ups one after the other: no overlap
            why = (proc.stderr.read().strip().splitlines() or ["?"])[-1]
            print(f"  {provider:15s} failed: {why}", flush=True)
            continue
        procs[provider] = proc
    times = {p: [] for p in procs}
    order = list(procs)
    for r in range(steps):
        for provider in order[r % len(order):] + order[:r % len(order)]:
            procs[provider].stdin.write("step\n")
            procs[provider].stdin.flush()
            times[provider].append(float(procs[provider].stdout.readline()))
    results = {}
    for provider, proc in procs.items():
        proc.stdin.write("done\n")
        proc.stdin.flush()
        info = json.loads(proc.stdout.readline())
        proc.wait()
        results[provider] = {"provider": provider, "n": n, "h": h, "v": v, "times": times[provider],
                             "seconds": statistics.median(times[provider]), **info}
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="2048x512,512x512", help="comma-separated NxH")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--csv", default=None)
    p.add_argument("--profile", action="store_true", help="where a fused step's time goes, per phase")
    p.add_argument("--ignored", type=float, default=0.0, help="fraction of rows with target -100 (a prompt)")
    p.add_argument("--worker", nargs=4, metavar=("PROVIDER", "N", "H", "V"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global IGNORED
    IGNORED = args.ignored
    if args.profile:
        for shape in args.shapes.split(","):
            n, h = (int(x) for x in shape.lower().split("x"))
            wall, totals = profile(n, h, args.vocab)
            print(f"N={n} H={h} V={args.vocab}: fused step {wall:.2f} s")
            for phase, seconds in totals.items():
                print(f"  {phase:36s} {seconds:7.2f} s  ({100 * seconds / wall:4.1f}%)")
        return
    if args.worker:
        provider, n, h, v = args.worker
        worker(provider, int(n), int(h), int(v))
        return
    rows, mismatches = [], []
    for shape in args.shapes.split(","):
        n, h = (int(x) for x in shape.lower().split("x"))
        chunk = default_chunk_size(n, args.vocab, args.vocab, h, 4, "cpu")
        print(f"N={n} H={h} V={args.vocab} float32, {IGNORED:.0%} rows ignored, fused chunk {chunk} rows "
              f"({-(-n // chunk)} chunks), "
              f"{args.steps} steps per provider, alternated", flush=True)
        results = run_shape(n, h, args.vocab, args.providers.split(","), args.steps)
        for r in results.values():
            print(f"  {r['provider']:15s} {r['seconds']:7.2f} s/step (range {_spread(r['times'])})"
                  f"  peak extra {r['peak_extra_mb']:7.0f} MB  loss {r['loss']:.6f}", flush=True)
        fused = results.get("fused")
        for other in ("unfused", "unfused_fastkd", "liger"):  # the same loss: the values must agree
            if fused and other in results and abs(fused["loss"] - results[other]["loss"]) > 1e-4 * abs(fused["loss"]):
                mismatches.append(f"N={n} H={h}: fused loss {fused['loss']:.7g}, {other} {results[other]['loss']:.7g}")
        if fused:
            for other, label in (("fused_dropped", "time with the ignored rows projected vs dropped"),
                                 ("matmuls", "time vs the four matmuls (target <= 1.1)"),
                                 ("unfused", "time vs unfused eager (target <= 1)"),
                                 ("liger", "time vs Liger chunked (target <= 1)"),
                                 ("trl", "time vs TRL's chunked head")):
                if other in results:  # per round: both measured back to back under the same load
                    ratios = [a / b for a, b in zip(fused["times"], results[other]["times"])]
                    print(f"  fused {label}: {statistics.median(ratios):.2f} (rounds {_spread(ratios)})")
            for other, label in (("unfused", "memory vs unfused eager (target <= 0.15)"),
                                 ("liger", "memory vs Liger chunked (target <= 0.5)")):
                if other in results and results[other]["peak_extra_mb"] > 0:
                    print(f"  fused {label}: {fused['peak_extra_mb'] / results[other]['peak_extra_mb']:.2f}")
        for r in results.values():
            r["chunk"] = chunk
            rows.append(r)
    if args.csv:
        if os.path.dirname(args.csv):
            os.makedirs(os.path.dirname(args.csv), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            fields = ["provider", "n", "h", "v", "chunk", "seconds", "peak_extra_mb", "loss", "threads", "times"]
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: r.get(k) for k in fields})
    for problem in mismatches:
        print("MISMATCH:", problem)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
