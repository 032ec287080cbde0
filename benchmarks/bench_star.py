"""Star / Ring / dense inference timings on one GPU, hosts simulated (GPU benchmark).

A Llama-3-8B-shaped model (random weights, bf16) over a random context; hosts are simulated one
after another on the one GPU (``StarEngine(simulate=hosts)``), so the phase-1 time reported
for the parallel case is the slowest host's, beside the real sequential sum. Ring's phase 1 in
simulate mode is one exact causal pass over the whole context, reported divided by the hosts
(an ideal ring); the real ring runs on several GPUs (issue 5). Time to first token = phase 1
(parallel) + the query's step; decode tokens/s over the generated tokens after the first.

    PYTHONPATH=src python benchmarks/bench_star.py --n 32k,128k --hosts 4
    PYTHONPATH=src python benchmarks/bench_star.py --layers 2 --n 4k   # smoke run

Results: benchmarks/results/bench_star.json (GPU, versions, date) and a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_sizes  # noqa: E402

from starshard.star import StarEngine  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=262144,
                 rope_theta=500000.0)


TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=262144)


def build_model(layers, device, tiny=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = TINY if tiny else LLAMA3_8B
    cfg = LlamaConfig(**dict(shape, num_hidden_layers=layers or shape["num_hidden_layers"]))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def run_case(model, n, method, hosts, anchor_mode, query_len, new_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, model.config.vocab_size, (n,), generator=g)
    q = torch.randint(0, model.config.vocab_size, (query_len,), generator=g)
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    eng = StarEngine(model, method=method, simulate=hosts if method != "dense" else None,
                     anchor_mode=anchor_mode)
    eng.encode(ctx)
    res = eng.generate(q, new_tokens)
    p1 = res.timings["phase1_s"]
    rec = dict(n=n, method=method, hosts=hosts if method != "dense" else 1, anchor_mode=anchor_mode,
               block_size=eng.plan.pieces[0][0].size if eng.plan.pieces[0] else None,
               phase1_per_host_s={str(k): v for k, v in p1.items()},
               phase1_parallel_s=max(p1.values()), phase1_sequential_s=sum(p1.values()),
               query_step_s=res.timings["first_token_s"],
               ttft_s=max(p1.values()) + res.timings["first_token_s"],
               decode_tokens_per_s=res.timings["decode_tokens_per_s"],
               new_tokens=len(res.tokens),
               peak_mem_gib=((torch.cuda.max_memory_allocated() - base) / 2**30) if cuda else None)
    if method == "ring":
        rec["note"] = "simulated: one exact pass over the context, divided by the hosts"
    del eng
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="32k,128k")
    ap.add_argument("--methods", default="dense,star,ring")
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--anchor-modes", default="once,stream")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers for a smoke run (default 32)")
    ap.add_argument("--query-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model (a smoke run, e.g. on the CPU)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_star.json"))
    a = ap.parse_args()
    import transformers
    import triton
    model = build_model(a.layers, a.device, a.tiny)
    # compile the kernels and warm the allocator before anything is timed
    for method in a.methods.split(","):
        for mode in (a.anchor_modes.split(",") if method == "star" else ["once"]):
            run_case(model, parse_sizes(a.n)[0], method, a.hosts, mode, a.query_len, 2, a.seed)
    records = []
    for n in parse_sizes(a.n):
        for method in a.methods.split(","):
            modes = a.anchor_modes.split(",") if method == "star" else ["once"]
            for mode in modes:
                try:
                    rec = run_case(model, n, method, a.hosts, mode, a.query_len, a.new_tokens, a.seed)
                except torch.cuda.OutOfMemoryError as e:
                    rec = dict(n=n, method=method, anchor_mode=mode, error=f"OOM: {str(e)[:200]}")
                records.append(rec)
                print(json.dumps(rec), flush=True)
    out = dict(benchmark="bench_star", gpu=torch.cuda.get_device_name() if a.device != "cpu" else "cpu", torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__,
               date=datetime.date.today().isoformat(), model="tiny" if a.tiny else "Llama-3-8B shape, random bf16",
               layers=a.layers or 32, records=records)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    dense = {r["n"]: r for r in records if r.get("method") == "dense" and "error" not in r}
    print("\n| N | method | anchor | phase 1 parallel s | sequential s | TTFT s | x dense prefill | decode tok/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if "error" in r:
            print(f"| {r['n']} | {r['method']} | {r.get('anchor_mode')} | {r['error'][:40]} |||||")
            continue
        d = dense.get(r["n"])
        ratio = f"{r['phase1_parallel_s'] / d['phase1_parallel_s']:.2f}" if d else "-"
        print(f"| {r['n']} | {r['method']} | {r['anchor_mode'] if r['method'] == 'star' else '-'} | "
              f"{r['phase1_parallel_s']:.3f} | {r['phase1_sequential_s']:.3f} | {r['ttft_s']:.3f} | {ratio} | "
              f"{(r['decode_tokens_per_s'] or 0):.1f} | {r['peak_mem_gib'] or 0:.1f} |")


if __name__ == "__main__":
    main()
