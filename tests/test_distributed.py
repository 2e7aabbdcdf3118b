"""fastkd.distributed on gloo (CPU, 127.0.0.1): 2 and 4 processes against the single-process reference.

Vocabulary parallel: every loss on the shards equals the float64 reference on the
concatenated vocabulary (``fastkd.reference.divergence.compute``, ``fastkd.reference``),
and each rank's gradient is the matching slice (relative norm error < 1e-5 float32,
2e-2 bfloat16, 5e-3 float16). Data parallel: DIST on sharded rows equals DIST on the concatenated
batch; one DDP step equals one single-process step.

Process groups are costly to start (each process imports torch), so each test spawns
one group and runs a whole table of checks in it; a worker collects every failure
and raises them together. A group that hangs is killed after ``TIMEOUT_S``.
"""
import contextlib
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import fastkd
from fastkd.core.divergence import divergence_op_args, entropy_gate, renyi_row
from fastkd.reference import divergence as R
from fastkd import distributed as D
from fastkd import reference as ref
from fastkd import TopKTeacher
from processes import free_port, run_processes

TIMEOUT_S = 300  # a hang fails after this; a loaded 2-core machine needs ~1 min per group
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "nonzero")
# (dtype, value rtol, gradient relative-norm tolerance)
DTYPES = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (1e-2, 2e-2), torch.float16: (2e-3, 5e-3),
          torch.float64: (1e-10, 1e-10)}


# ----------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------

DEVICE = torch.device("cpu")  # where the workers put the distributed inputs (cuda:rank under NCCL)
SYNC_CHECK = True  # CUDA tensors: no synchronising call in a loss (gloo's own device-to-host copies sync: off)
# The shard-kernel settings the CPU tensors run: the Triton ones only in the interpreter (on a GPU machine the
# suite runs with FASTKD_GPU_TESTS=1, no interpreter, and Triton then needs CUDA tensors: test_gloo_cuda_world_2)
CPU_SHARD_MODES = ("auto", "off", "triton") if os.environ.get("TRITON_INTERPRET") == "1" else ("auto", "off")
GROUP = None  # the vocabulary-parallel group of the checks (None: the whole world)


def _group():
    return dist.group.WORLD if GROUP is None else GROUP


def _entry(rank, world, port, check_name, backend="gloo"):
    global DEVICE, SYNC_CHECK
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        DEVICE = torch.device("cuda", rank)
    elif backend == "gloo-cuda":  # CUDA tensors over gloo: every rank on the one GPU (the Triton shard kernels)
        DEVICE = torch.device("cuda", 0)
        SYNC_CHECK = False
        backend = "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        failures = []
        globals()[check_name](rank, world, failures)
        if len(_RUN) < 20:
            failures.append(f"only {len(_RUN)} checks ran: {_RUN}")
    finally:
        dist.destroy_process_group()
    if failures:
        raise AssertionError(f"rank {rank}: {len(failures)} failure(s):\n" + "\n".join(failures))


def _launch(world: int, check_name: str, backend: str = "gloo"):
    """Run ``check_name(rank, world, failures)`` in ``world`` processes; fail on an error or a hang (NCCL
    spawns: CUDA cannot be used after a fork)."""
    run_processes(_entry, (world, free_port(), check_name, backend), world, TIMEOUT_S,
                  f"{check_name} with {world} processes", "fork" if backend == "gloo" else "spawn")


# ----------------------------------------------------------------------------
# comparison helpers (run inside the workers)
# ----------------------------------------------------------------------------

def _rel(g: torch.Tensor, r: torch.Tensor) -> float:
    g, r = g.detach().cpu().double(), r.detach().cpu().double()
    den = r.norm().item()
    return (g - r).norm().item() / den if den > 0 else (g - r).norm().item()


def _shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous vocabulary slice, on DEVICE: a non-contiguous view of x (a leaf)."""
    width = x.shape[-1] // world
    return x.to(DEVICE)[..., rank * width:(rank + 1) * width].detach()


def _on(x, like):
    """A replicated CPU argument (target, sample_weight) on the device of ``like``."""
    return None if x is None else x.to(like.device)


@contextlib.contextmanager
def _no_sync():
    """On CUDA tensors, any synchronising call inside is an error."""
    if DEVICE.type != "cuda" or not SYNC_CHECK:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


_RUN = []  # names of the checks this worker ran


def _record(failures, name, fn):
    _RUN.append(name)
    try:
        fn()
    except Exception:  # noqa: BLE001  (every failure is reported, the worker goes on)
        failures.append(f"[{name}] " + traceback.format_exc(limit=4))


def _compare_loss(name, rank, world, failures, dist_fn, ref_fn, s, t, dtype, teacher_topk=None,
                  grad_t=True, parts=False, teacher_gtol=None):
    """``dist_fn(s_shard, t_shard_or_topk)`` vs ``ref_fn(s64, t64_or_topk64)``: values and gradient slices."""

    def run():
        rtol, gtol = DTYPES[dtype]
        s_q = s.to(dtype)
        t_q = (teacher_topk.logprobs if teacher_topk is not None else t).to(dtype)
        # float64 reference on the very same (rounded) inputs
        s64 = s_q.double().requires_grad_()
        t64 = t_q.double().requires_grad_(grad_t)
        teacher64 = TopKTeacher(teacher_topk.indices, t64, mode=teacher_topk.mode) if teacher_topk else t64
        out_ref = ref_fn(s64, teacher64)
        loss_ref = out_ref.loss if parts else out_ref
        seed = torch.Generator().manual_seed(7)
        upstream = torch.rand(loss_ref.shape, generator=seed, dtype=torch.float64) + 0.5
        grads_ref = torch.autograd.grad((loss_ref * upstream).sum(), [s64] + ([t64] if grad_t else []))

        s_loc = _shard(s_q, rank, world).requires_grad_()
        if teacher_topk is not None:
            t_loc = t_q.detach().to(DEVICE, copy=True).requires_grad_(grad_t)
            teacher = TopKTeacher(teacher_topk.indices.to(DEVICE), t_loc, mode=teacher_topk.mode)
        else:
            t_loc = _shard(t_q, rank, world).requires_grad_(grad_t)
            teacher = t_loc
        upstream_dev = upstream.to(device=DEVICE, dtype=R.compute_dtype(s_q))  # the loss's dtype
        with _no_sync():
            out = dist_fn(s_loc, teacher)
            loss = out.loss if parts else out
            (loss * upstream_dev).sum().backward()
        assert loss.shape == loss_ref.shape, f"shape {tuple(loss.shape)} != {tuple(loss_ref.shape)}"
        values = [(loss, loss_ref)]
        if parts:
            values += [(out.soft, out_ref.soft), (out.hard, out_ref.hard)]
        for got, want in values:
            torch.testing.assert_close(got.detach().cpu().double(), want.detach(), rtol=rtol, atol=rtol * 0.1)
        width = s.shape[-1] // world

        def tolerance(want, tol):
            # fp16 gradients of "mean" (divided by N * V) fall below fp16's smallest normal (6.1e-5), where the
            # spacing is 6e-8: there even the exact gradient rounded to fp16 is ~1e-2 off; allow twice that
            return max(tol, 2 * _rel(want.to(dtype), want)) if dtype == torch.float16 else tol

        want_s = grads_ref[0][..., rank * width:(rank + 1) * width]
        err, tol = _rel(s_loc.grad, want_s), tolerance(want_s, gtol)
        assert s_loc.grad.dtype == dtype and s_loc.grad.shape == s_loc.shape
        assert err < tol, f"student gradient relative error {err:.2e} >= {tol}"
        if grad_t:
            want_t = grads_ref[1] if teacher_topk is not None else grads_ref[1][..., rank * width:(rank + 1) * width]
            err, tol = _rel(t_loc.grad, want_t), tolerance(want_t, teacher_gtol or gtol)
            assert err < tol, f"teacher gradient relative error {err:.2e} >= {tol}"

    _record(failures, f"{name} {dtype}", run)


def _inputs(shape, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * scale
    t = torch.randn(shape, generator=g) * scale
    return s, t


def _topk_ids(n, k, vocab, seed, lo=0, hi=None):
    """Distinct ids per row drawn from [lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    hi = vocab if hi is None else hi
    return torch.stack([torch.randperm(hi - lo, generator=g)[:k] + lo for _ in range(n)])


DIVERGENCES = [  # (name, distributed fn, reference kind, params, T^2)
    ("kd", D.kd_loss, "forward_kl", {}, True),
    ("forward_kl", D.forward_kl_loss, "forward_kl", {}, False),
    ("reverse_kl", D.reverse_kl_loss, "reverse_kl", {}, False),
    ("jsd", D.jsd_loss, "jsd", {"beta": 0.5}, False),
    ("jsd beta=0", D.jsd_loss, "jsd", {"beta": 0.0}, False),
    ("jsd beta=1", D.jsd_loss, "jsd", {"beta": 1.0}, False),
    ("jsd beta=0.2", D.jsd_loss, "jsd", {"beta": 0.2}, False),
    ("skew_kl", D.skew_kl_loss, "skew_kl", {"skew": 0.1}, False),
    ("skew_kl reverse", D.skew_kl_loss, "skew_kl", {"skew": 0.3, "reverse": True}, False),
    ("tvd", D.tvd_loss, "tvd", {}, False),
    ("jeffreys", D.jeffreys_loss, "jeffreys", {}, False),
    ("entropy_gated_kl", D.entropy_gated_kl_loss, "entropy_gated_kl",
     {"alpha_min": 0.2, "alpha_max": 0.9, "tau": 0.8, "scale": 0.1}, False),
    ("alpha_divergence", D.alpha_divergence_loss, "alpha_divergence", {"alpha": -0.3}, False),
    ("ab_divergence", D.ab_divergence_loss, "ab_divergence", {"alpha": 0.2, "beta": 0.7}, False),
    ("renyi", D.renyi_loss, "renyi", {"order": 0.5}, False),
    ("renyi reverse", D.renyi_loss, "renyi", {"order": 2.0, "reverse": True}, False),
    ("triangular", D.triangular_loss, "triangular", {}, False),  # (last: the peaked-rows case takes it)
]


def _divergence_case(fn, kind, params, t2, *, temperature, reduction, target=None, ignore_index=-100,
                     sample_weight=None, ce_weight=0.0, return_parts=False):
    """(distributed call, reference call) for one divergence and one set of keyword arguments."""
    dist_params = dict(params)
    if kind == "skew_kl":
        dist_params.setdefault("reverse", False)

    def dist_fn(s, t):
        kw = dict(reduction=reduction, target=_on(target, s), ignore_index=ignore_index,
                  sample_weight=_on(sample_weight, s), ce_weight=ce_weight, return_parts=return_parts)
        if fn is D.kd_loss:
            return fn(s, t, temperature, process_group=_group(), **kw)
        return fn(s, t, process_group=_group(), temperature=temperature, **kw, **dist_params)

    def ref_fn(s, t):
        return R.compute(s, t, temperature, reduction, target, ignore_index, sample_weight, ce_weight,
                          return_parts, kind, scale_t2=t2, **params)

    return dist_fn, ref_fn


# ----------------------------------------------------------------------------
# worker check tables
# ----------------------------------------------------------------------------

def _vocab_checks(rank, world, failures, full=True):
    n, width = 13, 37
    vocab = width * world
    s, t = _inputs((n, vocab), 0)
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[[2, 7]] = -100  # ignored rows (their logits are NaN: never read)
    s[2], t[7] = float("nan"), float("inf")
    weight = torch.rand(n, generator=g) + 0.5
    weight[4] = 0.0  # a skipped row
    s[4] = float("nan")
    s[5, 3] = float("-inf")  # masked vocabulary entries on both sides (probability 0 terms)
    t[5, 3] = float("-inf")
    s3, t3 = _inputs((3, 4, vocab), 2)  # 3-D input, rows from both leading dims
    s3t, t3t = s3.transpose(0, 1), t3.transpose(0, 1)  # and non-contiguous rows
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64] if full else [torch.float32]
    reductions = ["batchmean", "sum", "mean", "none"]
    for i, (name, fn, kind, params, t2) in enumerate(DIVERGENCES if full else DIVERGENCES[:3]):
        red = reductions[i % 4]
        for dtype in dtypes:
            # targets, ignored and skipped rows, sample weights, CE, parts, T != 1
            d, r = _divergence_case(fn, kind, params, t2, temperature=2.0, reduction=red, target=target,
                                    sample_weight=weight, ce_weight=0.3, return_parts=True)
            _compare_loss(f"{name} dense {red} ce", rank, world, failures, d, r, s, t, dtype, parts=True)
        if full:
            # the student's gradient only (forward KL: written by the terms pass); a float32 student with a
            # bf16 teacher (row chunks: the float32 gradient buffer written chunk by chunk)
            d, r = _divergence_case(fn, kind, params, t2, temperature=2.0, reduction=red, target=target,
                                    sample_weight=weight, ce_weight=0.3)
            _compare_loss(f"{name} dense {red} ce student grad only", rank, world, failures, d, r, s, t,
                          torch.float32, grad_t=False)
            bf16 = torch.bfloat16
            _compare_loss(f"{name} dense {red} ce bf16 teacher", rank, world, failures,
                          lambda a, b, d=d: d(a, b.to(bf16)), lambda a, b, r=r: r(a, b.to(bf16).double()), s, t,
                          torch.float32, grad_t=False)
        # 3-D, non-contiguous, per-row losses, no target
        d, r = _divergence_case(fn, kind, params, t2, temperature=1.5, reduction="none")
        _compare_loss(f"{name} 3-D none", rank, world, failures, d, r, s3t, t3t, torch.float32)
        # top-k teacher, both modes, with padding slots and a row of padding only
        for mode in ("tail", "renormalize"):
            ids = _topk_ids(n, 5, vocab, 3 + i)
            ids[0, 3:] = -1
            ids[1] = -1
            ids[6] = _topk_ids(1, 5, vocab, 99, lo=0, hi=width)[0]  # all ids in shard 0
            ids[8] = _topk_ids(1, 5, vocab, 98, lo=vocab - width, hi=vocab)[0]  # all ids in the last shard
            lp = torch.log_softmax(t / 2.0, dim=1).gather(1, ids.clamp_min(0))
            topk = TopKTeacher(ids, lp, mode=mode)
            d, r = _divergence_case(fn, kind, params, t2, temperature=2.0, reduction=red, target=target,
                                    sample_weight=weight, ce_weight=0.5, return_parts=True)
            _compare_loss(f"{name} top-k {mode} {red}", rank, world, failures, d, r, s, None, torch.float32,
                          teacher_topk=topk, parts=True)
    if not full:
        return
    # a shard with no target and no top-k id (everything in shard 0), and top-k ids holding nearly all the mass
    tgt0 = torch.randint(0, width, (n,), generator=g)
    ids0 = _topk_ids(n, 4, vocab, 5, lo=0, hi=width)
    s0, t0 = _inputs((n, vocab), 9)
    boost = torch.zeros(n, vocab).scatter_(1, ids0, 12.0)
    s0, t0 = s0 + boost, t0 + boost  # the ids hold nearly all the mass on both sides: tiny tails
    lp0 = torch.log_softmax(t0, dim=1).gather(1, ids0)
    for mode in ("tail", "renormalize"):
        d, r = _divergence_case(D.kd_loss, "forward_kl", {}, True, temperature=1.0, reduction="batchmean",
                                target=tgt0, ce_weight=1.0, return_parts=True)
        _compare_loss(f"kd top-k {mode}, ids and targets in shard 0", rank, world, failures, d, r, s0, None,
                      torch.float32, teacher_topk=TopKTeacher(ids0, lp0, mode=mode), parts=True,
                      # a teacher tail of ~1e-5 is ill-conditioned in float32: the single-process float32
                      # reference itself is 4.0e-5 off the float64 teacher gradient here
                      teacher_gtol=1e-4)
    # teacher without grad, wide rows (several thousand columns per shard)
    sw, tw = _inputs((4, 2500 * world), 11)
    d, r = _divergence_case(D.jsd_loss, "jsd", {"beta": 0.7}, False, temperature=3.0, reduction="batchmean")
    _compare_loss("jsd wide, teacher constant", rank, world, failures, d, r, sw, tw, torch.float32, grad_t=False)
    # large common offset (maxima shift in raw units)
    d, r = _divergence_case(D.kd_loss, "forward_kl", {}, True, temperature=4.0, reduction="batchmean")
    _compare_loss("kd offset 1e3", rank, world, failures, d, r, s[8:] + 1e3, t[8:] - 1e3, torch.float32)
    # peaked rows (q ~ 1 on one class): TVD's G - q sum G cancels there; the sign-mass form must not
    sp, tp = _inputs((4, 1500 * world), 12)
    sp[:, 0] += 14.0
    sp[:, 1] += 4.0
    for name, fn, kind, params, t2 in (DIVERGENCES[-1], DIVERGENCES[2]):
        d, r = _divergence_case(fn, kind, params, t2, temperature=1.0, reduction="sum")
        _compare_loss(f"{name} peaked rows", rank, world, failures, d, r, sp, tp, torch.float32)


