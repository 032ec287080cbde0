"""Time decode steps over a preallocated KV cache: one CUDA graph for every step.

PYTHONPATH=src python benchmarks/bench_decode_kvcache.py [--n 4k,32k,128k] [--batch 1,8] [--out F]
python benchmarks/bench_decode_kvcache.py --device cpu --n 512 --batch 2 --steps 4 --heads 4 --kv-heads 2  # smoke
TRITON_INTERPRET=1 python benchmarks/bench_decode_kvcache.py --host-only [--n 32k --repeat 7]  # host time, CPU

A step is ``starshard.sparse_attention_kvcache``: one new query a sequence, its K/V appended to
a ``[B, N, Hkv, D]`` bf16 cache at the sequence's length, attention over the cache, then the
lengths (a device tensor) grow by one. "graph": that step captured once in a CUDA graph and
replayed ``--steps`` times, ending at length N (ms a replay, median of 5 runs); "eager": the same
steps called directly (host time included). ``--kinds``: the cache contiguous, as shuffled pages
of 16 slots with a block table ("paged16"), or head-sharded (``ss.KVCache``: per KV head only
the blocks it reads again; its bytes against a full cache are recorded; the timed steps rewind
into pages that already hold later blocks, which changes values, not work). Baselines over the same lengths: the library's
``sparse_attention`` on cache slices, captured per length as ``bench_decode_step.py`` does
("slices graph", the whole loop in one graph of ``--steps`` differently shaped calls), and
SDPA (flash) over all keys likewise ("sdpa graph"). The last step's output is checked against
``backend='torch'`` in fp32 (max abs err).

``--host-only`` times the host side of an eager step on the CPU: the Triton backend with its
kernels (append and attention) stubbed out, under ``TRITON_INTERPRET=1``, us a call (the fastest
of ``--repeat`` loops of ``--steps`` steps), for each of ``--kinds``; ``--stub-checks`` also
skips the length/page checks, to see what they cost.
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
from bench_decode_step import (LAYOUTS, NoLaunch, _graph_loop, _sync,  # noqa: E402
                               require_interpreter)


def _timed(fn, steps, device, reset, runs=5):
    times = []
    for _ in range(runs):
        reset()
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t) / steps * 1e3)
    return sorted(times)[len(times) // 2]


def _storage(kind, lay, kc, vc, g):
    """(k, v, block_table, label, extra record fields) holding the cache ``kc``/``vc`` as
    ``kind``: "contiguous", "paged<P>" (shuffled pages of P slots) or "head-sharded"."""
    batch, n, hkv, d = kc.shape
    if kind == "contiguous":
        return kc, vc, None, "kvcache", {}
    if kind == "head-sharded":   # ss.KVCache: per KV head only the blocks it reads again
        cache = ss.KVCache(lay, batch=batch, capacity=n, num_heads=lay.num_heads,
                           num_kv_heads=hkv, head_dim=d, dtype=kc.dtype, device=kc.device)
        cache.fill(kc, vc)
        return (cache.k, cache.v, cache.block_table, "kvcache head-sharded",
                dict(cache_bytes=cache.nbytes(), dense_bytes=cache.dense_nbytes()))
    page = int(kind[len("paged"):])
    per = -(-n // page)
    table = torch.randperm(batch * per, device=kc.device, generator=g).view(batch, per).int()
    kp, vp = (torch.empty(batch * per, page, hkv, d, device=kc.device, dtype=kc.dtype)
              for _ in range(2))
    for c, p in ((kc, kp), (vc, vp)):
        full = torch.nn.functional.pad(c, (0, 0, 0, 0, 0, per * page - n))
        p[table.long()] = full.view(batch, per, page, hkv, d)
    return kp, vp, table, f"kvcache {kind}", {}


def run_case(name, n, batch, steps, h, hkv, d, device, dtype, kind="contiguous"):
    lay = ss.local_stride(h, **LAYOUTS[name], num_kv_heads=hkv)
    g = torch.Generator(device=device).manual_seed(n + batch)
    kc, vc = (torch.randn(batch, n, hkv, d, device=device, dtype=dtype, generator=g)
              for _ in range(2))
    kp, vp, table, tag, extra = _storage(kind, lay, kc, vc, g)
    q = torch.randn(batch, 1, h, d, device=device, dtype=dtype, generator=g)
    kn, vn = (torch.randn(batch, 1, hkv, d, device=device, dtype=dtype, generator=g)
              for _ in range(2))
    first = n - steps
    seqlens = torch.full((batch,), first, dtype=torch.int32, device=device)

    def step():
        out = ss.sparse_attention_kvcache(q, kp, vp, lay, seqlens, k=kn, v=vn, block_table=table)
        seqlens.add_(1)
        return out

    def reset():
        seqlens.fill_(first)

    rows = []
    out = None
    if device.type == "cuda":
        graph, out = _common.capture_graph(step, step, device)   # the warm-up builds the table
        ms = _timed(graph.replay, steps, device, reset)
        rows.append(dict(layout=name, n=n, batch=batch, variant=f"{tag} graph", ms_per_step=ms))
    holder = []
    ms = _timed(lambda: holder.append(step()), steps, device, reset)
    rows.append(dict(layout=name, n=n, batch=batch, variant=f"{tag} eager", ms_per_step=ms))
    if out is None:
        out = holder[-1]
    else:   # the graph's output buffer holds the last replay; run the loop once more to refill it
        reset()
        for _ in range(steps):
            graph.replay()
        _sync(device)
    if kind != "contiguous":   # the steps appended kn/vn at slots first .. n - 1
        kc[:, first:], vc[:, first:] = kn, vn
    ref = ss.sparse_attention(q.float(), kc.float(), vc.float(), lay, backend="torch")
    err = (out.float() - ref).abs().max().item()
    for r in rows:
        r.update(max_abs_err_last_step=err, **extra)
    if device.type == "cuda" and kind == "contiguous":
        sl = lambda m: ss.sparse_attention(q, kc[:, :m], vc[:, :m], lay)  # noqa: E731
        ms, _ = _graph_loop(sl, first, steps, device)
        rows.append(dict(layout=name, n=n, batch=batch, variant="slices graph", ms_per_step=ms))
        sdpa = lambda m: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q.transpose(1, 2), kc[:, :m].transpose(1, 2), vc[:, :m].transpose(1, 2),
            enable_gqa=True)
        ms, _ = _graph_loop(sdpa, first, steps, device)
        rows.append(dict(layout="sdpa dense", n=n, batch=batch, variant="sdpa graph",
                         ms_per_step=ms))
    for r in rows:
        print(r, flush=True)
    return rows


def _cases(a):
    """(layout name, N, batch, kind) for every combination the options ask for."""
    for name in a.layouts.split(","):
        for n in _common.parse_sizes(a.n):
            for b in (int(x) for x in a.batch.split(",")):
                for kind in a.kinds.split(","):
                    yield name, n, b, kind


def stub_launches(stub_checks):
    """Replace the cache step's Triton launches (and with ``stub_checks`` its host-side
    length/page checks) by no-ops, to time the host side alone."""
    require_interpreter()
    from starshard.ops import decode, triton_cache, triton_launch as TL
    TL.s2_fwd_kernel_varying = TL.s2_merge_splits_kernel = NoLaunch()
    triton_cache._append_kv_kernel = NoLaunch()
    if stub_checks:
        decode._check_lengths = lambda *args: None


def host_case(name, n, b, kind, a):
    """Host time of one eager cache step (launches stubbed): the fastest of --repeat loops."""
    lay = ss.local_stride(a.heads, **LAYOUTS[name], num_kv_heads=a.kv_heads)
    kc, vc = (torch.zeros(b, n, a.kv_heads, a.head_dim, dtype=torch.float16) for _ in range(2))
    kp, vp, table, tag, _ = _storage(kind, lay, kc, vc, None)
    q = torch.zeros(b, 1, a.heads, a.head_dim, dtype=torch.float16)
    kn, vn = (torch.zeros(b, 1, a.kv_heads, a.head_dim, dtype=torch.float16) for _ in range(2))
    seqlens = torch.full((b,), n - a.steps, dtype=torch.int32)

    def step():
        ss.sparse_attention_kvcache(q, kp, vp, lay, seqlens, k=kn, v=vn, block_table=table,
                                   backend="triton")

    step()
    ms = min(_timed(step, a.steps, torch.device("cpu"), lambda: seqlens.fill_(n - a.steps),
                    runs=1) for _ in range(a.repeat))
    row = dict(layout=name, n=n, batch=b,
               variant=f"{tag} host" + (" no checks" if a.stub_checks else ""),
               us_per_call=ms * 1e3, repeat=a.repeat)
    print(row, flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="4k,32k,128k", help="cache slots = length at the last step")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--layouts", default="bs64_l16_s16,bs128_l8_s16,dense_bs64")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kinds", default="contiguous,paged16,head-sharded",
                   help="cache storage: contiguous, paged<P> (pages of P slots), head-sharded")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    p.add_argument("--host-only", action="store_true",
                   help="host time of an eager step, kernels stubbed (CPU, TRITON_INTERPRET=1)")
    p.add_argument("--repeat", type=int, default=7, help="--host-only: loops, the fastest kept")
    p.add_argument("--stub-checks", action="store_true",
                   help="--host-only: skip the host-side length/page checks as well")
    a = p.parse_args()
    if a.host_only:
        stub_launches(a.stub_checks)
        res = dict(env=_common.env_info(), heads=a.heads, kv_heads=a.kv_heads,
                   head_dim=a.head_dim, steps=a.steps, rows=[host_case(*c, a) for c in _cases(a)])
        _common.write_json(a.out or os.path.join(_common.RESULTS, "bench_decode_kvcache_host.json"),
                           res)
        return
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, n, b, kind in _cases(a):
        rows += run_case(name, n, b, a.steps, a.heads, a.kv_heads, a.head_dim, device, dtype,
                         kind)
    res = dict(env=_common.env_info(), heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
               dtype=str(dtype), steps=a.steps, rows=rows)
    _common.write_json(a.out or os.path.join(_common.RESULTS, "bench_decode_kvcache.json"), res)
    print(_common.markdown_table(
        ["layout", "N", "batch", "variant", "ms / step", "max abs err"],
        [[r["layout"], _common.size_label(r["n"]), r["batch"], r["variant"],
          f"{r['ms_per_step']:.4f}", _common.fmt(r.get("max_abs_err_last_step"), ".1e")]
         for r in rows]))


if __name__ == "__main__":
    main()
