"""fastkd.fused_linear_kd_loss's teachers (issue 22): a teacher temperature, a teacher that learns
(``teacher_grad=True``), a shared head (``teacher=(teacher_hidden, None)``) and ``fastkd.TeacherMixture``.

The oracle is the unfused composition in float64 (tests/test_fused_linear.py's ``head`` and
``composition``), differentiated by autograd with respect to every student and teacher tensor; each
gradient is compared by its relative-norm error. Every fused backend runs the same cases.
"""
import pytest
import torch

import fastkd
from fastkd.losses.fused_linear import DIVERGENCES, fused_linear_kd_loss
from test_fused_linear import BACKENDS, F64, composition, data, head, needs, rel_norm

TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-5, 1e-2)}  # (loss, gradient) relative errors
T, T_T = 2.0, 1.5  # the distillation temperature and the teacher's


def leaves(*xs, dtype=torch.float32):
    return [None if x is None else x.detach().to(dtype).requires_grad_(True) for x in xs]


def compare(loss, ref, grads_of, ref_grads_of, dtype=torch.float32, names=None):
    """Loss, then the gradient of every leaf (``grads_of`` / ``ref_grads_of``: matching lists) with a random
    incoming gradient, against the float64 composition."""
    loss_tol, grad_tol = TOL[dtype]
    assert loss.shape == ref.shape and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=loss_tol, atol=loss_tol * ref.abs().max().item())
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(loss, grads_of, go)
    ref_grads = torch.autograd.grad(ref, ref_grads_of, go.double())
    for i, (g, r, x) in enumerate(zip(grads, ref_grads, grads_of)):
        name = names[i] if names else str(i)
        assert g.dtype == x.dtype and g.shape == x.shape, name
        err = rel_norm(g, r)
        assert err < grad_tol, f"grad {name}: relative-norm error {err:.2e}"


