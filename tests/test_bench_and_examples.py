"""Smoke tests of the benchmark driver (``fastkd.bench``), its charts
(``benchmarks/plot.py``) and the digits and language-model distillation examples: tiny runs whose
outputs are checked (columns, quantile order, bandwidth arithmetic, agreement of
fused and eager losses, accuracies above chance, determinism)."""
import csv
import importlib.util
import math
import os
import re

import pytest
import torch

import fastkd
from fastkd.bench import kernels as bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


# ----------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------

def test_bench_quick_run_writes_consistent_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    # Exit status 0 also means every fused provider matched the eager reference.
    assert bench.main(["--quick", "--device", "cpu", "--losses", "kd,dist", "--providers", "cpu,eager",
                       "--csv", str(out)]) == 0
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.COLUMNS
        rows = list(reader)
    fused = fastkd.backends()["cpu"]["losses"]
    expected = {(k, p) for k in ("kd", "dist") for p in ["eager"] + (["cpu"] if k in fused else [])}
    assert {(r["kernel"], r["provider"]) for r in rows} == expected
    for kernel, provider in expected:
        modes = sorted(r["mode"] for r in rows if (r["kernel"], r["provider"]) == (kernel, provider))
        assert modes == sorted(bench.MODES)
    copy_ratios = []
    for r in rows:
        assert r["device"] and r["torch"] == torch.__version__ and r["fastkd"] == fastkd.__version__
        p20, median, p80 = float(r["p20_ms"]), float(r["median_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= median <= p80
        assert float(r["peak_mem_mb"]) >= 0
        if r["mode"] == "fwd+bwd":
            numel = 1
            for d in r["shape"].split("x"):
                numel *= int(d)
            gbps = float(r["gbps"])
            # 3 float32 tensors' worth of traffic (2 reads, 1 gradient write) over the median time.
            assert gbps == pytest.approx(numel * 4 * 3 / (median / 1e3) / 1e9, rel=2e-3)
            copy_ratios.append(gbps / float(r["pct_copy_bw"]))
        else:
            assert r["gbps"] == "" and r["pct_copy_bw"] == ""
    # One copy bandwidth measured per run: every row's gbps / pct_copy_bw is the same number
    # (up to the 4 significant digits each column is written with), never compared after rounding.
    assert copy_ratios and all(x == pytest.approx(copy_ratios[0], rel=2e-3) for x in copy_ratios)
    if "kd" in fused:
        # The fused op allocates the student gradient (1024x1000 float32 = 3.9 MB) in the forward.
        kd_fwd = next(r for r in rows if (r["kernel"], r["provider"], r["mode"]) == ("kd", "cpu", "fwd"))
        assert float(kd_fwd["peak_mem_mb"]) >= 0.9 * 1024 * 1000 * 4 / 2**20
    printed = capsys.readouterr().out
    assert "Speed-up of fwd+bwd" in printed and f"wrote {len(rows)} rows" in printed

    plot = _load("benchmarks/plot.py", "fastkd_bench_plot")
    written = plot.plot(str(out), str(tmp_path / "png"))
    assert [os.path.basename(p) for p in written] == ["bench_time.png", "bench_speedup.png", "bench_memory.png"]
    assert all(_is_png(p) and os.path.getsize(p) > 5000 for p in written)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is unavailable")
def test_bench_distributed_runs_and_counts_the_formula_bytes(tmp_path, capsys):
    """``--distributed``: every case runs on 2 gloo processes; the driver asserts that the counted bytes
    equal the printed formula (a wrong count raises in main)."""
    from fastkd.bench import distributed as bench_distributed

    out = tmp_path / "dist.csv"
    bench_distributed.main(["--world", "2", "--rows", "64", "--vocab", "512", "--repeat", "1", "--csv", str(out)])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    names = {r["loss"] for r in rows}
    assert len(rows) == len(bench_distributed._cases(None)) and any(n.startswith("fused linear") for n in names)
    for r in rows:
        assert int(r["bytes_per_call"]) == int(r["formula_bytes"]) and float(r["sharded_ms"]) > 0, r


def test_plot_panel_without_providers(tmp_path):
    # The speed-up chart of a run with only the eager provider has panels with no bars;
    # a legend with ncol=0 is rejected by matplotlib >= 3.11 ("number sections must be larger than 0").
    plot = _load("benchmarks/plot.py", "fastkd_bench_plot")
    path = plot.bar_panels({"kd": {"1024x1000 float32": {}}}, [], "speed-up", "t", str(tmp_path / "x.png"),
                           log=False, errors=False, base=1.0)
    assert _is_png(path)


def test_bench_check_close_flags_wrong_loss_and_gradient():
    g = torch.randn(8, 5)
    loss = torch.tensor(1.0)
    assert bench.check_close(loss, g, loss.clone(), g.clone(), "float32") is None
    assert "loss" in bench.check_close(loss, g, torch.tensor(1.01), g, "float32")
    bad = g.clone()
    bad[3, 2] += 0.1 * g.abs().max()
    assert "gradient" in bench.check_close(loss, bad, loss, g, "float32")


def test_bench_cases_scale_cpu_shapes_and_keep_the_headline():
    cases = bench.build_cases(["kd", "mgd"], "cpu", quick=False)
    logit = [c for c in cases if c.kernel == "kd"]
    assert {c.shape[-1] for c in logit} == {100, 1000, 32000, 128256}
    assert {c.dtype for c in logit} == {"float32", "bfloat16"}
    headline = [c for c in logit if c.shape == bench.HEADLINE_CPU]
    assert len(headline) == 1 and headline[0].dtype == "float32"
    for c in logit:
        if c not in headline:
            assert c.shape[0] * c.shape[1] <= bench.CPU_MAX_LOGITS
            assert ("scaled from" in c.note) == (c.shape[1] >= 32000)
    (mgd,) = [c for c in cases if c.kernel == "mgd"]
    assert mgd.shape[1:] == (256, 56, 56) and mgd.shape[0] < 64 and "scaled from 64x256x56x56" in mgd.note
    # GPU shapes are the nominal ones.
    assert (8192, 128256) in {c.shape for c in bench.build_cases(["dkd"], "cuda", quick=False)}


def test_bench_picks_up_fused_backends_as_they_appear(monkeypatch):
    def fake(cpu_losses):
        def unavailable_reason(name, loss=None, device=None):
            if name == "cpu":
                return None if loss in cpu_losses else f"backend 'cpu' has no {loss} kernel yet"
            return "no CUDA device is available" if name == "cuda" else "no GPU"
        return unavailable_reason

    monkeypatch.setattr(bench._backend, "unavailable_reason", fake(["kd"]))
    names, notes = bench.providers_for("dkd", "cpu", None)
    assert names == ["eager", "compile"] and len(notes) == 1 and "'cpu'" in notes[0] and "dkd" in notes[0]
    monkeypatch.setattr(bench._backend, "unavailable_reason", fake(["kd", "dkd"]))
    assert bench.providers_for("dkd", "cpu", None) == (["cpu", "eager", "compile"], [])
    # kd_ce needs the "kd+ce" ops and brings its two extra peers
    monkeypatch.setattr(bench._backend, "unavailable_reason", fake(["kd", "kd+ce"]))
    assert bench.providers_for("kd_ce", "cpu", None)[0] == ["cpu", "kd_alone:cpu", "kd+ce_sep:cpu", "eager", "compile"]
    assert bench.providers_for("kd_ce", "cpu", ["cpu", "kd_alone"])[0] == ["cpu", "kd_alone:cpu"]
    # Never the Triton interpreter on CPU; on CUDA both GPU backends are reported when missing.
    names, notes = bench.providers_for("kd", "cuda", ["cuda", "triton", "eager"])
    assert names == ["eager"] and any("'cuda'" in n for n in notes) and any("'triton'" in n for n in notes)


# ----------------------------------------------------------------------------
# digits distillation example
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    # The example's own dependencies (the "examples"/"test" extras in pyproject.toml).
    for module in ("sklearn", "matplotlib"):
        pytest.importorskip(module, reason=f"the digits example needs {module}: pip install fastkd[examples]")
    return _load("examples/distill_digits.py", "distill_digits")


def test_digits_every_method_runs_and_reports(digits, tmp_path, capsys):
    out = digits.main(["--quick", "--seeds", "1", "--epochs", "2", "--timing-steps", "2",
                       "--timing-rounds", "1", "--out", str(tmp_path)])
    assert set(out) == {"full", "transfer"}  # the default run produces both tables
    by_name = {r["method"]: r for r in out["full"]}
    assert set(digits.METHODS) <= set(by_name)
    assert {"teacher", "teacher (early, ESKD)", "assistant (TAKD)"} <= set(by_name)
    for r in out["full"] + out["transfer"]:
        assert 0.0 <= r["test_acc_mean"] <= 100.0 and r["seeds"] == 1
    # Two epochs are enough to be far above chance (10 %) on digits.
    assert by_name["teacher"]["test_acc_mean"] > 80
    assert by_name["CE"]["test_acc_mean"] > 40
    assert by_name["teacher"]["params"] > 20 * by_name["CE"]["params"]  # a much smaller student
    for name in digits.METHODS:
        assert by_name[name]["ms_step_auto"] > 0 and by_name[name]["ms_step_reference"] > 0
    transfer = {r["method"]: r for r in out["transfer"]}
    assert set(digits.METHODS) | {"CE, all labels"} <= set(transfer)
    # Both settings share the seed's teacher; the reference row is the full setting's CE student.
    assert transfer["teacher"]["test_acc_mean"] == by_name["teacher"]["test_acc_mean"]
    assert transfer["CE, all labels"]["test_acc_mean"] == by_name["CE"]["test_acc_mean"]
    assert transfer["SimKD"]["test_acc_mean"] == by_name["SimKD"]["test_acc_mean"]  # SimKD uses no labels
    assert transfer["CE"]["delta_vs_ce"] == 0.0 and transfer["CE, all labels"]["delta_vs_ce"] == ""
    for stem in ("digits-quick", "digits-transfer-quick"):
        for ext in ("csv", "md", "png"):
            assert (tmp_path / f"{stem}.{ext}").exists()
        assert _is_png(tmp_path / f"{stem}.png")
    md = (tmp_path / "digits-quick.md").read_text()
    assert "| SimKD |" in md and "ESKD teacher checkpoint epoch" in md and "ms/step auto" in md
    md = (tmp_path / "digits-transfer-quick.md").read_text()
    assert "| SimKD |" in md and "| CE, all labels |" in md and "ms/step" not in md
    assert "CE on 107 of 1078 labels" in md and "teacher argmax = hidden label" in md
    printed = capsys.readouterr().out
    assert "| CE |" in printed and "digits, transfer set" in printed


def test_digits_transfer_labels_and_losses(digits):
    train_y = digits.load_splits()[0].y
    mask = digits.labelled_mask(train_y, 0.1, seed=0)
    assert mask.dtype == torch.bool and int(mask.sum()) == 107  # round(0.1 * 1078), sklearn's rounding
    assert torch.equal(mask, digits.labelled_mask(train_y, 0.1, seed=0))  # deterministic per seed
    assert not torch.equal(mask, digits.labelled_mask(train_y, 0.1, seed=1))  # a new subset per seed
    counts = torch.bincount(train_y[mask], minlength=10)
    assert counts.min() >= 10 and counts.max() <= 11  # stratified
    for bad in (0.0, 1.0, 0.005):
        with pytest.raises(ValueError, match="--labelled-fraction"):
            digits.labelled_mask(train_y, bad, seed=0)
    with pytest.raises(SystemExit):
        digits.parse_args(["--labelled-fraction", "1.5"])

    # CE over the labelled rows only; exactly 0 (not NaN) for a batch without any.
    torch.manual_seed(0)
    logits = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([3, digits.UNLABELLED, 1, digits.UNLABELLED, digits.UNLABELLED, 7])
    loss = digits.labelled_ce(logits, y)
    keep = y != digits.UNLABELLED
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[keep], y[keep]))
    loss.backward()
    assert logits.grad[~keep].abs().max() == 0 and logits.grad[keep].abs().max() > 0
    none = digits.labelled_ce(logits, torch.full((6,), digits.UNLABELLED))
    assert none.item() == 0.0

    # On a batch with no label every method still trains from the teacher alone (finite, non-zero
    # gradient): DKD, ATS and IPWD read the teacher's argmax as their target there.
    splits = digits.load_splits()
    x = splits[0].x[:16]
    teacher = digits.ConvNet(32).requires_grad_(False)
    t_logits, t_feat = digits.frozen_outputs(teacher, x)
    batch = digits.Batch(x=x, y=torch.full((16,), digits.UNLABELLED), epoch=10, target=t_logits.argmax(1),
                         teacher=t_logits, teacher_feat=t_feat, assistant=t_logits, early=t_logits)
    for name in digits.METHODS:
        torch.manual_seed(0)
        student = digits.Student()
        loss_fn, _, _ = digits.make_method(name, student, teacher, 40, "reference", partial_labels=True)
        loss = loss_fn(batch)
        assert torch.isfinite(loss), name
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None] or [torch.zeros(1)])
        if name == "CE":
            assert loss.item() == 0.0 and grad.abs().max() == 0  # nothing to learn from without labels
        else:
            assert torch.isfinite(grad).all() and grad.abs().max() > 0, name


