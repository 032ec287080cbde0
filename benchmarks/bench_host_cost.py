"""Host time of one eager decode call on a GPU: loops of calls that the host cannot outrun
(us a call, the best of 5 loops of 400), next to the launch of empty Triton kernels (10 and 70
arguments), a torch ``add_`` and SDPA's decode call; then one decode call's kernel time with and
without TMA descriptors (``kernel_config(fwd_tma=...)``; 50 calls captured in one CUDA graph)
and the same eagerly. GQA 32/8, D=64, bf16, one query over N keys, local 16 / stride 16 blocks
of 64 ("s2") or every block ("dense"). cProfile tables of 300 calls of the op and of a
``KVCache`` step go next to the JSON.

PYTHONPATH=src python benchmarks/bench_host_cost.py [--n 32768] [--out F]
"""
import argparse
import cProfile
import importlib.util
import io
import os
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import _common  # noqa: E402
import starshard as ss  # noqa: E402
from starshard.kvcache import KVCache  # noqa: E402
from starshard.ops import triton_launch as TL  # noqa: E402
from starshard.ops.triton_cache import append_kv  # noqa: E402


def empty_kernel(args):
    """An empty @triton.jit kernel of ``args`` arguments (Triton reads kernels from files)."""
    path = os.path.join(tempfile.mkdtemp(), f"_empty{args}.py")
    names = ", ".join(f"a{i}" for i in range(args))
    with open(path, "w") as f:
        f.write(f"import triton\n\n\n@triton.jit\ndef empty({names}):\n    pass\n")
    spec = importlib.util.spec_from_file_location(f"_empty{args}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.empty


def per_call(fn, n=400, reps=5):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def graph_us(fn, calls=50):
    g, _ = _common.capture_graph(fn, lambda: [fn() for _ in range(calls)])
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            g.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / (10 * calls) * 1e6)
    return best


def profile_table(fn, calls=300):
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(40)
    return s.getvalue()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32768)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev, n, hq, hkv, d = "cuda", a.n, 32, 8, 64
    bf = dict(device=dev, dtype=torch.bfloat16)
    lay = ss.local_stride(hq, 64, 16, 16, num_kv_heads=hkv)
    dense = ss.local_stride(hq, 64, 1, 1, num_kv_heads=hkv)
    q = torch.randn(1, 1, hq, d, **bf)
    k, v = (torch.randn(1, n, hkv, d, **bf) for _ in range(2))
    kn, vn = (torch.randn(1, 1, hkv, d, **bf) for _ in range(2))
    x = torch.zeros(16, device=dev)
    e10, e70 = empty_kernel(10), empty_kernel(70)
    args70 = [x] * 20 + list(range(1, 51))
    res = {"empty kernel 10 args": per_call(lambda: e10[(1,)](x, x, x, 1, 2, 3, 4, 5, 6, 7)),
           "empty kernel 70 args": per_call(lambda: e70[(1,)](*args70)),
           "torch add_": per_call(lambda: x.add_(1))}
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    res["sdpa decode"] = per_call(lambda: torch.nn.functional.scaled_dot_product_attention(
        qt, kt, vt, enable_gqa=True))
    out_dir = os.path.dirname(a.out) if a.out else str(_common.RESULTS)
    with torch.no_grad():
        res["sparse_attention decode (s2 layout)"] = per_call(
            lambda: ss.sparse_attention(q, k, v, lay))
        res["sparse_attention decode (dense layout)"] = per_call(
            lambda: ss.sparse_attention(q, k, v, dense))
        res["triton_launch.forward (s2)"] = per_call(
            lambda: TL.forward(q, k, v, lay, True, 0.125, n - 1, 0))
        sl = torch.full((1,), n - 1000, dtype=torch.int32, device=dev)
        res["sparse_attention_kvcache contiguous no kv"] = per_call(
            lambda: ss.sparse_attention_kvcache(q, k, v, lay, sl))
        res["sparse_attention_kvcache contiguous + kv"] = per_call(
            lambda: ss.sparse_attention_kvcache(q, k, v, lay, sl, k=kn, v=vn))
        res["append_kv contiguous"] = per_call(
            lambda: append_kv(k, v, sl, kn, vn, None, 0, n, check=True, check_pages=False))
        res["append_kv contiguous no debug"] = per_call(
            lambda: append_kv(k, v, sl, kn, vn, None, 0, n, check=False))
        cache = KVCache(lay, batch=1, capacity=n, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                        dtype=torch.bfloat16, device=dev)

        def step():
            cache.reset(n - 1000)
            cache.attend(q, kn, vn)

        res["KVCache.reset+attend head-sharded"] = per_call(step)
        res["KVCache.reset"] = per_call(lambda: cache.reset(n - 1000))
        tables = {"sparse_decode": profile_table(lambda: ss.sparse_attention(q, k, v, lay)),
                  "kvcache_step": profile_table(step)}
        for m in (32768, 131072):
            km, vm = (torch.randn(1, m, hkv, d, **bf) for _ in range(2))
            for tma in (True, False):
                with TL.kernel_config(fwd_tma=tma):
                    f = lambda: ss.sparse_attention(q, km, vm, lay)  # noqa: E731
                    res[f"graph decode n={m} tma={tma}"] = graph_us(f)
                    res[f"eager decode n={m} tma={tma}"] = per_call(f)
    for key, val in res.items():
        print(f"{key:45s} {val:8.1f} us")
    _common.write_json(a.out or os.path.join(out_dir, "bench_host_cost.json"),
                       dict(env=_common.env_info(), n=n, us_per_call=res))
    for name, text in tables.items():
        with open(os.path.join(out_dir, f"bench_host_cost_profile_{name}.txt"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
