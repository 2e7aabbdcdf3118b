"""Language-model distillation on a transfer set, through ``transformers.Trainer`` (issue 20).

    python examples/distill_lm_transfer.py [--quick | --smoke] [--seeds N] [--out-dir DIR]

The language-model version of ``examples/distill_digits.py --setting transfer`` (Hinton et al.'s
transfer set): a teacher trained well on all the text, a student that has the labels (the next
tokens) of only a small part of it, and the teacher's distributions on all of it.

Data: the Python standard library's ``.py`` sources (no download), split 90/10 by file into train /
validation text, a byte-level BPE tokenizer trained on the training text (``examples/distill_lm.py``'s
helpers), the training tokens cut into sequences of ``seq`` tokens.

1. Teacher: a Llama trained with cross-entropy on every training sequence (a plain loop: it is only
   the setting), then frozen. Trained once, shared by every seed.
2. Students (a smaller Qwen2, the same initialisation for every method of one seed), trained by
   ``transformers.Trainer`` for the same number of steps of ``batch`` sequences:

   CE        ``transformers.Trainer`` on the labelled sequences only (a random ``labelled`` fraction,
             a new subset each seed): the model's own cross-entropy.
   KL, ...   ``fastkd.integrations.transformers.DistillationTrainer``: each batch holds
             ``labelled_rows`` labelled sequences (divergence + ``ce_weight`` x CE) and
             ``batch - labelled_rows`` sequences drawn from all the training text whose labels are
             not used (divergence only: ``ce_weight = 0``; their label ids are replaced by 0, they
             only say which positions count). Both parts go through ``distillation_loss`` (the fused
             head: the student's logits never exist), summed and divided by the batch's token count.
             Divergences: forward KL, reverse KL, JSD (beta = 0.5), and top-k (forward KL against
             the teacher's top 16 log-probs at the temperature, ``TopKTeacher`` mode ``"tail"``).

   Reported: validation perplexity at the end (mean ± std over seeds) and the paired difference
   against CE on the same seed; the best validation perplexity seen during training (every
   ``eval_every`` steps: an early-stopped CE, the most favourable reading for it); the median time
   of a training step (teacher forward included); the peak extra resident memory of one step.
3. The loss alone on one training step's shape (rows ``batch x (seq - 1)``, the student's and
   teacher's hidden sizes, the vocabulary), forward + backward, median of ``reps``:
   ``fastkd.fused_linear_kd_loss`` (fused head), the same loss from materialised logits
   (``fastkd.kd_loss`` / ``fastkd.jsd_loss``; and plain torch ``F.kl_div``) and TRL's own fused head
   (``trl.trainer.distillation_trainer._chunked_divergence_loss``, beta = 0 and 0.5), with their
   values (they compute the same forward KL and JSD at T = 1).

Outputs: ``lm-transfer.md`` (the tables), ``lm-transfer.csv`` (one row per method and seed),
``lm-transfer-bench.csv`` (the loss timings) and ``lm-transfer.png``; with ``--quick`` / ``--smoke``
``lm-transfer-quick.*`` and ``lm-transfer-bench-quick.csv`` (git-ignored).
"""
import argparse
import csv
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import fastkd  # noqa: E402
from fastkd.bench.memory import PeakRSS  # noqa: E402
from fastkd.nn import FusedLinearKDLoss  # noqa: E402
from distill_lm import build, encode, stdlib_text, train_tokenizer  # noqa: E402

CONFIGS = {
    # a few seconds of training: the test's check that every path runs
    "smoke": dict(text_bytes=120_000, vocab=384, seq=32, batch=4, labelled_rows=1, labelled=0.1,
                  teacher_steps=20, student_steps=6, eval_every=3, seeds=1, reps=2, lr=3e-3,
                  teacher=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128),
                  student=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)),
    "quick": dict(text_bytes=400_000, vocab=768, seq=64, batch=8, labelled_rows=2, labelled=0.05,
                  teacher_steps=120, student_steps=60, eval_every=20, seeds=1, reps=3, lr=3e-3,
                  teacher=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=344),
                  student=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=172)),
    "full": dict(text_bytes=1_500_000, vocab=1024, seq=64, batch=16, labelled_rows=4, labelled=0.05,
                 teacher_steps=400, student_steps=300, eval_every=50, seeds=3, reps=5, lr=3e-3,
                 teacher=dict(hidden_size=192, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512),
                 student=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=172)),
}
TEMPERATURE, CE_WEIGHT, TOP_K = 1.0, 1.0, 16
ALL_LABELS = "CE, all labels"  # the reference: cross-entropy with every training label (no teacher)
METHODS = {  # name: FusedLinearKDLoss options (None: cross-entropy alone); "topk": the teacher's top-k
    "CE": None,
    "forward KL": dict(divergence="kl"),
    "reverse KL": dict(divergence="reverse_kl"),
    "JSD": dict(divergence="jsd", beta=0.5),
    f"top-{TOP_K} (tail)": dict(divergence="kl", topk=True),
    ALL_LABELS: None,
}


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------

