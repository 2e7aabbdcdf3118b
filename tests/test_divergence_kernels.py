"""The compiled CPU kernel of ``fastkd::divergence_fwd`` against the float64 reference.

The op is called directly (row weights from ``fastkd.core.rows.row_weights``),
with every divergence of the family: reverse KL, JSD (beta 0, 0.1, 0.5, 0.9, 1),
skew KL both ways, TVD, forward KL with ``soft_scale = T^2`` (KD), and the top-k
teacher in both modes. The oracle is ``fastkd.reference`` evaluated in float64 on
the same (rounded) values, its gradients from autograd. Values by allclose,
gradients by the relative norm ``||g - r|| / ||r||`` (< 1e-5 in float32).
"""
import math
import os

import pytest
import torch

import fastkd  # noqa: F401  (loads the compiled ops)
from fastkd.dispatch import ops as _ops
from fastkd.reference import divergence as R
from fastkd.core.divergence import divergence_op_args
from fastkd.core.rows import row_weights
from fastkd import TopKTeacher

pytestmark = pytest.mark.skipif(
    not _ops.has_kernel("divergence_fwd", "CPU"), reason="compiled CPU divergence_fwd not built"
)

F64 = torch.float64
INF = float("inf")
# divergence name -> (reference loss name, its parameters, scale by T^2)
DIVS = {
    "reverse_kl": ("reverse_kl", {}),
    "jsd0": ("jsd", {"beta": 0.0}),
    "jsd0.1": ("jsd", {"beta": 0.1}),
    "jsd0.5": ("jsd", {"beta": 0.5}),
    "jsd0.9": ("jsd", {"beta": 0.9}),
    "jsd1": ("jsd", {"beta": 1.0}),
    "skew": ("skew_kl", {"skew": 0.1}),
    "skew_rev": ("skew_kl", {"skew": 0.1, "reverse": True}),
    "tvd": ("tvd", {}),
    "jeffreys": ("jeffreys", {}),
    "triangular": ("triangular", {}),
    "entropy_gated": ("entropy_gated_kl", {"alpha_min": 0.2, "alpha_max": 0.9, "tau": 0.8, "scale": 0.1}),
    "alpha": ("alpha_divergence", {"alpha": 0.5}),
    "ab": ("ab_divergence", {"alpha": 0.2, "beta": 0.7}),
    "renyi": ("renyi", {"order": 0.5}),
    "renyi_rev": ("renyi", {"order": 2.0, "reverse": True}),
    "kd": ("forward_kl", {}),  # kd_loss: forward KL times T^2
}
# dtype -> (loss rtol, gradient relative-norm bound)
TOL = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}
WIDE = 2 * 2048 + 5  # three chunks of the statistics pass, the last one ragged


def op_args(name):
    """(kind, a, b, w_p, w_q) of the op for a divergence of DIVS."""
    base, params = DIVS[name]
    return divergence_op_args(base, **params)


def call_op(name, s, t, *, T=1.0, reduction="batchmean", target=None, ignore_index=-100, sample_weight=None,
            ce_weight=0.0, topk=None, grad_teacher=False, grad_student=True):
    """torch.ops.fastkd.divergence_fwd as the Python layer calls it. topk: (ids, mode) with t the log-probs."""
    kind, a, b, w_p, w_q = op_args(name)
    rw = row_weights(s, target, ignore_index, sample_weight, reduction)
    empty = torch.empty(0, dtype=torch.int64)
    ids, mode = topk if topk is not None else (empty, 0)
    soft_scale = T * T if name == "kd" else 1.0
    return torch.ops.fastkd.divergence_fwd(
        s, t, ids, target if target is not None else empty, rw, T, kind, a, b, w_p, w_q, soft_scale, ce_weight,
        mode, reduction != "none", grad_student, grad_teacher)


