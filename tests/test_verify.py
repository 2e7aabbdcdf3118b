"""``python -m fastkd.verify``, the main job's check: it covers every public loss, passes on correct
backends, and fails (exit status 1, a FAIL cell) when a backend's value or gradient is off."""
import pytest
import torch

import fastkd
from fastkd import verify

SUBSET = "jsd_loss beta=0.3 T=1.5 ce_weight,forward_kl_loss TopKTeacher(tail),fused_linear_kd_loss jsd"


def test_every_public_loss_has_a_case():
    names = " ".join(c.name for c in verify.cases())
    # every public loss with kernels (simkd_loss is an MSE through the teacher's classifier in plain PyTorch,
    # one implementation: tests/test_reference.py checks it)
    public_losses = [name for name in fastkd.__all__ if name.endswith("_loss") and name != "simkd_loss"]
    assert len(public_losses) >= 13
    for loss in public_losses:  # every public loss, whenever one is added
        assert loss in names, loss
    assert "reverse" in names and "TopKTeacher(tail)" in names and "TopKTeacher(renormalize)" in names
    from fastkd.core.checks import FUSED_LINEAR_DIVERGENCES

    for divergence in FUSED_LINEAR_DIVERGENCES:
        assert f"fused_linear_kd_loss {divergence} " in names, divergence
    for label in verify.DIVERGENCES:  # with and without the cross-entropy
        assert {c.name for c in verify.cases(label)} >= {f"{label} T=1.5", f"{label} T=1.5 ce_weight=0.3"}
    assert "every row ignored" in names and "empty batch" in names


def test_verify_passes_on_every_backend_here(capsys):
    assert verify.main(["--cases", SUBSET, "--no-distributed"]) == 0
    out = capsys.readouterr().out
    assert "every check passed" in out and "FAIL" not in out
    header = next(line for line in out.splitlines() if line.startswith("case"))
    for label in ("reference", "cpu") if fastkd.backends()["cpu"]["available"] else ("reference",):
        assert label in header
    assert out.count(" ok ") >= 4


def _wrong(fn, value=1.0, grad=0.0):
    """``fn`` on the cpu backend with its loss scaled by ``value`` and ``grad`` added to the student gradient."""
    def wrapped(student, *args, backend="auto", **kwargs):
        loss = fn(student, *args, backend=backend, **kwargs)
        if backend != "cpu":
            return loss
        nudge = grad * student.float().sum()
        return loss * value + nudge - nudge.detach()  # the same value, a gradient off by ``grad`` everywhere
    return wrapped


@pytest.mark.skipif(not fastkd.backends()["cpu"]["available"], reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("value, grad", [(1.05, 0.0), (1.0, 1e-2)], ids=["value", "gradient"])
def test_verify_fails_when_a_backend_is_off(monkeypatch, capsys, value, grad):
    monkeypatch.setattr(verify.F, "jsd_loss", _wrong(fastkd.jsd_loss, value, grad))
    assert verify.main(["--cases", "jsd_loss beta=0.3 T=1.5", "--backends", "reference,cpu",
                        "--no-distributed"]) == 1
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("jsd_loss beta=0.3")]
    assert len(rows) == 4 and "checks FAILED" in out  # with and without ce_weight, float32 and bfloat16
    for cells in rows:  # ..., dtype, "ok", error (reference), "FAIL", error (cpu)
        assert cells[-4] == "ok" and cells[-2] == "FAIL", cells


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is unavailable")
def test_sharded_path_runs_in_two_processes():
    results, why = verify.run_sharded(SUBSET)
    assert why is None
    assert set(results) == {c.name for c in verify.cases(SUBSET) if c.sharded}
    for name, (err, msg) in results.items():
        assert msg is None and err <= verify.TOLERANCE[torch.float32], (name, err, msg)
