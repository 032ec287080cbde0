"""Star / Ring / dense inference with one process per GPU (NCCL), or per CPU host (gloo).

    PYTHONPATH=src python benchmarks/bench_star_multi.py --hosts 4 --n 32k,128k
    PYTHONPATH=src python benchmarks/bench_star_multi.py --hosts 8 --n 32k,128k,512k
    PYTHONPATH=src python benchmarks/bench_star_multi.py --tiny --device cpu --hosts 2 --n 1k  # smoke

A Llama-3-8B-shaped model (random bf16 weights, the same on every rank from ``--seed``) over a
random context. Dense runs on one GPU (one process; skipped past ``--dense-max``); ring and star
run on ``--hosts`` processes, star with one block per host and with two (``--blocks-per-host``)
and each anchor mode. Each rank times its own phase 1 after a barrier; time to first token is the
query host's time from that barrier to the first token (it waits for every host's phase 1);
decode tokens/s are the query host's; peak memory is the largest rank's. Ring's first-step logits
and greedy tokens are compared with dense's where dense ran (an exact method: they agree up to
rounding); the yardstick for rounding is dense against transformers' own SDPA attention on the
same tokens. In bf16 with random weights the top logits nearly tie, so greedy tokens may part.
NVLink multicast is kept off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1). A failed case (out of memory, a host failure) is recorded, not raised.

Records use ``bench_star.py``'s keys, so ``python benchmarks/opcount.py --compare OUT`` puts
each beside the operation-count model.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_sizes  # noqa: E402
from bench_star import build_model  # noqa: E402

NO_MULTICAST = dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_case(rank, world, spec):
    """One rank of one case: build the model, warm up on a short context, then time the case."""
    import torch.distributed as dist

    from starshard.star import StarEngine
    from starshard.star.comm import Comm
    device = torch.device(f"cuda:{rank}" if spec["device"] == "cuda" else "cpu")
    torch.manual_seed(spec["seed"])  # the same random weights on every rank
    model = build_model(spec["layers"], device, spec["tiny"]).to(getattr(torch, spec["dtype"]))
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(spec["seed"])
    ctx = torch.randint(0, vocab, (spec["n"],), generator=g)
    q = torch.randint(0, vocab, (spec["query_len"],), generator=g)
    out = None
    for warm in (True, False):
        n = min(spec["n"], spec["warmup_n"]) if warm else spec["n"]
        block = math.ceil(n / (world * spec["blocks_per_host"])) if spec["method"] == "star" else None
        eng = StarEngine(model, method=spec["method"], block_size=block, comm=Comm(),
                         anchor_mode=spec["anchor_mode"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if world > 1:
            dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        eng.encode(ctx[:n])
        _sync(device)
        t1 = time.perf_counter()
        res = eng.generate(q, 2 if warm else spec["new_tokens"], return_logits=True)
        is_qh = rank == eng.plan.query_host
        out = dict(rank=rank, query_host=eng.plan.query_host, phase1_s=t1 - t0,
                   ttft_s=(t1 - t0) + res.timings["first_token_s"],
                   decode_tokens_per_s=res.timings["decode_tokens_per_s"], tokens=res.tokens,
                   logits0=res.logits[0] if is_qh else None,
                   block_size=eng.plan.pieces[0][0].size if eng.plan.pieces[0] else None,
                   peak_mem_gib=((torch.cuda.max_memory_allocated(device) - base) / 2**30)
                   if device.type == "cuda" else None)
        del eng
    if spec["method"] == "dense" and out["logits0"] is not None:
        out["sdpa_logits0"] = _sdpa_logits(model, torch.cat([ctx, q]))
    return out


def _sdpa_logits(model, ids):
    """The last position's logits by transformers' own SDPA attention: dense's rounding yardstick
    (an exact method such as ring differs from dense by rounding alone, about as much as this)."""
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        dev = next(model.parameters()).device
        return model(input_ids=ids[None].to(dev), use_cache=False,
                     logits_to_keep=1).logits[0, -1].float().cpu()


def run_case(spec, hosts, timeout):
    """One case on ``hosts`` processes; a record in bench_star.py's keys (or with ``error``)."""
    from starshard.star.launch import HostFailure, run_local
    backend = "nccl" if spec["device"] == "cuda" else "gloo"
    label = dict(n=spec["n"], method=spec["method"], hosts=hosts, anchor_mode=spec["anchor_mode"],
                 blocks_per_host=spec["blocks_per_host"], launch="processes", backend=backend)
    try:
        results = run_local(host_case, hosts, (spec,), timeout=timeout, backend=backend)
    except HostFailure as e:
        return dict(label, error=f"host {e.rank}: {str(e.cause)[:300]}"), None
    qh = next(r for r in results if r["rank"] == r["query_host"])
    p1 = {str(r["rank"]): r["phase1_s"] for r in results}
    rec = dict(label, block_size=qh["block_size"] if spec["method"] == "star" else
               (spec["n"] if spec["method"] == "dense" else None),
               phase1_per_host_s=p1, phase1_parallel_s=max(p1.values()),
               phase1_sequential_s=sum(p1.values()), query_step_s=qh["ttft_s"] - max(p1.values()),
               ttft_s=qh["ttft_s"], decode_tokens_per_s=qh["decode_tokens_per_s"],
               new_tokens=len(qh["tokens"]), tokens=qh["tokens"],
               peak_mem_gib=max((r["peak_mem_gib"] or 0) for r in results) if spec["device"] == "cuda" else None)
    if qh.get("sdpa_logits0") is not None:
        rec["sdpa_vs_dense"] = _logit_diff(qh["sdpa_logits0"], qh["logits0"])
    return rec, qh["logits0"]