def test_digits_split_is_fixed_and_runs_are_deterministic(digits):
    torch.set_num_threads(1)
    splits = digits.load_splits()
    again = digits.load_splits()
    assert [len(s.y) for s in splits] == [1078, 359, 360]
    for a, b in zip(splits, again):
        assert torch.equal(a.y, b.y) and torch.equal(a.x, b.x)
    assert set(splits[0].y.tolist()) == set(range(10))  # stratified: every class in every split

    class Silent:
        def update(self):
            pass

    methods = ["CE", "MGD", "CTKD", "DKD"]
    full_only = digits.run_seed(3, splits, methods, 1, "auto", Silent())
    first = digits.run_seed(3, splits, methods, 1, "auto", Silent(), ("full", "transfer"), 0.1)
    second = digits.run_seed(3, splits, methods, 1, "auto", Silent(), ("full", "transfer"), 0.1)
    assert first == second
    # Adding the transfer setting leaves the full setting's results as they were.
    assert first[0]["full"] == full_only[0]["full"] and set(full_only[0]) == {"full"}
    assert first[1]["labelled"] == 107 and 0.0 <= first[1]["pseudo_agreement"] <= 1.0


def test_bench_fused_linear_alternates_the_providers(capsys):
    """``--fused-linear``: each provider in its own process, stepped in turn; ratios per round with their range."""
    from fastkd.bench import fused_linear as bench_fused_linear

    assert bench_fused_linear.main(["--shapes", "24x16", "--vocab", "300", "--steps", "2",
                                    "--providers", "fused,unfused,matmuls"]) == 0
    out = capsys.readouterr().out
    assert "alternated" in out
    for provider in ("fused", "unfused", "matmuls"):
        assert re.search(rf"^  {provider}\s+\d+\.\d+ s/step \(range ", out, re.M), out
    assert re.search(r"fused time vs the four matmuls \(target <= 1.1\): \d+\.\d+ \(rounds ", out), out
    losses = re.findall(r"^  (fused|unfused)\s.*loss (\d+\.\d+)", out, re.M)
    assert len(losses) == 2 and losses[0][1] == losses[1][1], losses  # the same loss value
    bench_fused_linear.main(["--profile", "--shapes", "24x16", "--vocab", "300"])
    out = capsys.readouterr().out
    shares = re.findall(r"^  (.+?)\s+(\d+\.\d+) s  \(\s*(\d+\.\d)%\)", out, re.M)
    assert [name for name, _, _ in shares][:3] == ["matmuls", "loss kernel", "allocation"], out
    assert sum(float(p) for _, _, p in shares) >= 99.0, out  # the phases cover the step


