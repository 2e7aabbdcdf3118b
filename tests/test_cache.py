"""fastkd.cache: the on-disk teacher cache (format, encodings and their error, crash safety, batches)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import fastkd
from fastkd.cache import CacheError, TeacherCache, TeacherCacheWriter, collate
from fastkd.cache import format as fmt


def lm_like_logits(n, vocab, generator, spread=3.0):
    """Logits shaped like a language model's: a broad background and a few strong candidates."""
    logits = torch.randn(n, vocab, generator=generator) * spread
    logits[:, :8] += torch.rand(n, 8, generator=generator) * 12
    return logits[:, torch.randperm(vocab, generator=generator)]


def exact_topk(logits, k):
    """Float64 top-k log-probs and the exact log of the mass outside them."""
    lp = torch.log_softmax(logits.double(), -1)
    values, ids = lp.topk(k, -1)
    tail = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1)
    return ids, values, tail


def teacher_of(logits, k):
    ids, values, tail = exact_topk(logits, k)
    return fastkd.TopKTeacher(ids, values.float(), tail_logprob=tail.float())


def write_cache(path, seqs, vocab, k, **kw):
    with TeacherCacheWriter(str(path), vocab_size=vocab, k=k, **kw) as w:
        for ids, t in seqs:
            w.add(ids, t)
    return TeacherCache(str(path))


