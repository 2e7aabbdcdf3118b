"""Real training conditions (issue 24): grad mode, autocast, low-precision weights, torch.compile, the torch
version the code needs. Each test is written to fail on the behaviour it guards against."""
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.dispatch import ops as _ops
from fastkd.losses import fused_linear as FL
from fastkd.losses import fused_linear_chunks as FLC
from fastkd.reference import divergence as R

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
needs_cpu_ops = pytest.mark.skipif(_ops.LOAD_ERROR is not None, reason="fastkd._C not built")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def head_data(n=37, h=24, v=300, ht=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.4,
            torch.randn(n, ht, generator=g), torch.randn(v, ht, generator=g) * 0.5,
            torch.randint(0, v, (n,), generator=g))


def composition64(h, w, th, tw, target, temperature=2.0, ce_weight=0.3):
    """The unfused forward KL + CE in float64 of exactly the given values."""
    s, t = h.double() @ w.double().T, th.double() @ tw.double().T
    return R.compute(s, t, temperature, "batchmean", target, -100, None, ce_weight, False, "forward_kl",
                     scale_t2=True)


# ----------------------------------------------------------------------------
# the fused head
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ("no_grad", "inference_mode"))
@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_fused_head_without_grad_mode_runs_the_forward_only(monkeypatch, mode, backend):
    """Evaluation with lm_head.weight.requires_grad=True: no gradient matmul, no [V, H] gradient."""
    if backend == "cpu" and _ops.LOAD_ERROR is not None:
        pytest.skip("fastkd._C not built")
    h, w, th, tw, target = head_data()
    h.requires_grad_(), w.requires_grad_()
    calls = []

    def recording(plan, row_weight, want_grad, reduce):
        calls.append((want_grad, plan.needs))
        return FLC.run_chunks(plan, row_weight, want_grad, reduce)

    def no_weight_grad(*args, **kwargs):
        raise AssertionError("a weight-gradient matmul ran without grad mode")

    monkeypatch.setattr(FL, "run_chunks", recording)
    monkeypatch.setattr(FLC, "_accumulate_weight_grad", no_weight_grad)
    guard = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with guard:
        loss = fastkd.fused_linear_kd_loss(h, w, (th, tw), target, ce_weight=0.3, chunk_size=8, backend=backend)
    assert calls == [(False, (False, False, False))]
    assert loss.grad_fn is None
    want = composition64(h.detach(), w.detach(), th, tw, target, temperature=1.0)
    assert abs(loss.item() - want.item()) < 1e-5 * abs(want.item())


@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize("chunk_size", (8, None))
def test_fused_head_under_autocast_keeps_float32_logits(backend, chunk_size):
    """torch.autocast(bfloat16) with float32 weights: the matmul inputs are rounded to bf16 (as the unfused
    lm_head's), the logits and sums stay float32: loss and gradients equal float64 of the rounded inputs to
    float32 rounding (bf16 logits would be off by about 1e-4 relative)."""
    if backend == "cpu" and _ops.LOAD_ERROR is not None:
        pytest.skip("fastkd._C not built")
    h, w, th, tw, target = head_data(seed=1)
    h, w = (h * 4).requires_grad_(), w.requires_grad_()  # logits of about +-10: bf16 logits would be off
    th = th * 4  # by 6e-5 relative in the loss here, float32 logits by 2e-7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastkd.fused_linear_kd_loss(h, w, (th, tw), target, temperature=2.0, ce_weight=0.3,
                                           chunk_size=chunk_size, backend=backend)
    assert loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert gh.dtype == gw.dtype == torch.float32  # the weights' dtype, summed in float32
    bf = [x.detach().bfloat16().double().requires_grad_() for x in (h, w)]
    want = composition64(bf[0], bf[1], th.bfloat16(), tw.bfloat16(), target)
    want_gh, want_gw = torch.autograd.grad(want, bf)
    assert abs(loss.item() - want.item()) < 2e-6 * abs(want.item()), (loss.item(), want.item())
    assert rel(gh, want_gh) < 1e-5 and rel(gw, want_gw) < 1e-5


