"""The CUDA row kernels' launch shapes against the compiled CPU ops (GPU only; skipped without one).

Covers what the kernel shape depends on (csrc/cuda/rows.cuh): a warp per row (C <= 1024, row
counts that leave the last block part empty) or a block per row (64 to 512 threads), 16-byte
packs with a scalar head and tail (ragged widths), the scalar fallback for unaligned storage,
ignored rows (target never read), a counted row with a bad target (NaN), one gradient only
(DIST then reads fewer class arrays), a non-default stream, and the MGD mask index by
per-launch division. Small shapes: benchmarks/gpu_check.sh runs this file under
compute-sanitizer (memcheck, racecheck) on the tests named 37x100, 16x12305, stream and the float32 mgd ones.
"""
import pytest
import torch

from fastkd.dispatch import ops as _ops

pytestmark = pytest.mark.gpu

OPS = ("kd_fwd", "ats_fwd", "dkd_fwd", "dist_fwd", "mgd_mask", "mgd_sq_err")
RAGGED = 3 * 4096 + 17
# warp rows (N not a multiple of 8 rows per block), block rows of 64 .. 512 threads, ragged widths
SHAPES = [(37, 100), (9, 1000), (5, 1024), (4, 1025), (3, 4113), (2, 32000), (16, RAGGED), (3, RAGGED)]
def shape_id(shape):
    return "x".join(map(str, shape))


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
          (torch.bfloat16, torch.float32)]


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not all(_ops.has_kernel(op, "CUDA") for op in OPS):
        pytest.skip("fastkd._C built without CUDA kernels")


def rel_err(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), "NaN entries differ"
    f = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), f), "finite entries differ"
    return float((got[f] - want[f]).norm() / want[f].norm().clamp_min(1e-30)) if f.any() else 0.0


def tol(*dtypes):
    return 1e-4 if all(d == torch.float32 for d in dtypes) else 1.6e-2


