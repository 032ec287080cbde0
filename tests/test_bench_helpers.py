"""CPU checks of the benchmark's pure helpers: FlexAttention block tables, FLOP counts, arguments."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_sparse_attn as bench  # noqa: E402
import _common  # noqa: E402
import starshard  # noqa: E402


def _dense(counts, indices, num_cols):
    """Bool [..., rows, num_cols] from (counts [..., rows], indices [..., rows, width])."""
    width = indices.shape[-1]
    valid = torch.arange(width).view(*([1] * counts.dim()), -1) < counts.unsqueeze(-1)
    out = torch.zeros(*counts.shape, num_cols + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(valid, indices.long(), num_cols), True)
    return out[..., :num_cols]


def _layouts():
    gen = torch.Generator().manual_seed(3)
    random = torch.rand(3, 12, 12, generator=gen) < 0.4
    random[1] = False  # a head with no block at all
    return [
        ("local_stride", starshard.local_stride(4, 16, 2, 4), 16 * 9 + 5),
        ("gqa_homo_dense", starshard.local_stride(8, 32, 1, 3, num_kv_heads=2, homo_head=True,
                                                  num_dense_heads=1), 32 * 7),
        ("no_local", starshard.local_stride(4, 16, 0, 4, head_offset=1), 16 * 8 + 1),
        ("from_mask", starshard.BlockLayout.from_mask(random, 16), 16 * 12 - 3),
        ("bench_dense", bench.make_layout("dense_bs128", 4), 128 * 3 + 7),
        ("bench_bs16", bench.make_layout("bs16_l64_s16", 2), 16 * 80),
    ]


@pytest.mark.parametrize("name,layout,n", _layouts(), ids=[c[0] for c in _layouts()])
def test_flex_tables_reproduce_layout_mask(name, layout, n):
    nb = -(-n // layout.block_size)
    hq = layout.num_heads or 1
    part_cnt, part_idx, full_cnt, full_idx = bench.flex_block_tables(layout, n)
    for t in (part_cnt, part_idx, full_cnt, full_idx):
        assert t.dtype == torch.int32 and t.is_contiguous()
    assert part_cnt.shape == full_cnt.shape == (1, hq, nb)
    assert part_idx.shape == full_idx.shape == (1, hq, nb, nb)

    partial = _dense(part_cnt, part_idx, nb)[0]
    full = _dense(full_cnt, full_idx, nb)[0]
    rows = torch.arange(nb).view(-1, 1)
    cols = torch.arange(nb).view(1, -1)
    expected = layout.mask(nb, nb) & (cols <= rows)
    assert not (partial & full).any()
    assert torch.equal(partial | full, expected)
    assert not (partial & (cols != rows)).any(), "only the diagonal block needs the causal mask_mod"
    assert not (full & (cols >= rows)).any(), "full blocks lie strictly below the diagonal"
    # counts are exact (no entry counted twice)
    assert torch.equal(part_cnt[0] + full_cnt[0], expected.sum(-1).to(torch.int32))


@pytest.mark.parametrize("name,layout,n", _layouts()[:4], ids=[c[0] for c in _layouts()[:4]])
def test_flex_block_mask_matches_layout(name, layout, n):
    pytest.importorskip("torch.nn.attention.flex_attention")
    bm = bench.flex_block_mask(layout, n)
    nb = -(-n // layout.block_size)
    expected = layout.mask(nb, nb) & torch.ones(nb, nb, dtype=torch.bool).tril()
    assert tuple(bm.seq_lengths) == (n, n)
    assert torch.equal(bm.to_dense()[0].bool(), expected)
    # the transposed (per key block) tables FlexAttention's backward reads
    q_dense = _dense(bm.q_num_blocks, bm.q_indices, nb) | _dense(bm.full_q_num_blocks, bm.full_q_indices, nb)
    assert torch.equal(q_dense[0].transpose(-1, -2), expected)


def test_bench_layouts():
    assert set(bench.LAYOUTS) == {"bs128_l8_s16", "bs64_l16_s16", "bs32_l32_s16", "bs16_l64_s16",
                                  "bs64_l16_s64", "bs128_l8_s64", "dense_bs128"}
    assert bench.make_layout("dense_bs128", 32).density(1000) == 1.0
    sparse = bench.make_layout("bs64_l16_s64", 32)
    assert sparse.block_size == 64 and sparse.density(8192) < 0.5


def test_parse_sizes():
    assert _common.parse_sizes("8k, 32k,131072") == [8192, 32768, 131072]
    assert _common.size_label(131072) == "128k" and _common.size_label(1000) == "1000"
    for bad in ("", "x", "0", "-1k"):
        with pytest.raises(ValueError):
            _common.parse_sizes(bad)


def test_flop_counts():
    assert bench.dense_causal_pairs(2, 3) == 12
    assert bench.tflops(10**12, 128, "fwd", 1000.0) == pytest.approx(4 * 128)
    assert bench.tflops(10**12, 128, "fwdbwd", 1000.0) == pytest.approx(3.5 * 4 * 128)
    assert bench.tflops(10, 128, "fwd", None) is None


def test_parse_args():
    args = bench.parse_args([])
    assert args.sizes == [8192, 32768, 131072]
    assert args.layout_names == list(bench.LAYOUTS)
    assert args.mode_names == ["fwd", "fwdbwd"]
    assert args.out.endswith("benchmarks/results/bench_sparse_attn.json")
    quick = bench.parse_args(["--quick", "--modes", "fwd"])
    assert quick.sizes == [2048] and quick.mode_names == ["fwd"] and quick.out.endswith("_quick.json")
    assert bench.parse_args(["--quick", "--n", "1k,512"]).sizes == [512, 1024]
    for bad in (["--layouts", "nope"], ["--modes", "bwd"], ["--n", "8q"], ["--variants", ""]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_list_runs_on_cpu(capsys):
    assert bench.main(["--list", "--n", "1k", "--layouts", "bs64_l16_s16,dense_bs128", "--heads", "4"]) == 0
    out = capsys.readouterr().out
    assert "| dense_bs128 | 1k |" in out and "1.0000" in out


def test_summary_table_from_records():
    def rec(variant, layout, time_ms, **kw):
        return {"variant": variant, "layout": layout, "n": 8192, "mode": "fwd", "status": "ok",
                "time_ms": time_ms, "tflops": 1.0, "peak_mib": 10.0, "density": 0.25, "error": None, **kw}
    records = [rec("sdpa", "dense_causal", 4.0), rec("starshard", "bs64_l16_s16", 1.0),
               {**rec("flex", "bs64_l16_s16", None), "status": "error", "error": "compile failed"}]
    bench.add_speedups(records)
    assert records[1]["speedup_vs_sdpa"] == pytest.approx(4.0)
    assert records[2]["speedup_vs_sdpa"] is None
    table = bench.summary_table({"gpu": "test", "records": records,
                                 "config": {"heads": 32, "head_dim": 128, "dtype": "bf16"}})
    row = [line for line in table.splitlines() if line.startswith("| bs64_l16_s16")]
    assert len(row) == 1 and "ERROR" in row[0] and "4.00" in row[0]


def test_merge_keeps_other_cases_and_replaces_redone_ones():
    def rec(variant, n, t):
        return {"variant": variant, "layout": "bs64_l16_s16", "n": n, "mode": "fwd", "time_ms": t}
    old = {"date": "d0", "records": [rec("starshard", 8192, 1.0), rec("starshard", 32768, 5.0)],
           "checks": [{"layout": "bs64_l16_s16", "n": 8192}]}
    new = {"date": "d1", "records": [rec("starshard", 32768, 4.0)], "checks": []}
    merged = bench.merge_payload(new, old)
    times = sorted((r["n"], r["time_ms"]) for r in merged["records"])
    assert times == [(8192, 1.0), (32768, 4.0)]
    assert merged["checks"] == old["checks"] and merged["merged_runs"] == ["d0", "d1"]
    assert bench.merge_payload(new, None) is new


def test_opcount_model_limits():
    """The operation-count model: one block or one host is dense; streaming the anchor never
    costs more than recomputing it on fast links; ring's hosts share the causal work evenly."""
    import opcount as oc
    n = 1 << 17
    dense = oc.phase1_per_host("dense", n, 1)[0]
    assert oc.phase1_per_host("star", n, 1, block=n) == [dense]
    ring1 = oc.phase1_per_host("ring", n, 1)[0]
    assert abs(ring1 - dense) < 1e-9 * dense
    once = oc.phase1_per_host("star", n, 4, anchor_mode="once")
    stream = oc.phase1_per_host("star", n, 4, anchor_mode="stream")
    assert once[0] == stream[0] and all(s < o for s, o in zip(stream[1:], once[1:]))
    ring = oc.phase1_per_host("ring", n, 4)
    assert len(set(ring)) == 1 and ring[0] > dense / 4
    # 4 blocks, anchor = block: the last host encodes its block behind a recomputed anchor
    b = n // 4
    want = oc._cost(oc.LLAMA3_8B, oc.Rates(), 2 * b, 2 * oc.causal_pairs(b) + b * b)
    assert abs(once[3] - want) < 1e-9 * want
    assert oc.decode_step("star", n, 4) < oc.decode_step("dense", n, 1)


