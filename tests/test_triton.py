"""The Triton row ops (fastkd.triton) against fastkd.reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on
CPU tensors; with FASTKD_GPU_TESTS=1 on a GPU machine the same tests run on CUDA
tensors, plus the GPU-only checks at the end (opcheck, torch.compile).
Each case calls the op the way fastkd.functional does (rows, row weights from
fastkd.core.checks) and compares the loss and, through autograd, the gradients.
"""
import os

import pytest
import torch

from backend_cases import TOLERANCES
from fastkd import reference
from fastkd.core import mask as _mask
from fastkd.dispatch import ops as _ops
from fastkd.core.rows import row_weights, temperature_rows

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402  (after the TRITON_INTERPRET decision)
import triton.language as tl  # noqa: E402

import fastkd.triton as ft  # noqa: E402
import fastkd.triton.dist as ft_dist  # noqa: E402
from fastkd.triton.mgd import keep_mask  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRET else "cuda")
GPU_ONLY = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                              reason="needs a CUDA GPU, not the interpreter")
# The interpreter evaluates masked lanes too (-inf - -inf, log 0): numpy warns, results are masked.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SHAPES = [(3, 7), (4, 401), (2, 1271), (5, 1)]
WIDE = (1, 131072)
DTYPE_PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (BF16, F32), (F16, BF16)]


def logits(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def worst(*dtypes):
    """The least precise dtype among the inputs: its tolerance applies."""
    order = [F32, F16, BF16]
    return max(dtypes, key=order.index)


def assert_close(actual, expected, dtype=F32):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=True)


def grads_of(out, inputs, upstream=None):
    """d(out)/d(inputs) with ``upstream`` as the incoming gradient (None: 1 / ones)."""
    if upstream is None:
        upstream = torch.ones_like(out)
    wanted = [x for x in inputs if x.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, upstream))
    return [next(got) if x.requires_grad else None for x in inputs]


def rel_err(g, r):
    """||g - r|| / ||r|| in float64 (0 when both are 0)."""
    g, r = g.detach().double().cpu(), r.detach().double().cpu()
    return float((g - r).norm() / r.norm()) if r.norm() > 0 else float(g.norm())


def leaf(x, requires_grad=True):
    return x.detach().clone().requires_grad_(requires_grad)


# ----------------------------------------------------------------------------
# KD
# ----------------------------------------------------------------------------

def kd_case(s, t, temperature, reduction="batchmean", target=None, sample_weight=None, upstream=None,
            grad_teacher=True, ignore_index=-100, impls=("triton", "reference")):
    """(loss, [ds, dt, dT]) of the Triton op and of the reference on the same inputs."""
    results = []
    for impl in impls:
        si, ti, temp = leaf(s), leaf(t, grad_teacher), leaf(temperature)
        if impl == "triton":
            w = row_weights(si, target, ignore_index, sample_weight, reduction)
            rows = temperature_rows(temp, si)
            loss = ft.kd_fwd(si, ti, rows, w, reduction != "none", True, grad_teacher, True)[0]
        else:
            loss = reference.kd_loss(si, ti, temp, reduction=reduction, target=target,
                                     ignore_index=ignore_index, sample_weight=sample_weight)
        results.append((loss, grads_of(loss, [si, ti, temp], upstream)))
    return results


def check_pair(triton_result, reference_result, dtypes):
    (loss, grads), (ref_loss, ref_grads) = triton_result, reference_result
    assert loss.dtype == F32
    assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None
            continue
        assert g.dtype == r.dtype and g.shape == r.shape
        assert_close(g, r, worst(g.dtype, *dtypes))


@pytest.mark.parametrize("shape", SHAPES + [WIDE], ids=str)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_kd_matches_reference(shape, dtypes):
    s, t = logits(shape, dtypes[0], 0), logits(shape, dtypes[1], 1)
    n = shape[0]
    temperature = (1.0 + 3.0 * torch.rand(n, generator=torch.Generator().manual_seed(2))).to(DEVICE)
    check_pair(*kd_case(s, t, temperature), dtypes)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_kd_ignore_index_sample_weight_reductions(reduction):
    s, t = logits((6, 33), F32, 3), logits((6, 33), F32, 4)
    target = torch.tensor([1, -100, 5, 0, -100, 32], device=DEVICE)
    # Ignored rows are never read: NaN there must not reach the loss or the gradients.
    s[1], t[4] = float("nan"), float("nan")
    weight = torch.tensor([0.5, 2.0, 0.0, 1.5, 3.0, 1.0], device=DEVICE)
    upstream = torch.rand(6, generator=torch.Generator().manual_seed(5)).to(DEVICE) if reduction == "none" else None
    tri, ref = kd_case(s, t, torch.tensor(2.5, device=DEVICE), reduction, target, weight, upstream)
    check_pair(tri, ref, [F32])
    assert torch.isfinite(tri[0]).all()
    assert (tri[1][0][[1, 2, 4]] == 0).all()  # ignored and zero-weight rows: zero gradient