def call_ref(name, s, t, *, T=1.0, reduction="batchmean", target=None, ignore_index=-100, sample_weight=None,
             ce_weight=0.0, topk=None):
    base, params = DIVS[name]
    if topk is not None:
        t = TopKTeacher(topk[0], t, mode={1: "tail", 2: "renormalize"}[topk[1]])
    kw = dict(reduction=reduction, target=target, ignore_index=ignore_index, sample_weight=sample_weight,
              ce_weight=ce_weight, return_parts=True)
    if name == "kd":
        if topk is not None:
            return R.kd_topk_loss(s, t, T, **kw)
        # dense kd: T^2 forward KL (jsd beta = 0) + ce_weight CE, the CE differentiable from the full call
        soft = R.jsd_loss(s, t, beta=0.0, temperature=T, **{**kw, "ce_weight": 0.0, "return_parts": False})
        full = R.jsd_loss(s, t, beta=0.0, temperature=T, **kw)
        loss = T * T * soft + (full.loss - soft)
        return R.LossParts(loss, (T * T * soft).detach(), full.hard)
    fn = {"reverse_kl": R.reverse_kl_loss, "jsd": R.jsd_loss, "skew_kl": R.skew_kl_loss, "tvd": R.tvd_loss,
          "jeffreys": R.jeffreys_loss, "triangular": R.triangular_loss,
          "entropy_gated_kl": R.entropy_gated_kl_loss, "alpha_divergence": R.alpha_divergence_loss,
          "ab_divergence": R.ab_divergence_loss, "renyi": R.renyi_loss}[base]
    return fn(s, t, temperature=T, **params, **kw)


def rel_norm(g, r):
    g, r = g.double(), r.double()
    return ((g - r).norm() / r.norm().clamp_min(1e-300)).item()


def check(name, s, t, *, dtype=torch.float32, grad_teacher=True, loss_atol=1e-6, **kw):
    """Runs op and float64 reference on the same values; compares loss, soft, hard and both gradients."""
    rtol, gtol = TOL[dtype]
    s_d = s.to(dtype)
    t_d = t.to(dtype) if t.is_floating_point() else t
    loss, soft, hard, gs, gt = call_op(name, s_d, t_d, grad_teacher=grad_teacher, **kw)
    s64 = s_d.detach().to(F64).requires_grad_(True)
    t64 = t_d.detach().to(F64).requires_grad_(grad_teacher)
    ref = call_ref(name, s64, t64, **kw)
    ref.loss.sum().backward()
    for got, want, what in ((loss, ref.loss, "loss"), (soft, ref.soft, "soft"), (hard, ref.hard, "hard")):
        assert got.dtype == torch.float32, what
        torch.testing.assert_close(got.double(), want.double().reshape(got.shape), rtol=rtol, atol=loss_atol,
                                   msg=lambda m: f"{what}: {m}")
    assert gs.dtype == s_d.dtype and gs.shape == s_d.shape
    assert torch.isfinite(gs).all()
    e = rel_norm(gs, s64.grad)
    assert e < gtol, f"student gradient relative-norm error {e:.3g}"
    if grad_teacher:
        assert gt.dtype == t_d.dtype and gt.shape == t_d.shape
        if t64.grad.norm() > 0:
            e = rel_norm(gt, t64.grad)
            assert e < gtol, f"teacher gradient relative-norm error {e:.3g}"
        else:
            assert (gt == 0).all()
    return loss, gs, gt


def logits(n, v, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def pair(n, v, seed=0):
    return logits(n, v, 3.0, seed), logits(n, v, 3.0, seed + 1)


# ----------------------------------------------------------------------------
# dense teacher
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DIVS))
@pytest.mark.parametrize("T", [1.0, 2.0, 3.0, 4.0, 2.5])
@pytest.mark.parametrize("grad_teacher", [True, False])
def test_dense_divergences_wide_rows(name, T, grad_teacher):
    """Every divergence, rows of three chunks with a ragged tail, ignore + sample weights, CE at T = 1 and T != 1
    (the CE's T = 1 sums and softmax come from the kept exps at T = 2, 3, 4, from their own exps at 2.5)."""
    n = 6
    s, t = pair(n, WIDE, seed=1)
    target = torch.tensor([5, -100, 4100, 0, 17, 2048])
    weight = torch.tensor([1.0, 3.0, 0.5, 2.0, 0.0, 1.5])
    check(name, s, t, T=T, target=target, sample_weight=weight, ce_weight=0.3, grad_teacher=grad_teacher)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("name", ["jsd0.5", "reverse_kl", "tvd", "kd"])
def test_dense_reductions(name, reduction):
    s, t = pair(5, 300, seed=2)
    target = torch.tensor([3, -100, 0, 299, 7])
    check(name, s, t, T=2.0, reduction=reduction, target=target, ce_weight=0.3)
    check(name, s, t, T=1.0, reduction=reduction)  # no target: hard = 0


