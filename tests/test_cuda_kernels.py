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

from fastkd import _ops

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