def test_kd_neg_inf_logits():
    # Teacher -inf (p_t = 0) terms add nothing; student -inf there too is fine.
    s, t = logits((4, 50), F32, 6), logits((4, 50), F32, 7)
    t[:, :10] = float("-inf")
    s[:, :5] = float("-inf")
    temperature = torch.tensor([1.0, 2.0, 4.0, 0.5], device=DEVICE)
    tri, ref_inf = kd_case(s, t, temperature)
    assert torch.isfinite(tri[0]) and all(torch.isfinite(g).all() for g in tri[1])
    assert_close(tri[0], ref_inf[0])
    # The reference's temperature gradient is NaN here (0 * inf in t / T); a huge
    # finite logit gives the same limit through it.
    _, ref = kd_case(s.nan_to_num(neginf=-1e30), t.nan_to_num(neginf=-1e30), temperature)
    check_pair(tri, ref, [F32])


def test_kd_student_neg_inf_where_teacher_has_mass_is_inf():
    s, t = logits((2, 9), F32, 8), logits((2, 9), F32, 9)
    s[0, 3] = float("-inf")
    w = torch.ones(2, device=DEVICE)
    loss = ft.kd_fwd(s, t, torch.ones(2, device=DEVICE), w, False, False, False, False)[0]
    assert loss[0] == float("inf") and torch.isfinite(loss[1])


def test_kd_confident_rows_gap_100():
    s, t = logits((3, 20), F32, 10), logits((3, 20), F32, 11)
    t[:, 4] += 100.0
    s[0, 7] += 100.0  # student confidently wrong
    s[1, 4] += 100.0  # student confidently right
    (tri,) = kd_case(s, t, torch.ones(3, device=DEVICE), impls=("triton",))
    assert all(torch.isfinite(g).all() for g in tri[1]) and torch.isfinite(tri[0])
    # float64 reference: the exact values, which the float32 kernel must reach.
    (ref,) = kd_case(s.double(), t.double(), torch.ones(3, device=DEVICE, dtype=torch.float64),
                     impls=("reference",))
    assert_close(tri[0], ref[0])
    for g, r in zip(tri[1], ref[1]):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("offset", [1e3, 1e4])
@pytest.mark.parametrize("temp_value", [2.0, 4.0])
def test_kd_large_common_offset(offset, temp_value):
    # Logits far from 0 (a common offset): s / T rounded before the lse shift loses the
    # digits that matter (ulp(1e4 / 2) = 2.4e-4 against O(1) differences). The kernel
    # shifts the raw logits by the row maximum before scaling. Float64 reference on the
    # same float32 values.
    s, t = logits((6, 300), F32, 16) + offset, logits((6, 300), F32, 17) + offset
    t[:, 7] += 4.0  # a sharper teacher: a larger temperature gradient to compare
    temp = torch.tensor(temp_value, device=DEVICE)
    (tri,) = kd_case(s, t, temp, impls=("triton",))
    (ref,) = kd_case(s.double(), t.double(), temp.double(), impls=("reference",))
    loss, ref_loss = float(tri[0].detach()), float(ref[0].detach())
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert rel_err(tri[1][0], ref[1][0]) < 1e-5  # student
    assert rel_err(tri[1][1], ref[1][1]) < 1e-5  # teacher
    # dL/dT is a sum of terms that cancel: a looser bound (was up to 1.7e-3, now < 5e-5)
    assert abs(float(tri[1][2]) - float(ref[1][2])) <= 2e-4 * abs(float(ref[1][2]))


def test_kd_nan_propagates():
    s, t = logits((3, 8), F32, 12), logits((3, 8), F32, 13)
    t[1, 2] = float("nan")
    loss = ft.kd_fwd(s, t, torch.full((3,), 2.0, device=DEVICE), torch.ones(3, device=DEVICE),
                     False, True, True, True)
    assert torch.isnan(loss[0][1]) and torch.isfinite(loss[0][[0, 2]]).all()
    assert torch.isnan(loss[1][1]).any() and torch.isfinite(loss[1][[0, 2]]).all()


