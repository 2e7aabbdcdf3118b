"""Tiny causal LMs built from configs (nothing downloaded) and batches, for the integration tests; the
examples as modules, for their tests."""
import importlib.util
import os

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name: str):
    """``examples/<name>.py`` imported as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_thread():
    """A fixture's body (``pytest.fixture(autouse=True)(one_thread)`` in a test module). Tiny matmuls: one thread (on a loaded 2-core machine, the thread pool made them 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

VOCAB = 97  # not a multiple of anything: ragged chunks


def llama(hidden=32, vocab=VOCAB, layers=2, seed=0, dtype=torch.float64, **extra):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, **extra)
    return transformers.LlamaForCausalLM(config).to(dtype)


def qwen2(hidden=48, vocab=VOCAB, layers=1, seed=1, dtype=torch.float64):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(config).to(dtype).eval()


def batch(rows=4, seq=11, vocab=VOCAB, prompt=4, seed=2):
    """``input_ids``, ``attention_mask``, ``labels`` ``[rows, seq]``: a prompt of ``prompt`` tokens (label -100),
    and the last row right-padded from position 8 (mask 0, label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :prompt] = -100
    mask[-1, 8:] = 0
    labels[-1, 8:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shifted_logits(model, inputs):
    """The model's own logits at the positions that predict a next token, and the shifted labels."""
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    return out, inputs["labels"][:, 1:]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def max_grad_err(got: dict, want: dict) -> float:
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    return max(rel_err(got[k], want[k]) for k in want)


def tokenizer(vocab=VOCAB):
    """A word-level tokenizer over ``w0 .. w{vocab - 4}`` and ``<pad> <bos> <eos> <unk>`` (ids 0-3), left padding
    (TRL's generation), with a plain chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    words.update({f"w{i}": i + 4 for i in range(vocab - 4)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                                eos_token="<eos>", unk_token="<unk>", padding_side="left")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}{% endif %}")
    return fast
