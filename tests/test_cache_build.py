"""``python -m fastkd.cache build`` / ``inspect`` on a tiny local tokenizer and teacher (nothing downloaded)."""
import os

import pytest
import torch

import fastkd
from fastkd.cache import TeacherCache, TeacherCacheWriter
from fastkd.cache import build as cache_build

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")

WORDS = ("the teacher writes a cache once and many students read it back while the kernels keep "
         "every row exact so distillation runs offline at scale with small files").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
            for n in torch.randint(20, 80, (12,), generator=g)]
    data = root / "data.jsonl"
    data.write_text("".join('{"text": "%s"}\n' % d for d in docs))
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(docs, tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"]))
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model_dir = root / "teacher"
    config.save_pretrained(str(model_dir))
    return dict(root=root, data=str(data), tokenizer=str(tok_path), config=str(model_dir / "config.json"))


def run_build(setup, out, *extra):
    return cache_build.main(["build", "--teacher", setup["config"], "--data", setup["data"], "--tokenizer",
                             setup["tokenizer"], "--k", "8", "--out", str(out), "--seq-len", "24",
                             "--batch-size", "3", "--shard-tokens", "70", *extra])


def test_build_stores_the_teachers_topk(setup, tmp_path):
    assert run_build(setup, tmp_path / "c", "--logprob-encoding", "float16") == 0
    cache = TeacherCache(str(tmp_path / "c"))
    model = cache_build.load_teacher(setup["config"], torch.float32, 0)
    seqs = cache_build.token_sequences([setup["data"]], cache_build.load_tokenizer(setup["tokenizer"]), 24)
    assert len(cache) == len(seqs) and len(cache.shards) > 2
    for i in (0, len(seqs) - 1):
        ids, teacher = cache[i]
        assert torch.equal(ids, seqs[i])
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0]
        exact = fastkd.TopKTeacher.from_logits(logits, 8)
        torch.testing.assert_close(teacher.logprobs, exact.logprobs, rtol=1e-3, atol=2e-3)
        same = (teacher.indices == exact.indices).float().mean()
        assert same > 0.98  # ids agree except where two log-probs tie to float rounding


def test_killed_build_resumes_to_the_same_files(setup, tmp_path, monkeypatch):
    """A build interrupted mid-shard (buffered sequences lost, as with kill -9) and resumed equals one run."""
    run_build(setup, tmp_path / "whole")
    added = []
    original = TeacherCacheWriter.add

    def crash_after_five(self, *a, **kw):
        if len(added) == 5:
            raise KeyboardInterrupt("simulated crash")
        added.append(1)
        return original(self, *a, **kw)

    monkeypatch.setattr(TeacherCacheWriter, "add", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        run_build(setup, tmp_path / "resumed")
    monkeypatch.setattr(TeacherCacheWriter, "add", original)
    partial = TeacherCache(str(tmp_path / "resumed"))
    assert 0 < len(partial) < 5  # some shards were complete, the rest was lost
    with pytest.raises(ValueError, match="resume=True"):
        run_build(setup, tmp_path / "resumed")
    run_build(setup, tmp_path / "resumed", "--resume")
    names = sorted(os.listdir(tmp_path / "whole"))
    assert names == sorted(os.listdir(tmp_path / "resumed"))
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_two_writers_and_inspect(setup, tmp_path, capsys):
    for w in (0, 1):
        run_build(setup, tmp_path, "--num-writers", "2", "--writer", str(w))
    cache = TeacherCache(str(tmp_path))
    seqs = cache_build.token_sequences([setup["data"]], cache_build.load_tokenizer(setup["tokenizer"]), 24)
    order = seqs[0::2] + seqs[1::2]  # writer 0's sequences, then writer 1's
    assert [cache[i][0].tolist() for i in range(len(cache))] == [s.tolist() for s in order]
    capsys.readouterr()
    cache_build.main(["inspect", str(tmp_path), "--rows", "3"])
    out = capsys.readouterr().out
    assert f"{len(seqs)} sequences" in out and "bytes per token" in out and out.count(" -> ") == 3


def test_build_argument_errors(setup, tmp_path):
    with pytest.raises(SystemExit):
        run_build(setup, tmp_path, "--writer", "2", "--num-writers", "2")
    with pytest.raises(SystemExit):
        cache_build.main(["build", "--teacher", setup["config"], "--data", setup["data"], "--tokenizer",
                          setup["tokenizer"], "--k", "0", "--out", str(tmp_path)])


def test_training_from_the_cache_equals_online_topk(setup, tmp_path):
    """The same student trained from the cache and from the teacher's top-k computed online each step."""
    from fastkd.teacher import teacher_topk

    run_build(setup, tmp_path, "--logprob-encoding", "float16")
    cache = TeacherCache(str(tmp_path))
    teacher = cache_build.load_teacher(setup["config"], torch.float32, 0)
    base, weight, *_ = cache_build.head_of(teacher)
    config = transformers.LlamaConfig(vocab_size=cache.vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    curves = []
    for source in ("cache", "online"):
        torch.manual_seed(1)
        student = transformers.AutoModelForCausalLM.from_config(config)
        opt = torch.optim.SGD(student.parameters(), lr=0.5)
        loader = torch.utils.data.DataLoader(cache, batch_size=2, collate_fn=fastkd.cache.collate)
        curve = []
        for batch in loader:
            if source == "online":
                with torch.no_grad():
                    hidden = base(input_ids=batch["input_ids"]).last_hidden_state
                    online = teacher_topk(hidden.reshape(-1, hidden.shape[-1]), weight, cache.k)
                top = fastkd.TopKTeacher(online.indices.reshape(*hidden.shape[:2], -1),
                                         online.logprobs.reshape(*hidden.shape[:2], -1))
            else:
                top = batch["teacher"]
            h = student.model(input_ids=batch["input_ids"]).last_hidden_state
            loss = fastkd.fused_linear_kd_loss(h, student.lm_head.weight, top, batch["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    assert len(curves[0]) > 3 and curves[0][-1] < curves[0][0]
    torch.testing.assert_close(curves[0], curves[1], rtol=2e-3, atol=1e-4)
