"""ULD (``fastkd.uld_loss``): the batched path against the float64 sort-based reference and TRL's GOLD ULDLoss."""
import types

import pytest
import torch

import fastkd
from fastkd.dispatch import ops as _ops
from fastkd.losses import cross_tokenizer as X
from fastkd.losses import uld_rows as U
from fastkd.losses.uld_rows import sorted_l1_batched
from fastkd.reference import cross_tokenizer as R

# (leading shape, V_s, V_t): equal vocabularies, either side larger, a row wider than a chunk's column
# tables (2048 buckets), odd sizes
# the CPU kernel (fastkd::uld_fwd) where this build has it, and the batched PyTorch path (what GPU tensors run)
# "sync-free": the batched path as GPU tensors run it (no host reads: every row processed, skipped rows
# masked, ULD by a sort of each row), forced on CPU tensors
PATHS = ["batched", "sync-free"] + (["cpu"] if _ops.has_kernel("uld_fwd", "CPU") else [])


@pytest.fixture
def path(request, monkeypatch):
    """Make backend="auto" take the path named by the test's parameter."""
    if request.param in ("batched", "sync-free"):
        monkeypatch.setattr(X._ops, "has_kernel", lambda *a: False)
    if request.param == "sync-free":
        monkeypatch.setattr(U, "_no_host_reads", lambda x: True)
    return request.param


SHAPES = [((6,), 100, 170), ((3, 5), 1271, 401), ((4,), 37, 37), ((2, 3), 5000, 3001)]


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(lead, vs, vt, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*lead, vs, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(*lead, vt, generator=g, dtype=torch.float64) * scale).to(dtype)
    return s, t


@pytest.mark.parametrize("l1", [sorted_l1_batched, U.sorted_l1_by_sort])
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
@pytest.mark.parametrize("lead,vs,vt", SHAPES)
def test_sorted_l1_exact_against_sort(lead, vs, vt, scale, l1):
    s, t = make(lead, vs, vt, scale, dtype=torch.float64)
    q, p = s.reshape(-1, vs).softmax(1), t.reshape(-1, vt).softmax(1)
    loss, g_q, g_p = l1(q, p)
    qr, pr = q.clone().requires_grad_(), p.clone().requires_grad_()
    ref, _ = R.sorted_l1_rows(qr, pr)
    ref.sum().backward()
    assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-14)
    assert torch.equal(g_q, qr.grad) and torch.equal(g_p, pr.grad)


def test_sorted_l1_worst_case_every_bucket_ambiguous():
    # the teacher a permutation of the student, scaled by a hair: the counting functions cross everywhere,
    # so the refinement runs down to the last bits
    q = torch.randn(3, 3000, dtype=torch.float64).softmax(1)
    p = q[:, torch.randperm(3000)] * (1 + 1e-9)
    p[:, 0] += 1 - p.sum(1)
    loss, g_q, g_p = sorted_l1_batched(q, p)
    qr, pr = q.clone().requires_grad_(), p.clone().requires_grad_()
    ref, _ = R.sorted_l1_rows(qr, pr)
    ref.sum().backward()
    assert torch.allclose(loss, ref, rtol=1e-9, atol=1e-18)
    # exact ties between the sides are possible here only by chance; where the reference's sign is
    # nonzero the batched one agrees
    nz = qr.grad != 0
    assert torch.equal(g_q[nz], qr.grad[nz])


def test_sorted_l1_float32_matches_float64():
    s, t = make((9,), 3000, 5000, 4.0)
    loss, g_q, _ = sorted_l1_batched(s.softmax(1), t.softmax(1))
    ref, _ = R.sorted_l1_rows(s.double().softmax(1), t.double().softmax(1))
    assert rel(loss, ref) < 1e-5


def _both(s, t, **kw):
    """fastkd's batched loss (float32) and the float64 reference, values and gradients."""
    sf, tf = s.detach().float().clone().requires_grad_(), t.detach().float().clone().requires_grad_()
    sd, td = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    out = fastkd.uld_loss(sf, tf, **kw)
    ref = fastkd.uld_loss(sd, td, backend="reference", **kw)
    loss, ref_loss = (out.loss, ref.loss) if kw.get("return_parts") else (out, ref)
    (loss.sum() if loss.dim() else loss).backward()
    (ref_loss.sum() if ref_loss.dim() else ref_loss).backward()
    return out, ref, (sf.grad, sd.grad), (tf.grad, td.grad)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("k", [None, 1, 7, 300])
