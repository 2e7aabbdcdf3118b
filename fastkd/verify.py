"""Check every public loss on every backend here, value and gradients, against float64.

    python -m fastkd.verify [--backends reference,cpu,triton,cuda] [--no-distributed] [--quiet]

What runs: each case below on each backend that runs here ("reference" and the compiled "cpu" on
CPU tensors; "cuda" and "triton" on CUDA tensors when there is a GPU; without one, "triton" on CPU
tensors through Triton's interpreter, for which this command re-runs itself with
``TRITON_INTERPRET=1``), and the vocabulary-sharded path (``process_group=``) in a group of 2 gloo
processes on 127.0.0.1, on CPU tensors.

Cases: ``kd_loss`` (plain, with ``ce_weight``), ``ats_loss``, ``dkd_loss``, ``dist_loss``,
``mgd_loss``; ``forward_kl_loss``, ``reverse_kl_loss``, ``jsd_loss``, ``skew_kl_loss`` (forward and
``reverse=True``), ``tvd_loss``, each with and without ``ce_weight``; ``kd_loss`` and every
divergence against a ``TopKTeacher`` in both modes; ``fused_linear_kd_loss`` with each divergence
(with ``ce_weight``, one with a bias and a wider teacher head); an empty batch and a batch whose
rows are all ignored (loss 0, gradient 0); the fused head's teachers (a teacher temperature with
a teacher that learns, a shared head, a ``TeacherMixture``); ``uld_loss`` (a teacher vocabulary wider than the
student's; the CPU kernel, and log-prob rows on the batched path) and ``hybrid_uld_loss`` (a
many-to-one ``VocabMap``), on CPU tensors only (no GPU kernel yet). Logits of shape ``[2, 5, 257]`` (a non-contiguous
student) and ``[7, 4099]`` (rows wider than a 4096-column block, ragged tail), ids ``-100`` on
some rows; float32 and bfloat16 for the logit losses.

Ground truth: the plain-PyTorch reference (``fastkd.reference``) in float64 on the same inputs
(bfloat16 inputs rounded first); for ``fused_linear_kd_loss`` the unfused composition in float64
(the head matmuls, then the reference loss). Error = relative norm ``||got - want|| / ||want||`` of
the loss and of every gradient (absolute where ``want`` is 0); the table shows the worst per case,
"ok" at most the dtype's tolerance (``TOLERANCE``). Exit status 1 if any check fails.
"""
import argparse
import copy
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import functional as F
from . import reference
from .core.mixture import TeacherMixture
from .core.topk import TopKTeacher
from .core.vocab import VocabMap
from .dispatch import backend as _backend

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # relative-norm error of loss and gradients
SHAPES = ((2, 5, 257), (7, 4099))  # logits; the first student is made non-contiguous
SHARD_SHAPES = ((2, 5, 258), (6, 4100))  # even widths: 2 ranks hold half the vocabulary each
TOPK_K = 8
HIDDEN, FUSED_ROWS, FUSED_VOCAB, FUSED_CHUNK = 24, (3, 6), 1031, 7  # fused head: 18 rows in chunks of 7
WORLD = 2
DIVERGENCES = {  # label: (LOSS_OPS key, function name, keyword arguments, the fused head's divergence)
    "forward_kl_loss": ("forward_kl", "forward_kl_loss", {}, "kl"),
    "reverse_kl_loss": ("reverse_kl", "reverse_kl_loss", {}, "reverse_kl"),
    "jsd_loss beta=0.3": ("jsd", "jsd_loss", {"beta": 0.3}, "jsd"),
    "skew_kl_loss skew=0.2": ("skew_kl", "skew_kl_loss", {"skew": 0.2}, "skew_kl"),
    "skew_kl_loss skew=0.2 reverse": ("skew_kl", "skew_kl_loss", {"skew": 0.2, "reverse": True}, "skew_reverse_kl"),
    "tvd_loss": ("tvd", "tvd_loss", {}, "tvd"),
    "jeffreys_loss": ("jeffreys", "jeffreys_loss", {}, "jeffreys"),
    "triangular_loss": ("triangular", "triangular_loss", {}, "triangular"),
    "entropy_gated_kl_loss": ("entropy_gated_kl", "entropy_gated_kl_loss",
                              {"alpha_min": 0.2, "alpha_max": 0.9, "tau": 0.8, "scale": 0.1}, "entropy_gated_kl"),
    "alpha_divergence_loss alpha=0.3": ("alpha_divergence", "alpha_divergence_loss", {"alpha": 0.3},
                                        "alpha_divergence"),
    "ab_divergence_loss": ("ab_divergence", "ab_divergence_loss", {"alpha": 0.2, "beta": 0.7}, "ab_divergence"),
    "renyi_loss order=0.5": ("renyi", "renyi_loss", {"order": 0.5}, "renyi"),
    "renyi_loss order=2 reverse": ("renyi", "renyi_loss", {"order": 2.0, "reverse": True}, "renyi"),
}


