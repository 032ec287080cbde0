"""Where a KV-cache decode step's time goes: one captured ``sparse_attention_kvcache`` step
(bs64/l16/s16, GQA 32/8, D=128, bf16, batch 1, 32k and 128k slots) with and without appending
the new K/V, timed over graph replays (median of 5 x 200), and the kernels of 10 replays by
torch.profiler.

PYTHONPATH=src python benchmarks/profile_decode_kvcache.py   # writes $OUT or benchmarks/results
"""
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import starshard as ss  # noqa: E402


def run(n, b, append):
    """One captured step over n slots, batch b: ms a replay and ms per kernel."""
    h, hkv, d = 32, 8, 128
    lay = ss.local_stride(h, 64, 16, 16, num_kv_heads=hkv)
    kc, vc = (torch.randn(b, n, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
    kn, vn = (torch.randn(b, 1, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sl = torch.full((b,), n - 64, dtype=torch.int32, device="cuda")
    kw = dict(k=kn, v=vn) if append else {}
    step = lambda: ss.sparse_attention_kvcache(q, kc, vc, lay, sl, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
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
    return dict(n=n, b=b, append=append, ms=sorted(ts)[2], kernels_ms=kern)


if __name__ == "__main__":
    out = [run(n, 1, a) for n in (32768, 131072) for a in (False, True)]
    for r in out:
        print(r)
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    with open(os.path.join(folder, "profile_decode_kvcache.json"), "w") as f:
        json.dump(out, f, indent=1)
