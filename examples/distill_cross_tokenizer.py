"""Distil across tokenizers (issue 23): a teacher with a 4000-token BPE, a student with a 1000-token BPE.

    python examples/distill_cross_tokenizer.py [--quick] [--seeds N] [--weight W] [--beta B] [--rows first|observed]
                                               [--map first-token|strings] [--cache DIR] [--out-dir DIR]

The cross-tokenizer version of ``examples/distill_lm_transfer.py``'s transfer set. Data: the Python
standard library's ``.py`` sources (no download), split 90/10 by file; two byte-level BPE tokenizers
trained on the same training text (``tokenizers``): 4000 tokens for the teacher, 1000 for the student.

1. Teacher: a Llama trained with cross-entropy on character windows of all the training text, then
   frozen (trained once; ``--cache DIR`` keeps it and the tokenizers between runs).
2. Students (a smaller Qwen2, the same initialisation for every method of one seed), AdamW, the same
   number of steps of ``batch`` character windows, each window tokenized by both tokenizers:

   CE       cross-entropy on windows of the labelled text only (a random ``labelled`` share of the
            training windows, a new subset each seed);
   ULD      ``labelled_rows`` labelled windows (CE + the distillation term) and ``batch -
            labelled_rows`` windows of all the text (the distillation term only; their labels unused),
            the term ``weight x fastkd.uld_loss``;
   hybrid   the same with ``weight x fastkd.hybrid_uld_loss`` (``beta``);
   CE (KD batches)  the control of the two above: their batches with the term's weight 0 (cross-entropy on
            ``labelled_rows`` labelled windows per step: fewer labels per step than CE, which alone
            changes the result at equal steps);
   CE (all labels)  (reference, not distillation) cross-entropy on windows of all the text.

   The distillation rows: ``fastkd.align_tokens`` groups both sides' positions between common cuts
   of the text (the first group, which holds the unpredicted first token, is dropped).
   ``--rows first`` (default): per group, each side's predictive distribution of the token that
   starts at the group's cut (both predict "what comes after this character"), as logits;
   ``--rows observed``: GOLD's merge (``fastkd.merge_aligned``, the first distribution times the later
   tokens' probabilities, ``inputs="log_probs"``).
   The vocabulary map of the hybrid: ``--map first-token`` (default): each teacher token maps to the
   first student token of its own bytes (``VocabMap`` from a hand-made many-to-one tensor: the
   teacher's probability of "Ġreturn" goes to the student's "Ġre", the token a student would start
   "Ġreturn" with); ``--map strings``: GOLD's exact string match (``VocabMap.from_tokenizers``: only the
   teacher tokens that are student tokens too, 25% here).
3. Reported: validation bits per byte (the student's cross-entropy on windows of the validation text,
   in bits, over the bytes of the predicted tokens: the only figure comparable across tokenizers), mean
   ± std over seeds and the paired difference against CE; time per step.

Outputs (``--out-dir``, default ``examples/results``): ``cross_tokenizer.md``, ``cross_tokenizer.csv``
(one row per method and seed) and ``cross_tokenizer.png``; with ``--quick``, ``cross_tokenizer-quick.*`` (git-ignored).
"""
import argparse
import csv
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import fastkd  # noqa: E402
from distill_lm import build, stdlib_text, train_tokenizer  # noqa: E402

CONFIGS = {
    "quick": dict(text_bytes=150_000, vocab_t=600, vocab_s=300, window=96, batch=8, labelled_rows=2, labelled=0.05,
                  teacher_steps=60, student_steps=25, eval_windows=16, seeds=1, lr=3e-3,
                  teacher=dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128),
                  student=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=86)),
    "full": dict(text_bytes=1_000_000, vocab_t=4000, vocab_s=1000, window=256, batch=8, labelled_rows=2,
                 labelled=0.05, teacher_steps=800, student_steps=250, eval_windows=64, seeds=3, lr=3e-3,
                 teacher=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=344),
                 student=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=172)),
}
METHODS = ("CE", "CE (KD batches)", "ULD", "hybrid", "CE (all labels)")
NO_TERM = ("CE", "CE (KD batches)", "CE (all labels)")