def test_kd_unrequested_gradients_are_empty():
    s, t = logits((3, 8), F32, 14), logits((3, 8), BF16, 15)
    si = leaf(s)
    loss, gs, gt, gtemp = ft.kd_fwd(si, t, torch.full((3,), 2.0, device=DEVICE), torch.ones(3, device=DEVICE),
                                   True, True, False, False)
    assert gs.shape == s.shape and gt.numel() == 0 and gtemp.numel() == 0 and gt.dtype == BF16
    (ds,) = torch.autograd.grad(loss, [si])
    torch.testing.assert_close(ds, gs)  # incoming gradient 1: the stored gradient itself


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_backward_scales_in_float32(dtype):
    # A loss weight such as 0.9 must scale a half-precision gradient in float32, not after
    # rounding 0.9 itself to half precision (a bias of 1e-4 in f16, 2e-3 in bf16).
    # Exact comparison for float16 only: the interpreter rounds float32 -> bfloat16 by
    # truncation (a GPU rounds to nearest), so bfloat16 gets one ulp of slack there.
    s, t = logits((4, 300), dtype, 16), logits((4, 300), dtype, 17)
    si = leaf(s)
    temp, w = torch.full((4,), 2.0, device=DEVICE), torch.full((4,), 0.25, device=DEVICE)
    tol = dict(atol=0, rtol=0) if dtype == F16 or not INTERPRET else dict(atol=1e-6, rtol=2**-7)
    for reduce, up in [(True, torch.tensor(0.9, device=DEVICE)),
                       (False, torch.tensor([1.0, 0.0, -2.0, 0.3], device=DEVICE))]:
        # reduce=False: one incoming value per row scales that row
        loss, gs, _, _ = ft.kd_fwd(si, t, temp, w, reduce, True, False, False)
        # before backward: it scales the stored gradient gs in place
        expected = (gs.float() * (up if reduce else up[:, None])).to(dtype)
        naive = gs * up.to(dtype) if reduce else None
        (ds,) = torch.autograd.grad(loss, [si], up)
        assert ds.dtype == dtype
        torch.testing.assert_close(ds, expected, **tol)
        if dtype == F16 and reduce:
            assert not torch.equal(naive, expected)  # the test can tell the two apart


def test_empty_batch():
    s = torch.zeros((0, 5), device=DEVICE)
    loss, gs, gt, gtemp = ft.kd_fwd(s, s, torch.ones(0, device=DEVICE), torch.ones(0, device=DEVICE),
                                   True, True, True, True)
    assert loss.item() == 0.0 and gs.shape == (0, 5)
    loss, gs, gt = ft.dist_fwd(s, s, 1.0, 1.0, 1.0, True, True)
    assert loss.item() == 0.0 and gs.shape == (0, 5)


# ----------------------------------------------------------------------------
# ATS
# ----------------------------------------------------------------------------

def ats_case(s, t, target, reduction="batchmean", sample_weight=None, temps=(1.5, 4.0, 2.0), upstream=None):
    results = []
    for impl in ("triton", "reference"):
        si, ti = leaf(s), leaf(t)
        if impl == "triton":
            w = row_weights(si, target, -100, sample_weight, reduction)
            loss = ft.ats_fwd(si, ti, target, w, *temps, reduction != "none", True, True)[0]
        else:
            loss = reference.ats_loss(si, ti, target, student_temperature=temps[0], target_temperature=temps[1],
                                      other_temperature=temps[2], reduction=reduction, sample_weight=sample_weight)
        results.append((loss, grads_of(loss, [si, ti], upstream)))
    return results


@pytest.mark.parametrize("shape", SHAPES + [WIDE], ids=str)
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F16)], ids=["f32", "bf16-f16"])
def test_ats_matches_reference(shape, dtypes):
    s, t = logits(shape, dtypes[0], 20), logits(shape, dtypes[1], 21)
    target = torch.randint(0, shape[1], (shape[0],), generator=torch.Generator().manual_seed(22)).to(DEVICE)
    check_pair(*ats_case(s, t, target), dtypes)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_ats_ignored_rows_out_of_range_target(reduction):
    s, t = logits((5, 40), F32, 23), logits((5, 40), F32, 24)
    target = torch.tensor([3, -100, 39, -100, 0], device=DEVICE)
    s[3] = float("nan")
    weight = torch.tensor([1.0, 1.0, 0.5, 2.0, 0.0], device=DEVICE)
    up = torch.rand(5, generator=torch.Generator().manual_seed(25)).to(DEVICE) if reduction == "none" else None
    tri, ref = ats_case(s, t, target, reduction, weight, upstream=up)
    check_pair(tri, ref, [F32])


# ----------------------------------------------------------------------------
# DKD
# ----------------------------------------------------------------------------

def dkd_case(s, t, target, reduction="batchmean", sample_weight=None, alpha=1.0, beta=8.0, temperature=4.0,
             upstream=None, impls=("triton", "reference")):
    results = []
    for impl in impls:
        si, ti = leaf(s), leaf(t)
        if impl == "triton":
            w = row_weights(si, target, -100, sample_weight, reduction)
            loss = ft.dkd_fwd(si, ti, target, w, alpha, beta, temperature, reduction != "none", True, True)[0]
        else:
            loss = reference.dkd_loss(si, ti, target, alpha=alpha, beta=beta, temperature=temperature,
                                      reduction=reduction, sample_weight=sample_weight)
        results.append((loss, grads_of(loss, [si, ti], upstream)))
    return results


