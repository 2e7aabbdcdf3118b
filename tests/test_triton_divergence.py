"""The Triton ``divergence_fwd`` row op (fastkd/triton/divergence.py) against the float64 reference op.

The reference is ``fastkd.reference.divergence.divergence_fwd`` (same arguments and
outputs, plain PyTorch, here on float64 copies of the inputs). Values are compared
with allclose; every gradient also by its relative-norm error ``||g - r|| / ||r||``
(< 1e-5 for float32 gradients, < 1e-2 for bfloat16 ones).

Under the interpreter (TRITON_INTERPRET=1, tests/conftest.py) the kernels run on
CPU tensors. To keep rows wider than one block cheap, most tests cap the block at
16 columns (``narrow_blocks``) and use V = 2 * 16 + 5: three blocks, a ragged tail;
``test_real_block_config`` runs the launcher's own config on V = 2 * 2048 + 5.
"""
import math
import os

import pytest
import torch

from fastkd.reference import divergence as R

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

import fastkd.triton as ft  # noqa: E402  (after the TRITON_INTERPRET decision)
import fastkd.triton.divergence as fdiv  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: masked lanes compute -inf - -inf

F32, BF16 = torch.float32, torch.bfloat16
BLOCK = 16
V = 2 * BLOCK + 5  # three blocks, the last one ragged
N = 6
VALUE_TOL = {F32: (2e-6, 2e-5), BF16: (2e-6, 2e-5)}  # values: float32 math on the same (rounded) inputs
GRAD_REL = {F32: 1e-5, BF16: 1e-2}  # gradients: stored in the input dtype

# (name, kind, (a, b, w_p, w_q)) of every divergence of the family
DIVERGENCES = [
    ("reverse_kl", 0, R.divergence_coefficients("reverse_kl")),
    *[(f"jsd{beta}", 0, R.divergence_coefficients("jsd", beta=beta)) for beta in (0.0, 0.1, 0.5, 0.9, 1.0)],
    ("skew_kl", 0, R.divergence_coefficients("skew_kl", skew=0.1)),
    ("skew_rkl", 0, R.divergence_coefficients("skew_kl", skew=0.1, reverse=True)),
    ("tvd", 1, (0.0, 0.0, 0.0, 1.0)),
    ("jeffreys", 2, (1.0, 1.0, 0.0, 0.0)),
    ("triangular", 3, (0.0, 0.0, 0.0, 0.0)),
    ("entropy_gated_kl", 7, (0.2, 0.9, 0.7, 0.1)),  # alpha_min, alpha_max, tau, scale
    ("ab_divergence", 4, (0.2, 0.7, 0.0, 0.0)),  # alpha, beta
    ("alpha_divergence-0.4", 4, (-0.4, 1.4, 0.0, 0.0)),
    ("renyi", 6, (0.5, 0.0, 0.0, 0.0)),  # order, reverse
    ("renyi_rev2", 6, (2.0, 1.0, 0.0, 0.0)),
]
FORWARD_KL = R.divergence_coefficients("forward_kl")


@pytest.fixture
def narrow_blocks(monkeypatch):
    monkeypatch.setattr(fdiv, "DIV_MAX_BLOCK", BLOCK)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def dense_inputs(seed, dtype=F32, n=N, v=V, scale=3.0):
    g = gen(seed)
    s = (torch.randn(n, v, generator=g) * scale).to(dtype)
    t = (torch.randn(n, v, generator=g) * scale).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    # row weights as the Python layer makes them: an ignored row (0), sample weights, a divisor
    w = (torch.rand(n, generator=g) + 0.5) / n
    w[1] = 0.0
    return s.to(DEVICE), t.to(DEVICE), target.to(DEVICE), w.to(DEVICE)


def topk_inputs(seed, dtype=F32, n=N, v=V, k=5):
    """Student logits, teacher top-k (ids, log-probs of a full teacher softmax), padding in two rows."""
    g = gen(seed)
    s = (torch.randn(n, v, generator=g) * 3.0).to(dtype)
    full = torch.log_softmax(torch.randn(n, v, generator=g) * 3.0, dim=1)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    logprobs = full.gather(1, ids).to(dtype)
    ids[2, -2:] = -1  # fewer than K ids
    ids[3, :] = -1  # padding only
    target = torch.randint(0, v, (n,), generator=g)
    w = (torch.rand(n, generator=g) + 0.5) / n
    w[1] = 0.0
    return s.to(DEVICE), logprobs.to(DEVICE), ids.to(DEVICE), target.to(DEVICE), w.to(DEVICE)


