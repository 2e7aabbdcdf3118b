"""Charts from a ``python -m fastkd.bench`` CSV.

    python benchmarks/plot.py CSV OUTDIR

Writes into OUTDIR (created if missing):

* ``<device>_time.png``: fwd+bwd median time per provider (log scale, p20-p80
  error bars), one panel per loss, one group of bars per shape/dtype.
* ``<device>_speedup.png``: fwd+bwd speed-up over eager PyTorch
  (``eager median / provider median``) of every other provider, same layout;
  bars start at 1 (eager itself, dashed line), so slower-than-eager bars point down.
* ``<device>_memory.png``: fwd+bwd peak memory over the inputs per provider.

``<device>`` is the CSV's file name without ``.csv``. Only the standard
library and matplotlib are used.
"""
import csv
import os
import sys
from collections import OrderedDict
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

PROVIDER_ORDER = ["cpu", "cuda", "triton", "liger", "compile", "eager"]


def read_rows(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _providers(rows) -> List[str]:
    seen = {r["provider"] for r in rows}
    return [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))


def _table(rows, column: str):
    """{kernel: OrderedDict{"shape dtype": {provider: (value, low, high)}}} for the fwd+bwd rows."""
    out: Dict[str, "OrderedDict[str, Dict[str, tuple]]"] = OrderedDict()
    for r in rows:
        if r["mode"] != "fwd+bwd" or r[column] in ("", None):
            continue
        group = f"{r['shape']}\n{r['dtype']}"
        value = float(r[column])
        low = float(r["p20_ms"]) if column == "median_ms" else value
        high = float(r["p80_ms"]) if column == "median_ms" else value
        out.setdefault(r["kernel"], OrderedDict()).setdefault(group, {})[r["provider"]] = (value, low, high)
    return out


def _speedup_table(rows):
    times = _table(rows, "median_ms")
    out = OrderedDict()
    for kernel, groups in times.items():
        for group, by_provider in groups.items():
            if "eager" not in by_provider:
                continue
            eager = by_provider["eager"][0]
            out.setdefault(kernel, OrderedDict())[group] = {
                p: (eager / v[0],) * 3 for p, v in by_provider.items() if p != "eager"
            }
    return out


def _label(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def bar_panels(table, providers, ylabel: str, title: str, path: str, log: bool, errors: bool, base=None,
               suffix: str = ""):
    """One panel per loss; grouped bars (shape/dtype groups x providers), each labelled with its value.

    With ``base`` (the speed-up chart: 1 = as fast as eager) bars start at ``base``
    and a dashed line marks it, so slower-than-eager bars point down.
    """
    kernels = list(table)
    if not kernels:
        return None
    fig, axes = plt.subplots(len(kernels), 1, figsize=(10, 3.2 * len(kernels)), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kernel in zip(axes[:, 0], kernels):
        groups = list(table[kernel])
        drawn = 0
        for j, provider in enumerate(providers):
            xs, ys, lo, hi = [], [], [], []
            for i, group in enumerate(groups):
                if provider in table[kernel][group]:
                    value, low, high = table[kernel][group][provider]
                    xs.append(i + (j - (len(providers) - 1) / 2) * width)
                    ys.append(value)
                    lo.append(max(value - low, 0))
                    hi.append(max(high - value, 0))
            if not xs:
                continue
            color = colors[PROVIDER_ORDER.index(provider) % len(colors)] if provider in PROVIDER_ORDER else None
            heights = [y - base for y in ys] if base is not None else ys
            drawn += 1
            bars = ax.bar(xs, heights, width, bottom=base, label=provider, color=color,
                          yerr=[lo, hi] if errors else None, capsize=2)
            ax.bar_label(bars, labels=[_label(y) + suffix for y in ys], fontsize=7, padding=2)
        if base is not None:
            ax.axhline(base, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(kernel)
        if log:
            ax.set_yscale("log")
            low, high = ax.get_ylim()
            ax.set_ylim(low, high * 3)  # room for the labels above the tallest bar
        if drawn:  # matplotlib rejects a legend with ncol=0 (a panel where no provider has data)
            ax.legend(fontsize=8, ncol=drawn, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(csv_path: str, outdir: str) -> List[str]:
    """Draw every chart for ``csv_path`` into ``outdir``; returns the files written."""
    rows = read_rows(csv_path)
    if not rows:
        raise SystemExit(f"{csv_path} has no rows")
    os.makedirs(outdir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(csv_path))[0]
    device = rows[0]["device"]
    providers = _providers(rows)
    written = []
    path = bar_panels(_table(rows, "median_ms"), providers, "fwd+bwd ms (median, p20-p80)",
                      f"fastkd: forward+backward time ({device})", os.path.join(outdir, f"{stem}_time.png"),
                      log=True, errors=True)
    written.append(path)
    peers = [p for p in providers if p != "eager"]
    path = bar_panels(_speedup_table(rows), peers, "speed-up over eager (x)",
                      f"fastkd: fwd+bwd speed-up over eager PyTorch ({device})",
                      os.path.join(outdir, f"{stem}_speedup.png"), log=True, errors=False, base=1.0, suffix="x")
    written.append(path)
    memory = _table(rows, "peak_mem_mb")
    # Log scale needs positive values; a CPU peak below one page reads as 0.
    for groups in memory.values():
        for by_provider in groups.values():
            for p, (v, _, _) in list(by_provider.items()):
                by_provider[p] = (max(v, 0.01),) * 3
    path = bar_panels(memory, providers, "peak MB over inputs", f"fastkd: fwd+bwd peak memory ({device})",
                      os.path.join(outdir, f"{stem}_memory.png"), log=True, errors=False)
    written.append(path)
    return [p for p in written if p]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    for path in plot(argv[0], argv[1]):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