# ----------------------------------------------------------------------------
# teacher_temperature
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ("kl", "reverse_kl", "jsd", "tvd"))
@pytest.mark.parametrize("teacher_kind", ("pair", "logits"))
def test_teacher_temperature(backend, divergence, teacher_kind):
    """p = softmax(t / T_t), q = softmax(s / T): the composition with the teacher's logits times T / T_t."""
    needs(backend)
    sh, sw, sb, th, tw, tb, y = data(n=19, v=4099 if teacher_kind == "pair" else 300, seed=1)
    y[::4] = -100
    h, w = leaves(sh, sw)
    kw = dict(divergence=divergence, temperature=T, ce_weight=0.3, chunk_size=8, softcap=4.0)
    teacher = (th, tw) if teacher_kind == "pair" else head(th, tw).float()
    loss = fused_linear_kd_loss(h, w, teacher, y, teacher_temperature=T_T, backend=backend,
                                teacher_bias=tb if teacher_kind == "pair" else None, **kw)
    h2, w2 = leaves(sh, sw, dtype=F64)
    t = head(th, tw, tb, softcap=4.0) if teacher_kind == "pair" else teacher.double()
    ref = composition(h2, w2, t * (T / T_T), y, **kw)
    compare(loss, ref, [h, w], [h2, w2], names=["hidden", "weight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_temperature_equal_to_temperature_changes_nothing(backend):
    needs(backend)
    sh, sw, _, th, tw, _, y = data(seed=2)
    a = fused_linear_kd_loss(sh, sw, (th, tw), y, temperature=T, backend=backend)
    b = fused_linear_kd_loss(sh, sw, (th, tw), y, temperature=T, teacher_temperature=T, backend=backend)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------
# teacher_grad=True: mutual learning, co-training
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_teacher_gets_gradients(backend, divergence):
    """Every divergence: the gradients of the teacher's hidden states, weight and bias (and the student's)
    equal the composition's, with a teacher temperature, a logit scale, ignored rows and sample weights."""
    needs(backend)
    sh, sw, sb, th, tw, tb, y = data(n=19, v=4099, seed=3)
    y[::5] = -100
    sample_weight = torch.rand(y.shape, generator=torch.Generator().manual_seed(4)) + 0.5
    h, w, b, t_h, t_w, t_b = leaves(sh, sw, sb, th, tw, tb)
    kw = dict(divergence=divergence, temperature=T, beta=0.3, skew=0.2, ce_weight=0.3, logit_scale=0.8,
              sample_weight=sample_weight)
    loss = fused_linear_kd_loss(h, w, (t_h, t_w), y, student_bias=b, teacher_bias=t_b, teacher_temperature=T_T,
                                teacher_grad=True, chunk_size=8, backend=backend, **kw)
    ref_leaves = leaves(sh, sw, sb, th, tw, tb, dtype=F64)
    h2, w2, b2, th2, tw2, tb2 = ref_leaves
    ref = composition(h2, w2, head(th2, tw2, tb2, scale=0.8) * (T / T_T), y, student_bias=b2, **kw)
    names = ["hidden", "weight", "bias", "teacher_hidden", "teacher_weight", "teacher_bias"]
    if divergence == "entropy_gated_kl":  # its gate w(H(p)) is a constant in the gradients (documented): the
        # teacher's gradient omits dw/dt, so only the student's are the composition's
        compare(loss, ref, [h, w, b], ref_leaves[:3], names=names[:3])
        return
    compare(loss, ref, [h, w, b, t_h, t_w, t_b], ref_leaves, names=names)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ("sum", "none"))
def test_teacher_logits_get_gradients_through_a_shifted_view(backend, reduction):
    """Dense teacher logits ``[B, S, V][:, :-1]`` (not viewable as rows: gathered per chunk) get their gradient;
    ``reduction="none"`` runs the chunks again in backward."""
    needs(backend)
    g = torch.Generator().manual_seed(6)
    sh, sw = torch.randn(3, 9, 16, generator=g), torch.randn(300, 16, generator=g) * 0.5
    full = (torch.randn(3, 10, 300, generator=g) * 2).requires_grad_(True)
    teacher = full[:, :-1]
    h, w = leaves(sh, sw)
    loss = fused_linear_kd_loss(h, w, teacher, divergence="jsd", temperature=T, teacher_grad=True, chunk_size=5,
                                reduction=reduction, backend=backend)
    h2, w2 = leaves(sh, sw, dtype=F64)
    full2 = full.detach().double().requires_grad_(True)
    ref = composition(h2, w2, full2[:, :-1], divergence="jsd", temperature=T, reduction=reduction)
    compare(loss, ref, [h, w, full], [h2, w2, full2], names=["hidden", "weight", "teacher logits"])


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_teacher_grad_with_bf16_teacher_head(backend):
    """A bf16 teacher head: its gradients come back in bf16, summed over the chunks in float32."""
    needs(backend)
    sh, sw, _, th, tw, _, y = data(n=64, seed=7)
    h, w = leaves(sh, sw)
    t_h, t_w = leaves(th, tw, dtype=torch.bfloat16)
    loss = fused_linear_kd_loss(h, w, (t_h, t_w), y, divergence="reverse_kl", teacher_grad=True, chunk_size=8,
                                backend=backend)
    h2, w2, th2, tw2 = leaves(sh, sw, t_h, t_w, dtype=F64)
    ref = composition(h2, w2, (th2, tw2), y, divergence="reverse_kl")
    compare(loss, ref, [t_h, t_w], [th2, tw2], dtype=torch.bfloat16, names=["teacher_hidden", "teacher_weight"])


def test_teacher_grad_under_no_grad_does_no_backward_work(monkeypatch):
    """Under no_grad (or with nothing requiring grad) the row op is asked for no gradient at all."""
    from fastkd.reference import divergence as R

    flags = []
    row_op = R.divergence_fwd

    def spy(*args):
        flags.append(args[-2:])  # (grad_student, grad_teacher)
        return row_op(*args)

    monkeypatch.setattr(R, "divergence_fwd", spy)
    sh, sw, _, th, tw, _, y = data(seed=8)
    h, w, t_h, t_w = leaves(sh, sw, th, tw)
    with torch.no_grad():
        loss = fused_linear_kd_loss(h, w, (t_h, t_w), y, teacher_grad=True, chunk_size=16, backend="reference")
    detached = fused_linear_kd_loss(sh, sw, (th, tw), y, teacher_grad=True, chunk_size=16, backend="reference")
    assert not loss.requires_grad and torch.equal(loss, detached)
    assert flags and all(f == (False, False) for f in flags), flags


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_a_tied_teacher_weight_is_not_a_shared_head(backend):
    """``teacher=(th, W)`` with ``W`` the student's weight object is an ordinary pair: its own ``teacher_bias``
    (or none) counts, as with a copy of ``W``; only ``(th, None)`` is the shared head (with the student's bias)."""
    needs(backend)
    sh, sw, sb, th, _, tb, y = data(ht=24, seed=20)
    kw = dict(student_bias=sb, temperature=T, backend=backend)
    with torch.no_grad():
        for bias in (tb, None):
            tied = fused_linear_kd_loss(sh, sw, (th, sw), y, teacher_bias=bias, **kw)
            copy = fused_linear_kd_loss(sh, sw, (th, sw.clone()), y, teacher_bias=bias, **kw)
            assert torch.equal(tied, copy)
        shared = fused_linear_kd_loss(sh, sw, (th, None), y, **kw)
        torch.testing.assert_close(shared, fused_linear_kd_loss(sh, sw, (th, sw.clone()), y, teacher_bias=sb, **kw))
    w = sw.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="teacher_weight requires grad"):
        fused_linear_kd_loss(sh, w, (th, w), y, backend=backend)


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_bf16_teacher_logits_are_scaled_in_float32(backend):
    """``teacher_temperature`` on bf16 dense teacher logits: the scaled logits are float32 (rounding them to
    bf16 again cost 2e-4 of the loss and 6e-3 of the gradient); a learning teacher's gradient comes back in
    bf16, rounded once."""
    needs(backend)
    sh, sw, _, th, tw, _, y = data(n=64, v=256, seed=21)
    logits = (head(th, tw) * 2).to(torch.bfloat16)
    h, w = leaves(sh, sw)
    t = logits.clone().requires_grad_(True)
    loss = fused_linear_kd_loss(h, w, t, y, divergence="jsd", temperature=T, teacher_temperature=1.5,
                                teacher_grad=True, chunk_size=16, backend=backend)
    h2, w2 = leaves(sh, sw, dtype=F64)
    t2 = logits.double().requires_grad_(True)
    ref = composition(h2, w2, t2 * (T / 1.5), y, divergence="jsd", temperature=T)
    compare(loss, ref, [h, w], [h2, w2], names=["hidden", "weight"])
    (g,) = torch.autograd.grad(fused_linear_kd_loss(h, w, t, y, divergence="jsd", temperature=T,
                                                    teacher_temperature=1.5, teacher_grad=True, chunk_size=16,
                                                    backend=backend), [t])
    (g2,) = torch.autograd.grad(composition(h2, w2, t2 * (T / 1.5), y, divergence="jsd", temperature=T), [t2])
    assert g.dtype == torch.bfloat16 and rel_norm(g, g2) < 5e-3


