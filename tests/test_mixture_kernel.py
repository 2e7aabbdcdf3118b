"""A ``fastkd.TeacherMixture`` of dense logits formed inside the CPU ``divergence_fwd`` (issue 22:
``teacher_members``, ``member_weights``, ``mixture_mode``; csrc/cpu/teacher_mixture.h): every kind and ``kd_loss``,
2 to 4 members, both modes, a teacher temperature of its own, against the mixture's float64 definition written out
here; ragged widths (2053: rows wider than a stats chunk with a ragged tail), bfloat16 members, shifted and strided
views, CE with ignored rows, reductions, extreme log-probs, and the op's errors. The block path is made to fail on
the cpu backend, so every loss here is the op's own mixing."""
import pytest
import torch

import fastkd
from backend_cases import skip_unless_runs
from fastkd.losses import teacher_blocks

V = 2053
T = 2.0


def mixture_log_probs(members, weights, mode, temperature):
    """The definition in float64: arithmetic ``log sum_i w_i p_i`` (w normalised), geometric
    ``log(prod_i p_i^(w_i) / Z)``, ``p_i = softmax(t_i / temperature)``."""
    logs = [torch.log_softmax(m.double() / temperature, dim=-1) for m in members]
    if mode == "arithmetic":
        total = sum(weights)
        return torch.log(sum((w / total) * lp.exp() for w, lp in zip(weights, logs)))
    return torch.log_softmax(sum(w * lp for w, lp in zip(weights, logs)), dim=-1)


def truth(loss, s, members, weights, mode, temperature, teacher_temperature=None, **kw):
    """``loss`` of float64 ``s`` against the float64 mixture on the reference backend (the mixture's log-probs
    times T as the teacher: softmax(T log p / T) = p)."""
    lp = mixture_log_probs(members, weights, mode, temperature if teacher_temperature is None else teacher_temperature)
    return loss(s, lp * temperature, temperature=temperature, backend="reference", **kw)


def rel_norm(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


LOSSES = {  # every kind of divergence_fwd (0: KL family, 1, 2, 3, 4, 6, 7) and kd_loss (forward KL, T^2)
    "forward_kl": lambda s, t, **kw: fastkd.forward_kl_loss(s, t, **kw),
    "reverse_kl": lambda s, t, **kw: fastkd.reverse_kl_loss(s, t, **kw),
    "jsd": lambda s, t, **kw: fastkd.jsd_loss(s, t, beta=0.3, **kw),
    "tvd": lambda s, t, **kw: fastkd.tvd_loss(s, t, **kw),
    "jeffreys": lambda s, t, **kw: fastkd.jeffreys_loss(s, t, **kw),
    "triangular": lambda s, t, **kw: fastkd.triangular_loss(s, t, **kw),
    "ab": lambda s, t, **kw: fastkd.ab_divergence_loss(s, t, alpha=0.2, beta=0.7, **kw),
    "renyi": lambda s, t, **kw: fastkd.renyi_loss(s, t, order=0.5, **kw),
    "entropy_gated": lambda s, t, **kw: fastkd.entropy_gated_kl_loss(s, t, **kw),
    "kd": lambda s, t, temperature, **kw: fastkd.kd_loss(s, t, temperature, **kw),
}
CASES = [  # (members, weights, teacher temperature)
    (2, [0.7, 0.3], None),
    (3, [0.5, 0.3, 0.2], 1.3),
    (4, [0.4, 0.1, 0.3, 0.2], 3.0),
]


@pytest.fixture(autouse=True)
def no_blocks(monkeypatch):
    """The cpu backend must not mix blocks in PyTorch: its op forms the mixture."""
    skip_unless_runs("forward_kl", "cpu")

    def refuse(*args, **kwargs):
        raise AssertionError("the block path ran: the cpu op should have formed the mixture")

    monkeypatch.setattr(teacher_blocks, "_mixed_block", refuse)


def members_like(shape, n, seed=1, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=g, dtype=torch.float64) + 5.0 * i for i in range(n)]


