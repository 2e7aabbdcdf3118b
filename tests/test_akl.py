"""``fastkd.akl_loss`` (adaptive KL, Wu et al. 2025) and its row op ``akl_fwd`` on every backend.

The oracle is ``fastkd.reference.akl_loss`` in float64 on the same (rounded) values (its head by a real sort and
cumulative sum), its gradients from autograd at fixed ``(h, l)``; the official ``get_ratio`` + ``AKL`` written out
below is a second oracle where the two definitions agree (no ties, T = 1). Values by allclose, gradients by the
relative norm ``||g - r|| / ||r||``.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.core.divergence import KIND_CODES
from fastkd.core.rows import row_weights
from fastkd.dispatch.backend import unavailable_reason
from fastkd.dispatch import ops as _ops
from fastkd.reference import divergence as R
from test_no_host_sync import gpu_path

FIXTURES = (gpu_path,)  # test_no_host_sync's: the path GPU tensors take, on CPU tensors, every host read raising

F64 = torch.float64
BACKENDS = ("reference", "cpu", "triton", "cuda")
# dtype -> (loss rtol, gradient relative-norm bound)
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}
AKL = KIND_CODES["akl"]


def device_of(backend):
    return torch.device("cuda") if backend == "cuda" else torch.device("cpu")


def needs(backend):
    why = unavailable_reason(backend, "akl", device_of(backend))
    if why is not None:
        pytest.skip(why)


def rel_norm(g, r):
    g, r = g.double().cpu(), r.double().cpu()
    return ((g - r).norm() / r.norm().clamp_min(1e-300)).item()


def logits(shape, scale=3.0, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def check(backend, s, t, *, dtype=torch.float32, grad_teacher=True, loss_atol=1e-6, **kw):
    """akl_loss on ``backend`` against the float64 reference on the same rounded values: loss, soft, hard, both
    gradients. ``s``, ``t`` are float32 CPU tensors (views are kept: layouts are part of the case)."""
    needs(backend)
    rtol, gtol = TOL[dtype]
    dev = device_of(backend)
    s_d = s.to(dtype).to(dev).detach().requires_grad_(True) if s.is_leaf else s.to(dev)
    t_d = t.to(dtype).to(dev).detach().requires_grad_(grad_teacher) if t.is_leaf else t.to(dev)
    kw_dev = {k: (x.to(dev) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    out = fastkd.akl_loss(s_d, t_d, return_parts=True, backend=backend, **kw_dev)
    (out.loss.sum()).backward()
    s64 = s_d.detach().cpu().to(F64).requires_grad_(True)
    t64 = t_d.detach().cpu().to(F64).requires_grad_(grad_teacher)
    ref = R.akl_loss(s64, t64, return_parts=True, **kw)
    ref.loss.sum().backward()
    for got, want, what in ((out.loss, ref.loss, "loss"), (out.soft, ref.soft, "soft"), (out.hard, ref.hard, "hard")):
        torch.testing.assert_close(got.detach().double().cpu(), want.detach().double(), rtol=rtol, atol=loss_atol,
                                   msg=lambda m: f"{backend} {what}: {m}")
    grads = [(s_d, s64, "student")] + ([(t_d, t64, "teacher")] if grad_teacher else [])
    for x, x64, what in grads:
        leaf = x if x.is_leaf else None
        if leaf is None:
            continue
        assert leaf.grad.dtype == leaf.dtype and leaf.grad.shape == leaf.shape
        e = rel_norm(leaf.grad, x64.grad)
        assert e < gtol, f"{backend}: {what} gradient relative-norm error {e:.3g}"
    return out


# ----------------------------------------------------------------------------
# the case matrix, every backend
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [1, 7, 2049, 5000])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_widths_ignore_weights_ce(backend, width, T):
    """Rows of one class, a few, one block and a ragged tail, several blocks; ignored rows, sample weights (one
    0), the cross-entropy at T = 1 in the same pass."""
    s, t = logits((6, width), seed=1), logits((6, width), seed=2)
    target = torch.tensor([0, -100, width - 1, 0, width // 2, -100])
    weight = torch.tensor([1.0, 3.0, 0.5, 2.0, 0.0, 1.5])
    check(backend, s, t, temperature=T, target=target, sample_weight=weight, ce_weight=0.3, mu=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mu", [0.05, 0.3, 0.9, 0.999])
def test_mu(backend, mu):
    s, t = logits((5, 2049), seed=3), logits((5, 2049), scale=2.0, seed=4)
    check(backend, s, t, mu=mu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend):
    s, t = logits((4, 2049), seed=5), logits((4, 2049), seed=6)
    target = torch.tensor([1, 2, -100, 2048])
    check(backend, s, t, dtype=torch.bfloat16, target=target, ce_weight=0.2, mu=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions(backend, reduction):
    s, t = logits((5, 300), seed=7), logits((5, 300), seed=8)
    target = torch.tensor([3, -100, 0, 299, 7])
    check(backend, s, t, reduction=reduction, target=target, ce_weight=0.3, temperature=2.0)
    check(backend, s, t, reduction=reduction)  # no target: hard = 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_hf_shift(backend):
    """A teacher cut from a wider tensor (row stride != V) and HF's shifted logits[:, :-1] of [B, S, V]."""
    needs(backend)
    wide = logits((6, 2100), seed=9).requires_grad_(True)
    s = logits((6, 2049), seed=10)
    check(backend, s, wide[:, :2049], grad_teacher=False, mu=0.5)
    full_s = logits((2, 5, 700), seed=11).requires_grad_(True)
    full_t = logits((2, 5, 700), seed=12)
    labels = torch.tensor([[1, 2, 3, -100, 5], [6, 7, 8, 9, 10]])
    dev = device_of(backend)
    fs, ft = full_s.detach().to(dev).requires_grad_(True), full_t.to(dev)
    loss = fastkd.akl_loss(fs[:, :-1], ft[:, :-1], target=labels[:, 1:].to(dev), ce_weight=0.5, mu=0.4,
                           backend=backend)
    loss.backward()
    s64 = full_s.detach().to(F64).requires_grad_(True)
    ref = R.akl_loss(s64[:, :-1], full_t.to(F64)[:, :-1], target=labels[:, 1:], ce_weight=0.5, mu=0.4)
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=2e-5, atol=1e-6)
    assert rel_norm(fs.grad, s64.grad) < 1e-5
    assert (fs.grad[:, -1] == 0).all()


