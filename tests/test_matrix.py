"""One test matrix: every loss x every fused backend, the same cases and tolerances.

Each case runs a loss on a fused backend (cpu, cuda, triton; skipped where it does
not run) and on ``fastkd.reference`` in float64 (inputs upcast from the very
values the fused backend sees), and compares

* the loss (relative error),
* every gradient by its relative norm error ``||g - r|| / ||r||`` (an absolute
  tolerance larger than most gradient entries would hide a 10% scale error),
  and element-wise with ``allclose`` at the same tolerances.

Shapes: rows wider than one block with a ragged tail (3*4096 + 17, 2*2048 + 5),
a row of 128256 classes, narrow rows, 3-D logits; inputs contiguous and not
(a student sliced from a wider tensor, a teacher with a transposed layout).
"""
import functools

import pytest
import torch

import fastkd
from fastkd import reference
from backend_cases import FUSED, skip_unless_runs

LOGIT_LOSSES = ("kd", "kd_temp", "ats", "dkd", "dist")
# The language-model divergences (one fused op, divergence_fwd), the cross-entropy fused into
# kd / ats / dkd ("_ce": ce_weight=0.3), and top-k teachers (K = 64 ids of a dense teacher,
# "tail" mode; the teacher gradient is w.r.t. its log-probs).
LM_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd", "kd_ce", "ats_ce", "dkd_ce", "jsd_topk",
             "kd_topk", "rkl_topk_renorm", "jeffreys", "triangular", "jeffreys_topk", "triangular_topk_renorm",
             "entropy_gated_kl", "entropy_gated_kl_topk", "alpha_div", "ab_div", "renyi", "renyi_rev", "ab_topk",
             "renyi_topk_renorm")
LM_SHAPES = ("ragged_2x2048+5", "vocab_128256", "3d_2x3x1000")
# The fastkd.dispatch.backend.LOSS_OPS key a matrix loss needs.
BACKEND_LOSS = {"kd_temp": "kd", "kd_ce": "kd+ce", "ats_ce": "ats+ce", "dkd_ce": "dkd+ce", "skew_rkl": "skew_kl",
                "jsd_topk": "jsd", "rkl_topk_renorm": "reverse_kl", "jeffreys_topk": "jeffreys",
                "triangular_topk_renorm": "triangular", "entropy_gated_kl_topk": "entropy_gated_kl",
                "alpha_div": "alpha_divergence", "ab_div": "ab_divergence", "ab_topk": "ab_divergence",
                "renyi_rev": "renyi", "renyi_topk_renorm": "renyi"}
TOPK = {"entropy_gated_kl_topk": "tail", "ab_topk": "tail", "renyi_topk_renorm": "renormalize",
        "jsd_topk": "tail", "kd_topk": "tail", "rkl_topk_renorm": "renormalize", "jeffreys_topk": "tail",
        "triangular_topk_renorm": "renormalize"}
# jsd, triangular, jeffreys_topk: with ce_weight
WITH_TARGET = ("ats", "dkd", "kd_ce", "ats_ce", "dkd_ce", "jsd", "jsd_topk", "triangular", "jeffreys_topk",
               "entropy_gated_kl", "ab_div", "renyi", "ab_topk")
# The power divergences' parameters here: Amari's alpha outside [0, 1] (every class's p^a q^(1 - a) with a < 0),
# ABKD's (0.2, 0.7), a reverse Renyi of order 2 and a forward one of order 0.5
POWER = {"alpha_div": {"alpha": -0.3}, "ab_div": {"alpha": 0.2, "beta": 0.7}, "ab_topk": {"alpha": 0.2, "beta": 0.7},
         "renyi": {"order": 0.5}, "renyi_rev": {"order": 2.0, "reverse": True}, "renyi_topk_renorm": {"order": 0.5}}