def check(name, s64, members, weights, mode, teacher_temperature=None, member_dtype=torch.float32,
          make_student=None, make_member=None, tol=1e-5, temperature=T, **kw):
    """The cpu loss and student gradient against the float64 truth. ``make_member`` / ``make_student``: the
    view the loss gets of a member (in ``member_dtype``) / of the student (float32)."""
    loss = LOSSES[name]
    s = (make_student or (lambda x: x.float().clone()))(s64).requires_grad_()
    view = make_member or (lambda x: x)
    own_t = {} if teacher_temperature is None else {"teacher_temperature": teacher_temperature}
    mixture = fastkd.TeacherMixture([view(m.to(member_dtype)) for m in members], weights, mode=mode)
    got = loss(s, mixture, temperature=temperature, backend="cpu", **own_t, **kw)
    ref_s = s64.detach().clone().requires_grad_()
    exact = [view(m.to(member_dtype)).double() for m in members]  # the members as the op reads them
    ref = truth(loss, ref_s, exact, weights, mode, temperature, teacher_temperature, **kw)
    assert got.shape == ref.shape
    assert rel_norm(got.detach(), ref.detach()) <= tol
    go = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).reshape(got.shape)
    (got * go.float()).sum().backward()
    (ref * go).sum().backward()
    assert rel_norm(s.grad, ref_s.grad) < tol
    return got


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mode", ["arithmetic", "geometric"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_every_kind_matches_the_definition(name, mode, case):
    n, weights, t_t = CASES[case]
    g = torch.Generator().manual_seed(case)
    s64 = 3 * torch.randn(3, 5, V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (3, 5), generator=g)
    target[0, 1] = -100
    target[2, 4] = -100
    if name == "entropy_gated" and t_t is not None:  # the gate's sigmoid needs entropies near tau: a flatter teacher
        t_t = 6.0
    check(name, s64, members_like(s64.shape, n, seed=case + 1), weights, mode, t_t, target=target, ce_weight=0.25)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("name", ["kd", "jsd", "renyi"])
def test_reductions_and_parts(name, reduction):
    g = torch.Generator().manual_seed(7)
    s64 = 2 * torch.randn(4, 3, V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (4, 3), generator=g)
    target[1, :] = -100
    members = members_like(s64.shape, 3, seed=8)
    sample_weight = torch.rand(4, 3, generator=g) + 0.5
    check(name, s64, members, [0.2, 0.5, 0.3], "arithmetic", 1.5, reduction=reduction, target=target,
          sample_weight=sample_weight, ce_weight=0.5)
    mixture = fastkd.TeacherMixture([m.float() for m in members], [0.2, 0.5, 0.3])
    parts = LOSSES[name](s64.float(), mixture, temperature=T, backend="cpu", reduction=reduction, target=target,
                         ce_weight=0.5, return_parts=True)
    ref = truth(LOSSES[name], s64, members, [0.2, 0.5, 0.3], "arithmetic", T, reduction=reduction, target=target,
                ce_weight=0.5, return_parts=True)
    for a, b in zip(parts, ref):
        assert rel_norm(a, b) < 1e-5


@pytest.mark.parametrize("mode", ["arithmetic", "geometric"])
def test_bf16_members(mode):
    g = torch.Generator().manual_seed(3)
    s64 = 3 * torch.randn(6, V, generator=g, dtype=torch.float64)
    check("jsd", s64, members_like(s64.shape, 3, seed=4), [0.5, 0.25, 0.25], mode, 1.7, member_dtype=torch.bfloat16)
    check("kd", s64, members_like(s64.shape, 2, seed=5), [0.6, 0.4], mode, member_dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["kd", "reverse_kl", "tvd"])
