"""Benchmarks of the fastkd losses against eager PyTorch, torch.compile and Liger-Kernel.

    python -m fastkd.bench [--quick] [--device cpu|cuda] [--losses kd,dkd,...]
                           [--providers cpu,eager,...] [--csv PATH] [--threads N]

For every loss (kd, ats, dkd, dist, mgd; the LM divergences forward_kl, reverse_kl, jsd, skew_kl,
tvd, jeffreys, triangular, entropy_gated_kl, akl (its own row op, akl_fwd), alpha_divergence, ab_divergence, renyi; kd_ce: KD with ``ce_weight=0.1`` fused, against the fused KD
alone and the fused KD plus ``F.cross_entropy``; kd_topk: KD against a top-64 teacher), shape, dtype and provider it measures
one training step of the loss: forward (``loss = f(student, teacher, ...)`` with
the student requiring grad, as in training), backward (``loss.backward()``)
and both, timed together in each iteration:

* providers: every fused backend of ``fastkd.backends()`` that implements the
  loss on the device ("cpu" on CPU; "cuda" and "triton" on GPU, never the
  Triton interpreter), "eager" (``fastkd.reference``), "compile"
  (``torch.compile(fastkd.reference.<loss>)``, compiled afresh for each shape)
  and, for KD and JSD on CUDA when ``liger_kernel`` is installed, "liger"
  (``LigerKLDIVLoss`` on ``log_softmax`` outputs, times T^2; ``LigerJSD(beta=0.5)``). A backend that does
  not implement a loss yet is skipped with a note.
* time: median, p20 and p80 over the repeats (``time.perf_counter`` on CPU,
  CUDA events on GPU), after one warm-up iteration (two for "compile": the
  first one compiles). The providers of a case run in interleaved rounds (one
  step of each per round), so load from other processes on a shared machine
  slows them alike and the ratios stay meaningful. The fused backends compute the gradient in the forward
  pass, so their "fwd" includes it and their "bwd" is almost free.
* peak memory over the inputs (already allocated), in MB. CUDA:
  ``max_memory_allocated`` after ``reset_peak_memory_stats``. CPU: the growth of
  the process's peak resident set (``VmHWM``, reset by writing 5 to
  ``/proc/self/clear_refs`` after ``malloc_trim``) over its resident set before
  the call: pages really touched, so a freed-and-reused buffer counts once, and
  allocator-level reuse below a page is invisible (small shapes read ~0). If
  ``clear_refs`` is not writable a 1 kHz sampling thread reads
  ``/proc/self/statm`` instead (it can miss peaks shorter than a millisecond).
* effective bandwidth, in the "fwd+bwd" rows only: the bytes of reading both
  input tensors once and writing the student gradient once, divided by the
  fwd+bwd time; ``pct_copy_bw`` compares it with the device's copy bandwidth
  measured in the same run (``dst.copy_(src)`` of a large buffer,
  ``2 * bytes / time``). For MGD the convolutions of the generation block
  dominate the time, so its bandwidth is only indicative.

Before its numbers count, every provider's loss and student gradient are
compared with the eager reference; a mismatch is reported and makes the exit
status 1. Results go to one long CSV (``--csv``), a table and a summary of
speed-ups printed at the end; ``benchmarks/plot.py`` draws charts from the CSV.
On CPU the LM shapes are scaled down (fewer rows, same vocabulary) so a run stays
reasonable; the headline CPU shape [4096, 32000] float32 is measured unscaled in
the full (non-quick) run.
"""
import argparse
import contextlib
import gc
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import fastkd
from fastkd import reference
from fastkd.bench.memory import PeakRSS
from fastkd.bench.report import (  # noqa: F401  (speedups, kd_ce_ratios: used by the tests)
    CE_WEIGHT, COLUMNS, KD_CE_PEERS, PEERS, Progress, format_speedups, format_table, is_peer, kd_ce_ratios, speedups,
    write_csv,
)
from fastkd.dispatch import backend as _backend