@contextlib.contextmanager
def _host_reads_forbidden():
    """The GPU code path on CPU tensors: no value checks, and every host read of a tensor value raises."""
    from fastkd.core import checks as _validation
    saved_devices = _validation.HOST_DEVICES
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def forbid(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")
        return read

    _validation.HOST_DEVICES = ()
    for name in HOST_READS:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield
    finally:
        _validation.HOST_DEVICES = saved_devices
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def _dkd_ats_checks(rank, world, failures, full=True):
    n, width = 11, 29
    vocab = width * world
    s, t = _inputs((n, vocab), 20)
    g = torch.Generator().manual_seed(21)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[3] = -100
    s[3] = float("nan")
    target[5] = vocab - 1  # the last column of the last shard
    target[6] = 0
    weight = torch.rand(n, generator=g) + 0.5
    wd = _group()
    cases = [
        ("dkd", lambda a, b: D.dkd_loss(a, b, _on(target, a), process_group=wd, alpha=1.3, beta=6.0,
                                        temperature=3.0, sample_weight=_on(weight, a)),
         lambda a, b: ref.dkd_loss(a, b, target, alpha=1.3, beta=6.0, temperature=3.0, sample_weight=weight)),
        ("dkd none", lambda a, b: D.dkd_loss(a, b, _on(target, a), process_group=wd, reduction="none"),
         lambda a, b: ref.dkd_loss(a, b, target, reduction="none")),
        ("ats", lambda a, b: D.ats_loss(a, b, _on(target, a), process_group=wd, target_temperature=5.0,
                                        other_temperature=2.5, student_temperature=1.5,
                                        sample_weight=_on(weight, a)),
         lambda a, b: ref.ats_loss(a, b, target, target_temperature=5.0, other_temperature=2.5,
                                   student_temperature=1.5, sample_weight=weight)),
        ("ats mean", lambda a, b: D.ats_loss(a, b, _on(target, a), process_group=wd, reduction="mean"),
         lambda a, b: ref.ats_loss(a, b, target, reduction="mean")),
    ]
    # the cross-entropy (T = 1 on the raw student logits, whatever the loss's temperatures): ce_weight and
    # return_parts (soft, hard) under every reduction, with sample weights and an ignored row
    dkd_kw = dict(alpha=1.3, beta=6.0, temperature=3.0)
    ats_kw = dict(target_temperature=5.0, other_temperature=2.5, student_temperature=1.5)
    ce_cases = [  # (name, distributed fn, reference fn, keyword arguments, return_parts)
        ("dkd ce", D.dkd_loss, ref.dkd_loss, dict(dkd_kw, ce_weight=0.3, sample_weight=weight), False),
        ("dkd ce parts none", D.dkd_loss, ref.dkd_loss, dict(dkd_kw, ce_weight=0.3, reduction="none"), True),
        ("dkd parts sum (ce_weight 0)", D.dkd_loss, ref.dkd_loss,
         dict(dkd_kw, return_parts=True, reduction="sum", sample_weight=weight), True),
        ("dkd ce parts mean", D.dkd_loss, ref.dkd_loss, dict(ce_weight=0.7, reduction="mean"), True),
        ("ats ce", D.ats_loss, ref.ats_loss, dict(ats_kw, ce_weight=0.3, sample_weight=weight), False),
        ("ats ce parts sum", D.ats_loss, ref.ats_loss, dict(ats_kw, ce_weight=0.3, reduction="sum"), True),
        ("ats ce parts none", D.ats_loss, ref.ats_loss,
         dict(ats_kw, ce_weight=2.0, reduction="none", sample_weight=weight), True),
        ("ats parts mean (ce_weight 0)", D.ats_loss, ref.ats_loss, dict(reduction="mean"), True),
    ]

    def ce_case(dfn, rfn, kw, parts, tgt=target):
        kw = dict(kw, return_parts=parts or kw.get("return_parts", False))
        sw = kw.pop("sample_weight", None)
        return (lambda a, b: dfn(a, b, _on(tgt, a), process_group=wd, sample_weight=_on(sw, a), **kw),
                lambda a, b: rfn(a, b, tgt, sample_weight=sw, **kw))

    for name, d, r in cases:
        for dtype in ([torch.float32, torch.bfloat16] if full else [torch.float32]):
            _compare_loss(name, rank, world, failures, d, r, s, t, dtype)
    for name, dfn, rfn, kw, parts in ce_cases:
        d, r = ce_case(dfn, rfn, kw, parts)
        for dtype in ([torch.float32, torch.bfloat16] if full else [torch.float32]):
            _compare_loss(name, rank, world, failures, d, r, s, t, dtype, parts=parts)

    def ce_bytes():
        """The CE adds 2 per-row numbers to the SUM round: no new collective, bytes independent of V."""
        chunks = len(D.rows.row_chunks(n))
        for fn, kw, per_row in ((D.dkd_loss, {}, 4 + 6 + 3), (D.dkd_loss, {"ce_weight": 0.5}, 4 + 8 + 3),
                                (D.dkd_loss, {"return_parts": True}, 4 + 8 + 3),
                                (D.ats_loss, {}, 2 + 2 + 3), (D.ats_loss, {"ce_weight": 0.5}, 2 + 4 + 3)):
            seen = []
            for w in (width, 300):
                a, b = _inputs((n, w * world), 24)
                a, b = _shard(a, rank, world).requires_grad_(), _shard(b, rank, world).requires_grad_()
                with D.count_comm() as c:
                    out = fn(a, b, _on(target, a), process_group=wd, **kw)
                    (out.loss if kw.get("return_parts") else out).backward()
                seen.append((c.bytes, c.calls))
            assert seen[0] == seen[1] == (4 * n * per_row + 32, 1 + 3 * chunks), (fn.__name__, kw, seen)

    def ce_errors():
        a, b = _shard(s, rank, world), _shard(t, rank, world)
        for fn in (D.dkd_loss, D.ats_loss):
            with pytest.raises(TypeError, match="return_parts"):
                fn(a, b, _on(target, a), process_group=wd, return_parts=1)
            with pytest.raises((TypeError, ValueError), match="ce_weight"):
                fn(a, b, _on(target, a), process_group=wd, ce_weight="0.5")

    def ce_no_host_reads():
        """With the CE: no host read (GPU path); an unchecked out-of-range target makes exactly its row NaN."""
        bad = target.clone()
        bad[4] = vocab  # one past the global vocabulary
        for fn in (D.dkd_loss, D.ats_loss):
            for tgt, nan_rows in ((target, 0), (bad, 1)):
                a, b = _shard(s, rank, world).requires_grad_(), _shard(t, rank, world).requires_grad_()
                with _host_reads_forbidden():
                    out = fn(a, b, tgt, process_group=wd, ce_weight=0.5, return_parts=True, reduction="none")
                    (out.loss * torch.tensor(0.7)).sum().backward()
                nan = torch.isnan(out.loss)
                assert int(nan.sum()) == nan_rows and bool(torch.isnan(out.hard[nan]).all()), (fn.__name__, out)
                assert bool(torch.isnan(a.grad[nan]).all()) and bool(torch.isfinite(a.grad[~nan]).all())
                assert bool(torch.isfinite(out.hard[~nan]).all()), (fn.__name__, out.hard)

    _record(failures, "dkd/ats ce bytes", ce_bytes)
    if DEVICE.type == "cpu":
        _record(failures, "dkd/ats ce errors", ce_errors)
        _record(failures, "dkd/ats ce no host reads", ce_no_host_reads)
    if full:  # targets all in shard 0: the other shards hold no target column
        tgt0 = torch.randint(0, width, (n,), generator=g)
        s, t = _inputs((n, vocab), 22)
        _compare_loss("dkd targets in shard 0", rank, world, failures,
                      lambda a, b: D.dkd_loss(a, b, _on(tgt0, a), process_group=wd),
                      lambda a, b: ref.dkd_loss(a, b, tgt0), s, t, torch.float32)
        _compare_loss("ats targets in shard 0, 3-D", rank, world, failures,
                      lambda a, b: D.ats_loss(a, b, _on(tgt0.reshape(1, n), a), process_group=wd),
                      lambda a, b: ref.ats_loss(a, b, tgt0.reshape(1, n)), s.unsqueeze(0), t.unsqueeze(0),
                      torch.float32)
        # the CE's one-hot and s[target] come from shard 0 alone; the other ranks add softmax(s) only
        for name, dfn, rfn, kw in (("dkd ce targets in shard 0", D.dkd_loss, ref.dkd_loss, dkd_kw),
                                   ("ats ce targets in shard 0", D.ats_loss, ref.ats_loss, ats_kw)):
            d, r = ce_case(dfn, rfn, dict(kw, ce_weight=0.4, reduction="none"), True, tgt=tgt0)
            _compare_loss(name, rank, world, failures, d, r, s, t, torch.float32, parts=True)


def _api_checks(rank, world, failures):
    wd = dist.group.WORLD
    n, width = 6, 16

    def bytes_do_not_grow_with_vocab():
        seen = []
        for w in (16, 4096):
            s, t = _inputs((n, w * world), 30)
            s, t = _shard(s, rank, world).requires_grad_(), _shard(t, rank, world).requires_grad_()
            target = torch.arange(n, device=DEVICE) * 3
            with D.count_comm() as c:
                D.kd_loss(s, t, 2.0, process_group=wd, target=target, ce_weight=0.5).backward()
            seen.append((c.bytes, c.calls))
        assert seen[0] == seen[1], f"bytes/calls changed with the vocabulary: {seen}"
        # dense KD with CE and both gradients: MAX 2 per row, SUM 4, SUM 3 (float32), after the shape check
        # (4 int64: rows and widths)
        assert seen[0] == (4 * n * (2 + 4 + 3) + 32, 4), seen[0]
        ids = torch.arange(n * 5, device=DEVICE).reshape(n, 5)
        topk = TopKTeacher(ids, torch.full((n, 5), -3.0, device=DEVICE), mode="tail")
        with D.count_comm() as c:
            D.kd_loss(_shard(torch.randn(n, 64 * world), rank, world), topk, 1.0, process_group=wd)
        assert (c.bytes, c.calls) == (4 * n * (2 + 2 + 5) + 32, 3), (c.bytes, c.calls)
        saved = D.CHUNK_MIN_ROWS
        D.CHUNK_MIN_ROWS = 2  # 3 row chunks: the same bytes, 3 times the per-row calls
        try:
            with D.count_comm() as c:
                D.kd_loss(_shard(torch.randn(n, 64 * world), rank, world), topk, 1.0, process_group=wd)
            assert (c.bytes, c.calls) == (4 * n * (2 + 2 + 5) + 32, 7), (c.bytes, c.calls)
            # dense logits on the shard kernels: one chunk whatever CHUNK_MIN_ROWS (no [rows, V] temporaries
            # to bound), bf16 and fp16 as float32 (converted after loading): the shape check and three rounds,
            # the same bytes (the per-row numbers are float32 whatever the logits' dtype)
            s, t = _inputs((n, 64 * world), 31)
            target = torch.arange(n, device=DEVICE) * 5
            # (KD without a teacher gradient: two kernel passes, the student's gradient from the terms pass)
            for fn, kw, grad_t, per_row in ((D.kd_loss, {}, False, 2 + 2 + 2), (D.kd_loss, {}, True, 2 + 2 + 3),
                                            (D.jsd_loss, {}, True, 2 + 2 + 3),
                                            (D.reverse_kl_loss, dict(target=target, ce_weight=0.5), False, 2 + 4 + 2),
                                            (D.tvd_loss, {}, True, 2 + 2 + 6)):
                seen = {}
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    s_d = _shard(s, rank, world).to(dtype).requires_grad_()
                    t_d = _shard(t, rank, world).to(dtype).requires_grad_(grad_t)
                    with D.count_comm() as c:
                        fn(s_d, t_d, process_group=wd, **kw).backward()
                    seen[dtype] = (c.bytes, c.calls)
                assert set(seen.values()) == {(4 * n * per_row + 32, 4)}, (fn.__name__, seen)
        finally:
            D.CHUNK_MIN_ROWS = saved

    def errors():
        s, t = torch.randn(n, width), torch.randn(n, width)
        bad = torch.full((n,), width * world)  # one past the global vocabulary
        try:
            D.kd_loss(s, t, 2.0, process_group=wd, target=bad, ce_weight=1.0)
        except ValueError as e:
            assert "target" in str(e) and str(width * world) in str(e), str(e)
        else:
            raise AssertionError("an out-of-range global target did not raise")
        D.kd_loss(s, t, 2.0, process_group=wd, target=bad - 1, ce_weight=1.0)  # global ids beyond the shard: fine
        try:
            D.kd_loss(torch.randn(n, width + rank), torch.randn(n, width + rank), process_group=wd)
        except ValueError as e:
            assert "same width" in str(e), str(e)
        else:
            raise AssertionError("unequal shard widths did not raise")
        for fn in (lambda a, b: D.kd_loss(a, b, 2.0, process_group=wd),
                   lambda a, b: D.dkd_loss(a, b, torch.zeros(a.shape[0], dtype=torch.long), process_group=wd)):
            try:  # rank r holds n + r rows: raised before any per-row collective (which would hang)
                fn(torch.randn(n + rank, width), torch.randn(n + rank, width))
            except ValueError as e:
                assert "same rows" in str(e) and f"this rank {n + rank}" in str(e), str(e)
            else:
                raise AssertionError("unequal row counts did not raise")
        try:  # rank 0 passes a bf16 teacher, the others float32 (their row chunks would differ): all raise
            D.kd_loss(s, t.to(torch.bfloat16) if rank == 0 else t, 2.0, process_group=wd)
        except ValueError as e:
            assert "same dtypes" in str(e), str(e)
        else:
            raise AssertionError("unequal dtypes did not raise")
        try:  # rank 0 wants the teacher's gradient, the others not (round 3 would differ in size): all raise
            D.kd_loss(s, t.clone().requires_grad_(rank == 0), 2.0, process_group=wd)
        except ValueError as e:
            assert "requires_grad" in str(e), str(e)
        else:
            raise AssertionError("unequal requires_grad did not raise")
        try:
            D.jsd_loss(s, t, process_group=None)
        except ValueError as e:
            assert "process_group" in str(e)
        else:
            raise AssertionError("process_group=None did not raise")
        ids = torch.arange(n * 2).reshape(n, 2)
        ids[0] = torch.tensor([3, 3])  # repeated ids and an id past V in rows the loss does not read: fine
        ids[1, 0] = width * world + 5
        sw = torch.ones(n)
        sw[:2] = 0.0
        lp = torch.full((n, 2), -2.0)
        D.kd_loss(s, TopKTeacher(ids, lp), 2.0, process_group=wd, sample_weight=sw)
        try:
            D.kd_loss(s, TopKTeacher(ids, lp), 2.0, process_group=wd)
        except ValueError as e:
            assert "TopKTeacher indices" in str(e), str(e)
        else:
            raise AssertionError("bad top-k ids in read rows did not raise")
        try:
            D.tvd_loss(s, t, process_group=wd, sample_weight=torch.ones(n, requires_grad=True))
        except ValueError as e:
            assert "sample_weight" in str(e), str(e)
        else:
            raise AssertionError("a sample_weight requiring grad did not raise")
        x = s.clone().requires_grad_()
        loss = D.reverse_kl_loss(x, t, process_group=wd)
        loss.backward(retain_graph=True)
        try:
            loss.backward()
        except RuntimeError as e:
            assert "already used" in str(e)
        else:
            raise AssertionError("a second backward did not raise")

    def no_host_reads():
        """The GPU code path (no value checks, no host reads) on CPU tensors, every host read raising."""
        s, t = _inputs((n, width * world), 31)
        target = torch.arange(n) * 5
        target[1] = -100
        ids = torch.arange(n * 3).reshape(n, 3)
        lp = torch.full((n, 3), -2.0)
        cases = [
            lambda a, b: D.kd_loss(a, b, 2.0, process_group=wd, target=target, ce_weight=0.5, return_parts=True).loss,
            lambda a, b: D.jsd_loss(a, TopKTeacher(ids, lp), process_group=wd, target=target, ce_weight=0.5),
            lambda a, b: D.tvd_loss(a, TopKTeacher(ids, lp, mode="renormalize"), process_group=wd),
            lambda a, b: D.dkd_loss(a, b, target, process_group=wd),
            lambda a, b: D.ats_loss(a, b, target, process_group=wd),
            lambda a, b: D.dist_loss(a, b, process_group=wd),
        ]
        bad_target = target.clone()
        bad_target[2] = width * world  # out of range and unchecked: the GPU contract is a NaN row
        bad_ids = ids.clone()
        bad_ids[3, 1] = width * world
        nan_cases = [
            lambda a, b: D.kd_loss(a, b, 2.0, process_group=wd, target=bad_target, ce_weight=0.5,
                                   reduction="none"),
            lambda a, b: D.kd_loss(a, TopKTeacher(bad_ids, lp), 2.0, process_group=wd, reduction="none"),
            lambda a, b: D.dkd_loss(a, b, bad_target, process_group=wd, reduction="none"),
            lambda a, b: D.ats_loss(a, b, bad_target, process_group=wd, reduction="none"),
        ]
        for i, case in enumerate(cases + nan_cases):
            a, b = _shard(s, rank, world).requires_grad_(), _shard(t, rank, world).requires_grad_()
            upstream = torch.tensor(0.7)
            with _host_reads_forbidden():
                loss = case(a, b)
                (loss * upstream).sum().backward()
            if i < len(cases):
                assert a.grad is not None and bool(torch.isfinite(a.grad).all()), f"case {i}"
            else:  # exactly the bad row is NaN, in the loss and the gradient
                bad = torch.isnan(loss)
                assert int(bad.sum()) == 1 and bool(torch.isnan(a.grad[bad]).all()), f"NaN case {i}: {loss}"
                assert bool(torch.isfinite(a.grad[~bad]).all()), f"NaN case {i}"
        # unequal shard widths, unread on the host: every row NaN (rank r's shard is 1 + r columns wider)
        a = torch.randn(n, width + 1 + rank, requires_grad=True)
        with _host_reads_forbidden():
            loss = D.kd_loss(a, torch.randn(n, width + 1 + rank), 2.0, process_group=wd, reduction="none")
        assert bool(torch.isnan(loss).all()), f"unequal widths without host reads: {loss}"

    _record(failures, "bytes", bytes_do_not_grow_with_vocab)
    if DEVICE.type == "cpu":  # value checks and the emulated GPU path are CPU matters (on CUDA: _no_sync)
        _record(failures, "errors", errors)
        _record(failures, "no host reads", no_host_reads)


def _dist_checks(rank, world, failures):
    """DIST on sharded rows (uneven, one rank possibly empty) vs single-process DIST on the concatenation."""
    wd = dist.group.WORLD
    for counts, dtype in (([3, 5, 0, 4][:world], torch.float32), ([1, 6, 2, 2][:world], torch.bfloat16),
                          ([2, 2, 2, 2][:world], torch.float32)):
        def run(counts=counts, dtype=dtype):
            rtol, gtol = DTYPES[dtype]
            total, classes = sum(counts), 23
            s, t = _inputs((total, classes), 40 + len(counts) + sum(counts), scale=2.0)
            s, t = s.to(dtype), t.to(dtype)
            s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
            loss_ref = ref.dist_loss(s64, t64, beta=1.5, gamma=0.7, temperature=2.0)
            gs, gt = torch.autograd.grad(loss_ref, [s64, t64])
            lo = sum(counts[:rank])
            rows = slice(lo, lo + counts[rank])
            s_loc, t_loc = s[rows].to(DEVICE).requires_grad_(), t[rows].to(DEVICE).requires_grad_()
            with _no_sync():
                loss = D.dist_loss(s_loc, t_loc, process_group=wd, beta=1.5, gamma=0.7, temperature=2.0)
                loss.backward()
            torch.testing.assert_close(loss.detach().cpu().double(), loss_ref.detach(), rtol=rtol, atol=rtol * 0.1)
            # each rank holds world x its share of the gradient (DDP's average then gives the global one)
            for got, want in ((s_loc.grad, gs[rows]), (t_loc.grad, gt[rows])):
                if counts[rank]:
                    err = _rel(got / world, want)
                    assert err < gtol, f"DIST gradient relative error {err:.2e} (counts {counts})"
        _record(failures, f"dist {counts} {dtype}", run)

    def ddp_step():
        torch.manual_seed(0)
        hidden, classes = 8, 19
        model = torch.nn.Linear(hidden, classes)
        single = torch.nn.Linear(hidden, classes)
        single.load_state_dict(model.state_dict())
        model.to(DEVICE)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if DEVICE.type == "cuda" else None)
        counts = [3, 5, 4, 2][:world]
        g = torch.Generator().manual_seed(50)
        x = torch.randn(sum(counts), hidden, generator=g)
        teacher = torch.randn(sum(counts), classes, generator=g)
        lo = sum(counts[:rank])
        rows = slice(lo, lo + counts[rank])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        loss = D.dist_loss(ddp(x[rows].to(DEVICE)), teacher[rows].to(DEVICE), process_group=wd, temperature=2.0)
        loss.backward()
        opt.step()
        opt_single = torch.optim.SGD(single.parameters(), lr=0.5)
        loss_single = fastkd.dist_loss(single(x), teacher, temperature=2.0, backend="reference")
        loss_single.backward()
        opt_single.step()
        torch.testing.assert_close(loss.detach().cpu(), loss_single.detach(), rtol=1e-5, atol=1e-6)
        for p, q in zip(model.parameters(), single.parameters()):
            err = _rel(p.detach(), q.detach())
            assert err < 1e-5, f"DDP step != single-process step: relative error {err:.2e}"

    _record(failures, "ddp step", ddp_step)


