"""The multi-process Star benchmark end to end on the CPU (gloo, a tiny fp32 model): its records
have the per-host timings, star's blocks per host, and ring's check against dense."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_star_multi  # noqa: E402


def test_bench_star_multi_runs_on_gloo(tmp_path):
    out = tmp_path / "multi.json"
    res = bench_star_multi.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--hosts", "2",
                                 "--n", "300", "--anchor-modes", "once", "--new-tokens", "3",
                                 "--warmup-n", "64", "--out", str(out)])
    assert json.loads(out.read_text())["records"] == json.loads(json.dumps(res["records"]))
    recs = {(r["method"], r["blocks_per_host"]): r for r in res["records"]}
    assert not [r for r in res["records"] if "error" in r]
    assert set(recs) == {("dense", 1), ("star", 1), ("star", 2), ("ring", 1)}
    assert recs[("dense", 1)]["hosts"] == 1 and recs[("ring", 1)]["hosts"] == 2
    assert recs[("star", 1)]["block_size"] == 150 and recs[("star", 2)]["block_size"] == 75
    for r in res["records"]:
        assert len(r["phase1_per_host_s"]) == r["hosts"]
        assert r["ttft_s"] >= r["phase1_parallel_s"] > 0 and r["new_tokens"] == 3
    check = recs[("ring", 1)]["ring_vs_dense"]
    assert check["same_tokens"] and check["max_abs_logit_diff"] <= 1e-5 * max(1.0, check["max_abs_dense_logit"])
    assert recs[("ring", 1)]["tokens"] == recs[("dense", 1)]["tokens"]
    # the rounding yardstick: dense against transformers' SDPA on the same tokens (fp32 here)
    yard = recs[("dense", 1)]["sdpa_vs_dense"]
    assert yard["same_argmax"] and yard["max_abs_logit_diff"] <= 1e-4 * max(1.0, yard["max_abs_dense_logit"])
    text = bench_star_multi.table(res["records"])
    assert "efficiency" in text and "x ring" in text and "x dense's" in text and "dense vs SDPA" in text