def test_bench_fused_linear_mutual_learning_providers_agree(capsys):
    """``fused_mutual`` (``teacher_grad=True``) and ``unfused_mutual`` (both heads by autograd): the same loss."""
    from fastkd.bench import fused_linear as bench_fused_linear

    assert bench_fused_linear.main(["--shapes", "24x16", "--vocab", "300", "--steps", "1",
                                    "--providers", "fused_mutual,unfused_mutual"]) == 0
    losses = re.findall(r"^  (fused_mutual|unfused_mutual)\s.*loss (\d+\.\d+)", capsys.readouterr().out, re.M)
    assert len(losses) == 2 and losses[0][1] == losses[1][1], losses


def test_bench_fused_linear_fails_when_the_losses_disagree(monkeypatch, capsys):
    from fastkd.bench import fused_linear as bench_fused_linear

    def fake_run_shape(n, h, v, providers, steps):
        return {p: {"provider": p, "times": [1.0], "seconds": 1.0, "peak_extra_mb": 1.0, "threads": 1,
                    "loss": 1.0 if p == "fused" else 1.001} for p in providers}

    monkeypatch.setattr(bench_fused_linear, "run_shape", fake_run_shape)
    assert bench_fused_linear.main(["--shapes", "8x8", "--vocab", "64", "--providers", "fused,unfused"]) == 1
    assert "MISMATCH: N=8 H=8: fused loss 1, unfused 1.001" in capsys.readouterr().out