# The entropy gate's parameters in these tests: w = 0.2 + 0.7 sigmoid((H / log V - 0.8) / 0.1), in its steep part
# on the dense rows here (H / log V about 0.85), so an error in the entropy shows in the loss and both gradients.
GATE = {"alpha_min": 0.2, "alpha_max": 0.9, "tau": 0.8, "scale": 0.1}
# (rows shape, classes): ragged wide rows, a 128k row, narrow rows, 3-D logits
SHAPES = {
    "ragged_3x4096+17": ((3,), 3 * 4096 + 17),
    "ragged_2x2048+5": ((4,), 2 * 2048 + 5),
    "vocab_128256": ((2,), 128256),
    "narrow_100": ((33,), 100),
    "3d_2x3x1000": ((2, 3), 1000),
}
# dtype -> (relative loss error, relative gradient-norm error) against float64
TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
LAYOUTS = ("contiguous", "strided")


def _logits(lead, c, dtype, device, seed, layout):
    """Logits of shape lead + (c,), built contiguous or as non-contiguous views."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, c, generator=g) * 3.0
    if layout == "contiguous":
        return x.to(dtype).to(device)
    if seed % 2 == 0:  # a student slice of a wider tensor: rows strided, last dim contiguous
        wide = torch.zeros(*lead, c + 7, dtype=dtype, device=device)
        wide[..., 3:3 + c] = x.to(dtype)
        return wide[..., 3:3 + c]
    # a teacher stored class-major and viewed back: last dim not contiguous at all
    return x.to(dtype).to(device).transpose(0, -1).contiguous().transpose(0, -1)


def _call(loss, backend, s, t, target, weight, temperature, reduction, ids=None):
    kw = dict(sample_weight=weight, reduction=reduction, backend=backend)
    if loss in TOPK:
        t = fastkd.TopKTeacher(ids, t, mode=TOPK[loss])
    if loss in ("kd", "kd_temp", "kd_ce", "kd_topk"):
        ce = 0.3 if loss == "kd_ce" else 0.0
        return fastkd.kd_loss(s, t, temperature, target=target, ce_weight=ce, **kw)
    if loss in ("ats", "ats_ce"):
        return fastkd.ats_loss(s, t, target, ce_weight=0.3 if loss == "ats_ce" else 0.0, **kw)
    if loss in ("dkd", "dkd_ce"):
        return fastkd.dkd_loss(s, t, target, ce_weight=0.3 if loss == "dkd_ce" else 0.0, **kw)
    if loss == "dist":
        return fastkd.dist_loss(s, t, backend=backend)
    kw.update(temperature=temperature, target=target)
    if loss in ("jsd", "jsd_topk"):
        return fastkd.jsd_loss(s, t, beta=0.3, ce_weight=0.3 if target is not None else 0.0, **kw)
    if loss in ("reverse_kl", "rkl_topk_renorm"):
        return fastkd.reverse_kl_loss(s, t, **kw)
    if loss == "forward_kl":
        return fastkd.forward_kl_loss(s, t, **kw)
    if loss in ("jeffreys", "jeffreys_topk"):
        return fastkd.jeffreys_loss(s, t, ce_weight=0.3 if target is not None else 0.0, **kw)
    if loss in ("triangular", "triangular_topk_renorm"):
        return fastkd.triangular_loss(s, t, ce_weight=0.3 if target is not None else 0.0, **kw)
    if loss in ("entropy_gated_kl", "entropy_gated_kl_topk"):
        return fastkd.entropy_gated_kl_loss(s, t, ce_weight=0.3 if target is not None else 0.0, **GATE, **kw)
    if loss in POWER:
        fn = {"alpha_div": fastkd.alpha_divergence_loss, "ab_div": fastkd.ab_divergence_loss,
              "ab_topk": fastkd.ab_divergence_loss}.get(loss, fastkd.renyi_loss)
        return fn(s, t, ce_weight=0.3 if target is not None else 0.0, **POWER[loss], **kw)
    if loss in ("skew_kl", "skew_rkl"):
        return fastkd.skew_kl_loss(s, t, skew=0.2, reverse=loss == "skew_rkl", **kw)
    assert loss == "tvd", loss
    return fastkd.tvd_loss(s, t, **kw)


def _run(loss, backend, s, t, target, weight, temperature, reduction, ids=None):
    """(loss, [grad_s, grad_t, grad_T?]) with both nets (and a tensor T) requiring grad."""
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_()
    inputs = [s, t]
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach().requires_grad_()
        inputs.append(temperature)
    out = _call(loss, backend, s, t, target, weight, temperature, reduction, ids)
    # a non-uniform incoming gradient, so per-row scaling is exercised too
    seed = out.detach().new_tensor(0.7) if out.dim() == 0 else torch.linspace(0.5, 1.5, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad(out, inputs, seed.to(out.device))
    return out, grads


def _rel_norm(g, r) -> float:
    g, r = g.double().cpu(), r.double().cpu()
    return float((g - r).norm() / r.norm().clamp_min(1e-30))


def _assert_matches(loss, backend, s, t, target=None, weight=None, temperature=2.0, reduction="batchmean",
                    ids=None):
    dtype = s.dtype if s.dtype != torch.float32 else t.dtype
    loss_tol, grad_tol = TOL[dtype]
    out, grads = _run(loss, backend, s, t, target, weight, temperature, reduction, ids)
    temp64 = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    ref_out, ref_grads = _run(loss, "reference", s.double(), t.double(), target,
                              None if weight is None else weight.double(), temp64, reduction, ids)
    # The same reference in float32: how well float32 can do at all. Where the problem is
    # ill-conditioned (dL/dT is a difference of sums of size T * KL that nearly cancel) the
    # bound widens to 4x that floor; elsewhere the floor is far below the tolerance.
    _, ref32_grads = _run(loss, "reference", s, t, target, weight, temperature, reduction, ids)
    assert out.dtype == torch.float32 and out.shape == ref_out.shape
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), rtol=loss_tol, atol=loss_tol * 1e-3)
    for name, g, r, r32, x in zip(("student", "teacher", "temperature"), grads, ref_grads, ref32_grads,
                                  (s, t, temperature)):
        assert g.shape == r.shape and (name == "temperature" or g.dtype == x.dtype), name
        assert torch.isfinite(g).all(), f"{name} gradient has non-finite entries"
        err = _rel_norm(g, r)
        bound = max(grad_tol, 4 * _rel_norm(r32, r))
        assert err < bound, f"{name} gradient: relative norm error {err:.2e} >= {bound:.1e}"
        if loss != "tvd":  # TVD's gradient is 0.5 sign(p - q): where p and q tie within float32
            # rounding a single entry may take the other sign; the norm check above still bounds it
            scale = float(r.abs().max())
            torch.testing.assert_close(g.double().cpu(), r.cpu(), rtol=bound * 10, atol=bound * scale)


def _case(loss, backend, shape_name, dtype, layout, seed=0):
    device = skip_unless_runs(BACKEND_LOSS.get(loss, loss), backend)
    lead, c = SHAPES[shape_name]
    if loss == "dist" and len(lead) == 1:
        # DIST's intra-class term correlates each class over the rows: with 2 or 3 rows every
        # rho is close to +-1 and the gradient is a float32 cancellation; 16 rows are well posed.
        lead = (max(lead[0], 16),)
    s = _logits(lead, c, dtype, device, 2 * seed, layout)
    t = _logits(lead, c, dtype, device, 2 * seed + 1, layout)
    g = torch.Generator().manual_seed(seed + 100)
    target = torch.randint(0, c, lead, generator=g).to(device)
    temperature = 2.0
    if loss == "kd_temp":  # one temperature per row, with a gradient (CTKD)
        temperature = (1.0 + torch.rand(lead, generator=g) * 3.0).to(device)
    return s, t, target, temperature


def _topk_case(loss, backend, shape_name, dtype, layout, seed=0, k=64):
    """As ``_case``, the teacher replaced by its top-k log-probs (the dense teacher at T = 2)."""
    s, t, target, temperature = _case(loss, backend, shape_name, dtype, layout, seed)
    teacher = fastkd.TopKTeacher.from_logits(t.float(), k, temperature=2.0)
    ids = teacher.indices.clone()
    ids.view(-1, k)[0, -3:] = -1  # a row with padding slots
    return s, teacher.logprobs.to(dtype), target, temperature, ids


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOGIT_LOSSES)
def test_logit_loss_matches_float64_reference(loss, backend, shape_name, dtype, layout):
    if shape_name == "vocab_128256" and (dtype == torch.float16 or layout == "strided"):
        pytest.skip("the 128k row runs in float32 and bfloat16, contiguous (time)")
    s, t, target, temperature = _case(loss, backend, shape_name, dtype, layout)
    _assert_matches(loss, backend, s, t, target=target if loss in ("ats", "dkd") else None,
                    temperature=temperature)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape_name", LM_SHAPES)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LM_LOSSES)
def test_lm_loss_matches_float64_reference(loss, backend, shape_name, dtype, layout):
    if shape_name == "vocab_128256" and layout == "strided":
        pytest.skip("the 128k row runs contiguous (time)")
    ids = None
    if loss in TOPK:
        s, t, target, temperature, ids = _topk_case(loss, backend, shape_name, dtype, layout)
    else:
        s, t, target, temperature = _case(loss, backend, shape_name, dtype, layout)
    _assert_matches(loss, backend, s, t, target=target if loss in WITH_TARGET else None,
                    temperature=temperature, ids=ids)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ("kd", "kd_temp", "ats", "dkd", "kd_ce", "jsd", "tvd", "jsd_topk", "jeffreys",
                                  "triangular", "jeffreys_topk", "entropy_gated_kl", "entropy_gated_kl_topk",
                                  "ab_div", "renyi", "ab_topk"))
def test_ignore_index_sample_weight_and_reductions(loss, backend, reduction):
    ids = None
    if loss in TOPK:
        s, t, target, temperature, ids = _topk_case(loss, backend, "ragged_2x2048+5", torch.float32, "contiguous",
                                                    seed=3, k=16)
        ids = ids.reshape(2, 2, -1)
    else:
        s, t, target, temperature = _case(loss, backend, "ragged_2x2048+5", torch.float32, "contiguous", seed=3)
    s, t = s.reshape(2, 2, -1), t.reshape(2, 2, -1)
    target = target.reshape(2, 2)
    target[0, 1] = -100
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.reshape(2, 2)
    weight = torch.tensor([[0.5, 2.0], [1.5, 0.25]], device=s.device)
    _assert_matches(loss, backend, s, t, target=target, weight=weight, temperature=temperature,
                    reduction=reduction, ids=ids)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ("kd", "ats", "dkd"))
def test_skipped_rows_are_not_read(loss, backend):
    """One rule on every backend, the reference included: a row whose target is ignore_index
    or whose sample weight is exactly 0 gives loss 0 and gradient 0, whatever its logits hold."""
    s, t, target, _ = _case(loss, backend, "narrow_100", torch.float32, "contiguous", seed=5)
    s, t = s[:6].clone(), t[:6].clone()
    target = target[:6].clone()
    weight = torch.ones(6, device=s.device)
    s[1, 7] = float("nan")  # ignored row
    t[1, 3] = float("inf")
    target[1] = -100
    s[4, 2] = float("nan")  # sample weight 0
    t[4, 9] = float("-inf")
    t[4, 0] = float("nan")
    weight[4] = 0.0
    kw = dict(target=target, sample_weight=weight, reduction="none")
    results = {}
    for name in (backend, "reference"):
        ss, tt = s.clone().requires_grad_(), t.clone().requires_grad_()
        if loss == "kd":
            out = fastkd.kd_loss(ss, tt, 2.0, backend=name, **kw)
        elif loss == "ats":
            out = fastkd.ats_loss(ss, tt, backend=name, **kw)
        else:
            out = fastkd.dkd_loss(ss, tt, backend=name, **kw)
        out.sum().backward()
        results[name] = (out.detach(), ss.grad, tt.grad)
        assert torch.isfinite(out).all(), name
        assert (out[[1, 4]] == 0).all(), name
        for grad in (ss.grad, tt.grad):
            assert torch.isfinite(grad).all() and (grad[[1, 4]] == 0).all(), name
    for a, b in zip(results[backend], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("net", ("student", "teacher"))
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ("kd", "kd_ce", "ats", "dkd", "dist", "reverse_kl", "jsd", "skew_kl", "tvd", "jeffreys",
                                  "triangular", "entropy_gated_kl", "ab_div", "renyi_rev"))
def test_nan_logit_gives_nan_where_the_reference_does(loss, backend, net):
    """One NaN logit (in a row's ragged tail, past the first block): the loss rows and every gradient entry
    are NaN exactly where the float64 reference's are (the row's whole gradient for both nets, except TVD's
    other net, whose sign term the reference makes 0; DIST: every row), never 0 or finite in their place."""
    s, t, target, temperature = _case(loss, backend, "ragged_2x2048+5", torch.float32, "contiguous", seed=6)
    (s if net == "student" else t)[1, 2 * 2048 + 3] = float("nan")
    reduction = "sum" if loss == "dist" else "none"
    results = [_run(loss, name, x.double() if name == "reference" else x, y.double() if name == "reference" else y,
                    target, None, temperature, reduction)
               for name, x, y in ((backend, s, t), ("reference", s, t))]
    (out, grads), (ref_out, ref_grads) = results
    assert torch.equal(out.isnan().cpu(), ref_out.isnan().cpu()) and ref_out.isnan().any()
    for name, g, r in zip(("student", "teacher"), grads, ref_grads):
        assert r.isnan().any() or name != net, f"the reference's {name} gradient has no NaN"
        assert torch.equal(g.isnan().cpu(), r.isnan().cpu()), (
            f"{name} gradient: NaN at {int(g.isnan().sum())} entries, the reference at {int(r.isnan().sum())}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ("kd_ce", "reverse_kl"))
def test_kl_with_zero_probability_under_the_other_nets_mass(loss, backend):
    """Forward KL with q = 0 where p > 0 (a -inf student logit; reverse KL: a -inf teacher logit): that row's
    loss is inf; the gradient w.r.t. the net with the zero probability is finite and equal to the float64
    reference's (G = -a p there), the other net's non-finite exactly where the reference's is."""
    s, t, target, temperature = _case(loss, backend, "ragged_2x2048+5", torch.float32, "contiguous", seed=7)
    zero_side = 0 if loss == "kd_ce" else 1
    (s, t)[zero_side][1, 2 * 2048 + 2] = float("-inf")
    out, grads = _run(loss, backend, s, t, target, None, temperature, "none")
    ref_out, ref_grads = _run(loss, "reference", s.double(), t.double(), target, None, temperature, "none")
    assert torch.isinf(out[1]) and torch.isinf(ref_out[1]) and torch.isfinite(out[[0, 2, 3]]).all()
    g, r = grads[zero_side], ref_grads[zero_side]
    assert torch.isfinite(r).all() and torch.isfinite(g).all()
    assert _rel_norm(g, r) < TOL[torch.float32][1], _rel_norm(g, r)
    g, r = grads[1 - zero_side], ref_grads[1 - zero_side]
    assert torch.equal(torch.isfinite(g).cpu(), torch.isfinite(r).cpu())


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_temperature_gradient_with_large_logit_offset(backend, offset):
    """dL/dT cancels: sum (p_s - p_t) a with a ~ offset / T. Fused kernels subtract the row max
    from the raw logits before scaling, so the large common offset must not matter."""
    device = skip_unless_runs("kd", backend)
    g = torch.Generator().manual_seed(11)
    s = (torch.randn(6, 2 * 2048 + 5, generator=g) * 3 + offset).to(device)
    t = (torch.randn(6, 2 * 2048 + 5, generator=g) * 3 + offset).to(device)
    temperature = torch.tensor([2.0, 4.0, 1.5, 3.0, 2.5, 1.0], device=device)
    out, grads = _run("kd_temp", backend, s, t, None, None, temperature, "batchmean")
    ref_out, ref_grads = _run("kd_temp", "reference", s.double(), t.double(), None, None, temperature.double(),
                              "batchmean")
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), rtol=1e-3, atol=1e-6)
    assert _rel_norm(grads[0], ref_grads[0]) < 1e-3
    err = (grads[2].double().cpu() - ref_grads[2].cpu()).abs() / ref_grads[2].abs().cpu()
    assert float(err.max()) < 0.03, f"dL/dT relative error per row {err.tolist()}"


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mask_type", ("channel", "spatial"))
def test_mgd_matches_float64_reference(mask_type, backend, dtype, layout):
    device = skip_unless_runs("mgd", backend)
    loss_tol, grad_tol = TOL[dtype]
    g = torch.Generator().manual_seed(7)
    shape = (3, 8, 9, 11)
    s = (torch.randn(shape, generator=g)).to(dtype).to(device)
    t = (torch.randn(shape, generator=g)).to(dtype).to(device)
    if layout == "channels_last":
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    weight = torch.randn(8, 8, 3, 3, generator=g).to(device) * 0.1

    def run(name, x, y, w):
        x = x.detach().requires_grad_()
        y = y.detach().requires_grad_()

        def generation(z):
            return torch.nn.functional.conv2d(z.to(w.dtype), w, padding=1)

        gen = torch.Generator().manual_seed(1234)
        out = fastkd.mgd_loss(x, y, generation, alpha=0.5, mask_type=mask_type, generator=gen, backend=name)
        return out, torch.autograd.grad(out, [x, y])

    out, grads = run(backend, s, t, weight)
    ref_out, ref_grads = run("reference", s.double(), t.double(), weight.double())
    # the generation conv runs in float32 on the fused path: compare at float32 precision at best
    tol = max(loss_tol, 1e-5)
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), rtol=tol, atol=0.0)
    for name, gr, r in zip(("student", "teacher"), grads, ref_grads):
        err = _rel_norm(gr, r)
        assert err < max(grad_tol, 1e-5), f"{name} gradient: relative norm error {err:.2e}"


