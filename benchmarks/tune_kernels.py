"""Time tile configurations of the three Triton kernels (forward, dq, dk/dv) on a GPU.

python benchmarks/tune_kernels.py --out DIR [--n 32768] [--d 128]
Times the forward for each forward config, and the whole backward for each dq config (dk/dv
fixed) and each dk/dv config (dq fixed), on a few layouts; writes tune.json under --out and
prints the best per layout. Used to fill the configuration table in ops/triton_launch.py.
"""
import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import starshard as ss  # noqa: E402
from starshard.ops import triton_launch as TL  # noqa: E402

FWD = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3)]
DQ = [(64, 64, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)]
DKDV = [(64, 64, 8, 2), (64, 128, 8, 2), (32, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 2), (64, 64, 4, 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--layouts", default="bs128/l8/s16,bs64/l16/s16,bs16/l64/s16,dense")
    a = ap.parse_args()
    torch.manual_seed(0)
    h, d, n = 32, a.d, a.n
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               n=n, d=d, rows=[])
    for name in a.layouts.split(","):
        if name == "dense":
            layout = ss.local_stride(h, 128, 1, 1, num_dense_heads=h)
        else:
            bs, loc, st = (int(x[2:] if x.startswith("bs") else x[1:]) for x in name.split("/"))
            layout = ss.local_stride(h, bs, loc, st)
        pairs = layout.pairs(n, n)
        sc = d ** -0.5
        out, lse = TL.forward(q, k, v, layout, True, sc, 0, 0)
        best = {}
        for kind, cfgs in (("fwd", FWD), ("dq", DQ), ("dkdv", DKDV)):
            for cfg in cfgs:
                if cfg[0] < layout.block_size and kind == "fwd" and False:
                    continue
                try:
                    with TL.kernel_config(**{kind: cfg}):
                        if kind == "fwd":
                            fn = lambda: TL.forward(q, k, v, layout, True, sc, 0, 0)
                        else:
                            fn = lambda: TL.backward(do, None, q, k, v, out, lse, layout, True, sc, 0, 0)
                        fn()
                        t = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
                except Exception as e:  # noqa: BLE001 - record and go on
                    t = None
                    print(kind, cfg, "failed:", str(e).splitlines()[0][:200], flush=True)
                mult = 1.0 if kind == "fwd" else 2.5
                row = dict(layout=name, kernel=kind, cfg=cfg, ms=t,
                           tflops=(mult * 4 * d * pairs / t / 1e9) if t else None)
                res["rows"].append(row)
                print(row, flush=True)
                if t and (kind not in best or t < best[kind][1]):
                    best[kind] = (cfg, t)
        print("BEST", name, best, flush=True)
        with open(os.path.join(a.out, "tune.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
