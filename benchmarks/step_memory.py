"""Peak memory of one KD training step on the CPU, over the inputs.

    python benchmarks/step_memory.py [--rows 8192] [--classes 32000] [--backend cpu]

Allocates float32 student and teacher logits [rows, classes], then measures
the growth of the process's peak resident set (VmHWM) during one training step
``(0.9 * kd_loss(s, t)).backward()`` (a loss weight != 1, so backward really
scales the stored gradient). The target is the gradient and nothing more:
inputs + one [rows, classes] gradient. Prints the peak growth in MB next to the
size of one gradient. Run each backend in its own process (the numbers are
process-wide).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastkd  # noqa: E402
from fastkd.bench.memory import PeakRSS  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--classes", type=int, default=32000)
    p.add_argument("--backend", default="cpu", help="cpu (fused) or reference (eager)")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(args.rows, args.classes, generator=g) * 3).requires_grad_()
    t = torch.randn(args.rows, args.classes, generator=g) * 3
    grad_mb = s.numel() * s.element_size() / 2**20
    with PeakRSS() as peak:
        loss = 0.9 * fastkd.kd_loss(s, t, 4.0, backend=args.backend)
        loss.backward()
    growth = max(peak.peak_kb - peak.base_kb, 0) / 1024
    print(f"KD step float32 [{args.rows}, {args.classes}] backend={args.backend}: peak growth {growth:.0f} MB "
          f"over the inputs ({2 * grad_mb:.0f} MB); one gradient is {grad_mb:.0f} MB "
          f"({growth / grad_mb:.2f} gradients)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
