"""Time tile configurations of the three Triton kernels (forward, dq, dk/dv) on a GPU.

python benchmarks/tune_kernels.py --out DIR [--n 32768] [--d 128]
python benchmarks/tune_kernels.py --backward --out DIR      # backward strategies
Times the forward for each forward config, and the whole backward for each dq config (dk/dv
fixed) and each dk/dv config (dq fixed), on a few layouts; writes tune.json under --out and
prints the best per layout. Used to fill the configuration table in ops/triton_launch.py.
``--schedule`` times forward and backward under launch-order and pipelining variants
(SCHEDULES, or tile labels such as dkdv-64x64x4x3), each checked against the first variant's
results.
``--backward`` instead times the dk/dv kernel's variants (loop structure, merged key tiles)
over dk/dv tiles, each checked against the default's gradients. (An earlier run also timed dq by fp32 atomics inside the dk/dv
kernel: 1.3-2x slower everywhere, so it was dropped; results/tune_bwd_h100_32k.json.)
"""
import argparse
import json
import os
import re
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
    ap.add_argument("--backward", action="store_true", help="time the backward strategies")
    ap.add_argument("--schedule", default=None,
                    help=f"time these launch variants, comma separated, of {sorted(SCHEDULES)} "
                         "or KERNEL-MxNxWxS (tiles of fwd, dq or dkdv; fwd-whole-MxNxWxS too)")
    ap.add_argument("--fwd-only", action="store_true", help="--schedule: time the forward only")
    a = ap.parse_args()
    torch.manual_seed(0)
    h, d, n = 32, a.d, a.n
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               n=n, d=d, rows=[])
    for name in a.layouts.split(","):
        layout = _layout(name, h)
        pairs = layout.pairs(n, n)
        if a.backward:
            _strategies(res, name, layout, pairs, q, k, v, do, d, a.out)
            continue
        if a.schedule:
            _schedules(res, name, layout, pairs, q, k, v, do, d, a.out, a.schedule.split(","),
                       a.fwd_only)
            continue
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


def _layout(name, h):
    if name == "dense":
        return ss.local_stride(h, 128, 1, 1, num_dense_heads=h)
    bs, loc, st = (int(x[2:] if x.startswith("bs") else x[1:]) for x in name.split("/"))
    return ss.local_stride(h, bs, loc, st)


# (label, strategy overrides, dk/dv tiles to try; None = the table's)
STRATEGIES = [
    ("split", {}, [None, (64, 128, 8, 3)]),
    ("merge-k", dict(merge_k=True), [None, (64, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3)]),
    ("split-ms2", dict(dkdv_masked_stages=2), [None]),
]


def _strategies(res, name, layout, pairs, q, k, v, do, d, out_dir):
    sc = d ** -0.5
    out, lse = TL.forward(q, k, v, layout, True, sc, 0, 0)
    base = TL.backward(do, None, q, k, v, out, lse, layout, True, sc, 0, 0)
    scale = [g.float().abs().max().item() for g in base]
    for label, over, tiles in STRATEGIES:
        for tile in tiles:
            cfg = dict(over, **({"dkdv": tile} if tile else {}))
            row = dict(layout=name, kernel="bwd", strategy=label, cfg=tile)
            try:
                with TL.kernel_config(**cfg):
                    fn = lambda: TL.backward(do, None, q, k, v, out, lse, layout, True, sc, 0, 0)
                    grads = fn()
                    row["max_rel_diff"] = max((g.float() - b.float()).abs().max().item() / s
                                              for g, b, s in zip(grads, base, scale))
                    row["ms"] = triton.testing.do_bench(fn, warmup=30, rep=150, return_mode="median")
                    row["tflops"] = 2.5 * 4 * d * pairs / row["ms"] / 1e9
            except Exception as e:  # noqa: BLE001 - record and go on
                row["error"] = str(e).splitlines()[0][:200]
            res["rows"].append(row)
            print(row, flush=True)
            with open(os.path.join(out_dir, "tune_bwd.json"), "w") as f:
                json.dump(res, f, indent=1)


SCHEDULES = {
    "default": {},
    "natural": dict(schedule="natural"),
    "lpt": dict(schedule="lpt"),
    "dq-natural": dict(schedule_dq="natural"),
    "fwd-lpt": dict(schedule_fwd="lpt"),
    "dkdv-natural": dict(schedule_dkdv="natural"),
    "fwd-plain": dict(fwd_fused=False, fwd_tma=False),
    "fwd-fused": dict(fwd_fused=True, fwd_tma=False),
    "fwd-tma": dict(fwd_fused=False, fwd_tma=True),
    "fwd-fused-tma": dict(fwd_fused=True, fwd_tma=True),
    "fwd-halves": dict(fwd_halves=True),
    "fwd-whole": dict(fwd_halves=False),
    "fwd-halves-x2": dict(fwd_halves=True, fwd=(128, 64, 4, 2)),
    "fwd-halves-x4": dict(fwd_halves=True, fwd=(128, 64, 4, 4)),
}


_TILES = re.compile(r"((fwd|dq|dkdv)(?:-[a-z]+)?)-(\d+)x(\d+)x(\d+)x(\d+)")


def _schedule(label):
    """Settings of a --schedule variant: a name in SCHEDULES, or NAME-MxNxWxS, the tiles
    (BLOCK_M, BLOCK_N, warps, stages) of NAME's kernel (fwd, dq or dkdv) with NAME's own
    settings where NAME is in SCHEDULES too (fwd-128x64x4x3, dkdv-64x64x4x3,
    fwd-whole-128x64x4x3)."""
    if label in SCHEDULES:
        return SCHEDULES[label]
    m = _TILES.fullmatch(label)
    if m is None or (m[1] != m[2] and m[1] not in SCHEDULES):
        raise KeyError(label)
    return dict(SCHEDULES.get(m[1], {}), **{m[2]: tuple(int(x) for x in m.groups()[2:])})


def _schedules(res, name, layout, pairs, q, k, v, do, d, out_dir, names, fwd_only=False):
    sc = d ** -0.5
    base = None
    for label in names:
        row = dict(layout=name, kernel="schedule", variant=label)
        try:
            with TL.kernel_config(**_schedule(label)):
                fwd = lambda: TL.forward(q, k, v, layout, True, sc, 0, 0)
                out, lse = fwd()
                bwd = lambda: TL.backward(do, None, q, k, v, out, lse, layout, True, sc, 0, 0)
                got = (out, lse) if fwd_only else (out,) + tuple(bwd())
                if base is None:
                    base = got
                row["max_rel_diff"] = max((g.float() - b.float()).abs().max().item() /
                                          max(b.float().abs().max().item(), 1e-30)
                                          for g, b in zip(got, base))
                row["fwd_ms"] = triton.testing.do_bench(fwd, warmup=30, rep=150, return_mode="median")
                row["fwd_tflops"] = 4 * d * pairs / row["fwd_ms"] / 1e9
                if not fwd_only:
                    row["bwd_ms"] = triton.testing.do_bench(bwd, warmup=30, rep=150, return_mode="median")
                    row["fwdbwd_ms"] = row["fwd_ms"] + row["bwd_ms"]
        except Exception as e:  # noqa: BLE001 - record and go on
            row["error"] = str(e).splitlines()[0][:200]
        res["rows"].append(row)
        print(row, flush=True)
        with open(os.path.join(out_dir, "tune_schedule.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