def test_shifted_and_strided_views(name):
    """HF's ``logits[:, :-1]`` for the student and every member (rows read in place over the gaps), a column
    slice of a wider member, and a member with no unit column stride (copied)."""
    g = torch.Generator().manual_seed(11)
    full = 3 * torch.randn(3, 6, V, generator=g, dtype=torch.float64)
    s64 = full[:, :-1]
    members = members_like((3, 6, V + 7), 3, seed=12)
    weights = [0.3, 0.3, 0.4]
    target = torch.randint(0, V, (3, 5), generator=g)
    target[1, 2] = -100
    shifted = dict(make_student=lambda x: full.float().clone()[:, :-1], target=target, ce_weight=0.5)
    # every member shifted and sliced to V columns: the gapped rows of one stride, read in place
    check(name, s64, members, weights, "arithmetic", 1.4, make_member=lambda m: m[:, :-1, :V], **shifted)
    # a member whose columns are not adjacent (a transposed copy's view): the op copies it
    odd = members[1][:, :-1, :V].float().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert odd.stride(-1) != 1
    mixture = fastkd.TeacherMixture([members[0][:, :-1, :V].float(), odd, members[2][:, :-1, :V].float()], weights,
                                    mode="geometric")
    s = full.float().clone()[:, :-1].requires_grad_()
    got = LOSSES[name](s, mixture, temperature=T, backend="cpu", target=target, ce_weight=0.5)
    ref_s = s64.detach().clone().requires_grad_()
    ref = truth(LOSSES[name], ref_s, [m[:, :-1, :V].float().double() for m in members], weights, "geometric", T,
                target=target, ce_weight=0.5)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    got.backward()
    ref.backward()
    assert rel_norm(s.grad, ref_s.grad) < 1e-5


@pytest.mark.parametrize("name", ["reverse_kl", "jeffreys", "forward_kl"])
def test_log_probs_far_below_float32_exp_range(name):
    """Members whose classes reach log-probs of -300 and below (arithmetic: the log-space sum keeps them; the
    reverse KL weighs them by q)."""
    g = torch.Generator().manual_seed(21)
    s64 = 40 * torch.randn(4, V, generator=g, dtype=torch.float64)
    members = [60 * torch.randn(4, V, generator=g, dtype=torch.float64) for _ in range(2)]
    assert mixture_log_probs(members, [0.5, 0.5], "arithmetic", 1.0).min() < -300
    check(name, s64, members, [0.5, 0.5], "arithmetic", temperature=1.0, tol=2e-5)
    check(name, s64, members, [0.5, 0.5], "geometric", temperature=1.0, tol=2e-5)


def test_one_member_is_that_teacher():
    g = torch.Generator().manual_seed(5)
    s = 2 * torch.randn(7, V, generator=g)
    t = 3 * torch.randn(7, V, generator=g)
    for mode in ("arithmetic", "geometric"):
        got = fastkd.jsd_loss(s, fastkd.TeacherMixture([t], mode=mode), temperature=T, teacher_temperature=1.5,
                              backend="cpu")
        ref = fastkd.jsd_loss(s, t, temperature=T, teacher_temperature=1.5, backend="cpu")
        assert abs(got.item() - ref.item()) <= 2e-6 * abs(ref.item())


def op_args(n=4, k=2, **over):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, V, generator=g)
    members = [torch.randn(n, V, generator=g) for _ in range(k)]
    a = dict(student=s, teacher=members[0], topk_ids=torch.empty(0, dtype=torch.int64),
             target=torch.empty(0, dtype=torch.int64), row_weight=torch.ones(n), temperature=T, kind=0, a=1.0, b=0.0,
             w_p=0.0, w_q=1.0, soft_scale=1.0, ce_weight=0.0, topk_mode=0, reduce=True, grad_student=True,
             grad_teacher=False, teacher_temperature=0.0, teacher_members=members, member_weights=[0.5] * k,
             mixture_mode=1)
    a.update(over)
    return a


