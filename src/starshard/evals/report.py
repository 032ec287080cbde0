"""Statistics and the Markdown report of an evaluation.

- Accuracy per (task, length, method): the mean score, with a 95% Wilson interval (for the
  0/1 scores of the retrieval tasks this is the usual binomial interval; a fractional score
  counts as that fraction of a success).
- A method's accuracy as a share of dense: mean(method) / mean(dense) over the same samples,
  with a 95% paired bootstrap interval (samples resampled with replacement, the same draw for
  both methods); overall, pooled over the cells (task x length) where dense scores >= 50%,
  resampling within each cell.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

__all__ = ["wilson_interval", "paired_bootstrap_ratio", "summarize", "markdown_report", "fmt_ci"]

Z95 = 1.959963984540054


def wilson_interval(successes, n, z=Z95):
    """The Wilson score interval (lo, hi) of ``successes`` out of ``n`` (floats allowed)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)   # exact ends (no rounding dust)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return (lo, hi)


def paired_bootstrap_ratio(cells, n_boot=2000, seed=0, level=0.95):
    """sum(a) / sum(b) over ``cells`` (a list of (a_scores, b_scores) pairs of equal-length
    arrays, paired by sample) with a percentile bootstrap interval: each resample draws the
    samples of every cell with replacement, the same draw for a and b.

    Returns (ratio, lo, hi); nan where b sums to 0 (the share is undefined). Resamples whose
    b sums to 0 are left out of the interval."""
    cells = [(np.asarray(a, float), np.asarray(b, float)) for a, b in cells]
    if any(len(a) != len(b) for a, b in cells):
        raise ValueError("paired_bootstrap_ratio: each cell needs as many a as b scores")
    cells = [(a, b) for a, b in cells if len(a)]
    if not cells:
        return (math.nan, math.nan, math.nan)
    den = sum(b.sum() for _, b in cells)
    if den == 0:
        return (math.nan, math.nan, math.nan)
    ratio = sum(a.sum() for a, _ in cells) / den
    rng = np.random.default_rng(seed)
    num_s = np.zeros(n_boot)
    den_s = np.zeros(n_boot)
    for a, b in cells:
        idx = rng.integers(0, len(a), size=(n_boot, len(a)))
        num_s += a[idx].sum(1)
        den_s += b[idx].sum(1)
    ok = den_s > 0
    if not ok.any():
        return (float(ratio), math.nan, math.nan)
    r = num_s[ok] / den_s[ok]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(r, [tail, 100 - tail])
    return (float(ratio), float(lo), float(hi))


def _ordered(values, order):
    seen = list(dict.fromkeys(values))
    rank = {v: i for i, v in enumerate(order or [])}
    return sorted(seen, key=lambda v: (rank.get(v, len(rank)), seen.index(v)))


