"""fastkd.backends() and the backend choice of every functional."""
import warnings

import pytest
import torch

import fastkd
from fastkd.dispatch import backend as _backend


def test_report_lists_every_backend_with_a_reason_when_unavailable():
    report = fastkd.backends()
    assert set(report) == {"reference", "cpu", "cuda", "triton"}
    assert report["reference"]["available"] and report["reference"]["reason"] is None
    assert set(report["reference"]["losses"]) == {"kd", "ats", "dkd", "dist", "mgd", "forward_kl", "reverse_kl", "jsd",
                                                  "skew_kl", "tvd", "jeffreys", "triangular", "entropy_gated_kl", "kd_topk",
                                                  "alpha_divergence", "ab_divergence", "renyi",
                                                  "fused_linear_kd", "akl", "fused_linear_akl",
                                                  "teacher_topk"}
    for name, info in report.items():
        if info["available"]:
            assert info["reason"] is None
        else:
            assert isinstance(info["reason"], str) and info["reason"]
            assert info["losses"] == []


def test_cuda_backend_says_why_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    reason = fastkd.backends()["cuda"]["reason"]
    assert "CUDA" in reason


def test_unknown_backend_is_rejected_with_the_choices():
    s = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastkd.kd_loss(s, s, backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastkd.kd_loss(s, s, backend=None)


@pytest.mark.parametrize("loss", ["kd", "ats", "dkd", "dist", "mgd"])
def test_auto_uses_the_compiled_cpu_kernel_when_it_exists(loss):
    reason = _backend.unavailable_reason("cpu", loss, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning when the kernel exists
        chosen = _backend.resolve(loss, "auto", torch.randn(2, 3)) if reason is None else None
    if reason is None:
        assert chosen == "cpu"
    else:
        pytest.skip(reason)


def test_auto_warns_once_when_it_falls_back(monkeypatch):
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, loss=None, device=None: "broken build")
    monkeypatch.setattr(_backend, "_warned", set())
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match="broken build"):
        assert _backend.resolve("kd", "auto", x) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend.resolve("kd", "auto", x) == "reference"  # warned once only


def test_explicit_backend_that_cannot_run_raises_with_the_reason(monkeypatch):
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, loss=None, device=None: "no kernel here")
    with pytest.raises(ValueError, match="backend 'cpu' is unavailable for kd: no kernel here"):
        _backend.resolve("kd", "cpu", torch.randn(2, 3))


def test_messages_name_the_call_not_the_internal_key(monkeypatch):
    """LOSS_OPS keys like "kd+ce" or "kd_topk" are what dispatch needs, not what the user called."""
    monkeypatch.setattr(_backend, "unavailable_reason", lambda name, loss=None, device=None: "no kernel here")
    x = torch.randn(2, 3)
    for key, call in (("kd+ce", "kd_loss with ce_weight / return_parts"), ("kd_topk", "kd_loss with a TopKTeacher"),
                      ("dkd+ce", "dkd_loss with ce_weight / return_parts"), ("fused_linear_kd", "fused_linear_kd_loss")):
        with pytest.raises(ValueError) as err:
            _backend.resolve(key, "cpu", x)
        assert f"unavailable for {call}: no kernel here" in str(err.value), str(err.value)
    for key in _backend.LOSS_OPS:
        if key != "teacher_topk":  # a public function's own name
            assert "+" not in _backend.describe(key) and "_topk" not in _backend.describe(key), key


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("with a GPU, triton is available regardless")
    reason = _backend.unavailable_reason("triton", "kd", torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET" in reason


def test_triton_backend_reports_the_torch_it_needs(monkeypatch):
    # torch < 2.6 has no torch.library.triton_op: the backend says so instead of failing to import
    monkeypatch.delattr(torch.library, "triton_op")
    monkeypatch.setattr(_backend, "_triton_module", None)
    monkeypatch.setattr(_backend, "_triton_error", None)
    reason = _backend.unavailable_reason("triton", "kd")
    assert reason is not None and "torch >= 2.6" in reason and torch.__version__ in reason
    assert fastkd.backends()["triton"]["available"] is False


def test_auto_has_a_cuda_choice_for_every_loss():
    assert set(_backend.AUTO_CUDA_ORDER) == set(_backend.LOSS_OPS)
    for loss, order in _backend.AUTO_CUDA_ORDER.items():
        assert set(order) == {"cuda", "triton"}, loss


def test_import_fastkd_makes_fastkd_nn_usable():
    import subprocess
    import sys

    # a fresh interpreter: in this one another test may already have imported fastkd.nn
    code = "import fastkd; fastkd.nn.KDLoss(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