@pytest.mark.parametrize("shape", [(3, 7), (4, 401), (2, 1271), (5, 2), WIDE], ids=str)
@pytest.mark.parametrize("dtypes", [(F32, F32), (F16, F16), (BF16, F32)], ids=["f32", "f16", "bf16-f32"])
def test_dkd_matches_reference(shape, dtypes):
    s, t = logits(shape, dtypes[0], 30), logits(shape, dtypes[1], 31)
    target = torch.randint(0, shape[1], (shape[0],), generator=torch.Generator().manual_seed(32)).to(DEVICE)
    check_pair(*dkd_case(s, t, target, alpha=0.5, beta=2.0, temperature=2.0), dtypes)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_dkd_ignored_rows_and_weights(reduction):
    s, t = logits((6, 30), F32, 33), logits((6, 30), F32, 34)
    target = torch.tensor([0, -100, 29, 7, -100, 12], device=DEVICE)
    s[1], t[4] = float("nan"), float("nan")
    weight = torch.tensor([1.0, 1.0, 0.5, 0.0, 3.0, 2.0], device=DEVICE)
    up = torch.rand(6, generator=torch.Generator().manual_seed(35)).to(DEVICE) if reduction == "none" else None
    check_pair(*dkd_case(s, t, target, reduction, weight, upstream=up), [F32])


def test_dkd_confident_rows_are_finite_and_exact():
    # A gap of 100 at T=1: 1 - p_g underflows in float32 unless taken as lse(non-target) - lse(all).
    s, t = logits((4, 50), F32, 36), logits((4, 50), F32, 37)
    target = torch.tensor([3, 10, 20, 49], device=DEVICE)
    for i, g in enumerate(target.tolist()):
        t[i, g] += 100.0
    s[0, 3] += 100.0   # confident and right
    s[1, 11] += 100.0  # confident and wrong
    s[2, 20] += 30.0
    (tri,) = dkd_case(s, t, target, temperature=1.0, impls=("triton",))
    assert torch.isfinite(tri[0]) and all(torch.isfinite(g).all() for g in tri[1])
    (ref,) = dkd_case(s.double(), t.double(), target, temperature=1.0, impls=("reference",))
    assert_close(tri[0], ref[0])
    for g, r in zip(tri[1], ref[1]):
        torch.testing.assert_close(g.double(), r, atol=1e-5, rtol=1e-4)


def test_dkd_neg_inf_logits():
    s, t = logits((3, 20), F32, 38), logits((3, 20), F32, 39)
    target = torch.tensor([0, 5, 19], device=DEVICE)
    t[:, 10:14] = float("-inf")
    s[:, 12:16] = float("-inf")
    # student -inf at 14, 15 where the teacher has mass: the loss is +inf, like the reference
    w = torch.ones(3, device=DEVICE)
    loss = ft.dkd_fwd(s, t, target, w, 1.0, 8.0, 4.0, True, False, False)[0]
    assert loss == float("inf") and reference.dkd_loss(s, t, target) == float("inf")
    # teacher -inf (zero probability) terms add nothing, also where the student is -inf
    s[:, 14:16] = 0.0
    (tri,) = dkd_case(s, t, target, impls=("triton",))
    assert torch.isfinite(tri[0]) and all(torch.isfinite(g).all() for g in tri[1])
    (ref,) = dkd_case(s.nan_to_num(neginf=-1e30), t.nan_to_num(neginf=-1e30), target, impls=("reference",))
    check_pair(tri, ref, [F32])


CPU_DKD = pytest.mark.skipif(not _ops.has_kernel("dkd_fwd", "CPU"), reason="fastkd._C without the CPU DKD kernel")


def one_hot_rows(x, target):
    """x with every non-target logit -inf (a masked vocabulary / one-hot net)."""
    keep = torch.nn.functional.one_hot(target, x.shape[1]).bool()
    return x.masked_fill(~keep, float("-inf"))


@CPU_DKD
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("empty_side", ["teacher", "student", "both"])
def test_dkd_empty_non_target_matches_cpu_kernel(empty_side, dtype):
    # All non-target logits -inf on one side: Triton must give the CPU kernel's values
    # (finite gradients; before the fix log q = -inf - -inf made them NaN).
    n, c = 4, 37
    s, t = logits((n, c), dtype, 42), logits((n, c), dtype, 43)
    target = torch.tensor([0, 5, 36, 17], device=DEVICE)
    if empty_side in ("teacher", "both"):
        t = one_hot_rows(t, target)
    if empty_side in ("student", "both"):
        s = one_hot_rows(s, target)
    w = torch.tensor([0.25, 0.5, 1.0, 2.0], device=DEVICE)
    args = (1.0, 8.0, 4.0, False, True, True)
    tri = ft.dkd_fwd(s, t, target, w, *args)
    cpu = torch.ops.fastkd.dkd_fwd(s.cpu(), t.cpu(), target.cpu(), w.cpu(), *args)
    for x, y in zip(tri, cpu):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x.cpu(), y, atol=TOLERANCES[dtype][0], rtol=TOLERANCES[dtype][1], equal_nan=True)
    if empty_side != "student":
        # the student's non-target gradient is finite wherever the teacher's side is
        assert torch.isfinite(tri[0]).all() and torch.isfinite(tri[1]).all() and torch.isfinite(tri[2]).all()
        ref = reference.dkd_loss(s.double(), t.double(), target, alpha=1.0, beta=8.0, temperature=4.0,
                                 reduction="none") * w
        assert_close(tri[0], ref)
    else:
        # the teacher has mass where the student has none: only the student's gradient is defined
        assert torch.isfinite(tri[1]).all()
    if empty_side == "teacher":
        # p_tg = 1, NCKD = 0: dL/ds = w * alpha * T * (softmax(s/T) - onehot), dL/dt = 0 (float64 oracle)
        p = torch.softmax(s.double() / 4.0, dim=1) - torch.nn.functional.one_hot(target, c).double()
        expected = w.double()[:, None] * 4.0 * p
        assert rel_err(tri[1], expected) < (1e-5 if dtype == F32 else 1e-2)
        assert (tri[2] == 0).all()