def random_sequences(n, vocab, k, seed=0, lengths=(5, 40)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        s = int(torch.randint(lengths[0], lengths[1], (1,), generator=g))
        out.append((torch.randint(0, vocab, (s,), generator=g), teacher_of(lm_like_logits(s, vocab, g), k)))
    return out


@pytest.mark.parametrize("vocab", [2, 100, 65536, 65537, 128256, 1 << 24, (1 << 24) + 1])
def test_id_encoding_round_trip(vocab):
    g = torch.Generator().manual_seed(vocab % 1000)
    k = 2 if vocab == 2 else 7
    ids = torch.randint(0, vocab, (13, k), generator=g).numpy()
    ids[0, 0], ids[1, -1] = vocab - 1, 0  # the extremes
    stored = fmt.encode_ids(ids, vocab)
    assert np.array_equal(fmt.decode_ids(stored, vocab, k), ids)
    bits = fmt.id_bits(vocab)
    assert stored.nbytes == 13 * -(-k * bits // 8)
    assert bits == (16 if vocab <= 1 << 16 else (vocab - 1).bit_length() if vocab <= 1 << 24 else 32)


@pytest.mark.parametrize("encoding,kl_target", [("int8", 5e-4), ("float16", 1e-6)])
@pytest.mark.parametrize("spread", [1.0, 3.0, 8.0, 20.0])
def test_encoding_error_within_target(encoding, kl_target, spread):
    """KL(exact || decoded) over the top-k and tail, per token on average, at k = 64 (docs/cache.md)."""
    g = torch.Generator().manual_seed(int(spread))
    ids, values, tail = exact_topk(lm_like_logits(512, 32000, g, spread), 64)
    exact, exact_tail = values.numpy(), tail.numpy()
    stored = fmt.encode_logprobs(exact.astype(np.float32), encoding)
    tail16 = exact_tail.astype(np.float16)
    decoded = fmt.decode_logprobs(stored, tail16, encoding)
    kl = fmt.topk_kl(exact, exact_tail, decoded, tail16.astype(np.float64))
    assert np.isfinite(kl).all() and kl.mean() <= kl_target, kl.mean()
    # the decoded distribution is normalised with the stored tail
    total = np.exp(decoded.astype(np.float64)).sum(1) + np.exp(tail16.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    # the error is real: a coarser int8 grid (4x the step) misses the target
    if encoding == "int8" and spread >= 3:
        coarse = {"logprob_codes": (stored["logprob_codes"] // 4) * 4, "logprob_step": stored["logprob_step"]}
        coarse["logprob_codes"][stored["logprob_codes"] == fmt.NO_MASS_CODE] = fmt.NO_MASS_CODE
        worse = fmt.topk_kl(exact, exact_tail, fmt.decode_logprobs(coarse, tail16, encoding), tail16)
        assert worse.mean() > 4 * kl.mean()


def test_bytes_per_token_at_k64(tmp_path):
    seqs = random_sequences(4, 32000, 64, lengths=(200, 201))
    for encoding, limit in (("int8", 200), ("float16", 264)):
        cache = write_cache(tmp_path / encoding, seqs, 32000, 64, logprob_encoding=encoding)
        # 2 (input id) + 128 (ids) + 64 or 128 (log-probs) + 2 (step) + 2 (tail) + 1 (mask), plus headers
        assert cache.bytes_per_token <= limit, cache.bytes_per_token


@pytest.mark.parametrize("encoding", ["int8", "float16"])
def test_round_trip_random_access_and_shards(tmp_path, encoding):
    vocab, k = 70000, 16  # 17-bit packed ids
    seqs = random_sequences(12, vocab, k, seed=1)
    seqs.append((torch.tensor([3, 1, 4]), teacher_of(torch.randn(3, vocab), k)))
    long_one = torch.randint(0, vocab, (130,))
    seqs.insert(5, (long_one, teacher_of(torch.randn(130, vocab), k)))  # longer than a shard
    cache = write_cache(tmp_path, seqs, vocab, k, logprob_encoding=encoding, shard_tokens=100)
    assert len(cache) == len(seqs) and len(cache.shards) >= 4
    assert max(s["tokens"] for s in cache.shards) == 130
    atol, rtol = (1e-3, 1e-3) if encoding == "float16" else (0.05, 0)
    for i in [0, 5, len(seqs) - 1, 7, -1, 3]:
        ids, t = cache[i]
        ref_ids, ref = seqs[i]
        assert torch.equal(ids, ref_ids) and torch.equal(t.indices, ref.indices)
        big = ref.logprobs > -8  # entries that carry the mass; tiny ones are stored relatively coarser
        torch.testing.assert_close(t.logprobs[big], ref.logprobs[big], rtol=rtol, atol=atol)
        torch.testing.assert_close(t.tail_logprob, ref.tail_logprob, rtol=2e-3, atol=1e-3)
    assert [x[0].tolist() for x in cache[2:6]] == [x[0].tolist() for x in seqs[2:6]]
    with pytest.raises(IndexError, match="out of range"):
        cache[len(seqs)]


def test_safetensors_library_reads_a_shard(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy", reason="the safetensors package is not installed")
    seqs = random_sequences(3, 1000, 8)
    cache = write_cache(tmp_path, seqs, 1000, 8)
    path = os.path.join(str(tmp_path), cache.shards[0]["file"])
    theirs = safetensors.load_file(path)
    ours, _ = fmt.read_arrays(path)
    assert set(theirs) == set(ours)
    for name in ours:
        assert np.array_equal(theirs[name], ours[name])
    assert np.array_equal(theirs["input_ids"].astype(np.int64), torch.cat([s[0] for s in seqs]).numpy())


def test_masked_rows_and_padding_slots(tmp_path):
    vocab, k = 50, 4
    ids = torch.arange(6)
    t = teacher_of(torch.randn(6, vocab), k)
    t.indices[2, 3] = -1  # a padding slot
    mask = torch.tensor([True, True, True, False, True, True])
    with TeacherCacheWriter(str(tmp_path), vocab_size=vocab, k=k) as w:
        w.add(ids, t, mask=mask)
    _, back = TeacherCache(str(tmp_path))[0]
    assert (back.indices[3] == -1).all()
    assert back.indices[2, 3] == -1 and (back.indices[2, :3] == t.indices[2, :3]).all()


def test_collate_feeds_the_losses(tmp_path):
    vocab, k = 300, 8
    seqs = random_sequences(3, vocab, k, seed=2, lengths=(4, 12))
    cache = write_cache(tmp_path, seqs, vocab, k, logprob_encoding="float16")
    batch = collate([cache[i] for i in range(3)])
    b, s = batch["input_ids"].shape
    assert batch["teacher"].indices.shape == (b, s, k) and batch["teacher"].tail_logprob.shape == (b, s)
    for row, (ids, _) in enumerate(seqs):
        n = len(ids)
        assert batch["target"][row, :n - 1].tolist() == ids[1:].tolist()
        assert (batch["target"][row, n - 1:] == -100).all() and batch["attention_mask"][row].sum() == n
    logits = torch.randn(b, s, vocab, requires_grad=True)
    loss = fastkd.kd_loss(logits, batch["teacher"], target=batch["target"])
    # the same loss from the original (unencoded) teachers on the counted rows
    rows = [(logits[r, :len(ids) - 1], seqs[r][1]) for r, (ids, _) in enumerate(seqs)]
    ref = sum(fastkd.kd_loss(x, fastkd.TopKTeacher(t.indices[:len(x)], t.logprobs[:len(x)]), reduction="sum")
              for x, t in rows) / sum(len(x) for x, _ in rows)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-4)
    loss.backward()
    assert logits.grad[batch["target"] == -100].abs().max() == 0


def test_several_writers_merge_in_order(tmp_path):
    a, b = random_sequences(3, 500, 4, seed=3), random_sequences(2, 500, 4, seed=4)
    for writer, seqs in ((1, b), (0, a)):
        with TeacherCacheWriter(str(tmp_path), vocab_size=500, k=4, writer=writer, shard_tokens=30) as w:
            for ids, t in seqs:
                w.add(ids, t)
    cache = TeacherCache(str(tmp_path))
    assert [cache[i][0].tolist() for i in range(5)] == [s[0].tolist() for s in a + b]
    with TeacherCacheWriter(str(tmp_path), vocab_size=500, k=5, writer=2) as w:
        pass
    with pytest.raises(CacheError, match="index-00002.json: its k"):
        TeacherCache(str(tmp_path))


def test_corrupt_and_truncated_shards_are_named(tmp_path):
    cache = write_cache(tmp_path, random_sequences(6, 400, 4, seed=5), 400, 4, shard_tokens=40)
    shard = os.path.join(str(tmp_path), cache.shards[1]["file"])
    data = bytearray(open(shard, "rb").read())
    data[-3] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    cache = TeacherCache(str(tmp_path))
    cache[0]  # shard 0 is fine
    second = int(np.searchsorted(cache._first_sequence, 1, side="right")) if cache.shards[0]["sequences"] == 1 \
        else cache.shards[0]["sequences"]
    with pytest.raises(CacheError, match=f"{cache.shards[1]['file']}: checksum mismatch"):
        cache[second]
    open(shard, "wb").write(bytes(data[:-10]))
    with pytest.raises(CacheError, match=f"{cache.shards[1]['file']}: .* bytes, the index says"):
        TeacherCache(str(tmp_path))


def test_existing_cache_needs_resume_and_matching_settings(tmp_path):
    write_cache(tmp_path, random_sequences(2, 400, 4), 400, 4)
    with pytest.raises(CacheError, match="resume=True"):
        TeacherCacheWriter(str(tmp_path), vocab_size=400, k=4)
    with pytest.raises(CacheError, match="its k is 4"):
        TeacherCacheWriter(str(tmp_path), vocab_size=400, k=8, resume=True)


_KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from test_cache import random_sequences
    from fastkd.cache import TeacherCacheWriter
    seqs = random_sequences(40, 700, 8, seed=9)
    w = TeacherCacheWriter({path!r}, vocab_size=700, k=8, shard_tokens=60, resume={resume})
    for ids, t in seqs[w.num_sequences:]:
        w.add(ids, t)
        time.sleep({pause})
    w.close()
""")


def _run_writer(path, resume, pause, wait=True):
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastkd.__file__)))
    code = _KILLED_WRITER.format(root=root, tests=os.path.dirname(__file__), path=str(path), resume=resume,
                                 pause=pause)
    proc = subprocess.Popen([sys.executable, "-c", code])
    if wait:
        assert proc.wait(timeout=120) == 0
    return proc


def test_kill_9_mid_build_then_resume_equals_uninterrupted(tmp_path):
    """A writer killed with SIGKILL mid-shard resumes to a cache identical to an uninterrupted one."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _run_writer(whole, False, 0.0)
    proc = _run_writer(killed, False, 0.05, wait=False)
    index = killed / "index-00000.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if index.exists() and len(json.loads(index.read_text())["shards"]) >= 2:
            break
        time.sleep(0.01)
    time.sleep(0.07)  # into the next shard's sequences
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed: slow it down"
    _run_writer(killed, True, 0.0)
    names = sorted(os.listdir(whole))
    assert names == sorted(os.listdir(killed))  # no temporaries, no orphans
    for name in names:
        assert (whole / name).read_bytes() == (killed / name).read_bytes(), name


def test_dataset_pickles_without_open_maps(tmp_path):
    cache = write_cache(tmp_path, random_sequences(3, 400, 4), 400, 4)
    cache[0]
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._open == {} and torch.equal(clone[1][0], cache[1][0])
    loader = torch.utils.data.DataLoader(cache, batch_size=2, collate_fn=collate)
    assert [b["input_ids"].shape[0] for b in loader] == [2, 1]


def test_axolotl_columns_round_trip(tmp_path):
    pytest.importorskip("datasets", reason="Hugging Face datasets is not installed")
    from fastkd.cache import from_axolotl, to_axolotl

    seqs = random_sequences(3, 900, 6, seed=6, lengths=(3, 9))
    cache = write_cache(tmp_path / "a", seqs, 900, 6, logprob_encoding="float16")
    ds = to_axolotl(cache)
    assert set(ds.column_names) >= {"input_ids", "target_token_ids", "target_logprobs", "target_mask"}
    row = ds[0]
    assert row["target_mask"][0] == [0] * 6 and row["target_token_ids"][1] == seqs[0][1].indices[0].tolist()
    with TeacherCacheWriter(str(tmp_path / "b"), vocab_size=900, k=6, logprob_encoding="float16") as w:
        assert from_axolotl(ds, w) == 3
    back = TeacherCache(str(tmp_path / "b"))
    for i in range(3):
        (ids, t), (ids2, t2) = cache[i], back[i]
        assert torch.equal(ids, ids2) and torch.equal(t.indices[:-1], t2.indices[:-1])
        assert (t2.indices[-1] == -1).all()  # axolotl has no place for the row after the sequence
        torch.testing.assert_close(t.logprobs[:-1], t2.logprobs[:-1], rtol=0, atol=2e-3)


def test_writer_input_errors(tmp_path):
    with pytest.raises(ValueError, match="k .* must be at most vocab_size"):
        TeacherCacheWriter(str(tmp_path), vocab_size=4, k=8)
    with pytest.raises(ValueError, match="logprob_encoding"):
        TeacherCacheWriter(str(tmp_path), vocab_size=40, k=8, logprob_encoding="int4")
    w = TeacherCacheWriter(str(tmp_path), vocab_size=40, k=2)
    t = teacher_of(torch.randn(3, 40), 2)
    with pytest.raises(ValueError, match="teacher must have shape"):
        w.add(torch.arange(4), t)
    with pytest.raises(ValueError, match="input_ids must hold token ids in"):
        w.add(torch.tensor([0, 1, 40]), t)
    with pytest.raises(TypeError, match="teacher must be a fastkd.TopKTeacher"):
        w.add(torch.arange(3), torch.randn(3, 40))
    w.close()
    with pytest.raises(CacheError, match="closed"):
        w.add(torch.arange(3), t)
