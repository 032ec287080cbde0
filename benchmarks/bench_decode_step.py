"""Time S2 decode steps: one query a call, the KV one token longer each call.

PYTHONPATH=src python benchmarks/bench_decode_step.py [--n 4k,32k] [--steps 128] [--out F]
python benchmarks/bench_decode_step.py --device cpu --n 512 --steps 8 --heads 4 --kv-heads 2  # smoke
TRITON_INTERPRET=1 python benchmarks/bench_decode_step.py --host-only [--repeat 7]  # host time a call, CPU

Each step calls ``starshard.sparse_attention`` on a [1, 1, H, D] query against the first
``n + i + 1`` keys (GQA, bf16 on a GPU), as a decoding loop does without a paged cache, and waits
for the GPU at the end of the loop; the time per step includes building any layout table that
step needs. Variants: "shared" (the library: lengths whose tables are identical share one),
"per-length" (the table cache keyed by the exact lengths, as before the sharing), "cached" (the
same lengths again, every table already built: the floor; decode launches pack the query
heads of a GQA group into one decode tile), "unpacked" (as "cached", never packed:
``kernel_config(fwd_pack=False)``; its tables are built in an untimed loop first), "packed"
(as "cached", ``fwd_pack=True``: the library's rule since 2026-12-07, before which only rows
of >= 1024 key steps packed) and SDPA over all keys (dense,
for scale). On a GPU, "graph" and "sdpa graph" capture the whole loop (every table built, every
kernel compiled first) in one CUDA graph and time its replays: the kernels' time without the
host's, as a CUDA-graph decoding loop runs them ("graph unpacked" / "graph packed": GQA packing
forced off / on while capturing). The last step's output is checked against
``backend='torch'``.

``--host-only`` times the host side of a step on the CPU: the Triton backend with the kernel
launches stubbed out, as an inference call (no autograd: the op skips the custom-op dispatch)
and as a call whose query requires grad (through the registered custom op).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import _common  # noqa: E402
import starshard as ss  # noqa: E402
from starshard import layouts as L  # noqa: E402
from starshard.ops import triton_launch as TL  # noqa: E402

LAYOUTS = {
    "bs64_l16_s16": dict(block_size=64, local_blocks=16, vert_stride=16),
    "bs128_l8_s16": dict(block_size=128, local_blocks=8, vert_stride=16),
    "dense_bs64": dict(block_size=64, local_blocks=1, vert_stride=1),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loop(fn, n, steps, device):
    _sync(device)
    t = time.perf_counter()
    for i in range(steps):
        out = fn(n + i + 1)
    _sync(device)
    return (time.perf_counter() - t) / steps * 1e3, out


def _graph_loop(fn, n, steps, device, replays=5):
    """Capture the loop's calls in one CUDA graph, replay it; the median ms a step."""
    graph, outs = _common.capture_graph(lambda: _loop(fn, n, steps, device),
                                        lambda: [fn(n + i + 1) for i in range(steps)], device)
    times = []
    for _ in range(replays):
        _sync(device)
        t = time.perf_counter()
        graph.replay()
        _sync(device)
        times.append((time.perf_counter() - t) / steps * 1e3)
    return sorted(times)[len(times) // 2], outs[-1]


def sdpa_step(q, k, v):
    """SDPA over the first m keys (dense, GQA), as a step function of m."""
    return lambda m: torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k[:, :m].transpose(1, 2), v[:, :m].transpose(1, 2), enable_gqa=True)