def sequences(ids: torch.Tensor, seq: int) -> torch.Tensor:
    """``ids`` cut into ``[n, seq]`` non-overlapping sequences."""
    n = ids.numel() // seq
    return ids[:n * seq].view(n, seq)


class Cycle:
    """Rows of ``pool`` in a new random order each pass (epochs), from a seeded generator."""

    def __init__(self, pool: torch.Tensor, g: torch.Generator):
        self.pool, self.g, self.order = pool, g, []

    def take(self, k: int) -> list:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = self.pool[torch.randperm(self.pool.numel(), generator=self.g)].tolist()
            out.append(self.order.pop())
        return out


def student_batches(seqs: torch.Tensor, cfg: dict, seed: int):
    """The labelled subset of one seed and its batches: ``(n_labelled, {"ce", "kd", "every": [batch]})``.

    CE batches: ``batch`` labelled sequences; "every": ``batch`` of all the sequences with labels (the
    reference "CE, all labels"). KD batches: ``labelled_rows`` labelled sequences (with their
    labels) then ``batch - labelled_rows`` from all the sequences with labels ``-100`` (``transfer``)."""
    g = torch.Generator().manual_seed(1000 + seed)
    n = seqs.shape[0]
    labelled = torch.randperm(n, generator=g)[:max(1, round(cfg["labelled"] * n))]
    ce_rows, kd_rows = Cycle(labelled, g), Cycle(labelled, g)
    all_rows, every_rows = Cycle(torch.arange(n), g), Cycle(torch.arange(n), g)
    b, bl = cfg["batch"], cfg["labelled_rows"]
    ce, kd, every = [], [], []
    for _ in range(cfg["student_steps"]):
        ids = seqs[ce_rows.take(b)]
        ce.append(dict(input_ids=ids, labels=ids.clone()))
        ids = seqs[every_rows.take(b)]
        every.append(dict(input_ids=ids, labels=ids.clone()))
        ids = seqs[kd_rows.take(bl) + all_rows.take(b - bl)]
        labels = ids.clone()
        labels[bl:] = -100
        transfer = torch.arange(b) >= bl
        kd.append(dict(input_ids=ids, labels=labels, transfer=transfer))
    return labelled.numel(), dict(ce=ce, kd=kd, every=every)


