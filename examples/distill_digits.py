"""Distillation on scikit-learn's handwritten digits, every method fastkd supports.

    python examples/distill_digits.py [--quick] [--seeds N] [--backend auto|reference]
                                      [--setting both|full|transfer] [--labelled-fraction F]

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, shipped inside
scikit-learn, no download), one fixed stratified split 60/20/20
(train/val/test) shared by every method and seed.

Models: a teacher CNN (3 conv layers, ~56k parameters) and a much smaller
student (one 3x3 conv with 4 channels + a linear layer, 690 parameters). For
each seed the teacher is trained with cross-entropy (for ESKD, its checkpoint
after the earliest epoch whose validation accuracy is within 2 points of its
best is kept), then a student is trained from the
same initialisation with each method (Adam, lr 1e-2, batch 64):

    CE      cross-entropy only
    KD      0.1 CE + 0.9 KD(T=4)                            (mdistiller CIFAR weights)
    DKD     CE + DKD(alpha=1, beta=2, T=4, 5 warm-up epochs)
    ATS     0.5 CE + 0.5 ATS(4, 2, 1)                         (the paper's lam=0.5)
    DIST    CE + 2 DIST(T=4)                                  (official configs weight by 2)
    CTKD    0.1 CE + 0.9 KD(T learned adversarially, cosine curriculum)
    IPWD    0.1 CE + 0.9 KD weighted by ipw_weights(student head, auxiliary CE head)
    MGD     CE + MGD on the conv feature map (4 -> 64 channels)
    SimKD   projector (factor 2) on the student feature + the teacher's classifier, MSE only
    TAKD    teacher -> assistant (~4k params) -> student, each step 0.1 CE + 0.9 KD
    ESKD    0.1 CE + 0.9 KD from the early-stopped teacher checkpoint

The teacher (and assistant, early teacher) are frozen; their outputs on the
training set are computed once per seed.

Two settings, both run by default (``--setting``), sharing each seed's teacher
and early teacher:

full
    every training image is labelled: the losses above on all 1078 images.
transfer
    Hinton et al.'s transfer-set experiment: only a stratified subset of the
    training split is labelled (``--labelled-fraction``, default 0.1, i.e. 107
    images; a different subset per seed, drawn with ``random_state=seed``).
    The teacher is still trained on the full labelled split; the student's
    cross-entropy term is averaged over the labelled images of each batch
    only (0 for a batch without any), while every distillation term sees all
    1078 images. CE, the baseline, therefore sees exactly the labelled images,
    for the same number of steps as every other method. Rules for the parts
    that need a label on an unlabelled image: DKD's and ATS's target class,
    and the class IPWD's weights are read at, is the teacher's argmax there;
    IPWD's auxiliary "ground truth" head is trained with CE on the labelled
    images only (trained on the teacher's argmax it would copy the teacher's
    domain that the weights are meant to correct). TAKD's assistant is
    trained in the same setting as the student (CE on the labelled images, KD
    from the teacher on all). SimKD uses no labels, so its row equals the
    full setting's. Every method is kept in this table; the "CE, all labels"
    row is the full setting's CE for reference. The teacher was trained on
    the hidden labels too, so its argmax on these images is almost always the
    hidden label (the .md file reports how often, per seed): what the
    distillation terms pass on is what the teacher learnt from every label.

Reported: test accuracy after the last epoch (no model selection on test),
mean and std over seeds, and the time of one student training step (forward,
loss, backward, Adam step) with ``backend="auto"`` (the fused kernels) and
``backend="reference"``. Results go
to ``examples/results/digits{,-quick}.{csv,md,png}`` (full) and
``examples/results/digits-transfer{,-quick}.{csv,md,png}`` (transfer; no
timing columns there, a step costs the same in both settings).
"""
import argparse
import copy
import csv
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    import fastkd
except ImportError:  # run from a source checkout without installing: use the checkout's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fastkd
import fastkd.nn as fnn

METHODS = ("CE", "KD", "DKD", "ATS", "DIST", "CTKD", "IPWD", "MGD", "SimKD", "TAKD", "ESKD")
SETTINGS = ("full", "transfer")
UNLABELLED = -100  # F.cross_entropy's default ignore_index: the target of an image whose label is hidden
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------
# data and models
# ----------------------------------------------------------------------------

@dataclass
class Split:
    x: torch.Tensor  # [N, 1, 8, 8] float32 in [0, 1]
    y: torch.Tensor  # [N] int64