# ---- divergence_fwd numerics (issue 24): the reference and every fused backend against float64 ----

_TOPK_FNS = {"forward_kl": fastkd.forward_kl_loss, "reverse_kl": fastkd.reverse_kl_loss, "jsd": fastkd.jsd_loss,
             "tvd": fastkd.tvd_loss, "jeffreys": fastkd.jeffreys_loss, "triangular": fastkd.triangular_loss,
             "entropy_gated_kl": functools.partial(fastkd.entropy_gated_kl_loss, **GATE),
             "ab_divergence": fastkd.ab_divergence_loss, "renyi": fastkd.renyi_loss}


def _topk_run(loss, backend, s, lp, ids, mode, target=None, ce_weight=0.0):
    """(per-row loss, grad student, grad teacher log-probs) of a divergence against a TopKTeacher."""
    s = s.detach().requires_grad_()
    lp = lp.detach().requires_grad_()
    teacher = fastkd.TopKTeacher(ids, lp, mode=mode)
    kw = dict(reduction="none", target=target, ce_weight=ce_weight, backend=backend)
    if loss == "kd":
        out = fastkd.kd_loss(s, teacher, 2.0, **kw)
    else:
        out = _TOPK_FNS[loss](s, teacher, temperature=2.0, **kw)
    return (out.detach(), *torch.autograd.grad(out.sum(), [s, lp]))


