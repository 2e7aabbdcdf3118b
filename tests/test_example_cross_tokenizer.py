"""examples/distill_cross_tokenizer.py: the group-start rows it distils on, its first-token vocabulary map, its
labelled windows, and a ``--quick`` run end to end (every method, the table, csv and plot written)."""
import csv
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the example needs transformers (pip install fastkd[examples])")
pytest.importorskip("tokenizers", reason="the example trains BPE tokenizers (pip install fastkd[examples])")

import fastkd  # noqa: E402

import lm_cases  # noqa: E402



@pytest.fixture(scope="module")
def ex():
    return lm_cases.load_example("distill_cross_tokenizer")


one_thread = pytest.fixture(autouse=True)(lm_cases.one_thread)


def test_group_rows_are_the_predictions_at_each_common_cut(ex):
    # "abcdef": student "ab" "c" "def", teacher "abc" "de" "f"; common cuts at 3 and 6. Group 1 starts at
    # character 3: the student's token 2 ("def", predicted by row 1), the teacher's token 1 ("de", by row 0)
    s_off = torch.tensor([[[0, 2], [2, 3], [3, 6], [0, 0]]])
    s_mask = torch.tensor([[True, True, True, False]])
    t_off = torch.tensor([[[0, 3], [3, 5], [5, 6]]])
    al = fastkd.align_tokens(s_off, t_off, s_mask)
    assert al.num_groups.tolist() == [2]
    s_logits, t_logits = torch.randn(1, 3, 7), torch.randn(1, 2, 11)
    s_ids, t_ids = torch.tensor([[1, 2, 3, 0]]), torch.tensor([[4, 5, 6]])
    rows_s = ex.group_rows(s_logits, s_ids, al.student_group, 1, "first")
    rows_t = ex.group_rows(t_logits, t_ids, al.teacher_group, 1, "first")
    assert torch.equal(rows_s[0, 0], s_logits[0, 1]) and torch.equal(rows_t[0, 0], t_logits[0, 0])
    # GOLD's merge: the first distribution times the later tokens' probabilities
    merged = ex.group_rows(t_logits, t_ids, al.teacher_group, 1, "observed")
    lp = t_logits.log_softmax(-1)
    assert torch.allclose(merged[0, 0], lp[0, 0] + lp[0, 1, 6])


@pytest.fixture(scope="module")
def tokenizers(ex):
    text, _ = ex.stdlib_text(60_000)
    return ex.train_tokenizer(text, 300), ex.train_tokenizer(text, 600)


def test_first_token_map_sends_each_teacher_token_to_a_prefix(ex, tokenizers):
    from fastkd.core.vocab import token_bytes
    s_tok, t_tok = tokenizers
    vm = ex.first_token_map(s_tok, t_tok)
    assert vm.matched_fraction == 1.0 and vm.student_vocab_size == s_tok.get_vocab_size()
    s_vocab = s_tok.get_vocab()
    shared = 0
    for c in range(t_tok.get_vocab_size()):
        whole = token_bytes(t_tok.id_to_token(c), True)
        first = token_bytes(s_tok.id_to_token(int(vm.teacher_to_student[c])), True)
        assert whole.startswith(first) and len(first) > 0
        if t_tok.id_to_token(c) in s_vocab:  # a token both vocabularies hold maps to itself
            shared += 1
            assert int(vm.teacher_to_student[c]) == s_vocab[t_tok.id_to_token(c)]
    assert shared > 250


def test_labelled_windows_are_a_fixed_share_of_the_text(ex):
    text = "".join(chr(97 + i % 26) for i in range(10_000))
    cfg = dict(window=50, labelled=0.1)
    w = ex.Windows(text, cfg, seed=3)
    assert w.labelled.numel() == 20
    starts = {int(x) for x in w.labelled}
    for piece in w.take(40, labelled=True):
        assert any(text[s:s + 50] == piece for s in starts)
    assert all(len(p) == 50 for p in w.take(10, labelled=False))
    again = ex.Windows(text, cfg, seed=3)
    assert torch.equal(again.labelled, w.labelled) and again.take(5, True) == ex.Windows(text, cfg, 3).take(5, True)


def test_quick_run_writes_the_table(ex, tmp_path):
    runs, teacher_bpb = ex.main(["--quick", "--out-dir", str(tmp_path)])
    assert [r["method"] for r in runs] == list(ex.METHODS)
    for r in runs:
        assert math.isfinite(r["bpb"]) and 0 < r["bpb"] < 9 and r["step_s"] > 0
    assert teacher_bpb < min(r["bpb"] for r in runs)  # the teacher learned more than any student
    with open(tmp_path / "cross_tokenizer-quick.csv") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == list(ex.METHODS)
    with open(tmp_path / "cross_tokenizer-quick.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "cross_tokenizer-quick.md").read_text()
    assert "| teacher |" in md and "| hybrid |" in md and "vs CE (KD batches), paired" in md