def load_splits():
    """The fixed stratified 60/20/20 train/val/test split of sklearn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    index = list(range(len(y)))
    train, rest = train_test_split(index, test_size=0.4, stratify=digits.target, random_state=0)
    val, test = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=0)
    pick = lambda ids: Split(x[ids], y[ids])  # noqa: E731
    return pick(train), pick(val), pick(test)


class ConvNet(nn.Module):
    """Teacher (width 32) and TAKD assistant (width 8): conv-BN-ReLU x3, a 2x2 max-pool, GAP, linear.

    ``features`` is the last conv map [N, 2 * width, 4, 4]; the classifier ``fc``
    reads its global average (so SimKD can reuse it).
    """

    def __init__(self, width: int):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(*block(1, w), *block(w, 2 * w), nn.MaxPool2d(2), *block(2 * w, 2 * w))
        self.fc = nn.Linear(2 * w, 10)
        self.channels = 2 * w

    def features(self, x):
        return self.body(x)

    def head(self, feat):
        return self.fc(F.adaptive_avg_pool2d(feat, 1).flatten(1))

    def forward(self, x):
        return self.head(self.features(x))


class Student(nn.Module):
    """conv3x3(1 -> 4) - ReLU - 2x2 max-pool - linear(64 -> 10): 690 parameters."""

    channels = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, self.channels, 3, padding=1)
        self.fc = nn.Linear(self.channels * 16, 10)

    def features(self, x):
        return F.max_pool2d(F.relu(self.conv(x)), 2)  # [N, 4, 4, 4]

    def head(self, feat):
        return self.fc(feat.flatten(1))

    def forward(self, x):
        return self.head(self.features(x))


def labelled_mask(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Bool [N]: a stratified subset of ``fraction`` of the images, drawn per seed."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--labelled-fraction must be in (0, 1), got {fraction}")
    n_classes = int(y.max()) + 1
    if round(fraction * len(y)) < n_classes:  # stratifying needs at least one image per class
        raise ValueError(f"--labelled-fraction {fraction} labels fewer than {n_classes} of {len(y)} images")
    keep, _ = train_test_split(list(range(len(y))), train_size=fraction, stratify=y.numpy(), random_state=seed)
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[keep] = True
    return mask


def labelled_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the rows whose target is not UNLABELLED; 0 if there are none.

    (F.cross_entropy's own mean divides 0 by 0 on a batch without a labelled row.)
    """
    total = F.cross_entropy(logits, y, ignore_index=UNLABELLED, reduction="sum")
    return total / (y != UNLABELLED).sum().clamp(min=1)


def count_params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@torch.no_grad()
def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], split: Split) -> float:
    return float((predict(split.x).argmax(1) == split.y).float().mean())


def batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


# ----------------------------------------------------------------------------
# the methods: each returns (loss of one batch, predictor, extra trainable modules)
# ----------------------------------------------------------------------------

@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor                              # label, or UNLABELLED (transfer setting)
    epoch: int                                   # 0-indexed
    target: Optional[torch.Tensor] = None        # label, or the teacher's argmax where y is UNLABELLED
    teacher: Optional[torch.Tensor] = None       # teacher logits
    teacher_feat: Optional[torch.Tensor] = None  # teacher feature map [B, 64, 4, 4]
    assistant: Optional[torch.Tensor] = None     # TAKD assistant logits
    early: Optional[torch.Tensor] = None         # ESKD early-stopped teacher logits