@pytest.mark.parametrize("lead,vs,vt", SHAPES)
def test_batched_matches_reference(lead, vs, vt, k, path):
    s, t = make(lead, vs, vt)
    out, ref, gs, gt = _both(s, t, temperature=2.0, teacher_temperature=1.5, k=k)
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert rel(gs[0].double(), gs[1]) < 1e-5
    assert rel(gt[0].double(), gt[1]) < 1e-5


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("k", [None, 50])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_rows_weights_ce_parts(reduction, k, path):
    lead, vs, vt = (4, 6), 900, 1400
    s, t = make(lead, vs, vt, seed=1)
    target = torch.randint(0, vs, lead)
    target[0, 1] = target[2, 5] = -100
    s[0, 1] = float("nan")  # skipped rows are never read
    t[2, 5] = float("nan")
    sw = torch.rand(lead)
    sw[1, 0] = 0.0
    s[1, 0] = float("inf")
    out, ref, gs, gt = _both(s, t, reduction=reduction, target=target, sample_weight=sw, ce_weight=0.3,
                             return_parts=True, k=k)
    for a, b in zip(out, ref):
        assert a.dtype == torch.float32 and b.dtype == torch.float64
        assert torch.allclose(a.double(), b, rtol=2e-5, atol=1e-7)
    assert rel(gs[0].double(), gs[1]) < 1e-5 and rel(gt[0].double(), gt[1]) < 1e-5
    for g in gs + gt:
        assert torch.isfinite(g).all() and (g[0, 1] == 0).all() and (g[1, 0] == 0).all()


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_log_probs_rows_weights_ce(reduction, path):
    """inputs="log_probs" (rows taken as given, as merge_aligned's: masses below 1, -inf entries, a value
    above 0 read as probability 1) on every path, the CPU kernel included, against the float64 reference."""
    lead, vs, vt = (3, 5), 2100, 1300
    s, t = make(lead, vs, vt, seed=4)
    s, t = torch.log_softmax(s, -1) - 0.3, torch.log_softmax(t, -1) - 0.05  # total masses e^-0.3, e^-0.05
    s[0, 0, :7] = float("-inf")
    t[1, 2, 3] = float("-inf")
    t[2, 1, 9] = 0.25  # read as log-prob 0
    target = torch.randint(0, vs, lead)
    target[1, 1] = -100
    s[1, 1] = float("nan")  # a skipped row is never read
    sw = torch.rand(lead) + 0.5
    out, ref, gs, gt = _both(s, t, inputs="log_probs", reduction=reduction, target=target, sample_weight=sw,
                             ce_weight=0.2, return_parts=True)
    for a, b in zip(out, ref):
        assert torch.allclose(a.double(), b, rtol=2e-5, atol=1e-7), (a, b)
    assert rel(gs[0].double(), gs[1]) < 1e-5 and rel(gt[0].double(), gt[1]) < 1e-5
    assert (gs[0][1, 1] == 0).all() and torch.isfinite(gs[0]).all() and torch.isfinite(gt[0]).all()


def test_k_bound_brackets_the_exact_value():
    s, t = make((16,), 2000, 3000, 1.0, dtype=torch.float64)
    exact = fastkd.uld_loss(s, t, reduction="none")
    for k in (1, 10, 100, 1999):
        parts = fastkd.uld_loss(s.float(), t.float(), k=k, reduction="none", return_parts=True)
        assert (parts.soft.double() <= exact + 1e-6).all()
        assert (exact <= parts.soft.double() + parts.bound.double() + 1e-6).all()
        assert (parts.bound > 0).all()
    assert fastkd.uld_loss(s, t, return_parts=True).bound == 0


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_non_contiguous_and_low_precision(path):
    s, t = make((40,), 301, 203)
    s_nc = s.t().contiguous().t()  # column-major rows
    t_nc = torch.cat([t, t], dim=1)[:, ::2]
    a = fastkd.uld_loss(s_nc, t_nc)
    b = fastkd.uld_loss(s.double(), t[:, :].double())
    assert abs(float(a) - float(b)) < 1e-5 * float(b)
    sb = s.bfloat16().requires_grad_()
    loss = fastkd.uld_loss(sb, t.bfloat16())
    loss.backward()
    ref = fastkd.uld_loss(sb.detach().double(), t.bfloat16().double())
    assert abs(loss.item() - ref.item()) < 1e-5 and sb.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_in_a_counted_row(bad, path):
    s, t = make((5,), 300, 400)
    s[2, 7] = bad
    sr = s.clone().requires_grad_()
    loss = fastkd.uld_loss(sr, t, reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4]]).all()
    assert torch.isnan(sr.grad[2]).all() and torch.isfinite(sr.grad[[0, 1, 3, 4]]).all()


