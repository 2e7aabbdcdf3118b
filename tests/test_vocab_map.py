"""VocabMap (tokenizers -> teacher_to_student) and MappedTeacher in the divergences, against a float64 oracle."""
import pytest
import torch

import fastkd
from fastkd.dispatch.backend import unavailable_reason

BACKENDS = ["reference"] + [b for b in ("cpu",) if unavailable_reason(b, "jsd") is None]


def make_map(vt=700, vs=450, seed=0):
    """Many teacher tokens to one student token, unmatched tokens on both sides."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vs - 50, (vt,), generator=g)  # student ids >= vs - 50 are never hit
    table[torch.rand(vt, generator=g) < 0.3] = -1
    return fastkd.VocabMap(table, vs)


def oracle(s, t, vm, kind, temperature, mode):
    """Bucket distributions built by hand (a dense [V_t, V_m] incidence matrix), the divergence per row, mean."""
    q, p = torch.softmax(s / temperature, -1), torch.softmax(t / temperature, -1)
    ids = torch.unique(vm.teacher_to_student[vm.teacher_to_student >= 0])
    incidence = (vm.teacher_to_student.unsqueeze(1) == ids.unsqueeze(0)).to(p.dtype)
    P, Q = p @ incidence, q[..., ids]
    if mode == "tail":
        unmatched_s = torch.ones(s.shape[-1], dtype=torch.bool)
        unmatched_s[ids] = False
        P = torch.cat([P, p[..., vm.teacher_to_student < 0].sum(-1, keepdim=True)], -1)
        Q = torch.cat([Q, q[..., unmatched_s].sum(-1, keepdim=True)], -1)
    else:
        P, Q = P / P.sum(-1, keepdim=True), Q / Q.sum(-1, keepdim=True)
    if kind == "forward_kl":
        rows = (P * (P.log() - Q.log())).sum(-1)
    elif kind == "reverse_kl":
        rows = (Q * (Q.log() - P.log())).sum(-1)
    elif kind == "jsd":
        M = 0.3 * P + 0.7 * Q
        rows = 0.3 * (P * (P.log() - M.log())).sum(-1) + 0.7 * (Q * (Q.log() - M.log())).sum(-1)
    else:
        rows = 0.5 * (P - Q).abs().sum(-1)
    return rows.mean()


LOSSES = {"forward_kl": fastkd.forward_kl_loss, "reverse_kl": fastkd.reverse_kl_loss,
          "jsd": lambda *a, **k: fastkd.jsd_loss(*a, beta=0.3, **k), "tvd": fastkd.tvd_loss}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["tail", "renormalize"])
@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_mapped_teacher_matches_oracle(kind, mode, backend):
    vm = make_map()
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, 450, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 4, 700, generator=g, dtype=torch.float64) * 2
    s_o, t_o = s.clone().requires_grad_(), t.clone().requires_grad_()
    want = oracle(s_o, t_o, vm, kind, 1.5, mode)
    want.backward()
    dtype = torch.float64 if backend == "reference" else torch.float32
    s_f, t_f = s.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()
    got = LOSSES[kind](s_f, fastkd.MappedTeacher(t_f, vm, mode=mode), temperature=1.5, backend=backend)
    got.backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert abs(got.item() - want.item()) <= tol * max(1.0, abs(want.item()))
    for a, b in ((s_f.grad, s_o.grad), (t_f.grad, t_o.grad)):
        assert float((a.double() - b).norm() / b.norm()) < tol * 10


def test_identity_map_is_the_dense_loss_and_kd_loss():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(10, 300, generator=g), torch.randn(10, 300, generator=g)
    vm = fastkd.VocabMap(torch.arange(300), 300)
    assert vm.matched_fraction == 1.0
    for loss in (fastkd.forward_kl_loss, fastkd.reverse_kl_loss, fastkd.tvd_loss):
        assert torch.allclose(loss(s, fastkd.MappedTeacher(t, vm), temperature=2.0), loss(s, t, temperature=2.0),
                              rtol=1e-5, atol=1e-7)
    assert torch.allclose(fastkd.kd_loss(s, fastkd.MappedTeacher(t, vm), 4.0), fastkd.kd_loss(s, t, 4.0), rtol=1e-5)
    w = torch.randn(300, 16)
    h = torch.randn(10, 16)
    assert torch.allclose(fastkd.jsd_loss(s, fastkd.MappedTeacher((h, w), vm)), fastkd.jsd_loss(s, h @ w.t()),
                          rtol=1e-5, atol=1e-7)


def test_vocab_map_errors():
    with pytest.raises(ValueError, match="matches no token"):
        fastkd.VocabMap(torch.full((10,), -1), 5)
    with pytest.raises(ValueError, match="outside"):
        fastkd.VocabMap(torch.tensor([0, 5]), 5)
    with pytest.raises(TypeError, match="int64"):
        fastkd.VocabMap(torch.tensor([0, 1], dtype=torch.int32), 5)
    vm = fastkd.VocabMap(torch.tensor([0, -1, 3]), 4)
    with pytest.raises(ValueError, match="maps 3 teacher tokens"):
        fastkd.MappedTeacher(torch.randn(2, 5), vm)
    with pytest.raises(ValueError, match="maps onto 4 student tokens"):
        fastkd.forward_kl_loss(torch.randn(2, 6), fastkd.MappedTeacher(torch.randn(2, 3), vm))
    with pytest.raises(ValueError, match="leading shape"):
        fastkd.forward_kl_loss(torch.randn(3, 4), fastkd.MappedTeacher(torch.randn(2, 3), vm))
    with pytest.raises(ValueError, match="mode"):
        fastkd.MappedTeacher(torch.randn(2, 3), vm, mode="drop")
    with pytest.raises(TypeError, match="VocabMap"):
        fastkd.MappedTeacher(torch.randn(2, 3), torch.arange(3))
    assert "matched=2" in repr(vm) and abs(vm.matched_fraction - 2 / 3) < 1e-12


def _train(kind, size, texts):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library is not installed")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    if kind == "byte":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style: "▁" marks a space
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, initial_alphabet=alphabet,
                                                       special_tokens=["<eos>"], show_progress=False))
    return tok


TEXTS = ["the cat sat on the mat and the dog sat on the log"] * 20 + ["distillation across tokenizers"] * 5


def test_from_tokenizers_normalises_space_markers():
    byte, spm = _train("byte", 300, TEXTS), _train("spm", 120, TEXTS)
    vm = fastkd.VocabMap.from_tokenizers(spm, byte)  # student: SentencePiece-style, teacher: byte-level
    t_vocab, s_vocab = byte.get_vocab(), spm.get_vocab()
    assert "\u0120the" in t_vocab and "\u2581the" in s_vocab
    assert int(vm.teacher_to_student[t_vocab["\u0120the"]]) == s_vocab["\u2581the"]
    assert int(vm.teacher_to_student[t_vocab["<eos>"]]) == s_vocab["<eos>"]
    assert 0 < vm.matched_fraction < 1 and vm.student_vocab_size == spm.get_vocab_size()
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    fast_s = transformers.PreTrainedTokenizerFast(tokenizer_object=spm)
    fast_t = transformers.PreTrainedTokenizerFast(tokenizer_object=byte)
    assert torch.equal(fastkd.VocabMap.from_tokenizers(fast_s, fast_t).teacher_to_student, vm.teacher_to_student)


def test_from_tokenizers_with_nothing_shared():
    a = _train("byte", 260, ["aaaa"] * 5)

    class Other:
        def get_vocab(self):
            return {"\u4e00": 0, "\u4e01": 1}

    with pytest.raises(ValueError, match="share no token"):
        fastkd.VocabMap.from_tokenizers(Other(), a)
    with pytest.raises(TypeError, match="student_tokenizer"):
        fastkd.VocabMap.from_tokenizers(object(), a)
