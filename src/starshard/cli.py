"""The ``starshard`` command.

``starshard check`` runs the public op :func:`starshard.sparse_attention` on the CPU over a few
layouts (heterogeneous local-stride, GQA, homo-head with dense heads, dense, a random
``from_mask`` pattern, a chunked prefill, non-causal) at a small ragged length and compares output
and log-sum-exp with the float64 dense reference. It exits 1 if any error is over the tolerance.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time


def _version():
    from . import __version__
    return __version__


def build_parser():
    parser = argparse.ArgumentParser(
        prog="starshard",
        description="starshard: block-sparse long-context attention (S2 attention kernels, Star attention).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser(
        "check", help="check sparse_attention on the CPU against the float64 reference",
        description="Run starshard.sparse_attention on the CPU for several layouts at a small ragged "
                    "length and compare output and LSE with the float64 dense reference. "
                    "Exit status 1 if any error is over --tol.")
    check.add_argument("--n", type=int, default=1531,
                       help="key/query length in tokens (default 1531: not a multiple of any block size)")
    check.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    check.add_argument("--tol", type=float, default=1e-4,
                       help="max abs error allowed on output and LSE (default 1e-4)")
    check.add_argument("--repeat", type=int, default=3,
                       help="timed runs per case after one warm-up; the median is shown (default 3)")
    check.add_argument("--backend", choices=("torch", "triton"), default=None,
                       help="force a backend (default: the op's own choice, torch_blockwise on CPU; "
                            "'triton' on CPU needs TRITON_INTERPRET=1 and a small --n)")
    check.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    check.set_defaults(func=_cmd_check, subparser=check)

    from .star.cli_generate import add_parser as add_generate
    add_generate(sub)
    from .cli_eval import add_parsers as add_eval
    add_eval(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args, args.subparser)


# ---- check ---------------------------------------------------------------------------------------

_HEAD_DIM = 64


def _check_cases(n):
    """(name, builder) pairs; a builder returns (layout, hq, hkv, nq, causal, transposed_q)."""
    import torch

    from .layouts import BlockLayout, local_stride

    def random_mask(gen):
        bs = 32
        nb = -(-n // bs)
        # ~35% of the block pairs; some query blocks of some heads get no key at all
        # (output 0, lse -inf by the op's rule)
        mask = torch.rand(4, nb, nb, generator=gen) < 0.35
        return BlockLayout.from_mask(mask, bs), 4, 4, n, True, False

    return [
        ("local_stride bs64 local4 stride4",
         lambda gen: (local_stride(8, 64, 4, 4), 8, 8, n, True, False)),
        ("local_stride bs16 local8 stride8 GQA 8/2",
         lambda gen: (local_stride(8, 16, 8, 8, num_kv_heads=2), 8, 2, n, True, True)),
        ("homo_head bs32 local4 stride8 +2 dense",
         lambda gen: (local_stride(8, 32, 4, 8, homo_head=True, num_dense_heads=2), 8, 8, n, True, False)),
        ("dense bs64 (all heads dense)",
         lambda gen: (local_stride(4, 64, 1, 1, num_dense_heads=4), 4, 4, n, True, False)),
        ("from_mask bs32 random 35%", random_mask),
        ("prefill Nq=N/4 bs64 local2 stride4 off1",
         lambda gen: (local_stride(4, 64, 2, 4, head_offset=1), 4, 4, max(1, n // 4), True, False)),
        ("non-causal bs32 local2 stride8",
         lambda gen: (local_stride(4, 32, 2, 8, causal=False), 4, 4, n, False, False)),
    ]


def _max_abs_err(x, ref):
    """Max |x - ref| in float64; equal infinities count as 0, NaN as inf."""
    import torch

    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shape {tuple(x.shape)} differs from the reference's {tuple(ref.shape)}")
    diff = torch.where(x == ref, torch.zeros_like(x), (x - ref).abs())
    diff = torch.nan_to_num(diff, nan=math.inf)
    return float(diff.max()) if diff.numel() else 0.0


def _run_case(name, build, n, seed, repeat, backend):
    import torch

    from . import sparse_attention
    from .ops.reference import reference_attention

    gen = torch.Generator().manual_seed(seed)
    layout, hq, hkv, nq, causal, transposed = build(gen)
    d = _HEAD_DIM
    if transposed:  # a strided (non-contiguous) q: [B, H, N, D] memory seen as [B, N, H, D]
        q = torch.randn(1, hq, nq, d, generator=gen).transpose(1, 2)
    else:
        q = torch.randn(1, nq, hq, d, generator=gen)
    k = torch.randn(1, n, hkv, d, generator=gen)
    v = torch.randn(1, n, hkv, d, generator=gen)
    kwargs = {"causal": causal, "return_lse": True}
    if backend is not None:
        kwargs["backend"] = backend

    out, lse = sparse_attention(q, k, v, layout, **kwargs)  # warm-up (builds the tables)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out, lse = sparse_attention(q, k, v, layout, **kwargs)
        times.append((time.perf_counter() - t0) * 1e3)
    ref_out, ref_lse = reference_attention(q, k, v, layout, causal=causal, dtype=torch.float64)
    return {
        "layout": name,
        "repr": repr(layout),
        "heads": f"{hq}/{hkv}" if hq != hkv else str(hq),
        "nq": nq,
        "nk": n,
        "causal": causal,
        "density": layout.density(n),
        "out_err": _max_abs_err(out, ref_out),
        "lse_err": _max_abs_err(lse, ref_lse),
        "time_ms": statistics.median(times) if times else None,
    }


def _cmd_check(args, parser):
    if args.n < 1 or args.n > 8192:
        parser.error(f"--n must be in 1..8192 (the float64 reference is dense), got {args.n}")
    if args.repeat < 0:
        parser.error(f"--repeat must be >= 0, got {args.repeat}")
    import torch

    t_start = time.perf_counter()
    results = []
    for name, build in _check_cases(args.n):
        try:
            rec = _run_case(name, build, args.n, args.seed, args.repeat, args.backend)
            rec["ok"] = rec["out_err"] <= args.tol and rec["lse_err"] <= args.tol
            rec["error"] = None
        except Exception as exc:  # report every case, fail at the end
            rec = {"layout": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results.append(rec)
        if not args.json:
            _print_row(rec, first=len(results) == 1, args=args)
    ok = all(r["ok"] for r in results)
    elapsed = time.perf_counter() - t_start
    if args.json:
        print(json.dumps({
            "starshard": _version(), "torch": torch.__version__, "n": args.n, "seed": args.seed,
            "head_dim": _HEAD_DIM, "dtype": "float32", "tol": args.tol,
            "backend": args.backend or "default", "ok": ok, "seconds": round(elapsed, 2),
            "cases": results}, indent=2))
    else:
        failed = sum(not r["ok"] for r in results)
        verdict = (f"all {len(results)} cases within {args.tol:g}" if ok
                   else f"FAILED: {failed} of {len(results)} cases")
        print(f"{verdict} ({elapsed:.1f} s)")
    return 0 if ok else 1


_COLS = (("layout", 42), ("heads", 5), ("Nq", 5), ("density", 7), ("out err", 9), ("lse err", 9),
         ("ms", 8), ("", 4))


def _print_row(rec, *, first, args):
    if first:
        import torch
        backend = args.backend or "default (torch_blockwise on CPU)"
        print(f"starshard {_version()} check: sparse_attention vs float64 reference; "
              f"backend {backend}; torch {torch.__version__}")
        print(f"N={args.n} B=1 D={_HEAD_DIM} float32 seed={args.seed} tol={args.tol:g}")
        print("  ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(_COLS)))
    if rec.get("error"):
        print(f"{rec['layout']:<42}  ERROR {rec['error']}")
        return
    cells = (rec["layout"], rec["heads"], str(rec["nq"]), f"{rec['density']:.3f}",
             f"{rec['out_err']:.1e}", f"{rec['lse_err']:.1e}",
             "-" if rec["time_ms"] is None else f"{rec['time_ms']:.1f}",
             "ok" if rec["ok"] else "FAIL")
    print("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w)) in enumerate(zip(cells, _COLS))),
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