def run_case(name, n, steps, h, hkv, d, device, dtype):
    spec = LAYOUTS[name]
    lay = ss.local_stride(h, **spec, num_kv_heads=hkv)
    g = torch.Generator(device=device).manual_seed(n)
    k, v = (torch.randn(1, n + steps, hkv, d, device=device, dtype=dtype, generator=g)
            for _ in range(2))
    q = torch.randn(1, 1, h, d, device=device, dtype=dtype, generator=g)
    step = lambda m: ss.sparse_attention(q, k[:, :m], v[:, :m], lay)  # noqa: E731
    ss.sparse_attention(q, k[:, :n], v[:, :n], lay)   # compile outside the timing
    rows = []
    original = L._canonical_ranges
    ref = ss.sparse_attention(q.float(), k[:, :n + steps].float(), v[:, :n + steps].float(), lay,
                              backend="torch")
    for variant in ("per-length", "shared", "cached", "unpacked", "packed"):
        cfg = {"unpacked": dict(fwd_pack=False), "packed": dict(fwd_pack=True)}.get(variant, {})
        if variant in ("per-length", "shared"):
            L._TABLE_CACHE.clear()
            L._CAPTURED_TABLES.clear()   # the graphs of earlier cases are gone
        if variant == "per-length":
            L._canonical_ranges = lambda transpose, tile, unit, q_range, k_range: (q_range, k_range)
        try:
            with TL.kernel_config(**cfg):
                if variant in ("unpacked", "packed"):
                    _loop(step, n, steps, device)   # compile and build its tables untimed
                ms, out = _loop(step, n, steps, device)
        finally:
            L._canonical_ranges = original
        err = (out.float() - ref).abs().max().item()
        rows.append(dict(layout=name, n=n, steps=steps, variant=variant, ms_per_step=ms,
                         max_abs_err_last_step=err))
    graph_variants = (("graph", {}), ("graph unpacked", dict(fwd_pack=False)),
                      ("graph packed", dict(fwd_pack=True))) if device.type == "cuda" else ()
    for variant, cfg in graph_variants:
        with TL.kernel_config(**cfg):
            ms, out = _graph_loop(step, n, steps, device)
        rows.append(dict(layout=name, n=n, steps=steps, variant=variant, ms_per_step=ms,
                         max_abs_err_last_step=(out.float() - ref).abs().max().item()))
    sdpa = sdpa_step(q, k, v)
    _loop(sdpa, n, steps, device)   # warm-up: the first loops over a new shape run slower
    ms, _ = _loop(sdpa, n, steps, device)
    rows.append(dict(layout="sdpa dense", n=n, steps=steps, variant="sdpa", ms_per_step=ms))
    if device.type == "cuda":
        ms, _ = _graph_loop(sdpa, n, steps, device)
        rows.append(dict(layout="sdpa dense", n=n, steps=steps, variant="sdpa graph",
                         ms_per_step=ms))
    return rows


class NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing (host-time benches)."""
    def __getitem__(self, grid):
        return lambda *args, **kw: None


def require_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--host-only needs TRITON_INTERPRET=1 (the Triton backend on CPU tensors)")


def host_only(a):
    require_interpreter()
    TL.s2_fwd_kernel = TL.s2_fwd_kernel_varying = TL.s2_merge_splits_kernel = NoLaunch()
    n, steps = _common.parse_sizes(a.n)[0], a.steps
    lay = ss.local_stride(a.heads, 64, 16, 16, num_kv_heads=a.kv_heads)
    k, v = (torch.randn(1, n + (a.repeat + 1) * steps, a.kv_heads, a.head_dim, dtype=torch.float16)
            for _ in range(2))
    rows = []
    for label, grad in (("inference (direct)", False), ("q requires grad (custom op)", True)):
        q = torch.randn(1, 1, a.heads, a.head_dim, dtype=torch.float16, requires_grad=grad)
        step = lambda m: ss.sparse_attention(q, k[:, :m], v[:, :m], lay, backend="triton")  # noqa: E731
        _loop(step, n, steps, torch.device("cpu"))
        # each repeat goes on to new lengths, so it builds the tables a decoding loop would
        ms = min(_loop(step, n + r * steps, steps, torch.device("cpu"))[0]
                 for r in range(1, a.repeat + 1))
        rows.append(dict(call=label, n=n, us_per_call=ms * 1e3, repeat=a.repeat))
        print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="4k,32k", help="KV length at the first step (default 4k,32k)")
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--layouts", default="bs64_l16_s16,dense_bs64", help=", ".join(LAYOUTS))
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    p.add_argument("--host-only", action="store_true", help="host time a call, kernels stubbed (CPU)")
    p.add_argument("--repeat", type=int, default=1,
                   help="--host-only: time the loop this many times and keep the fastest (a shared CPU)")
    a = p.parse_args()
    if a.host_only:
        res = dict(env=_common.env_info(), rows=host_only(a))
        _common.write_json(a.out or os.path.join(_common.RESULTS, "bench_decode_host.json"), res)
        return
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name in a.layouts.split(","):
        for n in _common.parse_sizes(a.n):
            case = run_case(name, n, a.steps, a.heads, a.kv_heads, a.head_dim, device, dtype)
            for r in case:
                print(r, flush=True)
            rows += case
    res = dict(env=_common.env_info(), heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
               dtype=str(dtype), rows=rows)
    out = a.out or os.path.join(_common.RESULTS, "bench_decode_step.json")
    _common.write_json(out, res)
    print(_common.markdown_table(
        ["layout", "N", "variant", "ms / step", "max abs err"],
        [[r["layout"], _common.size_label(r["n"]), r["variant"], f"{r['ms_per_step']:.3f}",
          _common.fmt(r.get("max_abs_err_last_step"), ".1e")] for r in rows]))


if __name__ == "__main__":
    main()