@torch.no_grad()
def evaluate(model, val: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``model`` on the validation sequences ``[n, seq]``."""
    was = model.training
    model.eval()
    total = count = 0.0
    for b0 in range(0, val.shape[0], 16):
        ids = val[b0:b0 + 16]
        logits = model(input_ids=ids).logits[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was)
    return total / count


def train_teacher(teacher, seqs: torch.Tensor, cfg: dict, seed: int) -> None:
    """Cross-entropy on every training sequence: AdamW, linear warm-up then cosine decay."""
    g = torch.Generator().manual_seed(seed)
    rows = Cycle(torch.arange(seqs.shape[0]), g)
    steps = cfg["teacher_steps"]
    opt = torch.optim.AdamW(teacher.parameters(), lr=cfg["lr"], weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    teacher.train()
    for _ in range(steps):
        ids = seqs[rows.take(cfg["batch"] * 2)]
        loss = teacher(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


# ----------------------------------------------------------------------------
# students: transformers.Trainer
# ----------------------------------------------------------------------------

def _trainer_classes():
    import transformers
    from fastkd.integrations.transformers import DistillationTrainer, distillation_loss

    class TransferTrainer(DistillationTrainer):
        """``DistillationTrainer`` with a transfer set: a batch's labelled rows get ``distillation_loss``
        (divergence + CE), its ``transfer`` rows ``transfer_loss`` (divergence only); the sum over the
        batch's positions divided by their number. ``topk``: the teacher as its top-k log-probs."""

        def __init__(self, *args, transfer_loss, topk=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.transfer_loss, self.topk = transfer_loss, topk

        def teacher_topk(self, ids):
            with torch.no_grad():
                logits = self.teacher_model(input_ids=ids).logits
            return fastkd.TopKTeacher.from_logits(logits, TOP_K, temperature=self.distillation_loss.kwargs[
                "temperature"], mode="tail")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, labels, transfer = inputs["input_ids"], inputs["labels"], inputs["transfer"]
            count = ids.shape[0] * (ids.shape[1] - 1)  # every position of every row counts
            loss = 0.0
            for rows, loss_fn in ((~transfer, self.distillation_loss), (transfer, self.transfer_loss)):
                if not bool(rows.any()):
                    continue
                part = dict(input_ids=ids[rows], labels=labels[rows])
                if loss_fn is self.transfer_loss:  # no labels: 0 marks the positions (ce_weight = 0)
                    part["labels"] = torch.zeros_like(part["labels"])
                teacher = self.teacher_model
                if self.topk:
                    part["teacher_topk"], teacher = self.teacher_topk(part["input_ids"]), None
                loss = loss + distillation_loss(model, teacher, part, loss_fn, count).loss
            return (loss, {"loss": loss}) if return_outputs else loss

    class Probe(transformers.TrainerCallback):
        """Step times, the peak extra memory of step 3 (not timed) and the validation curve."""

        def __init__(self, val, every):
            self.val, self.every, self.times, self.curve, self.peak_mb, self._peak = val, every, [], [], 0.0, None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                self._peak = PeakRSS().__enter__()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            dt = time.perf_counter() - self.t0
            if self._peak is not None:
                self._peak.__exit__(None, None, None)
                self.peak_mb = max(self._peak.peak_kb - self._peak.base_kb, 0) / 1024
                self._peak = None
            else:
                self.times.append(dt)
            if state.global_step % self.every == 0 or state.global_step == state.max_steps:
                self.curve.append((state.global_step, evaluate(model, self.val)))

    return transformers, TransferTrainer, Probe


def train_student(method, student, teacher, batches, val, cfg, seed, out_dir):
    """One student trained by a ``transformers.Trainer`` (``out_dir``: its scratch directory)."""
    transformers, TransferTrainer, Probe = _trainer_classes()
    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=1,
        max_steps=cfg["student_steps"], learning_rate=cfg["lr"], weight_decay=0.0, warmup_steps=0,
        lr_scheduler_type="cosine", logging_strategy="no", save_strategy="no", report_to=[],
        use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False)
    probe = Probe(val, cfg["eval_every"])
    common = dict(model=student, args=args, train_dataset=batches, data_collator=lambda items: items[0],
                  callbacks=[probe])
    options = METHODS[method]
    if options is None:
        trainer = transformers.Trainer(**common)
    else:
        options = dict(options)
        topk = options.pop("topk", False)
        opts = dict(temperature=TEMPERATURE, **options)
        trainer = TransferTrainer(teacher_model=teacher, topk=topk,
                                  distillation_loss=FusedLinearKDLoss(ce_weight=CE_WEIGHT, **opts),
                                  transfer_loss=FusedLinearKDLoss(ce_weight=0.0, **opts), **common)
    trainer.remove_callback(transformers.PrinterCallback)  # no metrics dict printed at the end
    trainer.train()
    final = probe.curve[-1][1]
    return dict(method=method, seed=seed, val_ce=final, ppl=math.exp(final),
                best_ppl=math.exp(min(c for _, c in probe.curve)), step_ms=1e3 * statistics.median(probe.times),
                peak_mb=probe.peak_mb, curve=probe.curve)


# ----------------------------------------------------------------------------
# the loss alone: fused vs unfused vs TRL
# ----------------------------------------------------------------------------

def bench_losses(batch: int, positions: int, h_s: int, h_t: int, vocab: int, reps: int):
    """Forward + backward of the loss alone on ``batch x positions`` rows (T = 1): median time, peak extra
    memory, value; random hidden states and heads (the time does not depend on the values)."""
    rows = batch * positions
    shape = f"N = {rows}, H = {h_s} (teacher {h_t}), V = {vocab}"
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(rows, h_s, generator=g)
    ws = torch.randn(vocab, h_s, generator=g) / h_s ** 0.5
    ht = torch.randn(rows, h_t, generator=g)
    wt = torch.randn(vocab, h_t, generator=g) * 2 / h_t ** 0.5

    def fused(div):
        return lambda h, w: fastkd.fused_linear_kd_loss(h, w, (ht, wt), divergence=div)

    def unfused(fn):
        def run(h, w):
            with torch.no_grad():
                t = ht @ wt.T
            return fn(h @ w.T, t)
        return run

    def plain_kl(s, t):
        return F.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), reduction="batchmean", log_target=True)

    cases = [("forward KL", "fastkd fused", fused("kl")),
             ("forward KL", "fastkd.kd_loss on logits", unfused(lambda s, t: fastkd.kd_loss(s, t, 1.0))),
             ("forward KL", "torch F.kl_div on logits", unfused(plain_kl)),
             ("JSD 0.5", "fastkd fused", fused("jsd")),
             ("JSD 0.5", "fastkd.jsd_loss on logits", unfused(lambda s, t: fastkd.jsd_loss(s, t, beta=0.5)))]
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
        import trl
        mask = torch.ones(batch, positions, dtype=torch.bool)

        def trl_loss(beta):
            # TRL's beta: 0 forward KL(teacher || student), 1 reverse KL, 0.5 the symmetric JSD (fastkd's too)
            return lambda h, w: _chunked_divergence_loss(h.view(batch, positions, -1), ht.view(batch, positions, -1),
                                                         w, wt, mask, beta)[0]
        cases.insert(3, ("forward KL", f"TRL {trl.__version__} _chunked_divergence_loss beta=0", trl_loss(0.0)))
        cases.append(("JSD 0.5", f"TRL {trl.__version__} _chunked_divergence_loss beta=0.5", trl_loss(0.5)))
    except ImportError as e:
        print(f"TRL's loss not timed: {e}")
    out = []
    for loss_name, impl, fn in cases:
        times, value, peak_mb = [], None, 0.0
        for r in range(reps + 1):
            h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
            with PeakRSS() as peak:
                t0 = time.perf_counter()
                loss = fn(h, w)
                loss.backward()
                dt = time.perf_counter() - t0
            if r:  # the first call warms up
                times.append(dt)
                peak_mb = max(peak_mb, max(peak.peak_kb - peak.base_kb, 0) / 1024)
            value = loss.item()
        out.append(dict(shape=shape, loss=loss_name, impl=impl, ms=1e3 * statistics.median(times), peak_mb=peak_mb,
                        value=value))
        print(f"  {loss_name:10s} {impl:55s} {out[-1]['ms']:8.1f} ms  peak extra {peak_mb:6.1f} MB  "
              f"value {value:.7f}", flush=True)
    return out


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

