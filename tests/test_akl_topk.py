"""``fastkd.akl_loss`` against a ``TopKTeacher``: the head and the gaps over the teacher's buckets
(``fastkd.losses.akl_topk``), on every backend.

The oracle is the definition written out below in float64: the buckets (K members and, in tail mode, the
tail), the head by pairwise comparison of the members' masses (no sort), the tail bucket head only at
``mu >= 1``, the two bucket KLs blended at constant ``(h, l)``, the gradient by autograd. Values by
allclose, gradients by the relative norm ``||g - r|| / ||r||``.
"""
import pytest
import torch

import fastkd
from fastkd.dispatch.backend import unavailable_reason
from test_no_host_sync import gpu_path

FIXTURES = (gpu_path,)
F64 = torch.float64
BACKENDS = ("reference", "cpu", "triton", "cuda")
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 1e-2)}  # loss rtol, gradient relative norm


def needs(backend):
    device = torch.device("cuda") if backend == "cuda" else torch.device("cpu")
    why = unavailable_reason(backend, "forward_kl", device)
    if why is not None:
        pytest.skip(why)
    return device


def oracle_rows(student, ids, logprobs, mode, temperature, mu):
    """Per-row AKL over the buckets in float64 (``student`` float64 [N, V] leaf or not), and ``(h, l)``."""
    log_q_all = torch.log_softmax(student / temperature, dim=-1)
    valid = ids >= 0
    ninf = torch.tensor(float("-inf"), dtype=F64)
    log_q = torch.where(valid, log_q_all.gather(-1, ids.clamp_min(0)), ninf)
    log_p = torch.where(valid, logprobs.to(F64), ninf)
    if mode == "tail":
        member = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, ids.clamp_min(0), valid)
        q_tail = torch.logsumexp(log_q_all.masked_fill(member, float("-inf")), dim=-1).exp()
        p_tail = (1 - log_p.exp().sum(-1)).clamp_min(0)
        P = torch.cat([log_p.exp(), p_tail[:, None]], dim=-1)
        Q = torch.cat([log_q.exp(), q_tail[:, None]], dim=-1)
    else:
        P = torch.softmax(log_p, dim=-1)
        Q = torch.softmax(log_q, dim=-1)
    k = ids.shape[-1]
    with torch.no_grad():
        p_m = P[:, :k]
        # a member's mass at or above it: sum of p_j over the members j with p_j >= p_c
        at_or_above = ((p_m[:, None, :] >= p_m[:, :, None]) * p_m[:, None, :]).sum(-1)
        head = ((at_or_above <= mu) | (p_m == p_m.max(-1, keepdim=True).values)) & valid
        if mode == "tail":
            head = torch.cat([head, torch.full_like(head[:, :1], mu >= 1.0)], dim=-1)
        gap = (P - Q).abs()
        g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
        total = (g_head + g_tail).clamp_min(1e-8)
        h, l = g_head / total, g_tail / total

    def kl(a, b):  # sum a log(a / b), 0 where a = 0 (both logs masked there, so their gradients are too)
        live = a > 0
        ratio = torch.where(live, a, 1.0).log() - torch.where(live, b, 1.0).log()
        return torch.where(live, a * ratio, 0.0).sum(-1)

    return h * kl(P, Q) + l * kl(Q, P), h, l


def make_case(n, vocab, k, dtype, mode, pad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, vocab, generator=g) * 3).to(dtype)
    teacher = torch.randn(n, vocab, generator=g, dtype=F64) * 3
    topk = fastkd.TopKTeacher.from_logits(teacher, k, mode=mode)
    ids, logprobs = topk.indices.clone(), topk.logprobs.to(torch.float32)
    if pad:  # the last rows have fewer ids (padding slots -1)
        ids[-1, k // 2:] = -1
        ids[-2, -1] = -1
    return student, fastkd.TopKTeacher(ids, logprobs, mode=mode)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["tail", "renormalize"])
@pytest.mark.parametrize("mu", [0.3, 0.9, 1.0])
def test_akl_topk_matches_float64_definition(backend, mode, mu):
    device = needs(backend)
    student, topk = make_case(6, 2053, 16, torch.float32, mode, pad=True, seed=int(mu * 10))
    s = student.to(device).detach().clone().requires_grad_(True)
    t = fastkd.TopKTeacher(topk.indices.to(device), topk.logprobs.to(device), mode=mode)
    loss = fastkd.akl_loss(s, t, mu=mu, temperature=2.0, backend=backend)
    loss.backward()
    ref_s = student.to(F64).requires_grad_(True)
    rows, h, l = oracle_rows(ref_s, topk.indices, topk.logprobs, mode, 2.0, mu)
    ref = rows.sum() / rows.shape[0]
    ref.backward()
    assert (h > 0.05).any() and (l > 0.05).any() or mu == 1.0  # both KLs matter in these cases
    torch.testing.assert_close(loss.detach().cpu().to(F64), ref.detach(), rtol=TOL[torch.float32][0], atol=1e-7)
    err = (s.grad.cpu().to(F64) - ref_s.grad).norm() / ref_s.grad.norm()
    assert err < TOL[torch.float32][1], err