def _topk_rows(device, n=3, v=100, k=8, seed=21):
    """Student logits [n, v], k distinct ids per row and teacher log-probs with a tail of mass 0.1."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 3
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k, generator=g) * 2, dim=1) + torch.log(torch.tensor(0.9))
    return s.to(device), lp.to(device), ids.to(device)


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
@pytest.mark.parametrize("loss", ("kd", "reverse_kl", "jsd", "tvd", "triangular"))
def test_topk_tail_with_every_non_member_masked(loss, backend):
    """Tail mode where every student logit outside the row's ids is -inf (the student tail is empty) and the loss
    is finite (forward KL: a teacher whose top-k mass is clamped at 1): the masked columns' gradient is exactly 0,
    not NaN (logsumexp of an all -inf tail, exp(-inf - -inf) times a tail G of 0), and the rest is float64's."""
    device = skip_unless_runs("kd_topk" if loss == "kd" else loss, backend)
    s, lp, ids = _topk_rows(device)
    masked = torch.ones_like(s, dtype=torch.bool).scatter_(1, ids, False)
    s = s.masked_fill(masked, float("-inf"))
    if loss == "kd":  # forward KL is finite only without teacher tail mass: one slot holds it all
        lp = torch.full_like(lp, -40.0)
        lp[:, 0] = 0.0
    out, gs, gt = _topk_run(loss, backend, s, lp, ids, "tail")
    ref_out, ref_gs, ref_gt = _topk_run(loss, "reference", s.double(), lp.double(), ids, "tail")
    assert torch.isfinite(out).all() and torch.isfinite(ref_out).all()
    for name, g, r in (("student", gs, ref_gs), ("teacher", gt, ref_gt)):
        assert torch.isfinite(g).all() and torch.isfinite(r).all(), f"{name} gradient is not finite"
        assert _rel_norm(g, r) < 1e-5, f"{name} gradient: relative norm error {_rel_norm(g, r):.2e}"
    assert (gs[masked] == 0).all() and (ref_gs[masked] == 0).all()
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("nan_at", ("teacher_slot", "student_first_column", "student_member"))
@pytest.mark.parametrize("loss, mode", [("kd", "tail"), ("jsd", "tail"), ("tvd", "tail"), ("reverse_kl", "tail"),
                                        ("tvd", "renormalize"), ("reverse_kl", "renormalize"), ("jeffreys", "tail"),
                                        ("triangular", "tail"), ("triangular", "renormalize"),
                                        ("entropy_gated_kl", "tail"), ("entropy_gated_kl", "renormalize")])