def _weight_grad_error(chunk_size, device, dtype):
    h, w, th, tw, target = head_data(n=416, h=64, v=512, ht=64, seed=2)
    h, w = (x.to(device=device, dtype=dtype).requires_grad_() for x in (h, w))
    th, tw, target = th.to(device=device, dtype=dtype), tw.to(device=device, dtype=dtype), target.to(device)
    loss = fastkd.fused_linear_kd_loss(h, w, (th, tw), target, temperature=2.0, ce_weight=0.3,
                                       chunk_size=chunk_size)
    (gw,) = torch.autograd.grad(loss, [w])
    ref = [x.detach().double().requires_grad_() for x in (h, w)]
    (want,) = torch.autograd.grad(composition64(ref[0], ref[1], th, tw, target), [ref[1]])
    return rel(gw, want)


@pytest.mark.parametrize("device", ("cpu", pytest.param("cuda", marks=pytest.mark.gpu)))
def test_bf16_weight_gradient_sums_in_float32_over_many_chunks(device):
    """52 chunks round the running weight-gradient sum 52 times in bf16; in float32 the error is one GEMM's."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    one = _weight_grad_error(None, device, torch.bfloat16)
    many = _weight_grad_error(8, device, torch.bfloat16)
    assert many < 1.5 * one + 1e-3, (one, many)


@needs_cpu_ops
def test_fused_linear_op_opcheck():
    h, w, th, tw, target = head_data(n=9, v=40)
    h, w = h.requires_grad_(), w.requires_grad_()
    row_weight = torch.full((9,), 1 / 9)
    args = (h, w, None, th, tw, None, None, None, target, row_weight, "cpu", 4, 0, None, None, None, 2.0, 1.5,
            0, 1.0, 0.0, 0.0, 1.0, 4.0, 0.3, 0, True, False, False, True, True, False)
    torch.library.opcheck(torch.ops.fastkd.fused_linear_fwd.default, args)


# ----------------------------------------------------------------------------
# torch.compile(fullgraph=True): every public loss, forward and backward, equal to eager
# ----------------------------------------------------------------------------

def _loss_cases():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 33, generator=g), torch.randn(2, 5, 33, generator=g)
    y = torch.randint(0, 33, (2, 5), generator=g)
    y[0, 1] = -100
    topk = fastkd.TopKTeacher.from_logits(t, 4)
    vocab_map = fastkd.VocabMap(torch.where(torch.arange(29) % 5 == 0, -1, torch.arange(29)), 33)  # 29 -> 33 ids
    h, w, th, tw, target = head_data(n=10, v=33)
    feat_t = torch.randn(2, 3, 4, 4, generator=g)
    gen = torch.nn.Conv2d(3, 3, 1)
    cases = {
        "kd": lambda s: fastkd.kd_loss(s, t, 2.0, target=y, ce_weight=0.2),
        "kd_topk": lambda s: fastkd.kd_loss(s, topk, 1.0, target=y),
        "dkd": lambda s: fastkd.dkd_loss(s, t, y.clamp_min(0)),
        "ats": lambda s: fastkd.ats_loss(s, t, y.clamp_min(0), ce_weight=0.5),
        "dist": lambda s: fastkd.dist_loss(s, t),
        "forward_kl": lambda s: fastkd.forward_kl_loss(s, t, target=y),
        "reverse_kl": lambda s: fastkd.reverse_kl_loss(s, t, temperature=1.5, target=y, ce_weight=0.1),
        "jsd": lambda s: fastkd.jsd_loss(s, t, beta=0.3, reduction="sum"),
        "skew_kl": lambda s: fastkd.skew_kl_loss(s, t, skew=0.2, reverse=True),
        "tvd": lambda s: fastkd.tvd_loss(s, t, reduction="none").sum(),
        "jeffreys": lambda s: fastkd.jeffreys_loss(s, t, target=y, ce_weight=0.1),
        "triangular": lambda s: fastkd.triangular_loss(s, t, temperature=2.0),
        "entropy_gated_kl": lambda s: fastkd.entropy_gated_kl_loss(s, t, tau=0.6, target=y),
        "akl": lambda s: fastkd.akl_loss(s, t, mu=0.4, target=y, ce_weight=0.1),
        "akl_topk": lambda s: fastkd.akl_loss(s, topk, mu=0.4),
        "alpha_divergence": lambda s: fastkd.alpha_divergence_loss(s, t, alpha=0.3, reduction="sum"),
        "ab_divergence": lambda s: fastkd.ab_divergence_loss(s, t, alpha=0.2, beta=0.7, target=y),
        "renyi": lambda s: fastkd.renyi_loss(s, t, order=0.5, reverse=True),
        "kd_teacher_temperature": lambda s: fastkd.kd_loss(s, t, 2.0, teacher_temperature=1.5),
        "mixture": lambda s: fastkd.jsd_loss(s, fastkd.TeacherMixture([t, t.flip(-1)], [0.3, 0.7])),
        "uld": lambda s: fastkd.uld_loss(s, t[..., :29], target=y, ce_weight=0.1),
        "hybrid_uld": lambda s: fastkd.hybrid_uld_loss(s, t[..., :29], vocab_map, target=y),
        "mapped_teacher": lambda s: fastkd.forward_kl_loss(s, fastkd.MappedTeacher(t[..., :29], vocab_map)),
        "fused_linear": lambda s: fastkd.fused_linear_kd_loss(h, w, (th, tw), target, ce_weight=0.2, chunk_size=4)
        + s.sum() * 0,
        "mgd": lambda s: fastkd.mgd_loss(s.reshape(2, 5, 33)[:, :3, :16].reshape(2, 3, 4, 4), feat_t, gen, seed=11,
                                         mask_ratio=0.5),
        "simkd": lambda s: fastkd.simkd_loss(s, t),
        "ipw_weighted_kd": lambda s: fastkd.kd_loss(s, t, target=y, sample_weight=fastkd.ipw_weights(s, t, y)),
    }
    return s, cases


@needs_cpu_ops
@pytest.mark.parametrize("loss", list(_loss_cases()[1]))
def test_every_public_loss_compiles_with_a_full_graph(loss):
    s, cases = _loss_cases()
    fn = cases[loss]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    results = []
    for f in (fn, compiled):
        x = s.clone().requires_grad_()
        out = f(x)
        (g,) = torch.autograd.grad(out, [x])
        results.append((out.detach(), g))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@needs_cpu_ops
def test_fused_head_compiles_with_a_full_graph_with_its_gradients():
    h, w, th, tw, target = head_data(n=10, v=33)

    def step(h, w):
        return fastkd.fused_linear_kd_loss(h, w, (th, tw), target, temperature=2.0, ce_weight=0.2, chunk_size=4)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    got = []
    for f in (step, compiled):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = f(hh, ww)
        got.append((out.detach(), *torch.autograd.grad(out, [hh, ww])))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# the declared torch minimum is the one the code needs
# ----------------------------------------------------------------------------

# What the code uses, and the first torch release that has it.
TORCH_FEATURES = {
    "torch.mm / torch.addmm with out_dtype (the fused head's bf16 matmuls on CUDA)": (2, 8),
    "torch.library.triton_op / wrap_triton (the Triton backend)": (2, 6),
    "torch.library.custom_op, register_fake, register_autograd (the fused head's op)": (2, 4),
    "torch.get_autocast_dtype(device_type) (the fused head under autocast)": (2, 4),
}


def _declared_minimums():
    found = {}
    for path in ("pyproject.toml", "scripts/setup.sh"):
        for match in re.finditer(r"torch>=(\d+)\.(\d+)", (ROOT / path).read_text()):
            found.setdefault(path, set()).add((int(match.group(1)), int(match.group(2))))
    return found


def test_declared_torch_minimum_is_what_the_code_needs():
    found = _declared_minimums()
    assert set(found) == {"pyproject.toml", "scripts/setup.sh"}, found
    declared = {v for versions in found.values() for v in versions}
    assert len(declared) == 1, f"the files declare different torch minimums: {found}"
    (minimum,) = declared
    too_new = {name: v for name, v in TORCH_FEATURES.items() if v > minimum}
    assert not too_new, f"torch>={minimum[0]}.{minimum[1]} is declared, but the code needs {too_new}"
    installed = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= minimum


def test_installed_torch_has_every_feature_the_code_uses():
    schemas = [str(s) for s in torch._C._jit_get_schemas_for_operator("aten::addmm")]
    assert any("out_dtype" in s for s in schemas), "torch.addmm(out_dtype=) is missing"
    assert any("out_dtype" in str(s) for s in torch._C._jit_get_schemas_for_operator("aten::mm"))
    assert hasattr(torch.library, "triton_op") and hasattr(torch.library, "custom_op")
    assert torch.get_autocast_dtype("cpu") in (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------
# every weight of a loss term is validated the same way: a finite number >= 0, named in the message
# ----------------------------------------------------------------------------

def _negative_weight_calls():
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    y = torch.tensor([1, 2, 3, 4])
    feat = torch.randn(2, 3, 4, 4)
    h, w, th, tw, target = head_data(n=4, v=9)
    return {
        "kd ce_weight": ("ce_weight", lambda: fastkd.kd_loss(s, t, target=y, ce_weight=-1.0)),
        "jsd ce_weight": ("ce_weight", lambda: fastkd.jsd_loss(s, t, target=y, ce_weight=-0.5)),
        "forward_kl ce_weight": ("ce_weight", lambda: fastkd.forward_kl_loss(s, t, target=y, ce_weight=-1e-3)),
        "reference ce_weight": ("ce_weight", lambda: fastkd.reference.tvd_loss(s, t, target=y, ce_weight=-1.0)),
        "dkd alpha": ("alpha", lambda: fastkd.dkd_loss(s, t, y, alpha=-1.0)),
        "dkd beta": ("beta", lambda: fastkd.dkd_loss(s, t, y, beta=-8.0)),
        "dkd ce_weight": ("ce_weight", lambda: fastkd.dkd_loss(s, t, y, ce_weight=-1.0)),
        "ats ce_weight": ("ce_weight", lambda: fastkd.ats_loss(s, t, y, ce_weight=-1.0)),
        "dist beta": ("beta", lambda: fastkd.dist_loss(s, t, beta=-1.0)),
        "dist gamma": ("gamma", lambda: fastkd.dist_loss(s, t, gamma=-2.0)),
        "mgd alpha": ("alpha", lambda: fastkd.mgd_loss(feat, feat, torch.nn.Identity(), alpha=-1.0)),
        "fused head ce_weight": ("ce_weight", lambda: fastkd.fused_linear_kd_loss(h, w, (th, tw), target,
                                                                                   ce_weight=-0.1)),
        "DKDLoss alpha": ("alpha", lambda: fastkd.nn.DKDLoss(alpha=-1.0)),
        "DISTLoss gamma": ("gamma", lambda: fastkd.nn.DISTLoss(gamma=-1.0)),
        "KDLoss ce_weight": ("ce_weight", lambda: fastkd.nn.KDLoss(ce_weight=-1.0)),
        "FusedLinearKDLoss ce_weight": ("ce_weight", lambda: fastkd.nn.FusedLinearKDLoss(ce_weight=-1.0)),
    }


@pytest.mark.parametrize("case", list(_negative_weight_calls()))
def test_negative_weights_are_rejected_by_name(case):
    name, call = _negative_weight_calls()[case]
    with pytest.raises(ValueError, match=f"{name} must be >= 0"):
        call()


# ----------------------------------------------------------------------------
# dense teacher logits wider than the student's (a teacher head padded past the tokenizer)
# ----------------------------------------------------------------------------

# the divergences added after the first six (issue 22), for the tables below
NEWER = {
    "jeffreys": fastkd.jeffreys_loss,
    "triangular": fastkd.triangular_loss,
    "entropy_gated_kl": lambda s, t, **kw: fastkd.entropy_gated_kl_loss(s, t, tau=0.6, scale=0.2, **kw),
    "akl": lambda s, t, **kw: fastkd.akl_loss(s, t, mu=0.4, **kw),
    "alpha_divergence": lambda s, t, **kw: fastkd.alpha_divergence_loss(s, t, alpha=0.3, **kw),
    "ab_divergence": lambda s, t, **kw: fastkd.ab_divergence_loss(s, t, alpha=0.2, beta=0.7, **kw),
    "renyi": lambda s, t, **kw: fastkd.renyi_loss(s, t, order=0.5, **kw),
}

DENSE = {
    "kd": lambda s, t, **kw: fastkd.kd_loss(s, t, 2.0, **kw),
    "forward_kl": fastkd.forward_kl_loss,
    "reverse_kl": fastkd.reverse_kl_loss,
    "jsd": lambda s, t, **kw: fastkd.jsd_loss(s, t, beta=0.3, **kw),
    "tvd": fastkd.tvd_loss,
    **NEWER,
}


@pytest.mark.parametrize("loss", list(DENSE))
@pytest.mark.parametrize("backend", ("reference", "cpu", "triton"))
def test_wider_teacher_logits_truncate_or_mask(loss, backend):
    from backend_cases import skip_unless_runs

    skip_unless_runs("kd" if loss == "kd" else loss, backend)
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 40, generator=g), torch.randn(6, 45, generator=g)
    t[:, 40:] -= 3.0  # some teacher mass past V: "mask" and "truncate" differ
    y = torch.randint(0, 40, (6,), generator=g)
    fn = DENSE[loss]
    for mode in ("truncate", "mask"):
        x = s.clone().requires_grad_()
        tt = t.clone().requires_grad_()
        got = fn(x, tt, target=y, ce_weight=0.2, reduction="mean", teacher_vocab=mode, backend=backend)
        xr, tr = s.double().requires_grad_(), t.double().requires_grad_()
        if mode == "truncate":  # the teacher over the first V columns, renormalised
            want = fn(xr, tr[:, :40], target=y, ce_weight=0.2, reduction="mean", backend="reference")
        else:  # the student padded with -inf (no mass) to V_t
            want = fn(F.pad(xr, (0, 5), value=-math.inf), tr, target=y, ce_weight=0.2, reduction="mean",
                      backend="reference")
        if not torch.isfinite(want):
            assert got.item() == want.item(), (mode, got, want)
            continue
        torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=1e-7)
        gs, gt = torch.autograd.grad(got, [x, tt])
        ws, wt = torch.autograd.grad(want, [xr, tr])
        assert gs.shape == s.shape and gt.shape == t.shape
        assert rel(gs, ws) < 1e-5 and rel(gt, wt) < 1e-5
        if mode == "truncate":
            assert (gt[:, 40:] == 0).all()
    with pytest.raises(ValueError, match="teacher_vocab must be one of"):
        fn(s, t, teacher_vocab="drop", backend=backend)


# ----------------------------------------------------------------------------
# row slices reach the row op as views, not copies
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_row_slices_reach_the_row_op_without_a_copy(monkeypatch, backend):
    """A shifted 2-D view (``logits[:-1]``) and a truncated wider teacher (``teacher[..., :V]``) are passed to
    ``divergence_fwd`` in place: the op sees tensors inside the inputs' storage."""
    from backend_cases import skip_unless_runs
    from fastkd.dispatch import backend as _backend
    from fastkd.losses import divergence as D

    skip_unless_runs("reverse_kl", backend)
    impl = _backend.implementation(backend)
    seen = []

    class Recording:
        def divergence_fwd(self, s, t, *args):
            seen.append((s.data_ptr(), s.stride(), t.data_ptr(), t.stride()))
            return impl.divergence_fwd(s, t, *args)

    monkeypatch.setattr(D, "implementation", lambda name: Recording())
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(9, 50, generator=g, requires_grad=True)
    teacher = torch.randn(9, 64, generator=g)  # a head padded past V = 50
    labels = torch.randint(0, 50, (9,), generator=g)
    s, t = logits[:-1], teacher[1:]  # HF-style shift on 2-D rows; t wider: truncated to [..., :50]
    loss = fastkd.reverse_kl_loss(s, t, target=labels[1:], ce_weight=0.1, backend=backend)
    want = fastkd.reverse_kl_loss(s.detach().double(), t[..., :50].double(), target=labels[1:], ce_weight=0.1,
                                  backend="reference")
    assert abs(loss.item() - want.item()) < 1e-5 * abs(want.item())
    (s_ptr, s_stride, t_ptr, t_stride), = seen
    assert s_ptr == logits.data_ptr() and s_stride == (50, 1)
    assert t_ptr == teacher.data_ptr() + 64 * teacher.element_size() and t_stride == (64, 1)
    (grad,) = torch.autograd.grad(loss, [logits])
    assert (grad[-1] == 0).all() and torch.isfinite(grad).all()


