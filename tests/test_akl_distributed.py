"""akl_loss(process_group=) on gloo (CPU, 127.0.0.1): vocabulary shards against the single-process float64
reference on the concatenated vocabulary (``fastkd.akl_loss(backend="reference")``): the head itself (bit for
bit against ``reference.akl.akl_head``), the loss and parts, and each rank's slice of both gradients (relative
norm < 1e-5 float32). Ties in the teacher across shards (the row maximum included), -inf teacher classes, mu in
{0.3, 0.9, 1.0}, CE with ignored and skipped rows and sample weights, every reduction, several row chunks, the
fused head, the collectives' count, and 2 x 2 subgroups. One process group per test runs the whole table.
"""
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import fastkd
from fastkd import distributed as D
from fastkd.distributed.akl import head_mask, radix_keys
from fastkd.reference.akl import akl_head
from processes import free_port, run_processes

TIMEOUT_S = 300
GROUP = None  # the vocabulary-parallel group of the checks (None: the whole world)
TOL = {torch.float32: (2e-5, 1e-5), torch.float64: (1e-10, 1e-10), torch.bfloat16: (1e-2, 2e-2)}


def _group():
    return dist.group.WORLD if GROUP is None else GROUP


def _entry(rank, world, port, check_name):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    failures, ran = [], []
    try:
        globals()[check_name](rank, world, failures, ran)
    finally:
        dist.destroy_process_group()
    if len(ran) < 8:
        failures.append(f"only {len(ran)} checks ran: {ran}")
    if failures:
        raise AssertionError(f"rank {rank}: {len(failures)} failure(s):\n" + "\n".join(failures))


def _record(failures, ran, name, fn):
    ran.append(name)
    try:
        fn()
    except Exception:  # noqa: BLE001  (every failure is reported, the worker goes on)
        failures.append(f"[{name}] " + traceback.format_exc(limit=4))


def _rel(g, r):
    g, r = g.detach().double(), r.detach().double()
    den = r.norm().item()
    return (g - r).norm().item() / den if den > 0 else (g - r).norm().item()


def _piece(x, rank, world):
    """This rank's contiguous vocabulary slice (a non-contiguous view; a leaf)."""
    width = x.shape[-1] // world
    return x[..., rank * width:(rank + 1) * width].detach()