def test_nan_in_a_topk_row_gives_nan_where_the_reference_does(loss, mode, nan_at, backend):
    """A NaN teacher log-prob (tail mode: the tail mass is NaN, so every slot's teacher gradient is NaN, not finite),
    a NaN student logit at column 0 (the first value a thread reads: an online log-sum-exp must not drop it) or at a
    member id: loss, hard and both gradients are NaN exactly where the float64 reference's are (TVD: the other
    net's sign term is 0), with the cross-entropy on."""
    device = skip_unless_runs("kd_topk" if loss == "kd" else loss, backend)
    s, lp, ids = _topk_rows(device)
    ids[1, 5] = -1  # a padding slot: its log-prob is never read
    lp[1, 5] = float("nan")
    if nan_at == "teacher_slot":
        lp[1, 2] = float("nan")
    elif nan_at == "student_first_column":
        s[1, 0] = float("nan")
    else:
        s[1, ids[1, 3]] = float("nan")
    target = torch.tensor([7, 7, 7], device=device)
    got = _topk_run(loss, backend, s, lp, ids, mode, target, ce_weight=0.5)
    want = _topk_run(loss, "reference", s.double(), lp.double(), ids, mode, target, ce_weight=0.5)
    assert want[0][1].isnan() and torch.isfinite(want[0][[0, 2]]).all()
    for name, g, r in zip(("loss", "student gradient", "teacher gradient"), got, want):
        assert torch.equal(g.isnan().cpu(), r.isnan().cpu()), (
            f"{name}: NaN at {int(g.isnan().sum())} entries, the reference at {int(r.isnan().sum())}")
        f = torch.isfinite(r)
        assert _rel_norm(g[f], r[f]) < 1e-5, f"{name}: relative norm error {_rel_norm(g[f], r[f]):.2e}"


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
@pytest.mark.parametrize("mode", (0, 1, 2))
def test_cross_entropy_alone_has_soft_zero_on_nan_rows(mode, backend):
    """divergence_fwd with a = b = 0 (the cross-entropy alone, as dkd_loss / ats_loss call it): soft is 0 on every
    row, a NaN logit anywhere included; loss and hard are NaN only on the row whose student holds the NaN."""
    device = skip_unless_runs("dkd+ce", backend) if backend != "reference" else torch.device("cpu")
    s, lp, ids = _topk_rows(device, n=4)
    if mode == 0:
        t, ids = torch.randn(4, 100, generator=torch.Generator().manual_seed(3)).to(device), ids[:0].reshape(0)
        t[2, 40] = float("nan")
    else:
        t = lp
        t[2, 1] = float("nan")
    s[1, 0] = float("nan")
    op = reference.divergence.divergence_fwd if backend == "reference" else (
        fastkd.dispatch.backend.implementation(backend).divergence_fwd)
    target = torch.tensor([3, 7, 9, 11], device=device)
    w = torch.full((4,), 0.25, device=device)
    loss, soft, hard, _, _ = op(s, t, ids, target, w, 2.0, 0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5, mode, False, True, True)
    assert (soft == 0).all(), soft
    nan_rows = torch.tensor([False, True, False, False])
    assert torch.equal(loss.isnan().cpu(), nan_rows) and torch.equal(hard.isnan().cpu(), nan_rows)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd", "jeffreys",
                                  "triangular", "entropy_gated_kl", "alpha_div", "ab_div", "renyi"))
