"""``fastkd.TeacherMixture`` of dense teacher logits as the teacher of the logit losses (every divergence and
``kd_loss``; issue 22): every backend against the mixture's float64 definition written out here (not the
library's reference), blocks of rows with a ragged last block, shifted and non-contiguous views, reductions,
CE, weights, and the training-loop conditions; ``teacher_temperature`` through the public losses (dense logits:
the row op's own argument, no blocks; per kind and op: tests/test_teacher_temperature_ops.py), with a mixture and
a mapped teacher (blocks at ``T_t``)."""
import itertools
import math

import pytest
import torch

import fastkd
from backend_cases import FUSED, skip_unless_runs
from fastkd.losses import teacher_blocks

BACKENDS = ("reference",) + FUSED
T = 2.0
WEIGHTS = [0.5, 0.3, 0.2]


def mixture_log_probs(members, weights, mode, temperature):
    """The definition in float64: arithmetic ``log sum_i w_i p_i`` (w normalised), geometric
    ``log(prod_i p_i^(w_i) / Z)``."""
    logs = [torch.log_softmax(m.double() / temperature, dim=-1) for m in members]
    if mode == "arithmetic":
        total = sum(weights)
        return torch.log(sum((w / total) * lp.exp() for w, lp in zip(weights, logs)))
    return torch.log_softmax(sum(w * lp for w, lp in zip(weights, logs)), dim=-1)


def truth(loss, s, members, weights, mode, temperature, **kw):
    """``loss`` of float64 ``s`` against the float64 mixture, on the reference backend with the mixture's
    log-probs as the teacher (times T: softmax(T log p / T) = p)."""
    lp = mixture_log_probs(members, weights, mode, temperature)
    return loss(s, lp * temperature, temperature=temperature, backend="reference", **kw)