def test_gradcheck_reference_and_module():
    s, t = make((3,), 7, 11, dtype=torch.float64)
    s.requires_grad_(), t.requires_grad_()
    for k in (None, 3):
        assert torch.autograd.gradcheck(lambda a, b: R.uld_loss(a, b, temperature=1.7, k=k), (s, t))
    module = fastkd.nn.ULDLoss(temperature=2.0, k=5)
    assert "k=5" in repr(module)
    x, y = make((2, 3), 60, 90)
    assert torch.allclose(module(x, y), fastkd.uld_loss(x, y, temperature=2.0, k=5))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_backward_twice_raises(path):
    s, t = make((3,), 50, 60)
    s.requires_grad_()
    loss = fastkd.uld_loss(s, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@pytest.mark.parametrize("bad,match", [
    (dict(teacher=torch.randn(4, 9)), "same leading shape"),
    (dict(k=0), "k must be"),
    (dict(k=2.0), "k must be"),
    (dict(teacher_temperature=0.0), "teacher_temperature"),
    (dict(backend="cuda"), "no ULD kernel"),
    (dict(backend="cpu", k=3), "exact ULD"),
    (dict(inputs="probs"), "inputs must be"),
    (dict(inputs="log_probs", temperature=2.0), "must be 1"),
    (dict(ce_weight=1.0), "needs target"),
])
def test_bad_input(bad, match):
    s, t = torch.randn(3, 5), bad.pop("teacher", torch.randn(3, 9))
    with pytest.raises((ValueError, TypeError), match=match):
        fastkd.uld_loss(s, t, **bad)


# ---------------------------------------------------------------------------------------------------------
# TRL's GOLD ULDLoss, where the definitions overlap: one batch of sequences of equal length, every position
# counted (TRL divides each sequence by its length and averages: fastkd's "batchmean"), no merge
# ---------------------------------------------------------------------------------------------------------

def trl_uld(**config):
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer", reason="TRL (with GOLD) is not installed")
    defaults = dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                    uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                    use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False,
                    uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    defaults.update(config)
    return gold.ULDLoss(types.SimpleNamespace(**defaults))


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("ts,tt", [(1.0, 1.0), (2.0, 0.7)])
def test_matches_trl_uld(ts, tt, path):
    uld = trl_uld(uld_student_temperature=ts, uld_teacher_temperature=tt)
    b, seq, vs, vt = 3, 6, 300, 451
    s, t = make((b, seq), vs, vt, seed=3, dtype=torch.float64)
    labels = torch.zeros(b, seq, dtype=torch.int64)
    ids = torch.zeros(b, seq, dtype=torch.int64)
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    theirs = uld(s1, t1, labels, labels, ids, ids)
    theirs.backward()
    s2, t2 = s.clone().requires_grad_(), t.clone().requires_grad_()
    ours = fastkd.uld_loss(s2, t2, temperature=ts, teacher_temperature=tt, backend="reference")
    ours.backward()
    assert torch.allclose(ours, theirs, rtol=1e-12)
    assert rel(s2.grad, s1.grad) < 1e-12 and rel(t2.grad, t1.grad) < 1e-12
    s3 = s.float().requires_grad_()
    batched = fastkd.uld_loss(s3, t.float(), temperature=ts, teacher_temperature=tt)
    batched.backward()
    assert abs(batched.item() - theirs.item()) < 1e-5 * theirs.item()
    assert rel(s3.grad.double(), s1.grad) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# hybrid_uld_loss (GOLD's hybrid)
# ---------------------------------------------------------------------------------------------------------

class FakeTokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def vocabularies(vs=230, vt=310, shared=140, seed=0):
    """Two vocabularies sharing ``shared`` strings, the teacher's ids in another order."""
    g = torch.Generator().manual_seed(seed)
    student = {f"w{i}": i for i in range(vs)}
    strings = [f"w{i}" for i in torch.randperm(vs, generator=g)[:shared].tolist()]
    strings += [f"x{i}" for i in range(vt - shared)]
    order = torch.randperm(vt, generator=g).tolist()
    teacher = {strings[j]: order[j] for j in range(vt)}
    return FakeTokenizer(student), FakeTokenizer(teacher)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("beta,weights", [(0.5, None), (0.0, (0.7, 0.2)), (1.0, None), (0.2, (1.0, 1.0))])
def test_hybrid_matches_trl_gold(beta, weights, backend):
    stok, ttok = vocabularies()
    config = dict(uld_use_hybrid_loss=True, beta=beta, uld_student_temperature=1.3, uld_teacher_temperature=0.9)
    if weights:
        config.update(uld_hybrid_matched_weight=weights[0], uld_hybrid_unmatched_weight=weights[1])
    uld = trl_uld(**config)
    uld.student_tokenizer, uld.teacher_tokenizer = stok, ttok
    uld._initialize_vocabulary_mapping()
    vm = fastkd.VocabMap.from_tokenizers(stok, ttok)
    assert torch.equal(vm.teacher_to_student[:uld.mapping_tensor.numel()], uld.mapping_tensor)
    b, seq = 2, 5
    s, t = make((b, seq), 230, 310, scale=1.0, seed=4, dtype=torch.float64)
    labels = ids = torch.zeros(b, seq, dtype=torch.int64)
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    theirs = uld(s1, t1, labels, labels, ids, ids)
    theirs.backward()
    kw = dict(beta=beta, temperature=1.3, teacher_temperature=0.9)
    if weights:
        kw.update(matched_weight=weights[0], unmatched_weight=weights[1])
    dtype = torch.float64 if backend == "reference" else torch.float32
    s2, t2 = s.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()
    ours = fastkd.hybrid_uld_loss(s2, t2, vm, backend=backend, **kw)
    ours.backward()
    tol = 1e-12 if backend == "reference" else 2e-5
    assert abs(ours.item() - theirs.item()) <= tol * abs(theirs.item())
    assert rel(s2.grad.double(), s1.grad) < tol and rel(t2.grad.double(), t1.grad) < tol


def test_hybrid_parts_rows_and_many_to_one():
    table = torch.randint(0, 150, (400,), generator=torch.Generator().manual_seed(5))
    table[::3] = -1
    vm = fastkd.VocabMap(table, 200)
    s, t = make((3, 4), 200, 400, seed=6)
    target = torch.randint(0, 200, (3, 4))
    target[1, 2] = -100
    s[1, 2] = float("nan")
    out = fastkd.hybrid_uld_loss(s, t, vm, target=target, ce_weight=0.5, return_parts=True, reduction="none")
    ref = fastkd.hybrid_uld_loss(s.double(), t.double(), vm, target=target, ce_weight=0.5, return_parts=True,
                                 reduction="none")
    for a, b in zip(out, ref):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-7)
    w_m = vm.matched_fraction
    assert torch.allclose(ref.soft, w_m * ref.matched + (1 - w_m) * ref.unmatched)
    assert ref.loss[1, 2] == 0 and torch.isfinite(ref.loss).all()
    with pytest.raises(ValueError, match="both be None"):
        fastkd.hybrid_uld_loss(s, t, vm, matched_weight=0.5)
    with pytest.raises(ValueError, match="vocab_map maps"):
        fastkd.hybrid_uld_loss(s[..., :100], t, vm)
    with pytest.raises(TypeError, match="VocabMap"):
        fastkd.hybrid_uld_loss(s, t, table)
    module = fastkd.nn.HybridULDLoss(vm, beta=0.3)
    assert "beta=0.3" in repr(module)
    assert torch.allclose(module(s, t, target=target), fastkd.hybrid_uld_loss(s, t, vm, beta=0.3, target=target))


