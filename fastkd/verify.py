"""Check every fused backend available here against fastkd.reference, then time them.

    python -m fastkd.verify [--device cpu|cuda] [--no-bench]

For each loss and each fused backend that runs it on the device, compares the
loss and the student and teacher gradients with the reference on several shapes
and dtypes (the tolerance of each dtype is in TOLERANCES), prints one line per
case and a small forward+backward timing table (fused vs eager reference).
Exits with status 1 if any comparison fails.
"""
import argparse
import sys

import torch

from . import functional as F
from . import reference
from .bench.timing import median_seconds
from .dispatch import backend as _backend

TOLERANCES = {torch.float32: (5e-5, 5e-4), torch.bfloat16: (2e-2, 3e-2)}
SHAPES = [(64, 100), (33, 1000), (4, 2, 4099)]


def _logit_case(loss, shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    t = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    target = torch.randint(0, shape[-1], shape[:-1], generator=g).to(device)
    target.view(-1)[::7] = -100  # some ignored rows
    kwargs = {
        "kd": dict(target=target),
        "ats": dict(target=target),
        "dkd": dict(target=target),
        "dist": dict(),
    }.get(loss, dict(target=target, ce_weight=0.1))  # the LM divergences: with the CE in the same pass
    positional = (target,) if loss in ("ats", "dkd") else ()
    if positional:
        kwargs = {}
    return s, t, positional, kwargs


def _loss_fn(loss, backend):
    fn, ref = getattr(F, f"{loss}_loss"), getattr(reference, f"{loss}_loss")
    return (lambda *a, **k: fn(*a, backend=backend, **k)), ref


def _value_and_grads(fn, s, t, positional, kwargs):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = fn(s, t, *positional, **kwargs)
    gs, gt = torch.autograd.grad(loss, [s, t])
    return [loss.detach().float(), gs.float(), gt.float()]


def _mgd_case(device, dtype):
    torch.manual_seed(0)
    gen = torch.nn.Sequential(
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1)
    ).to(device, dtype)
    s = torch.randn(4, 16, 7, 7, device=device, dtype=dtype)
    t = torch.randn(4, 16, 7, 7, device=device, dtype=dtype)
    return gen, s, t


def verify(device: str):
    failures = 0
    results = []
    for loss in ("kd", "ats", "dkd", "dist", "mgd", "forward_kl", "reverse_kl", "jsd", "tvd"):
        backends = [b for b in ("cpu", "cuda", "triton")
                    if _backend.unavailable_reason(b, loss, torch.device(device)) is None]
        # Triton runs interpreted on CPU tensors only for tests, never here.
        if device == "cpu":
            backends = [b for b in backends if b != "triton"]
        if not backends:
            print(f"{loss:5s}  (no fused backend on {device}: reference only)")
        for backend in backends:
            for dtype in TOLERANCES:
                atol, rtol = TOLERANCES[dtype]
                cases = []
                if loss == "mgd":
                    gen, s, t = _mgd_case(device, dtype)
                    outs = []
                    for fn in (F.mgd_loss, reference.mgd_loss):
                        g = torch.Generator().manual_seed(1)
                        x = s.detach().clone().requires_grad_()
                        kw = dict(backend=backend) if fn is F.mgd_loss else {}
                        value = fn(x, t, gen, mask_ratio=0.5, generator=g, **kw)
                        (gx,) = torch.autograd.grad(value, [x])
                        outs.append([value.detach().float(), gx.float()])
                    cases.append(("4x16x7x7", outs))
                else:
                    for i, shape in enumerate(SHAPES):
                        s, t, positional, kwargs = _logit_case(loss, shape, dtype, device, i)
                        fused, ref = _loss_fn(loss, backend)
                        cases.append((
                            "x".join(map(str, shape)),
                            [_value_and_grads(fused, s, t, positional, kwargs),
                             _value_and_grads(ref, s, t, positional, kwargs)],
                        ))
                for shape_name, (got, want) in cases:
                    worst = max(float(((a - b).abs() - atol - rtol * b.abs()).max()) for a, b in zip(got, want))
                    finite = all(bool(torch.isfinite(a).all()) for a in got)
                    ok = worst <= 0 and finite
                    failures += not ok
                    results.append((loss, backend, shape_name, str(dtype).replace("torch.", ""), ok))
                    print(f"{loss:5s} {backend:7s} {shape_name:12s} {str(dtype)[6:]:9s} "
                          f"{'PASS' if ok else 'FAIL'}  (worst excess over tolerance {worst:.2e})")
    return failures


def bench(device: str):
    shape = (1024, 8000) if device == "cpu" else (8192, 32000)
    print(f"\nforward+backward, float32 {list(shape)} on {device} (median of 5; ratios vs eager reference)")
    print(f"{'loss':6s}{'provider':12s}{'ms':>10s}{'speed-up':>10s}")
    for loss in ("kd", "ats", "dkd", "dist"):
        s, t, positional, kwargs = _logit_case(loss, shape, torch.float32, device, 0)
        providers = [("eager", "reference")] + [
            (b, b) for b in ("cpu", "cuda", "triton")
            if _backend.unavailable_reason(b, loss, torch.device(device)) is None and not (device == "cpu" and b == "triton")
        ]
        base = None
        for label, backend in providers:
            fn, _ = _loss_fn(loss, backend)

            def step():
                _value_and_grads(fn, s, t, positional, kwargs)
                if device == "cuda":
                    torch.cuda.synchronize()

            ms = median_seconds(step, 5) * 1e3
            base = base or ms
            print(f"{loss:6s}{label:12s}{ms:10.1f}{base / ms:9.1f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-bench", action="store_true")
    args = parser.parse_args(argv)
    print(f"fastkd backends on this machine (torch {torch.__version__}):")
    for name, info in _backend.backends().items():
        status = "available: " + ", ".join(info["losses"]) if info["available"] else f"unavailable: {info['reason']}"
        print(f"  {name:9s} {status}")
    print()
    failures = verify(args.device)
    # the verdict right after the comparisons it sums up, before the (informative) timings
    print(f"\n{'all fused backends match the reference' if not failures else f'{failures} comparisons FAILED'}")
    if not args.no_bench:
        bench(args.device)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