def test_bench_model_load_rejects_zero_runs(capsys):
    import bench_model_load
    with pytest.raises(SystemExit):
        bench_model_load.main(["--runs", "0"])
    assert "--runs must be at least 1" in capsys.readouterr().err


def test_bench_decode_step_runs_on_the_cpu(tmp_path):
    """The decode-step benchmark's script end to end on tiny CPU shapes (the torch backend, so
    this checks the script, not the kernels): every variant timed; and its --host-only mode
    (Triton backend, launches stubbed)."""
    import json
    import os
    import subprocess
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode_step.py"
    env = dict(os.environ, TRITON_INTERPRET="1")
    small = ["--n", "300", "--steps", "3", "--heads", "4", "--kv-heads", "2", "--head-dim", "32"]
    out = tmp_path / "steps.json"
    subprocess.run([sys.executable, str(script), "--device", "cpu", "--layouts", "bs64_l16_s16",
                    *small, "--out", str(out)], check=True, env=env, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["per-length", "shared", "cached", "unpacked", "packed",
                                            "sdpa"]
    assert all(r["ms_per_step"] > 0 for r in rows)
    assert all(r["max_abs_err_last_step"] < 1e-4 for r in rows[:-1])
    out = tmp_path / "host.json"
    subprocess.run([sys.executable, str(script), "--host-only", *small, "--out", str(out)],
                   check=True, env=env, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["call"] for r in rows] == ["inference (direct)", "q requires grad (custom op)"]
    assert all(r["us_per_call"] > 0 for r in rows)


def test_bench_decode_kvcache_runs_on_the_cpu(tmp_path):
    """The KV-cache decode benchmark end to end on tiny CPU shapes (the torch backend: this
    checks the script) for every cache kind, and its --host-only mode (Triton backend, append
    and attention launches stubbed)."""
    import json
    import os
    import subprocess
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode_kvcache.py"
    env = dict(os.environ, TRITON_INTERPRET="1")
    small = ["--n", "512", "--batch", "2", "--steps", "4", "--heads", "4", "--kv-heads", "2",
             "--head-dim", "32", "--layouts", "bs64_l16_s16"]
    out = tmp_path / "kv.json"
    subprocess.run([sys.executable, str(script), "--device", "cpu", *small, "--out", str(out)],
                   check=True, env=env, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["kvcache eager", "kvcache paged16 eager",
                                            "kvcache head-sharded eager"]
    assert all(r["ms_per_step"] > 0 and r["max_abs_err_last_step"] < 1e-4 for r in rows)
    out = tmp_path / "host.json"
    subprocess.run([sys.executable, str(script), "--host-only", "--repeat", "2", *small,
                    "--out", str(out)], check=True, env=env, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["kvcache host", "kvcache paged16 host",
                                            "kvcache head-sharded host"]
    assert all(r["us_per_call"] > 0 for r in rows)