def unaligned(x):
    """The same values in storage offset by one element: not 16-byte aligned."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = flat[1:].view(x.shape)
    out.copy_(x)
    return out


def logit_inputs(N, C, ds, dt):
    g = torch.Generator().manual_seed(N * 100003 + C)
    s = (torch.randn(N, C, generator=g) * 3).to(ds)
    t = (torch.randn(N, C, generator=g) * 3).to(dt)
    t[0, : C // 3] = float("-inf")  # masked vocabulary
    w = torch.rand(N, generator=g) + 0.5
    y = torch.randint(0, C, (N,), generator=g)
    if N > 1:
        w[1], y[1] = 0.0, 10**9  # ignored row: its target is never read
    if N > 2:
        y[N - 1] = C  # counted row, target out of range: NaN loss and gradients
    return s, t, w, y


def call(kind, s, t, w, y, grads):
    gs, gt = "s" in grads, "t" in grads
    if kind == "kd":
        return torch.ops.fastkd.kd_fwd(s, t, torch.full_like(w, 2.0), w, False, gs, gt, "T" in grads)
    if kind == "ats":
        return torch.ops.fastkd.ats_fwd(s, t, y, w, 1.0, 4.0, 2.0, False, gs, gt)
    return torch.ops.fastkd.dkd_fwd(s, t, y, w, 1.0, 8.0, 4.0, False, gs, gt)


def check_logits(kind, s, t, w, y, grads="stT"):
    want = call(kind, s.cpu(), t.cpu(), w.cpu(), y.cpu(), grads)
    got = call(kind, s, t, w.cuda(), y.cuda(), grads)
    assert rel_err(got[0], want[0]) < 1e-4
    for i, (flag, dtype) in enumerate((("s", s.dtype), ("t", t.dtype), ("T", torch.float32)), start=1):
        if i < len(got) and flag in grads:
            assert got[i].dtype == want[i].dtype
            assert rel_err(got[i], want[i]) < (1e-3 if flag == "T" else tol(dtype)), (kind, flag)
        elif i < len(got):
            assert got[i].numel() == 0


@pytest.mark.parametrize("kind", ["kd", "ats", "dkd"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtypes", DTYPES, ids=str)
def test_row_kernels_match_cpu(kind, shape, dtypes):
    s, t, w, y = logit_inputs(*shape, *dtypes)
    check_logits(kind, s.cuda(), t.cuda(), w, y)


@pytest.mark.parametrize("kind", ["kd", "ats", "dkd"])
@pytest.mark.parametrize("shape", [(37, 100), (16, RAGGED)], ids=shape_id)
def test_row_kernels_unaligned_storage_and_one_gradient(kind, shape):
    s, t, w, y = logit_inputs(*shape, torch.bfloat16, torch.bfloat16)
    check_logits(kind, unaligned(s.cuda()), unaligned(t.cuda()), w, y)
    for grads in ("s", "t", ""):
        check_logits(kind, s.cuda(), t.cuda(), w, y, grads)


@pytest.mark.parametrize("shape", [(64, 100), (37, 1000), (8, 4113), (16, RAGGED)], ids=shape_id)
@pytest.mark.parametrize("dtypes", DTYPES, ids=str)
def test_dist_matches_cpu(shape, dtypes):
    s, t, _, _ = logit_inputs(*shape, *dtypes)
    s[0], t[0] = s[0].nan_to_num(0.0, 0.0, 0.0), t[0].nan_to_num(0.0, 0.0, 0.0)  # DIST: no masked vocabulary
    for grads in ("st", "s", "t", ""):
        gs, gt = "s" in grads, "t" in grads
        want = torch.ops.fastkd.dist_fwd(s, t, 1.0, 2.0, 1.5, gs, gt)
        got = torch.ops.fastkd.dist_fwd(s.cuda(), t.cuda(), 1.0, 2.0, 1.5, gs, gt)
        assert rel_err(got[0], want[0]) < 1e-5
        if gs:
            assert rel_err(got[1], want[1]) < 10 * tol(*dtypes)
        if gt:
            assert rel_err(got[2], want[2]) < 10 * tol(*dtypes)


def test_row_kernels_run_on_the_current_stream():
    s, t, w, y = logit_inputs(16, RAGGED, torch.float32, torch.float32)
    want = call("kd", s, t, w, y, "stT")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        sc, tc, wc = s.cuda(), t.cuda(), w.cuda()
        got = call("kd", sc, tc, wc, y.cuda(), "stT")
    stream.synchronize()
    for g, r in zip(got, want):
        assert rel_err(g, r) < 1e-4


@pytest.mark.parametrize("shape", [(3, 16, 7, 9), (2, 37, 5, 11), (5, 3, 1, 1), (1, 2, 300, 301)], ids=shape_id)
@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_mgd_mask_bit_exact(shape, spatial, dtype):
    x = torch.randn(*shape).to(dtype)
    want = torch.ops.fastkd.mgd_mask(x, 987654321, 0.5, spatial)
    got = torch.ops.fastkd.mgd_mask(x.cuda(), 987654321, 0.5, spatial).cpu()
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


# ---------------------------------------------------------------------------
# divergence_fwd (docs/design.md, "The language-model divergences"): the CUDA op against the
# plain-PyTorch op of fastkd.reference.divergence in float64.

DIV_KINDS = {  # (kind, a, b, w_p, w_q)
    "forward_kl": (0, 1.0, 0.0, 0.0, 1.0), "reverse_kl": (0, 0.0, 1.0, 1.0, 0.0),
    "jsd": (0, 0.3, 0.7, 0.3, 0.7), "skew_kl": (0, 1.0, 0.0, 0.1, 0.9), "skew_rkl": (0, 0.0, 1.0, 0.9, 0.1),
    "tvd": (1, 0.0, 0.0, 0.0, 0.0), "ce_only": (0, 0.0, 0.0, 0.0, 1.0),
}
# warp rows, 64-thread blocks, 256-thread blocks with a ragged tail, 512-thread blocks, one row of 128k+ classes
DIV_SHAPES = [(37, 100), (5, 1025), (3, 4113), (16, RAGGED), (1, 131072 + 17)]


def div_available():
    if not _ops.has_kernel("divergence_fwd", "CUDA"):
        pytest.skip("fastkd._C built without the CUDA divergence_fwd")


def div_reference(s, t, ids, y, w, spec, mode, T, soft_scale, ce_weight, grads, bad_rows=()):
    """The float64 reference on CPU; rows in bad_rows get valid ids / targets there (CUDA writes NaN)."""
    from fastkd.reference.divergence import divergence_fwd as ref

    ids, y = ids.cpu().clone(), y.cpu().clone()
    for r in bad_rows:
        if ids.numel():
            ids[r] = -1
        if y.numel():
            y[r] = 0
    kind, a, b, w_p, w_q = spec
    # a = b = 0 (cross-entropy alone): the teacher is unused, autograd.grad would fail; its gradient is 0
    unused_t = kind == 0 and a == 0 and b == 0 and grads[1]
    out = list(ref(s.cpu().double(), t.cpu().double(), ids, y, w.cpu(), T, kind, a, b, w_p, w_q, soft_scale,
                   ce_weight, mode, False, grads[0], grads[1] and not unused_t))
    if unused_t:
        out[4] = torch.zeros(t.shape, dtype=torch.float64)
    return out


def div_call(s, t, ids, y, w, spec, mode, T, soft_scale, ce_weight, grads, reduce=False):
    kind, a, b, w_p, w_q = spec
    return torch.ops.fastkd.divergence_fwd(s, t, ids, y, w, T, kind, a, b, w_p, w_q, soft_scale, ce_weight, mode,
                                           reduce, *grads)


def div_check(s, t, ids, y, w, name, mode, grads=(True, True), T=2.0, bad_rows=(), s_in=None, t_in=None):
    """Values allclose and every gradient's relative-norm error vs float64 (< 1e-5 float32, 1e-2 16-bit)."""
    spec = DIV_KINDS[name]
    soft_scale = 0.0 if name == "ce_only" else T * T
    ce_weight = 0.5 if y.numel() else 0.0
    got = div_call(s if s_in is None else s_in, t if t_in is None else t_in, ids, y, w, spec, mode, T, soft_scale,
                   ce_weight, grads)
    want = div_reference(s, t, ids, y, w, spec, mode, T, soft_scale, ce_weight, grads, bad_rows)
    keep = torch.ones(s.shape[0], dtype=torch.bool)
    keep[list(bad_rows)] = False
    low = s.dtype != torch.float32 or t.dtype != torch.float32
    for i, (g, r) in enumerate(zip(got, want)):
        g = g.cpu()
        if i >= 3 and not grads[i - 3]:
            assert g.numel() == 0
            continue
        for row in bad_rows:
            assert g[row].isnan().all(), (name, i, "bad row not NaN")
        if i < 3:
            assert g.dtype == torch.float32
            torch.testing.assert_close(g[keep].double(), r[keep], rtol=2e-3 if low else 1e-5, atol=1e-5)
        else:
            assert g.dtype == (s.dtype if i == 3 else t.dtype)
            assert rel_err(g[keep], r[keep]) < (1e-2 if low else 1e-5), (name, i)
    return got


