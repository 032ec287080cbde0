"""PNG plots of an evaluation summary (matplotlib, Agg backend: no display needed).

- ``accuracy.png``: accuracy against length, one line per method with its 95% interval as
  error bars, one panel per task;
- ``time.png``: seconds per sample against length, one line per method; solid: wall time in
  this process, dashed: as hosts in parallel would take it (slowest phase 1 + phase 2).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["plot_accuracy", "plot_time", "write_plots"]


def _plt():
    import matplotlib
    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _series(summary, task, method, key):
    cells = sorted((c for c in summary["cells"] if c["task"] == task and c["method"] == method),
                   key=lambda c: c["length"])
    return [c["length"] for c in cells], [c[key] for c in cells], cells


def _xaxis(ax, lengths):
    from .runner import length_label
    if len(lengths) > 1 and min(lengths) > 0 and max(lengths) / min(lengths) >= 2:
        ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([length_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("prompt length (tokens)")


def plot_accuracy(summary, path):
    """Accuracy vs length per method (95% Wilson intervals), one panel per task."""
    plt = _plt()
    tasks = summary["tasks"]
    cols = min(3, len(tasks)) or 1
    rows = math.ceil(len(tasks) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    n = len(summary["methods"])
    for ax, task in zip(axes.flat, tasks):
        for j, m in enumerate(summary["methods"]):
            xs, ys, cells = _series(summary, task, m, "accuracy")
            if not xs:
                continue
            lo = [y - c["ci"][0] for y, c in zip(ys, cells)]
            hi = [c["ci"][1] - y for y, c in zip(ys, cells)]
            shift = [x * 2 ** (0.04 * (j - (n - 1) / 2)) for x in xs]  # keep the bars apart
            ax.errorbar(shift, ys, yerr=[lo, hi], marker="o", capsize=3, label=m)
        ax.set_title(task)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        _xaxis(ax, summary["lengths"])
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("accuracy vs length (95% Wilson intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_time(summary, path):
    """Seconds per sample vs length per method, averaged over tasks."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in summary["methods"]:
        cells = [c for c in summary["cells"] if c["method"] == m]
        lengths = sorted({c["length"] for c in cells})
        wall = [_avg(c["wall_s"] for c in cells if c["length"] == n) for n in lengths]
        hosts = [_avg(c["hosts_s"] for c in cells if c["length"] == n) for n in lengths]
        line, = ax.plot(lengths, wall, marker="o", label=f"{m} (wall)")
        ax.plot(lengths, hosts, marker="x", linestyle="--", color=line.get_color(),
                label=f"{m} (hosts in parallel)")
    ax.set_ylabel("seconds per sample")
    ax.grid(alpha=0.3)
    _xaxis(ax, summary["lengths"])
    ax.legend(fontsize=7)
    ax.set_title("time per sample vs length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _avg(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def write_plots(summary, out_dir):
    """Write accuracy.png and time.png into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    os.makedirs(out, exist_ok=True)
    return [plot_accuracy(summary, out / "accuracy.png"), plot_time(summary, out / "time.png")]
