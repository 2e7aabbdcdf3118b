"""fastkd.topk_from_logits / fastkd.teacher_topk: the teacher's top-k, on every backend, against float64.

The oracle is ``fastkd.core.topk.topk_rows`` on float64 logits (a stable full sort and ``[N, V]``
log-sum-exps). Every backend must give the oracle's ids exactly (ties to the lower id), and its
log-probs and tail to float32 accuracy. Head tests use integer-valued hidden states and weights, so
the float32 (and bf16) matmul is exact and the ranking cannot depend on the summation order.
"""
import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import fastkd
from fastkd.core.topk import TOPK_MAX, topk_rows
from fastkd.dispatch.backend import unavailable_reason
from processes import free_port, run_processes

F64 = torch.float64
INF = float("inf")
BACKENDS = ("reference", "cpu", "triton")


def _backend(name):
    reason = unavailable_reason(name, "teacher_topk", torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    return name


def _oracle(logits, k, temperature=1.0):
    rows = logits.reshape(-1, logits.shape[-1]).double()
    return topk_rows(rows, k, temperature)


def _assert_matches(teacher, logits, k, temperature=1.0, tol=2e-5, ids=True):
    """teacher (a TopKTeacher) against the float64 oracle on ``logits``."""
    want_ids, want_lp, want_tail, _ = _oracle(logits, k, temperature)
    lead = tuple(logits.shape[:-1])
    assert teacher.indices.shape == lead + (k,) and teacher.indices.dtype == torch.int64
    assert teacher.logprobs.shape == lead + (k,) and teacher.tail_logprob.shape == lead
    assert teacher.mode == "tail"
    got_ids = teacher.indices.reshape(-1, k)
    if ids:
        assert torch.equal(got_ids, want_ids), (got_ids - want_ids).abs().max()
    lp = teacher.logprobs.reshape(-1, k).double()
    tail = teacher.tail_logprob.reshape(-1).double()
    torch.testing.assert_close(lp, want_lp, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(tail, want_tail, rtol=tol, atol=tol, equal_nan=True)


def _rows(n, width, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, generator=g, dtype=F64) * scale).to(dtype)


# ----------------------------------------------------------------------------
# the case matrix: every backend
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [1000, 4099, 32000])
@pytest.mark.parametrize("k", [1, 5, 64, 128])
def test_random_rows(backend, width, k):
    _backend(backend)
    n = 2 if backend == "triton" else 5
    x = _rows(n, width, seed=width + k)
    x[0, -1] = x[0].max() + 1.0  # the largest logit in the ragged last block
    _assert_matches(fastkd.topk_from_logits(x, k, backend=backend), x, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_and_large_offsets(backend, temperature):
    _backend(backend)
    x = _rows(3, 4099, seed=1)
    x[1] += 1e4  # log-probs from x - max: no loss of precision at an offset
    t = fastkd.topk_from_logits(x, 64, temperature=temperature, backend=backend)
    _assert_matches(t, x, 64, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [5, 64, 128])
def test_ties_break_to_the_lower_id(backend, k):
    _backend(backend)
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-3, 3, (4, 4099), generator=g).float()  # ~700 copies of each value
    x[1] = 1.0  # one value: ids 0 .. k-1
    x[2, ::2] = -0.0  # -0.0 equals 0.0
    x[2, 1::2] = 0.0
    x[3, 3000:] = 5.0  # the ties sit in later blocks than the lower-valued ones
    t = fastkd.topk_from_logits(x, k, backend=backend)
    _assert_matches(t, x, k)
    assert torch.equal(t.indices[1], torch.arange(k))
    assert torch.equal(t.indices[2], torch.arange(k))
    assert torch.equal(t.indices[3], torch.arange(3000, 3000 + k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_and_nan_rows(backend):
    _backend(backend)
    k = 8
    x = _rows(6, 1000, seed=3)
    x[0, ::3] = -INF  # -inf entries: no mass
    x[1, :] = -INF
    x[1, 10:14] = 1.0  # fewer finite entries than k: -inf members, ids by the tie rule
    x[2, :] = -INF  # no mass at all: NaN log-probs and tail (as log_softmax), ids 0 .. k-1
    x[3, 7] = float("nan")  # NaN: the row's log-probs and tail are NaN; it ranks as -inf
    x[4, 500] = INF  # +inf: NaN (as log_softmax)
    t = fastkd.topk_from_logits(x, k, backend=backend)
    _assert_matches(t, x, k)
    assert torch.equal(t.indices[1, :4], torch.arange(10, 14)) and torch.isinf(t.logprobs[1, 4:]).all()
    assert torch.equal(t.indices[2], torch.arange(k))
    for row in (2, 3, 4):
        assert t.logprobs[row].isnan().all() and t.tail_logprob[row].isnan(), row
    assert 7 not in t.indices[3].tolist()
    assert t.tail_logprob[1] == -INF and torch.isfinite(t.tail_logprob[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [1, 64, 2100])
def test_k_equal_to_the_vocabulary(backend, width):
    _backend(backend)
    k = min(width, TOPK_MAX)
    x = _rows(3, width, seed=width)[:, :k]
    t = fastkd.topk_from_logits(x, k, backend=backend)
    _assert_matches(t, x, k)
    assert (t.tail_logprob == -INF).all()
    torch.testing.assert_close(t.logprobs.double().exp().sum(-1), torch.ones(3, dtype=F64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_up_to_the_limit(backend):
    _backend(backend)
    x = _rows(2, 3000, seed=4)
    x[1, 2000:] += 4.0  # the top-1024 spread over two blocks
    _assert_matches(fastkd.topk_from_logits(x, TOPK_MAX, backend=backend), x, TOPK_MAX)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ascending_row_updates_the_top_k_in_every_block(backend):
    _backend(backend)
    x = torch.linspace(-5, 5, 9000).repeat(2, 1)
    x[1] = x[1].flip(0)  # descending: every later block is rejected
    _assert_matches(fastkd.topk_from_logits(x, 100, backend=backend), x, 100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_batched_inputs(backend):
    _backend(backend)
    wide = _rows(6, 1031, seed=5)
    for x in (wide[:, :1000], wide[::2, 3:1003], wide.t().contiguous().t()[:, :1000],
              wide[:, :1000].reshape(2, 3, 1000), wide.reshape(2, 3, 1031)[:, 1:, :1000]):
        _assert_matches(fastkd.topk_from_logits(x, 5, backend=backend), x, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(backend, dtype):
    _backend(backend)
    x = _rows(3, 4099, seed=6, dtype=dtype)  # bf16: many ties, broken by the id on every backend
    t = fastkd.topk_from_logits(x, 64, temperature=1.5, backend=backend)
    assert t.logprobs.dtype == torch.float32 and t.tail_logprob.dtype == torch.float32
    _assert_matches(t, x, 64, 1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    _backend(backend)
    t = fastkd.topk_from_logits(torch.randn(0, 300), 7, backend=backend)
    assert t.indices.shape == (0, 7) and t.logprobs.shape == (0, 7) and t.tail_logprob.shape == (0,)
    t = fastkd.teacher_topk(torch.randn(2, 0, 16), torch.randn(300, 16), 7, backend=backend)
    assert t.indices.shape == (2, 0, 7) and t.tail_logprob.shape == (2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_is_exact_when_the_top_k_hold_almost_all_mass(backend):
    _backend(backend)
    k, width = 5, 1000
    # the 995 others hold 1e-9 of the mass: 995 exp(-L) = 1e-9 * 5
    drop = math.log(995 / 5e-9)
    x = torch.full((2, width), -drop)
    x[:, [3, 400, 401, 998, 999]] = 0.0
    x[1] *= 0.5  # and at T = 0.5 the same row again
    t = fastkd.topk_from_logits(x, k, temperature=1.0, backend=backend)
    _, _, want, _ = _oracle(x, k)
    assert abs(want[0].item() - math.log(1e-9)) < 1e-6
    torch.testing.assert_close(t.tail_logprob.double(), want, rtol=0, atol=1e-5)
    # the cancelling formula loses it entirely in float32: 1 - sum p_k rounds to 0
    cancelled = torch.log1p(-t.logprobs.exp().sum(-1))
    assert not torch.isfinite(cancelled[0]) or abs(cancelled[0].item() - want[0].item()) > 1.0


# ----------------------------------------------------------------------------
# teacher_topk: the head, chunked
# ----------------------------------------------------------------------------

def _int_head(n, hidden, vocab, seed, dtype=torch.float32, lead=None):
    """Integer-valued hidden states and weights: the matmul is exact in float32 and bf16."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-3, 4, (n, hidden), generator=g).to(dtype)
    w = torch.randint(-3, 4, (vocab, hidden), generator=g).to(dtype)
    b = torch.randint(-4, 5, (vocab,), generator=g).to(dtype)
    return (h if lead is None else h.reshape(*lead, hidden)), w, b


def _head_logits(h, w, b=None, scale=None, softcap=None):
    x = h.double() @ w.double().t()
    if b is not None:
        x = x + b.double()
    if scale is not None:
        x = x * scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_head_matches_the_logits(backend, dtype):
    _backend(backend)
    h, w, b = _int_head(10, 32, 4099, seed=7, dtype=dtype, lead=(2, 5))
    for chunk in (None, 3, 4, 10, 64):
        t = fastkd.teacher_topk(h, w, 64, chunk_size=chunk, backend=backend)
        _assert_matches(t, _head_logits(h, w), 64)
    t = fastkd.teacher_topk(h, w, 64, bias=b, temperature=2.0, chunk_size=4, backend=backend)
    _assert_matches(t, _head_logits(h, w, b), 64, 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_logit_scale_and_softcap(backend):
    _backend(backend)
    h, w, b = _int_head(7, 24, 1000, seed=8)
    t = fastkd.teacher_topk(h, w, 16, bias=b, logit_scale=0.5, softcap=8.0, chunk_size=3, backend=backend)
    _assert_matches(t, _head_logits(h, w, b, 0.5, 8.0), 16, tol=5e-5)
    t = fastkd.teacher_topk(h, w, 16, logit_scale=0.25, chunk_size=5, backend=backend)
    _assert_matches(t, _head_logits(h, w, None, 0.25), 16)


def test_head_float64_runs_the_reference_and_non_contiguous_hidden():
    h, w, _ = _int_head(12, 16, 500, seed=9, dtype=F64)
    wide = torch.cat([h, h], dim=1)[:, :16]  # a non-contiguous row slice
    t = fastkd.teacher_topk(wide, w, 9, chunk_size=5, temperature=0.7)
    assert t.logprobs.dtype == F64
    _assert_matches(t, _head_logits(wide, w), 9, 0.7, tol=1e-12)
    t = fastkd.teacher_topk(wide.t().contiguous().t().reshape(3, 4, 16), w, 9, chunk_size=5)
    _assert_matches(t, _head_logits(wide, w).reshape(3, 4, 500), 9, tol=1e-12)


def test_head_gives_no_gradient_and_feeds_the_losses():
    h, w, _ = _int_head(6, 16, 300, seed=10)
    h.requires_grad_(True)
    t = fastkd.teacher_topk(h, w.requires_grad_(True), 8)
    assert not t.logprobs.requires_grad and not t.tail_logprob.requires_grad
    s = torch.randn(6, 300, requires_grad=True)
    loss = fastkd.kd_loss(s, t, temperature=1.0)
    loss.backward()
    ref = fastkd.kd_loss(s.detach(), fastkd.TopKTeacher.from_logits(_head_logits(h.detach(), w.detach()), 8),
                         temperature=1.0, backend="reference")
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-5, atol=1e-6)


def test_from_logits_is_the_same_definition():
    x = torch.randint(-2, 3, (4, 700)).float()
    a = fastkd.TopKTeacher.from_logits(x, 20, temperature=1.3)
    b = fastkd.topk_from_logits(x, 20, temperature=1.3)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.logprobs, b.logprobs)
    torch.testing.assert_close(a.tail_logprob, b.tail_logprob)
    assert fastkd.TopKTeacher.from_logits(x.half(), 3).logprobs.dtype == torch.float16  # as before


# ----------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------

def test_bad_input_errors():
    x = torch.randn(3, 50)
    h, w = torch.randn(3, 8), torch.randn(50, 8)
    cases = [
        (lambda: fastkd.topk_from_logits(x, 0), ValueError, r"k must be an int in \[1, 50\]"),
        (lambda: fastkd.topk_from_logits(x, 51), ValueError, r"k must be an int in \[1, 50\]"),
        (lambda: fastkd.topk_from_logits(x, True), ValueError, "k must be an int"),
        (lambda: fastkd.topk_from_logits(x, 2.0), ValueError, "k must be an int"),
        (lambda: fastkd.topk_from_logits(torch.randn(2, 2000), TOPK_MAX + 1), ValueError, "limit of 1024"),
        (lambda: fastkd.topk_from_logits(x.long(), 3), TypeError, "logits must be a floating tensor"),
        (lambda: fastkd.topk_from_logits(x, 3, temperature=0.0), ValueError, "temperature"),
        (lambda: fastkd.topk_from_logits(x, 3, backend="nope"), ValueError, "backend must be one of"),
        (lambda: fastkd.topk_from_logits(x.double(), 3, backend="cpu"), ValueError, "does not take float64"),
        (lambda: fastkd.teacher_topk(h, w, 51), ValueError, r"k must be an int in \[1, 50\]"),
        (lambda: fastkd.teacher_topk(h, w.t(), 3), ValueError, "hidden has 8 features but weight"),
        (lambda: fastkd.teacher_topk(h, w.half(), 3), TypeError, "hidden and weight must have the same dtype"),
        (lambda: fastkd.teacher_topk(h.long(), w, 3), TypeError, "hidden must be a floating tensor"),
        (lambda: fastkd.teacher_topk(h, w, 3, bias=torch.randn(49)), ValueError, r"bias must have shape \[50\]"),
        (lambda: fastkd.teacher_topk(h, w.to("meta"), 3), ValueError, "weight must be on hidden's device"),
        (lambda: fastkd.teacher_topk(h, w, 3, softcap=0.0), ValueError, "softcap"),
        (lambda: fastkd.teacher_topk(h, w, 3, chunk_size=0), ValueError, "chunk_size must be None or an int"),
        (lambda: fastkd.teacher_topk(h, w, 3, temperature=-1.0), ValueError, "temperature"),
    ]
    for fn, exc, message in cases:
        with pytest.raises(exc, match=message):
            fn()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_row_op_checks_its_own_arguments(backend):
    _backend(backend)
    from fastkd.dispatch.backend import implementation

    op = implementation(backend).topk_fwd
    for k in (0, 51):
        with pytest.raises((ValueError, RuntimeError), match="k must be in"):
            op(torch.randn(2, 50), k, 1.0)
    with pytest.raises((ValueError, RuntimeError), match="k must be in"):
        op(torch.randn(2, 2000), TOPK_MAX + 1, 1.0)
    with pytest.raises((ValueError, RuntimeError), match="float32, bfloat16 or float16"):
        op(torch.randn(2, 50, dtype=F64), 3, 1.0)


def test_topk_teacher_tail_logprob_is_checked():
    ids, lps = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3)
    assert fastkd.TopKTeacher(ids, lps).tail_logprob is None
    with pytest.raises(ValueError, match=r"tail_logprob must have the leading shape of indices \(2,\)"):
        fastkd.TopKTeacher(ids, lps, tail_logprob=torch.zeros(3))
    with pytest.raises(TypeError, match="tail_logprob must be None or a floating tensor"):
        fastkd.TopKTeacher(ids, lps, tail_logprob=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="tail_logprob must be on the indices' device"):
        fastkd.TopKTeacher(ids, lps, tail_logprob=torch.zeros(2, device="meta"))


def test_cpu_op_under_opcheck_and_compile():
    _backend("cpu")
    x = torch.randn(4, 300)
    torch.library.opcheck(torch.ops.fastkd.topk_fwd.default, (x, 5, 2.0))
    compiled = torch.compile(lambda y: torch.ops.fastkd.topk_fwd(y, 5, 2.0), fullgraph=True)
    for a, b in zip(compiled(x), torch.ops.fastkd.topk_fwd(x, 5, 2.0)):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------
# vocabulary-sharded head: 2 processes over gloo
# ----------------------------------------------------------------------------

TIMEOUT_S = 300


def _sharded_checks(rank, world):
    from fastkd.distributed import count_comm

    group = dist.group.WORLD
    checks = 0
    for backend in ("reference", "cpu", "triton"):
        if unavailable_reason(backend, "teacher_topk", torch.device("cpu")):
            continue
        for vocab, k, n, chunk, dtype in ((1000, 64, 9, 4, torch.float32), (4098, 5, 5, None, torch.bfloat16),
                                          (600, 400, 3, None, torch.float32), (64, 1, 4, 3, torch.float32)):
            h, w, b = _int_head(n, 16, vocab, seed=vocab + k, dtype=dtype)
            w[vocab // world - 3: vocab // world + 3] = w[0]  # ties across the shard boundary
            b[vocab // world - 3: vocab // world + 3] = b[0]
            width = vocab // world
            part = slice(rank * width, (rank + 1) * width)
            kw = dict(temperature=1.7, logit_scale=0.5, chunk_size=chunk, backend=backend)
            with count_comm() as comm:
                got = fastkd.teacher_topk(h, w[part], k, bias=b[part], process_group=group, **kw)
            one = fastkd.teacher_topk(h, w, k, bias=b, **kw)
            assert torch.equal(got.indices, one.indices), (backend, vocab, k)
            torch.testing.assert_close(got.logprobs, one.logprobs, rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(got.tail_logprob, one.tail_logprob, rtol=2e-5, atol=2e-5)
            _assert_matches(got, _head_logits(h, w, b, 0.5), k, 1.7)
            kl = min(k, width)
            chunks = math.ceil(n / (chunk or n))
            # the shape check (4 int64), then per row k' int64 ids and k' + 3 float32 (logits, tail, max, log z)
            assert comm.bytes == 32 + 8 * n * (kl + math.ceil((kl + 3) / 2)), comm.bytes
            assert comm.calls == 1 + chunks
            checks += 1
    # rows, shards and dtypes must agree across ranks (raised on CPU before any per-row collective)
    h, w, _ = _int_head(4 + rank, 8, 100, seed=0)
    try:
        fastkd.teacher_topk(h, w[:50], 3, process_group=group)
    except ValueError as err:
        assert "same rows" in str(err)
    else:
        raise AssertionError("unequal rows did not raise")
    assert checks >= 4, checks


def _entry(rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        _sharded_checks(rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sharded_head_equals_one_process():
    world = 2
    run_processes(_entry, (world, free_port()), world, TIMEOUT_S, "the sharded top-k")