# ----------------------------------------------------------------------------
# a shared head: teacher=(teacher_hidden, None)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher_grad", (False, True))
def test_shared_head(backend, teacher_grad):
    """The teacher's logits come from the student's weight and bias. Frozen teacher (the default): the teacher
    path is a constant (the composition detaches it). ``teacher_grad=True``: the weight and bias gradients
    hold both heads' contributions, and the teacher's hidden states get theirs."""
    needs(backend)
    sh, sw, sb, th, _, _, y = data(n=19, ht=24, v=4099, seed=9)
    y[::3] = -100
    h, w, b, t_h = leaves(sh, sw, sb, th)
    loss = fused_linear_kd_loss(h, w, (t_h if teacher_grad else th, None), y, student_bias=b, divergence="jsd",
                                temperature=T, teacher_temperature=T_T, ce_weight=0.5, teacher_grad=teacher_grad,
                                chunk_size=8, backend=backend)
    h2, w2, b2, th2 = leaves(sh, sw, sb, th, dtype=F64)
    t = head(th2, w2, b2) if teacher_grad else head(th2, w2.detach(), b2.detach())
    ref = composition(h2, w2, t * (T / T_T), y, student_bias=b2, divergence="jsd", temperature=T, ce_weight=0.5)
    if teacher_grad:
        compare(loss, ref, [h, w, b, t_h], [h2, w2, b2, th2], names=["hidden", "weight", "bias", "teacher_hidden"])
    else:
        compare(loss, ref, [h, w, b], [h2, w2, b2], names=["hidden", "weight", "bias"])