def test_quick_bench_writes_under_results_and_adds_the_fused_head(monkeypatch, tmp_path, capsys):
    """The default CSV is under results/ (ignored by git), never the current folder itself; a quick run of
    every loss also times the fused LM head and writes its CSV beside the kernels' one."""
    assert bench.parse_args(["--quick", "--device", "cpu"]).csv == os.path.join("results", "fastkd-bench-cpu-quick.csv")
    assert os.path.dirname(bench.parse_args(["--device", "cpu", "--fused-linear"]).csv) == "results"
    monkeypatch.setattr(bench, "run", lambda args: ([], [], []))  # the kernel cases: tested above
    monkeypatch.setattr(bench, "QUICK_FUSED_LINEAR", ("24x16", 300, 1, "fused,unfused"))
    out = tmp_path / "sub" / "quick.csv"
    assert bench.main(["--quick", "--device", "cpu", "--csv", str(out)]) == 0
    with open(tmp_path / "sub" / "quick-fused-linear.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["provider"] for r in rows} == {"fused", "unfused"} and {r["v"] for r in rows} == {"300"}
    assert "Fused linear distillation" in capsys.readouterr().out
    monkeypatch.setattr(bench, "QUICK_FUSED_LINEAR", None)  # --losses: the kernel cases only
    assert bench.main(["--quick", "--device", "cpu", "--losses", "kd", "--csv", str(tmp_path / "kd.csv")]) == 0


def test_distill_lm_tiny_run_trains_and_fused_equals_unfused(tmp_path):
    """examples/distill_lm.py end to end (``--tiny``: tiny Llama teacher and Qwen2 student, 3 steps): every
    method trains, the fused and unfused losses agree step by step, and the table is written."""
    for module in ("transformers", "tokenizers"):
        pytest.importorskip(module, reason=f"examples/distill_lm.py needs {module} (the examples extra)")
    lm = _load("examples/distill_lm.py", "fastkd_distill_lm")
    out = tmp_path / "lm.md"
    results, first, worst = lm.main(["--tiny", "--out", str(out)])
    assert [r["method"] for r in results] == ["CE", "fused", "unfused"]
    for r in results:
        assert len(r["curve"]) == lm.TINY["student_steps"] and all(math.isfinite(x) for x in r["curve"])
        assert math.isfinite(r["val_ce"]) and r["sec"] > 0
    assert first < 1e-5 and worst < 1e-4  # the same function: float32 rounding only
    assert abs(results[1]["val_ce"] - results[2]["val_ce"]) < 1e-3
    assert "| fused |" in out.read_text()


def test_bench_teacher_topk_runs_and_writes_both_providers(tmp_path, capsys):
    from fastkd.bench import teacher_topk as bench_teacher_topk

    out = tmp_path / "topk.csv"
    assert bench_teacher_topk.main(["--rows", "16", "--vocab", "300", "--hidden", "8", "--k", "5", "--rounds", "2",
                                    "--csv", str(out)]) == 0
    with open(out) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["provider"] for r in rows] == ["fused", "torch"] and all(float(r["median_s"]) > 0 for r in rows)
    assert "speed-up fused over torch" in capsys.readouterr().out


def test_distill_offline_quick_cache_follows_online(tmp_path):
    """examples/distill_offline.py --quick: the student trained from the int8 cache follows the one trained
    with the teacher's top-k computed online (the encoding error is all that separates the curves)."""
    for module in ("transformers", "tokenizers"):
        pytest.importorskip(module, reason=f"examples/distill_offline.py needs {module} (the examples extra)")
    offline = _load("examples/distill_offline.py", "fastkd_distill_offline")
    out = tmp_path / "offline.md"
    worst = offline.main(["--quick", "--teacher-cache", str(tmp_path / "cache"), "--out", str(out)])
    assert 0 <= worst < 1e-3
    assert "| cache |" in out.read_text() and (tmp_path / "cache" / "index-00000.json").exists()