def test_akl_topk_weights_against_definition():
    student, topk = make_case(5, 300, 12, torch.float64, "tail", pad=True, seed=3)
    for mu in (0.2, 0.6, 1.0):
        h, l = fastkd.losses.akl_topk.akl_topk_weights(student, topk, 1.5, mu)
        _, h_ref, l_ref = oracle_rows(student, topk.indices, topk.logprobs, "tail", 1.5, mu)
        torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(l, l_ref, rtol=1e-12, atol=1e-12)
    # mu = 1: every bucket is head, so l = 0 and the loss is forward KL over the buckets
    assert torch.equal(l, torch.zeros_like(l))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_akl_topk_full_vocabulary_equals_dense(backend):
    """A top-k holding all but one class (K = V - 1): the buckets are the classes (the tail bucket the least
    probable one, never head at mu < 1, as in the dense head): the dense AKL (no ties in these logits), up to
    the tail's mass rounded as 1 - sum p (K = V would leave a rounding residue against an empty student tail,
    which every top-k KL counts as infinite)."""
    device = needs(backend)
    g = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(4, 40, generator=g), torch.randn(4, 40, generator=g) * 2
    topk = fastkd.TopKTeacher.from_logits(teacher, 39)
    for mu in (0.4, 0.8):
        s1 = student.clone().requires_grad_(True)
        s2 = student.clone().requires_grad_(True)
        dense = fastkd.akl_loss(s1.to(device), teacher.to(device), mu=mu, backend=backend)
        top = fastkd.akl_loss(s2.to(device), topk, mu=mu, backend=backend)
        dense.backward(), top.backward()
        torch.testing.assert_close(top, dense, rtol=1e-4, atol=1e-6)
        assert (s2.grad - s1.grad).norm() / s1.grad.norm() < 1e-4


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_akl_topk_rows_ce_weights_and_shifted_bf16(backend, reduction):
    """HF-shifted bf16 logits [B, S, V] (a view), labels with -100, sample weights, the CE in the same call,
    return_parts; against the oracle rows weighted as every divergence weights them."""
    device = needs(backend)
    b, seq, vocab, k = 2, 5, 1031, 8
    g = torch.Generator().manual_seed(11)
    full = (torch.randn(b, seq + 1, vocab, generator=g) * 2).to(torch.bfloat16)
    shifted = full[:, :-1]  # HF's logits[:, :-1]: not contiguous
    teacher = torch.randn(b, seq, vocab, generator=g) * 2
    topk = fastkd.TopKTeacher.from_logits(teacher, k)
    target = torch.randint(0, vocab, (b, seq), generator=g)
    target[0, 1] = target[1, 3] = -100
    weight = torch.rand(b, seq, generator=g) + 0.5
    s = shifted.to(device).detach().requires_grad_(True)
    out = fastkd.akl_loss(s, topk, mu=0.5, reduction=reduction, target=target, sample_weight=weight,
                          ce_weight=0.3, return_parts=True, backend=backend)
    grad_out = torch.rand(out.loss.shape, generator=g) + 0.5
    out.loss.backward(grad_out)

    ref_s = shifted.to(F64).reshape(-1, vocab).requires_grad_(True)
    rows, _, _ = oracle_rows(ref_s, topk.indices.reshape(-1, k), topk.logprobs.reshape(-1, k), "tail", 1.0, 0.5)
    live = (target.reshape(-1) != -100).to(F64)
    ce = torch.nn.functional.cross_entropy(ref_s, target.reshape(-1).clamp_min(0), reduction="none")
    per_row = live * weight.reshape(-1).to(F64) * (rows + 0.3 * ce)
    soft = live * weight.reshape(-1).to(F64) * rows
    if reduction == "batchmean":
        ref, ref_soft = per_row.sum() / live.sum(), soft.sum() / live.sum()
    elif reduction == "sum":
        ref, ref_soft = per_row.sum(), soft.sum()
    else:
        ref, ref_soft = per_row.reshape(b, seq), soft.reshape(b, seq)
    ref.backward(grad_out.to(F64))
    rtol, gtol = TOL[torch.bfloat16]
    torch.testing.assert_close(out.loss.detach().to(F64), ref.detach(), rtol=rtol, atol=1e-3)
    torch.testing.assert_close(out.soft.to(F64), ref_soft.detach(), rtol=rtol, atol=1e-3)
    grad = s.grad.to(F64).reshape(-1, vocab)
    assert (grad - ref_s.grad).norm() / ref_s.grad.norm() < gtol