def test_the_op_refuses_what_it_does_not_do():
    op = torch.ops.fastkd.divergence_fwd
    member = torch.randn(4, V)
    for over, words in (
            (dict(grad_teacher=True), "constants"),
            (dict(mixture_mode=3), "mixture_mode"),
            (dict(mixture_mode=0), "mixture_mode"),
            (dict(member_weights=[0.5]), "one weight per teacher member"),
            (dict(member_weights=[0.5, 0.0]), "member_weights\\[1\\]"),
            (dict(member_weights=[0.5, float("nan")]), "member_weights\\[1\\]"),
            (dict(teacher_members=[], member_weights=[]), "at least one"),
            (dict(topk_mode=1, teacher=torch.zeros(4, 3), topk_ids=torch.zeros(4, 3, dtype=torch.int64)), "topk_mode"),
    ):
        with pytest.raises(ValueError, match=words):
            op(**op_args(**over))
    with pytest.raises(RuntimeError, match="teacher_members\\[1\\]"):
        op(**op_args(teacher_members=[member, member[:, :-1]]))
    with pytest.raises(RuntimeError, match="teacher_members\\[0\\]"):
        op(**op_args(teacher_members=[member.to(torch.int32), member]))


def test_the_op_matches_the_loss_and_no_mixture_is_unchanged():
    a = op_args(k=3, member_weights=[0.2, 0.3, 0.5], mixture_mode=2, teacher_temperature=1.25)
    loss, soft, hard, gs, gt = torch.ops.fastkd.divergence_fwd(**a)
    assert gt.numel() == 0 and gs.shape == a["student"].shape
    ref = truth(LOSSES["forward_kl"], a["student"].double(), a["teacher_members"], [0.2, 0.3, 0.5], "geometric", T,
                1.25, reduction="sum")
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    plain = dict(a, teacher_members=[], member_weights=[], mixture_mode=0)
    defaults = {k: plain[k] for k in plain if k not in ("teacher_members", "member_weights", "mixture_mode")}
    x = torch.ops.fastkd.divergence_fwd(**plain)
    y = torch.ops.fastkd.divergence_fwd(**defaults)
    assert torch.equal(x[0], y[0]) and torch.equal(x[3], y[3])


def test_triton_refuses_a_mixture_in_its_op():
    pytest.importorskip("triton")
    from fastkd.triton.divergence import divergence_fwd

    with pytest.raises(ValueError, match="teacher mixture"):
        divergence_fwd(**op_args())


def test_cuda_refuses_a_mixture_in_its_op():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    skip_unless_runs("forward_kl", "cuda")
    args = op_args()
    args = {k: (x.cuda() if isinstance(x, torch.Tensor) else x) for k, x in args.items()}
    args["teacher_members"] = [m.cuda() for m in args["teacher_members"]]
    with pytest.raises(ValueError, match="teacher mixture"):
        torch.ops.fastkd.divergence_fwd(**args)


@pytest.mark.parametrize("mode", ["arithmetic", "geometric"])
def test_a_member_without_a_finite_logit_gives_nan_as_the_reference(mode):
    """A member row of -inf only has no distribution: that row's loss is NaN in the op, as in the reference and the
    block path (the op once dropped the member from the arithmetic mixture); the other rows are unaffected."""
    skip_unless_runs("forward_kl", "cpu")
    g = torch.Generator().manual_seed(21)
    s, a, b = (torch.randn(3, 40, generator=g) for _ in range(3))
    b[1] = float("-inf")
    got = fastkd.jsd_loss(s, fastkd.TeacherMixture([a, b], [0.4, 0.6], mode=mode), reduction="none", backend="cpu")
    want = fastkd.jsd_loss(s.double(), fastkd.TeacherMixture([a.double(), b.double()], [0.4, 0.6], mode=mode),
                           reduction="none", backend="reference")
    assert torch.isnan(got[1]) and torch.isnan(want[1])
    torch.testing.assert_close(got[[0, 2]].double(), want[[0, 2]], rtol=2e-5, atol=1e-7)


def test_weights_outside_float32_are_refused_by_name():
    """Geometric weights are used as given: 1e-50 is 0 in float32 (0 * -inf: a NaN row), 1e39 inf."""
    skip_unless_runs("forward_kl", "cpu")
    g = torch.Generator().manual_seed(22)
    s, a, c = (torch.randn(2, 30, generator=g) for _ in range(3))
    c[0, 5] = float("-inf")
    for w in (1e-50, 1e39):
        with pytest.raises(ValueError, match="member_weights"):
            fastkd.jsd_loss(s, fastkd.TeacherMixture([a, c], [1.0, w], mode="geometric"), backend="cpu")