# ----------------------------------------------------------------------------
# TeacherMixture
# ----------------------------------------------------------------------------

def _mixture_truth(members, weights, mode, t_temp):
    """The mixture's teacher logits in float64 for the composition: ``T log p`` (softmax(. / T) gives p)."""
    logs = [torch.log_softmax(m / t_temp, -1) for m in members]
    if mode == "arithmetic":
        w = torch.tensor(weights, dtype=F64) / sum(weights)
        log_p = torch.logsumexp(torch.stack([lp + wi.log() for lp, wi in zip(logs, w)]), 0)
    else:
        log_p = torch.log_softmax(sum(wi * lp for lp, wi in zip(logs, weights)), -1)
    return T * log_p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ("arithmetic", "geometric"))
@pytest.mark.parametrize("divergence", ("kl", "reverse_kl", "tvd"))
def test_teacher_mixture(backend, mode, divergence):
    """Three teachers (two heads of different hidden sizes, one with a bias, and dense logits), unequal weights,
    a teacher temperature, rows wider than a block."""
    needs(backend)
    g = torch.Generator().manual_seed(10)
    sh, sw, _, th, tw, tb, y = data(n=19, v=4099, seed=11)
    th2, tw2 = torch.randn(th.shape[0], 12, generator=g), torch.randn(4099, 12, generator=g) * 0.6
    dense = torch.randn(th.shape[0], 4099, generator=g) * 2
    weights = [0.5, 0.3, 0.2] if mode == "arithmetic" else [0.6, 0.9, 0.4]
    mixture = fastkd.TeacherMixture([(th, tw, tb), (th2, tw2), dense], weights, mode=mode)
    h, w = leaves(sh, sw)
    loss = fused_linear_kd_loss(h, w, mixture, y, divergence=divergence, temperature=T, teacher_temperature=T_T,
                                ce_weight=0.2, chunk_size=8, backend=backend)
    h2, w2 = leaves(sh, sw, dtype=F64)
    t = _mixture_truth([head(th, tw, tb), head(th2, tw2), dense.double()], weights, mode, T_T)
    ref = composition(h2, w2, t, y, divergence=divergence, temperature=T, ce_weight=0.2)
    compare(loss, ref, [h, w], [h2, w2], names=["hidden", "weight"])


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_mixture_of_one_is_that_teacher_and_wider_teachers_are_truncated(backend):
    needs(backend)
    sh, sw, _, th, tw, _, y = data(v=300, vt=310, seed=12)
    one = fused_linear_kd_loss(sh, sw, fastkd.TeacherMixture([(th, tw)]), y, temperature=T, backend=backend)
    plain = fused_linear_kd_loss(sh, sw, (th, tw), y, temperature=T, backend=backend)
    torch.testing.assert_close(one, plain, rtol=2e-6, atol=0)