@pytest.mark.parametrize("name", ["jsd0.5", "skew", "reverse_kl", "tvd", "kd"])
def test_dense_bf16(name):
    s, t = pair(4, WIDE, seed=3)
    check(name, s, t, dtype=torch.bfloat16, T=2.0, target=torch.tensor([1, 2, 3, 4]), ce_weight=0.3,
          loss_atol=1e-4)


def test_dense_mixed_dtypes():
    """bfloat16 student, float32 teacher: each side read (and its gradient written) in its own dtype."""
    s, t = pair(3, 700, seed=4)
    s = s.bfloat16().float()
    loss, soft, hard, gs, gt = call_op("jsd0.5", s.bfloat16(), t, T=2.0, grad_teacher=True)
    ref_loss, _, _, ref_gs, ref_gt = call_op("jsd0.5", s, t, T=2.0, grad_teacher=True)
    assert gs.dtype == torch.bfloat16 and gt.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss)
    assert rel_norm(gs, ref_gs) < 1e-2 and rel_norm(gt, ref_gt) < 1e-5


def test_dense_128k_row():
    """One vocabulary-sized row set (Llama 3: 128256) in float32, JSD and forward KL + CE."""
    s, t = pair(2, 128256, seed=5)
    target = torch.tensor([128255, 7])
    check("jsd0.9", s, t, T=1.0, target=target, ce_weight=0.3, grad_teacher=False)
    check("kd", s, t, T=2.0, target=target, ce_weight=0.1, grad_teacher=False)


@pytest.mark.parametrize("name", ["reverse_kl", "jsd0.1", "jsd0.5", "skew", "skew_rev", "tvd", "kd", "jeffreys",
                                  "triangular", "entropy_gated", "ab", "renyi"])
def test_dense_confident_and_masked(name):
    """Logit gaps of 100, -inf on either side (not on the same class), log-probs below -104."""
    V = WIDE
    s, t = pair(4, V, seed=6)
    s[0, 10] += 100.0  # student sure of one class
    t[1, 20] += 100.0  # teacher sure of another
    s[2, :50] = -INF   # masked vocab on the student side
    t[3, 60:90] = -INF  # and on the teacher side
    s[2, 3000] = t[2, 3000] = 200.0  # a shared class far above all others: the others' log-probs < -104
    s[3] *= 20.0  # spread: log-probs far below -104
    # (AB at (0.2, 0.7) and Renyi of order 1/2 are finite with one-sided mass: s, a, b > 0; r < 1)
    finite = name in ("tvd", "triangular", "ab", "renyi") or name in ("jsd0.1", "jsd0.5", "skew", "skew_rev")
    if finite:
        check(name, s, t, T=1.0, target=torch.tensor([10, 20, 3000, 1]), ce_weight=0.3)
        check(name, s, t, T=2.0)
    else:
        # reverse KL with a teacher -inf where the student has mass (or KD the other way) is infinite: compare
        # only the rows where it is finite
        # (Jeffreys: infinite where either net masks a class the other one covers)
        rows = {"kd": [0, 1, 3], "jeffreys": [0, 1], "entropy_gated": [0, 1]}.get(name, [0, 1, 2])
        check(name, s[rows], t[rows], T=2.0, target=torch.tensor([10, 20, 1, 1])[rows], ce_weight=0.3)


def test_masked_same_class_both_sides():
    """-inf on both sides of the same classes: those terms add exactly 0 for every divergence."""
    s, t = pair(3, 500, seed=7)
    s[:, 100:200] = -INF
    t[:, 100:200] = -INF
    for name in DIVS:
        _, gs, gt = check(name, s, t, T=2.0)
        assert (gs[:, 100:200] == 0).all() and (gt[:, 100:200] == 0).all()


def test_large_offset():
    """A common offset of 1e4: raw-unit maxima keep the float32 precision of the logits' spread."""
    s, t = pair(3, 1000, seed=8)
    s64, t64 = s.double() + 1e4, t.double() + 1e4
    for name in ("jsd0.5", "reverse_kl", "kd"):
        loss, _, _, gs, _ = call_op(name, s64.float(), t64.float(), T=2.0)
        ref = call_op(name, s64.float() - 1e4, t64.float() - 1e4, T=2.0)
        torch.testing.assert_close(loss, ref[0], rtol=1e-4, atol=1e-6)
        assert rel_norm(gs, ref[3]) < 1e-4