def _teacher(n, width, world, seed):
    """Teacher logits with ties across the shards: each row's maximum copied into every shard, a group of equal
    logits spread over the shards, pairs equal across shards, and a -inf class."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, width * world, generator=g) * 2.0
    vocab = width * world
    for r in range(n):
        top = int(t[r].argmax())
        for k in range(world):  # the maximum tied in every shard
            t[r, (top + k * width) % vocab] = t[r, top]
        level = t[r].quantile(0.8)  # a tie group in the upper part of the row, in every shard
        for k in range(world):
            t[r, k * width + 3] = t[r, k * width + 4] = level
        t[r, width - 1] = t[r, vocab - 2]  # a pair across shards 0 and the last
    # row 0: a tie group over both shards at the boundary of mu = 0.3 at T = 2 (the maximum holds about 0.09,
    # the group takes the mass past 0.3 to about 0.37: all four are tail, none split off into the head)
    t[0] = torch.randn(width * world, generator=g) * 0.3
    t[0, 10] = 4.5
    for k in range(world):
        t[0, k * width + 3] = t[0, k * width + 4] = 4.0
    t[1, 5] = float("-inf")
    return t


def _compare(failures, ran, name, rank, world, s, t, dtype, kw, grad_t=True, fn=None):
    """``akl_loss`` on the shards vs the float64 reference on the whole rows: values, parts, gradient slices."""
    def run():
        rtol, gtol = TOL[dtype]
        s_q, t_q = s.to(dtype), t.to(dtype)
        s64, t64 = s_q.double().requires_grad_(), t_q.double().requires_grad_(grad_t)
        out_ref = fastkd.akl_loss(s64, t64, backend="reference", **kw)
        loss_ref = out_ref.loss if kw.get("return_parts") else out_ref
        upstream = torch.rand(loss_ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5
        grads = torch.autograd.grad((loss_ref * upstream).sum(), [s64] + ([t64] if grad_t else []))
        s_loc = _piece(s_q, rank, world).requires_grad_()
        t_loc = _piece(t_q, rank, world).requires_grad_(grad_t)
        call = fn or (lambda a, b: fastkd.akl_loss(a, b, process_group=_group(), **kw))
        out = call(s_loc, t_loc)
        loss = out.loss if kw.get("return_parts") else out
        (loss * upstream.to(loss.dtype)).sum().backward()
        pairs = [(loss, loss_ref)] + ([(out.soft, out_ref.soft), (out.hard, out_ref.hard)]
                                      if kw.get("return_parts") else [])
        for got, want in pairs:
            assert got.shape == want.shape, (got.shape, want.shape)
            torch.testing.assert_close(got.detach().double(), want.detach(), rtol=rtol, atol=rtol * 0.1)
        want = [_piece(grads[0], rank, world)] + ([_piece(grads[1], rank, world)] if grad_t else [])
        for what, got, ref in zip(("student", "teacher"), (s_loc.grad, t_loc.grad), want):
            assert got.dtype == dtype and got.shape == ref.shape, (what, got.dtype, got.shape)
            err = _rel(got, ref)
            assert err < gtol, f"{what} gradient relative error {err:.2e} >= {gtol}"

    _record(failures, ran, f"{name} {dtype}", run)


def _head_check(failures, ran, rank, world, t, mu, T, dtype, group):
    """``head_mask`` on the shard is the reference's sorted head, class for class."""
    def run():
        t_q = t.to(dtype)
        lp = torch.log_softmax(t_q.double() / T, dim=1)
        want = _piece(akl_head(lp, mu), rank, world)
        t_loc = _piece(t_q, rank, world).to(torch.float64 if dtype == torch.float64 else torch.float32)
        p_loc = _piece(lp, rank, world).exp().to(t_loc.dtype)
        got = head_mask(t_loc, p_loc, t_q.to(t_loc.dtype).amax(dim=1), mu, group)
        assert torch.equal(got, want), f"head differs in {(got != want).sum().item()} classes"

    _record(failures, ran, f"head mu={mu} T={T} {dtype}", run)


def _head_ends_early_check(failures, ran, rank, world, t, group):
    """Masses whose row sum is off 1 (as float32 rounding makes it, by up to 1e-7): the head is decided on the
    masses relative to the row's sum, so a row scaled by 0.5 selects the same head, and the least probable class
    is never head for mu < 1 (comparing with mu itself, a row summing below mu made every class head)."""
    def run():
        p = torch.softmax(t / 2.0, dim=1)
        t_loc, p_loc = _piece(t, rank, world), _piece(p, rank, world)
        for mu in (0.4, 0.9):
            want = _piece(akl_head(torch.log_softmax(t.double() / 2.0, dim=1), mu), rank, world)
            assert torch.equal(head_mask(t_loc, p_loc, t.amax(dim=1), mu, group), want)
            assert torch.equal(head_mask(t_loc, p_loc * 0.5, t.amax(dim=1), mu, group), want)
        # the row's least probable class: tail at mu = 1 - 2^-26 even where the row sums to 1 - 1e-7 in float32
        low = _piece(t == t.amin(dim=1, keepdim=True), rank, world)
        got = head_mask(t_loc, p_loc * (1 - 1e-7), t.amax(dim=1), 1.0 - 2.0 ** -26, group)
        assert not bool((got & low).any())

    _record(failures, ran, "head: masses relative to the row's sum", run)


