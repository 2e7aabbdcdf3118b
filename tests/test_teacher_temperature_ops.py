"""``teacher_temperature`` as the row ops' own argument (``divergence_fwd``, ``akl_fwd``; docs/design.md):
``p = softmax(t / T_t)``, ``q = softmax(s / T)``, the teacher's gradient at ``T_t``. Every kind on every fused
backend against a float64 oracle (the reference at ``T`` on ``t (T / T_t)``, the teacher's gradient through
that product: ``T / T_t`` times the reference's), rows wider than one block with a ragged tail, bf16,
non-contiguous rows, CE with ignore_index; ``T_t == T`` is the default call bit for bit; bad values raise."""
import pytest
import torch

import fastkd
from backend_cases import FUSED, skip_unless_runs
from fastkd.core.divergence import divergence_op_args
from fastkd.dispatch.backend import ROW_OPS, implementation
from fastkd.losses import teacher_blocks

LOSSES = {
    "forward_kl": (fastkd.forward_kl_loss, {}),
    "reverse_kl": (fastkd.reverse_kl_loss, {}),
    "jsd": (fastkd.jsd_loss, {"beta": 0.3}),
    "skew_kl": (fastkd.skew_kl_loss, {"skew": 0.1}),
    "skew_kl_reverse": (fastkd.skew_kl_loss, {"skew": 0.2, "reverse": True}),
    "tvd": (fastkd.tvd_loss, {}),
    "jeffreys": (fastkd.jeffreys_loss, {}),
    "triangular": (fastkd.triangular_loss, {}),
    "entropy_gated_kl": (fastkd.entropy_gated_kl_loss, {"tau": 0.6, "scale": 0.2}),
    "alpha_divergence": (fastkd.alpha_divergence_loss, {"alpha": 0.3}),
    "ab_divergence": (fastkd.ab_divergence_loss, {"alpha": 0.2, "beta": 0.7}),
    "renyi": (fastkd.renyi_loss, {"order": 0.5}),
    "renyi_reverse": (fastkd.renyi_loss, {"order": 1.5, "reverse": True}),
    "akl": (fastkd.akl_loss, {"mu": 0.6}),
    "kd": (lambda s, t, temperature, **kw: fastkd.kd_loss(s, t, temperature, **kw), {}),
}
# (op kind name, op params) of each loss, for the direct op calls
OP_KINDS = {
    "forward_kl": ("forward_kl", {}), "reverse_kl": ("reverse_kl", {}), "jsd": ("jsd", {"beta": 0.3}),
    "skew_kl": ("skew_kl", {"skew": 0.1}), "skew_kl_reverse": ("skew_kl", {"skew": 0.2, "reverse": True}),
    "tvd": ("tvd", {}), "jeffreys": ("jeffreys", {}), "triangular": ("triangular", {}),
    "entropy_gated_kl": ("entropy_gated_kl", {"tau": 0.6, "scale": 0.2}),
    "alpha_divergence": ("alpha_divergence", {"alpha": 0.3}),
    "ab_divergence": ("ab_divergence", {"alpha": 0.2, "beta": 0.7}), "renyi": ("renyi", {"order": 0.5}),
    "renyi_reverse": ("renyi", {"order": 1.5, "reverse": True}), "akl": ("akl", {"mu": 0.6}),
}


