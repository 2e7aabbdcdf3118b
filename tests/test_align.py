"""align_tokens and merge_aligned against TRL GOLD's walk and merge; the aligned ULD against GOLD's extended ULD."""
import types

import pytest
import torch

import fastkd


def gold():
    return pytest.importorskip("trl.experimental.gold.gold_trainer", reason="TRL (with GOLD) is not installed")


def gold_uld(**config):
    defaults = dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                    uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                    use_extended_uld=True, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False,
                    uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    defaults.update(config)
    return gold().ULDLoss(types.SimpleNamespace(**defaults))


def cuts(length, count, g):
    """Offsets [S, 2] of a random segmentation of text [0, length) into ``count`` tokens."""
    inner = torch.randperm(length - 1, generator=g)[:count - 1].sort().values + 1
    edges = torch.cat([torch.tensor([0]), inner, torch.tensor([length])])
    return torch.stack([edges[:-1], edges[1:]], 1)


def paired_cuts(length, g):
    """Student and teacher segmentations sharing most cut points (groups of 1-3 tokens)."""
    inner = torch.randperm(length - 1, generator=g)[:length // 2] + 1
    side = torch.rand(inner.numel(), generator=g)
    def offsets(points):
        edges = torch.cat([torch.tensor([0]), points.sort().values, torch.tensor([length])])
        return torch.stack([edges[:-1], edges[1:]], 1)
    return offsets(inner[side < 0.8]), offsets(inner[(side < 0.6) | (side >= 0.8)])


def as_lists(group, count):
    return [group.eq(k).nonzero().squeeze(1).tolist() for k in range(count)]


@pytest.mark.parametrize("seed", range(6))
def test_groups_equal_gold_walk(seed):
    g = torch.Generator().manual_seed(seed)
    length = 60
    s_off, t_off = cuts(length, 25, g), cuts(length, 17, g)
    al = fastkd.align_tokens(s_off, t_off)
    s_groups, t_groups = gold().ULDLoss._align_by_byte_offsets(s_off.tolist(), t_off.tolist())
    assert as_lists(al.student_group, int(al.num_groups)) == s_groups
    assert as_lists(al.teacher_group, int(al.num_groups)) == t_groups


def test_batched_with_padding_left_and_right():
    g = torch.Generator().manual_seed(7)
    offs = [(cuts(40, 12, g), cuts(40, 9, g)), (cuts(25, 6, g), cuts(25, 10, g))]
    s = torch.zeros(2, 14, 2, dtype=torch.int64)
    t = torch.zeros(2, 11, 2, dtype=torch.int64)
    sm = torch.zeros(2, 14, dtype=torch.bool)
    tm = torch.zeros(2, 11, dtype=torch.bool)
    s[0, 2:], sm[0, 2:] = offs[0][0], True  # left padding
    s[1, :6], sm[1, :6] = offs[1][0], True  # right padding
    t[0, :9], tm[0, :9] = offs[0][1], True
    t[1, 1:], tm[1, 1:] = offs[1][1], True
    al = fastkd.align_tokens(s, t, sm, tm)
    for b, (so, to) in enumerate(offs):
        one = fastkd.align_tokens(so, to)
        assert int(al.num_groups[b]) == int(one.num_groups)
        assert torch.equal(al.student_group[b][sm[b]], one.student_group)
        assert torch.equal(al.teacher_group[b][tm[b]], one.teacher_group)
        assert (al.student_group[b][~sm[b]] == -1).all() and (al.teacher_group[b][~tm[b]] == -1).all()
    assert al.valid.shape == (2, int(al.num_groups.max())) and al.target()[~al.valid].eq(-100).all()


def test_zero_width_token_joins_its_group_and_errors():
    s = torch.tensor([[0, 3], [3, 5], [5, 5]])  # a zero-width EOS at the end
    t = torch.tensor([[0, 5], [5, 5]])
    al = fastkd.align_tokens(s, t)
    assert al.student_group.tolist() == [0, 0, 0] and al.teacher_group.tolist() == [0, 0]
    with pytest.raises(ValueError, match="do not cover the same text"):
        fastkd.align_tokens(torch.tensor([[0, 3], [3, 6]]), torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="decrease"):
        fastkd.align_tokens(torch.tensor([[0, 3], [1, 2], [2, 5]]), torch.tensor([[0, 5]]))
    with pytest.raises(TypeError, match="integer tensor"):
        fastkd.align_tokens(torch.zeros(3, 2), torch.zeros(3, 2))

    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="no token offsets"):
        fastkd.token_offsets(Slow(), "text")