def rel_norm(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


LOSSES = {
    "forward_kl": lambda s, t, **kw: fastkd.forward_kl_loss(s, t, **kw),
    "jsd": lambda s, t, **kw: fastkd.jsd_loss(s, t, beta=0.3, **kw),
    "tvd": lambda s, t, **kw: fastkd.tvd_loss(s, t, **kw),
    "jeffreys": lambda s, t, **kw: fastkd.jeffreys_loss(s, t, **kw),
    "kd": lambda s, t, temperature, **kw: fastkd.kd_loss(s, t, temperature, **kw),
}


def members_like(shape, n=3, seed=1, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["arithmetic", "geometric"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_mixture_matches_its_definition(backend, mode, name, monkeypatch):
    device = skip_unless_runs("forward_kl", backend) if backend != "reference" else torch.device("cpu")
    # blocks of 4 rows of 2053 classes: several blocks, the last one ragged, rows wider than a kernel block
    monkeypatch.setattr(teacher_blocks, "BLOCK_ELEMENTS", 4 * 2053)
    g = torch.Generator().manual_seed(0)
    s64 = 3 * torch.randn(3, 5, 2053, generator=g, dtype=torch.float64)
    members = members_like(s64.shape)
    target = torch.randint(0, 2053, (3, 5), generator=g)
    target[0, 1] = -100
    loss = LOSSES[name]
    dtype = torch.float64 if backend == "reference" else torch.float32
    s = s64.to(dtype).to(device).clone().requires_grad_()
    mixture = fastkd.TeacherMixture([m.to(dtype).to(device) for m in members], WEIGHTS, mode=mode)
    got = loss(s, mixture, temperature=T, target=target.to(device), ce_weight=0.25, backend=backend)
    ref_s = s64.detach().clone().requires_grad_()
    ref = truth(loss, ref_s, members, WEIGHTS, mode, T, target=target, ce_weight=0.25)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-7
    go = 0.7
    (got * go).backward()
    (ref * go).backward()
    assert rel_norm(s.grad.cpu(), ref_s.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixture_reductions_parts_weights_and_views(backend, monkeypatch):
    """reduction="none" (per-row, a random incoming gradient), return_parts, sample_weight, and a student and
    members that are HF-shifted views (logits[:, :-1]) in bfloat16, in blocks of 3 rows."""
    device = skip_unless_runs("forward_kl", backend) if backend != "reference" else torch.device("cpu")
    monkeypatch.setattr(teacher_blocks, "BLOCK_ELEMENTS", 3 * 301)
    g = torch.Generator().manual_seed(3)
    full = (3 * torch.randn(2, 8, 301, generator=g)).to(torch.bfloat16)
    members_full = [(3 * torch.randn(2, 8, 301, generator=g)).to(torch.bfloat16) for _ in range(2)]
    target = torch.randint(0, 301, (2, 7), generator=g)
    target[1, 3] = -100
    weight = torch.rand(2, 7, generator=g)
    for reduction in ("none", "sum", "mean", "batchmean"):
        base = full.clone().to(device).requires_grad_()
        s = base[:, :-1]
        mixture = fastkd.TeacherMixture([m.to(device)[:, :-1] for m in members_full], [2.0, 1.0])
        got = fastkd.jsd_loss(s, mixture, temperature=T, target=target.to(device), sample_weight=weight.to(device),
                              ce_weight=0.5, return_parts=True, reduction=reduction, backend=backend)
        ref_base = full.double().clone().requires_grad_()
        ref = truth(lambda x, t, **kw: fastkd.jsd_loss(x, t, return_parts=True, **kw), ref_base[:, :-1],
                    [m[:, :-1] for m in members_full], [2.0, 1.0], "arithmetic", T, target=target,
                    sample_weight=weight, ce_weight=0.5, reduction=reduction)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.cpu().double(), b.detach(), rtol=1e-4, atol=1e-6)
        go = torch.randn(got.loss.shape, generator=g)
        (got.loss * go.to(device)).sum().backward()
        (ref.loss * go.double()).sum().backward()
        assert base.grad.dtype == torch.bfloat16
        assert rel_norm(base.grad.cpu(), ref_base.grad) < 1e-2
        assert base.grad[:, -1].abs().max() == 0  # the shifted-out position gets no gradient


def test_blocks_cover_every_row_once():
    for lead, rows in [((7,), 3), ((2, 5), 3), ((2, 5), 10), ((3, 2, 4), 5), ((4, 1), 1), ((0,), 4), ((2, 0), 3)]:
        seen = torch.zeros(lead, dtype=torch.int64)
        for idx in teacher_blocks._blocks(lead, rows):
            seen[idx] += 1
        assert torch.equal(seen, torch.ones(lead, dtype=torch.int64)), (lead, rows)


def test_mixture_of_one_teacher_is_that_teacher():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(6, 50, generator=g, requires_grad=True)
    t = torch.randn(6, 50, generator=g)
    for mode in ("arithmetic", "geometric"):
        a = fastkd.reverse_kl_loss(s, fastkd.TeacherMixture([t], mode=mode), temperature=T)
        b = fastkd.reverse_kl_loss(s, t, temperature=T)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_members_are_constants_and_no_grad_does_no_backward_work():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 40, generator=g, requires_grad=True)
    t1, t2 = (torch.randn(4, 40, generator=g, requires_grad=True) for _ in range(2))
    with pytest.raises(ValueError, match=r"teachers\[0\] requires grad"):
        fastkd.forward_kl_loss(s, fastkd.TeacherMixture([t1, t2]), backend="cpu")
    loss = fastkd.forward_kl_loss(s, fastkd.TeacherMixture([t1.detach(), t2.detach()]), backend="cpu")
    loss.backward()
    assert s.grad is not None
    with torch.no_grad():
        loss = fastkd.forward_kl_loss(s, fastkd.TeacherMixture([t1, t2]), backend="cpu")
    assert loss.grad_fn is None
    with torch.inference_mode():
        assert math.isfinite(fastkd.kd_loss(s, fastkd.TeacherMixture([t1, t2]), backend="cpu").item())


def test_wider_members_are_truncated():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(4, 30, generator=g, requires_grad=True)
    members = [torch.randn(4, 34, generator=g) for _ in range(2)]
    a = fastkd.jsd_loss(s, fastkd.TeacherMixture(members), backend="cpu")
    b = fastkd.jsd_loss(s, fastkd.TeacherMixture([m[:, :30] for m in members]), backend="cpu")
    torch.testing.assert_close(a, b)


def test_compiled_fullgraph():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, 33, generator=g, requires_grad=True)
    members = [torch.randn(4, 33, generator=g) for _ in range(2)]

    def step(x, t1, t2):
        return fastkd.forward_kl_loss(x, fastkd.TeacherMixture([t1, t2], [0.25, 0.75]), temperature=T,
                                      backend="cpu")

    eager = step(s, *members)
    (ge,) = torch.autograd.grad(eager, s)
    compiled = torch.compile(step, fullgraph=True, backend="eager")(s, *members)
    (gc,) = torch.autograd.grad(compiled, s)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(gc, ge)


def test_mixture_errors():
    s = torch.randn(4, 10)
    t = torch.randn(4, 10)
    with pytest.raises(TypeError, match="pair"):
        fastkd.forward_kl_loss(s, fastkd.TeacherMixture([(torch.randn(4, 3), torch.randn(10, 3))]))
    with pytest.raises(ValueError, match="leading shape"):
        fastkd.forward_kl_loss(s, fastkd.TeacherMixture([t, torch.randn(5, 10)]))
    with pytest.raises(ValueError, match="same vocabulary"):
        fastkd.forward_kl_loss(s, fastkd.TeacherMixture([t, torch.randn(4, 12)]))
    with pytest.raises(ValueError, match="teacher_vocab='mask'"):
        fastkd.forward_kl_loss(s, fastkd.TeacherMixture([torch.randn(4, 12)]), teacher_vocab="mask")
    with pytest.raises(ValueError, match="process_group"):
        fastkd.jsd_loss(s, fastkd.TeacherMixture([t]), process_group=object())
    with pytest.raises(TypeError, match="float temperature"):
        fastkd.kd_loss(s, fastkd.TeacherMixture([t]), torch.tensor(2.0))
    with pytest.raises(ValueError, match="temperature"):
        fastkd.jsd_loss(s, fastkd.TeacherMixture([t]), temperature=0.0)


# ---- teacher_temperature: p = softmax(t / T_t), q = softmax(s / T) ----

T_T = 0.7


def by_hand(name, s, t, temperature, teacher_temperature):
    """Per-row float64 definitions, written out: forward KL, JSD (beta 0.3), reverse KL, kd (T^2 forward KL)."""
    lq = torch.log_softmax(s / temperature, dim=-1)
    lp = torch.log_softmax(t / teacher_temperature, dim=-1)
    p, q = lp.exp(), lq.exp()
    if name in ("forward_kl", "kd"):
        rows = (p * (lp - lq)).sum(-1) * (temperature ** 2 if name == "kd" else 1.0)
    elif name == "reverse_kl":
        rows = (q * (lq - lp)).sum(-1)
    else:
        m = 0.3 * p + 0.7 * q
        rows = 0.3 * (p * (lp - m.log())).sum(-1) + 0.7 * (q * (lq - m.log())).sum(-1)
    return rows.sum() / rows.numel()


TEMP_LOSSES = {
    "forward_kl": LOSSES["forward_kl"],
    "reverse_kl": lambda s, t, **kw: fastkd.reverse_kl_loss(s, t, **kw),
    "jsd": LOSSES["jsd"],
    "kd": LOSSES["kd"],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TEMP_LOSSES))
