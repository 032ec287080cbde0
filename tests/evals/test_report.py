"""Statistics and the Markdown report of starshard.evals.report, on synthetic records."""
import math

import pytest

from starshard.evals.report import (fmt_ci, markdown_report, paired_bootstrap_ratio, summarize,
                                    wilson_interval)


def test_wilson_known_values():
    lo, hi = wilson_interval(0, 5)
    assert lo == 0.0 and hi == pytest.approx(0.4345, abs=1e-4)
    lo, hi = wilson_interval(5, 5)
    assert lo == pytest.approx(0.5655, abs=1e-4) and hi == 1.0
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_wilson_contains_the_estimate():
    for k in range(0, 8):
        lo, hi = wilson_interval(k, 7)
        assert 0 <= lo <= k / 7 <= hi <= 1


def test_bootstrap_identical_methods_give_one():
    a = [1, 0, 1, 1, 0, 1]
    assert paired_bootstrap_ratio([(a, a)], 500, seed=1) == (1.0, 1.0, 1.0)


def test_bootstrap_is_seeded_and_brackets_the_ratio():
    a = [1, 1, 0, 1, 0, 1, 1, 0]
    b = [1, 1, 1, 1, 0, 1, 1, 1]
    r1 = paired_bootstrap_ratio([(a, b)], 2000, seed=3)
    r2 = paired_bootstrap_ratio([(a, b)], 2000, seed=3)
    assert r1 == r2
    ratio, lo, hi = r1
    assert ratio == pytest.approx(5 / 7)
    assert lo <= ratio <= hi and lo < hi <= 1.0   # a never beats b on a sample: share <= 1


def test_bootstrap_pools_cells():
    cells = [([1, 1], [1, 1]), ([0, 1, 1, 1], [1, 1, 1, 1])]
    ratio, lo, hi = paired_bootstrap_ratio(cells, 300, seed=0)
    assert ratio == pytest.approx(5 / 6)
    assert lo <= ratio <= hi


def test_bootstrap_undefined_and_bad_input():
    assert all(math.isnan(x) for x in paired_bootstrap_ratio([([1, 0], [0, 0])]))
    assert all(math.isnan(x) for x in paired_bootstrap_ratio([]))
    with pytest.raises(ValueError, match="as many"):
        paired_bootstrap_ratio([([1, 0], [1])])


def _rec(task, length, method, sample, score, wall=1.0):
    return dict(task=task, length=length, method=method, sample=sample, score=float(score),
                timings=dict(wall_s=wall, hosts_s=wall / 2))


def _records():
    recs = []
    dense = {("passkey", 2048): [1, 1, 1, 0], ("passkey", 4096): [1, 0, 0, 0]}
    star = {("passkey", 2048): [1, 1, 0, 0], ("passkey", 4096): [1, 1, 0, 0]}
    for (task, n), scores in dense.items():
        for i, s in enumerate(scores):
            recs.append(_rec(task, n, "dense", i, s))
            recs.append(_rec(task, n, "star", i, star[(task, n)][i], wall=2.0))
    return recs


def test_summarize_cells_and_overall():
    s = summarize(_records(), methods=["dense", "star"], n_boot=400)
    assert s["methods"] == ["dense", "star"] and s["lengths"] == [2048, 4096]
    cell = {(c["length"], c["method"]): c for c in s["cells"]}
    assert cell[(2048, "dense")]["accuracy"] == 0.75
    assert cell[(2048, "star")]["accuracy"] == 0.5
    assert cell[(2048, "star")]["share"] == pytest.approx(0.5 / 0.75)
    assert cell[(4096, "star")]["share"] == pytest.approx(2.0)
    assert cell[(2048, "dense")]["share"] is None
    assert cell[(2048, "star")]["wall_s"] == 2.0 and cell[(2048, "star")]["hosts_s"] == 1.0
    over = {o["method"]: o for o in s["overall"]}
    # only the 2k cell has dense >= 50%: the overall share is that cell's
    assert over["star"]["share_cells"] == 1
    assert over["star"]["share"] == pytest.approx(2 / 3)
    assert over["star"]["accuracy"] == 0.5 and over["star"]["n"] == 8


def test_markdown_report_rows():
    s = summarize(_records(), methods=["dense", "star"], n_boot=200)
    md = markdown_report(s, notes=["a note"])
    assert "- a note" in md
    assert "| passkey | 2k | dense | 4 | 0.75 [" in md
    assert "| passkey | 4k | star | 4 | 0.50 [" in md and "| 2.00 [" in md
    assert "| star | 8 | 0.50 [" in md
    assert md.count("(baseline)") == 3  # two dense cells, dense overall


def test_no_eligible_cell_is_said():
    recs = [_rec("passkey", 1024, m, i, 0) for m in ("dense", "star") for i in range(3)]
    md = markdown_report(summarize(recs, methods=["dense", "star"], n_boot=100))
    assert "no cell with dense >= 50%" in md


def test_fmt_ci():
    assert fmt_ci(0.5, (0.25, 0.75)) == "0.50 [0.25, 0.75]"
    assert fmt_ci(float("nan"), (0, 1)) == "-"
    assert fmt_ci(None, None) == "-"
    assert fmt_ci(1.0, (float("nan"), float("nan"))) == "1.00"