# ----------------------------------------------------------------------------
# the head: ties, mu = 1, tiny mu, one-hot and masked teachers
# ----------------------------------------------------------------------------

def tie_rows(width=2049):
    """Rows whose head boundary falls inside a tie group, and rows of several equal maxima."""
    t = logits((4, width), scale=0.5, seed=13) - 8.0
    lp = torch.tensor([math.log(0.4), math.log(0.2), math.log(0.2)])
    t[0, [5, 900, 2048]] = lp  # 0.4, then two tied at 0.2: at mu = 0.5 the tie (M = 0.8 + rest) is out
    t[1, [0, 1, 2047]] = 3.0  # three equal maxima: all three in, whatever mu
    t[2, :] = 1.0  # every class tied: the maxima, so everything is head (l = 0)
    t[3, [10, 11, 12, 13]] = torch.tensor([2.0, 1.0, 1.0, 1.0])  # a tie straddling mu after the maximum
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mu", [0.5, 0.7])
def test_ties(backend, mu):
    t = tie_rows()
    s = logits(t.shape, seed=14)
    check(backend, s, t, mu=mu)


def test_tie_groups_are_in_or_out_together():
    # p = (0.4, 0.2, 0.2, 0.2) over four classes (all mass): the official sort would put one of the 0.2s in the head
    # at mu = 0.7 (cumsum 0.4, 0.6); fastkd keeps the tie together and out (M(0.2) = 1.0 > 0.7)
    lp = torch.log(torch.tensor([[0.4, 0.2, 0.2, 0.2]], dtype=F64))
    assert R.akl_head(lp, 0.7).tolist() == [[True, False, False, False]]
    assert R.akl_head(lp, 1.0).all()
    lp2 = torch.log(torch.tensor([[0.3, 0.3, 0.2, 0.2]], dtype=F64))
    assert R.akl_head(lp2, 0.1).tolist() == [[True, True, False, False]]  # tied maxima: always in
    assert R.akl_head(lp2, 0.65).tolist() == [[True, True, False, False]]
    assert R.akl_head(lp2, 0.999).tolist() == [[True, True, False, False]]  # M(0.2) = 1 > 0.999


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_mu_just_below_one_still_has_a_tail(backend):
    """mu = 1 - 1e-9 rounds to 1 as a float32: the kernels still select (a tail of ~2e-8 of the teacher's mass
    where the uniform student puts 90%): h = l = 0.5 as in float64, not h = 1. (The reference in float32
    cannot: its float32 cumulative sum does not resolve the tail.)"""
    needs(backend)
    t = torch.zeros(2, 10)
    t[:, 0] = 20.0
    check(backend, torch.zeros(2, 10), t, mu=1 - 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mu_one_is_weighted_forward_kl(backend):
    """mu = 1: every class is head, l = 0, h = 1 (the gaps are not ~0): the loss is forward KL."""
    needs(backend)
    s, t = logits((4, 2049), seed=15), logits((4, 2049), seed=16)
    check(backend, s, t, mu=1.0)
    dev = device_of(backend)
    got = fastkd.akl_loss(s.to(dev), t.to(dev), mu=1.0, backend=backend)
    want = R.forward_kl_loss(s.double(), t.double())
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_mu_takes_only_the_maximum(backend):
    needs(backend)
    s, t = logits((4, 777), seed=17), logits((4, 777), seed=18)
    check(backend, s, t, mu=1e-6)
    lp, lq = F.log_softmax(t.double(), 1), F.log_softmax(s.double(), 1)
    head = torch.zeros_like(lp, dtype=torch.bool).scatter_(1, t.argmax(1, keepdim=True), True)
    assert (R.akl_head(lp, 1e-6) == head).all()
    gap = (lp.exp() - lq.exp()).abs()
    h = (gap * head).sum(1) / gap.sum(1)
    want = (h * R.kl_terms(lp, lq).sum(1) + (1 - h) * R.kl_terms(lq, lp).sum(1)).mean()
    got = fastkd.akl_loss(s.to(device_of(backend)), t.to(device_of(backend)), mu=1e-6, backend=backend)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_and_masked_teachers(backend):
    """A nearly one-hot teacher (finite), and -inf teacher logits: where q > 0 = p, KL(q || p) is inf, exactly (the
    reference's value), and mu = 1 drops it (l = 0: forward KL, whose p = 0 terms add 0)."""
    needs(backend)
    s = logits((3, 2049), seed=19)
    t = torch.zeros(3, 2049)
    t[:, 7] = 40.0  # p ~ one-hot
    check(backend, s, t, mu=0.5)
    masked = logits((3, 2049), seed=20)
    masked[:, 1000:] = -math.inf
    check(backend, s, masked, mu=1.0, grad_teacher=False)
    both = s.clone()
    both[:, 1000:] = -math.inf  # the student masks the same classes: every term finite
    check(backend, both, masked, mu=0.5, grad_teacher=False)
    dev = device_of(backend)
    got = fastkd.akl_loss(s.to(dev), masked.to(dev), mu=0.5, backend=backend, reduction="none")
    want = R.akl_loss(s.double(), masked.double(), mu=0.5, reduction="none")
    assert torch.isinf(want).all() and (got.cpu() == want.float()).all()


# ----------------------------------------------------------------------------
# the official formula (distillm-style get_ratio + AKL), T = 1, no ties
# ----------------------------------------------------------------------------

def official_get_ratio(teacher_logits, logits, mu=0.5):
    teacher_probs = F.softmax(teacher_logits, dim=-1)
    student_probs = F.softmax(logits, dim=-1).detach()
    re_teacher_probs, idx = teacher_probs.sort(dim=-1, descending=True)
    re_student_probs = student_probs.gather(dim=-1, index=idx)
    errors = torch.abs(re_teacher_probs - re_student_probs)
    cum_sum = torch.cumsum(re_teacher_probs, dim=-1)
    mask = cum_sum > mu
    mask[..., 0] = False
    s1 = torch.masked_fill(errors, mask, 0.0).sum(dim=-1)
    s2 = torch.masked_fill(errors, ~mask, 0.0).sum(dim=-1)
    total = (s1 + s2).clamp_min(1e-8)
    return s1 / total, s2 / total


def official_akl(teacher_logits, logits, labels, mu=0.5):
    h, l = official_get_ratio(teacher_logits, logits, mu)
    lp, lq = F.log_softmax(teacher_logits, -1), F.log_softmax(logits, -1)
    fkl = (lp.exp() * (lp - lq)).sum(-1)
    rkl = (lq.exp() * (lq - lp)).sum(-1)
    mask = (labels != -100).to(lp.dtype)
    return ((h * fkl + l * rkl) * mask).sum() / mask.sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mu", [0.5, 0.8])
def test_official_formula(backend, mu):
    needs(backend)
    s, t = logits((2, 6, 1500), seed=21), logits((2, 6, 1500), seed=22)
    labels = torch.randint(0, 1500, (2, 6), generator=torch.Generator().manual_seed(23))
    labels[0, :2] = -100
    s64 = s.double().requires_grad_(True)
    want = official_akl(t.double(), s64, labels, mu)
    want.backward()
    dev = device_of(backend)
    sd = s.to(dev).requires_grad_(True)
    got = fastkd.akl_loss(sd, t.to(dev), target=labels.to(dev), mu=mu, backend=backend)
    got.backward()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=2e-5, atol=1e-6)
    assert rel_norm(sd.grad, s64.grad) < 1e-5