def test_teacher_temperature_matches_its_definition(backend, name):
    """Value, student and teacher gradients (the teacher requires grad) against the float64 definition, on
    rows of 2053 classes (wider than a kernel block)."""
    device = skip_unless_runs("forward_kl", backend) if backend != "reference" else torch.device("cpu")
    g = torch.Generator().manual_seed(8)
    s64 = 3 * torch.randn(3, 5, 2053, generator=g, dtype=torch.float64)
    t64 = 3 * torch.randn(3, 5, 2053, generator=g, dtype=torch.float64)
    dtype = torch.float64 if backend == "reference" else torch.float32
    s = s64.to(dtype).to(device).clone().requires_grad_()
    t = t64.to(dtype).to(device).clone().requires_grad_()
    got = TEMP_LOSSES[name](s, t, temperature=T, teacher_temperature=T_T, backend=backend)
    rs, rt = s64.clone().requires_grad_(), t64.clone().requires_grad_()
    ref = by_hand(name, rs, rt, T, T_T)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-7
    got.backward()
    ref.backward()
    assert rel_norm(s.grad.cpu(), rs.grad) < 1e-5
    assert rel_norm(t.grad.cpu(), rt.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_temperature_shifted_bf16_none_and_frozen_teacher(backend):
    """HF-shifted bf16 views, reduction="none" with a random incoming gradient, a frozen teacher (no teacher
    gradient computed), CE and ignore_index."""
    device = skip_unless_runs("forward_kl", backend) if backend != "reference" else torch.device("cpu")
    g = torch.Generator().manual_seed(9)
    full = (3 * torch.randn(2, 8, 301, generator=g)).to(torch.bfloat16)
    teacher = (3 * torch.randn(2, 8, 301, generator=g)).to(torch.bfloat16)
    target = torch.randint(0, 301, (2, 7), generator=g)
    target[0, 2] = -100
    base = full.clone().to(device).requires_grad_()
    got = fastkd.forward_kl_loss(base[:, :-1], teacher.to(device)[:, :-1], temperature=T, teacher_temperature=T_T,
                                 target=target.to(device), ce_weight=0.5, reduction="none", backend=backend)
    ref_base = full.double().clone().requires_grad_()
    lq = torch.log_softmax(ref_base[:, :-1] / T, -1)
    lp = torch.log_softmax(teacher[:, :-1].double() / T_T, -1)
    ce = torch.nn.functional.cross_entropy(ref_base[:, :-1].reshape(-1, 301), target.reshape(-1), reduction="none")
    ref = ((lp.exp() * (lp - lq)).sum(-1) + 0.5 * ce.reshape(2, 7)) * (target != -100)
    torch.testing.assert_close(got.double().cpu(), ref.detach(), rtol=1e-2, atol=1e-3)
    go = torch.randn(2, 7, generator=g)
    (got * go.to(device)).sum().backward()
    (ref * go.double()).sum().backward()
    assert rel_norm(base.grad.cpu(), ref_base.grad) < 1e-2
    assert base.grad[:, -1].abs().max() == 0


def test_teacher_temperature_equal_to_temperature_is_the_plain_call():
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g)
    assert torch.equal(fastkd.jsd_loss(s, t, temperature=2.0, teacher_temperature=2.0),
                       fastkd.jsd_loss(s, t, temperature=2.0))
    torch.testing.assert_close(fastkd.kd_loss(s, t, 2.0, teacher_temperature=2.0), fastkd.kd_loss(s, t, 2.0),
                               rtol=1e-6, atol=0)


