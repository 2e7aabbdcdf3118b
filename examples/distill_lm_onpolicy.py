"""On-policy distillation with TRL and fastkd's loss: the student generates, the teacher scores (issue 20).

    python examples/distill_lm_onpolicy.py [--steps N] [--divergence reverse_kl|jsd|kl] [--trl]

A few steps on CPU (about a minute). A byte-level BPE tokenizer, a Llama teacher trained with
cross-entropy on the standard library's sources, and a smaller Qwen2 student given a short
cross-entropy start (``examples/distill_lm_transfer.py``'s helpers, its ``--quick`` sizes). Then
``fastkd.integrations.trl.DistillationTrainer`` (``trl.DistillationTrainer`` with its loss replaced by
``fastkd.fused_linear_kd_loss``: the student's and teacher's logits never exist) trains the student on
its own samples: prompts are the first tokens of held-out ``def`` lines, the student completes them,
and the loss is the divergence between the teacher's and the student's next-token distributions on
the completion tokens (``--divergence reverse_kl``: MiniLLM's mode-seeking objective; TRL's
``beta = 1``). ``--trl`` also runs TRL's own trainer (its chunked loss, ``beta`` 1, 0.5 or 0 for
reverse KL, JSD, forward KL) from the same student for the time per step.

Reported: the loss logged at each step, the time per step (generation included), and how the
teacher scores the student's greedy completions of held-out prompts before and after (the teacher's
mean negative log-likelihood per completion token: lower means completions the teacher finds likelier).
"""
import argparse
import copy
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from fastkd.nn import FusedLinearKDLoss  # noqa: E402
from distill_lm import build, encode, stdlib_text, train_tokenizer  # noqa: E402
from distill_lm_transfer import CONFIGS, sequences, train_teacher  # noqa: E402

PAD, EOS = "<|pad|>", "<|endoftext|>"
TRL_BETA = {"reverse_kl": 1.0, "jsd": 0.5, "kl": 0.0}  # TRL's generalised JSD with these betas


def prompts_of(text: str, tok, n: int, words: int = 4):
    """The first ``words`` whitespace-separated words of the first ``n`` distinct ``def`` lines of ``text``."""
    seen = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("def ") and line not in seen:
            seen.append(" ".join(line.split()[:words]))
        if len(seen) == n:
            break
    return seen


@torch.no_grad()
def teacher_nll(student, teacher, hf_tok, prompts, new_tokens: int) -> float:
    """The teacher's mean NLL per token of the student's greedy completions of ``prompts``."""
    total = count = 0.0
    student.eval()
    for p in prompts:
        ids = torch.tensor([hf_tok(p)["input_ids"]])
        out = student.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=hf_tok.pad_token_id)
        logits = teacher(input_ids=out).logits[:, ids.shape[1] - 1:-1]
        total += torch.nn.functional.cross_entropy(logits[0].float(), out[0, ids.shape[1]:], reduction="sum").item()
        count += out.shape[1] - ids.shape[1]
    student.train()
    return total / max(count, 1)


def run(trainer_cls, student, teacher, hf_tok, dataset, args, steps, extra):
    """``steps`` on-policy steps of ``trainer_cls``: (the logged losses, seconds per step)."""
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        config = trl.DistillationConfig(
            output_dir=tmp, per_device_train_batch_size=8, max_completion_length=args.new_tokens, max_steps=steps,
            learning_rate=args.lr, beta=TRL_BETA[args.divergence], temperature=1.0, report_to="none", use_cpu=True,
            save_strategy="no", logging_steps=1, disable_tqdm=True, gradient_checkpointing=False, seed=0)
        trainer = trainer_cls(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                              processing_class=hf_tok, **extra)
        trainer.remove_callback(transformers.PrinterCallback)  # the logs are returned, not printed
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return losses, seconds / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)  # 8 x 8 prompts
    p.add_argument("--divergence", choices=sorted(TRL_BETA), default="reverse_kl")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--trl", action="store_true", help="also run TRL's own trainer (its loss) for the time per step")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import datasets
    import transformers
    from fastkd.integrations.trl import DistillationTrainer
    import trl

    torch.set_num_threads(args.threads)
    cfg = dict(CONFIGS["quick"])
    train_text, val_text = stdlib_text(cfg["text_bytes"])
    tok = train_tokenizer(train_text, cfg["vocab"])
    tok.add_special_tokens([PAD, EOS])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    vocab = tok.get_vocab_size()
    seqs = sequences(encode(tok, train_text), cfg["seq"])
    teacher = build("llama", vocab, cfg["teacher"], cfg["seq"], 0)
    train_teacher(teacher, seqs, cfg, 0)
    teacher.eval().requires_grad_(False)
    student = build("qwen2", vocab, cfg["student"], cfg["seq"], 1)
    train_teacher(student, seqs, dict(cfg, teacher_steps=cfg["student_steps"]), 1)  # a short CE start
    for m in (teacher, student):
        m.config.pad_token_id, m.config.eos_token_id = hf_tok.pad_token_id, hf_tok.eos_token_id
        m.generation_config.pad_token_id, m.generation_config.eos_token_id = hf_tok.pad_token_id, hf_tok.eos_token_id
    train_prompts = prompts_of(train_text, tok, 8 * args.steps)
    held_out = prompts_of(val_text, tok, 16)
    dataset = datasets.Dataset.from_dict({"prompt": train_prompts})
    print(f"V = {vocab}; {len(train_prompts)} training prompts such as {train_prompts[0]!r}; {len(held_out)} "
          f"held-out", flush=True)

    start = copy.deepcopy(student)
    before = teacher_nll(student, teacher, hf_tok, held_out, args.new_tokens)
    losses, sec = run(DistillationTrainer, student, teacher, hf_tok, dataset, args, args.steps,
                      dict(distillation_loss=FusedLinearKDLoss(divergence=args.divergence, beta=0.5)))
    after = teacher_nll(student, teacher, hf_tok, held_out, args.new_tokens)
    print(f"fastkd.integrations.trl.DistillationTrainer ({args.divergence}, trl {trl.__version__}): "
          f"{sec:.2f} s/step; loss per step {[round(x, 4) for x in losses]}")
    print(f"teacher NLL per token of the student's greedy completions (held-out prompts): {before:.3f} before, "
          f"{after:.3f} after {args.steps} steps")
    if args.trl:
        theirs, sec_trl = run(trl.DistillationTrainer, copy.deepcopy(start), teacher, hf_tok, dataset, args,
                              args.steps, {})
        diff = max(abs(a - b) for a, b in zip(losses, theirs))
        print(f"trl.DistillationTrainer (beta = {TRL_BETA[args.divergence]}, its own loss): {sec_trl:.2f} s/step; "
              f"loss per step {[round(x, 4) for x in theirs]} (largest difference {diff:.1e})")
        return losses, before, after, theirs
    return losses, before, after, None


if __name__ == "__main__":
    main()