LOSSES = ("kd", "ats", "dkd", "dist", "mgd", "forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd", "jeffreys",
          "triangular", "entropy_gated_kl", "akl", "alpha_divergence", "ab_divergence", "renyi", "kd_ce", "kd_topk")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd", "jeffreys", "triangular", "entropy_gated_kl",
               "akl", "alpha_divergence", "ab_divergence", "renyi")
BACKEND_LOSS = {"kd_ce": "kd+ce"}  # the fastkd.dispatch.backend.LOSS_OPS key of a case, where it differs
TOPK_K = 64
TOPK_SHAPE = (1024, 128256)  # the top-k target of the issue: K = 64 over a 128k vocabulary, float32
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Nominal shapes (GPU sizes). Logits: classification and LM vocabularies.
LOGIT_SHAPES = [(256, 100), (1024, 1000), (8192, 32000), (8192, 128256)]
# MGD: a ResNet-50 stage-1 feature map (N, C, H, W).
MGD_SHAPES = [(64, 256, 56, 56)]
# On CPU a logit case is cut to at most this many elements (rows divided by a
# power of two, vocabulary kept): 32M float32 = 128 MB per tensor.
CPU_MAX_LOGITS = 1 << 25
CPU_MGD_BATCH = 2  # the generation block's two 3x3 convs cost ~0.4 s per image on 2 cores
HEADLINE_CPU = (4096, 32000)  # the CPU targets of the issue are stated on this shape, float32
RESULTS_DIR = "results"  # the default folder of the CSVs (ignored by git), under the current directory
# The quick run's fused head (N x H, vocabulary, steps, providers): small enough for the main job
QUICK_FUSED_LINEAR = ("256x256", 32000, 3, "fused,unfused,matmuls")


@dataclass
class Case:
    kernel: str
    shape: Tuple[int, ...]
    dtype: str
    note: str = ""  # e.g. "scaled from 8192x32000"

    @property
    def shape_str(self) -> str:
        return "x".join(str(d) for d in self.shape)


# ----------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------

def _scaled_rows(n: int, c: int) -> int:
    while n > 1 and n * c > CPU_MAX_LOGITS:
        n //= 2
    return n


def build_cases(losses: List[str], device: str, quick: bool) -> List[Case]:
    """The (loss, shape, dtype) cases of a run, in order."""
    cases = []
    for loss in losses:
        if loss == "mgd":
            for shape in MGD_SHAPES:
                n, c, h, w = shape
                if quick:
                    real = (2, 64, 28, 28) if device == "cpu" else (16, 256, 56, 56)
                elif device == "cpu":
                    real = (CPU_MGD_BATCH, c, h, w)
                else:
                    real = shape
                note = "" if real == shape else "scaled from " + "x".join(map(str, shape))
                cases.append(Case(loss, real, "float32", note))
            continue
        if loss == "kd_topk":
            shape = (256, 32000) if quick else TOPK_SHAPE
            cases.append(Case(loss, shape, "float32", f"K = {TOPK_K}"))
            continue
        if quick:
            shapes = [(1024, 1000)] if device == "cpu" else [(1024, 1000), (8192, 32000)]
            dtypes = ["float32"]
        else:
            shapes, dtypes = LOGIT_SHAPES, ["float32", "bfloat16"]
        for n, c in shapes:
            for dtype in dtypes:
                rows = _scaled_rows(n, c) if device == "cpu" else n
                note = "" if rows == n else f"scaled from {n}x{c}"
                cases.append(Case(loss, (rows, c), dtype, note))
        if device == "cpu" and not quick:
            cases.append(Case(loss, HEADLINE_CPU, "float32", "headline CPU shape"))
    return cases