@dataclass
class Case:
    """One check: ``call(inputs, backend, group)`` returns the loss of the inputs that ``build(shape)`` made.

    ``grads``: the inputs whose gradients are compared; ``vocab_dim``: the dim each input is cut along on a
    vocabulary-sharded rank (inputs not named are replicated); ``truth``: the float64 ground truth, when it
    is not ``call`` on the reference."""
    name: str
    op: str  # its fastkd.dispatch.backend.LOSS_OPS key (which fused backends run it)
    build: Callable[[tuple], Dict[str, torch.Tensor]]
    call: Callable
    grads: Tuple[str, ...] = ("student", "teacher")
    shapes: tuple = SHAPES
    dtypes: tuple = (torch.float32, torch.bfloat16)
    vocab_dim: Dict[str, int] = field(default_factory=lambda: {"student": -1, "teacher": -1})
    truth: Optional[Callable] = None
    sharded: bool = True
    runs_on: Optional[Dict[str, str]] = None  # {column backend: backend passed}; None: as dispatch says


# ----------------------------------------------------------------------------
# inputs and cases
# ----------------------------------------------------------------------------

def _logits(shape, seed=0, ignored=True):
    g = torch.Generator().manual_seed(seed + shape[-1])
    student = torch.randn(shape, generator=g) * 3
    teacher = torch.randn(shape, generator=g) * 3
    target = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if ignored:
        target.view(-1)[::4] = -100
    return {"student": student, "teacher": teacher, "target": target}


def _topk(shape):
    d = _logits(shape)
    logprobs, ids = torch.log_softmax(d.pop("teacher"), -1).topk(TOPK_K, dim=-1)
    ids.view(-1, TOPK_K)[1, -2:] = -1  # padding slots of a row with fewer than K ids
    return {**d, "topk_ids": ids, "topk_logprobs": logprobs}


def _head(shape):
    """A fused-head case: hidden states [3, 6, H], heads [V, H], a bias, 5 more teacher rows (a padded head)."""
    rows, vocab = FUSED_ROWS, shape[-1]
    g = torch.Generator().manual_seed(vocab)
    target = torch.randint(0, vocab, rows, generator=g)
    target.view(-1)[::5] = -100
    return {"hidden": torch.randn(rows + (HIDDEN,), generator=g), "weight": torch.randn(vocab, HIDDEN, generator=g),
            "bias": torch.randn(vocab, generator=g), "teacher_hidden": torch.randn(rows + (HIDDEN,), generator=g),
            "teacher_weight": torch.randn(vocab, HIDDEN, generator=g) * 1.5,
            "teacher_padding": torch.randn(5, HIDDEN, generator=g) * 1.5, "target": target}


def _fused_call(divergence, params, ce_weight, bias, wide):
    def call(d, backend, group):
        teacher_weight = torch.cat([d["teacher_weight"], d["teacher_padding"]]) if wide else d["teacher_weight"]
        return F.fused_linear_kd_loss(d["hidden"], d["weight"], (d["teacher_hidden"], teacher_weight), d["target"],
                                      divergence=divergence, temperature=2.0, ce_weight=ce_weight,
                                      student_bias=d["bias"] if bias else None, chunk_size=FUSED_CHUNK,
                                      backend=backend, process_group=group, **params)

    def truth(d):  # the unfused composition: head matmuls, then the reference loss (teacher truncated to V)
        s = d["hidden"] @ d["weight"].T + (d["bias"] if bias else 0)
        t = d["teacher_hidden"] @ d["teacher_weight"].T
        if divergence == "kl":
            return reference.kd_loss(s, t, 2.0, target=d["target"], ce_weight=ce_weight)
        fn = {"skew_reverse_kl": reference.skew_kl_loss}.get(divergence, getattr(reference, f"{divergence}_loss", None))
        extra = {"reverse": True} if divergence == "skew_reverse_kl" else {}
        return fn(s, t, temperature=2.0, target=d["target"], ce_weight=ce_weight, **params, **extra)

    return call, truth