def summarize(records, *, methods=None, baseline="dense", n_boot=2000, seed=0, threshold=0.5):
    """Cells and overall figures from JSONL records (see :mod:`starshard.evals.runner`).

    Returns a dict: ``cells`` (one per task, length, method: n, accuracy, ci, share, share_ci,
    mean times), ``overall`` (one per method: accuracy pooled, share of the baseline over the
    cells where the baseline scores >= ``threshold``, with its interval, and how many cells
    that is), and the ``methods``, ``tasks``, ``lengths`` in order."""
    by = defaultdict(dict)            # (task, length, method) -> {sample: record}
    for r in records:
        by[(r["task"], r["length"], r["method"])][r["sample"]] = r
    methods = _ordered([r["method"] for r in records], methods)
    tasks = _ordered([r["task"] for r in records], None)
    lengths = sorted({r["length"] for r in records})
    cells = []
    for task in tasks:
        for length in lengths:
            base = by.get((task, length, baseline), {})
            for m in methods:
                rows = by.get((task, length, m))
                if not rows:
                    continue
                scores = [rows[i]["score"] for i in sorted(rows)]
                n = len(scores)
                acc = sum(scores) / n
                cell = dict(task=task, length=length, method=m, n=n, accuracy=acc,
                            ci=wilson_interval(sum(scores), n),
                            wall_s=_mean(rows[i]["timings"]["wall_s"] for i in rows),
                            hosts_s=_mean(rows[i]["timings"]["hosts_s"] for i in rows),
                            share=None, share_ci=None, baseline_accuracy=None)
                paired = sorted(set(rows) & set(base))
                if m != baseline and paired:
                    a = [rows[i]["score"] for i in paired]
                    b = [base[i]["score"] for i in paired]
                    ratio, lo, hi = paired_bootstrap_ratio([(a, b)], n_boot, seed)
                    cell.update(share=ratio, share_ci=(lo, hi), baseline_accuracy=sum(b) / len(b))
                cells.append(cell)
    overall = []
    for m in methods:
        mine = [c for c in cells if c["method"] == m]
        n = sum(c["n"] for c in mine)
        tot = sum(c["accuracy"] * c["n"] for c in mine)
        o = dict(method=m, n=n, accuracy=tot / n if n else math.nan, ci=wilson_interval(tot, n),
                 share=None, share_ci=None, share_cells=0)
        if m != baseline:
            pairs = []
            for c in mine:
                if c["baseline_accuracy"] is not None and c["baseline_accuracy"] >= threshold:
                    rows, base = by[(c["task"], c["length"], m)], by[(c["task"], c["length"], baseline)]
                    paired = sorted(set(rows) & set(base))
                    pairs.append(([rows[i]["score"] for i in paired], [base[i]["score"] for i in paired]))
            if pairs:
                ratio, lo, hi = paired_bootstrap_ratio(pairs, n_boot, seed)
                o.update(share=ratio, share_ci=(lo, hi), share_cells=len(pairs))
        overall.append(o)
    return dict(cells=cells, overall=overall, methods=methods, tasks=tasks, lengths=lengths,
                baseline=baseline, threshold=threshold, n_boot=n_boot)


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def fmt_ci(x, ci, digits=2):
    """'0.80 [0.38, 0.96]', or '-' when undefined."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    lo, hi = ci if ci else (math.nan, math.nan)
    if lo is None or math.isnan(lo):
        return f"{x:.{digits}f}"
    return f"{x:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown_report(summary, *, title="starshard evaluation", notes=()):
    """The report as Markdown: the per-cell table, then the overall table."""
    from .runner import length_label
    base, thr = summary["baseline"], summary["threshold"]
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    lines += [f"Accuracy: mean score, 95% Wilson interval. Share of {base}: accuracy / {base}'s on the "
              f"same samples, 95% paired bootstrap interval ({summary['n_boot']} resamples). Time: "
              "seconds per sample in this process (wall) and as hosts in parallel would take it "
              "(slowest host's phase 1 + phase 2).", "",
              f"| task | length | method | n | accuracy [95% CI] | share of {base} [95% CI] | "
              "wall s | hosts s |",
              "| --- | --- | --- | ---: | --- | --- | ---: | ---: |"]
    for c in summary["cells"]:
        share = fmt_ci(c["share"], c["share_ci"]) if c["method"] != base else "(baseline)"
        lines.append(f"| {c['task']} | {length_label(c['length'])} | {c['method']} | {c['n']} | "
                     f"{fmt_ci(c['accuracy'], c['ci'])} | {share} | {c['wall_s']:.2f} | "
                     f"{c['hosts_s']:.2f} |")
    lines += ["", f"Overall (share of {base}: pooled over the cells where {base} scores >= "
              f"{thr:.0%}; the bootstrap resamples within each cell):", "",
              f"| method | n | accuracy [95% CI] | share of {base} [95% CI] | cells |",
              "| --- | ---: | --- | --- | ---: |"]
    for o in summary["overall"]:
        if o["method"] == base:
            share, cells = "(baseline)", "-"
        elif o["share_cells"] == 0:
            share, cells = f"- (no cell with {base} >= {thr:.0%})", "0"
        else:
            share, cells = fmt_ci(o["share"], o["share_ci"]), str(o["share_cells"])
        lines.append(f"| {o['method']} | {o['n']} | {fmt_ci(o['accuracy'], o['ci'])} | {share} | {cells} |")
    return "\n".join(lines) + "\n"