def make_inputs(case: Case, device: str) -> Dict[str, object]:
    """Student (a leaf that requires grad), teacher, and what the loss needs besides."""
    gen = torch.Generator(device=device).manual_seed(0)  # on the device: 8192x128256 is slow to fill on a host
    dtype = DTYPES[case.dtype]
    # Logit-like magnitudes (std 2) so the softmaxes are neither flat nor one-hot.
    student = (2 * torch.randn(case.shape, generator=gen, device=device)).to(dtype).requires_grad_()
    teacher = (2 * torch.randn(case.shape, generator=gen, device=device)).to(dtype)
    inputs = {"student": student, "teacher": teacher}
    if case.kernel in ("ats", "dkd", "kd_ce"):
        inputs["target"] = torch.randint(0, case.shape[-1], case.shape[:-1], generator=gen, device=device)
    if case.kernel == "kd_topk":
        inputs["teacher"] = fastkd.TopKTeacher.from_logits(teacher, TOPK_K)
    if case.kernel == "mgd":
        torch.manual_seed(0)
        c = case.shape[1]
        inputs["generation"] = torch.nn.Sequential(
            torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(c, c, 3, padding=1)
        ).to(device=device, dtype=dtype)
    return inputs


def io_bytes(case: Case) -> int:
    """Read student and teacher once, write the student gradient once."""
    numel = math.prod(case.shape)
    if case.kernel == "kd_topk":  # the student and its gradient; the K ids and log-probs are negligible
        return numel * DTYPES[case.dtype].itemsize * 2
    return numel * DTYPES[case.dtype].itemsize * 3


# ----------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------

def _args(loss: str, fn: Callable, d: Dict[str, object]) -> torch.Tensor:
    """Call a loss function (reference signature, default hyper-parameters) on the inputs."""
    if loss in ("kd", "dist", "kd_topk") + DIVERGENCES:
        return fn(d["student"], d["teacher"])
    if loss == "kd_ce":
        return fn(d["student"], d["teacher"], target=d["target"], ce_weight=CE_WEIGHT)
    if loss in ("ats", "dkd"):
        return fn(d["student"], d["teacher"], d["target"])
    # MGD: a fixed mask seed, so every provider draws the same mask.
    return fn(d["student"], d["teacher"], d["generation"], generator=torch.Generator().manual_seed(0))


def _liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def providers_for(loss: str, device: str, wanted: Optional[List[str]]) -> Tuple[List[str], List[str]]:
    """(providers to run for ``loss`` on ``device``, notes on skipped ones)."""
    fused = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    names, notes = [], []
    for name in fused:
        why = _backend.unavailable_reason(name, BACKEND_LOSS.get(loss, loss), torch.device(device))
        if why is None:
            names.append(name)
        else:
            notes.append(f"{loss}: skipped backend '{name}' ({why})")
    if loss == "kd_ce":
        names += [f"{peer}:{backend}" for backend in list(names) for peer in KD_CE_PEERS]
    names += ["eager", "compile"]
    if loss in ("kd", "jsd") and device == "cuda":  # Liger's Triton kernels need a GPU
        if _liger_available():
            names.append("liger")
        else:
            notes.append(f"{loss}: skipped 'liger' (liger_kernel is not installed)")
    if wanted is not None:  # "kd_alone" selects every kd_alone:b
        names = [n for n in names if n in wanted or n.split(":")[0] in wanted]
    return names, notes


def _function_name(loss: str, module: str = "fastkd") -> str:
    """The function of ``module`` ("fastkd" or "reference") a benchmark case calls."""
    if loss == "kd_topk":
        return "kd_topk_loss" if module == "reference" else "kd_loss"
    return "kd_loss" if loss == "kd_ce" else f"{loss}_loss"