def test_teacher_temperature_with_a_mixture_and_a_mapped_teacher():
    g = torch.Generator().manual_seed(11)
    s = torch.randn(4, 30, generator=g, dtype=torch.float64)
    members = [torch.randn(4, 30, generator=g, dtype=torch.float64) for _ in range(2)]
    got = fastkd.forward_kl_loss(s, fastkd.TeacherMixture(members, mode="geometric"), temperature=T,
                                 teacher_temperature=T_T)
    lp = mixture_log_probs(members, [1.0, 1.0], "geometric", T_T)
    want = fastkd.forward_kl_loss(s, lp * T, temperature=T)
    torch.testing.assert_close(got, want)
    # a MappedTeacher projects at the teacher's temperature
    vocab_map = fastkd.VocabMap(torch.tensor([0, 1, 2, -1, 5, 5, 7]), 30)
    t = torch.randn(4, 7, generator=g, dtype=torch.float64)
    got = fastkd.forward_kl_loss(s, fastkd.MappedTeacher(t, vocab_map), temperature=T, teacher_temperature=T_T)
    want = fastkd.forward_kl_loss(s, fastkd.MappedTeacher(t, vocab_map).as_topk(T_T), temperature=T)
    torch.testing.assert_close(got, want)


def test_teacher_temperature_module_and_compile():
    g = torch.Generator().manual_seed(12)
    s = torch.randn(4, 33, generator=g, requires_grad=True)
    t = torch.randn(4, 33, generator=g)
    module = fastkd.nn.JSDLoss(beta=0.3, temperature=T, teacher_temperature=T_T)
    assert "teacher_temperature=0.7" in repr(module)
    eager = module(s, t)
    torch.testing.assert_close(eager.double(), by_hand("jsd", s.detach().double(), t.double(), T, T_T),
                               rtol=1e-6, atol=0)
    compiled = torch.compile(lambda x, y: module(x, y), fullgraph=True, backend="eager")(s, t)
    torch.testing.assert_close(compiled, eager)
    kd = fastkd.nn.KDLoss(T, teacher_temperature=T_T)
    torch.testing.assert_close(kd(s, t).double(), by_hand("kd", s.detach().double(), t.double(), T, T_T),
                               rtol=1e-6, atol=0)


def test_teacher_temperature_errors():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    topk = fastkd.topk_from_logits(t, 3)
    with pytest.raises(ValueError, match="TopKTeacher"):
        fastkd.forward_kl_loss(s, topk, teacher_temperature=2.0)
    with pytest.raises(ValueError, match="teacher_temperature"):
        fastkd.jsd_loss(s, t, teacher_temperature=0.0)
    with pytest.raises(ValueError, match="process_group"):
        fastkd.jsd_loss(s, t, teacher_temperature=2.0, process_group=object())
    with pytest.raises(TypeError, match="float temperature"):
        fastkd.kd_loss(s, t, torch.tensor(2.0), teacher_temperature=2.0)
    with pytest.raises(ValueError, match="teacher_temperature"):
        fastkd.nn.ForwardKLLoss(teacher_temperature=-1.0)