def _public_api_checks(rank, world, failures):
    """``process_group=`` on the public functionals and modules routes to fastkd.distributed, bit for bit."""
    group = _group()
    s, t = _inputs((6, 8 * world), seed=40)
    target = torch.tensor([0, 3, -100, 8 * world - 1, 5, 2])
    s_r, t_r = _shard(s, rank, world), _shard(t, rank, world)
    cases = [
        (lambda **k: fastkd.kd_loss(s_r, t_r, 2.0, target=target, ce_weight=0.2, **k),
         lambda: D.kd_loss(s_r, t_r, 2.0, process_group=group, target=target, ce_weight=0.2)),
        (lambda **k: fastkd.jsd_loss(s_r, t_r, beta=0.3, target=target, **k),
         lambda: D.jsd_loss(s_r, t_r, beta=0.3, process_group=group, target=target)),
        (lambda **k: fastkd.nn.SkewKLLoss(skew=0.2, reverse=True, process_group=k.get("process_group"))(s_r, t_r),
         lambda: D.skew_kl_loss(s_r, t_r, skew=0.2, reverse=True, process_group=group)),
        (lambda **k: fastkd.dkd_loss(s_r, t_r, target, **k),
         lambda: D.dkd_loss(s_r, t_r, target, process_group=group)),
        (lambda **k: fastkd.nn.ATSLoss(process_group=k.get("process_group"))(s_r, t_r, target),
         lambda: D.ats_loss(s_r, t_r, target, process_group=group)),
        (lambda **k: fastkd.dist_loss(s_r, t_r, **k), lambda: D.dist_loss(s_r, t_r, process_group=group)),
        # ce_weight / return_parts pass through (LossParts compared field by field)
        (lambda **k: fastkd.dkd_loss(s_r, t_r, target, ce_weight=0.5, return_parts=True, **k),
         lambda: D.dkd_loss(s_r, t_r, target, process_group=group, ce_weight=0.5, return_parts=True)),
        (lambda **k: fastkd.ats_loss(s_r, t_r, target, ce_weight=0.5, reduction="none", **k),
         lambda: D.ats_loss(s_r, t_r, target, process_group=group, ce_weight=0.5, reduction="none")),
        (lambda **k: fastkd.nn.ATSLoss(ce_weight=0.3, return_parts=True, process_group=k.get("process_group"))(
            s_r, t_r, target),
         lambda: D.ats_loss(s_r, t_r, target, process_group=group, ce_weight=0.3, return_parts=True)),
        # DKDLoss's warm-up scales alpha and beta only: epoch 5 of 20 is alpha, beta x 0.25, the CE unscaled
        (lambda **k: fastkd.nn.DKDLoss(ce_weight=0.3, return_parts=True, process_group=k.get("process_group"))(
            s_r, t_r, target, epoch=5),
         lambda: D.dkd_loss(s_r, t_r, target, process_group=group, alpha=0.25, beta=2.0, ce_weight=0.3,
                            return_parts=True)),
    ]

    def routed():
        for public, direct in cases:
            got, want = public(process_group=group), direct()
            pairs = zip(got, want) if isinstance(want, R.LossParts) else [(got, want)]
            assert type(got) is type(want), (type(got), type(want))
            for x, y in pairs:
                assert torch.equal(x, y), (x, y)

    def dkd_warmup_ce_not_warmed():
        """The routed DKDLoss with the CE against the float64 reference: the warm-up factor leaves the CE alone."""
        got = fastkd.nn.DKDLoss(ce_weight=0.3, process_group=group)(s_r, t_r, target, epoch=5)
        want = ref.dkd_loss(s.double(), t.double(), target, alpha=0.25, beta=2.0, ce_weight=0.3)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)

    def fused_backend_refused():
        with pytest.raises(ValueError, match="cannot be chosen with process_group"):
            fastkd.tvd_loss(s_r, t_r, process_group=group, backend="cpu")
        with pytest.raises(ValueError, match="cannot be chosen with process_group"):
            fastkd.dkd_loss(s_r, t_r, target, process_group=group, ce_weight=0.5, backend="cpu")

    _record(failures, "public_api_routes_process_group", routed)
    _record(failures, "public_api_dkd_warmup_ce", dkd_warmup_ce_not_warmed)
    _record(failures, "public_api_refuses_fused_backend", fused_backend_refused)