@pytest.mark.parametrize("loss_name", ["dkd", "ats"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_out_of_range_target_gives_nan_rows(loss_name, dtype):
    # The row op trusts nothing: a counted row (weight != 0) with target -5 or C reads
    # no logit and gets NaN loss and gradients (as the CUDA kernel); a weight-0 row with
    # a garbage target is skipped (0). Rows 0-2 hold real logits, so an unchecked read
    # (s_row + C is the next row's first logit) gives a finite, wrong loss instead.
    n, c = 5, 29
    s, t = logits((n, c), dtype, 44), logits((n, c), dtype, 45)
    target = torch.tensor([-5, c, 3, 10**12, 0], device=DEVICE)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0], device=DEVICE)
    if loss_name == "dkd":
        op, extra = ft.dkd_fwd, (1.0, 8.0, 4.0)
        ref = reference.dkd_loss(s.double(), t.double(), target.clamp(0, c - 1), alpha=1.0, beta=8.0,
                                 temperature=4.0, reduction="none")
    else:
        op, extra = ft.ats_fwd, (1.0, 4.0, 2.0)
        ref = reference.ats_loss(s.double(), t.double(), target.clamp(0, c - 1), student_temperature=1.0,
                                 target_temperature=4.0, other_temperature=2.0, reduction="none")
    loss, gs, gt = op(s, t, target, w, *extra, False, True, True)
    bad, good, skipped = [0, 1], [2, 4], 3
    assert torch.isnan(loss[bad]).all() and torch.isnan(gs[bad]).all() and torch.isnan(gt[bad]).all()
    assert loss[skipped] == 0 and (gs[skipped] == 0).all() and (gt[skipped] == 0).all()
    assert_close(loss[good], (ref * w.double())[good], dtype)
    assert torch.isfinite(gs[good]).all() and torch.isfinite(gt[good]).all()
    # loss only (no gradient pass), reduced: the bad rows make the sum NaN
    assert torch.isnan(op(s, t, target, w, *extra, True, False, False)[0])
    # the same rows without the bad ones: gradients of the good rows do not change
    w_good = w * torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0], device=DEVICE)
    _, gs_good, gt_good = op(s, t, target, w_good, *extra, False, True, True)
    assert torch.equal(gs[good], gs_good[good]) and torch.equal(gt[good], gt_good[good])


def test_dkd_nan_propagates():
    s, t = logits((3, 8), F32, 40), logits((3, 8), F32, 41)
    s[2, 1] = float("nan")
    target = torch.tensor([0, 1, 2], device=DEVICE)
    loss = ft.dkd_fwd(s, t, target, torch.ones(3, device=DEVICE), 1.0, 8.0, 4.0, False, False, False)[0]
    assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()


# ----------------------------------------------------------------------------
# DIST
# ----------------------------------------------------------------------------

def dist_case(s, t, beta=1.0, gamma=2.0, temperature=2.0, upstream=None):
    """Triton result, and the reference in float64 (DIST's gradient amplifies float32 rounding)."""
    results = []
    for impl in ("triton", "reference"):
        si, ti = (leaf(s), leaf(t)) if impl == "triton" else (leaf(s.double()), leaf(t.double()))
        if impl == "triton":
            loss = ft.dist_fwd(si, ti, beta, gamma, temperature, True, True)[0]
        else:
            loss = reference.dist_loss(si, ti, beta=beta, gamma=gamma, temperature=temperature)
        up = None if upstream is None else torch.tensor(upstream, dtype=loss.dtype, device=DEVICE)
        results.append((loss, grads_of(loss, [si, ti], up)))
    return results


def check_dist(tri, ref, dtypes):
    (loss, grads), (ref_loss, ref_grads) = tri, ref
    assert loss.dtype == F32 and loss.dim() == 0
    assert_close(loss, ref_loss)
    for g, r, dtype in zip(grads, ref_grads, dtypes):
        assert g.dtype == dtype
        assert_close(g, r, dtype)


@pytest.mark.parametrize("shape", [(3, 7), (5, 401), (4, 1271), (6, 1), (1, 131072)], ids=str)
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, BF16), (F16, F32)], ids=["f32", "bf16", "f16-f32"])
def test_dist_matches_reference(shape, dtypes):
    s, t = logits(shape, dtypes[0], 50), logits(shape, dtypes[1], 51)
    check_dist(*dist_case(s, t), dtypes)