def _hybrid_case(inputs, seed=11, whole=False):
    """A many-to-one map with unmatched ids on both sides (``whole``: every teacher token matched, every
    student id hit: no unmatched term), rows [3, 5], V_s = 300, V_t = 700."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, 220, (700,), generator=g)
    table[::4] = -1  # unmatched teacher tokens; student ids 220.. are hit by none
    if whole:
        table = torch.randperm(700, generator=g) % 300
    vm = fastkd.VocabMap(table, 300)
    s, t = make((3, 5), 300, 700, scale=2.5, seed=seed, dtype=torch.float64)
    if inputs == "log_probs":  # rows that do not sum to 1, as merged groups
        s = s.log_softmax(-1) - torch.rand(3, 5, 1, generator=g, dtype=torch.float64)
        t = t.log_softmax(-1) - torch.rand(3, 5, 1, generator=g, dtype=torch.float64)
    target = torch.randint(0, 300, (3, 5), generator=g)
    target[0, 1] = target[2, 4] = -100
    weight = torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.5
    return vm, s, t, target, weight


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("inputs,whole", [("logits", False), ("log_probs", False), ("logits", True)])
@pytest.mark.parametrize("beta,weights", [(0.0, None), (0.3, (0.6, 0.9)), (1.0, None)])
def test_hybrid_batched_against_float64_reference(inputs, whole, beta, weights, sync_free, monkeypatch):
    # chunks of 2 rows (several chunks, a ragged last one), a non-contiguous student, both gradients,
    # the CE term, skipped rows and row weights, against the sort-based reference by autograd in float64;
    # sync_free: the GPU's branch (no host reads) forced on CPU tensors
    monkeypatch.setattr(X, "HYBRID_CHUNK_ELEMENTS", 2 * 1000)
    if sync_free:
        monkeypatch.setattr(U, "_no_host_reads", lambda x: True)
    vm, s, t, target, weight = _hybrid_case(inputs, whole=whole)
    temps = dict(temperature=1.4, teacher_temperature=0.8) if inputs == "logits" else {}
    kw = dict(beta=beta, target=target, sample_weight=weight.float(), ce_weight=0.4, inputs=inputs, **temps)
    if weights:
        kw.update(matched_weight=weights[0], unmatched_weight=weights[1])
    s32 = s.float().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not s32.is_contiguous()
    t32 = t.float().requires_grad_()
    out = fastkd.hybrid_uld_loss(s32, t32, vm, return_parts=True, **kw)
    assert out.loss.grad_fn is not None and out.matched.grad_fn is None
    out.loss.backward()
    s64, t64 = s.clone().requires_grad_(), t.clone().requires_grad_()
    ref = fastkd.hybrid_uld_loss(s64, t64, vm, return_parts=True, backend="reference", **kw)
    ref.loss.backward()
    for a, b in zip(out, ref):
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item()) + 1e-7
    assert ref.matched > 0 and (ref.unmatched == 0 if whole else ref.unmatched > 0)
    assert rel(s32.grad.double(), s64.grad) < 1e-5 and rel(t32.grad.double(), t64.grad) < 1e-5
    assert (s32.grad[0, 1] == 0).all() and (t32.grad[2, 4] == 0).all()  # skipped rows: gradient 0


def test_hybrid_batched_rows_nan_and_once():
    vm, s, t, target, _ = _hybrid_case("logits", seed=12)
    s, t = s.float(), t.float()
    s[1, 2, 7] = float("nan")
    x = s.clone().requires_grad_()
    loss = fastkd.hybrid_uld_loss(x, t, vm, reduction="none")
    ref = fastkd.hybrid_uld_loss(s.double(), t.double(), vm, reduction="none", backend="reference")
    assert loss[1, 2].isnan() and torch.allclose(loss.double().nan_to_num(), ref.nan_to_num(), rtol=1e-5, atol=1e-7)
    loss.sum().backward()
    assert x.grad[1, 2].isnan().all() and torch.isfinite(x.grad[0]).all()
    again = fastkd.hybrid_uld_loss(s.requires_grad_(), t, vm)
    again.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        again.backward()


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_far_tails_and_masked_columns(path):
    # logits spread over +-60: most probabilities far below 2^-60 (the CPU kernel's lowest bucket), and
    # -inf columns (probability exactly 0) on both sides
    s, t = make((6,), 3000, 4500, scale=20.0, seed=8)
    s[:, ::7] = float("-inf")
    t[:, 1::5] = float("-inf")
    out, ref, gs, gt = _both(s, t, temperature=1.0)
    assert abs(out.item() - ref.item()) <= 1e-5 * ref.item()
    assert rel(gs[0].double(), gs[1]) < 1e-5 and rel(gt[0].double(), gt[1]) < 1e-5
    assert (gs[0][:, ::7] == 0).all()


@pytest.mark.skipif(not _ops.has_kernel("uld_fwd", "CPU"), reason="this build of fastkd._C has no uld_fwd")
def test_uld_fwd_opcheck():
    s, t = make((5,), 70, 90)
    args = (s.requires_grad_(), t, torch.randint(0, 70, (5,)), torch.rand(5), 2.0, 1.0, 0.5, True, True, False)
    torch.library.opcheck(torch.ops.fastkd.uld_fwd.default, args, test_utils=("test_schema", "test_faketensor"))


def test_bench_runs_every_provider(tmp_path, capsys):
    from fastkd.bench import cross_tokenizer as bench

    out = tmp_path / "uld.csv"
    rows = bench.main(["--batch", "2", "--seq", "3", "--vs", "300", "--vt", "500", "--reps", "1", "--csv", str(out)])
    names = {r["provider"] for r in rows}
    assert {"fastkd uld", "fastkd uld batched", "fastkd uld k=64", "fastkd hybrid", "fastkd kd"} <= names
    assert all(r["seconds"] > 0 for r in rows) and out.read_text().startswith("provider,")
    assert "fastkd uld / fastkd kd" in capsys.readouterr().out