# ----------------------------------------------------------------------------
# the op: opcheck, torch.compile, grad mode; the fused head; bad input
# ----------------------------------------------------------------------------

def op_args(grad_s=True, grad_t=True, reduce=True, target=True):
    g = torch.Generator().manual_seed(24)
    s = torch.randn(4, 9, generator=g, requires_grad=True)
    t = torch.randn(4, 9, generator=g, requires_grad=True)
    y = torch.tensor([1, 8, 0, 3]) if target else torch.empty(0, dtype=torch.int64)
    w = torch.tensor([0.25, 0.0, 0.5, 0.25])
    return (s, t, torch.empty(0, dtype=torch.int64), y, w, 1.5, AKL, 0.4, 0.0, 0.0, 0.0, 1.0,
            0.3 if target else 0.0, 0, reduce, grad_s, grad_t)


@pytest.mark.skipif(not _ops.has_kernel("akl_fwd", "CPU"), reason="compiled CPU akl_fwd not built")
@pytest.mark.parametrize("case", [dict(), dict(reduce=False, grad_t=False), dict(target=False, grad_s=False)])
def test_opcheck(case):
    torch.library.opcheck(torch.ops.fastkd.akl_fwd.default, op_args(**case))


@pytest.mark.skipif(not _ops.has_kernel("akl_fwd", "CPU"), reason="compiled CPU akl_fwd not built")
def test_torch_compile_fullgraph():
    def step(s, t, y):
        return fastkd.akl_loss(s, t, target=y, ce_weight=0.2, mu=0.3, backend="cpu")

    s, t = logits((6, 300), seed=25), logits((6, 300), seed=26)
    y = torch.randint(0, 300, (6,), generator=torch.Generator().manual_seed(27))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        s_ = s.clone().requires_grad_()
        out = fn(s_, t, y)
        out.backward()
        results.append((out, s_.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_no_grad_does_no_backward_work(monkeypatch):
    """Under no_grad the op is asked for no gradient (a requires-grad input does not change that)."""
    needs("cpu")
    from fastkd.losses import divergence as D

    calls = []
    real = D.implementation

    class Spy:
        def __init__(self, impl):
            self.impl = impl

        def akl_fwd(self, *args):
            calls.append(args[-2:])
            return self.impl.akl_fwd(*args)

    monkeypatch.setattr(D, "implementation", lambda name: Spy(real(name)))
    s = logits((3, 50), seed=28).requires_grad_(True)
    t = logits((3, 50), seed=29)
    with torch.no_grad():
        loss = fastkd.akl_loss(s, t, backend="cpu")
    assert loss.grad_fn is None and calls == [(False, False)]
    fastkd.akl_loss(s, t, backend="cpu")
    assert calls[-1] == (True, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_head_equals_the_unfused_composition(backend):
    needs(backend)
    g = torch.Generator().manual_seed(30)
    dev = device_of(backend)
    h, w = torch.randn(21, 16, generator=g), torch.randn(2049, 16, generator=g) * 0.5
    th, tw = torch.randn(21, 16, generator=g), torch.randn(2049, 16, generator=g) * 0.5
    y = torch.randint(0, 2049, (21,), generator=g)
    y[::4] = -100
    hd, wd = h.to(dev, copy=True).requires_grad_(True), w.to(dev, copy=True).requires_grad_(True)
    loss = fastkd.fused_linear_kd_loss(hd, wd, (th.to(dev), tw.to(dev)), y.to(dev), divergence="akl", mu=0.4,
                                       temperature=2.0, ce_weight=0.3, chunk_size=8, backend=backend)
    loss.backward()
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = R.akl_loss(h64 @ w64.T, th.double() @ tw.double().T, target=y, mu=0.4, temperature=2.0, ce_weight=0.3)
    ref.backward()
    torch.testing.assert_close(loss.double().cpu(), ref.detach(), rtol=2e-5, atol=1e-6)
    assert rel_norm(hd.grad, h64.grad) < 1e-5 and rel_norm(wd.grad, w64.grad) < 1e-5


def test_module():
    m = fastkd.nn.AKLLoss(mu=0.3, temperature=2.0)
    s, t = logits((4, 100), seed=31), logits((4, 100), seed=32)
    torch.testing.assert_close(m(s, t), fastkd.akl_loss(s, t, mu=0.3, temperature=2.0))
    with pytest.raises(ValueError, match="mu"):
        fastkd.nn.AKLLoss(mu=0.0)


@pytest.mark.parametrize("mu", [0.0, -0.5, 1.5, math.nan, math.inf])
def test_bad_mu(mu):
    s, t = logits((2, 10)), logits((2, 10), seed=1)
    with pytest.raises(ValueError, match="mu"):
        fastkd.akl_loss(s, t, mu=mu)
    with pytest.raises(ValueError, match="mu"):
        R.akl_loss(s, t, mu=mu)
    with pytest.raises(ValueError, match="mu"):
        fastkd.fused_linear_kd_loss(torch.randn(2, 4), torch.randn(10, 4), (torch.randn(2, 4), torch.randn(10, 4)),
                                    divergence="akl", mu=mu)


def test_bad_input():
    s, t = logits((2, 10)), logits((2, 10), seed=1)
    with pytest.raises(TypeError, match="mu"):
        fastkd.akl_loss(s, t, mu="0.5")
    topk = fastkd.TopKTeacher(torch.tensor([[0, 1], [2, 3]]), torch.log(torch.full((2, 2), 0.3)))
    vocab_map = fastkd.VocabMap(torch.arange(10), 10)
    with pytest.raises(TypeError, match="dense teacher logits or a TopKTeacher"):  # (tests/test_akl_topk.py)
        fastkd.akl_loss(s, fastkd.MappedTeacher(t, vocab_map))
    with pytest.raises(TypeError, match="dense teacher logits"):
        fastkd.fused_linear_kd_loss(torch.randn(2, 4), torch.randn(10, 4), topk, divergence="akl")
    with pytest.raises(RuntimeError, match="not initialised"):  # dense logits: the sharded loss (its own tests)
        fastkd.akl_loss(s, t, process_group=object())
    nan = s.clone()
    nan[0, 3] = math.nan  # NaN logits propagate (a NaN loss), as every divergence
    assert torch.isnan(fastkd.akl_loss(nan, t, reduction="none"))[0] and not torch.isnan(
        fastkd.akl_loss(nan, t, reduction="none"))[1]
    if _ops.has_kernel("akl_fwd", "CPU"):
        args = list(op_args())
        for i, bad, what in ((6, 2, "kind"), (7, 0.0, "mu"), (7, 1.5, "mu"), (13, 1, "dense teacher")):
            a = list(args)
            a[i] = bad
            with pytest.raises(ValueError, match=what):
                torch.ops.fastkd.akl_fwd(*a)


def test_row_weights_reach_the_op():
    # row_weights is the contract between the functional and the op: the direct op call equals the functional
    needs("cpu")
    s, t = logits((5, 64), seed=33), logits((5, 64), seed=34)
    y = torch.tensor([1, -100, 3, 4, 5])
    rw = row_weights(s, y, -100, None, "batchmean")
    e = torch.empty(0, dtype=torch.int64)
    loss = torch.ops.fastkd.akl_fwd(s, t, e, e, rw, 1.0, AKL, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0, 0, True, False, False)[0]
    torch.testing.assert_close(loss, fastkd.akl_loss(s, t, target=y, backend="cpu"))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_no_host_read_on_the_gpu_path(backend, gpu_path):
    """The Python layer of akl_loss and of the fused head reads no tensor value on the path GPU tensors take."""
    needs(backend)
    dev = device_of(backend)
    s = logits((6, 300), seed=36).to(dev).requires_grad_(True)
    t = logits((6, 300), seed=37).to(dev)
    target = torch.tensor([1, -100, 3, 4, 5, 6], device=dev)
    weight = torch.rand(6, generator=torch.Generator().manual_seed(38)).to(dev)
    (0.5 * fastkd.akl_loss(s, t, target=target, sample_weight=weight, ce_weight=0.2, mu=0.4, backend=backend)).backward()
    h, w = logits((6, 16), seed=39).to(dev).requires_grad_(True), logits((300, 16), seed=40).to(dev)
    fastkd.fused_linear_kd_loss(h, w, (logits((6, 16), seed=41).to(dev), w), target, divergence="akl",
                                chunk_size=4, backend=backend).backward()
    assert s.grad is not None and h.grad is not None and gpu_path == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_vocab(backend):
    """A teacher wider than the student: "truncate" is AKL against the first V columns; "mask" pads the student
    with -inf, so a row whose teacher has mass past V is infinite (KL(p || q) with q = 0 < p), as the reference."""
    needs(backend)
    dev = device_of(backend)
    s, wide = logits((4, 2049), seed=42).to(dev), logits((4, 2060), seed=43).to(dev)
    got = fastkd.akl_loss(s, wide, mu=0.4, backend=backend)
    torch.testing.assert_close(got, fastkd.akl_loss(s, wide[:, :2049].contiguous(), mu=0.4, backend=backend))
    masked = fastkd.akl_loss(s, wide, mu=0.4, teacher_vocab="mask", backend=backend, reduction="none")
    want = R.akl_loss(F.pad(s.double().cpu(), (0, 11), value=-math.inf), wide.double().cpu(), mu=0.4,
                      reduction="none")
    assert torch.equal(torch.isinf(masked.cpu()), torch.isinf(want))