def _nan_and_empty_checks(rank, world, failures):
    """A NaN logit in a counted row gives that row a NaN loss, on every path (never a finite number that
    hides it), also when one rank's part of the row is all NaN; zero rows give a zero loss."""
    n, width = 7, 11
    s, t = _inputs((n, width * world), 90)
    s[1, 3] = float("nan")  # one NaN in the student
    t[2, width * world - 2] = float("nan")  # one NaN in the teacher (the last shard)
    s[3, (world - 1) * width:] = float("nan")  # the last rank's part of the row: all NaN
    t[4, :width] = float("-inf")  # masked columns (not NaN): finite
    s[5] = float("nan")  # a whole row NaN (skew KL's selects once hid it: a finite loss)
    t[6] = float("-inf")  # a teacher with no mass at all: NaN, as the reference
    s_r, t_r = _shard(s, rank, world), _shard(t, rank, world)

    def run():
        for name, fn, kind, params, t2 in DIVERGENCES:
            d, r = _divergence_case(fn, kind, params, t2, temperature=2.0, reduction="none")
            a, b = s_r.detach().requires_grad_(), t_r.detach().requires_grad_()
            loss = d(a, b)
            bad = torch.isnan(loss)
            assert bad.tolist() == [False, True, True, True, False, True, True], f"{name}: {loss}"
            loss.nan_to_num().sum().backward()
            # the gradients NaN exactly where the single-process float64 reference's are (the whole bad rows,
            # both nets; TVD's other net: 0 for a NaN in one net, as the reference's sign term)
            s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
            r(s64, t64).nan_to_num().sum().backward()
            for what, grad, want in (("student", a.grad, s64.grad), ("teacher", b.grad, t64.grad)):
                want_nan = _shard(want, rank, world).isnan()
                assert torch.equal(grad.isnan().cpu(), want_nan), f"{name} {what} gradient NaN at rows " \
                    f"{grad.isnan().any(1).tolist()}, the reference at {want_nan.any(1).tolist()}"
                assert bool(torch.isfinite(grad[0]).all()), f"{name} {what} gradient"  # (row 4 may be inf)
                if kind != "tvd":
                    assert bool(torch.isnan(grad[bad]).all()), f"{name} {what} gradient: {grad[bad]}"

    def empty():
        for name, fn, kind, params, t2 in DIVERGENCES[:3]:
            d, _ = _divergence_case(fn, kind, params, t2, temperature=2.0, reduction="batchmean")
            a = torch.zeros(0, width, requires_grad=True)
            loss = d(a, torch.zeros(0, width))
            loss.backward()
            assert loss.item() == 0.0 and a.grad.shape == a.shape, (name, loss)

    for kernels in CPU_SHARD_MODES:
        D.SHARD_KERNELS = kernels
        try:
            _record(failures, f"NaN rows stay NaN ({kernels})", run)
            _record(failures, f"zero rows ({kernels})", empty)
        finally:
            D.SHARD_KERNELS = "auto"