@pytest.mark.parametrize("strategy", ["observed", "bayesian"])
def test_merge_equals_gold(strategy):
    g = torch.Generator().manual_seed(3)
    s_off, t_off = cuts(50, 20, g), cuts(50, 14, g)
    al = fastkd.align_tokens(s_off, t_off)
    logits = torch.randn(20, 64, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 64, (20,), generator=g)
    probs = logits.softmax(-1)
    uld = gold_uld(uld_token_merge_strategy=strategy)
    theirs = uld._merge_probabilities_with_alignment_groups(probs, as_lists(al.student_group, int(al.num_groups)),
                                                            ids.tolist())
    ours = fastkd.merge_aligned(logits.log_softmax(-1), ids, al.student_group, strategy).exp()
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("hybrid", [False, True])
def test_aligned_uld_equals_gold_extended(hybrid):
    g = torch.Generator().manual_seed(11)
    # small vocabularies in the hybrid: GOLD's JSD takes log(clamp(x, 1e-8)), so the merged masses stay above 1e-8
    vs, vt, ts, tt = (20, 30, 1.4, 0.8) if hybrid else (90, 130, 1.4, 0.8)
    s_off, t_off = paired_cuts(60, g)
    S, T = s_off.shape[0], t_off.shape[0]
    s = torch.randn(1, S, vs, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(1, T, vt, generator=g, dtype=torch.float64).requires_grad_()
    s_ids, t_ids = torch.randint(0, vs, (1, S), generator=g), torch.randint(0, vt, (1, T), generator=g)
    uld = gold_uld(uld_student_temperature=ts, uld_teacher_temperature=tt, uld_use_hybrid_loss=hybrid)
    vm = None
    if hybrid:
        student = {f"w{i}": i for i in range(vs)}
        teacher = {(f"w{i}" if i % 2 else f"x{i}"): (i * 7) % vt for i in range(vt)}
        uld.student_tokenizer = types.SimpleNamespace(get_vocab=lambda: student)
        uld.teacher_tokenizer = types.SimpleNamespace(get_vocab=lambda: teacher)
        uld.use_hybrid_loss = True
        uld._initialize_vocabulary_mapping()
        vm = fastkd.VocabMap.from_tokenizers(uld.student_tokenizer, uld.teacher_tokenizer)
    labels_s, labels_t = torch.zeros(1, S, dtype=torch.int64), torch.zeros(1, T, dtype=torch.int64)
    theirs = uld(s, t, labels_s, labels_t, s_ids, t_ids, s_off.unsqueeze(0), t_off.unsqueeze(0))
    grads = torch.autograd.grad(theirs, (s, t))
    al = fastkd.align_tokens(s_off.unsqueeze(0), t_off.unsqueeze(0))
    assert 10 < int(al.num_groups) < min(S, T)
    sm = fastkd.merge_aligned((s / ts).log_softmax(-1), s_ids, al.student_group)
    tm = fastkd.merge_aligned((t / tt).log_softmax(-1), t_ids, al.teacher_group)
    if hybrid:
        ours = fastkd.hybrid_uld_loss(sm, tm, vm, inputs="log_probs", target=al.target(), backend="reference")
    else:
        ours = fastkd.uld_loss(sm, tm, inputs="log_probs", target=al.target(), backend="reference")
    mine = torch.autograd.grad(ours, (s, t))
    assert abs(ours.item() - theirs.item()) < 1e-12 * theirs.item()
    for a, b in zip(mine, grads):
        assert float((a - b).norm() / b.norm()) < 1e-12
    # the batched path (float32) on the same merged rows
    fast = fastkd.uld_loss(sm.float(), tm.float(), inputs="log_probs", target=al.target()) if not hybrid else \
        fastkd.hybrid_uld_loss(sm.float(), tm.float(), vm, inputs="log_probs", target=al.target())
    assert abs(fast.item() - theirs.item()) < 2e-5 * theirs.item()