def make_call(loss: str, provider: str, device: str = "cpu") -> Callable[[Dict[str, object]], torch.Tensor]:
    if provider == "eager":
        fn = getattr(reference, _function_name(loss, "reference"))
        return lambda d: _args(loss, fn, d)
    if provider == "compile":
        # A fresh compile per case: dynamo would otherwise mark dims dynamic on the
        # second shape and fall back to eager past its recompile limit.
        torch._dynamo.reset()
        fn = torch.compile(getattr(reference, _function_name(loss, "reference")))
        return lambda d: _args(loss, fn, d)
    peer, _, backend = provider.partition(":")
    if peer == "kd_alone":
        return lambda d: fastkd.kd_loss(d["student"], d["teacher"], backend=backend)
    if peer == "kd+ce_sep":
        return lambda d: (fastkd.kd_loss(d["student"], d["teacher"], backend=backend)
                          + CE_WEIGHT * torch.nn.functional.cross_entropy(d["student"].float(), d["target"]))
    if provider == "liger" and loss == "jsd":
        from liger_kernel.transformers import LigerJSD

        jsd = LigerJSD(beta=0.5)  # fastkd.jsd_loss's default; both take T = 1 here

        def liger_jsd(d):
            # Liger takes (student log-probs, teacher log-probs) and averages over rows
            return jsd(torch.log_softmax(d["student"].float(), dim=-1), torch.log_softmax(d["teacher"].float(), dim=-1))

        return liger_jsd
    if provider == "liger":
        from liger_kernel.transformers import LigerKLDIVLoss

        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        temp = 4.0  # fastkd.kd_loss's default

        def liger_kd(d):
            log_ps = torch.log_softmax(d["student"].float() / temp, dim=-1)
            log_pt = torch.log_softmax(d["teacher"].float() / temp, dim=-1)
            return kl(log_ps, log_pt) * temp**2

        return liger_kd
    fn = getattr(fastkd, _function_name(loss))
    return lambda d: _args(loss, lambda *a, **k: fn(*a, backend=provider, **k), d)


# ----------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _zero_grads(d: Dict[str, object]) -> None:
    d["student"].grad = None
    if "generation" in d:
        d["generation"].zero_grad(set_to_none=True)


def quantiles(samples: List[float]) -> Tuple[float, float, float]:
    """(median, p20, p80) with linear interpolation."""
    q = torch.tensor(samples, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_step(call, d, device: str) -> Tuple[float, float]:
    """(fwd, bwd) milliseconds of one training step of the loss."""
    _zero_grads(d)
    if device == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        loss = call(d)
        events[1].record()
        loss.backward()
        events[2].record()
        torch.cuda.synchronize()
        return events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2])
    t0 = time.perf_counter()
    loss = call(d)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def time_interleaved(calls: Dict[str, Callable], d, device: str, budget_s: float, min_reps: int, max_reps: int):
    """{provider: (fwd, bwd, fwd+bwd) lists of ms}, one step of each provider per round.

    Rounds interleave the providers so that load from other processes on a
    shared machine slows all of them alike; their number fills ``budget_s`` per
    provider (at least ``min_reps``, at most ``max_reps``).
    """
    samples = {name: ([], [], []) for name in calls}
    rounds, done, start = min_reps, 0, time.perf_counter()
    while done < rounds:
        for name, call in calls.items():
            f, b = time_step(call, d, device)
            for series, value in zip(samples[name], (f, b, f + b)):
                series.append(value)
        done += 1
        if done == min_reps:  # now we know what a round costs: fill the budget
            per_round = (time.perf_counter() - start) / min_reps
            rounds = max(min_reps, min(max_reps, int(budget_s * len(calls) / max(per_round, 1e-9))))
    return samples