# ---- the block driver, and the teacher temperature's op route, in a training loop (review findings) ----

def _block_losses():
    g = torch.Generator().manual_seed(13)
    s = torch.randn(4, 6, 37, generator=g)
    t1, t2 = torch.randn(4, 6, 37, generator=g), torch.randn(4, 6, 37, generator=g)
    return s, {
        "mixture": lambda x, **kw: fastkd.jsd_loss(x, fastkd.TeacherMixture([t1, t2]), backend="cpu", **kw),
        "teacher_temperature": lambda x, **kw: fastkd.kd_loss(x, t1, 2.0, teacher_temperature=1.5, backend="cpu",
                                                              **kw),
    }


@pytest.mark.parametrize("form", ["mixture", "teacher_temperature"])
def test_blocks_backward_once_in_place_loss_and_low_precision_scale(form, monkeypatch):
    monkeypatch.setattr(teacher_blocks, "BLOCK_ELEMENTS", 5 * 37)
    s, losses = _block_losses()
    loss_fn = losses[form]
    # a second backward, and double backward, raise fastkd's clear errors
    x = s.clone().requires_grad_()
    loss = loss_fn(x)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss_fn(x), x, create_graph=True)
    # the returned loss can be changed in place (loss += ce), reduced or per row
    for reduction in ("batchmean", "none"):
        x = s.clone().requires_grad_()
        loss = loss_fn(x, reduction=reduction)
        loss += 1.0
        loss.sum().backward()
        assert torch.isfinite(x.grad).all()
    # bf16: the incoming gradient (0.9) multiplies in float32, not rounded to bf16 first
    xb = s.to(torch.bfloat16).requires_grad_()
    (g1,) = torch.autograd.grad(loss_fn(xb), xb)
    (g9,) = torch.autograd.grad(loss_fn(xb) * 0.9, xb)
    assert torch.equal(g9, (g1.float() * 0.9).to(torch.bfloat16))


def test_blocks_take_any_layout():
    """An expanded student (stride-0 rows), a column slice and a transposed teacher run (copied per block
    where the backend needs contiguous rows) and match the float64 definition, gradients included: the
    teacher at its own temperature as dense logits (the op's argument) and as a mixture of one (the blocks)."""
    g = torch.Generator().manual_seed(14)
    transposed = torch.randn(29, 6, generator=g).T
    sliced = torch.randn(6, 40, generator=g)[:, :29]
    cases = [(torch.randn(1, 29, generator=g), lambda leaf: leaf.expand(6, 29), transposed),
             (torch.randn(6, 40, generator=g), lambda leaf: leaf[:, :29], transposed),
             (torch.randn(1, 29, generator=g), lambda leaf: leaf.expand(6, 29), sliced)]
    for (source, view, teacher), form in itertools.product(cases, ("logits", "mixture")):
        leaf, leaf64 = source.clone().requires_grad_(), source.double().requires_grad_()
        t = teacher if form == "logits" else fastkd.TeacherMixture([teacher])
        got = fastkd.forward_kl_loss(view(leaf), t, temperature=2.0, teacher_temperature=1.2, backend="cpu")
        want = by_hand("forward_kl", view(leaf64), teacher.double(), 2.0, 1.2)
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-7)
        got.backward()
        want.backward()
        assert rel_norm(leaf.grad, leaf64.grad) < 1e-5


def test_kd_loss_equal_teacher_temperature_with_a_process_group_keeps_the_sharded_kd(monkeypatch):
    """kd_loss with teacher_temperature == temperature and a process_group is the plain sharded kd_loss (T^2
    kept), not the divergences' path."""
    calls = []
    monkeypatch.setattr(fastkd.losses.divergence, "sharded", lambda name, *a, **kw: calls.append(name) or 0.0)
    fastkd.kd_loss(torch.randn(2, 5), torch.randn(2, 5), 2.0, teacher_temperature=2.0, process_group=object())
    assert calls == ["kd_loss"]