def test_dist_many_rows_and_slices(monkeypatch):
    # Rows split into several slices (merged in PyTorch) ...
    s, t = logits((70, 150), F32, 52), logits((70, 150), F32, 53)
    check_dist(*dist_case(s, t, beta=2.0, gamma=0.5, temperature=4.0, upstream=0.7), [F32, F32])
    # ... and one slice of many tiles (merged in the kernel).
    monkeypatch.setattr(ft_dist, "STATS_TARGET_PROGRAMS", 1)
    check_dist(*dist_case(s, t, beta=2.0, gamma=0.5, temperature=4.0, upstream=0.7), [F32, F32])


def test_dist_one_row():
    # One row: every class's values are constant over the batch, so the intra term
    # has zero correlation and zero gradient, as in the reference.
    s, t = logits((1, 30), F32, 54), logits((1, 30), F32, 55)
    check_dist(*dist_case(s, t, beta=0.0), [F32, F32])
    check_dist(*dist_case(s, t), [F32, F32])


def test_dist_nan_propagates():
    s, t = logits((4, 8), F32, 58), logits((4, 8), F32, 59)
    t[3, 3] = float("nan")
    loss, gs, _ = ft.dist_fwd(s, t, 1.0, 1.0, 1.0, True, False)
    assert torch.isnan(loss)


# ----------------------------------------------------------------------------
# MGD
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("mask_type", ["channel", "spatial"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_mgd_mask_bit_exact(mask_type, dtype):
    x = logits((3, 5, 4, 6), dtype, 60, scale=1.0)
    for seed, ratio in [(0, 0.15), (1, 0.5), (2**31 - 2, 0.65), (2**40 + 17, 0.999), (2**63 - 1, 0.0)]:
        keep = reference.mgd_keep_mask(seed, x.shape, ratio, mask_type, device=DEVICE, dtype=dtype)
        out = ft.mgd_mask(x, seed, ratio, mask_type == "spatial")
        assert out.dtype == dtype
        assert torch.equal(out, x * keep), (seed, ratio)


@triton.jit(do_not_specialize=["seed_mix", "threshold"])
def _mask_probe(OUT, base, seed_mix, threshold, BLOCK: tl.constexpr):
    # the in-kernel keep decision for indices base .. base + BLOCK - 1
    index = base + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(OUT + tl.arange(0, BLOCK), keep_mask(index, seed_mix.to(tl.uint32), threshold.to(tl.uint32)))


def test_mgd_mask_hash_high_index_bits():
    # Indices past 2^32 use the high word; check the in-kernel hash against fastkd.core.mask there.
    seed, ratio = 12345, 0.5
    for base in [0, 2**32 - 8, 3 * 2**32 + 5, 2**45]:
        out = torch.zeros(64, dtype=torch.bool, device=DEVICE)
        _mask_probe[(1,)](out, base, _mask.mix_int(seed), _mask.mask_threshold(ratio), BLOCK=64)
        index = torch.arange(base, base + 64, dtype=torch.int64, device=DEVICE)
        expected = _mask.mask_hash(seed, index) >= _mask.mask_threshold(ratio)
        assert torch.equal(out, expected), base
        assert 0 < int(expected.sum()) < 64  # the probe can tell kept from dropped


def test_mgd_mask_backward_regenerates_the_mask():
    x = leaf(logits((2, 6, 3, 3), F32, 61))
    up = logits((2, 6, 3, 3), F32, 62)
    for spatial in (False, True):
        out = ft.mgd_mask(x, 99, 0.4, spatial)
        (dx,) = torch.autograd.grad(out, [x], up)
        keep = reference.mgd_keep_mask(99, x.shape, 0.4, "spatial" if spatial else "channel", device=DEVICE)
        assert torch.equal(dx, up * keep)


@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F32), (F16, F16)], ids=["f32", "bf16-f32", "f16"])
def test_mgd_sq_err(dtypes):
    pred = leaf(logits((3, 4, 5, 7), dtypes[0], 63, scale=1.0))
    teacher = leaf(logits((3, 4, 5, 7), dtypes[1], 64, scale=1.0))
    loss, gp, gt = ft.mgd_sq_err(pred, teacher, 0.25, True, True)
    diff = pred.detach().double() - teacher.detach().double()
    assert loss.dtype == F32 and loss.dim() == 0
    assert_close(loss, 0.25 * (diff * diff).sum())
    dp, dt = torch.autograd.grad(loss * 3.0, [pred, teacher])
    assert dp.dtype == dtypes[0] and dt.dtype == dtypes[1]
    assert_close(dp, 3.0 * 0.5 * diff, worst(*dtypes))
    assert_close(dt, -3.0 * 0.5 * diff, worst(*dtypes))
    # only what is asked for is computed
    _, gp, gt = ft.mgd_sq_err(pred, teacher, 0.25, True, False)
    assert gp.shape == pred.shape and gt.numel() == 0


def test_mgd_sq_err_many_programs():
    # more than one program: partial sums are added up
    pred, teacher = logits((2, 8, 30, 30), F32, 65, 1.0), logits((2, 8, 30, 30), F32, 66, 1.0)
    loss = ft.mgd_sq_err(pred, teacher, 1e-3, False, False)[0]
    assert_close(loss, 1e-3 * ((pred.double() - teacher.double()) ** 2).sum())