def test_mixture_and_teacher_options_errors():
    sh, sw, _, th, tw, _, y = data(seed=13)
    topk = fastkd.topk_from_logits(head(th, tw).float(), 4)
    with pytest.raises(ValueError, match="weights must be a list of 2 positive"):
        fastkd.TeacherMixture([(th, tw), (th, tw)], [1.0, -1.0])
    with pytest.raises(ValueError, match="mode must be one of"):
        fastkd.TeacherMixture([(th, tw)], mode="harmonic")
    with pytest.raises(ValueError, match="teachers is empty"):
        fastkd.TeacherMixture([])
    with pytest.raises(TypeError, match=r"teachers\[1\] must be"):
        fastkd.TeacherMixture([(th, tw), "x"])
    with pytest.raises(ValueError, match="same vocabulary"):
        fastkd.fused_linear_kd_loss(sh, sw, fastkd.TeacherMixture([(th, tw), (th, tw[:-1])]), y)
    with pytest.raises(ValueError, match="leading shape"):
        fastkd.fused_linear_kd_loss(sh, sw, fastkd.TeacherMixture([(th[:-1], tw)]), y)
    with pytest.raises(ValueError, match="teacher_grad=True needs"):
        fastkd.fused_linear_kd_loss(sh, sw, fastkd.TeacherMixture([(th, tw)]), y, teacher_grad=True)
    with pytest.raises(ValueError, match="teacher_grad=True needs"):
        fastkd.fused_linear_kd_loss(sh, sw, topk, y, teacher_grad=True)
    mapped = fastkd.MappedTeacher((th, tw), _vocab_map(300, 300, 18))
    with pytest.raises(ValueError, match="teacher_grad=True needs .* got a MappedTeacher"):
        fastkd.fused_linear_kd_loss(sh, sw, mapped, y, teacher_grad=True)
    with pytest.raises(ValueError, match="MappedTeacher must have the leading shape"):
        fastkd.fused_linear_kd_loss(sh[:-1], sw, mapped, y[:-1])
    with pytest.raises(ValueError, match="teacher_temperature does not apply to a TopKTeacher"):
        fastkd.fused_linear_kd_loss(sh, sw, topk, y, teacher_temperature=2.0)
    with pytest.raises(ValueError, match="teacher_temperature"):
        fastkd.fused_linear_kd_loss(sh, sw, (th, tw), y, teacher_temperature=0.0)
    with pytest.raises(TypeError, match="teacher_grad must be a bool"):
        fastkd.fused_linear_kd_loss(sh, sw, (th, tw), y, teacher_grad=1)
    with pytest.raises(ValueError, match="teacher_bias must be None with a shared head"):
        fastkd.fused_linear_kd_loss(sh, sw, (th, None), y, teacher_bias=torch.zeros(300))
    learning = tw.clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"teachers\[0\] requires grad"):
        fastkd.fused_linear_kd_loss(sh, sw, fastkd.TeacherMixture([(th, learning)]), y)
    with pytest.raises(ValueError, match="teacher_weight requires grad"):  # the default keeps the frozen-teacher check
        fastkd.fused_linear_kd_loss(sh, sw, (th, learning), y)


def test_teacher_temperature_traces_with_torch_compile():
    """The custom-op path carries the teacher's temperature: torch.compile(fullgraph=True) traces it."""
    needs("cpu")
    sh, sw, _, th, tw, _, y = data(seed=14)

    def step(h, w):
        return fused_linear_kd_loss(h, w, (th, tw), y, temperature=T, teacher_temperature=T_T, ce_weight=0.2,
                                    chunk_size=8)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    got = []
    for f in (step, compiled):
        h, w = leaves(sh, sw)
        out = f(h, w)
        got.append((out.detach(), *torch.autograd.grad(out, [h, w])))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_mixture_of_shifted_3d_views(backend):
    """Members given as HF-style shifted views ``x[:, :-1]`` of ``[B, S, ...]`` tensors (not viewable as rows:
    each chunk gathers its rows), with the student 3-D too."""
    needs(backend)
    g = torch.Generator().manual_seed(15)
    sh, sw = torch.randn(2, 8, 16, generator=g), torch.randn(300, 16, generator=g) * 0.5
    th, tw = torch.randn(2, 9, 12, generator=g), torch.randn(300, 12, generator=g) * 0.6
    dense = torch.randn(2, 9, 300, generator=g) * 2
    mixture = fastkd.TeacherMixture([(th[:, :-1], tw), dense[:, :-1]], [0.4, 0.6], mode="geometric")
    h, w = leaves(sh, sw)
    loss = fused_linear_kd_loss(h, w, mixture, temperature=T, chunk_size=5, backend=backend)
    h2, w2 = leaves(sh, sw, dtype=F64)
    t = _mixture_truth([head(th[:, :-1], tw), dense[:, :-1].double()], [0.4, 0.6], "geometric", T)
    ref = composition(h2, w2, t, temperature=T)
    compare(loss, ref, [h, w], [h2, w2], names=["hidden", "weight"])