def div_rows(N, V, ds, dt, mode, K=50, seed=0):
    """Student logits, teacher (dense logits or top-k log-probs with ids), targets, weights; row 1 skipped
    (bad target and ids: never read), the last row (N > 2) counted with a bad target and, top-k with
    N > 4, the one before it with a bad id (both NaN)."""
    g = torch.Generator().manual_seed(seed * 7919 + N * 131 + V)
    s = (torch.randn(N, V, generator=g) * 3).to(ds)
    w = torch.rand(N, generator=g) + 0.5
    y = torch.randint(0, V, (N,), generator=g)
    if mode == 0:
        t = (torch.randn(N, V, generator=g) * 3).to(dt)
        t[0, : V // 3] = float("-inf")  # masked teacher vocabulary
        ids = torch.empty(0, dtype=torch.int64)
    else:
        K = min(K, V)
        full = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 3, dim=1)
        ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
        t = full.gather(1, ids).to(dt)
        ids[0, K - 2:] = -1  # padding slots
        if N > 3:
            ids[2] = -1  # a row of padding only: loss 0
    bad = ()
    if N > 1:
        w[1], y[1] = 0.0, 10**9
        if mode:
            ids[1, 0] = 10**12
    if N > 2:
        y[N - 1] = V
        bad = (N - 1,)
    if mode and N > 4:
        ids[N - 2, 1] = V  # counted row, top-k id out of range: NaN
        bad = (N - 2, N - 1)
    return s, t, ids, y, w, bad


@pytest.mark.parametrize("name", list(DIV_KINDS))
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["dense", "tail", "renormalize"])
@pytest.mark.parametrize("shape", DIV_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtypes", DTYPES, ids=str)
def test_divergence_matches_reference(name, mode, shape, dtypes):
    div_available()
    s, t, ids, y, w, bad = div_rows(*shape, *dtypes, mode)
    div_check(s.cuda(), t.cuda(), ids.cuda(), y.cuda(), w.cuda(), name, mode, bad_rows=bad)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["dense", "tail", "renormalize"])
