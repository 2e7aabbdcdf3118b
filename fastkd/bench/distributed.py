"""Distributed distillation on gloo (CPU): time per step and bytes per call (issue 12).

    python -m fastkd.bench --distributed 2
    python -m fastkd.bench.distributed --world 2 [--rows 1024 --vocab 32000 --repeat 5 --csv out.csv]

Vocabulary parallel: each of ``--world`` processes (one thread each) holds a
``[rows, vocab / world]`` shard of the student and teacher logits and runs the
``fastkd.distributed`` loss (forward + backward); the time per step is the
slowest rank's median. The baselines do the same total work in one process with
``--world`` threads: the fused ``fastkd`` loss (``backend="auto"``) and the
plain-PyTorch reference (``backend="reference"``) on the full ``[rows, vocab]``.
Data parallel (DIST): each rank holds ``rows / world`` rows of ``[rows, classes]``.

Bytes per call are counted by ``fastkd.distributed.count_comm`` (every collective
goes through one helper) and printed next to the formula.
"""
import argparse
import csv
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd
from fastkd import distributed as D
from fastkd.core.topk import TopKTeacher

TOPK = 32
HIDDEN = 256


def _hidden(rows, seed=1):
    return torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _head(vocab, seed=2):
    """(student head weight [V, H], teacher hidden [rows, H] is made by the caller, teacher weight [V, H])."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, HIDDEN, generator=g) * 0.05, torch.randn(vocab, HIDDEN, generator=g) * 0.05


def _inputs(rows, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g) * 2
    t = torch.randn(rows, vocab, generator=g) * 2
    target = torch.randint(0, vocab, (rows,), generator=g)
    return s, t, target


def _topk(t, temperature):
    return TopKTeacher.from_logits(t, TOPK, temperature=temperature)


# name -> (sharded call, unsharded call(backend), vocabulary parallel?)
def _cases(group):
    return {
        "kd T=2 +CE": (
            lambda s, t, y: D.kd_loss(s, t, 2.0, process_group=group, target=y, ce_weight=0.5),
            lambda s, t, y, b: fastkd.kd_loss(s, t, 2.0, target=y, ce_weight=0.5, backend=b),
            True),
        "kd T=2": (
            lambda s, t, y: D.kd_loss(s, t, 2.0, process_group=group),
            lambda s, t, y, b: fastkd.kd_loss(s, t, 2.0, backend=b), True),
        "jsd beta=0.5": (
            lambda s, t, y: D.jsd_loss(s, t, process_group=group),
            lambda s, t, y, b: fastkd.jsd_loss(s, t, backend=b if b == "reference" else "auto"), True),
        f"kd top-{TOPK} tail": (
            lambda s, t, y: D.kd_loss(s, t, 2.0, process_group=group),
            lambda s, t, y, b: fastkd.kd_loss(s, t, 2.0, backend=b if b == "reference" else "auto"), True),
        "dkd": (
            lambda s, t, y: D.dkd_loss(s, t, y, process_group=group),
            lambda s, t, y, b: fastkd.dkd_loss(s, t, y, backend=b), True),
        "dist (rows sharded)": (
            lambda s, t, y: D.dist_loss(s, t, process_group=group),
            lambda s, t, y, b: fastkd.dist_loss(s, t, backend=b), False),
        # the fused LM head + KL: s = the head weight (a vocabulary shard, rows of [V, H]); t = (teacher
        # hidden, teacher head weight shard); hidden states replicated (HIDDEN)
        f"fused linear kl H={HIDDEN}": (
            lambda w, t, y: fastkd.fused_linear_kd_loss(_hidden(y.shape[0]), w, t, y, temperature=2.0,
                                                        ce_weight=0.5, process_group=group),
            lambda w, t, y, b: fastkd.fused_linear_kd_loss(_hidden(y.shape[0]), w, t, y, temperature=2.0,
                                                           ce_weight=0.5, backend=b), "head"),
    }


def _time_step(fn, repeat):
    times = []
    for _ in range(repeat + 1):  # one warm-up
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _worker(rank, world, port, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    group = dist.group.WORLD
    s_full, t_full, y = _inputs(args.rows, args.vocab)
    width = args.vocab // world
    cols = slice(rank * width, (rank + 1) * width)
    rows_per = args.rows // world
    rows = slice(rank * rows_per, (rank + 1) * rows_per)
    for name, (sharded, _, vocab_parallel) in _cases(group).items():
        if vocab_parallel == "head":
            w_full, tw_full = _head(args.vocab)
            s, teacher, target = w_full[cols].contiguous(), (_hidden(args.rows, 3), tw_full[cols].contiguous()), y
        elif vocab_parallel:
            s, t = s_full[:, cols].contiguous(), t_full[:, cols].contiguous()
            teacher = t
            if "top-" in name:
                teacher = _topk(t_full, 2.0)  # ids over the whole vocabulary, replicated
            target = y
        else:
            s, t, target = s_full[rows].contiguous(), t_full[rows].contiguous(), None
            teacher = t
        s.requires_grad_()

        def step():
            s.grad = None
            sharded(s, teacher, target).backward()

        with D.count_comm() as c:
            step()
        dist.barrier()
        sec = _time_step(step, args.repeat)
        slowest = torch.tensor([sec])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # not counted: benchmark bookkeeping
        if rank == 0:
            queue.put((name, slowest.item(), c.bytes, c.calls, vocab_parallel))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--csv", default=None)
    p.add_argument("--no-baselines", action="store_true", help="time the sharded losses only")
    args = p.parse_args(argv)
    if args.vocab % args.world or args.rows % args.world:
        p.error("--vocab and --rows must be multiples of --world")

    # unsharded baselines: the same total work in one process with --world threads
    torch.set_num_threads(args.world)
    s_full, t_full, y = _inputs(args.rows, args.vocab)
    base = {}
    for name, (_, unsharded, kind) in ({} if args.no_baselines else _cases(None)).items():
        teacher = _topk(t_full, 2.0) if "top-" in name else t_full
        inputs = s_full
        if kind == "head":
            inputs, tw_full = _head(args.vocab)
            teacher = (_hidden(args.rows, 3), tw_full)
        for backend in ("auto", "reference"):
            s = inputs.clone().requires_grad_()

            def step():
                s.grad = None
                unsharded(s, teacher, y, backend).backward()

            base[name, backend] = _time_step(step, args.repeat)

    queue = mp.get_context("fork").SimpleQueue()
    # fork: the workers inherit the imported torch and fastkd
    mp.start_processes(_worker, args=(args.world, _free_port(), args, queue), nprocs=args.world,
                       start_method="fork")
    results = []
    while not queue.empty():
        results.append(queue.get())

    print(f"gloo CPU, world {args.world} (1 thread per rank) vs one process with {args.world} threads; "
          f"rows {args.rows}, vocab {args.vocab}, float32, forward + backward, median of {args.repeat}")
    print(f"{'loss':<22}{'sharded ms':>12}{'fused ms':>10}{'ref ms':>10}{'bytes/call':>12}{'calls':>7}"
          f"{'formula':>10}")
    rows_out = []
    nan = float("nan")
    for name, sec, nbytes, calls, vocab_parallel in results:
        base.setdefault((name, "auto"), nan)
        base.setdefault((name, "reference"), nan)
        formula = _formula(name, args)
        print(f"{name:<22}{sec * 1e3:>12.1f}{base[name, 'auto'] * 1e3:>10.1f}"
              f"{base[name, 'reference'] * 1e3:>10.1f}{nbytes:>12}{calls:>7}{formula:>10}")
        rows_out.append(dict(loss=name, world=args.world, rows=args.rows, vocab=args.vocab,
                             sharded_ms=sec * 1e3, fused_unsharded_ms=base[name, "auto"] * 1e3,
                             reference_unsharded_ms=base[name, "reference"] * 1e3, bytes_per_call=nbytes,
                             calls=calls, formula_bytes=formula))
        assert nbytes == formula, f"{name}: counted {nbytes} bytes, formula says {formula}"
    print("bytes per call (float32, N rows, K top-k ids, P ranks; + 32 for the shape check: 4 int64):")
    print("  dense divergence, CE and student + teacher grads: 4 N (2 + 4 + 3);  without CE: 4 N (2 + 2 + 2)"
          " (student grad only)")
    print(f"  top-k tail, no CE: 4 N (2 + 2 + K)  (K = {TOPK});  dkd: 4 N (4 + 6 + 2)")
    print("  dist (rows sharded, C classes): 4 (2 C + 2) + 4 (3 C) forward, the same again in backward")
    print(f"  fused linear (head weight sharded, H = {HIDDEN}): as kd + CE; + 4 N H when the hidden states need a "
          "gradient (not here)")
    print("  none depends on the vocabulary (V)")
    if args.csv:
        if os.path.dirname(args.csv):
            os.makedirs(os.path.dirname(args.csv), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows_out[0]))
            w.writeheader()
            w.writerows(rows_out)


def _formula(name, args):
    """Bytes per call from the formula (module docstring of fastkd.distributed), for the case ``name``."""
    n = args.rows
    if name == "kd T=2 +CE":  # student grad only: MAX 2, SUM 2 + 2 CE, SUM 2
        return 4 * n * (2 + 4 + 2) + 32
    if name in ("kd T=2", "jsd beta=0.5"):
        return 4 * n * (2 + 2 + 2) + 32
    if name.startswith("kd top-"):
        return 4 * n * (2 + 2 + TOPK) + 32
    if name == "dkd":
        return 4 * n * (4 + 6 + 2) + 32
    if name.startswith("dist"):
        c = args.vocab
        return 4 * ((2 * c + 2) + 3 * c) * 2
    if name.startswith("fused linear"):  # one chunk of rows here; no grad_hidden (the hidden is a constant)
        return 4 * n * (2 + 4 + 2) + 32
    raise KeyError(name)


if __name__ == "__main__":
    sys.exit(main())