# ----------------------------------------------------------------------------
# data: character windows, both tokenizers, the vocabulary map
# ----------------------------------------------------------------------------

def tokenize(tok, texts):
    """Padded ids [B, L], offsets [B, L, 2] and mask [B, L] of each text."""
    enc = [tok.encode(t) for t in texts]
    width = max(len(e.ids) for e in enc)
    ids = torch.zeros(len(texts), width, dtype=torch.int64)
    offsets = torch.zeros(len(texts), width, 2, dtype=torch.int64)
    mask = torch.zeros(len(texts), width, dtype=torch.bool)
    for i, e in enumerate(enc):
        n = len(e.ids)
        ids[i, :n], offsets[i, :n], mask[i, :n] = torch.tensor(e.ids), torch.tensor(e.offsets).reshape(-1, 2), True
    return ids, offsets, mask


def first_token_map(student_tok, teacher_tok) -> "fastkd.VocabMap":
    """Each teacher token -> the first student token of its bytes (the student's BPE run on the teacher
    token's byte-level string): a many-to-one map covering every teacher token."""
    vt = teacher_tok.get_vocab_size()
    ids = torch.full((vt,), -1, dtype=torch.int64)
    for c in range(vt):
        pieces = student_tok.model.tokenize(teacher_tok.id_to_token(c))
        if pieces:
            ids[c] = pieces[0].id
    return fastkd.VocabMap(ids, student_tok.get_vocab_size())


class Windows:
    """Seeded random character windows: of the labelled text (a random share of the training windows) or of all."""

    def __init__(self, text, cfg, seed):
        self.text, self.size = text, cfg["window"]
        self.g = torch.Generator().manual_seed(1000 + seed)
        starts = torch.arange(0, len(text) - self.size, self.size)
        self.labelled = starts[torch.randperm(starts.numel(), generator=self.g)[:max(1, round(cfg["labelled"]
                                                                                              * starts.numel()))]]

    def take(self, k, labelled):
        if labelled:
            starts = self.labelled[torch.randint(0, self.labelled.numel(), (k,), generator=self.g)].tolist()
        else:
            starts = torch.randint(0, len(self.text) - self.size, (k,), generator=self.g).tolist()
        return [self.text[s:s + self.size] for s in starts]


# ----------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------

def ce(model, ids, mask, vocab, reduction="mean"):
    """The next-token cross-entropy on the real positions and the logits ``[B, L - 1, V]``."""
    logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1, :vocab].float()
    target = torch.where(mask[:, 1:], ids[:, 1:], -100)
    return F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), reduction=reduction), logits


def group_rows(logits, ids, group, groups, rows):
    """One row per group >= 1 ``[B, groups, V]``: ``"first"``: the logits predicting the group's first token;
    ``"observed"``: GOLD's merge of the group's predictive log-probs (``fastkd.merge_aligned``)."""
    tok_group = torch.where(group[:, 1:] > 0, group[:, 1:] - 1, -1)  # token i >= 1 (predicted by row i - 1)
    if rows == "observed":
        return fastkd.merge_aligned(logits.log_softmax(-1), ids[:, 1:], tok_group, "observed", num_groups=groups)
    b, n = tok_group.shape
    pos = torch.arange(n).expand(b, n)
    first = torch.full((b, groups), n, dtype=torch.int64)
    first.scatter_reduce_(1, tok_group.clamp(min=0), torch.where(tok_group >= 0, pos, n), "amin")
    return logits.gather(1, first.clamp(max=n - 1).unsqueeze(2).expand(b, groups, logits.shape[2]))


def distill_term(method, s_logits, t_logits, side_s, side_t, vocab_map, opts):
    """The mean distillation loss over the aligned groups of the batch (padding groups masked)."""
    (s_ids, s_off, s_mask), (t_ids, t_off, t_mask) = side_s, side_t
    al = fastkd.align_tokens(s_off, t_off, s_mask, t_mask)
    groups = int(al.num_groups.max()) - 1
    if groups < 1:
        return s_logits.sum() * 0.0
    s_rows = group_rows(s_logits, s_ids, al.student_group, groups, opts["rows"])
    t_rows = group_rows(t_logits, t_ids, al.teacher_group, groups, opts["rows"])
    target = torch.where(torch.arange(groups) < (al.num_groups - 1).unsqueeze(1), 0, -100)
    kw = dict(target=target, inputs="log_probs" if opts["rows"] == "observed" else "logits")
    if method == "ULD":
        return fastkd.uld_loss(s_rows, t_rows, **kw)
    return fastkd.hybrid_uld_loss(s_rows, t_rows, vocab_map, beta=opts["beta"], **kw)