def test_non_contiguous_rows():
    """Row slices (unit column stride) are read in place, a transposed view is copied: same result."""
    s, t = pair(8, 600, seed=9)
    big_s, big_t = torch.zeros(8, 700), torch.zeros(8, 700)
    big_s[:, 50:650], big_t[:, 50:650] = s, t
    sv, tv = big_s[:, 50:650], big_t[:, 50:650]
    assert not sv.is_contiguous()
    want = call_op("jsd0.5", s, t, T=2.0, grad_teacher=True, target=torch.arange(8), ce_weight=0.3)
    got = call_op("jsd0.5", sv, tv, T=2.0, grad_teacher=True, target=torch.arange(8), ce_weight=0.3)
    st = s.t().contiguous().t()
    got2 = call_op("jsd0.5", st, t, T=2.0, grad_teacher=True, target=torch.arange(8), ce_weight=0.3)
    for g in (got, got2):
        for x, y in zip(g, want):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    check("tvd", sv, tv, T=2.0, target=torch.arange(8), ce_weight=0.3)


def test_skipped_rows_not_read():
    """A row with weight 0 (ignored target or sample weight 0) may hold NaN and an out-of-range target."""
    s, t = pair(4, 300, seed=10)
    s[1], t[2] = float("nan"), float("nan")
    target = torch.tensor([3, -100, 5, 10**9])
    weight = torch.tensor([1.0, 1.0, 0.0, 0.0])
    loss, soft, hard, gs, gt = call_op("jsd0.5", s, t, target=target, sample_weight=weight, ce_weight=0.3,
                                       grad_teacher=True, reduction="none")
    assert torch.isfinite(loss).all() and (loss[1:] == 0).all()
    assert (gs[1:] == 0).all() and (gt[1:] == 0).all() and torch.isfinite(gs).all()


def test_nan_propagates():
    s, t = pair(2, 300, seed=11)
    s[0, 7] = float("nan")
    t[1, 9] = float("nan")
    for name in ("reverse_kl", "jsd0.5", "tvd", "kd"):
        loss = call_op(name, s, t, reduction="none")[0]
        assert loss.isnan().all(), name


def test_cross_entropy_alone():
    """a = b = 0 (soft 0): the op is a fused cross-entropy; ce_weight 0 with a target still reports hard."""
    s, t = pair(5, WIDE, seed=12)
    target = torch.tensor([0, 1, 4000, -100, 4100])
    rw = row_weights(s, target, -100, None, "batchmean")
    loss, soft, hard, gs, _ = torch.ops.fastkd.divergence_fwd(s, t, torch.empty(0, dtype=torch.long), target, rw,
                                                              2.0, 0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 0, True, True,
                                                              False)
    s64 = s.double().requires_grad_(True)
    keep = target != -100
    ref = torch.nn.functional.cross_entropy(s64[keep], target[keep])
    ref.backward()
    assert soft.item() == 0.0
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(hard.double(), ref.detach(), rtol=1e-6, atol=0)
    assert rel_norm(gs, s64.grad) < 1e-5
    _, soft, hard, _, _ = call_op("jsd0.5", s, t, T=2.0, target=target, ce_weight=0.0)
    torch.testing.assert_close(hard.double(), ref.detach(), rtol=1e-6, atol=0)


def test_gradient_flags():
    """Gradients not asked for are empty; asking for one does not change the other or the loss."""
    s, t = pair(3, 500, seed=13)
    both = call_op("jsd0.5", s, t, T=2.0, grad_teacher=True)
    only_t = call_op("jsd0.5", s, t, T=2.0, grad_teacher=True, grad_student=False)
    none = call_op("jsd0.5", s, t, T=2.0, grad_student=False)
    assert only_t[3].numel() == 0 and none[3].numel() == 0 and none[4].numel() == 0
    torch.testing.assert_close(only_t[4], both[4], rtol=0, atol=0)
    torch.testing.assert_close(none[0], both[0], rtol=0, atol=0)