# ---- MappedTeacher (another tokenizer's teacher): projected block by block ----

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("form", ["logits", "pair"])
@pytest.mark.parametrize("mode", ["tail", "renormalize"])
def test_mapped_teacher_in_blocks_matches_the_whole_projection(backend, form, mode, monkeypatch):
    """A constant MappedTeacher runs projected per block of rows (3 rows here: several blocks, a ragged last
    one), as logits or a (hidden, weight) pair, against the float64 reference's whole projection."""
    device = skip_unless_runs("forward_kl", backend)
    monkeypatch.setattr(teacher_blocks, "BLOCK_ELEMENTS", 3 * 500)
    g = torch.Generator().manual_seed(15)
    vs, vt, h = 500, 700, 16
    table = torch.full((vt,), -1, dtype=torch.int64)
    table[:400] = torch.randperm(vs, generator=g)[:400]
    table[400:450] = table[:50]  # many teacher tokens onto one student token
    vocab_map = fastkd.VocabMap(table, vs)
    s64 = 3 * torch.randn(2, 5, vs, generator=g, dtype=torch.float64)
    hidden = torch.randn(2, 5, h, generator=g, dtype=torch.float64)
    weight = torch.randn(vt, h, generator=g, dtype=torch.float64)
    target = torch.randint(0, vs, (2, 5), generator=g)
    target[1, 2] = -100

    def teacher(dtype):
        pair = (hidden.to(dtype).to(device), weight.to(dtype).to(device))
        return fastkd.MappedTeacher(pair if form == "pair" else pair[0] @ pair[1].T, vocab_map.to(device),
                                    mode=mode)

    for loss_fn in (lambda x, t, **kw: fastkd.jsd_loss(x, t, beta=0.3, temperature=2.0, **kw),
                    lambda x, t, **kw: fastkd.kd_loss(x, t, 2.0, teacher_temperature=1.5, **kw)):
        x = s64.float().to(device).requires_grad_()
        with monkeypatch.context() as patch:  # the fused call never forms the whole projection
            patch.setattr(fastkd.MappedTeacher, "as_topk", lambda *a: pytest.fail("whole projection formed"))
            got = loss_fn(x, teacher(torch.float32), target=target.to(device), ce_weight=0.2, backend=backend)
        x64 = s64.clone().requires_grad_()
        want = loss_fn(x64, teacher(torch.float64), target=target, ce_weight=0.2, backend="reference")
        assert abs(got.item() - want.item()) <= 2e-5 * abs(want.item()) + 1e-7, (got, want)
        got.backward()
        want.backward()
        assert rel_norm(x.grad.cpu(), x64.grad) < 1e-5


def test_mapped_teacher_that_requires_grad_gets_its_gradient():
    """A MappedTeacher whose logits require grad takes the whole projection (differentiable), as before."""
    g = torch.Generator().manual_seed(16)
    vocab_map = fastkd.VocabMap(torch.tensor([3, 1, -1, 0, 3, 2]), 5)
    s = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t32 = t.detach().float().requires_grad_()
    fastkd.forward_kl_loss(s.detach().float(), fastkd.MappedTeacher(t32, vocab_map), backend="cpu").backward()
    fastkd.forward_kl_loss(s, fastkd.MappedTeacher(t, vocab_map), backend="reference").backward()
    assert t32.grad is not None and rel_norm(t32.grad, t.grad) < 1e-5


@pytest.mark.parametrize("backend", FUSED)
def test_akl_with_a_teacher_temperature_and_a_mixture(backend, monkeypatch):
    """AKL (its own row op, akl_fwd) on the block path: a teacher temperature and a mixture, against the
    float64 reference (its head by a real sort)."""
    device = skip_unless_runs("akl", backend)
    monkeypatch.setattr(teacher_blocks, "BLOCK_ELEMENTS", 4 * 301)
    g = torch.Generator().manual_seed(17)
    s64 = 3 * torch.randn(3, 5, 301, generator=g, dtype=torch.float64)
    members = members_like(s64.shape, n=2, seed=18)
    for teacher in (lambda dt: members[0].to(dt).to(device),
                    lambda dt: fastkd.TeacherMixture([m.to(dt).to(device) for m in members], [0.3, 0.7])):
        x = s64.float().to(device).requires_grad_()
        got = fastkd.akl_loss(x, teacher(torch.float32), mu=0.6, temperature=T, teacher_temperature=T_T,
                              backend=backend)
        x64 = s64.clone().requires_grad_()
        want = fastkd.akl_loss(x64, teacher(torch.float64), mu=0.6, temperature=T, teacher_temperature=T_T,
                               backend="reference")
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item()) + 1e-7, (got, want)
        got.backward()
        want.backward()
        assert rel_norm(x.grad.cpu(), x64.grad) < 1e-5