# ----------------------------------------------------------------------------
# MappedTeacher (another tokenizer) in the fused head
# ----------------------------------------------------------------------------

def _vocab_map(v_s, v_t, seed):
    """Every fourth teacher token unmatched, two onto student 0; ``whole``: every token matched both ways."""
    t2s = torch.randperm(v_t, generator=torch.Generator().manual_seed(seed)) % v_s
    t2s[::4] = -1
    t2s[1] = 0
    return fastkd.VocabMap(t2s, v_s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ("tail", "renormalize"))
@pytest.mark.parametrize("form", ("pair", "logits"))
def test_mapped_teacher_projected_per_chunk(backend, mode, form):
    """A teacher over another vocabulary (V_t = 500 onto V = 300): its probabilities summed onto the matched
    student ids per chunk equal the dense ``MappedTeacher`` projection's top-k buckets (float64)."""
    needs(backend)
    sh, sw, _, th, tw, _, y = data(v=300, vt=500, seed=16)
    y[::3] = -100
    vocab_map = _vocab_map(300, 500, 17)
    rows = (th, tw) if form == "pair" else head(th, tw).float()
    h, w = leaves(sh, sw)
    loss = fused_linear_kd_loss(h, w, fastkd.MappedTeacher(rows, vocab_map, mode=mode), y, divergence="jsd",
                                temperature=T, teacher_temperature=T_T, ce_weight=0.3, chunk_size=8, backend=backend)
    h2, w2 = leaves(sh, sw, dtype=F64)
    rows64 = (th.double(), tw.double()) if form == "pair" else rows.double()
    buckets = fastkd.MappedTeacher(rows64, vocab_map, mode=mode).as_topk(T_T)
    ref = composition(h2, w2, buckets, y, divergence="jsd", temperature=T, ce_weight=0.3)
    compare(loss, ref, [h, w], [h2, w2], names=["hidden", "weight"])


# ----------------------------------------------------------------------------
# return_entropy: the student's entropy from the chunks' logits (TRL's metric)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_return_entropy_is_the_students_entropy_over_the_read_rows(backend):
    needs(backend)
    sh, sw, sb, th, tw, _, y = data(n=19, v=4099, seed=19)
    y[::3] = -100
    h, w = leaves(sh, sw)
    parts, entropy = fused_linear_kd_loss(h, w, (th, tw), y, student_bias=sb, divergence="jsd", temperature=T,
                                          softcap=5.0, ce_weight=0.5, return_parts=True, return_entropy=True,
                                          chunk_size=8, backend=backend)
    want = fused_linear_kd_loss(h, w, (th, tw), y, student_bias=sb, divergence="jsd", temperature=T, softcap=5.0,
                                ce_weight=0.5, return_parts=True, chunk_size=8, backend=backend)
    torch.testing.assert_close(parts.loss, want.loss, rtol=1e-6, atol=0)
    log_q = torch.log_softmax(head(sh, sw, sb, softcap=5.0) / T, -1)
    rows = -(log_q.exp() * log_q).sum(-1)
    assert entropy.dtype == torch.float32 and not entropy.requires_grad
    torch.testing.assert_close(entropy.double(), rows[y != -100].sum(), rtol=1e-6, atol=0)
    # the loss still trains: gradients as without the entropy
    g = torch.autograd.grad(parts.loss, [h, w])
    g2 = torch.autograd.grad(want.loss, [h, w])
    for a, b in zip(g, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