def _ms(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs, methods):
    """Per method: ppl, paired difference against CE, best ppl, step time, peak memory (over seeds)."""
    ce = {r["seed"]: r["ppl"] for r in runs if r["method"] == "CE"}
    rows = []
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        rows.append(dict(method=m, ppl=_ms([r["ppl"] for r in rs]), best=_ms([r["best_ppl"] for r in rs]),
                         diff=_ms([r["ppl"] - ce[r["seed"]] for r in rs]) if m != ALL_LABELS else None,
                         wins=sum(r["ppl"] < ce[r["seed"]] for r in rs), n=len(rs),
                         step_ms=statistics.mean(r["step_ms"] for r in rs),
                         peak_mb=max(r["peak_mb"] for r in rs)))
    return rows


def markdown(head, summary, teacher_ppl, bench, notes):
    lines = [head, "", "| method | val ppl (mean ± std) | vs CE, paired (mean ± std) | beats CE | best val ppl "
             "during training | time / step | peak extra memory (one step) |", "|---|---|---|---|---|---|---|",
             f"| teacher | {teacher_ppl:.2f} | | | | | |"]
    for r in summary:
        diff = "" if r["diff"] is None or r["method"] == "CE" else f"{r['diff'][0]:+.2f} ± {r['diff'][1]:.2f}"
        wins = "" if r["diff"] is None or r["method"] == "CE" else f"{r['wins']}/{r['n']}"
        lines.append(f"| {r['method']} | {r['ppl'][0]:.2f} ± {r['ppl'][1]:.2f} | {diff} | {wins} | "
                     f"{r['best'][0]:.2f} ± {r['best'][1]:.2f} | {r['step_ms']:.0f} ms | {r['peak_mb']:.0f} MB |")
    lines += ["", "The loss alone, forward + backward (T = 1, float32; the first shape is one training step's):", "",
              "| shape | loss | implementation | time | peak extra memory | value |", "|---|---|---|---|---|---|"]
    for b in bench:
        lines.append(f"| {b['shape']} | {b['loss']} | {b['impl']} | {b['ms']:.1f} ms | {b['peak_mb']:.1f} MB | "
                     f"{b['value']:.7f} |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(path, summary, runs, teacher_ppl, bench, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    names = [r["method"] for r in summary]
    ax.bar(range(len(names)), [r["ppl"][0] for r in summary], yerr=[r["ppl"][1] for r in summary],
           color=["0.6" if r["diff"] is None or r["method"] == "CE" else "C0" for r in summary], capsize=3)
    for i, m in enumerate(names):
        ys = [r["ppl"] for r in runs if r["method"] == m]
        ax.plot([i] * len(ys), ys, "k.", ms=4)
    ax.axhline(teacher_ppl, color="C3", ls="--", label=f"teacher {teacher_ppl:.1f}")
    lo = min(teacher_ppl, min(r["ppl"][0] - r["ppl"][1] for r in summary))
    ax.set_ylim(lo * 0.9, max(r["ppl"][0] + r["ppl"][1] for r in summary) * 1.03)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.set_title("end of training (bars: mean ± std, dots: seeds)")
    ax.legend()
    ax = axes[1]
    for i, m in enumerate(names):
        curves = [r["curve"] for r in runs if r["method"] == m]
        steps = [s for s, _ in curves[0]]
        mean = [math.exp(statistics.mean(c[j][1] for c in curves)) for j in range(len(steps))]
        ax.plot(steps, mean, "o-", ms=3, label=m, color=f"C{i}")
    ax.axhline(teacher_ppl, color="C3", ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("student step")
    ax.set_ylabel("validation perplexity (geometric mean over seeds)")
    ax.set_title("during training")
    ax.legend(fontsize=7)
    ax = axes[2]
    bench = [b for b in bench if b["shape"] == bench[-1]["shape"]]  # the last (largest) shape
    labels = [f"{b['loss']}\n{b['impl'].replace(' _chunked_divergence_loss', '')}" for b in bench]
    ax.barh(range(len(bench)), [b["ms"] for b in bench],
            color=["C0" if "fused" in b["impl"] and "fastkd" in b["impl"] else "C1" if "TRL" in b["impl"] else "0.6"
                   for b in bench])
    ax.set_yticks(range(len(bench)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms, forward + backward")
    ax.set_title(f"the loss alone: {bench[0]['shape']}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one seed, tiny models (about a minute on 2 cores)")
    mode.add_argument("--smoke", action="store_true", help="every path, a few steps (seconds; for the tests)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, 1 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings on a "
                   "shared machine; 0: torch's default)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = dict(CONFIGS[name])
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.threads:
        torch.set_num_threads(args.threads)
    suffix = "" if name == "full" else "-quick"
    stem, bench_csv = (os.path.join(args.out_dir, f"lm-transfer{x}{suffix}") for x in ("", "-bench"))
    os.makedirs(args.out_dir, exist_ok=True)
    t_start = time.perf_counter()

    train_text, val_text = stdlib_text(cfg["text_bytes"])
    tok = train_tokenizer(train_text, cfg["vocab"])
    vocab = tok.get_vocab_size()
    seqs = sequences(encode(tok, train_text), cfg["seq"])
    val = sequences(encode(tok, val_text), cfg["seq"])[:64]
    print(f"stdlib text: {len(train_text) / 1e6:.2f} MB train, {len(val_text) / 1e6:.2f} MB val; V = {vocab}; "
          f"{seqs.shape[0]} train sequences of {cfg['seq']} tokens, {val.shape[0]} validation", flush=True)

    teacher = build("llama", vocab, cfg["teacher"], cfg["seq"], 0)
    t0 = time.perf_counter()
    train_teacher(teacher, seqs, cfg, 0)
    teacher.eval().requires_grad_(False)
    teacher_ppl = math.exp(evaluate(teacher, val))
    teacher_s = time.perf_counter() - t0
    print(f"teacher (Llama, {sum(x.numel() for x in teacher.parameters()) / 1e6:.2f} M params): "
          f"{cfg['teacher_steps']} steps in {teacher_s:.0f} s, val ppl {teacher_ppl:.2f}", flush=True)

    methods = list(METHODS) if name == "full" else [m for m in METHODS if m != ALL_LABELS]
    runs = []
    for seed in range(cfg["seeds"]):
        n_labelled, batches = student_batches(seqs, cfg, seed)
        for method in methods:
            student = build("qwen2", vocab, cfg["student"], cfg["seq"], 100 + seed)  # one init per seed
            kind = "every" if method == ALL_LABELS else "ce" if METHODS[method] is None else "kd"
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                r = train_student(method, student, teacher, batches[kind], val, cfg, seed, tmp)
            runs.append(r)
            print(f"  seed {seed} {method:16s} val ppl {r['ppl']:8.2f} (best {r['best_ppl']:8.2f})  "
                  f"{r['step_ms']:5.0f} ms/step  peak extra {r['peak_mb']:4.0f} MB  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    n_params = sum(x.numel() for x in student.parameters())

    shapes = [(cfg["batch"], cfg["seq"] - 1, cfg["student"]["hidden_size"], cfg["teacher"]["hidden_size"], vocab,
               cfg["reps"])]
    if name == "full":  # and the shape of the issue's measurement: a real tokenizer's vocabulary
        shapes.append((4, 128, 256, 256, 32000, 3))
    bench = []
    for shape in shapes:
        print(f"the loss alone: {shape[0]} x {shape[1]} rows, H = {shape[2]} (teacher {shape[3]}), V = {shape[4]}",
              flush=True)
        bench += bench_losses(*shape)
    summary = summarise(runs, methods)
    total = time.perf_counter() - t_start
    import transformers
    head = (f"LM transfer set ({name}): student (Qwen2, {n_params / 1e6:.2f} M params) with the labels of "
            f"{n_labelled} of {seqs.shape[0]} training sequences ({100 * cfg['labelled']:.0f}%), the teacher's "
            f"distributions on all of them; {cfg['seeds']} seed(s) x {cfg['student_steps']} steps of "
            f"{cfg['batch']} x {cfg['seq']} tokens; T = {TEMPERATURE}, ce_weight = {CE_WEIGHT} on the labelled rows")
    notes = [
        f"teacher: Llama, {sum(x.numel() for x in teacher.parameters()) / 1e6:.2f} M params, {cfg['teacher_steps']} "
        f"steps of {2 * cfg['batch']} sequences on all the training text ({teacher_s:.0f} s)",
        f"KD batches: {cfg['labelled_rows']} labelled sequences (divergence + CE) and "
        f"{cfg['batch'] - cfg['labelled_rows']} from all the text (divergence only), through "
        "fastkd.integrations.transformers.distillation_loss in a DistillationTrainer; CE rows: transformers.Trainer",
        f"validation: {val.shape[0]} x {cfg['seq']} tokens of held-out stdlib files; best = the lowest of the "
        f"evaluations every {cfg['eval_every']} steps",
        "time / step: median, transformers.Trainer step (teacher forward included); memory: PeakRSS of step 3",
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} thread(s); "
        f"total {total:.0f} s",
    ]
    table = markdown(head, summary, teacher_ppl, bench, notes)
    print("\n" + table)
    with open(stem + ".md", "w") as fh:
        fh.write(table)
    with open(stem + ".csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "seed", "val_ce", "val_ppl", "best_val_ppl", "step_ms", "peak_mb"])
        for r in runs:
            w.writerow([r["method"], r["seed"], f"{r['val_ce']:.5f}", f"{r['ppl']:.4f}", f"{r['best_ppl']:.4f}",
                        f"{r['step_ms']:.1f}", f"{r['peak_mb']:.1f}"])
    with open(bench_csv + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["shape", "loss", "impl", "ms", "peak_mb", "value"])
        w.writeheader()
        w.writerows(bench)
    plot(stem + ".png", summary, runs, teacher_ppl, bench, head)
    print(f"wrote {stem}.md, .csv, .png and {bench_csv}.csv; total {total:.0f} s")
    return summary, runs, bench


if __name__ == "__main__":
    main()
