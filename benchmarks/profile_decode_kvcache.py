"""Where a KV-cache decode step's time goes: one captured decode step (GQA 32/8, D=128, bf16)
timed over graph replays (median of 5 x 200), and the kernels of 10 replays by torch.profiler.
Variants: ``sparse_attention_kvcache`` without ("cache") and with ("cache+append") appending
the new K/V, and the op on cache slices ("slices": ``sparse_attention`` over the first
``n - 64`` keys, the same keys the cache step reads).

PYTHONPATH=src python benchmarks/profile_decode_kvcache.py [--layouts bs64_l16_s16,dense_bs64]
    [--n 32k,128k] [--batch 1]   # writes profile_decode_kvcache.json into $OUT or benchmarks/results
"""
import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import starshard as ss  # noqa: E402
import _common  # noqa: E402
from _common import parse_sizes  # noqa: E402
from bench_decode_step import LAYOUTS  # noqa: E402


def run(name, n, b, variant):
    """One captured step of ``variant`` over n slots, batch b: ms a replay and ms per kernel."""
    h, hkv, d = 32, 8, 128
    lay = ss.local_stride(h, **LAYOUTS[name], num_kv_heads=hkv)
    kc, vc = (torch.randn(b, n, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
    kn, vn = (torch.randn(b, 1, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sl = torch.full((b,), n - 64, dtype=torch.int32, device="cuda")
    if variant == "slices":
        ks, vs = kc[:, :n - 64], vc[:, :n - 64]
        step = lambda: ss.sparse_attention(q, ks, vs, lay)  # noqa: E731
    else:
        kw = dict(k=kn, v=vn) if variant == "cache+append" else {}
        step = lambda: ss.sparse_attention_kvcache(q, kc, vc, lay, sl, **kw)  # noqa: E731
    g, _ = _common.capture_graph(step, step)
    for _ in range(20):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(200):
            g.replay()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) / 200 * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            g.replay()
        torch.cuda.synchronize()
    kern = {e.key[:60]: round(e.device_time_total / 10 / 1e3, 4) for e in prof.key_averages()
            if "CUDA" in str(e.device_type)}
    return dict(layout=name, n=n, b=b, variant=variant, ms=sorted(ts)[2], kernels_ms=kern)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default="bs64_l16_s16")
    p.add_argument("--n", default="32k,128k")
    p.add_argument("--batch", default="1")
    p.add_argument("--variants", default="cache,cache+append,slices")
    args = p.parse_args()
    out = []
    for name in args.layouts.split(","):
        for n in parse_sizes(args.n):
            for b in parse_sizes(args.batch):
                for variant in args.variants.split(","):
                    out.append(run(name, n, b, variant))
                    print(out[-1], flush=True)
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    with open(os.path.join(folder, "profile_decode_kvcache.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