def test_divergence_with_nets_at_different_large_offsets(loss, backend):
    """Student logits around +1e4, teacher logits around -1e4: the kernels subtract each net's own maximum before
    forming lp - lq (t - s would lose |t - s| eps, 6e-4 of the gradient); every gradient within 1e-5 of float64."""
    device = skip_unless_runs(BACKEND_LOSS.get(loss, loss), backend)
    g = torch.Generator().manual_seed(17)
    s = (torch.randn(4, 2 * 2048 + 5, generator=g) * 3 + 1e4).to(device)
    t = (torch.randn(4, 2 * 2048 + 5, generator=g) * 3 - 1e4).to(device)
    out, grads = _run(loss, backend, s, t, None, None, 2.0, "batchmean")
    ref_out, ref_grads = _run(loss, "reference", s.double(), t.double(), None, None, 2.0, "batchmean")
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), rtol=2e-5, atol=1e-7)
    for name, gr, r in zip(("student", "teacher"), grads, ref_grads):
        assert _rel_norm(gr, r) < 1e-5, f"{name} gradient: relative norm error {_rel_norm(gr, r):.2e}"


@pytest.mark.parametrize("backend", ("reference",) + FUSED)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=("0_rows", "2x0_rows"))
@pytest.mark.parametrize("loss", ("kd", "forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd", "dkd", "jeffreys",
                                  "triangular", "entropy_gated_kl", "ab_divergence", "renyi"))