def test_mgd_seed_pins_the_mask_on_every_path():
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    gen = torch.nn.Conv2d(3, 3, 1)
    want = fastkd.reference.mgd_loss(s, t, gen, seed=123, mask_ratio=0.5)
    for backend in ("auto", "reference"):
        got = fastkd.mgd_loss(s, t, gen, seed=123, mask_ratio=0.5, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert fastkd.mgd_loss(s, t, gen, seed=124, mask_ratio=0.5).item() != want.item()
    with pytest.raises(ValueError, match="seed must be in"):
        fastkd.mgd_loss(s, t, gen, seed=-1)


@pytest.mark.parametrize("module,functional", [
    (fastkd.nn.KDLoss, lambda s, t, **kw: fastkd.kd_loss(s, t, 4.0, **kw)),
    (fastkd.nn.ForwardKLLoss, fastkd.forward_kl_loss),
    (fastkd.nn.JSDLoss, fastkd.jsd_loss),
    (fastkd.nn.TVDLoss, fastkd.tvd_loss),
])
def test_modules_take_teacher_vocab(module, functional):
    s, t = torch.randn(3, 10), torch.randn(3, 12)
    for mode in ("truncate", "mask"):
        assert torch.equal(module(teacher_vocab=mode)(s, t), functional(s, t, teacher_vocab=mode))
    with pytest.raises(ValueError, match="teacher_vocab must be one of"):
        module(teacher_vocab="x")


SHIFTED = {
    "kd": lambda s, t, **kw: fastkd.kd_loss(s, t, 2.0, **kw),
    "forward_kl": fastkd.forward_kl_loss,
    "reverse_kl": fastkd.reverse_kl_loss,
    "jsd": lambda s, t, **kw: fastkd.jsd_loss(s, t, beta=0.3, **kw),
    "skew_kl": lambda s, t, **kw: fastkd.skew_kl_loss(s, t, skew=0.2, **kw),
    "tvd": fastkd.tvd_loss,
    **NEWER,
}


@pytest.mark.parametrize("loss", list(SHIFTED))
@pytest.mark.parametrize("backend", ("cpu", "triton"))
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_hf_shifted_logits_run_in_place(monkeypatch, loss, backend, reduction):
    """``loss(logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:])`` as every causal-LM trainer calls it: the row
    op reads the unshifted tensors in place (the gap rows between sequences weighted 0 and never read: NaN there
    changes nothing), and value and gradients equal float64."""
    from backend_cases import skip_unless_runs
    from fastkd.dispatch import backend as _backend
    from fastkd.losses import divergence as D

    skip_unless_runs("kd+ce" if loss == "kd" else loss, backend)
    impl = _backend.implementation(backend)
    seen = []

    class Recording:
        def divergence_fwd(self, s, t, *args):
            seen.append((s.data_ptr(), t.data_ptr()))
            return impl.divergence_fwd(s, t, *args)

        def akl_fwd(self, s, t, *args):  # AKL's own row op (dispatch.backend.ROW_OPS)
            seen.append((s.data_ptr(), t.data_ptr()))
            return impl.akl_fwd(s, t, *args)

    monkeypatch.setattr(D, "implementation", lambda name: Recording())
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(3, 9, 70, generator=g)
    teacher = torch.randn(3, 9, 70, generator=g)
    labels = torch.randint(0, 70, (3, 9), generator=g)
    labels[1, 4] = -100
    logits[:, -1], teacher[:, -1] = math.nan, math.nan  # the positions the shift drops
    x = logits.clone().requires_grad_()
    out = SHIFTED[loss](x[:, :-1], teacher[:, :-1], target=labels[:, 1:], ce_weight=0.2, reduction=reduction,
                        backend=backend)
    assert seen == [(x.data_ptr(), teacher.data_ptr())]
    (grad,) = torch.autograd.grad(out.sum(), [x])
    x64 = logits.double().requires_grad_()
    want = SHIFTED[loss](x64[:, :-1], teacher.double()[:, :-1], target=labels[:, 1:], ce_weight=0.2,
                         reduction=reduction, backend="reference")
    (want_grad,) = torch.autograd.grad(want.sum(), [x64])
    assert out.shape == want.shape
    torch.testing.assert_close(out.double(), want.detach(), rtol=2e-5, atol=1e-6)
    assert (grad[:, -1] == 0).all() and torch.isfinite(grad).all()
    assert rel(grad[:, :-1], want_grad[:, :-1]) < 1e-5


@needs_cpu_ops
def test_hf_shifted_logits_peak_memory_is_the_gradients_only():
    """The shifted call's peak memory over its inputs and ``logits.grad``: the stored gradient, which coexists with
    the output of torch's SliceBackward (``logits.grad``, which the unfused loss allocates too), and no copy of
    either input. Measured here: 1.24 gradient-sized blocks; 1.98 when the inputs are copied."""
    from fastkd.bench.memory import PeakRSS

    b, s, v = 4, 129, 16384
    logits = torch.randn(b, s, v).requires_grad_()
    teacher = torch.randn(b, s, v)
    labels = torch.randint(0, v, (b, s))
    block_mb = b * s * v * 4 / 2**20
    torch.ops.fastkd.empty_grad_cache()
    with PeakRSS() as peak:
        loss = fastkd.reverse_kl_loss(logits[:, :-1], teacher[:, :-1], target=labels[:, 1:], ce_weight=0.1,
                                      backend="cpu")
        loss.backward()
    extra_mb = (peak.peak_kb - peak.base_kb) / 1024 - block_mb  # minus logits.grad, which stays
    assert extra_mb < 1.6 * block_mb, f"peak {extra_mb:.0f} MB over inputs and .grad; one block is {block_mb:.0f} MB"