def cases(only: Optional[str] = None) -> List[Case]:
    """Every case, or those whose name contains one of the comma-separated ``only``."""
    out = [
        Case("kd_loss T=4", "kd", _logits, lambda d, b, g: F.kd_loss(
            d["student"], d["teacher"], 4.0, target=d["target"], backend=b, process_group=g)),
        Case("kd_loss T=2 ce_weight=0.3", "kd+ce", _logits, lambda d, b, g: F.kd_loss(
            d["student"], d["teacher"], 2.0, target=d["target"], ce_weight=0.3, backend=b, process_group=g)),
        Case("ats_loss", "ats", _logits, lambda d, b, g: F.ats_loss(
            d["student"], d["teacher"], d["target"], backend=b, process_group=g)),
        Case("dkd_loss", "dkd", _logits, lambda d, b, g: F.dkd_loss(
            d["student"], d["teacher"], d["target"], backend=b, process_group=g)),
        Case("dist_loss", "dist", _logits, lambda d, b, g: F.dist_loss(d["student"], d["teacher"], backend=b),
             sharded=False),  # data parallel (rows), not vocabulary parallel: tests/test_distributed.py
        Case("mgd_loss", "mgd", _mgd_inputs, _mgd_call, grads=("student",), shapes=((4, 8, 7, 7),), sharded=False),
    ]
    for label, (op, fn, params, _) in DIVERGENCES.items():
        for ce in (0.0, 0.3):
            def call(d, b, g, fn=fn, params=params, ce=ce):
                return getattr(F, fn)(d["student"], d["teacher"], temperature=1.5, target=d["target"], ce_weight=ce,
                                      backend=b, process_group=g, **params)
            out.append(Case(f"{label} T=1.5" + (f" ce_weight={ce}" if ce else ""), op, _logits, call))
    for mode in ("tail", "renormalize"):
        for label, (op, fn, params, _) in [("kd_loss T=2", ("kd", "kd_loss", {}, None))] + list(DIVERGENCES.items()):
            def call(d, b, g, fn=fn, params=params, mode=mode, kd=fn == "kd_loss"):
                teacher = TopKTeacher(d["topk_ids"], d["topk_logprobs"], mode=mode)
                kw = {"temperature": 2.0 if kd else 1.5}
                return getattr(F, fn)(d["student"], teacher, target=d["target"], ce_weight=0.3, backend=b,
                                      process_group=g, **params, **kw)
            out.append(Case(f"{label} TopKTeacher({mode}) ce_weight=0.3", "kd_topk", _topk, call,
                            grads=("student",), shapes=SHAPES[:1], vocab_dim={"student": -1}))
    for op, _, params, divergence in DIVERGENCES.values():
        fused_params = {k: v for k, v in params.items() if k in ("beta", "skew", "alpha", "order", "reverse")}
        power = "".join(f" {k}={v}" for k, v in fused_params.items() if k in ("alpha", "order", "reverse"))
        for ce, bias, wide in ((0.3, False, False),) + (((0.0, True, True),) if divergence == "kl" else ()):
            call, truth = _fused_call(divergence, fused_params, ce, bias, wide)
            label = f"fused_linear_kd_loss {divergence}{power}" + (f" ce_weight={ce}" if ce else " bias, V_t > V")
            out.append(Case(label, "fused_linear_kd", _head, call, grads=("hidden", "weight") + ("bias",) * bias,
                            shapes=((FUSED_VOCAB + 1,),), dtypes=(torch.float32,), truth=truth,
                            vocab_dim={"weight": 0, "bias": 0, "teacher_weight": 0}, sharded=not wide))
    # adaptive KL: its own row op (akl_fwd), dense teachers (sharded: fastkd.distributed.akl's head; no top-k here)
    for ce in (0.0, 0.3):
        def akl(d, b, g, ce=ce):
            return F.akl_loss(d["student"], d["teacher"], mu=0.4, temperature=1.5, target=d["target"], ce_weight=ce,
                              backend=b, process_group=g)
        out.append(Case("akl_loss mu=0.4 T=1.5" + (f" ce_weight={ce}" if ce else ""), "akl", _logits, akl))
    call, truth = _fused_call("akl", {"mu": 0.4}, 0.3, False, False)
    out.append(Case("fused_linear_kd_loss akl ce_weight=0.3", "fused_linear_akl", _head, call, grads=("hidden", "weight"),
                    shapes=((FUSED_VOCAB + 1,),), dtypes=(torch.float32,), truth=truth,
                    vocab_dim={"weight": 0, "bias": 0, "teacher_weight": 0}))
    out += [
        Case("jsd_loss, every row ignored (0, gradient 0)", "jsd",
             lambda shape: {**_logits(shape), "target": torch.full(shape[:-1], -100)},
             lambda d, b, g: F.jsd_loss(d["student"], d["teacher"], target=d["target"], ce_weight=0.3, backend=b,
                                        process_group=g), dtypes=(torch.float32,)),
        Case("kd_loss, empty batch [0, V]", "kd+ce", lambda shape: _logits((0, shape[-1])),
             lambda d, b, g: F.kd_loss(d["student"], d["teacher"], target=d["target"], ce_weight=0.3, backend=b,
                                       process_group=g), dtypes=(torch.float32,)),
    ]
    out += _fused_teacher_cases()
    out += _cross_tokenizer_cases()
    if only:
        out = [c for c in out if any(part.strip() in c.name for part in only.split(","))]
    return out