def test_errors_name_the_argument():
    s, t = pair(3, 50, seed=14)
    with pytest.raises(ValueError, match=r"target\[1\] = 50"):
        call_op("jsd0.5", s, t, target=torch.tensor([0, 50, 1]), ce_weight=0.3)
    with pytest.raises(ValueError, match=r"target\[2\] = -7"):
        call_op("tvd", s, t, target=torch.tensor([0, 1, -7]))
    with pytest.raises(ValueError, match="needs target"):
        call_op("tvd", s, t, ce_weight=0.5)
    ids = torch.tensor([[0, 1], [2, 50], [3, -1]])
    lp = torch.full((3, 2), -3.0)
    with pytest.raises(ValueError, match=r"topk_ids\[1, 1\].*= 50"):
        call_op("kd", s, lp, topk=(ids, 1))
    ids[1, 1] = -2
    with pytest.raises(ValueError, match=r"topk_ids\[1, 1\].*= -2"):
        call_op("reverse_kl", s, lp, topk=(ids, 2))
    # ... but not on a skipped row
    call_op("kd", s, lp, topk=(ids, 1), target=torch.tensor([0, -100, 1]))


# ----------------------------------------------------------------------------
# top-k teacher
# ----------------------------------------------------------------------------

def topk_teacher(t, k, T=1.0, pad_rows=(), drop=0.0, seed=0):
    """ids and log-probs of the k largest teacher classes at T, distinct, in shuffled order; padding rows."""
    lp_full = torch.log_softmax(t.double() / T, dim=1)
    vals, ids = lp_full.topk(k, dim=1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(k, generator=g)
    ids, vals = ids[:, perm].clone(), vals[:, perm].clone()
    if drop:
        vals = vals + math.log1p(-drop)  # the engine's log-probs sum to a bit less than the top-k mass
    for r, n_pad in pad_rows:
        ids[r, k - n_pad:] = -1
        vals[r, k - n_pad:] = float("nan")  # never read
    return ids, vals.float()


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("name", list(DIVS))
def test_topk_divergences(name, mode):
    n, V, k = 5, WIDE, 64
    s, t = pair(n, V, seed=20)
    ids, lp = topk_teacher(t, k, pad_rows=[(1, 10), (3, k)], seed=1)
    target = torch.tensor([4, 9, -100, 4100, 100])
    for T in (1.0, 2.0):
        check(name, s, lp, T=T, topk=(ids, mode), target=target, ce_weight=0.3)


@pytest.mark.parametrize("mode", [1, 2])
def test_topk_bf16_and_reductions(mode):
    s, t = pair(4, 3000, seed=21)
    ids, lp = topk_teacher(t, 16, pad_rows=[(2, 5)])
    for reduction in ("sum", "none", "mean"):
        check("kd", s, lp, T=2.0, topk=(ids, mode), reduction=reduction,
              sample_weight=torch.tensor([1.0, 0.0, 2.0, 0.5]))
    check("jsd0.5", s, lp.bfloat16(), dtype=torch.bfloat16, T=2.0, topk=(ids, mode), loss_atol=1e-4)


@pytest.mark.parametrize("rest", [1e-9, 1e-6, 1e-25])
@pytest.mark.parametrize("name", ["kd", "jsd0.5", "reverse_kl", "tvd"])
def test_topk_tail_holding_nearly_all_mass(name, rest):
    """The student's top-k holds all but `rest` of its mass (the teacher's too): the tail must be summed over the
    non-member ids themselves; total - top-k would cancel to 0 in float32 (KD: an infinite loss). 1e-25: a tail
    below 1e-20 of the mass takes the per-column exp of the tail (tail_grad_pass)."""
    if rest == 1e-25 and name == "reverse_kl":
        pytest.skip("the teacher's float32 log-probs then sum to >= 1: p_tail = 0 < q_tail, KL(q || p) is infinite")
    n, V, k = 3, 3000, 8
    g = torch.Generator().manual_seed(22)
    s = torch.randn(n, V, generator=g)
    # member logits high enough that the other ids carry `rest` of the mass
    s[:, :k] += math.log((V - k) / rest)
    t = s + 0.3 * torch.randn(n, V, generator=g)
    ids, lp = topk_teacher(t, k)
    assert set(ids[0].tolist()) == set(range(k))
    for T in (1.0,):
        check(name, s, lp, T=T, topk=(ids, 1))


def test_topk_128k():
    s, t = pair(2, 128256, seed=23)
    ids, lp = topk_teacher(t, 64, pad_rows=[(1, 3)])
    check("kd", s, lp, T=2.0, topk=(ids, 1), target=torch.tensor([3, 128255]), ce_weight=0.1)
    check("jsd0.5", s, lp, T=1.0, topk=(ids, 2), grad_teacher=False)


def test_topk_padding_only_row_and_full_teacher_mass():
    """A row of padding only has loss 0 and gradient 0; teacher log-probs summing to >= 1 give an empty tail."""
    s, t = pair(3, 400, seed=24)
    ids, lp = topk_teacher(t, 6, pad_rows=[(0, 6)])
    lp[1] = torch.log_softmax(torch.randn(6), 0) + 1e-6  # sums a hair above 1
    for name in ("kd", "jsd0.5", "skew", "skew_rev", "reverse_kl", "tvd"):
        loss, _, _, gs, gt = call_op(name, s, lp, topk=(ids, 1), reduction="none", grad_teacher=True)
        assert loss[0].abs() < 1e-6 and gs[0].abs().max() < 1e-7 and (gt[0] == 0).all()
        if name == "reverse_kl":  # KL(q || p) with p_tail = 0 < q_tail is infinite on row 1
            assert loss[1] == INF
            continue
        # the teacher gradient keeps its "+ a p_k" where the tail is clamped (see div_h_over_p)
        check(name, s, lp, topk=(ids, 1), T=2.0)


# ----------------------------------------------------------------------------
# through the public functionals (backend="cpu") and autograd
# ----------------------------------------------------------------------------

PUBLIC = {
    "reverse_kl": (fastkd.reverse_kl_loss, R.reverse_kl_loss, {}),
    "jsd": (fastkd.jsd_loss, R.jsd_loss, {"beta": 0.9}),
    "skew_rev": (fastkd.skew_kl_loss, R.skew_kl_loss, {"skew": 0.1, "reverse": True}),
    "tvd": (fastkd.tvd_loss, R.tvd_loss, {}),
    "entropy_gated": (fastkd.entropy_gated_kl_loss, R.entropy_gated_kl_loss,
                      {"alpha_min": 0.2, "alpha_max": 0.9, "tau": 0.3, "scale": 0.2}),
    "ab": (fastkd.ab_divergence_loss, R.ab_divergence_loss, {"alpha": 0.2, "beta": 0.7}),
    "renyi_rev": (fastkd.renyi_loss, R.renyi_loss, {"order": 2.0, "reverse": True}),
}


@pytest.mark.parametrize("topk_mode", [None, "tail", "renormalize"])
@pytest.mark.parametrize("name", list(PUBLIC) + ["kd"])
def test_public_api_cpu_backend(name, topk_mode):
    """3-D bf16/fp32 inputs, ignore_index, sample weights, ce_weight, return_parts, backward through autograd."""
    B, S, V = 2, 3, 2 * 2048 + 5
    s, t = pair(B * S, V, seed=30)
    s, t = s.reshape(B, S, V), t.reshape(B, S, V)
    target = torch.tensor([[1, -100, 7], [4100, 0, 3]])
    weight = torch.tensor([[1.0, 2.0, 0.5], [1.0, 0.0, 3.0]])
    if topk_mode is not None:
        ids, lp = topk_teacher(t.reshape(B * S, V), 32, pad_rows=[(2, 4)])
        t = TopKTeacher(ids.reshape(B, S, 32), lp.reshape(B, S, 32), mode=topk_mode)
    kw = dict(target=target, sample_weight=weight, ce_weight=0.3, return_parts=True)
    s32 = s.clone().requires_grad_(True)
    s64 = s.double().requires_grad_(True)
    t64 = t if topk_mode is not None else t.double()
    if name == "kd":
        if topk_mode is not None:
            t64 = TopKTeacher(t.indices, t.logprobs.double(), mode=topk_mode)
        got = fastkd.kd_loss(s32, t, 2.0, backend="cpu", **kw)
        want = (R.kd_topk_loss(s64, t64, 2.0, **kw) if topk_mode is not None
                else fastkd.reference.kd_loss(s64, t64, 2.0, **kw))
    else:
        fn, ref, params = PUBLIC[name]
        if topk_mode is not None:
            t64 = TopKTeacher(t.indices, t.logprobs.double(), mode=topk_mode)
        got = fn(s32, t, temperature=2.0, backend="cpu", **params, **kw)
        want = ref(s64, t64, temperature=2.0, **params, **kw)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y.double(), rtol=2e-5, atol=1e-6)
    (got.loss * 0.7).backward()
    (want.loss * 0.7).backward()
    assert rel_norm(s32.grad, s64.grad) < 1e-5