def _tensor_temperature_checks(rank, world, failures):
    """kd_loss with a tensor temperature (CTKD: one learnable value, or one per row) that gets a gradient:
    the loss, the student and teacher slices and d loss / d T against the float64 reference."""
    n, width = 9, 23
    vocab = width * world
    s, t = _inputs((n, vocab), 70)
    g = torch.Generator().manual_seed(71)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[3] = -100  # an ignored row: with a target, its logits are NaN (never read, no temperature gradient)
    weight = torch.rand(n, generator=g) + 0.5
    per_row = torch.rand(n, generator=g) * 3 + 0.5
    cases = [  # (name, temperature, keyword arguments, dtype)
        ("scalar", torch.tensor(2.5), dict(reduction="batchmean", target=target, ce_weight=0.4), torch.float32),
        ("scalar [1] sum sw", torch.tensor([1.7]), dict(reduction="sum", sample_weight=weight), torch.float32),
        ("per row none", per_row, dict(reduction="none", target=target), torch.float32),
        ("per row [n, 1] mean", per_row.reshape(n, 1), dict(reduction="mean"), torch.float32),
        ("per row 3-D", per_row.reshape(1, n), dict(reduction="batchmean"), torch.float32),
        ("scalar bf16", torch.tensor(3.0), dict(reduction="batchmean", target=target, ce_weight=0.5),
         torch.bfloat16),
        ("scalar float64", torch.tensor(0.8, dtype=torch.float64), dict(reduction="batchmean"), torch.float64),
    ]
    for name, temp, kw, dtype in cases:
        def run(temp=temp, kw=kw, dtype=dtype, name=name):
            rtol, gtol = DTYPES[dtype]
            three_d = temp.dim() == 2 and temp.shape[0] == 1
            shape = (1, n, vocab) if three_d else (n, vocab)
            kw_s = {k: (x.reshape(shape[:-1]) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
            s_q, t_q = s.to(dtype, copy=True), t.to(dtype).reshape(shape)
            if "target" in kw:
                s_q[3] = float("nan")
            s_q = s_q.reshape(shape)
            s64, t64 = s_q.double().requires_grad_(), t_q.double().requires_grad_()
            temp64 = temp.detach().to(torch.float64, copy=True).requires_grad_()
            loss_ref = ref.kd_loss(s64, t64, temp64, **kw_s)
            upstream = torch.rand(loss_ref.shape, generator=torch.Generator().manual_seed(5),
                                  dtype=torch.float64) + 0.5
            gs, gt, gtemp = torch.autograd.grad((loss_ref * upstream).sum(), [s64, t64, temp64])
            s_loc = _shard(s_q, rank, world).requires_grad_()
            t_loc = _shard(t_q, rank, world).requires_grad_()
            temp_loc = temp.detach().to(DEVICE, copy=True).requires_grad_()
            with _no_sync():
                loss = D.kd_loss(s_loc, t_loc, temp_loc, process_group=_group(),
                                 **{k: _on(x, s_loc) if isinstance(x, torch.Tensor) else x for k, x in kw_s.items()})
                (loss * upstream.to(device=DEVICE, dtype=loss.dtype)).sum().backward()
            torch.testing.assert_close(loss.detach().cpu().double(), loss_ref.detach(), rtol=rtol, atol=rtol * 0.1)
            sl = slice(rank * width, (rank + 1) * width)
            for what, got, want in (("student", s_loc.grad, gs[..., sl]), ("teacher", t_loc.grad, gt[..., sl]),
                                    ("temperature", temp_loc.grad, gtemp)):
                assert got is not None, what
                assert got.shape == want.shape and got.dtype == (temp.dtype if what == "temperature" else dtype), \
                    (what, got.shape, got.dtype)
                err = _rel(got, want)
                assert err < gtol, f"{what} gradient relative error {err:.2e} >= {gtol}"

        _record(failures, f"kd tensor temperature {name}", run)

    def refused():
        with pytest.raises(TypeError, match="dense teacher logits only"):
            D.reverse_kl_loss(_shard(s, rank, world), _shard(t, rank, world), process_group=_group(),
                              temperature=torch.tensor(2.0))
        ids = torch.arange(n * 2).reshape(n, 2)
        with pytest.raises(TypeError, match="dense teacher logits only"):
            D.kd_loss(_shard(s, rank, world), TopKTeacher(ids, torch.full((n, 2), -1.0)), torch.tensor(2.0),
                      process_group=_group())

    def routed():  # the public module with a learnable temperature takes the same path
        s_r, t_r = _shard(s, rank, world), _shard(t, rank, world)
        temp = torch.tensor(1.3, requires_grad=True)
        got = fastkd.nn.KDLoss(process_group=_group())(s_r, t_r, temperature=temp)
        got.backward()
        temp2 = torch.tensor(1.3, requires_grad=True)
        want = D.kd_loss(s_r, t_r, temp2, process_group=_group())
        want.backward()
        assert torch.equal(got, want) and torch.equal(temp.grad, temp2.grad), (got, want, temp.grad, temp2.grad)

    def masked_teacher():  # -inf teacher columns: d loss / d T stays finite (0 * -inf must not appear)
        t_m = t.clone()
        t_m[:, :3] = float("-inf")
        t_m[:, -2:] = float("-inf")
        temps = (torch.tensor(2.0, requires_grad=True), torch.tensor(2.0, requires_grad=True))
        s_full = s.clone().requires_grad_()
        want = fastkd.kd_loss(s_full, t_m, temps[0], target=target)
        want.backward()
        s_loc = _shard(s, rank, world).requires_grad_()
        got = D.kd_loss(s_loc, _shard(t_m, rank, world), temps[1], process_group=_group(), target=_on(target, s_loc))
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(temps[1].grad), temps[1].grad
        err = _rel(temps[1].grad, temps[0].grad)
        assert err < 1e-4, f"temperature gradient relative error {err:.2e} (want {temps[0].grad}, got {temps[1].grad})"
        err = _rel(s_loc.grad, s_full.grad[:, rank * width:(rank + 1) * width])
        assert err < 1e-5, f"student gradient relative error {err:.2e}"

    _record(failures, "tensor temperature refused (top-k, other divergences)", refused)
    _record(failures, "tensor temperature, masked teacher columns", masked_teacher)
    _record(failures, "tensor temperature through fastkd.nn.KDLoss", routed)


def _fused_linear_checks(rank, world, failures, full=True):
    """``fused_linear_kd_loss(process_group=)`` (vocabulary-sharded head weight) vs the float64
    single-process fused loss on the whole head: the loss, the whole grad_hidden, the weight
    and bias slices; chunks of 4 rows (ragged), every teacher form and divergence."""
    n, hdim, hdim_t, width = 11, 6, 5, 17
    vocab = width * world
    g = torch.Generator().manual_seed(60)
    hidden = torch.randn(n, hdim, generator=g)
    weight = torch.randn(vocab, hdim, generator=g) * 0.7
    bias = torch.randn(vocab, generator=g) * 0.3
    t_hidden = torch.randn(n, hdim_t, generator=g)
    t_weight = torch.randn(vocab, hdim_t, generator=g) * 0.7
    t_logits = torch.randn(n, vocab, generator=g) * 2.0
    target = torch.randint(0, vocab, (n,), generator=g)
    target[[2, 7]] = -100
    sample_weight = torch.rand(n, generator=g) + 0.5
    sample_weight[4] = 0.0
    ids_spread = _topk_ids(n, 5, vocab, 61)
    ids_shard0 = _topk_ids(n, 4, vocab, 62, hi=width)  # every id in shard 0: the others own none
    logprobs = torch.log_softmax(torch.randn(n, 5, generator=g), dim=1) - 0.4  # top-5 mass exp(-0.4)
    shared_hidden = torch.randn(n, hdim, generator=g)  # a shared head's teacher rows (the student's weight)

    def piece(x):  # this rank's rows of a [V, ...] tensor
        return x[rank * width:(rank + 1) * width]

    # (name, keyword arguments, teacher form, student bias, target, sample_weight, dtype)
    cases = [
        ("kl T=2 ce parts bias", dict(divergence="kl", temperature=2.0, ce_weight=0.3, return_parts=True),
         "pair", True, target, None, torch.float32),
        ("reverse_kl logits sum sw", dict(divergence="reverse_kl", reduction="sum"), "logits", False, None,
         sample_weight, torch.float32),
        ("jsd softcap scale mean", dict(divergence="jsd", beta=0.3, softcap=5.0, logit_scale=0.7, reduction="mean"),
         "pair", True, target, None, torch.float32),
        ("skew_kl none", dict(divergence="skew_kl", skew=0.2, reduction="none"), "pair", False, target,
         sample_weight, torch.float32),
        ("skew_reverse_kl ce", dict(divergence="skew_reverse_kl", skew=0.1, ce_weight=1.0, chunk_size=None),
         "pair", False, target, None, torch.float32),
        ("tvd ce", dict(divergence="tvd", ce_weight=0.5, temperature=1.5), "pair", True, target, None,
         torch.float32),
        ("kl top-k tail", dict(divergence="kl", temperature=1.0, ce_weight=0.2), "topk tail", False, target, None,
         torch.float32),
        ("jsd top-k renormalize shard0", dict(divergence="jsd", beta=0.5), "topk renorm shard0", True, None, None,
         torch.float32),
        ("kl bf16 ce", dict(divergence="kl", temperature=2.0, ce_weight=0.5), "pair", True, target, None,
         torch.bfloat16),
        ("reverse_kl 3-D", dict(divergence="reverse_kl"), "pair 3d", False, target, None, torch.float32),
        ("jsd teacher_temperature", dict(divergence="jsd", temperature=2.0, teacher_temperature=1.3, ce_weight=0.2),
         "pair", True, target, None, torch.float32),
        ("kl shared head teacher_temperature", dict(divergence="kl", temperature=2.0, teacher_temperature=3.0),
         "shared", True, target, None, torch.float32),
        ("entropy_gated_kl ce", dict(divergence="entropy_gated_kl", alpha_min=0.2, alpha_max=0.9, tau=0.8, scale=0.1,
                                     ce_weight=0.3, temperature=2.0), "pair", True, target, None, torch.float32),
        ("entropy_gated_kl top-k tail", dict(divergence="entropy_gated_kl", alpha_min=0.1, alpha_max=0.7, tau=0.2,
                                             scale=0.3), "topk tail", False, target, None, torch.float32),
        # a mixture of a head and dense logits: each member's softmax over the group's whole vocabulary
        ("jsd mixture arithmetic teacher_temperature ce",
         dict(divergence="jsd", beta=0.4, temperature=2.0, teacher_temperature=1.5, ce_weight=0.2),
         "mixture arithmetic", True, target, None, torch.float32),
        ("kl mixture geometric sum sw", dict(divergence="kl", reduction="sum"), "mixture geometric", False, None,
         sample_weight, torch.float32),
        ("ab_divergence ce", dict(divergence="ab_divergence", alpha=0.2, beta=0.7, ce_weight=0.3, temperature=2.0),
         "pair", True, target, None, torch.float32),
        ("renyi reverse top-k tail", dict(divergence="renyi", order=2.0, reverse=True), "topk tail", False, target,
         None, torch.float32),
        ("renyi", dict(divergence="renyi", order=0.5, temperature=2.0), "pair", True, None, None, torch.float32),
    ]
    if not full:
        cases = cases[:1] + cases[6:8]

    def teacher_of(form, t_h, t_w, t_l, lp, local):
        if form.startswith("mixture"):
            return fastkd.TeacherMixture([(t_h, piece(t_w) if local else t_w), piece(t_l.T).T if local else t_l],
                                         [0.3, 0.7], mode=form.split()[1])
        if form == "shared":
            return (shared_hidden.to(t_h.device, t_h.dtype), None)
        if form.startswith("pair"):
            return (t_h, piece(t_w) if local else t_w)
        if form == "logits":
            return piece(t_l.T).T if local else t_l
        ids = ids_shard0 if "shard0" in form else ids_spread
        k = ids.shape[1]
        return TopKTeacher(ids.to(t_h.device), lp[:, :k].to(t_h.device),
                           mode="renormalize" if "renorm" in form else "tail")

    for name, kw, form, use_bias, tgt, sw, dtype in cases:
        def run(name=name, kw=kw, form=form, use_bias=use_bias, tgt=tgt, sw=sw, dtype=dtype):
            rtol, gtol = DTYPES[dtype]
            three_d = form.endswith("3d")
            shape = (1, n, -1) if three_d else (n, -1)
            q = [x.to(dtype) for x in (hidden, weight, bias, t_hidden, t_weight, t_logits)]
            h64, w64, b64 = (x.double().requires_grad_() for x in q[:3])
            th64, tw64, tl64 = (x.double() for x in q[3:])
            tgt_r = None if tgt is None else tgt.reshape(shape[:-1])
            out_ref = fastkd.fused_linear_kd_loss(
                h64.reshape(shape), w64, teacher_of(form, th64.reshape(shape), tw64, tl64, logprobs.double(), False),
                tgt_r, student_bias=b64 if use_bias else None, sample_weight=sw, backend="reference", **kw)
            loss_ref = out_ref.loss if kw.get("return_parts") else out_ref
            upstream = torch.rand(loss_ref.shape, generator=torch.Generator().manual_seed(3),
                                  dtype=torch.float64) + 0.5
            leaves = [h64, w64] + ([b64] if use_bias else [])
            grads_ref = torch.autograd.grad((loss_ref * upstream).sum(), leaves)

            h_loc = q[0].to(DEVICE, copy=True).requires_grad_()
            w_loc = piece(q[1]).to(DEVICE, copy=True).requires_grad_()
            b_loc = piece(q[2]).to(DEVICE, copy=True).requires_grad_()
            teacher = teacher_of(form, q[3].to(DEVICE).reshape(shape), q[4].to(DEVICE), q[5].to(DEVICE),
                                 logprobs.to(dtype), True)
            kw_loc = dict(kw)
            kw_loc.setdefault("chunk_size", 4)
            with _no_sync():
                out = fastkd.fused_linear_kd_loss(h_loc.reshape(shape), w_loc, teacher, _on(tgt_r, h_loc),
                                                  student_bias=b_loc if use_bias else None,
                                                  sample_weight=_on(sw, h_loc), process_group=_group(), **kw_loc)
                loss = out.loss if kw.get("return_parts") else out
                (loss * upstream.to(device=DEVICE, dtype=loss.dtype)).sum().backward()
            values = [(loss, loss_ref)]
            if kw.get("return_parts"):
                values += [(out.soft, out_ref.soft), (out.hard, out_ref.hard)]
            for got, want in values:
                assert got.shape == want.shape, (got.shape, want.shape)
                torch.testing.assert_close(got.detach().cpu().double(), want.detach(), rtol=rtol, atol=rtol * 0.1)
            checks = [("hidden", h_loc.grad, grads_ref[0]), ("weight", w_loc.grad, piece(grads_ref[1]))]
            if use_bias:
                checks.append(("bias", b_loc.grad, piece(grads_ref[2])))
            for what, got, want in checks:
                assert got.dtype == dtype, (what, got.dtype)
                err = _rel(got, want)
                assert err < gtol, f"grad {what}: relative error {err:.2e} >= {gtol}"

        _record(failures, f"fused linear {name}", run)

    def comm_and_errors():
        group = _group()
        counted = {}
        for w_local in (8, 300):
            for need_h in (False, True):
                h = hidden.to(DEVICE).requires_grad_(need_h)
                wt = torch.randn(w_local, hdim, device=DEVICE, requires_grad=True)
                with D.count_comm() as c:
                    fastkd.fused_linear_kd_loss(h, wt, (t_hidden.to(DEVICE), torch.randn(w_local, hdim_t, device=DEVICE)),
                                                process_group=group, divergence="kl").backward()
                counted[w_local, need_h] = c.bytes
        assert counted[8, False] == counted[300, False], f"bytes grew with the vocabulary: {counted}"
        # the input gradient of the column-parallel head: one [N, H] float32 all-reduce
        assert counted[8, True] - counted[8, False] == 4 * n * hdim, counted
        if DEVICE.type != "cpu":
            return
        wt = piece(weight).requires_grad_()
        with pytest.raises(ValueError, match="cannot be chosen with process_group"):
            fastkd.fused_linear_kd_loss(hidden, wt, (t_hidden, piece(t_weight)), process_group=group, backend="cpu")
        with pytest.raises(ValueError, match="as wide as student_weight"):
            fastkd.fused_linear_kd_loss(hidden, wt, (t_hidden, t_weight[:width + 1]), process_group=group)
        with pytest.raises(ValueError, match="outside|target"):
            fastkd.fused_linear_kd_loss(hidden, wt, (t_hidden, piece(t_weight)), torch.full((n,), vocab),
                                        ce_weight=1.0, process_group=group)
        with pytest.raises(ValueError, match="same rows"):
            fastkd.fused_linear_kd_loss(hidden[:n - rank], wt, (t_hidden[:n - rank], piece(t_weight)),
                                        process_group=group)
        module = fastkd.nn.FusedLinearKDLoss(divergence="jsd", process_group=group, chunk_size=3)
        got = module(hidden, wt, (t_hidden, piece(t_weight)), target)
        want = fastkd.fused_linear_kd_loss(hidden, wt, (t_hidden, piece(t_weight)), target, divergence="jsd",
                                           process_group=group, chunk_size=3)
        assert torch.equal(got, want), (got, want)

    _record(failures, "fused linear communication and errors", comm_and_errors)


def _uld_checks(rank, world, failures):
    """``uld_loss(process_group=)``: vocabulary-parallel student and teacher (unequal widths) vs the float64
    single-process reference on the whole rows: loss, parts and both gradients' slices."""
    n, ws, wt = 7, 90, 53
    g = torch.Generator().manual_seed(70)
    s_full = torch.randn(n, ws * world, generator=g, dtype=torch.float64) * 3
    t_full = torch.randn(n, wt * world, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, ws * world, (n,), generator=g)
    target[2] = -100
    sample_weight = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    sample_weight[4] = 0.0

    def piece(x, width):
        return x[:, rank * width:(rank + 1) * width]

    cases = [  # (name, inputs, keyword arguments)
        ("logits T ce parts", "logits", dict(temperature=1.5, teacher_temperature=1.2, target=target, ce_weight=0.3,
                                             return_parts=True)),
        ("logits none sw", "logits", dict(reduction="none", sample_weight=sample_weight)),
        ("log_probs mean ce", "log_probs", dict(reduction="mean", target=target, ce_weight=0.5)),
    ]
    for name, inputs, kw in cases:
        def run(inputs=inputs, kw=kw):
            s0, t0 = (s_full, t_full) if inputs == "logits" else (torch.log_softmax(s_full, -1) - 0.2,
                                                                  torch.log_softmax(t_full, -1))
            s0, t0 = s0.clone(), t0.clone()
            if "target" in kw:
                s0[2] = float("nan")  # an ignored row is never read, on any rank
            if "sample_weight" in kw:
                t0[4] = float("nan")  # nor a row of weight 0
            ref_s, ref_t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
            ref = fastkd.uld_loss(ref_s, ref_t, inputs=inputs, backend="reference", **kw)
            ref_loss = ref.loss if kw.get("return_parts") else ref
            upstream = torch.rand(ref_loss.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
            (ref_loss * upstream).sum().backward()
            ls = piece(s0, ws).float().to(DEVICE).requires_grad_()
            lt = piece(t0, wt).float().to(DEVICE).requires_grad_()
            kw_loc = {key: _on(val, ls) if isinstance(val, torch.Tensor) else val for key, val in kw.items()}
            if "sample_weight" in kw_loc:
                kw_loc["sample_weight"] = kw_loc["sample_weight"].float()
            with _no_sync():
                out = fastkd.uld_loss(ls, lt, inputs=inputs, process_group=_group(), **kw_loc)
                loss = out.loss if kw.get("return_parts") else out
                (loss * upstream.to(device=DEVICE, dtype=loss.dtype)).sum().backward()
            for got, want in zip(out if kw.get("return_parts") else [out], ref if kw.get("return_parts") else [ref]):
                torch.testing.assert_close(got.detach().cpu().double(), want.detach(), rtol=2e-5, atol=1e-7)
            for what, got, want in (("student", ls.grad, piece(ref_s.grad, ws)), ("teacher", lt.grad,
                                                                                  piece(ref_t.grad, wt))):
                err = _rel(got, want)
                assert err < 1e-5, f"grad {what}: relative error {err:.2e}"

        _record(failures, f"uld {name}", run)

    def errors():
        if DEVICE.type != "cpu":
            return
        s, t = piece(s_full, ws).float(), piece(t_full, wt).float()
        with pytest.raises(ValueError, match="k must be None"):
            fastkd.uld_loss(s, t, k=5, process_group=_group())
        with pytest.raises(ValueError, match="cannot be chosen with process_group"):
            fastkd.uld_loss(s, t, backend="cpu", process_group=_group())
        with pytest.raises(ValueError, match="target"):
            fastkd.uld_loss(s, t, target=torch.full((n,), ws * world), ce_weight=1.0, process_group=_group())

    _record(failures, "uld errors", errors)


def _fused_teacher_grad_checks(rank, world, failures):
    """``teacher_grad=True`` over a vocabulary-sharded group: every rank's teacher weight and bias slices and the
    whole teacher hidden gradient (summed over the group) equal the single-process float64 ones."""
    n, hdim, hdim_t, width = 9, 6, 5, 13
    vocab = width * world
    g = torch.Generator().manual_seed(70)
    base = [torch.randn(n, hdim, generator=g), torch.randn(vocab, hdim, generator=g) * 0.7,
            torch.randn(n, hdim_t, generator=g), torch.randn(vocab, hdim_t, generator=g) * 0.7,
            torch.randn(vocab, generator=g) * 0.3]
    target = torch.randint(0, vocab, (n,), generator=g)
    target[3] = -100

    def piece(x):
        return x[rank * width:(rank + 1) * width]

    for divergence in ("jsd", "kl", "tvd"):
        def run(divergence=divergence):
            kw = dict(divergence=divergence, temperature=2.0, teacher_temperature=1.5, ce_weight=0.3,
                      teacher_grad=True)
            ref = [x.double().requires_grad_() for x in base]
            loss_ref = fastkd.fused_linear_kd_loss(ref[0], ref[1], (ref[2], ref[3]), target, teacher_bias=ref[4],
                                                   backend="reference", **kw)
            grads_ref = torch.autograd.grad(loss_ref, ref)
            h, w, th, tw, tb = (x.to(DEVICE, copy=True) for x in (base[0], piece(base[1]), base[2], piece(base[3]),
                                                                  piece(base[4])))
            leaves = [x.requires_grad_() for x in (h, w, th, tw, tb)]
            with _no_sync():
                loss = fastkd.fused_linear_kd_loss(h, w, (th, tw), _on(target, h), teacher_bias=tb, chunk_size=4,
                                                   process_group=_group(), **kw)
                loss.backward()
            torch.testing.assert_close(loss.detach().cpu().double(), loss_ref.detach(), rtol=2e-5, atol=2e-6)
            wants = [grads_ref[0], piece(grads_ref[1]), grads_ref[2], piece(grads_ref[3]), piece(grads_ref[4])]
            for what, x, want in zip(("hidden", "weight", "teacher_hidden", "teacher_weight", "teacher_bias"),
                                     leaves, wants):
                err = _rel(x.grad, want)
                assert err < 2e-5, f"grad {what}: relative error {err:.2e}"

        _record(failures, f"fused linear teacher_grad {divergence}", run)


def _kernel_route_checks(rank, world, failures):
    """On CPU tensors the dense divergences run on the shard kernels (csrc/cpu/divergence_shard.cpp); with
    SHARD_KERNELS off, float64 or a top-k teacher, on the PyTorch math."""
    s, t = _inputs((5, 8 * world), 80)
    s_r, t_r = _shard(s, rank, world), _shard(t, rank, world)
    ids = torch.arange(10).reshape(5, 2)

    def ops_run(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return {e.key for e in prof.key_averages() if e.key.startswith("fastkd::divergence_shard")}

    def routes():
        kernels = {"fastkd::divergence_shard_stats", "fastkd::divergence_shard_terms", "fastkd::divergence_shard_grad"}
        got = ops_run(lambda: D.jsd_loss(s_r.requires_grad_(), t_r, process_group=_group()).backward())
        assert got == kernels, got
        for dtype in (torch.bfloat16, torch.float16):  # read as they are (no float32 copy of the rows)
            s_h = s_r.detach().to(dtype).requires_grad_()
            got = ops_run(lambda: D.jsd_loss(s_h, t_r.to(dtype), process_group=_group()).backward())
            assert got == kernels and s_h.grad.dtype == dtype, (dtype, got)
        assert ops_run(lambda: D.jsd_loss(s_r.double(), t_r.double(), process_group=_group())) == set()
        assert ops_run(lambda: D.kd_loss(s_r, TopKTeacher(ids, torch.full((5, 2), -1.0)), process_group=_group())) \
            == set()
        D.SHARD_KERNELS = "off"
        try:
            assert ops_run(lambda: D.jsd_loss(s_r, t_r, process_group=_group())) == set()
        finally:
            D.SHARD_KERNELS = "auto"

    def triton_routes():  # SHARD_KERNELS = "triton": CPU tensors on the Triton kernels (the interpreter)
        from fastkd.triton import divergence_shard as tds
        calls, saved = [], {}
        for name in ("divergence_shard_stats", "divergence_shard_terms", "divergence_shard_grad"):
            saved[name] = getattr(tds, name)
            setattr(tds, name, lambda *a, _f=saved[name], _n=name: calls.append(_n) or _f(*a))
        D.SHARD_KERNELS = "triton"
        try:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                D.reverse_kl_loss(s_r.detach().to(dtype).requires_grad_(), t_r.to(dtype),
                                  process_group=_group()).backward()
        finally:
            D.SHARD_KERNELS = "auto"
            for name, fn in saved.items():
                setattr(tds, name, fn)
        # one chunk for float32, bf16 and fp16 rows, so each kernel once per call, whatever CHUNK_MIN_ROWS
        want = ["divergence_shard_stats", "divergence_shard_terms", "divergence_shard_grad"]
        assert calls == want * 3, calls

    if DEVICE.type == "cpu":
        _record(failures, "shard kernels run on CPU tensors", routes)
        if "triton" in CPU_SHARD_MODES:
            _record(failures, "Triton shard kernels run when asked", triton_routes)


def _checks_world2(rank, world, failures):
    # row chunks of 4 rows (the last one ragged): every collective sequence runs several times per call
    D.CHUNK_MIN_ROWS = 4
    _vocab_checks(rank, world, failures)
    _dkd_ats_checks(rank, world, failures)
    # the dense divergences on the PyTorch math too, and on CPU tensors on the Triton shard kernels (CUDA
    # tensors' path) in the interpreter
    for kernels in CPU_SHARD_MODES[1:] if DEVICE.type == "cpu" else ("off",):
        D.SHARD_KERNELS = kernels
        try:
            _vocab_checks(rank, world, failures)
        finally:
            D.SHARD_KERNELS = "auto"
    if DEVICE.type == "cpu":
        _kernel_route_checks(rank, world, failures)
    D.CHUNK_MIN_ROWS = 64
    _api_checks(rank, world, failures)
    _public_api_checks(rank, world, failures)
    _tensor_temperature_checks(rank, world, failures)
    if DEVICE.type == "cpu":
        _nan_and_empty_checks(rank, world, failures)
    _fused_linear_checks(rank, world, failures)
    _fused_teacher_grad_checks(rank, world, failures)
    _uld_checks(rank, world, failures)
    _dist_checks(rank, world, failures)


def _checks_world4(rank, world, failures):
    global GROUP
    _vocab_checks(rank, world, failures, full=False)
    _dkd_ats_checks(rank, world, failures, full=False)
    # tensor-parallel subgroups inside data parallelism: ranks {0, 1} and {2, 3} each shard the vocabulary
    # in two (the shard index is the rank in the group, not the global rank)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    GROUP = pairs[rank // 2]
    try:
        _vocab_checks(dist.get_rank(GROUP), 2, failures, full=False)
        _dkd_ats_checks(dist.get_rank(GROUP), 2, failures, full=False)
        _fused_linear_checks(dist.get_rank(GROUP), 2, failures, full=False)
        _uld_checks(dist.get_rank(GROUP), 2, failures)
    finally:
        GROUP = None
    _api_checks(rank, world, failures)
    _dist_checks(rank, world, failures)


pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is unavailable")


def test_world_2():
    _launch(2, "_checks_world2")


def test_world_4():
    _launch(4, "_checks_world4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gloo_cuda_world_2():
    """The world-2 table on CUDA tensors of one GPU over gloo: the Triton shard kernels and the GPU code
    path (every loss call under set_sync_debug_mode('error')) where a machine has one GPU."""
    _launch(2, "_checks_world2", backend="gloo-cuda")


@pytest.mark.skipif(not dist.is_available() or not dist.is_nccl_available() or not torch.cuda.is_available()
                    or torch.cuda.device_count() < 2, reason="needs NCCL and 2 GPUs")
def test_nccl_world_2():
    """The world-2 table with NCCL on CUDA tensors, every loss call under set_sync_debug_mode('error')."""
    _launch(2, "_checks_world2", backend="nccl")


def _shard_ops(name):
    if name == "cpu":
        if not hasattr(torch.ops.fastkd, "divergence_shard_terms"):
            pytest.skip("compiled extension not built")
        return torch.ops.fastkd, torch.device("cpu")
    if name == "triton-interpreter" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton shard kernels run on CPU tensors under TRITON_INTERPRET=1 only")
    if name == "triton-cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("triton", reason="triton is not installed: the Triton shard kernels are not checked")
    from fastkd.triton import divergence_shard
    return divergence_shard, torch.device("cuda" if name == "triton-cuda" else "cpu")


@pytest.mark.parametrize("ops_name", ["cpu", "triton-interpreter", "triton-cuda"])
@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_shard_kernels_forward_kl_gradients(ops_name, teacher_grad, temperature):
    """The shard kernels on whole rows (a group of one): forward KL's student gradient straight from the
    terms pass (``row_direct``: sum G = -1 known), and both gradients from the terms and grad passes,
    against float64 autograd of
    ``sum_i w_i T^2 KL(p_i || q_i) / T + ce_i CE_i`` and against the terms + grad passes; rows wider than one
    Triton block with a ragged tail, an unread row, masked (-inf) columns, rows with ce 0."""
    ops, dev = _shard_ops(ops_name)
    n, v, T = 6, 2 * 4096 + 37, temperature
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(n, v, generator=g) * 3).to(dev)
    t = (torch.randn(n, v, generator=g) * 3).to(dev)
    t[1, 7] = float("-inf")  # a column the teacher masks, and one both mask
    s[1, 9] = t[1, 9] = float("-inf")
    s[4, 4100] = float("-inf")  # q = 0 under teacher mass: loss inf, student gradient finite (G = -p there)
    read = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], device=dev)
    coef = torch.tensor([0.5, 1.0, 1.0, 2.0, 0.25, 1.0], device=dev) * read
    ce = torch.tensor([0.3, 0.0, 0.0, 1.0, 0.0, 0.7], device=dev) * read
    st = ops.divergence_shard_stats(s, t, T, True, read)
    row_stats = torch.stack([st[:, 0], st[:, 1].log(), st[:, 2], st[:, 3].log(), st[:, 4].log()], 1).contiguous()
    empty = torch.empty(0, device=dev)
    a, b, w_p, w_q = R.divergence_coefficients("forward_kl")

    # the student's gradient from the terms pass (never with a teacher gradient)
    gs_d = torch.empty(n, v, device=dev)
    no_target = torch.empty(0, dtype=torch.int64, device=dev)
    sums_d = ops.divergence_shard_terms(s, t, row_stats, T, 0, a, b, w_p, w_q, read,
                                        torch.stack([coef, ce], 1).contiguous(), no_target, gs_d, empty)
    # terms + grad passes, with the teacher gradient when asked
    gs_p = torch.empty(n, v, device=dev)
    gt_p = torch.empty(n, v, device=dev) if teacher_grad else empty
    sums_p = ops.divergence_shard_terms(s, t, row_stats, T, 0, a, b, w_p, w_q, read, empty, no_target, gs_p, gt_p)
    row_coef = torch.cat([torch.stack([sums_p[:, 1], sums_p[:, 2], coef, coef, ce], 1),
                          torch.zeros(n, 5, device=dev)], 1).contiguous()
    ops.divergence_shard_grad(s, t, row_stats, T, 0, a, b, w_p, w_q, row_coef, read, no_target, gs_p, gt_p)
    s64 = s.double().cpu().requires_grad_()
    t64 = t.double().cpu().requires_grad_()
    lq, lp = torch.log_softmax(s64 / T, 1), torch.log_softmax(t64 / T, 1)
    has_p = lp.detach() > float("-inf")  # 0 log 0 = 0, with finite gradients on both branches of the where
    zero = torch.zeros((), dtype=torch.float64)
    kl = torch.where(has_p, lp.exp() * (torch.where(has_p, lp, zero) - torch.where(has_p, lq, zero)), zero).sum(1)
    ce_rows = -torch.log_softmax(s64, 1)[:, 0]  # the CE's softmax part (no row_target: no one-hot)
    keep = read.cpu().bool()
    loss = (torch.where(keep, coef.double().cpu() * T * kl, 0) + torch.where(keep, ce.double().cpu() * ce_rows, 0)).sum()
    loss.backward()
    want_s = s64.grad.clone()
    want_s[:, 0] += ce.double().cpu()  # drop the one-hot of column 0 (not the kernels' part)

    def rel(x, y):
        return ((x.double().cpu() - y).norm() / y.norm()).item()

    assert torch.equal(sums_d[:, :2], sums_p[:, :2])
    finite = keep & torch.isfinite(kl.detach())
    assert torch.isinf(sums_d[4, 0]) and finite.sum() == 4
    assert rel(sums_d[:, 0][finite], kl.detach()[finite]) < 1e-5
    for got in (gs_d, gs_p):
        assert rel(got, want_s) < 1e-5, rel(got, want_s)
        assert torch.all(got[2] == 0)
    if teacher_grad:  # (the inf row's teacher gradient is not finite, in the reference too)
        assert rel(gt_p[finite], t64.grad[finite]) < 1e-5, rel(gt_p[finite], t64.grad[finite])
        assert torch.all(gt_p[2] == 0)


@pytest.mark.parametrize("ops_name", ["cpu", "triton-interpreter"])
def test_shard_terms_direct_needs_a_known_sum(ops_name):
    """row_direct is refused where sum G is not known beforehand (JSD, TVD), without a g buffer or with an h."""
    ops, dev = _shard_ops(ops_name)
    s = torch.randn(3, 40)
    st = torch.zeros(3, 5)
    read, direct, g = torch.ones(3), torch.ones(3, 2), torch.empty(3, 40)
    kl, none = R.divergence_coefficients("forward_kl"), torch.empty(0)
    for kind, coefficients, g_buf, h_buf in ((0, R.divergence_coefficients("jsd"), g, none),
                                             (1, (0.0, 0.0, 0.0, 0.0), g, none), (0, kl, none, none),
                                             (0, kl, g, torch.empty(3, 40))):
        with pytest.raises((ValueError, RuntimeError), match="row_direct"):
            ops.divergence_shard_terms(s, s, st, 1.0, kind, *coefficients, read, direct,
                                       torch.empty(0, dtype=torch.long), g_buf, h_buf)


def _shard_passes(ops, s, t, T, kind, coefficients, read, coef, ce, target, g, h, direct=False):
    """The three shard passes on whole rows (a group of one, no collectives): the row sums; g, h written."""
    st = ops.divergence_shard_stats(s, t, T, True, read)
    row_stats = torch.stack([st[:, 0], st[:, 1].log(), st[:, 2], st[:, 3].log(), st[:, 4].log()], 1).contiguous()
    row_direct = torch.stack([coef, ce], 1).contiguous() if direct else torch.empty(0, device=s.device)
    sums = ops.divergence_shard_terms(s, t, row_stats, T, kind, *coefficients, read, row_direct, target, g, h)
    if not direct and kind == 7:  # entropy-gated: KL(p || q), KL(q || p), H(p) -> the gate w (in the masses' place)
        w = entropy_gate(sums[:, 2], s.shape[1], *coefficients)
        row_coef = torch.stack([(1 - w) * sums[:, 1] - w, w * sums[:, 0] - (1 - w), coef, coef, ce, w]
                               + [torch.zeros_like(w)] * 4, 1)
        ops.divergence_shard_grad(s, t, row_stats, T, kind, *coefficients, row_coef.contiguous(), read, target, g, h)
    elif not direct and kind == 6:  # Renyi: U, S -> the row's sums and 1 / S (in the masses' place)
        _, sum_g, sum_h, inv_s, direct = renyi_row(sums[:, 0], sums[:, 1], coefficients[0], coefficients[1] != 0)
        row_coef = torch.stack([sum_g, sum_h, coef, coef, ce, inv_s, direct] + [torch.zeros_like(inv_s)] * 3, 1)
        ops.divergence_shard_grad(s, t, row_stats, T, kind, *coefficients, row_coef.contiguous(), read, target, g, h)
    elif not direct:
        row_coef = torch.cat([torch.stack([sums[:, 1], sums[:, 2], coef, coef, ce], 1), sums[:, 3:]], 1)
        ops.divergence_shard_grad(s, t, row_stats, T, kind, *coefficients, row_coef.contiguous(), read, target, g, h)
    return st, sums


@pytest.mark.parametrize("ops_name", ["cpu", "triton-interpreter", "triton-cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["forward_kl direct", "forward_kl", "jsd", "reverse_kl", "tvd", "jeffreys",
                                  "triangular", "entropy_gated_kl", "ab_divergence", "renyi"])
def test_shard_kernels_low_precision_logits(ops_name, dtype, kind):
    """bf16/fp16 logits on the shard kernels: read as they are, math in float32, so the same statistics and
    row sums as the float32 kernels on the same values, bit for bit; the gradients into float32 buffers
    bit for bit too, into buffers of the logits' dtype the float32 gradients rounded once (G, H recomputed by
    the grad pass, never kept in bf16; the CE's one-hot at row_target put in before the rounding). Rows
    wider than one Triton block, an unread row (its gradient rows 0), -inf columns, a row with ce 0."""
    ops, dev = _shard_ops(ops_name)
    n, v, T = 5, 4096 + 37, 2.0
    g = torch.Generator().manual_seed(6)
    s = (torch.randn(n, v, generator=g) * 3).to(dtype).to(dev)
    t = (torch.randn(n, v, generator=g) * 3).to(dtype).to(dev)
    s[1, 9] = t[1, 9] = s[3, 5] = float("-inf")  # (row 3: forward KL's loss inf, its teacher gradient NaN)
    s[2] = float("nan")  # unread
    read = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], device=dev)
    coef = torch.tensor([0.5, 1.0, 0.0, 2.0, 0.25], device=dev)
    ce = torch.tensor([0.3, 0.0, 0.0, 1.0, 0.7], device=dev)
    target = torch.tensor([4100, 3, 0, -1, 0], device=dev)  # -1: the target is on another rank
    name, direct = kind.split(" ")[0], kind.endswith("direct")
    code, *coefficients = divergence_op_args(name)
    grad_t = not direct

    def run(s_in, t_in, buf_dtype):
        gs = torch.full((n, v), 7.0, dtype=buf_dtype, device=dev)  # (unread rows must come back 0)
        gt = torch.full((n, v), 7.0, dtype=buf_dtype, device=dev) if grad_t else torch.empty(0, device=dev)
        st, sums = _shard_passes(ops, s_in, t_in, T, code, coefficients, read, coef, ce, target, gs, gt, direct)
        return st, sums, gs, gt

    def same(x, y):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)

    def rounded(x, y32):  # x: y32 rounded once to x's dtype
        if ops_name == "triton-interpreter" and x.dtype == torch.bfloat16:
            # the interpreter truncates float32 -> bf16 (a GPU rounds to nearest): within one ulp
            torch.testing.assert_close(x.float(), y32, rtol=2.0 ** -7, atol=0, equal_nan=True)
        else:
            same(x, y32.to(x.dtype))

    st32, sums32, gs32, gt32 = run(s.float(), t.float(), torch.float32)
    for buf_dtype in (torch.float32, dtype):
        st, sums, gs, gt = run(s, t, buf_dtype)
        same(st, st32)
        same(sums, sums32)
        assert gs.dtype == buf_dtype
        rounded(gs, gs32)
        if grad_t:
            rounded(gt, gt32)
    assert torch.all(gs32[2] == 0) and torch.isfinite(gs32[[0, 1, 4]]).all()
    assert gs32[0, 4100] < 0 and gs32[4, 0] < 0  # the one-hot is in: -ce (1 - q1) + the divergence's part


@pytest.mark.parametrize("ops_name", ["cpu", "triton-interpreter"])
def test_shard_kernels_refuse_other_dtypes(ops_name):
    """Logits other than float32/bf16/fp16, and gradient buffers other than float32 or their input's dtype,
    raise an error that names the argument."""
    ops, _ = _shard_ops(ops_name)
    s = torch.randn(3, 40)
    read = torch.ones(3)
    with pytest.raises((ValueError, RuntimeError), match="student"):
        ops.divergence_shard_stats(s.double(), s, 1.0, False, read)
    st = torch.zeros(3, 5)
    kl, none = R.divergence_coefficients("forward_kl"), torch.empty(0)
    with pytest.raises((ValueError, RuntimeError), match="g must be"):
        ops.divergence_shard_terms(s.bfloat16(), s, st, 1.0, 0, *kl, read, none, none.long(),
                                   torch.empty(3, 40, dtype=torch.float16), none)
    with pytest.raises((ValueError, RuntimeError), match="row_target"):
        ops.divergence_shard_grad(s, s, st, 1.0, 0, *kl, torch.zeros(3, 10), read, torch.zeros(3), torch.empty(3, 40),
                                  none)
