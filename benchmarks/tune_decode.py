"""Time decode launches over split-K factors and GQA packing, kernels only (CUDA graphs).

PYTHONPATH=src python benchmarks/tune_decode.py [--n 4k,16k,32k,128k] [--batch 1,4] [--library-only] [--out F]

For each layout, KV length and batch size, captures ``--steps`` decode calls (one query a
sequence, the KV one token longer each call, H=32, Hkv=8, D=128, bf16) in one CUDA graph with
``kernel_config(fwd_splits=S, fwd_pack=P)`` forced, for S in 1, 2, 4, ... (up to the row's key
steps) and P off and on, and times the replays (median of 5, ms a step). Also the library's own
choice and SDPA over all keys, both captured the same way. Each variant's last output is checked
against the library's. Used to place the split-K and packing thresholds in ops/triton_launch.py.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import _common  # noqa: E402
import starshard as ss  # noqa: E402
from bench_decode_step import LAYOUTS, _graph_loop, sdpa_step  # noqa: E402
from starshard.ops import triton_launch as TL  # noqa: E402


def _key_steps(lay, n):
    """Key steps (64- or 128-key tiles of the forward) of the longest decode row at length n."""
    rows = lay.mask(1, -(-n // lay.block_size))   # [H, 1, nb]: the last query block's row
    return int(rows.sum(-1).max().item()) * lay.block_size // 64


def run_case(name, n, batch, steps, h, hkv, d, device, sweep=True):
    lay = ss.local_stride(h, **LAYOUTS[name], num_kv_heads=hkv)
    g = torch.Generator(device=device).manual_seed(n + batch)
    k, v = (torch.randn(batch, n + steps, hkv, d, device=device, dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    q = torch.randn(batch, 1, h, d, device=device, dtype=torch.bfloat16, generator=g)
    step = lambda m: ss.sparse_attention(q, k[:, :m], v[:, :m], lay)  # noqa: E731
    lib_ms, lib_out = _graph_loop(step, n, steps, device)
    rows = [dict(layout=name, n=n, batch=batch, variant="library", ms_per_step=lib_ms)]
    top = _key_steps(lay, n + steps)
    splits = [s for s in (1, 2, 4, 8, 16, 32, 64) if s <= max(1, top)]
    for pack in (False, True) if sweep else ():
        for s in splits:
            with TL.kernel_config(fwd_splits=s, fwd_pack=pack):
                ms, out = _graph_loop(step, n, steps, device)
            err = (out.float() - lib_out.float()).abs().max().item()
            rows.append(dict(layout=name, n=n, batch=batch, variant=f"s{s}{'p' if pack else ''}",
                             splits=s, pack=pack, ms_per_step=ms, max_abs_diff_vs_library=err))
    ms, _ = _graph_loop(sdpa_step(q, k, v), n, steps, device)
    rows.append(dict(layout="sdpa dense", n=n, batch=batch, variant="sdpa", ms_per_step=ms))
    best = min((r for r in rows if "splits" in r), key=lambda r: r["ms_per_step"], default=rows[0])
    print(f"{name} n={n} b={batch} key_steps={top}: library {lib_ms:.4f} best {best['variant']} "
          f"{best['ms_per_step']:.4f} sdpa {ms:.4f} | "
          + " ".join(f"{r['variant']}={r['ms_per_step']:.4f}" for r in rows if "splits" in r),
          flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="4k,16k,32k,128k")
    p.add_argument("--batch", default="1,4")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--layouts", default="bs64_l16_s16,bs128_l8_s16,dense_bs64")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--library-only", action="store_true",
                   help="time the library's choice and SDPA only, not the forced sweep")
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "tune_decode.json"))
    a = p.parse_args()
    device = torch.device("cuda")
    rows = []
    for name in a.layouts.split(","):
        for n in _common.parse_sizes(a.n):
            for b in (int(x) for x in a.batch.split(",")):
                rows += run_case(name, n, b, a.steps, a.heads, a.kv_heads, a.head_dim, device,
                                 sweep=not a.library_only)
    _common.write_json(a.out, dict(env=_common.env_info(), heads=a.heads, kv_heads=a.kv_heads,
                                   head_dim=a.head_dim, steps=a.steps, rows=rows))


if __name__ == "__main__":
    main()