def _fused_teacher_cases() -> List[Case]:
    """The fused head's teachers: a teacher temperature with a learning teacher (every student and teacher
    gradient), a shared head, and a two-teacher mixture; the truth is the unfused float64 composition."""
    def learning(d, b, g):
        return F.fused_linear_kd_loss(d["hidden"], d["weight"], (d["teacher_hidden"], d["teacher_weight"]),
                                      d["target"], divergence="jsd", temperature=2.0, teacher_temperature=1.5,
                                      teacher_grad=True, ce_weight=0.3, chunk_size=FUSED_CHUNK, backend=b)

    def learning_truth(d):
        s, t = d["hidden"] @ d["weight"].T, d["teacher_hidden"] @ d["teacher_weight"].T * (2.0 / 1.5)
        return reference.jsd_loss(s, t, temperature=2.0, target=d["target"], ce_weight=0.3)

    def shared(d, b, g):
        return F.fused_linear_kd_loss(d["hidden"], d["weight"], (d["teacher_hidden"], None), d["target"],
                                      divergence="reverse_kl", teacher_grad=True, chunk_size=FUSED_CHUNK, backend=b)

    def shared_truth(d):
        return reference.reverse_kl_loss(d["hidden"] @ d["weight"].T, d["teacher_hidden"] @ d["weight"].T,
                                         target=d["target"])

    def mixture(d, b, g):
        second = (d["hidden"].detach() * 0.5, d["weight"].detach())  # the student's head on other rows, frozen
        teachers = TeacherMixture([(d["teacher_hidden"], d["teacher_weight"]), second], [0.7, 0.3])
        return F.fused_linear_kd_loss(d["hidden"], d["weight"], teachers, d["target"], temperature=2.0,
                                      chunk_size=FUSED_CHUNK, backend=b)

    def mixture_truth(d):
        p1 = torch.softmax(d["teacher_hidden"] @ d["teacher_weight"].T / 2.0, -1)
        p2 = torch.softmax((d["hidden"] * 0.5).detach() @ d["weight"].detach().T / 2.0, -1)
        return reference.kd_loss(d["hidden"] @ d["weight"].T, 2.0 * torch.log(0.7 * p1 + 0.3 * p2), 2.0,
                                 target=d["target"])

    one = dict(shapes=((FUSED_VOCAB + 1,),), dtypes=(torch.float32,), sharded=False,
               vocab_dim={"weight": 0, "teacher_weight": 0})
    return [
        Case("fused_linear_kd_loss jsd teacher_temperature teacher_grad", "fused_linear_kd", _head, learning,
             grads=("hidden", "weight", "teacher_hidden", "teacher_weight"), truth=learning_truth, **one),
        Case("fused_linear_kd_loss reverse_kl shared head teacher_grad", "fused_linear_kd", _head, shared,
             grads=("hidden", "weight", "teacher_hidden"), truth=shared_truth, **one),
        Case("fused_linear_kd_loss TeacherMixture (2 teachers)", "fused_linear_kd", _head, mixture,
             grads=("hidden", "weight"), truth=mixture_truth, **one),
    ]