def _logit_diff(a, ref):
    return dict(max_abs_logit_diff=(a.float() - ref.float()).abs().max().item(),
                max_abs_dense_logit=ref.float().abs().max().item(),
                same_argmax=bool(a.argmax() == ref.argmax()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="32k,128k")
    ap.add_argument("--hosts", type=int, default=4, help="processes (GPUs) for star and ring")
    ap.add_argument("--methods", default="dense,star,ring")
    ap.add_argument("--anchor-modes", default="once,stream")
    ap.add_argument("--blocks-per-host", default="1,2", help="star: context blocks per host")
    ap.add_argument("--dense-max", default="128k", help="longest context dense runs on one GPU")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers (default: the model's)")
    ap.add_argument("--query-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--warmup-n", type=int, default=4096, help="context of the untimed first pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--tiny", action="store_true", help="a tiny model (a smoke run, e.g. on the CPU)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a collective may wait")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_star_multi.json"))
    a = ap.parse_args(argv)
    if a.hosts < 1:
        raise SystemExit("--hosts must be at least 1")
    if a.device == "cuda" and torch.cuda.device_count() < a.hosts:
        raise SystemExit(f"--hosts {a.hosts} needs {a.hosts} GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    os.environ.update(NO_MULTICAST)
    methods = a.methods.split(",")
    dense_max = parse_sizes(a.dense_max)[0]
    records = []
    for n in parse_sizes(a.n):
        base = dict(n=n, seed=a.seed, layers=a.layers, tiny=a.tiny, device=a.device, dtype=a.dtype,
                    query_len=a.query_len, new_tokens=a.new_tokens, warmup_n=a.warmup_n,
                    anchor_mode="once", blocks_per_host=1)
        dense_logits = dense_tokens = None
        for method in methods:
            if method == "dense":
                if n > dense_max:
                    continue
                variants = [(1, dict(base, method="dense"))]
            elif method == "ring":
                variants = [(a.hosts, dict(base, method="ring"))]
            else:
                variants = [(a.hosts, dict(base, method="star", anchor_mode=m, blocks_per_host=int(b)))
                            for b in a.blocks_per_host.split(",") for m in a.anchor_modes.split(",")]
            for hosts, spec in variants:
                rec, logits = run_case(spec, hosts, a.timeout)
                if method == "dense" and logits is not None:
                    dense_logits, dense_tokens = logits, rec["tokens"]
                if method == "ring" and logits is not None and dense_logits is not None:
                    rec["ring_vs_dense"] = dict(_logit_diff(logits, dense_logits),
                                                same_tokens=rec["tokens"] == dense_tokens)
                records.append(rec)
                print(json.dumps({k: v for k, v in rec.items() if k != "tokens"}), flush=True)
    import transformers
    out = dict(benchmark="bench_star_multi", device=a.device,
               gpu=torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
               gpus=a.hosts if a.device == "cuda" else 0, torch=torch.__version__,
               transformers=transformers.__version__, date=datetime.date.today().isoformat(),
               model=("tiny" if a.tiny else "Llama-3-8B shape") + f", random weights, {a.dtype}",
               layers=a.layers or None,
               records=records)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(table(records))
    return out


def table(records):
    """Markdown: per case phase 1, TTFT, decode, memory; ring's parallel efficiency against dense
    on one GPU (dense phase 1 / (ring phase 1 x hosts)), star's TTFT speed-up over ring, and each
    method's decode step time against dense's on one GPU."""
    dense = {r["n"]: r for r in records if r["method"] == "dense" and "error" not in r}
    ring = {r["n"]: r for r in records if r["method"] == "ring" and "error" not in r}
    lines = ["| N | method | hosts | blocks/host | anchor | phase 1 s | TTFT s | decode tok/s | peak GiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        head = f"| {r['n']} | {r['method']} | {r['hosts']} | "
        head += f"{r['blocks_per_host'] if r['method'] == 'star' else '-'} | "
        head += f"{r['anchor_mode'] if r['method'] == 'star' else '-'} | "
        if "error" in r:
            lines.append(head + f"| | | | {r['error'][:60]} |")
            continue
        note = []
        d, g = dense.get(r["n"]), ring.get(r["n"])
        if r["method"] == "ring" and d:
            note.append(f"efficiency {d['phase1_parallel_s'] / (r['phase1_parallel_s'] * r['hosts']):.2f}")
            if "ring_vs_dense" in r:
                c = r["ring_vs_dense"]
                y = d.get("sdpa_vs_dense")
                note.append(f"logits diff {c['max_abs_logit_diff']:.2g}"
                            + (f" (dense vs SDPA {y['max_abs_logit_diff']:.2g})" if y else "")
                            + f", tokens {'same' if c['same_tokens'] else 'differ'}")
        if r["method"] == "star" and g:
            note.append(f"TTFT {g['ttft_s'] / r['ttft_s']:.2f}x ring")
        if r["method"] != "dense" and d and d["decode_tokens_per_s"] and r["decode_tokens_per_s"]:
            note.append(f"decode step {d['decode_tokens_per_s'] / r['decode_tokens_per_s']:.2f}x dense's")
        peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(head + f"{r['phase1_parallel_s']:.3f} | {r['ttft_s']:.3f} | "
                     f"{(r['decode_tokens_per_s'] or 0):.1f} | {peak} | {'; '.join(note)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