def test_divergence_one_gradient_no_target_unaligned(name, mode):
    div_available()
    s, t, ids, y, w, bad = div_rows(9, RAGGED, torch.bfloat16, torch.bfloat16, mode)
    none = torch.empty(0, dtype=torch.int64, device="cuda")
    bad_ids = (7,) if mode else ()  # without a target only the bad top-k id is left
    for grads in ((True, False), (False, True), (False, False)):
        div_check(s.cuda(), t.cuda(), ids.cuda(), none, w.cuda(), name, mode, grads, bad_rows=bad_ids)
    sc, tc = s.cuda(), t.cuda()
    div_check(sc, tc, ids.cuda(), y.cuda(), w.cuda(), name, mode, s_in=unaligned(sc), t_in=unaligned(tc),
              bad_rows=bad)


@pytest.mark.parametrize("mode", [1, 2], ids=["tail", "renormalize"])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_divergence_topk_extreme_mass(mode, name):
    """The student's top-k holds all but ~e^-30 of its mass (the tail must be summed over the
    non-members, not as total - top-k); one teacher row's top-k mass is >= 1 (empty tail)."""
    div_available()
    s, t, ids, y, w, _ = div_rows(4, 4113, torch.float32, torch.float32, mode, K=20, seed=3)
    w[1] = 1.0
    ids[1] = torch.randperm(4113)[:20]
    s.scatter_(1, ids.clamp_min(0), 40.0)
    t[3] = t[3] - torch.logsumexp(t[3].double(), 0).float() + 1e-6
    none = torch.empty(0, dtype=torch.int64, device="cuda")
    div_check(s.cuda(), t.cuda(), ids.cuda(), none, w.cuda(), name, mode, T=1.0)


def test_divergence_large_offsets_and_current_stream():
    div_available()
    s, t, ids, y, w, bad = div_rows(16, RAGGED, torch.float32, torch.float32, 0)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        sc, tc = (s + 1000).cuda(), (t - 1000).cuda()
        got = div_check(sc, tc, ids.cuda(), y.cuda(), w.cuda(), "jsd", 0, T=1.0, bad_rows=bad)
    stream.synchronize()
    assert all(torch.isfinite(g[:2]).all() for g in got[:3])


def test_divergence_reduce_and_errors():
    div_available()
    s, t, ids, y, w, bad = div_rows(5, 1000, torch.float32, torch.float32, 1)
    w[list(bad)] = 0.0  # skipped, not NaN: the sums stay finite
    sc, tc, ic, yc, wc = s.cuda(), t.cuda(), ids.cuda(), y.cuda(), w.cuda()
    spec = DIV_KINDS["jsd"]
    rows = div_call(sc, tc, ic, yc, wc, spec, 1, 2.0, 4.0, 0.5, (False, False))
    total = div_call(sc, tc, ic, yc, wc, spec, 1, 2.0, 4.0, 0.5, (False, False), reduce=True)
    for r, tot in zip(rows[:3], total[:3]):
        assert tot.dim() == 0 and torch.allclose(r.sum(), tot)
    with pytest.raises(RuntimeError, match="student must be contiguous"):
        div_call(sc.t().contiguous().t(), tc, ic, yc, wc, spec, 1, 2.0, 4.0, 0.5, (True, True))
    with pytest.raises(RuntimeError, match="topk_ids"):
        div_call(sc, tc, ic[:, :3], yc, wc, spec, 1, 2.0, 4.0, 0.5, (True, True))
    with pytest.raises(RuntimeError, match="needs target"):
        div_call(sc, tc, ic, torch.empty(0, dtype=torch.int64, device="cuda"), wc, spec, 1, 2.0, 4.0, 0.5,
                 (True, True))
    with pytest.raises(RuntimeError, match="topk_mode"):
        div_call(sc, tc, ic, yc, wc, spec, 3, 2.0, 4.0, 0.5, (True, True))


# ---------------------------------------------------------------------------
# teacher_temperature (docs/tasks' interface: p = softmax(t / T_t), the teacher gradient's chain factor 1 / T_t):
# the CUDA op against the compiled CPU op on the teacher prescaled by T / T_t, since softmax(t / T_t) =
# softmax((t T / T_t) / T), the teacher gradient then times T / T_t. A ratio of 2 prescales exactly in the
# teacher's dtype; 1 / 1.7 does not, so the CPU op gets that teacher in float32.

TT_KINDS = {  # (kind, a, b, w_p, w_q); akl_fwd: kind 8, a = mu
    **DIV_KINDS, "jeffreys": (2, 1.0, 1.0, 0.0, 0.0), "two_sided": (2, 0.3, 0.7, 0.0, 0.0),
    "triangular": (3, 0.0, 0.0, 0.0, 0.0), "ab_divergence": (4, 0.2, 0.7, 0.0, 0.0),
    "renyi": (6, 0.5, 0.0, 0.0, 0.0), "renyi_reverse": (6, 2.0, 1.0, 0.0, 0.0),
    "entropy_gated_kl": (7, 0.0, 1.0, 0.5, 0.1), "akl": (8, 0.7, 0.0, 0.0, 0.0), "akl_mu1": (8, 1.0, 0.0, 0.0, 0.0),
}