def test_akl_topk_no_grad():
    student, topk = make_case(3, 257, 6, torch.float32, "tail")
    with torch.no_grad():
        loss = fastkd.akl_loss(student.requires_grad_(True), topk, backend="cpu")
    assert loss.grad_fn is None
    with torch.inference_mode():
        fastkd.akl_loss(student, topk, backend="cpu")
    rows, _, _ = oracle_rows(student.detach().to(F64), topk.indices, topk.logprobs, "tail", 1.0, 0.5)
    torch.testing.assert_close(loss.to(F64), rows.mean(), rtol=2e-5, atol=1e-7)


def test_akl_topk_errors():
    student, topk = make_case(2, 50, 4, torch.float32, "tail")
    with pytest.raises(ValueError, match="mu"):
        fastkd.akl_loss(student, topk, mu=1.5)
    with pytest.raises(ValueError, match="teacher_temperature"):
        fastkd.akl_loss(student, topk, temperature=1.0, teacher_temperature=2.0)
    with pytest.raises(ValueError, match="process_group"):
        fastkd.akl_loss(student, topk, process_group=object())
    bad = fastkd.TopKTeacher(topk.indices[:1], topk.logprobs[:1])
    with pytest.raises(ValueError):
        fastkd.akl_loss(student, bad)
    with pytest.raises(TypeError, match="TopKTeacher"):  # the fused head keeps dense teachers for AKL
        fastkd.fused_linear_kd_loss(torch.randn(2, 4), torch.randn(50, 4), topk, divergence="akl")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_akl_topk_sync_free(backend, gpu_path):
    """The path GPU tensors take (the weights, both op calls, the backward) reads no tensor value on the host."""
    needs(backend)
    student, topk = make_case(3, 300, 8, torch.float32, "tail", pad=True)
    s = student.requires_grad_(True)
    target = torch.tensor([1, -100, 3])
    fastkd.akl_loss(s, topk, target=target, sample_weight=torch.rand(3), ce_weight=0.2, backend=backend).backward()
    assert s.grad is not None and gpu_path == []


def test_akl_topk_torch_compile_fullgraph():
    """The weights, the blocks of the student's log-sum-exp and the three op calls trace into one graph."""
    needs("cpu")

    def step(s, ids, logprobs, y):
        return fastkd.akl_loss(s, fastkd.TopKTeacher(ids, logprobs), target=y, ce_weight=0.5, mu=0.4, backend="cpu")

    student, topk = make_case(6, 300, 8, torch.float32, "tail", pad=True, seed=5)
    y = torch.randint(0, 300, (6,), generator=torch.Generator().manual_seed(6))
    y[2] = -100
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        s = student.clone().requires_grad_()
        out = fn(s, topk.indices, topk.logprobs, y)
        out.backward()
        results.append((out, s.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_akl_topk_padding_only_row_and_low_precision_weights():
    """A row of padding ids only adds 0 in both modes (no NaN from renormalising nothing); a bf16 sample weight
    scales the rows without rounding h and l to bf16."""
    for mode in ("tail", "renormalize"):
        student, topk = make_case(4, 300, 6, torch.float32, mode, seed=8)
        ids = topk.indices.clone()
        ids[1] = -1
        topk = fastkd.TopKTeacher(ids, topk.logprobs, mode=mode)
        s = student.clone().requires_grad_(True)
        rows = fastkd.akl_loss(s, topk, reduction="none", backend="cpu")
        rows.sum().backward()
        assert rows[1] == 0 and torch.isfinite(rows).all() and torch.isfinite(s.grad).all()
        assert (s.grad[1] == 0).all()
        keep = [0, 2, 3]
        want, _, _ = oracle_rows(student[keep].to(F64), ids[keep], topk.logprobs[keep], mode, 1.0, 0.5)
        torch.testing.assert_close(rows[keep].to(F64), want, rtol=2e-5, atol=1e-7)
    weight = torch.tensor([0.7, 1.3, 2.1, 0.4]).to(torch.bfloat16)
    got = fastkd.akl_loss(student, topk, reduction="none", sample_weight=weight, backend="cpu")
    plain = fastkd.akl_loss(student, topk, reduction="none", backend="cpu")
    torch.testing.assert_close(got, plain * weight.float(), rtol=1e-6, atol=0.0)