# ----------------------------------------------------------------------------
# Row strides: views whose rows are unit-stride are read in place
# ----------------------------------------------------------------------------

class _LaunchSpy:
    """Stands in for ``wrap_triton`` in a launcher module: records the first two
    (tensor) arguments of every launch, then launches as usual."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, kernel):
        launcher = self.real(kernel)
        spy = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    spy.calls.append(args[:2])
                    return launcher[grid](*args, **kwargs)
                return launch
        return _Grid()


def _layouts(n, c, dtype, seed):
    """(name, leaf base tensor, [n, c] view of it) for three layouts with equal values."""
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(n, c + 7, generator=g) * 3).to(dtype).to(DEVICE)
    pair = (torch.randn(n, 2, c, generator=g) * 3).to(dtype).to(DEVICE)
    tall = (torch.randn(c, n, generator=g) * 3).to(dtype).to(DEVICE)
    return [("slice", wide, lambda x: x[:, :c]), ("row_stride", pair, lambda x: x[:, 1, :]),
            ("transposed", tall, lambda x: x.t())]


@pytest.mark.parametrize("loss_name", ["kd", "ats", "dkd", "dist"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_strided_rows_match_contiguous(loss_name, dtype, monkeypatch):
    import importlib

    module = importlib.import_module("fastkd.triton." + ("kd" if loss_name == "ats" else loss_name))
    n, c = 5, 300
    target = torch.tensor([0, 7, 299, 150, 3], device=DEVICE)
    w = torch.full((n,), 1.0 / n, device=DEVICE)

    def run(s, t):
        if loss_name == "kd":
            out = ft.kd_fwd(s, t, torch.full((n,), 2.0, device=DEVICE), w, False, True, True, True)
        elif loss_name == "ats":
            out = ft.ats_fwd(s, t, target, w, 1.0, 4.0, 2.0, False, True, True)
        elif loss_name == "dkd":
            out = ft.dkd_fwd(s, t, target, w, 1.0, 8.0, 4.0, False, True, True)
        else:
            out = ft.dist_fwd(s, t, 1.0, 2.0, 2.0, True, True)
        return out

    for (name, s_base, view), (_, t_base, _) in zip(_layouts(n, c, dtype, 80), _layouts(n, c, dtype, 81)):
        s_base, t_base = leaf(s_base), leaf(t_base)
        s, t = view(s_base), view(t_base)
        spy = _LaunchSpy(module.wrap_triton)
        monkeypatch.setattr(module, "wrap_triton", spy)
        got = run(s, t)
        monkeypatch.undo()
        want = run(s.detach().contiguous(), t.detach().contiguous())
        for x, y in zip(got, want):
            assert torch.equal(x, y), name
        # a unit-stride row view is read in place; a transposed one is copied first
        in_place = name != "transposed"
        assert (spy.calls[0][0].data_ptr() == s.data_ptr()) == in_place, name
        assert (spy.calls[0][1].data_ptr() == t.data_ptr()) == in_place, name
        # autograd through the view: the gradient lands in the view's elements, 0 elsewhere
        ds, dt = torch.autograd.grad(got[0].sum(), [s_base, t_base])
        torch.testing.assert_close(view(ds), got[1], atol=0, rtol=0)
        torch.testing.assert_close(view(dt), got[2], atol=0, rtol=0)
        outside = ds.clone()
        view(outside).zero_()
        assert (outside == 0).all(), name


# ----------------------------------------------------------------------------
# Device guard
# ----------------------------------------------------------------------------

def _each_op(device):
    """One call of every registered Triton op (loss row ops, MGD) on small inputs on ``device``."""
    n, c = 3, 20
    s, t = logits((n, c), F32, 70).to(device), logits((n, c), F32, 71).to(device)
    w = torch.full((n,), 1.0 / n, device=device)
    temp = torch.full((n,), 2.0, device=device)
    target = torch.tensor([0, 7, 19], device=device)
    feat = logits((2, 3, 4, 5), F32, 72, 1.0).to(device)
    return {
        "kd": lambda: ft.kd_fwd(s, t, temp, w, False, True, True, True),
        "ats": lambda: ft.ats_fwd(s, t, target, w, 1.0, 4.0, 2.0, False, True, True),
        "dkd": lambda: ft.dkd_fwd(s, t, target, w, 1.0, 8.0, 4.0, False, True, True),
        "dist": lambda: ft.dist_fwd(s, t, 1.0, 2.0, 2.0, True, True),
        "mgd_mask": lambda: (ft.mgd_mask(feat, 5, 0.5, True),),
        "mgd_sq_err": lambda: ft.mgd_sq_err(feat, feat * 0.5, 0.25, True, True),
    }


def test_device_guard_is_a_no_op_off_cuda(monkeypatch):
    from fastkd.triton._common import device_guard

    def no_cuda(*args, **kwargs):
        raise AssertionError("device_guard touched torch.cuda for a non-CUDA tensor")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    for x in (torch.zeros(2), torch.zeros(2, device="meta")):
        with device_guard(x):
            pass


def test_every_launcher_uses_the_device_guard(monkeypatch):
    # Each op's launches run inside device_guard(its input): record the calls.
    import importlib

    from fastkd.triton import _common

    seen = []

    def recording_guard(x):
        seen.append(x.device)
        return _common.device_guard(x)

    for name in ("kd", "dkd", "dist", "mgd"):
        monkeypatch.setattr(importlib.import_module(f"fastkd.triton.{name}"), "device_guard", recording_guard)
    launches = {"kd": 1, "ats": 1, "dkd": 1, "dist": 3, "mgd_mask": 1, "mgd_sq_err": 1}
    for name, call in _each_op(DEVICE).items():
        seen.clear()
        call()
        assert seen == [DEVICE] * launches[name], name


@pytest.mark.skipif(INTERPRET or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_inputs_on_another_gpu_run_there():
    # Inputs on cuda:1 while cuda:0 is current: the same results as on cuda:0, outputs on cuda:1.
    torch.cuda.set_device(0)
    on0 = {name: call() for name, call in _each_op("cuda:0").items()}
    on1 = {name: call() for name, call in _each_op("cuda:1").items()}
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    for name in on0:
        for x, y in zip(on0[name], on1[name]):
            assert y.device == torch.device("cuda:1"), name
            torch.testing.assert_close(y.cpu(), x.cpu(), atol=0, rtol=0, msg=name)


# ----------------------------------------------------------------------------
# GPU only: opcheck and torch.compile of a training step
# ----------------------------------------------------------------------------

def _op_samples():
    n, c = 6, 300
    s = torch.randn(n, c, device="cuda", dtype=BF16, requires_grad=True)
    t = torch.randn(n, c, device="cuda", dtype=F32)
    w = torch.full((n,), 1.0 / n, device="cuda")
    temp = torch.full((n,), 2.0, device="cuda", requires_grad=True)
    target = torch.randint(0, c, (n,), device="cuda")
    feat = torch.randn(2, 4, 5, 5, device="cuda", requires_grad=True)
    return [
        (torch.ops.fastkd.kd_fwd_triton, (s, t, temp, w, True, True, False, True)),
        (torch.ops.fastkd.kd_fwd_triton, (s, t, temp, w, False, True, True, False)),
        (torch.ops.fastkd.ats_fwd_triton, (s, t, target, w, 1.0, 4.0, 2.0, True, True, False)),
        (torch.ops.fastkd.dkd_fwd_triton, (s, t, target, w, 1.0, 8.0, 4.0, False, True, False)),
        (torch.ops.fastkd.dist_fwd_triton, (s, t, 1.0, 1.0, 2.0, True, False)),
        (torch.ops.fastkd.mgd_mask_triton, (feat, 7, 0.3, True)),
        (torch.ops.fastkd.mgd_sq_err_triton, (feat, feat.detach() + 1, 0.5, True, False)),
    ]


@GPU_ONLY
def test_opcheck_gpu():
    for op, args in _op_samples():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@GPU_ONLY
@pytest.mark.parametrize("loss_name", ["kd", "dkd", "ats", "dist"])
def test_compiled_training_step_gpu(loss_name):
    torch.manual_seed(0)
    n, d, c = 64, 32, 1000
    feats = torch.randn(n, d, device="cuda", dtype=BF16)
    teacher = torch.randn(n, c, device="cuda", dtype=BF16)
    target = torch.randint(0, c, (n,), device="cuda")
    w = torch.full((n,), 1.0 / n, device="cuda")

    def forward(model, temp):
        s = model(feats)
        if loss_name == "kd":
            loss = ft.kd_fwd(s, teacher, temp, w, True, True, False, temp.requires_grad)[0]
        elif loss_name == "dkd":
            loss = ft.dkd_fwd(s, teacher, target, w, 1.0, 8.0, 4.0, True, True, False)[0]
        elif loss_name == "ats":
            loss = ft.ats_fwd(s, teacher, target, w, 1.0, 4.0, 2.0, True, True, False)[0]
        else:
            loss = ft.dist_fwd(s, teacher, 1.0, 1.0, 2.0, True, False)[0]
        return 0.9 * loss

    results = []
    for compiled in (False, True):
        torch.manual_seed(1)  # the same weights for the eager and the compiled step
        model = torch.nn.Linear(d, c, device="cuda", dtype=BF16)
        torch.nn.init.normal_(model.weight)
        temp = torch.full((n,), 3.0, device="cuda", requires_grad=True)
        fn = torch.compile(forward, fullgraph=True) if compiled else forward
        loss = fn(model, temp)
        loss.backward()  # the compiled graph's backward (AOTAutograd) calls the op's autograd
        results.append((loss.detach(), model.weight.grad.float(), temp.grad))
    (l0, g0, t0), (l1, g1, t1) = results
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g1, g0, atol=1e-2, rtol=2e-2)
    if loss_name == "kd":
        torch.testing.assert_close(t1, t0, atol=1e-4, rtol=1e-3)
