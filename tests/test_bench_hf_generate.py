"""The transformers generation benchmark end to end on the CPU (a tiny fp32 Llama): every
variant gives a record, S2Cache's tokens equal S2's over transformers' cache, and its cache
holds fewer bytes than a full one."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_hf_generate  # noqa: E402


def test_bench_hf_generate_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gen.json"
    res = bench_hf_generate.main([
        "--device", "cpu", "--n", "300", "--new", "4", "--layers", "3", "--hidden", "64",
        "--heads", "4", "--kv-heads", "2", "--vocab", "300", "--layout-block", "16",
        "--local-blocks", "2", "--vert-stride", "4", "--dense-every", "3", "--repeat", "1",
        "--out", str(out)])
    rows = {r["variant"]: r for r in res["rows"]}
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(res["rows"]))
    assert set(rows) == {"dense", "s2", "s2 + S2Cache"}
    for r in rows.values():
        assert "error" not in r, r
        assert r["n"] == 300 and r["new"] == 4 and len(r["tokens"][0]) == 4
        assert r["first_token_s"] > 0 and r["total_s"] > 0
    cached = rows["s2 + S2Cache"]
    assert cached["same_tokens_as_s2"] and cached["tokens"] == rows["s2"]["tokens"]
    assert 0 < cached["cache_bytes"] < cached["dense_cache_bytes"]