def make_method(name: str, student: Student, teacher: ConvNet, epochs: int, backend: str,
                partial_labels: bool = False):
    """The loss a user would write for ``name`` (see the module docstring for the weights).

    ``ce(logits, b.y)`` is the supervised term; with ``partial_labels`` it only
    counts the labelled rows. Losses that need a class for every row (DKD,
    ATS, IPWD's weights) read ``b.target`` instead, which is ``b.y`` wherever
    ``b.y`` is a label.
    """
    # Plain F.cross_entropy in the full setting keeps its results bit for bit what they were.
    ce = labelled_ce if partial_labels else F.cross_entropy
    kd = fnn.KDLoss(temperature=4.0, backend=backend)
    predict = student
    extra: List[nn.Module] = []

    if name == "CE":
        def loss(b):
            return ce(student(b.x), b.y)
    elif name in ("KD", "TAKD", "ESKD"):
        source = {"KD": "teacher", "TAKD": "assistant", "ESKD": "early"}[name]

        def loss(b):
            logits = student(b.x)
            return 0.1 * ce(logits, b.y) + 0.9 * kd(logits, getattr(b, source))
    elif name == "DKD":
        dkd = fnn.DKDLoss(alpha=1.0, beta=2.0, temperature=4.0, warmup_epochs=5, backend=backend)

        def loss(b):
            logits = student(b.x)
            return ce(logits, b.y) + dkd(logits, b.teacher, b.target, epoch=b.epoch + 1)
    elif name == "ATS":
        ats = fnn.ATSLoss(target_temperature=4.0, other_temperature=2.0, backend=backend)

        def loss(b):
            logits = student(b.x)
            return 0.5 * ce(logits, b.y) + 0.5 * ats(logits, b.teacher, b.target)
    elif name == "DIST":
        dist = fnn.DISTLoss(temperature=4.0, backend=backend)

        def loss(b):
            logits = student(b.x)
            return ce(logits, b.y) + 2.0 * dist(logits, b.teacher)
    elif name == "CTKD":
        temp = fnn.LearnableTemperature(mode="global", t_start=1.0, t_end=20.0)
        curriculum = fnn.CosineCurriculum(l_min=-1.0, l_max=0.0, epochs=max(1, epochs // 4))
        extra.append(temp)

        def loss(b):
            logits = student(b.x)
            t = temp(lambda_=curriculum(b.epoch))
            return 0.1 * ce(logits, b.y) + 0.9 * kd(logits, b.teacher, temperature=t)
    elif name == "IPWD":
        aux = nn.Linear(Student.channels * 16, 10)  # auxiliary head trained with CE only
        extra.append(aux)

        def loss(b):
            feat = student.features(b.x).flatten(1)
            logits, aux_logits = student.fc(feat), aux(feat.detach())
            weight = fastkd.ipw_weights(logits, aux_logits, b.target)
            return 0.1 * ce(logits, b.y) + 0.9 * kd(logits, b.teacher, sample_weight=weight) + ce(aux_logits, b.y)
    elif name == "MGD":
        # alpha scaled from 7e-5 (ResNet-50, 25k feature elements) to our 1k-element maps.
        mgd = fnn.MGDLoss(Student.channels, teacher.channels, alpha=2e-3, mask_ratio=0.15, backend=backend)
        extra.append(mgd)

        def loss(b):
            feat = student.features(b.x)
            return ce(student.head(feat), b.y) + mgd(feat, b.teacher_feat)
    elif name == "SimKD":
        # The paper's projector (factor 2): at inference the student carries it and the teacher's classifier.
        simkd = fnn.SimKD(Student.channels, teacher.channels, teacher.fc)
        extra.append(simkd)

        def loss(b):
            return simkd(student.features(b.x), b.teacher_feat)[0]

        def predict(x):  # inference needs no teacher features: projector, GAP, teacher classifier
            projected = simkd.projector(student.features(x))
            return simkd.teacher_classifier(F.adaptive_avg_pool2d(projected, 1).flatten(1))
    else:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    return loss, predict, extra


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------

def train(model: nn.Module, loss_fn, data: Dict[str, torch.Tensor], extra: List[nn.Module], epochs: int,
          seed: int, lr: float = 1e-2, batch_size: int = 64, on_epoch=None):
    """Adam over ``model`` and ``extra``; ``loss_fn(Batch)``. Returns the time of each step (s)."""
    params = [p for m in [model] + extra for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    order = torch.Generator().manual_seed(seed)
    step_times = []
    n = len(data["y"])
    for epoch in range(epochs):
        for m in [model] + extra:
            m.train()
        for idx in batches(n, batch_size, order):
            b = Batch(epoch=epoch, **{k: v[idx] for k, v in data.items()})
            start = time.perf_counter()
            loss = loss_fn(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - start)
        for m in [model] + extra:
            m.eval()
        if on_epoch is not None:
            on_epoch(epoch)
    return step_times


def ce_only(model):
    return lambda b: F.cross_entropy(model(b.x), b.y)


@torch.no_grad()
def frozen_outputs(net: ConvNet, x: torch.Tensor):
    net.eval()
    feat = net.features(x)
    return net.head(feat), feat


def run_seed(seed: int, splits, methods, epochs: int, backend: str, progress, settings=("full",),
             labelled_fraction: float = 0.1):
    """Test accuracy of the teacher, assistant, early teacher and every method for one seed.

    Returns ``({setting: {row name: accuracy}}, info)``. The teacher and the
    early teacher are trained once (on every label) and shared by the settings;
    the assistant and the students are trained per setting. ``info`` holds the
    epoch of the ESKD checkpoint (the earliest whose validation accuracy is
    within 2 points of the teacher's best) and, for "transfer", the number of
    labelled images and how often the teacher's argmax agrees with the hidden
    labels (the targets DKD, ATS and IPWD get there).
    """
    train_set, val_set, test_set = splits
    torch.manual_seed(seed)
    teacher = ConvNet(32)
    checkpoints = []  # (val accuracy, state) after each epoch

    def keep(epoch):
        checkpoints.append((accuracy(teacher, val_set), copy.deepcopy(teacher.state_dict())))

    base = {"x": train_set.x, "y": train_set.y}
    train(teacher, ce_only(teacher), base, [], epochs, seed, on_epoch=keep)
    best = max(v for v, _ in checkpoints)
    early_epoch = next(i for i, (v, _) in enumerate(checkpoints) if v >= best - 0.02)
    early = ConvNet(32)
    early.load_state_dict(checkpoints[early_epoch][1])
    teacher.requires_grad_(False)  # frozen from here on (SimKD reuses its classifier)
    progress.update()
    t_logits, t_feat = frozen_outputs(teacher, train_set.x)
    e_logits, _ = frozen_outputs(early, train_set.x)
    teacher_rows = {"teacher": accuracy(teacher, test_set), "teacher (early, ESKD)": accuracy(early, test_set)}
    info = {"early_epoch": early_epoch + 1}
    out = {}
    kd = fnn.KDLoss(temperature=4.0, backend=backend)
    for setting in settings:
        partial = setting == "transfer"
        if partial:
            labelled = labelled_mask(train_set.y, labelled_fraction, seed)
            hidden = ~labelled
            info["labelled"] = int(labelled.sum())
            info["pseudo_agreement"] = float((t_logits.argmax(1)[hidden] == train_set.y[hidden]).float().mean())
        else:
            labelled = torch.ones_like(train_set.y, dtype=torch.bool)
        y = torch.where(labelled, train_set.y, UNLABELLED)
        target = torch.where(labelled, train_set.y, t_logits.argmax(1))
        ce = labelled_ce if partial else F.cross_entropy
        acc = dict(teacher_rows)
        # TAKD's assistant: plain KD from the teacher, with the labels of this setting.
        torch.manual_seed(seed)
        assistant = ConvNet(8)
        data = {"x": train_set.x, "y": y, "target": target, "teacher": t_logits}

        def assistant_loss(b):
            logits = assistant(b.x)
            return 0.1 * ce(logits, b.y) + 0.9 * kd(logits, b.teacher)

        train(assistant, assistant_loss, data, [], epochs, seed)
        progress.update()
        a_logits, _ = frozen_outputs(assistant, train_set.x)
        acc["assistant (TAKD)"] = accuracy(assistant, test_set)

        data = dict(data, teacher_feat=t_feat, assistant=a_logits, early=e_logits)
        for name in methods:
            torch.manual_seed(seed)  # every method starts from the same student initialisation
            student = Student()
            loss, predict, extra = make_method(name, student, teacher, epochs, backend, partial_labels=partial)
            torch.manual_seed(seed + 1000)  # and sees the same mask draws / extra-module inits
            train(student, loss, data, extra, epochs, seed)
            acc[name] = accuracy(predict, test_set)
            progress.update()
        out[setting] = acc
    return out, info


def step_times(splits, methods, epochs: int, steps: int, rounds: int, progress) -> Dict[str, Dict[str, float]]:
    """Median ms per student training step of each method, backend "auto" vs "reference".

    Each round trains a fresh student for ``steps`` batches with each backend in
    turn (interleaved, so a busy machine slows both alike); round 0 only warms up.
    """
    train_set = splits[0]
    torch.manual_seed(0)
    teacher = ConvNet(32).requires_grad_(False)
    t_logits, t_feat = frozen_outputs(teacher, train_set.x)
    data = {"x": train_set.x, "y": train_set.y, "target": train_set.y, "teacher": t_logits, "teacher_feat": t_feat,
            "assistant": t_logits, "early": t_logits}
    sub = {k: v[: 64 * steps] for k, v in data.items()}  # one epoch = `steps` batches
    out = {}
    for name in methods:
        samples = {"auto": [], "reference": []}
        for round_ in range(rounds + 1):
            for backend in samples:
                torch.manual_seed(0)
                student = Student()
                loss, _, extra = make_method(name, student, teacher, epochs, backend)
                times = train(student, loss, sub, extra, 1, 0)
                if round_:
                    samples[backend] += times
        out[name] = {b: 1e3 * sorted(v)[len(v) // 2] for b, v in samples.items()}
        progress.update()
    return out


# ----------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------

def mean_std(values: List[float]):
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def summarize(per_seed: List[Dict[str, float]], timing, params: Dict[str, int]):
    """Rows: method, test accuracy (%) mean and std, paired difference to CE, params, ms/step.

    The difference to CE is paired: per seed (same split, same student initialisation,
    same batch order) method minus CE, then mean and std over seeds.
    """
    rows = []
    for name in per_seed[0]:
        accs = [100 * a[name] for a in per_seed]
        m, s = mean_std(accs)
        paired = name in METHODS and "CE" in per_seed[0]
        d_mean, d_std = mean_std([100 * (a[name] - a["CE"]) for a in per_seed]) if paired else ("", "")
        t = timing.get(name, {})
        rows.append({
            "method": name, "test_acc_mean": round(m, 2), "test_acc_std": round(s, 2),
            "delta_vs_ce": round(d_mean, 2) if paired else "", "delta_vs_ce_std": round(d_std, 2) if paired else "",
            "seeds": len(accs), "per_seed": " ".join(f"{a:.1f}" for a in accs),
            "params": params.get(name, ""),
            "ms_step_auto": round(t["auto"], 3) if t else "", "ms_step_reference": round(t["reference"], 3) if t else "",
        })
    return rows


def markdown(rows, timing: bool = True) -> str:
    """The table; ``timing=False`` leaves out the two ms/step columns."""
    header = ["method", "test acc % (mean ± std)", "vs CE, paired (mean ± std)", "params"]
    header += ["ms/step auto", "ms/step reference"] if timing else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        delta = f"{r['delta_vs_ce']:+.2f} ± {r['delta_vs_ce_std']:.2f}" if r["delta_vs_ce"] != "" else ""
        cells = [r["method"], f"{r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f}", delta, str(r["params"])]
        cells += [str(r["ms_step_auto"]), str(r["ms_step_reference"])] if timing else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    means = [r["test_acc_mean"] for r in rows]
    stds = [r["test_acc_std"] for r in rows]
    colors = ["#888888" if r["method"] not in METHODS else "#1f77b4" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 4))
    bars = ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color=colors)
    ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=7, padding=3)
    ce = next((r["test_acc_mean"] for r in rows if r["method"] == "CE"), None)
    if ce is not None:
        ax.axhline(ce, color="black", linestyle="--", linewidth=1, label="student, CE only")
        ax.legend(loc="lower right", fontsize=8)
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, low - 3), 100.5)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy % (mean ± std)")
    ax.set_title(title, fontsize=9)  # the transfer title is long
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Progress:
    def __init__(self, total: int, desc: str):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self.total, self.done, self.desc = total, 0, desc

    def update(self):
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        else:
            print(f"\r{self.desc}: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2 seeds, 8 epochs, every method, both settings (about 50 s of one idle core)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per training run (default 40, quick 8)")
    p.add_argument("--backend", choices=("auto", "reference"), default="auto",
                   help="fastkd backend of the accuracy runs (the timing compares both)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--setting", choices=("both",) + SETTINGS, default="both",
                   help="full: every training image labelled; transfer: CE on a labelled subset only, "
                        "distillation on every training image; both (default): one table each")
    p.add_argument("--labelled-fraction", type=float, default=0.1,
                   help="transfer setting: stratified fraction of the training split that keeps its labels "
                        "(default 0.1)")
    p.add_argument("--timing-steps", type=int, default=None, help="steps per timing pass (default 16, quick 4)")
    p.add_argument("--timing-rounds", type=int, default=None, help="timing passes per backend (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these models are too small to gain from more)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    args = p.parse_args(argv)
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.epochs = args.epochs or (8 if args.quick else 40)
    args.timing_steps = args.timing_steps or (4 if args.quick else 16)
    args.timing_rounds = args.timing_rounds or (1 if args.quick else 3)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {list(METHODS)}")
    args.settings = SETTINGS if args.setting == "both" else (args.setting,)
    if not 0.0 < args.labelled_fraction < 1.0:
        p.error(f"--labelled-fraction must be in (0, 1), got {args.labelled_fraction}")
    return args


def write_report(rows, stem: str, title: str, notes: List[str], timing: bool) -> str:
    """``stem``.csv, .md and .png for one table; returns the markdown table."""
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, timing=timing)
    with open(stem + ".md", "w") as f:
        f.write(f"{title}\n\n{table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    plot(rows, stem + ".png", title)
    print(title)
    print(table)
    for note in notes:
        print("note:", note)
    return table


def main(argv=None):
    """Runs the requested settings; returns ``{setting: rows}`` (rows as in ``summarize``)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    splits = load_splits()
    start = time.perf_counter()
    per_seed_runs = 1 + len(args.settings) * (1 + len(args.methods))
    progress = _Progress(args.seeds * per_seed_runs + len(args.methods), "training, then timing")
    # "auto" falls back to the reference for losses without a fused kernel yet and warns once
    # for each; collect those warnings and print them once at the end instead of mid-progress-bar.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [run_seed(seed, splits, args.methods, args.epochs, args.backend, progress, args.settings,
                            args.labelled_fraction)
                   for seed in range(args.seeds)]
        timing = step_times(splits, args.methods, args.epochs, args.timing_steps, args.timing_rounds, progress)
        progress.close()
    infos = [info for _, info in results]
    teacher = ConvNet(32)
    params = {"teacher": count_params(teacher), "teacher (early, ESKD)": count_params(teacher),
              "assistant (TAKD)": count_params(ConvNet(8)), "CE, all labels": count_params(Student())}
    for name in args.methods:
        student = Student()
        _, _, extra = make_method(name, student, teacher, args.epochs, "reference")
        # Parameters used at inference: SimKD keeps its projector and the teacher's classifier.
        params[name] = count_params(student) + (
            count_params(extra[0]) + count_params(teacher.fc) - count_params(student.fc) if name == "SimKD" else 0)

    os.makedirs(args.out, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    common = [f"ESKD teacher checkpoint epoch per seed: {[i['early_epoch'] for i in infos]} (of {args.epochs})",
              f"torch {torch.__version__}, fastkd {fastkd.__version__}, {args.threads} thread(s)"]
    fallbacks = sorted({str(w.message) for w in caught})
    out = {}
    for setting in args.settings:
        per_seed = [acc[setting] for acc, _ in results]
        if setting == "full":
            rows = summarize(per_seed, timing, params)
            stem = os.path.join(args.out, "digits" + suffix)
            title = (f"digits: student test accuracy, {args.seeds} seeds x {args.epochs} epochs "
                     f"(backend={args.backend})")
            notes = common[:1] + [common[1] + f"; ms/step: median of {args.timing_rounds} x "
                                  f"{args.timing_steps} steps per backend, interleaved"]
        else:
            if "full" in args.settings and "CE" in args.methods:
                # The same seed's CE student with every label: what the hidden labels would be worth.
                per_seed = [{**{k: v for k, v in acc["transfer"].items() if k not in METHODS},
                             "CE, all labels": acc["full"]["CE"],
                             **{k: v for k, v in acc["transfer"].items() if k in METHODS}}
                            for acc, _ in results]
            rows = summarize(per_seed, {}, params)
            stem = os.path.join(args.out, "digits-transfer" + suffix)
            n_labelled = [i["labelled"] for i in infos]
            n_train = len(splits[0].y)
            title = (f"digits, transfer set: student CE on {n_labelled[0]} of {n_train} labels, "
                     f"distillation on all {n_train}; {args.seeds} seeds x {args.epochs} epochs "
                     f"(backend={args.backend})")
            agreement = ", ".join(f"{100 * i['pseudo_agreement']:.1f}" for i in infos)
            notes = [f"labelled images per seed (stratified subset, random_state=seed): {n_labelled}",
                     f"teacher argmax = hidden label on the unlabelled training images, % per seed: {agreement} "
                     f"(the target DKD, ATS and IPWD get there)"] + common
        notes += fallbacks
        write_report(rows, stem, title, notes, timing=setting == "full")
        out[setting] = rows
    print(f"total {time.perf_counter() - start:.0f} s; wrote "
          + ", ".join(("digits" if s == "full" else "digits-transfer") + suffix for s in args.settings)
          + f" .csv, .md, .png in {args.out}")
    return out


if __name__ == "__main__":
    main()
