"""The benchmark's tables, speed-up ratios and CSV (``python -m fastkd.bench``)."""
import csv
import math
import os
import sys
from typing import Dict, List, Tuple

# kd_ce: kd_loss(..., target, ce_weight=0.1), KL and cross-entropy in one pass; its extra
# peers, per fused backend b, are b's KD alone ("kd_alone:b") and b's KD plus F.cross_entropy
# ("kd+ce_sep:b"), so each backend's ratio is taken against its own KD.
# kd_topk: kd_loss against a TopKTeacher of K = TOPK_K ids per row.
CE_WEIGHT = 0.1
KD_CE_PEERS = ("kd_alone", "kd+ce_sep")
PEERS = ("eager", "compile", "liger") + KD_CE_PEERS


def is_peer(provider: str) -> bool:
    """A comparison provider (not a fastkd fused backend): eager, compile, liger, kd_alone:b, kd+ce_sep:b."""
    return provider.split(":")[0] in PEERS
COLUMNS = ("kernel", "provider", "mode", "shape", "dtype", "device", "torch", "fastkd",
           "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "gbps", "pct_copy_bw")

def _fmt(x, digits=3) -> str:
    if x == "" or x is None:
        return "-"
    x = float(x)
    if math.isnan(x):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def format_table(rows: List[Dict[str, object]]) -> str:
    """One line per (kernel, shape, dtype, provider): the three medians, memory, bandwidth."""
    by_key: Dict[tuple, Dict[str, Dict[str, object]]] = {}
    for r in rows:
        by_key.setdefault((r["kernel"], r["shape"], r["dtype"], r["provider"]), {})[r["mode"]] = r
    head = f"{'kernel':<6} {'shape':<18} {'dtype':<9} {'provider':<8} {'fwd ms':>9} {'bwd ms':>9} " \
           f"{'fwd+bwd ms':>11} {'[p20, p80]':>19} {'peak MB':>8} {'GB/s':>7} {'%copy':>6}"
    lines = [head, "-" * len(head)]
    for (kernel, shape, dtype, provider), modes in by_key.items():
        f, b, fb = modes.get("fwd", {}), modes.get("bwd", {}), modes.get("fwd+bwd", {})
        spread = f"[{_fmt(fb.get('p20_ms'))}, {_fmt(fb.get('p80_ms'))}]"
        lines.append(
            f"{kernel:<6} {shape:<18} {dtype:<9} {provider:<8} {_fmt(f.get('median_ms')):>9} "
            f"{_fmt(b.get('median_ms')):>9} {_fmt(fb.get('median_ms')):>11} {spread:>19} "
            f"{_fmt(fb.get('peak_mem_mb')):>8} {_fmt(fb.get('gbps')):>7} {_fmt(fb.get('pct_copy_bw'), 2):>6}"
        )
    return "\n".join(lines)


def speedups(rows: List[Dict[str, object]]) -> List[Tuple[str, str, str, str, float, float]]:
    """(kernel, shape, dtype, fused provider, fwd+bwd speed-up vs eager, vs compile); NaN if absent."""
    times = {}
    for r in rows:
        if r["mode"] == "fwd+bwd":
            times[(r["kernel"], r["shape"], r["dtype"], r["provider"])] = float(r["median_ms"])
    out = []
    for (kernel, shape, dtype, provider), ms in times.items():
        if is_peer(provider):
            continue
        eager = times.get((kernel, shape, dtype, "eager"), float("nan"))
        comp = times.get((kernel, shape, dtype, "compile"), float("nan"))
        out.append((kernel, shape, dtype, provider, eager / ms, comp / ms))
    return out


def format_speedups(rows) -> str:
    lines = [f"{'kernel':<6} {'shape':<18} {'dtype':<9} {'fused':<7} {'vs eager':>9} {'vs compile':>11}"]
    def ratio(x: float) -> str:
        return "-" if math.isnan(x) else f"{x:.2f}x"

    for kernel, shape, dtype, provider, vs_eager, vs_compile in speedups(rows):
        lines.append(f"{kernel:<6} {shape:<18} {dtype:<9} {provider:<7} {ratio(vs_eager):>9} {ratio(vs_compile):>11}")
    ce = kd_ce_ratios(rows)
    if ce:
        lines.append("")
        lines.append(f"kd_loss(ce_weight={CE_WEIGHT}) (fused, one pass): time over the fused KD alone (target <= 1.15), "
                     "and speed-up over the fused KD + F.cross_entropy (target >= 1.8):")
        for shape, dtype, provider, over_alone, vs_separate in ce:
            lines.append(f"  {shape:<18} {dtype:<9} {provider:<7} {over_alone:.2f}x of KD alone, "
                         f"{vs_separate:.2f}x faster than separate")
    return "\n".join(lines)


def kd_ce_ratios(rows) -> List[Tuple[str, str, str, float, float]]:
    """(shape, dtype, fused provider, fused / kd_alone, kd+ce_sep / fused) of the kd_ce cases (fwd+bwd medians)."""
    times = {(r["shape"], r["dtype"], r["provider"]): float(r["median_ms"])
             for r in rows if r["kernel"] == "kd_ce" and r["mode"] == "fwd+bwd"}
    out = []
    for (shape, dtype, provider), ms in times.items():
        alone, separate = times.get((shape, dtype, f"kd_alone:{provider}")), times.get((shape, dtype, f"kd+ce_sep:{provider}"))
        if not is_peer(provider) and alone and separate:
            out.append((shape, dtype, provider, ms / alone, separate / ms))
    return out


def write_csv(rows: List[Dict[str, object]], path: str) -> None:
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------


class Progress:
    """tqdm if installed, else a one-line counter on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="case", dynamic_ncols=True)
        except ImportError:
            self._bar = None
        self.total, self.done, self.text = total, 0, ""

    def label(self, text: str) -> None:
        """Say what is being measured now."""
        self.text = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        else:
            self._draw()

    def update(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        else:
            self._draw()

    def _draw(self) -> None:
        width = 30
        filled = width * self.done // max(self.total, 1)
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self.text:<60}",
              end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)