def _two_vocabularies(shape, log_probs=False):
    """A student over ``V`` classes and a teacher over ``V + V // 3 + 1`` (vocabularies of two tokenizers)."""
    d = _logits(shape)
    g = torch.Generator().manual_seed(7 + shape[-1])
    d["teacher"] = torch.randn(shape[:-1] + (shape[-1] + shape[-1] // 3 + 1,), generator=g) * 3
    if log_probs:  # rows given as log-probabilities (the merged rows of fastkd.merge_aligned)
        d["student"], d["teacher"] = torch.log_softmax(d["student"], -1), torch.log_softmax(d["teacher"], -1)
    return d


def _vocab_map(v_s, v_t):
    """Every third teacher token unmatched, two teacher tokens onto student token 0, the rest one-to-one."""
    t2s = torch.arange(v_t) % v_s
    t2s[::3] = -1
    t2s[1] = 0
    return VocabMap(t2s, v_s)


def _cross_tokenizer_cases() -> List[Case]:
    """ULD and GOLD's hybrid on CPU tensors: the C++ kernel ("cpu" column), the batched sort-free PyTorch path
    (``backend="auto"`` where the call is not the kernel's, shown in the "cpu" column) and the sort-based
    reference. No CUDA or Triton kernel yet: "-" there."""
    def uld(d, b, g):
        return F.uld_loss(d["student"], d["teacher"], temperature=1.5, target=d["target"], ce_weight=0.3, backend=b)

    def uld_log_probs(d, b, g):
        return F.uld_loss(d["student"], d["teacher"], inputs="log_probs", target=d["target"], ce_weight=0.3,
                          backend=b)

    def hybrid(d, b, g):
        vocab_map = _vocab_map(d["student"].shape[-1], d["teacher"].shape[-1])
        return F.hybrid_uld_loss(d["student"], d["teacher"], vocab_map, temperature=1.5, target=d["target"],
                                 ce_weight=0.3, backend=b)

    kernel, batched = {"reference": "reference", "cpu": "cpu"}, {"reference": "reference", "cpu": "auto"}
    one = dict(dtypes=(torch.float32,), sharded=False)
    return [
        Case("uld_loss T=1.5 ce_weight=0.3, V_t > V_s", "uld", _two_vocabularies, uld, runs_on=kernel, **one),
        Case("uld_loss log-prob rows (batched path)", "uld", lambda shape: _two_vocabularies(shape, log_probs=True),
             uld_log_probs, runs_on=batched, **one),
        Case("hybrid_uld_loss T=1.5 ce_weight=0.3 (batched path)", "uld", _two_vocabularies, hybrid,
             runs_on=batched, **one),
    ]


def _mgd_inputs(shape):
    torch.manual_seed(0)
    c = shape[1]
    generation = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(),
                                     torch.nn.Conv2d(c, c, 3, padding=1))
    g = torch.Generator().manual_seed(1)
    return {"student": torch.randn(shape, generator=g), "teacher": torch.randn(shape, generator=g),
            "generation": generation}


def _mgd_call(d, backend, group):
    return F.mgd_loss(d["student"], d["teacher"], d["generation"], mask_ratio=0.5,
                      generator=torch.Generator().manual_seed(2), backend=backend)


# ----------------------------------------------------------------------------
# running a case
# ----------------------------------------------------------------------------

def _prepare(case: Case, base, dtype, device, rank=None, world=1, noncontiguous=False, truth=False):
    """The inputs rounded to ``dtype`` on ``device`` (``truth``: then in float64), the compared ones as leaves
    that require grad (``noncontiguous``: column-major, same values); on a rank, its vocabulary shard."""
    inputs = {}
    for key, x in base.items():
        if isinstance(x, torch.nn.Module):
            inputs[key] = copy.deepcopy(x).to(device, torch.float64 if truth else dtype)
            continue
        if x.is_floating_point():
            x = x.to(dtype).double() if truth else x.to(dtype)
        if rank is not None and key in case.vocab_dim:
            dim = case.vocab_dim[key] % x.dim()
            width = x.shape[dim] // world
            x = x.narrow(dim, rank * width, width)
        x = x.to(device)
        if key in case.grads:
            if noncontiguous and x.dim() >= 2:
                x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
            x = x.detach().requires_grad_(True)
        inputs[key] = x
    return inputs


def _outputs(case: Case, inputs, backend, group=None, truth=False):
    fn = case.truth if truth and case.truth is not None else None
    loss = fn(inputs) if fn is not None else case.call(inputs, backend, group)
    leaves = [inputs[k] for k in case.grads]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [loss.detach()] + [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def _error(got, want) -> float:
    worst = 0.0
    for a, b in zip(got, want):
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        if a.shape != b.shape:
            return float("inf")
        diff = (a - b).norm().item()
        den = b.norm().item()
        err = diff / den if den > 0 else diff
        worst = max(worst, err if err == err else float("inf"))  # NaN counts as a failure
    return worst


def truth_of(case: Case, shape, dtype):
    base = case.build(shape)
    inputs = _prepare(case, base, dtype, "cpu", truth=True)
    return base, _outputs(case, inputs, "reference", truth=True)


def _slice(outs, case: Case, rank, world):
    """The float64 truth as a rank sees it: the loss, and each gradient's shard."""
    sliced = [outs[0]]
    for key, g in zip(case.grads, outs[1:]):
        if key in case.vocab_dim:
            dim = case.vocab_dim[key] % g.dim()
            width = g.shape[dim] // world
            g = g.narrow(dim, rank * width, width)
        sliced.append(g)
    return sliced


# ----------------------------------------------------------------------------
# the sharded path: 2 gloo processes
# ----------------------------------------------------------------------------

def _sharded_worker(rank, world, port, queue, only):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results = []
    try:
        for case in cases(only):
            if not case.sharded:
                continue
            worst = 0.0
            try:
                for shape in SHARD_SHAPES[:len(case.shapes)] if case.op != "fused_linear_kd" else case.shapes:
                    base, want = truth_of(case, shape, torch.float32)
                    inputs = _prepare(case, base, torch.float32, "cpu", rank, world)
                    worst = max(worst, _error(_outputs(case, inputs, "auto", dist.group.WORLD),
                                              _slice(want, case, rank, world)))
                results.append((case.name, worst, None))
            except Exception as exc:  # reported in the table, never hidden
                results.append((case.name, float("inf"), f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()
    queue.put((rank, results))


def run_sharded(only=None, timeout_s=300.0) -> Tuple[Dict[str, Tuple[float, Optional[str]]], Optional[str]]:
    """{case name: (worst error over the ranks, error message)}, or ({}, why it did not run)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        return {}, "torch.distributed with gloo is unavailable"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # fork (the children inherit the imported modules) unless CUDA may be initialised, which forbids it
    method = "spawn" if torch.cuda.is_available() else "fork"
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sharded_worker, args=(r, WORLD, port, queue, only)) for r in range(WORLD)]
    for p in procs:
        p.start()
    merged, deadline = {}, time.monotonic() + timeout_s
    try:
        for _ in range(WORLD):
            _, results = queue.get(timeout=max(deadline - time.monotonic(), 1.0))
            for name, err, msg in results:
                old = merged.get(name, (0.0, None))
                merged[name] = (max(old[0], err), old[1] or msg)
    except Exception as exc:
        return {}, f"the {WORLD}-process group did not finish ({type(exc).__name__}: {exc or 'timeout'})"
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return merged, None


# ----------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------

def columns(wanted: Optional[List[str]]):
    """[(label, backend, device)] that run here, and {label: why not} for the others."""
    gpu = torch.cuda.is_available()
    candidates = [("reference", "reference", "cpu"), ("cpu", "cpu", "cpu")]
    candidates += [("cuda", "cuda", "cuda"), ("triton", "triton", "cuda")] if gpu else \
        [("cuda", "cuda", "cpu"), ("triton (interp.)", "triton", "cpu")]
    cols, missing = [], {}
    for label, backend, device in candidates:
        if wanted is not None and backend not in wanted:
            continue
        why = _backend.unavailable_reason(backend, None, torch.device(device))
        if why is None:
            cols.append((label, backend, device))
        else:
            missing[label] = why
    return cols, missing


def verify(cols, sharded, quiet=False, only=None) -> int:
    """Run every case on every column; print the table; return the number of failures."""
    labels = [c[0] for c in cols] + ([f"sharded x{WORLD} (gloo)"] if sharded is not None else [])
    width = 56
    print(f"{'case':{width}s} {'dtype':9s}" + "".join(f"{label:>19s}" for label in labels))
    failures, problems = 0, []
    for case in cases(only):
        for dtype in case.dtypes:
            tol = TOLERANCE[dtype]
            cells = []
            truths = [truth_of(case, shape, dtype) for shape in case.shapes]
            for label, backend, device in cols:
                if case.runs_on is not None:
                    if backend not in case.runs_on or device != "cpu":
                        cells.append("-")
                        continue
                    backend = case.runs_on[backend]
                elif _backend.unavailable_reason(backend, case.op, torch.device(device)) is not None:
                    cells.append("-")
                    continue
                try:
                    worst = 0.0
                    for i, (base, want) in enumerate(truths):
                        inputs = _prepare(case, base, dtype, device, noncontiguous=i == 0)
                        worst = max(worst, _error(_outputs(case, inputs, backend), want))
                    msg = None
                except Exception as exc:
                    worst, msg = float("inf"), f"{type(exc).__name__}: {exc}"
                ok = worst <= tol
                failures += not ok
                if msg or not ok:
                    problems.append(f"{case.name} {label} {str(dtype)[6:]}: " + (msg or f"error {worst:.2e}"))
                cells.append(f"{'ok' if ok else 'FAIL'} {worst:8.1e}")
            if sharded is not None:
                if not case.sharded or dtype != torch.float32:
                    cells.append("-")
                else:
                    worst, msg = sharded.get(case.name, (float("inf"), "no result"))
                    ok = worst <= tol
                    failures += not ok
                    if msg or not ok:
                        problems.append(f"{case.name} sharded: " + (msg or f"error {worst:.2e}"))
                    cells.append(f"{'ok' if ok else 'FAIL'} {worst:8.1e}")
            line = f"{case.name:{width}s} {str(dtype)[6:]:9s}" + "".join(f"{c:>19s}" for c in cells)
            if not quiet or "FAIL" in line:
                print(line, flush=True)
    for problem in problems:
        print("FAILED:", problem)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=None, help="comma-separated subset of reference,cpu,cuda,triton")
    parser.add_argument("--no-distributed", action="store_true", help="skip the 2-process gloo group")
    parser.add_argument("--cases", default=None, help="only the cases whose name contains one of these "
                        "(comma-separated), e.g. fused_linear,TopK")
    parser.add_argument("--quiet", action="store_true", help="print only failing rows and the verdict")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ and "triton" in sys.modules:
        # Triton reads TRITON_INTERPRET when it is imported (importing torch's extension API imports it):
        # run again with the interpreter on, so the Triton kernels are checked on CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fastkd.verify"] + list(sys.argv[1:] if argv is None
                                                                               else argv))
    # The interpreter evaluates masked-off lanes too (numpy warns of inf * 0 there; those lanes are never stored).
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    wanted = args.backends.split(",") if args.backends else None
    t0 = time.perf_counter()
    print(f"fastkd verify: torch {torch.__version__}; every loss and gradient against float64 "
          f"(relative-norm error, tolerance float32 {TOLERANCE[torch.float32]:.0e}, "
          f"bfloat16 {TOLERANCE[torch.bfloat16]:.0e}; '-': the backend does not implement the case)")
    cols, missing = columns(wanted)
    for label, why in missing.items():
        print(f"  not checked: {label}: {why}")
    sharded, why = (None, "--no-distributed") if args.no_distributed else run_sharded(args.cases)
    if sharded == {} and why:
        print(f"  not checked: the sharded path: {why}")
        sharded = None
    print()
    failures = verify(cols, sharded, args.quiet, args.cases)
    verdict = "every check passed" if not failures else f"{failures} checks FAILED"
    print(f"\n{verdict} ({time.perf_counter() - t0:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