def rel_err(g, r):
    g, r = g.detach().double().cpu(), r.detach().double().cpu()
    return float((g - r).norm() / r.norm()) if r.norm() > 0 else float(g.norm())


def no_target():
    return torch.empty(0, dtype=torch.int64, device=DEVICE)


def no_ids():
    return torch.empty(0, dtype=torch.int64, device=DEVICE)


def compare(s, t, ids, target, w, temperature, kind, coef, soft_scale, ce_weight, topk_mode, reduce,
            grad_student=True, grad_teacher=True, tol_dtype=None):
    """Run the Triton op and the float64 reference op on the same inputs; assert they agree."""
    tol_dtype = tol_dtype or (BF16 if BF16 in (s.dtype, t.dtype) else F32)
    args = (ids, target, w, temperature, kind, *coef, soft_scale, ce_weight, topk_mode, reduce)
    out = ft.divergence_fwd(s, t, *args, grad_student, grad_teacher)
    # a = b = 0 (cross-entropy alone): the teacher is unused, its gradient is exactly 0
    # (the reference's autograd.grad cannot be asked for it)
    ce_only = kind == 0 and coef[0] == 0 and coef[1] == 0
    ref = R.divergence_fwd(s.double(), t.double(), *args, grad_student, grad_teacher and not ce_only)
    atol, rtol = VALUE_TOL[tol_dtype]
    for name, o, r in zip(("loss", "soft", "hard"), out[:3], ref[:3]):
        assert o.dtype == F32 and o.shape == r.shape, name
        torch.testing.assert_close(o.double(), r, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{name}: {m}")
    for name, o, r, x, want in (("grad_student", out[3], ref[3], s, grad_student),
                                ("grad_teacher", out[4], ref[4], t, grad_teacher)):
        if not want:
            assert o.numel() == 0, name
            continue
        assert o.dtype == x.dtype and o.shape == x.shape, name
        if name == "grad_teacher" and ce_only:
            assert torch.all(o == 0), name
            continue
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(o), finite), f"{name}: non-finite pattern differs"
        err = rel_err(o[finite], r[finite])
        assert err < GRAD_REL[tol_dtype], f"{name}: relative-norm error {err:.2e}"
        torch.testing.assert_close(o.double(), r, atol=5e-3 if tol_dtype == BF16 else 1e-6,
                                   rtol=2e-2 if tol_dtype == BF16 else 1e-4, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    return out, ref


# (temperature, ce_weight, reduce, dtype): every divergence gets each value of each option (the first
# two cases); JSD 0.5, the general mixture, gets all four (each pair of option values but one)
OPTION_CASES = [(1.0, 0.0, True, F32), (2.0, 0.3, False, BF16), (2.0, 0.3, False, F32), (1.0, 0.0, True, BF16)]
DENSE_CASES = [(name, kind, coef, opts) for name, kind, coef in DIVERGENCES
               for opts in (OPTION_CASES if name == "jsd0.5" else OPTION_CASES[:2])]


def _opts_id(o):
    return f"T{o[0]}-ce{o[1]}-{'sum' if o[2] else 'rows'}-{str(o[3]).replace('torch.', '')}"


@pytest.mark.parametrize("name,kind,coef,opts", DENSE_CASES, ids=[f"{c[0]}-{_opts_id(c[3])}" for c in DENSE_CASES])
def test_dense_divergences(narrow_blocks, name, kind, coef, opts):
    temperature, ce_weight, reduce, dtype = opts
    s, t, target, w = dense_inputs(sum(map(ord, name)), dtype)
    compare(s, t, no_ids(), target, w, temperature, kind, coef, 1.0, ce_weight, 0, reduce)


def test_dense_without_target_and_grad_flags(narrow_blocks):
    s, t, _, w = dense_inputs(1)
    jsd = R.divergence_coefficients("jsd", beta=0.5)
    out, _ = compare(s, t, no_ids(), no_target(), w, 2.0, 0, jsd, 1.0, 0.0, 0, False)
    assert torch.all(out[2] == 0)  # hard = 0 without a target
    for gs, gt in ((True, False), (False, True)):
        compare(s, t, no_ids(), no_target(), w, 2.0, 0, jsd, 1.0, 0.0, 0, True, gs, gt)


def test_cross_entropy_alone_and_forward_kl_soft_scale(narrow_blocks):
    s, t, target, w = dense_inputs(2)
    out, _ = compare(s, t, no_ids(), target, w, 2.0, 0, (0.0, 0.0, 0.0, 1.0), 1.0, 0.7, 0, False)
    assert torch.all(out[1] == 0)
    compare(s, t, no_ids(), target, w, 3.0, 0, FORWARD_KL, 9.0, 0.1, 0, False)  # kd_loss + CE: soft_scale T^2


def test_skipped_rows_are_not_read(narrow_blocks):
    s, t, target, w = dense_inputs(3)
    s[1] = float("nan")  # row 1 has weight 0
    t[1] = float("inf")
    target[1] = 10 ** 6
    jsd = R.divergence_coefficients("jsd", beta=0.5)
    out = ft.divergence_fwd(s, t, no_ids(), target, w, 2.0, 0, *jsd, 1.0, 0.3, 0, False, True, True)
    for o in out:
        assert torch.all(o[1] == 0)
        assert torch.isfinite(o).all()


@pytest.mark.parametrize("name,kind,coef", [d for d in DIVERGENCES if d[0] in ("jsd0.5", "skew_kl", "skew_rkl",
                                                                                   "tvd", "jsd0.9", "triangular")],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_confident_masked_and_tiny_log_probs(narrow_blocks, name, kind, coef):
    """Gap-100 rows, -inf logits on either side, log-probs below -104 (Liger's JSD NaN): finite, as float64."""
    s, t, target, w = dense_inputs(4)
    s[0, 3] += 100.0  # confident student
    t[0, 3] += 100.0  # confident teacher, same class
    t[2, 7] += 100.0  # confident teacher, another class than the student's
    s[3, :4] = float("-inf")  # masked vocabulary, student side only
    t[4, 5:9] = float("-inf")  # teacher side only
    s[5, 10:14] = float("-inf")  # both sides
    t[5, 10:14] = float("-inf")
    s[2, 20:24] = -150.0  # log-probs far below -104 on both sides
    t[2, 20:24] = -140.0
    target[3] = 5  # targets at finite student logits
    target[5] = 20
    out, ref = compare(s, t, no_ids(), target, w, 1.0, kind, coef, 1.0, 0.3, 0, False)
    assert torch.isfinite(ref[0]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all() and torch.isfinite(out[4]).all()


def test_real_block_config():
    """The launcher's own BLOCK (2048) on rows of 2 * 2048 + 5 columns, dense and top-k."""
    v = 2 * 2048 + 5
    assert fdiv.div_row_config(v)[0] == 2048
    s, t, target, w = dense_inputs(5, n=3, v=v)
    compare(s, t, no_ids(), target, w, 2.0, 0, R.divergence_coefficients("jsd", beta=0.5), 1.0, 0.3, 0, False)
    s, lp, ids, target, w = topk_inputs(6, n=4, v=v, k=8)
    compare(s, lp, ids, target, w, 2.0, 0, FORWARD_KL, 4.0, 0.3, 1, False)


def test_non_contiguous_inputs(narrow_blocks):
    s, t, target, w = dense_inputs(7)
    wide_s = torch.randn(N, V + 7, device=DEVICE)
    wide_s[:, :V] = s
    t_T = t.t().contiguous().t()  # column stride N: copied by the launcher
    w2 = torch.zeros(2 * N, device=DEVICE)
    w2[::2] = w
    rkl = R.divergence_coefficients("reverse_kl")
    compare(wide_s[:, :V], t_T, no_ids(), target, w2[::2], 2.0, 0, rkl, 1.0, 0.3, 0, False)
    s, lp, ids, target, w = topk_inputs(8)
    wide_lp = torch.zeros(N, 9, device=DEVICE)
    wide_lp[:, 2:7] = lp
    wide_ids = torch.zeros(N, 9, dtype=torch.int64, device=DEVICE)
    wide_ids[:, 2:7] = ids
    compare(s.t().contiguous().t(), wide_lp[:, 2:7], wide_ids[:, 2:7], target, w, 2.0, 0, rkl, 1.0, 0.3, 1, False)


# ----------------------------------------------------------------------------
# top-k teacher
# ----------------------------------------------------------------------------

TOPK_DIVERGENCES = [("forward_kl", 0, FORWARD_KL)] + [d for d in DIVERGENCES if d[0] in
                                                       ("reverse_kl", "jsd0.5", "skew_kl", "skew_rkl", "tvd",
                                                        "jeffreys", "triangular", "entropy_gated_kl",
                                                        "ab_divergence", "renyi", "renyi_rev2")]


@pytest.mark.parametrize("mode", [1, 2], ids=["tail", "renormalize"])
@pytest.mark.parametrize("opts", OPTION_CASES[:2], ids=_opts_id)
@pytest.mark.parametrize("name,kind,coef", TOPK_DIVERGENCES, ids=[d[0] for d in TOPK_DIVERGENCES])
def test_topk(narrow_blocks, name, kind, coef, opts, mode):
    temperature, ce_weight, reduce, dtype = opts
    s, lp, ids, target, w = topk_inputs(sum(map(ord, name)) + mode, dtype)
    soft_scale = temperature ** 2 if name == "forward_kl" else 1.0  # kd_loss's T^2
    out, _ = compare(s, lp, ids, target, w, temperature, kind, coef, soft_scale, ce_weight, mode, reduce)
    if not reduce:
        assert out[1][3] == 0  # a row of padding only: soft exactly 0 (tail mode: both tails the whole row)
    if mode == 2:  # renormalised: the soft part of the student gradient is exactly 0 outside the ids
        out = ft.divergence_fwd(s, lp, ids, no_target(), w, temperature, kind, *coef, soft_scale, 0.0, mode,
                                reduce, True, False)
        member = torch.zeros(s.shape, dtype=torch.bool, device=DEVICE)
        rows = torch.arange(N, device=DEVICE)[:, None].expand_as(ids)
        member[rows[ids >= 0], ids[ids >= 0]] = True
        assert torch.all(out[3][~member] == 0)


@pytest.mark.parametrize("tail_mass", [1e-6, 1e-9, "gap100"])
def test_topk_tail_holding_nearly_all_mass(narrow_blocks, tail_mass):
    """The student tail summed over the non-members: a top-k with all but 1e-6 / 1e-9 of the student
    mass (total - sum over ids would cancel in float32), or with the rest 100 logits below
    (the tail, exp(-100) of the max, underflows float32 relative to the total). The teacher's
    top-k holds all but 1e-5 (its tail is summed in float64)."""
    k = 4
    g = gen(9)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    member = torch.zeros(N, V, dtype=torch.bool).scatter_(1, ids, True)
    if tail_mass == "gap100":
        s = torch.where(member, torch.randn(N, V, generator=g), -100.0 + torch.randn(N, V, generator=g))
    else:
        # members share mass 1 - eps, the V - k others eps
        c = math.log(tail_mass * k / (V - k))
        s = torch.where(member, torch.zeros(N, V), torch.full((N, V), c)) + 1e-3 * torch.randn(N, V, generator=g)
    # teacher tail 1e-5: float32's 1 - sum p_k would keep about 2 digits of it
    teacher = torch.softmax(torch.randn(N, k, generator=g), dim=1) * (1 - 1e-5)
    lp = teacher.log()
    target = torch.randint(0, V, (N,), generator=g)
    w = torch.full((N,), 1.0 / N)
    s, lp, ids, target, w = (x.to(DEVICE) for x in (s, lp, ids, target, w))
    for name, kind, coef in (("forward_kl", 0, FORWARD_KL), ("jsd0.5", 0, R.divergence_coefficients("jsd", beta=0.5))):
        out, ref = compare(s, lp, ids, no_target(), w, 1.0, kind, coef, 1.0, 0.0, 1, False)
        assert torch.isfinite(out[0]).all(), name


def test_topk_full_vocabulary_and_teacher_mass_above_one(narrow_blocks):
    """Every id in the top-k (no student tail) and teacher log-probs summing a hair above 1, as an
    engine's rounded log-probs may (the teacher tail is clamped: empty)."""
    g = gen(10)
    v, n = 20, 3
    s = torch.randn(n, v, generator=g) * 2
    ids = torch.stack([torch.randperm(v, generator=g) for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, v, generator=g), dim=1) + 1e-5
    w = torch.full((n,), 1.0)
    for kind, coef in ((0, R.divergence_coefficients("jsd", beta=0.5)), (0, R.divergence_coefficients("reverse_kl"))):
        compare(s.to(DEVICE), lp.to(DEVICE), ids.to(DEVICE), no_target(), w.to(DEVICE), 1.5, kind, coef, 1.0, 0.0,
                1, False)


# ----------------------------------------------------------------------------
# bad values and arguments
# ----------------------------------------------------------------------------

def test_bad_target_or_id_gives_a_nan_row(narrow_blocks):
    s, t, target, w = dense_inputs(11)
    target[0] = V  # counted row, out of range
    target[2] = -3
    target[1] = V + 5  # skipped row: never read, stays 0
    jsd = R.divergence_coefficients("jsd", beta=0.5)
    out = ft.divergence_fwd(s, t, no_ids(), target, w, 2.0, 0, *jsd, 1.0, 0.3, 0, False, True, True)
    for o in out:
        assert torch.isnan(o[0]).all() and torch.isnan(o[2]).all()
        assert torch.all(o[1] == 0)
        assert torch.isfinite(o[3:]).all()
    s, lp, ids, target, w = topk_inputs(12)
    ids[0, 1] = V  # out of range
    ids[4, 0] = -2  # below the padding id
    ids[1, 0] = V  # skipped row
    for mode in (1, 2):
        out = ft.divergence_fwd(s, lp, ids, target, w, 2.0, 0, *FORWARD_KL, 4.0, 0.3, mode, False, True, True)
        for o in out:
            assert torch.isnan(o[0]).all() and torch.isnan(o[4]).all()
            assert torch.all(o[1] == 0)
            assert torch.isfinite(o[[2, 3, 5]]).all()


def test_argument_errors_name_the_argument():
    s, t, target, w = dense_inputs(13)
    base = dict(topk_ids=no_ids(), target=target, row_weight=w)

    def call(**kw):
        a = dict(base, student=s, teacher=t, temperature=1.0, kind=0, topk_mode=0, ce_weight=0.0)
        a.update(kw)
        return ft.divergence_fwd(a["student"], a["teacher"], a["topk_ids"], a["target"], a["row_weight"],
                                 a["temperature"], a["kind"], 0.5, 0.5, 0.5, 0.5, 1.0, a["ce_weight"],
                                 a["topk_mode"], True, True, True)

    for kw, word in ((dict(kind=5), "kind"), (dict(topk_mode=3), "topk_mode"), (dict(temperature=0.0), "temperature"),
                     (dict(teacher=t[:, :-1]), "shapes"), (dict(target=no_target(), ce_weight=0.5), "ce_weight"),
                     (dict(row_weight=w.double()), "row_weight"), (dict(topk_mode=1), "topk_ids"),
                     (dict(topk_ids=torch.zeros(N, 3, dtype=torch.int64, device=DEVICE)), "topk_ids")):
        with pytest.raises(ValueError, match=word):
            call(**kw)


def test_autograd_scales_the_stored_gradients(narrow_blocks):
    s, t, target, w = dense_inputs(14)
    jsd = R.divergence_coefficients("jsd", beta=0.9)
    stored = ft.divergence_fwd(s, t, no_ids(), target, w, 2.0, 0, *jsd, 1.0, 0.3, 0, False, True, True)
    si, ti = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = ft.divergence_fwd(si, ti, no_ids(), target, w, 2.0, 0, *jsd, 1.0, 0.3, 0, False, True, True)[0]
    up = torch.linspace(0.5, 2.0, N, device=DEVICE)
    gs, gt = torch.autograd.grad(loss, (si, ti), up)
    torch.testing.assert_close(gs, stored[3] * up[:, None])
    torch.testing.assert_close(gt, stored[4] * up[:, None])
    s, lp, ids, target, w = topk_inputs(15)
    si, li = s.clone().requires_grad_(), lp.clone().requires_grad_()
    loss = ft.divergence_fwd(si, li, ids, target, w, 2.0, 0, *FORWARD_KL, 4.0, 0.3, 1, True, True, True)[0]
    loss.backward()
    ref = R.divergence_fwd(s.double(), lp.double(), ids, target, w, 2.0, 0, *FORWARD_KL, 4.0, 0.3, 1, True, True, True)
    assert rel_err(si.grad, ref[3]) < 1e-5 and rel_err(li.grad, ref[4]) < 1e-5


@pytest.mark.skipif(not INTERPRET, reason="counts the interpreter's loads")
@pytest.mark.parametrize("grads", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("name,coef,passes", [("forward_kl", FORWARD_KL, 2), ("reverse_kl", DIVERGENCES[0][2], 2),
                                              ("jsd0.5", R.divergence_coefficients("jsd", beta=0.5), 3),
                                              ("entropy_gated_kl", (0.2, 0.9, 0.7, 0.1), 3),
                                              ("ab_divergence", (0.2, 0.7, 0.0, 0.0), 3),
                                              ("renyi", (0.5, 0.0, 0.0, 0.0), 3)])
def test_dense_passes(narrow_blocks, monkeypatch, name, coef, passes, grads):
    """Reads of each logit per call: two where sum G and sum H are known after the statistics
    pass (forward and reverse KL, any gradients: the KL as KD's cross term), three otherwise.
    Counted in the interpreter's loads from the logit buffers; the values are checked too."""
    import triton.runtime.interpreter as interp

    s, t, target, w = dense_inputs(21)
    w[1] = 0.5  # every row read
    reads = {"s": 0, "t": 0}
    load = interp.InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, mask, other, *rest):
        on = ptrs.data[mask.data]
        for key, x in (("s", s), ("t", t)):
            lo = x.data_ptr()
            reads[key] += int(((on >= lo) & (on < lo + x.numel() * x.element_size())).sum())
        return load(self, ptrs, mask, other, *rest)

    monkeypatch.setattr(interp.InterpreterBuilder, "create_masked_load", counting_load)
    # (the entropy gate: statistics, its three sums, gradients; AB and Renyi: statistics, sums (U, S), gradients)
    kind = {"entropy_gated_kl": 7, "ab_divergence": 4, "renyi": 6}.get(name, 0)
    args = (s, t, no_ids(), target, w, 2.0, kind, *coef, 4.0, 0.1, 0, False, *grads)
    out = ft.divergence_fwd(*args)
    monkeypatch.undo()
    reads_s = reads["s"] - N  # the target logits, one per row
    assert (reads_s, reads["t"]) == (passes * N * V, passes * N * V), (name, grads, reads)
    ref = R.divergence_fwd(s.double(), t.double(), *args[2:])
    torch.testing.assert_close(out[0].double(), ref[0], rtol=2e-5, atol=2e-6)
    for got, want, on in ((out[3], ref[3], grads[0]), (out[4], ref[4], grads[1])):
        if on:
            assert rel_err(got, want) < 1e-5, (name, grads)


# ----------------------------------------------------------------------------
# the teacher's own temperature (teacher_temperature = T_t > 0: p = softmax(t / T_t))
# ----------------------------------------------------------------------------

T_S, T_T = 2.0, 1.3  # the student's and the teacher's temperatures in these tests
# every kind: the KL family's three paths (general three-pass mixture; forward / reverse KL: the two-pass path,
# its KL from pass 1's cross term), TVD, two-sided, triangular, AB, Renyi (both sides), entropy-gated
TT_DIVERGENCES = [("forward_kl", 0, FORWARD_KL)] + [d for d in DIVERGENCES if d[0] in (
    "reverse_kl", "jsd0.5", "tvd", "jeffreys", "triangular", "ab_divergence", "renyi", "renyi_rev2",
    "entropy_gated_kl")]


def tt_run(op, s, t, args, grads, tt):
    """The Triton op with teacher_temperature ``tt``, and the float64 reference op on the teacher's logits
    times T / T_t (the same p), its teacher gradient times T / T_t (the chain factor of that scaling)."""
    out = op(s, t, *args, *grads, teacher_temperature=tt)
    ref_op = R.akl_fwd if op is ft.akl_fwd else R.divergence_fwd
    ref = ref_op(s.double(), t.double() * (args[3] / tt), *args, *grads)
    return out, ref[:4] + (ref[4] * (args[3] / tt) if grads[1] else ref[4],)


def tt_compare(op, s, t, args, grads=(True, True), tt=T_T):
    out, ref = tt_run(op, s, t, args, grads, tt)
    bf16 = BF16 in (s.dtype, t.dtype)
    for name, o, r in zip(("loss", "soft", "hard"), out[:3], ref[:3]):
        torch.testing.assert_close(o.double(), r, atol=2e-6, rtol=2e-5, msg=lambda m: f"{name}: {m}")
    for name, o, r, want in (("grad_student", out[3], ref[3], grads[0]), ("grad_teacher", out[4], ref[4], grads[1])):
        if want:
            err = rel_err(o, r)
            assert err < GRAD_REL[BF16 if bf16 else F32], f"{name}: relative-norm error {err:.2e}"
        else:
            assert o.numel() == 0, name
    return out


def dense_args(target, w, kind, coef, soft_scale=1.0, ce_weight=0.3, reduce=False, temperature=T_S):
    return (no_ids(), target, w, temperature, kind, *coef, soft_scale, ce_weight, 0, reduce)


@pytest.mark.parametrize("name,kind,coef", TT_DIVERGENCES, ids=[d[0] for d in TT_DIVERGENCES])
def test_teacher_temperature_every_kind(narrow_blocks, name, kind, coef):
    """Every kind at T != T_t (both ways round: T_t below and above T), rows of three blocks with a ragged tail,
    the CE on a target, an ignored row (weight 0)."""
    s, t, target, w = dense_inputs(sum(map(ord, name)) + 31)
    for tt in (T_T, 3.1):
        tt_compare(ft.divergence_fwd, s, t, dense_args(target, w, kind, coef), tt=tt)


@pytest.mark.parametrize("name,coef", [("forward_kl", FORWARD_KL), ("reverse_kl", DIVERGENCES[0][2])])
@pytest.mark.parametrize("grads", [(True, False), (False, True)])
def test_teacher_temperature_two_pass_flags(narrow_blocks, name, coef, grads):
    """Forward / reverse KL with one gradient: the two-pass path with and without pass 1's cross term."""
    s, t, target, w = dense_inputs(32)
    tt_compare(ft.divergence_fwd, s, t, dense_args(target, w, 0, coef, soft_scale=T_S ** 2, reduce=True), grads)


def test_teacher_temperature_float64_definition(narrow_blocks):
    """The KL family written out in float64 (p = softmax(t / T_t), q = softmax(s / T), m = w_p p + w_q q),
    gradients by autograd: the general mixture and both two-pass paths, without the reference op."""
    s, t, target, w = dense_inputs(33)
    for coef in (R.divergence_coefficients("jsd", beta=0.3), FORWARD_KL, DIVERGENCES[0][2]):
        a, b, w_p, w_q = coef
        s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
        lq, lp = torch.log_softmax(s64 / T_S, 1), torch.log_softmax(t64 / T_T, 1)
        lm = torch.logsumexp(torch.stack([lp + math.log(w_p or 1e-300), lq + math.log(w_q or 1e-300)]), 0)
        soft = a * (lp.exp() * (lp - lm)).sum(1) + b * (lq.exp() * (lq - lm)).sum(1)
        hard = torch.logsumexp(s64, 1) - s64.gather(1, target[:, None])[:, 0]
        loss = w.double() * (1.5 * soft + 0.3 * hard)
        gs, gt = torch.autograd.grad(loss.sum(), (s64, t64))
        out = ft.divergence_fwd(s, t, *dense_args(target, w, 0, coef, soft_scale=1.5), True, True,
                                teacher_temperature=T_T)
        torch.testing.assert_close(out[0].double(), loss.detach(), atol=2e-6, rtol=2e-5)
        assert rel_err(out[3], gs) < 1e-5 and rel_err(out[4], gt) < 1e-5, coef


def test_teacher_temperature_bf16_and_non_contiguous(narrow_blocks):
    s, t, target, w = dense_inputs(34, BF16)
    for name, kind, coef in TT_DIVERGENCES[:3]:  # forward KL, reverse KL, JSD: both kernel paths
        tt_compare(ft.divergence_fwd, s, t, dense_args(target, w, kind, coef))
    s, t, target, w = dense_inputs(35)
    wide_t = torch.randn(N, V + 7, device=DEVICE)
    wide_t[:, 3:V + 3] = t  # a row slice: read in place
    w2 = torch.zeros(2 * N, device=DEVICE)
    w2[::2] = w
    for name, kind, coef in TT_DIVERGENCES[:3]:
        tt_compare(ft.divergence_fwd, s.t().contiguous().t(), wide_t[:, 3:V + 3],
                   dense_args(target, w2[::2], kind, coef))


def test_teacher_temperature_equal_to_temperature_is_the_default(narrow_blocks):
    """T_t == T, and 0 given explicitly, give the default's bits, on every path (and top-k takes T_t == T)."""
    s, t, target, w = dense_inputs(36)
    for name, kind, coef in TT_DIVERGENCES:
        for grads in ((True, True), (True, False), (False, True)):
            args = (s, t, *dense_args(target, w, kind, coef), *grads)
            base = ft.divergence_fwd(*args)
            for tt in (T_S, 0.0):
                for o, r in zip(ft.divergence_fwd(*args, teacher_temperature=tt), base):
                    assert torch.equal(o, r), (name, grads, tt)
    s, lp, ids, target, w = topk_inputs(37)
    args = (s, lp, ids, target, w, T_S, 0, *FORWARD_KL, 4.0, 0.3, 1, False, True, True)
    for o, r in zip(ft.divergence_fwd(*args, teacher_temperature=T_S), ft.divergence_fwd(*args)):
        assert torch.equal(o, r)
    s, t, target, w = dense_inputs(38)
    args = (s, t, no_ids(), target, w, T_S, 8, 0.4, 0.0, 0.0, 0.0, 1.0, 0.3, 0, False, True, True)
    for o, r in zip(ft.akl_fwd(*args, teacher_temperature=T_S), ft.akl_fwd(*args)):
        assert torch.equal(o, r)


@pytest.mark.parametrize("mu", [0.4, 1.0])
def test_teacher_temperature_akl(narrow_blocks, mu):
    """AKL at T != T_t: the head, its gaps and both KLs at the teacher's own temperature; float32 and bf16."""
    for seed, dtype in ((39, F32), (40, BF16)):
        s, t, target, w = dense_inputs(seed, dtype)
        args = (no_ids(), target, w, T_S, 8, mu, 0.0, 0.0, 0.0, 1.0, 0.3, 0, False)
        for tt in (T_T, 3.1):
            tt_compare(ft.akl_fwd, s, t, args, tt=tt)


def test_teacher_temperature_autograd(narrow_blocks):
    """Through autograd the teacher's gradient keeps its 1 / T_t chain factor (the stored one, scaled)."""
    s, t, target, w = dense_inputs(41)
    si, ti = s.clone().requires_grad_(), t.clone().requires_grad_()
    args = dense_args(target, w, 0, R.divergence_coefficients("jsd", beta=0.5))
    loss = ft.divergence_fwd(si, ti, *args, True, True, teacher_temperature=T_T)[0]
    loss.sum().backward()
    _, ref = tt_run(ft.divergence_fwd, s, t, args, (True, True), T_T)
    assert rel_err(si.grad, ref[3]) < 1e-5 and rel_err(ti.grad, ref[4]) < 1e-5


def test_teacher_temperature_errors():
    s, t, target, w = dense_inputs(42)
    dense = (s, t, no_ids(), target, w, T_S, 0, *FORWARD_KL, 1.0, 0.3, 0, True, True, True)
    for op, args in ((ft.divergence_fwd, dense), (ft.akl_fwd, dense[:6] + (8, 0.5) + dense[8:])):
        # (1e-39 and 1e39: 1 / T_t or T / T_t not finite in float32, refused as the CPU op refuses them)
        for bad in (-1.0, float("nan"), float("inf"), -float("inf"), 1e-39, 1e39):
            with pytest.raises(ValueError, match="teacher_temperature"):
                op(*args, teacher_temperature=bad)
    s, lp, ids, target, w = topk_inputs(43)
    for mode in (1, 2):
        with pytest.raises(ValueError, match="teacher_temperature"):
            ft.divergence_fwd(s, lp, ids, target, w, T_S, 0, *FORWARD_KL, 1.0, 0.3, mode, True, True, True,
                              teacher_temperature=T_T)