@contextlib.contextmanager
def _cuda_peak(result: Dict[str, float], key: str, base: int):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.synchronize()
    result[key] = (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_memory(call, d, device: str):
    """(fwd, bwd, fwd+bwd) peak memory in MB over the inputs, and the step's (loss, grad)."""
    _zero_grads(d)
    result = {}
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with _cuda_peak(result, "fwd", base):
            loss = call(d)
        with _cuda_peak(result, "bwd", base):
            loss.backward()
    else:
        with PeakRSS() as fwd:
            loss = call(d)
        with PeakRSS() as bwd:
            loss.backward()
        # Both relative to the resident set before the forward (the forward's saved tensors count).
        result["fwd"] = max(fwd.peak_kb - fwd.base_kb, 0) / 1024
        result["bwd"] = max(bwd.peak_kb - fwd.base_kb, 0) / 1024
    result["fwd+bwd"] = max(result["fwd"], result["bwd"])
    return result, loss.detach().float(), d["student"].grad


def copy_bandwidth_gbps(device: str) -> float:
    """Measured copy bandwidth: median time of ``dst.copy_(src)``, 2 * bytes / time."""
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(12):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            elapsed = time.perf_counter() - t0
        if i >= 2:  # the first copies fault the pages in
            times.append(elapsed)
    return 2 * nbytes / quantiles(times)[0] / 1e9


def check_close(loss, grad, ref_loss, ref_grad, dtype: str) -> Optional[str]:
    """None if a provider agrees with the eager reference, else what differs."""
    tol = 1e-3 if dtype == "float32" else 2e-2
    if not torch.allclose(loss, ref_loss, rtol=tol, atol=1e-5):
        return f"loss {float(loss):.6g} vs eager {float(ref_loss):.6g}"
    if (grad is None) != (ref_grad is None):
        return "student gradient missing"
    if grad is not None:
        err = float((grad.float() - ref_grad.float()).abs().max())
        scale = float(ref_grad.float().abs().max())
        if not err <= tol * scale + 1e-6:
            return f"student gradient max error {err:.3g} (max |grad| {scale:.3g})"
    return None


# ----------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------

def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _split(text: Optional[str], allowed, what: str) -> Optional[List[str]]:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def run(args) -> Tuple[List[Dict[str, object]], List[str], List[str]]:
    """Run the benchmark; returns (CSV rows, notes, mismatches)."""
    device = args.device
    losses = _split(args.losses, LOSSES, "losses") or list(LOSSES)
    wanted = _split(args.providers, ("cpu", "cuda", "triton") + PEERS, "providers")
    cases = build_cases(losses, device, args.quick)
    if args.quick:
        warmup, budget, min_reps, max_reps = 1, 0.3, 3, 10
    else:
        warmup, budget, min_reps, max_reps = 1, 2.0, 3, 50

    copy_gbps = copy_bandwidth_gbps(device)
    dev_name = device_name(device)
    notes = [f"device: {dev_name}; measured copy bandwidth {copy_gbps:.1f} GB/s"]
    plan = []
    for case in cases:
        names, skipped = providers_for(case.kernel, device, wanted)
        notes += [n for n in skipped if n not in notes]
        if case.note:
            notes.append(f"{case.kernel} {case.shape_str} {case.dtype}: {case.note}")
        if names:
            plan.append((case, sorted(names, key=lambda n: n != "eager")))

    rows, mismatches = [], []
    progress = Progress(len(plan))
    for case, names in plan:
        label = f"{case.kernel} {case.shape_str} {case.dtype}"
        progress.label(f"{label}: {', '.join(names)}")
        gc.collect()
        d = make_inputs(case, device)
        calls = {}
        for name in names:  # eager first: the others are checked against it
            try:
                call = make_call(case.kernel, name, device)
                for _ in range(warmup + (name == "compile")):  # compile's first call compiles
                    time_step(call, d, device)
                calls[name] = call
            except Exception as exc:  # a peer failing on a shape must not stop the run
                notes.append(f"{label}: '{name}' failed ({type(exc).__name__}: {exc})")
        samples = time_interleaved(calls, d, device, budget, min_reps, max_reps)
        ref = None
        for name, call in calls.items():
            mem, loss, grad = peak_memory(call, d, device)
            if name == "eager":
                ref = (loss, None if grad is None else grad.clone())
            elif ref is not None and not name.startswith("kd_alone"):  # KD alone is a different loss
                problem = check_close(loss, grad, *ref, case.dtype)
                if problem:
                    mismatches.append(f"{label} '{name}': {problem}")
            nbytes = io_bytes(case)
            for mode, series in zip(MODES, samples[name]):
                median, p20, p80 = quantiles(series)
                gbps = nbytes / (median / 1e3) / 1e9 if mode == "fwd+bwd" else ""
                rows.append({
                    "kernel": case.kernel, "provider": name, "mode": mode, "shape": case.shape_str,
                    "dtype": case.dtype, "device": dev_name, "torch": torch.__version__,
                    "fastkd": fastkd.__version__,
                    "median_ms": round(median, 4), "p20_ms": round(p20, 4), "p80_ms": round(p80, 4),
                    "peak_mem_mb": round(mem[mode], 2),
                    "gbps": _sig(gbps) if gbps != "" else "",
                    "pct_copy_bw": _sig(100 * gbps / copy_gbps) if gbps != "" else "",
                })
            del loss, grad
        del d, calls, ref
        progress.update()
    progress.close()
    return rows, notes, mismatches


def _sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (bandwidths span 0.001 to 1000s of GB/s)."""
    return float(f"{x:.{digits}g}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastkd.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small shapes, few repeats; without --losses also the fused head at QUICK_FUSED_LINEAR "
                        "(about 3 minutes on 2 cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--losses", default=None, help=f"comma-separated subset of {','.join(LOSSES)}")
    p.add_argument("--providers", default=None,
                   help="comma-separated subset of cpu,cuda,triton,eager,compile,liger (default: all available)")
    p.add_argument("--csv", default=None, help=f"output CSV (default: {RESULTS_DIR}/fastkd-bench-<device>[-quick].csv; "
                   "a --quick run of every loss also writes the fused head's beside it, ...-fused-linear.csv)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU (default: torch's)")
    p.add_argument("--fused-linear", action="store_true",
                   help="instead: fused linear distillation (LM head + loss) against the unfused path, the head "
                        "matmuls alone and Liger's chunked loss (fastkd.bench.fused_linear; CPU)")
    p.add_argument("--teacher-topk", action="store_true",
                   help="instead: fastkd.teacher_topk against torch.topk on materialised logits, time and peak "
                        "memory (fastkd.bench.teacher_topk; CPU)")
    p.add_argument("--distributed", type=int, default=None, metavar="P",
                   help="instead: the vocabulary-parallel losses on P gloo CPU processes against the unsharded "
                        "loss on the same work, with bytes per call (fastkd.bench.distributed)")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.csv is None:
        mode = "-fused-linear" if args.fused_linear else "-teacher-topk" if args.teacher_topk else \
            f"-distributed{args.distributed}" if args.distributed else ""
        args.csv = os.path.join(RESULTS_DIR, f"fastkd-bench-{args.device}{mode}{'-quick' if args.quick else ''}.csv")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fused_linear:
        from fastkd.bench import fused_linear as bench_fused_linear

        if args.device != "cpu":
            raise SystemExit("--fused-linear measures on the CPU (the GPU case is not written yet)")
        return bench_fused_linear.main(["--shapes", "512x512" if args.quick else "2048x512,512x512",
                                        "--csv", args.csv]) or 0
    if args.teacher_topk:
        from fastkd.bench import teacher_topk as bench_teacher_topk

        return bench_teacher_topk.main(["--rows", "256", "--vocab", "32000", "--hidden", "256"] if args.quick
                                       else ["--csv", args.csv]) or 0
    if args.distributed is not None:
        from fastkd.bench import distributed as bench_distributed

        return bench_distributed.main(["--world", str(args.distributed), "--csv", args.csv]
                                      + (["--rows", "256", "--repeat", "3"] if args.quick else [])) or 0
    if args.threads:
        torch.set_num_threads(args.threads)
    # MGD's mask seed is drawn on the host (an expected graph break): keep dynamo's warnings out of the table.
    torch._logging.set_logs(dynamo=logging.ERROR)
    rows, notes, mismatches = run(args)
    write_csv(rows, args.csv)
    print()
    print(format_table(rows))
    print()
    print("Speed-up of fwd+bwd (median) over the peers:")
    print(format_speedups(rows))
    print()
    for note in notes:
        print("note:", note)
    for problem in mismatches:
        print("MISMATCH:", problem)
    print(f"wrote {len(rows)} rows to {args.csv}")
    if args.quick and args.losses is None and args.device == "cpu":  # the language-model head, fused and not
        from fastkd.bench import fused_linear as bench_fused_linear

        shape, vocab, steps, providers = QUICK_FUSED_LINEAR
        fused_csv = args.csv[:-4] + "-fused-linear.csv" if args.csv.endswith(".csv") else args.csv + "-fused-linear"
        print("\nFused linear distillation (the LM head and the loss in one op, python -m fastkd.bench "
              "--fused-linear for the full shapes):", flush=True)
        fused_status = bench_fused_linear.main(["--shapes", shape, "--vocab", str(vocab), "--steps", str(steps),
                                                "--providers", providers, "--csv", fused_csv])
        print(f"wrote {fused_csv}")
        return 1 if mismatches or fused_status else 0
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