def _checks_world2(rank, world, failures, ran):
    group = _group()
    n, width = 13, 37
    vocab = width * world
    g = torch.Generator().manual_seed(1)
    s = torch.randn(n, vocab, generator=g) * 2.0
    t = _teacher(n, width, world, 2)
    target = torch.randint(0, vocab, (n,), generator=g)
    target[[2, 7]] = -100  # ignored rows: their logits are never read
    s[1, 5] = float("-inf")  # masked on both sides (the teacher's -inf class: _teacher)
    s[2], t[7] = float("nan"), float("inf")
    weight = torch.rand(n, generator=g) + 0.5
    weight[4] = 0.0  # a skipped row
    s[4] = float("nan")
    clean = [r for r in range(n) if r not in (2, 4, 7)]

    def kw(mu, reduction, **more):
        return dict(mu=mu, temperature=2.0, reduction=reduction, **more)

    for mu in (0.3, 0.9, 1.0):
        for dtype in (torch.float32, torch.float64):
            _head_check(failures, ran, rank, world, t[clean], mu, 2.0, dtype, group)
    _head_ends_early_check(failures, ran, rank, world, t[clean], group)
    # mu within 3e-8 of 1 rounds to 1.0 in float32: it must still leave a tail (the kernels' clamp below 1)
    # (a teacher with one class far below the others, so that no class's mass-above lies near mu: without the
    # clamp every class was head and the loss 7x too low)
    t_far = torch.zeros_like(t[clean])
    t_far[:, 3] = -30.0
    s_far = torch.randn(t_far.shape, generator=torch.Generator().manual_seed(31))  # (s has -inf classes: KL = inf)
    _compare(failures, ran, "mu=1-2^-26", rank, world, s_far, t_far, torch.float32, kw(1.0 - 2.0 ** -26, "sum"))
    for mu, red in ((0.3, "batchmean"), (0.9, "sum"), (1.0, "none"), (0.9, "mean")):
        for dtype in (torch.float32, torch.float64):
            _compare(failures, ran, f"mu={mu} {red} ce", rank, world, s, t, dtype,
                     kw(mu, red, target=target, sample_weight=weight, ce_weight=0.3, return_parts=True))
    _compare(failures, ran, "mu=0.5 student grad only", rank, world, s[clean], t[clean], torch.float32,
             kw(0.5, "batchmean"), grad_t=False)
    _compare(failures, ran, "mu=0.6 bf16", rank, world, s[clean], t[clean], torch.bfloat16, kw(0.6, "sum"))
    # 3-D rows from both leading dims, non-contiguous (transposed)
    s3, t3 = s[clean[:8]].reshape(2, 4, vocab), t[clean[:8]].reshape(2, 4, vocab)
    _compare(failures, ran, "3-D none", rank, world, s3.transpose(0, 1), t3.transpose(0, 1), torch.float32,
             dict(mu=0.4, reduction="none"))
    _compare(failures, ran, "no rows", rank, world, s[:0], t[:0], torch.float32, dict(mu=0.5, reduction="sum"))
    _compare(failures, ran, "AKLLoss module", rank, world, s[clean], t[clean], torch.float32,
             dict(mu=0.8, temperature=1.5, reduction="batchmean"),
             fn=fastkd.nn.AKLLoss(mu=0.8, temperature=1.5, process_group=group))
    # the functional of fastkd.distributed directly, with several row chunks (every rank the same split)
    D.CHUNK_MIN_ROWS = 4
    try:
        tgt = target[clean]
        _compare(failures, ran, "D.akl_loss chunks", rank, world, s[clean], t[clean], torch.float32,
                 kw(0.7, "batchmean", target=tgt, ce_weight=1.0),
                 fn=lambda a, b: D.akl_loss(a, b, process_group=group, mu=0.7, temperature=2.0, target=tgt,
                                            ce_weight=1.0))
    finally:
        D.CHUNK_MIN_ROWS = 64
    _fused_head_checks(rank, world, failures, ran)
    if GROUP is not None:
        return

    def comm():  # 1 shape check, then MAX, SUM, the head's 4 (float32) or 8 (float64) sweeps, one SUM
        for dtype, mu, calls in ((torch.float32, 0.5, 8), (torch.float64, 0.5, 12), (torch.float32, 1.0, 4)):
            with D.count_comm() as c:
                fastkd.akl_loss(_piece(s[clean], rank, world).to(dtype), _piece(t[clean], rank, world).to(dtype),
                                mu=mu, process_group=group)
            assert c.calls == calls, (dtype, mu, c.calls)

    _record(failures, ran, "collectives", comm)

    def errors():
        topk = fastkd.TopKTeacher(torch.tensor([[0, 1]] * n), torch.full((n, 2), -1.0))
        with pytest.raises(ValueError, match="process_group"):
            fastkd.akl_loss(_piece(s, rank, world), topk, process_group=group)
        with pytest.raises(ValueError, match="teacher_temperature"):
            fastkd.akl_loss(_piece(s, rank, world), _piece(t, rank, world), teacher_temperature=2.0,
                            process_group=group)
        with pytest.raises(ValueError, match="mu"):
            D.akl_loss(_piece(s, rank, world), _piece(t, rank, world), mu=0.0, process_group=group)

    _record(failures, ran, "errors", errors)