@pytest.mark.parametrize("T", [1.0, 2.0, 3.0, 4.0, 2.5])
def test_forward_kl_ce_fast_path(T):
    """Forward KL without a teacher gradient runs KD's two-pass row with the CE folded in (its exps at T = 1 as
    powers of those at 1/T for T in 1..4): against the reference and the general path (with a teacher gradient)."""
    s, t = pair(5, WIDE, seed=40)
    t[1, :30] = -INF  # masked teacher vocab (a masked student under a live teacher: KL infinite)
    target = torch.tensor([0, 40, -100, 4100, 9])
    weight = torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0])
    check("kd", s, t, T=T, target=target, sample_weight=weight, ce_weight=0.1, grad_teacher=False)
    fast = call_op("kd", s, t, T=T, target=target, ce_weight=0.1, reduction="none")
    general = call_op("kd", s, t, T=T, target=target, ce_weight=0.1, reduction="none", grad_teacher=True)
    for x, y in zip(fast[:4], general[:4]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
    # the CE alone through the same path (a = b = 0, w_p = 0)
    rw = row_weights(s, target, -100, None, "sum")
    loss, soft, hard, gs, _ = torch.ops.fastkd.divergence_fwd(s, t, torch.empty(0, dtype=torch.long), target, rw,
                                                              T, 0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0, True, True,
                                                              False)
    s64 = s.double().requires_grad_(True)
    keep = target != -100
    ref = torch.nn.functional.cross_entropy(s64[keep], target[keep], reduction="sum")
    ref.backward()
    assert soft.item() == 0.0
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    assert rel_norm(gs, s64.grad) < 1e-5


@pytest.mark.parametrize("op", ["cpu", "triton"])
def test_power_kinds_refuse_bad_parameters(op):
    """The op itself: kind 5 (Renyi's internal gradient pass) is no argument, Renyi's order must be finite and > 0,
    the AB divergence's alpha and beta finite (the Python layer checks them first; the op does too)."""
    if op == "triton":
        from fastkd.triton.divergence import divergence_fwd as fwd
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton op on CPU tensors needs the interpreter")
    else:
        fwd = torch.ops.fastkd.divergence_fwd
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    empty, w = torch.empty(0, dtype=torch.int64), torch.ones(2)
    for kind, a, b, word in ((5, 0.5, 0.0, "kind"), (6, 0.0, 0.0, "order"), (6, INF, 0.0, "order"),
                             (4, float("nan"), 0.5, "alpha"), (4, 0.5, INF, "alpha")):
        with pytest.raises((ValueError, RuntimeError), match=word):
            fwd(s, t, empty, empty, w, 1.0, kind, a, b, 0.0, 0.0, 1.0, 0.0, 0, True, True, False)


def test_two_pass_jeffreys_near_coinciding_nets():
    """The CPU's two-pass Jeffreys takes both KLs from the statistics pass's cross terms: L_s - L_t must be one log
    of the sums' ratio (two logs of ~log V each left a 1e-7 floor: a loss of 1e-10 came out 0, one of 1e-6 2e-3 off)."""
    from fastkd.dispatch.backend import unavailable_reason
    if unavailable_reason("cpu", "jeffreys", torch.device("cpu")):
        pytest.skip("no compiled CPU jeffreys")
    g = torch.Generator().manual_seed(0)
    s = 3 * torch.randn(3, 5000, generator=g)
    for eps, bound in ((1e-5, 0.05), (1e-3, 2e-3), (1e-2, 1e-4)):
        t = s + eps * torch.randn(3, 5000, generator=g)
        got = fastkd.jeffreys_loss(s, t, reduction="none", backend="cpu").double()
        want = fastkd.jeffreys_loss(s.double(), t.double(), reduction="none", backend="reference")
        assert ((got - want).abs() / want).max() < bound, (eps, got, want)