def rel_norm(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def oracle(name, s64, t64, temperature, teacher_temperature, **kw):
    """The float64 reference at ``T`` on ``t (T / T_t)``: ``softmax(t (T / T_t) / T) = softmax(t / T_t)``;
    autograd takes the teacher's gradient through the product (``T / T_t`` times the reference's)."""
    fn, params = LOSSES[name]
    return fn(s64, t64 * (temperature / teacher_temperature), temperature=temperature, backend="reference",
              **params, **kw)


def fused(name, s, t, temperature, teacher_temperature, backend, **kw):
    fn, params = LOSSES[name]
    return fn(s, t, temperature=temperature, teacher_temperature=teacher_temperature, backend=backend, **params,
              **kw)


def check_against_oracle(name, backend, s64, t64, view, temperature, teacher_temperature, dtype, tol, **kw):
    """Loss and both gradients of the fused call on ``view(leaf)`` (leaves of ``dtype`` on the backend's
    device) against the oracle on ``view`` of the float64 leaves holding the same values."""
    device = skip_unless_runs("akl" if name == "akl" else "forward_kl", backend)
    s = s64.to(dtype).to(device).requires_grad_()
    t = t64.to(dtype).to(device).requires_grad_()
    rs = s.detach().double().cpu().requires_grad_()
    rt = t.detach().double().cpu().requires_grad_()
    dev_kw = {k: (x.to(device) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
    got = fused(name, view(s), view(t), temperature, teacher_temperature, backend, **dev_kw)
    want = oracle(name, view(rs), view(rt), temperature, teacher_temperature, **kw)
    assert abs(got.item() - want.item()) <= tol * abs(want.item()) + 1e-6, (got.item(), want.item())
    go = 0.7
    (got * go).backward()
    (want * go).backward()
    assert rel_norm(s.grad.cpu(), rs.grad) < tol
    assert rel_norm(t.grad.cpu(), rt.grad) < tol


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("width, temperature, teacher_temperature", [(2053, 2.0, 0.7), (4099, 1.0, 3.0)])
def test_every_kind_matches_the_oracle(backend, name, width, temperature, teacher_temperature):
    """float32 rows wider than one block (a ragged tail), CE with an ignored row; a sharper and a flatter
    teacher than the student (T_t < T at T = 2, T_t > T at T = 1: the CE's two paths)."""
    g = torch.Generator().manual_seed(width)
    s64 = 3 * torch.randn(4, width, generator=g, dtype=torch.float64)
    t64 = 3 * torch.randn(4, width, generator=g, dtype=torch.float64)
    target = torch.randint(0, width, (4,), generator=g)
    target[2] = -100
    check_against_oracle(name, backend, s64, t64, lambda x: x, temperature, teacher_temperature, torch.float32,
                         1e-5, target=target, ce_weight=0.3)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_shifted_rows_and_a_column_slice(backend, name):
    """bf16 logits read through HF's shift (``[:, :-1]`` of ``[B, S, V]``: rows one stride apart with gaps)
    of a column slice (row stride past the width), reduction="sum" and sample weights."""
    g = torch.Generator().manual_seed(3)
    width = 2053
    s64 = 3 * torch.randn(2, 5, width + 11, generator=g, dtype=torch.float64)
    t64 = 3 * torch.randn(2, 5, width + 11, generator=g, dtype=torch.float64)
    weight = torch.rand(2, 4, generator=g) + 0.5
    check_against_oracle(name, backend, s64, t64, lambda x: x[:, :-1, :width], 2.0, 1.3, torch.bfloat16, 1e-2,
                         sample_weight=weight, reduction="sum")


@pytest.mark.parametrize("backend", FUSED)
def test_the_route_is_one_op_call(backend, monkeypatch):
    """Dense logits at their own temperature run the row op once, with the argument (no teacher blocks)."""
    device = skip_unless_runs("forward_kl", backend)
    monkeypatch.setattr(teacher_blocks, "_run_blocks", lambda *a, **k: pytest.fail("teacher blocks used"))
    g = torch.Generator().manual_seed(4)
    s = torch.randn(3, 7, 301, generator=g).to(device).requires_grad_()
    t = torch.randn(3, 7, 301, generator=g).to(device).requires_grad_()
    for loss in (fastkd.jsd_loss(s, t, temperature=2.0, teacher_temperature=1.5, backend=backend),
                 fastkd.kd_loss(s, t, 2.0, teacher_temperature=1.5, backend=backend),
                 fastkd.akl_loss(s, t, temperature=2.0, teacher_temperature=1.5, backend=backend)):
        loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


def op_outputs(backend, name, s, t, target, temperature, ids=None, mode=0, **own_t):
    kind, params = OP_KINDS[name]
    code, *coefficients = divergence_op_args(kind, **params)
    op = getattr(implementation(backend), ROW_OPS.get(kind, "divergence_fwd"))
    ids = torch.empty(0, dtype=torch.int64, device=s.device) if ids is None else ids
    weight = torch.tensor([1.0, 0.5, 0.0, 2.0], device=s.device)
    return op(s, t, ids, target, weight, temperature, code, *coefficients, 1.5, 0.25, mode, False, True,
              mode == 0, **own_t)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", list(OP_KINDS))
def test_teacher_temperature_equal_to_temperature_is_the_default_exactly(backend, name):
    device = skip_unless_runs("akl" if name == "akl" else "forward_kl", backend)
    g = torch.Generator().manual_seed(5)
    s = (3 * torch.randn(4, 2101, generator=g)).to(device)
    t = (3 * torch.randn(4, 2101, generator=g)).to(device)
    target = torch.randint(0, 2101, (4,), generator=g).to(device)
    for temperature in (1.0, 2.5):
        default = op_outputs(backend, name, s, t, target, temperature)
        same = op_outputs(backend, name, s, t, target, temperature, teacher_temperature=temperature)
        zero = op_outputs(backend, name, s, t, target, temperature, teacher_temperature=0.0)
        for a, b, c in zip(default, same, zero):
            assert torch.equal(a, b) and torch.equal(a, c)
        other = op_outputs(backend, name, s, t, target, temperature, teacher_temperature=temperature * 1.5)
        assert not torch.equal(default[4], other[4])  # the argument is read


@pytest.mark.parametrize("backend", FUSED)
def test_bad_teacher_temperatures_raise(backend):
    device = skip_unless_runs("akl", backend)
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(4, 50, generator=g).to(device), torch.randn(4, 50, generator=g).to(device)
    target = torch.randint(0, 50, (4,), generator=g).to(device)
    for name in ("jsd", "akl"):
        for bad in (-1.0, float("nan"), float("inf"), float("-inf")):
            with pytest.raises((ValueError, RuntimeError), match="teacher_temperature"):
                op_outputs(backend, name, s, t, target, 2.0, teacher_temperature=bad)
    # a top-k teacher's log-probs are taken as given: only 0 or the temperature itself
    lp, ids = torch.log_softmax(t / 2.0, -1).topk(5, dim=-1)
    with pytest.raises((ValueError, RuntimeError), match="teacher_temperature"):
        op_outputs(backend, "forward_kl", s, lp, target, 2.0, ids=ids, mode=1, teacher_temperature=1.0)
    default = op_outputs(backend, "forward_kl", s, lp, target, 2.0, ids=ids, mode=1)
    same = op_outputs(backend, "forward_kl", s, lp, target, 2.0, ids=ids, mode=1, teacher_temperature=2.0)
    for a, b in zip(default, same):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd", "entropy_gated_kl", "renyi", "akl", "kd"])
def test_large_logit_offsets(backend, name):
    """Nets at large and different offsets (+-1e4: the logits' float32 spacing is 1e-3): each maximum is
    taken off in raw units before either temperature scales it."""
    g = torch.Generator().manual_seed(7)
    s64 = (3 * torch.randn(3, 2053, generator=g, dtype=torch.float64) - 1e4).float().double()
    t64 = (3 * torch.randn(3, 2053, generator=g, dtype=torch.float64) + 1e4).float().double()
    check_against_oracle(name, backend, s64, t64, lambda x: x, 2.0, 0.5, torch.float32, 1e-5)


@pytest.mark.parametrize("name", ["jsd", "akl"])
def test_opcheck_with_the_argument(name):
    """The schema's keyword, the fake (meta) implementation and the autograd registration agree with the
    CPU kernel (torch.library.opcheck; the compiled ops: Triton's opcheck does not run under the interpreter)."""
    skip_unless_runs("akl", "cpu")
    g = torch.Generator().manual_seed(8)
    s = torch.randn(4, 9, generator=g, requires_grad=True)
    t = torch.randn(4, 9, generator=g, requires_grad=True)
    kind, params = OP_KINDS[name]
    code, *coefficients = divergence_op_args(kind, **params)
    op = getattr(torch.ops.fastkd, ROW_OPS.get(kind, "divergence_fwd")).default
    args = (s, t, torch.empty(0, dtype=torch.int64), torch.tensor([1, 8, 0, 3]), torch.tensor([0.25, 0.0, 0.5, 0.25]),
            2.0, code, *coefficients, 1.0, 0.5, 0, False, True, True)
    torch.library.opcheck(op, args, {"teacher_temperature": 0.6})