def _fused_head_checks(rank, world, failures, ran):
    """``fused_linear_kd_loss(divergence="akl", process_group=)`` vs the float64 single-process fused head: the
    student's hidden and weight slice; with ``teacher_grad=True`` and a teacher temperature, the teacher's too."""
    n, hdim, hdim_t, width = 11, 6, 5, 17
    vocab = width * world
    g = torch.Generator().manual_seed(60)
    base = [torch.randn(n, hdim, generator=g), torch.randn(vocab, hdim, generator=g) * 0.7,
            torch.randn(n, hdim_t, generator=g), torch.randn(vocab, hdim_t, generator=g) * 0.7,
            torch.randn(vocab, generator=g) * 0.3]
    target = torch.randint(0, vocab, (n,), generator=g)
    target[3] = -100
    rows = slice(rank * width, (rank + 1) * width)  # this rank's rows of the heads
    sliced = (False, True, False, True, True)  # which of base are vocabulary rows
    names = ("hidden", "weight", "teacher_hidden", "teacher_weight", "teacher_bias")

    for teacher_grad in (False, True):
        def run(teacher_grad=teacher_grad):
            kw = dict(divergence="akl", mu=0.6, temperature=1.5, ce_weight=0.4)
            if teacher_grad:
                kw.update(teacher_grad=True, teacher_temperature=1.2)
            leaves = 5 if teacher_grad else 2
            ref = [x.double().requires_grad_(i < leaves) for i, x in enumerate(base)]
            loss_ref = fastkd.fused_linear_kd_loss(ref[0], ref[1], (ref[2], ref[3]), target, teacher_bias=ref[4],
                                                   backend="reference", **kw)
            grads_ref = torch.autograd.grad(loss_ref, ref[:leaves])
            local = [(x[rows] if cut else x).clone().requires_grad_(i < leaves)
                     for i, (x, cut) in enumerate(zip(base, sliced))]
            loss = fastkd.fused_linear_kd_loss(local[0], local[1], (local[2], local[3]), target, teacher_bias=local[4],
                                               chunk_size=4, process_group=_group(), **kw)
            loss.backward()
            torch.testing.assert_close(loss.double(), loss_ref.detach(), rtol=2e-5, atol=2e-6)
            for what, x, want, cut in zip(names, local, grads_ref, sliced):
                err = _rel(x.grad, want[rows] if cut else want)
                assert err < 1e-5, f"grad {what}: relative error {err:.2e}"

        _record(failures, ran, f"fused head akl teacher_grad={teacher_grad}", run)


def _checks_world4(rank, world, failures, ran):
    global GROUP
    # tensor-parallel pairs {0, 1} and {2, 3}: the shard index is the rank in the group, not the global rank
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    GROUP = pairs[rank // 2]
    try:
        _checks_world2(dist.get_rank(GROUP), 2, failures, ran)
    finally:
        GROUP = None


pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is unavailable")


def test_radix_keys_order():
    x = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7.0, float("inf")])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        keys, bits = radix_keys(x.to(dtype))
        assert bits == (64 if dtype == torch.float64 else 32) and keys.dtype == torch.int64
        steps = keys.diff()
        assert steps[3] == 0 and bool((torch.cat([steps[:3], steps[4:]]) > 0).all())  # -0.0, 0.0: one key
        assert -(1 << (bits - 1)) <= int(keys.min()) and int(keys.max()) < 1 << (bits - 1)
    # neighbours one ulp apart: distinct keys (float64 keys are not float32's)
    y = torch.tensor([1.0, 1.0 + 2.0 ** -52], dtype=torch.float64)
    assert radix_keys(y)[0].diff() > 0 and radix_keys(y.float())[0].diff() == 0


def test_world_2():
    run_processes(_entry, (2, free_port(), "_checks_world2"), 2, TIMEOUT_S, "akl world 2")


def test_world_4_pairs():
    run_processes(_entry, (4, free_port(), "_checks_world4"), 4, TIMEOUT_S, "akl world 4 (2 x 2)")