def test_empty_batch_with_cross_entropy(loss, lead, backend):
    """No rows, a target of the same (empty) leading shape and ce_weight > 0: loss 0 and empty gradients on every
    backend (the op took the empty target for "no target" and refused the ce_weight)."""
    key = {"kd": "kd+ce", "dkd": "dkd+ce"}.get(loss, loss)
    device = skip_unless_runs(key, backend) if backend != "reference" else torch.device("cpu")
    s = torch.randn(*lead, 50, device=device, requires_grad=True)
    t = torch.randn(*lead, 50, device=device, requires_grad=True)
    target = torch.zeros(lead, dtype=torch.int64, device=device)
    kw = dict(target=target, ce_weight=0.5, backend=backend)
    if loss == "kd":
        out = fastkd.kd_loss(s, t, 2.0, **kw)
    elif loss == "dkd":
        out = fastkd.dkd_loss(s, t, target, ce_weight=0.5, backend=backend)
    elif loss == "skew_kl":
        out = fastkd.skew_kl_loss(s, t, **kw)
    else:
        out = _TOPK_FNS[loss](s, t, **kw)
    assert out.shape == () and float(out) == 0.0
    gs, gt = torch.autograd.grad(out, [s, t], allow_unused=True)
    for g, x in ((gs, s), (gt, t)):
        assert g is None or (g.shape == x.shape and g.numel() == 0)


def test_matrix_covers_every_fused_loss():
    """Adding a loss to the backends without adding it here fails."""
    from fastkd.dispatch.backend import LOSS_OPS

    # fused_linear_kd: tests/test_fused_linear.py runs the same row op per chunk on every backend
    # teacher_topk: tests/test_teacher_topk.py, one case matrix over every backend
    # akl, fused_linear_akl: tests/test_akl.py (its own row op akl_fwd, on every backend)
    covered = {BACKEND_LOSS.get(loss, loss) for loss in LOGIT_LOSSES + LM_LOSSES} | {"mgd", "fused_linear_kd",
                                                                                     "teacher_topk", "akl",
                                                                                     "fused_linear_akl"}
    assert set(LOSS_OPS) == covered