@torch.no_grad()
def bits_per_byte(model, tok, text, vocab, window, count):
    """Cross-entropy of ``model`` on ``count`` windows of ``text``, in bits per byte of the predicted tokens."""
    model.eval()
    starts = torch.linspace(0, len(text) - window - 1, count).long().tolist()
    pieces = [text[s:s + window] for s in starts]
    nats = bytes_ = 0.0
    for i in range(0, count, 16):
        ids, offsets, mask = tokenize(tok, pieces[i:i + 16])
        nats += ce(model, ids, mask, vocab, reduction="sum")[0].item()
        for piece, off, m in zip(pieces[i:i + 16], offsets, mask):
            bytes_ += sum(len(piece[a:b].encode()) for a, b in off[1:][m[1:]].tolist())
    model.train()
    return nats / math.log(2) / bytes_


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------

def train_teacher(teacher, tok, vocab, text, cfg):
    """Cross-entropy on windows of all the training text: AdamW, warm-up then cosine decay."""
    steps, g = cfg["teacher_steps"], torch.Generator().manual_seed(1234)
    opt = torch.optim.AdamW(teacher.parameters(), lr=cfg["lr"], weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    for i in range(steps):
        if i % 100 == 0:
            print(f"teacher step {i} / {steps}", flush=True)
        starts = torch.randint(0, len(text) - cfg["window"], (2 * cfg["batch"],), generator=g).tolist()
        ids, _, mask = tokenize(tok, [text[s:s + cfg["window"]] for s in starts])
        loss, _ = ce(teacher, ids, mask, vocab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def train_student(method, student, s_tok, teacher, t_tok, vocab_map, text, cfg, seed, opts):
    """One student; returns the median step time (s)."""
    vs = s_tok.get_vocab_size()
    windows = Windows(text, cfg, seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg["lr"], weight_decay=0.0)
    b, bl, times = cfg["batch"], cfg["labelled_rows"], []
    for _ in range(cfg["student_steps"]):
        t0 = time.perf_counter()
        if method in ("CE", "CE (all labels)"):
            ids, _, mask = tokenize(s_tok, windows.take(b, labelled=method == "CE"))
            loss, _ = ce(student, ids, mask, vs)
        elif method == "CE (KD batches)":  # the distillation batches' windows, their labelled ones only
            texts = windows.take(bl, True) + windows.take(b - bl, False)
            ids, _, mask = tokenize(s_tok, texts[:bl])
            loss, _ = ce(student, ids, mask, vs)
        else:
            texts = windows.take(bl, True) + windows.take(b - bl, False)
            ids, off, mask = tokenize(s_tok, texts)
            _, logits = ce(student, ids, mask, vs)
            labelled = mask.clone()
            labelled[bl:] = False  # the transfer windows' labels are not used
            target = torch.where(labelled[:, 1:], ids[:, 1:], -100)
            loss = F.cross_entropy(logits[:bl].reshape(-1, vs), target[:bl].reshape(-1))
            t_ids, t_off, t_mask = tokenize(t_tok, texts)
            with torch.no_grad():
                t_logits = teacher(input_ids=t_ids, attention_mask=t_mask.long()).logits[:, :-1].float()
            loss = loss + opts["weight"] * distill_term(method, logits, t_logits, (ids, off, mask),
                                                        (t_ids, t_off, t_mask), vocab_map, opts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def setup(cfg, cache):
    """Tokenizers, the frozen teacher and its bits/byte (from ``cache`` when it holds this configuration's)."""
    from tokenizers import Tokenizer
    train_text, val_text = stdlib_text(cfg["text_bytes"])
    key = (f"xtok-{cfg['text_bytes']}-{cfg['vocab_t']}-{cfg['vocab_s']}-{cfg['window']}-{cfg['teacher_steps']}-"
           f"{cfg['teacher']['hidden_size']}x{cfg['teacher']['num_hidden_layers']}")
    path = os.path.join(cache, key) if cache else None
    if path and os.path.exists(path + ".pt"):
        t_tok, s_tok = Tokenizer.from_file(path + "-t.json"), Tokenizer.from_file(path + "-s.json")
        state = torch.load(path + ".pt")
        teacher = build("llama", t_tok.get_vocab_size(), cfg["teacher"], cfg["window"], seed=1234)
        teacher.load_state_dict(state["model"])
        teacher_bpb, teacher_s = state["bpb"], state["seconds"]
    else:
        t_tok, s_tok = train_tokenizer(train_text, cfg["vocab_t"]), train_tokenizer(train_text, cfg["vocab_s"])
        teacher = build("llama", t_tok.get_vocab_size(), cfg["teacher"], cfg["window"], seed=1234)
        t0 = time.perf_counter()
        train_teacher(teacher, t_tok, t_tok.get_vocab_size(), train_text, cfg)
        teacher_s = time.perf_counter() - t0
        teacher_bpb = bits_per_byte(teacher, t_tok, val_text, t_tok.get_vocab_size(), cfg["window"],
                                    cfg["eval_windows"])
        if path:
            os.makedirs(cache, exist_ok=True)
            t_tok.save(path + "-t.json")
            s_tok.save(path + "-s.json")
            torch.save(dict(model=teacher.state_dict(), bpb=teacher_bpb, seconds=teacher_s), path + ".pt")
    teacher.eval().requires_grad_(False)
    return train_text, val_text, t_tok, s_tok, teacher, teacher_bpb, teacher_s


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------

def _paired(runs, method, base):
    """``method - base`` on the same seeds: (mean, std, wins) or None where either is missing."""
    by_seed = {r["seed"]: r["bpb"] for r in runs if r["method"] == base}
    diffs = [r["bpb"] - by_seed[r["seed"]] for r in runs if r["method"] == method and r["seed"] in by_seed]
    if method == base or not diffs:
        return None
    return statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0, sum(d < 0 for d in diffs)


def markdown(head, runs, methods, teacher_bpb, notes):
    control = "CE (KD batches)"
    lines = [head, "", "| method | validation bits/byte (mean ± std) | vs CE, paired (mean ± std) | beats CE | "
             f"vs {control}, paired | per seed | time / step |", "|---|---|---|---|---|---|---|",
             f"| teacher | {teacher_bpb:.4f} | | | | | |"]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        vals = [r["bpb"] for r in rs]
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        cells = []
        for base in ("CE", control):
            d = _paired(runs, m, base) if m != "CE (all labels)" and (base == "CE" or m not in NO_TERM) else None
            cells += [f"{d[0]:+.4f} ± {d[1]:.4f}", f"{d[2]}/{len(rs)}"] if d else ["", ""]
        lines.append(f"| {m} | {statistics.mean(vals):.4f} ± {spread:.4f} | {cells[0]} | {cells[1]} | "
                     f"{cells[2]} ({cells[3]} lower) | {', '.join(f'{x:.4f}' for x in vals)} | "
                     f"{1e3 * statistics.mean(r['step_s'] for r in rs):.0f} ms |".replace(" ( lower)", ""))
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def plot(path, runs, methods, teacher_bpb, title):
    """Bars (mean ± std over seeds) and the seeds' dots per method, the teacher as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, m in enumerate(methods):
        vals = [r["bpb"] for r in runs if r["method"] == m]
        ax.bar(i, statistics.mean(vals), yerr=statistics.stdev(vals) if len(vals) > 1 else 0.0, capsize=3,
               color="0.6" if m in NO_TERM else "C0")
        ax.plot([i] * len(vals), vals, "k.", ms=4)
    ax.axhline(teacher_bpb, color="C3", ls="--", label=f"teacher {teacher_bpb:.3f}")
    low = min(teacher_bpb, min(r["bpb"] for r in runs))
    ax.set_ylim(low * 0.95, max(r["bpb"] for r in runs) * 1.02)
    ax.set_xticks(range(len(methods)), methods, rotation=15)
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, tiny models (about a minute on 2 cores)")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--student-steps", type=int, default=None)
    p.add_argument("--weight", type=float, default=1.0, help="distillation weight (CE weight 1)")
    p.add_argument("--beta", type=float, default=0.0, help="the hybrid's matched divergence (0: forward KL)")
    p.add_argument("--rows", choices=("first", "observed"), default="first")
    p.add_argument("--map", choices=("first-token", "strings"), default="first-token")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", default=None, help="a directory keeping the tokenizers and the trained teacher")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    name = "quick" if args.quick else "full"
    cfg = dict(CONFIGS[name])
    for k in ("seeds", "student_steps"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if any(m not in METHODS for m in methods) or "CE" not in methods:
        raise SystemExit(f"--methods: a subset of {METHODS} including CE, got {methods}")
    opts = dict(weight=args.weight, beta=args.beta, rows=args.rows)
    t_start = time.perf_counter()
    train_text, val_text, t_tok, s_tok, teacher, teacher_bpb, teacher_s = setup(cfg, args.cache)
    vt, vs = t_tok.get_vocab_size(), s_tok.get_vocab_size()
    vocab_map = first_token_map(s_tok, t_tok) if args.map == "first-token" else fastkd.VocabMap.from_tokenizers(s_tok,
                                                                                                              t_tok)
    print(f"tokenizers: teacher {vt}, student {vs}; {vocab_map}; teacher {teacher_bpb:.4f} bits/byte "
          f"({teacher_s:.0f} s)", flush=True)
    runs = []
    for seed in range(cfg["seeds"]):
        for method in methods:
            t0 = time.perf_counter()
            student = build("qwen2", vs, cfg["student"], cfg["window"], seed=seed)
            step_s = train_student(method, student, s_tok, teacher, t_tok, vocab_map, train_text, cfg, seed, opts)
            bpb = bits_per_byte(student, s_tok, val_text, vs, cfg["window"], cfg["eval_windows"])
            runs.append(dict(method=method, seed=seed, bpb=bpb, step_s=step_s))
            print(f"seed {seed} {method:15s} {bpb:.4f} bits/byte ({time.perf_counter() - t0:.0f} s, "
                  f"{1e3 * step_s:.0f} ms/step)", flush=True)
    head = (f"Distillation across tokenizers ({name}): teacher Llama with a {vt}-token BPE, student Qwen2 with a "
            f"{vs}-token BPE; the student has the labels of {100 * cfg['labelled']:.0f}% of the training windows and "
            f"the teacher's distributions on all of them; {cfg['seeds']} seed(s) x {cfg['student_steps']} steps of "
            f"{cfg['batch']} windows of {cfg['window']} characters")
    notes = [
        f"teacher: Llama {cfg['teacher']}, {cfg['teacher_steps']} steps of {2 * cfg['batch']} windows of all the "
        f"training text ({teacher_s:.0f} s); student: Qwen2 {cfg['student']}, AdamW lr {cfg['lr']}",
        f"distillation batches: {cfg['labelled_rows']} labelled windows (CE + term) and "
        f"{cfg['batch'] - cfg['labelled_rows']} of all the text (term only); term weight {args.weight}, T = 1; "
        f"rows: {args.rows}; hybrid: beta {args.beta}, map {args.map}: {vocab_map}",
        f"validation: {cfg['eval_windows']} windows of {cfg['window']} characters of held-out stdlib files; "
        "bits/byte: the student's summed cross-entropy over the UTF-8 bytes of the predicted tokens",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); total {time.perf_counter() - t_start:.0f} s",
    ]
    table = markdown(head, runs, methods, teacher_bpb, notes)
    print("\n" + table)
    stem = os.path.join(args.out_dir, "cross_tokenizer" + ("-quick" if args.quick else ""))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(stem + ".md", "w") as fh:
        fh.write(table)
    with open(stem + ".csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "seed", "val_bits_per_byte", "step_ms"])
        for r in runs:
            w.writerow([r["method"], r["seed"], f"{r['bpb']:.5f}", f"{1e3 * r['step_s']:.1f}"])
    plot(stem + ".png", runs, methods, teacher_bpb, head)
    return runs, teacher_bpb


if __name__ == "__main__":
    main()