def tt_call(s, t, y, w, spec, T, grads, tt=0.0, topk=None):
    kind, a, b, w_p, w_q = spec
    op = torch.ops.fastkd.akl_fwd if kind == 8 else torch.ops.fastkd.divergence_fwd
    ids, mode = (torch.empty(0, dtype=torch.int64, device=s.device), 0) if topk is None else topk
    ce_weight = 0.5 if y.numel() else 0.0
    return op(s, t, ids, y, w, T, kind, a, b, w_p, w_q, 1.5, ce_weight, mode, False, *grads, teacher_temperature=tt)


@pytest.mark.parametrize("name", list(TT_KINDS))
@pytest.mark.parametrize("shape", [(37, 100), (3, 4113), (4, RAGGED)], ids=shape_id)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("temps", [(2.0, 1.0), (1.0, 1.7)], ids=["T2_Tt1", "T1_Tt1.7"])
def test_teacher_temperature_matches_cpu_on_prescaled_teacher(name, shape, dtypes, temps):
    div_available()
    if not _ops.has_kernel("akl_fwd", "CUDA"):
        pytest.skip("fastkd._C built without the CUDA akl_fwd")
    spec, (T, tt) = TT_KINDS[name], temps
    s, t, _, y, w, _ = div_rows(*shape, *dtypes, 0, seed=len(name))
    y[-1] = 0  # every counted target in range (the CPU op raises on a bad one)
    ratio = T / tt
    t_ref = (t.float() * ratio).to(t.dtype if ratio == 2.0 else torch.float32)
    none = torch.empty(0, dtype=torch.int64)
    for grads, target in (((True, True), y), ((False, True), none), ((True, False), none)):
        want = tt_call(s, t_ref, target, w, spec, T, grads)
        got = tt_call(s.cuda(), t.cuda(), target.cuda(), w.cuda(), spec, T, grads, tt=tt)
        for i in range(3):
            assert rel_err(got[i], want[i]) < (1e-5 if dtypes[0] == torch.float32 else 1e-3), (name, i, grads)
        if grads[0]:
            assert got[3].dtype == s.dtype and rel_err(got[3], want[3]) < tol(s.dtype), (name, "student", grads)
        if grads[1]:
            assert got[4].dtype == t.dtype
            assert rel_err(got[4], want[4].float() * ratio) < tol(t.dtype), (name, "teacher", grads)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "renyi", "akl"])
def test_teacher_temperature_default_and_equal_and_errors(name):
    """T_t = 0 and T_t = T give the same bits; a negative or non-finite T_t (or float32 1 / T_t), and a top-k
    teacher at T_t != T, are errors naming teacher_temperature (as on the CPU)."""
    div_available()
    spec = TT_KINDS[name]
    s, t, _, y, w, _ = div_rows(5, 4113, torch.float32, torch.float32, 0)
    y[-1] = 0
    sc, tc, yc, wc = s.cuda(), t.cuda(), y.cuda(), w.cuda()
    default = tt_call(sc, tc, yc, wc, spec, 2.0, (True, True))
    same = tt_call(sc, tc, yc, wc, spec, 2.0, (True, True), tt=2.0)
    for a, b in zip(default, same):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
    for bad in (-1.0, float("nan"), float("inf"), 1e-39, 1e-50):  # float32 1 / T_t: inf; T_t: 0
        with pytest.raises((RuntimeError, ValueError), match="teacher_temperature"):
            tt_call(sc, tc, yc, wc, spec, 2.0, (True, True), tt=bad)
    if spec[0] == 8:
        return
    sk, tk, ik, yk, wk, _ = div_rows(5, 1000, torch.float32, torch.float32, 1)
    yk[-1], ik[-2, 1] = 0, -1  # no bad row: the outputs are compared as they are
    args = (sk.cuda(), tk.cuda(), yk.cuda(), wk.cuda(), spec, 2.0, (True, True))
    with pytest.raises((RuntimeError, ValueError), match="teacher_temperature"):
        tt_call(*args, tt=1.0, topk=(ik.cuda(), 1))
    for a, b in zip(tt_call(*args, topk=(ik.cuda(), 1)), tt_call(*args, tt=2.0, topk=(ik.cuda(), 1))):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
