"""Benchmark of the S2 block-sparse attention op on a GPU.

One run times, on the same inputs:
  * starshard   ``starshard.sparse_attention(q, k, v, layout)`` (Triton kernels),
  * sdpa        PyTorch SDPA, flash backend, dense causal (the baseline of the speed-ups),
  * flex        FlexAttention (``torch.compile``-d) on the same layout: its BlockMask comes from
                ``starshard.layouts.kv_block_table``; blocks strictly below the diagonal are
                "full" (no mask_mod), the diagonal block is "partial" (causal mask_mod).
Shapes: B=1, H=32, D=128, bf16, causal, N in {8k, 32k, 128k}; forward and forward+backward.
Times are ``triton.testing.do_bench`` medians over calls rotating through several random input
sets. Effective TFLOP/s counts attended pairs only: 4*D*pairs / time forward, 3.5x that for
forward+backward (pairs = layout.pairs(N, N), H*N*(N+1)/2 for SDPA). Peak memory is the rise in
``torch.cuda.max_memory_allocated`` during one call. Before timing, at the smallest N of each
layout, starshard's output is compared with flex's (and with SDPA's for the dense layout).

Results: benchmarks/results/bench_sparse_attn.json (GPU, versions, date, one record per case);
a Markdown summary is printed last.

    python benchmarks/bench_sparse_attn.py                   # everything (long)
    python benchmarks/bench_sparse_attn.py --quick           # smoke run, a minute or two
    python benchmarks/bench_sparse_attn.py --n 8k,32k --layouts bs64_l16_s16,dense_bs128 --modes fwd
    python benchmarks/bench_sparse_attn.py --list            # the plan and densities, no GPU needed

On the GPU machines (no internet) run it from a checkout with ``PYTHONPATH=src`` or after
``pip install --no-deps -e .``.
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, env_info, fmt, free_memory, markdown_table, measure,  # noqa: E402
                     parse_sizes, rotating, size_label, try_call, write_json)

NAME = "bench_sparse_attn"

# name -> local_stride arguments (num_heads comes from --heads)
LAYOUTS = {
    "bs128_l8_s16": dict(block_size=128, local_blocks=8, vert_stride=16),
    "bs64_l16_s16": dict(block_size=64, local_blocks=16, vert_stride=16),
    "bs32_l32_s16": dict(block_size=32, local_blocks=32, vert_stride=16),
    "bs16_l64_s16": dict(block_size=16, local_blocks=64, vert_stride=16),
    "bs64_l16_s64": dict(block_size=64, local_blocks=16, vert_stride=64),
    "bs128_l8_s64": dict(block_size=128, local_blocks=8, vert_stride=64),
    "dense_bs128": dict(block_size=128, local_blocks=8, vert_stride=16, dense=True),
}
VARIANTS = ("starshard", "flex", "sdpa")
MODES = ("fwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FWD_BWD_FLOP_RATIO = 3.5
QUICK = dict(n="2k", layouts="bs64_l16_s16,bs16_l64_s16,dense_bs128", sets=2, warmup_ms=5, rep_ms=20)


# ---- layouts and FlexAttention block tables (pure, CPU-testable) -------------------------------

def make_layout(name, num_heads):
    """The named benchmark layout for ``num_heads`` heads (the dense one: every head dense)."""
    import starshard

    spec = dict(LAYOUTS[name])
    dense = spec.pop("dense", False)
    return starshard.local_stride(num_heads, **spec, num_dense_heads=num_heads if dense else 0)


def flex_block_tables(layout, n, *, device="cpu"):
    """FlexAttention block tables of a causal ``layout`` over ``n`` queries and keys.

    Returns ``(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices)``: counts int32
    ``[1, H, nb]``, indices int32 ``[1, H, nb, nb]`` (``nb = ceil(n / block_size)``; the index
    rows are padded to ``nb`` columns, as ``BlockMask.from_kv_blocks`` transposes them over their
    last dimension). The "partial" tables hold only the diagonal block, which needs the causal
    mask_mod; every attended block strictly below the diagonal goes to the "full" tables, where
    FlexAttention skips the mask_mod.
    """
    from starshard.layouts import kv_block_table

    nb = -(-n // layout.block_size)
    counts, idx = kv_block_table(layout, nb, nb, causal=True, device=device)  # idx sorted ascending
    rows = torch.arange(nb, device=device, dtype=torch.int32).view(1, -1)
    last = idx.gather(-1, (counts.long() - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    has_diag = (counts > 0) & (last == rows)           # causal: the diagonal is the last entry
    full_counts = counts - has_diag.to(torch.int32)
    pos = torch.arange(idx.shape[-1], device=device).view(1, 1, -1)
    full_idx = torch.where(pos < full_counts.unsqueeze(-1), idx, torch.zeros_like(idx))
    full_idx = torch.nn.functional.pad(full_idx, (0, nb - idx.shape[-1]))
    part_counts = has_diag.to(torch.int32)
    part_idx = torch.zeros_like(full_idx)
    part_idx[..., 0] = torch.where(has_diag, rows, torch.zeros_like(rows))
    return tuple(t.unsqueeze(0).contiguous() for t in (part_counts, part_idx, full_counts, full_idx))


def causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_block_mask(layout, n, *, device="cpu"):
    """A FlexAttention ``BlockMask`` for ``layout`` over ``n`` tokens (see flex_block_tables)."""
    from torch.nn.attention.flex_attention import BlockMask

    part_counts, part_idx, full_counts, full_idx = flex_block_tables(layout, n, device=device)
    kwargs = {}
    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["seq_lengths"] = (n, n)
    return BlockMask.from_kv_blocks(part_counts, part_idx, full_counts, full_idx,
                                    BLOCK_SIZE=layout.block_size, mask_mod=causal_mask_mod, **kwargs)


def block_mask_bytes(block_mask):
    return sum(t.numel() * t.element_size() for t in vars(block_mask).values()
               if isinstance(t, torch.Tensor))


def dense_causal_pairs(num_heads, n):
    return num_heads * n * (n + 1) // 2


def tflops(pairs, head_dim, mode, time_ms):
    if time_ms is None or time_ms <= 0:
        return None
    flop = 4 * head_dim * pairs * (FWD_BWD_FLOP_RATIO if mode == "fwdbwd" else 1.0)
    return flop / (time_ms * 1e-3) / 1e12


# ---- the variants: each maps [B, N, H, D] inputs to a [B, N, H, D] output ----------------------

def starshard_op(layout):
    import starshard

    return lambda q, k, v: starshard.sparse_attention(q, k, v, layout)


def sdpa_op():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    def op(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True)
        return out.transpose(1, 2)
    return op


_FLEX = {}
FLEX_COMPILE_MODES = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}


def compiled_flex(compile_mode="default"):
    """``torch.compile``-d flex_attention, one per compile mode (shared by every layout)."""
    if compile_mode not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        # one graph per (shape, block size, grad mode): allow more recompiles than the default 8
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
        # max-autotune prints every candidate's timing: keep the benchmark's own output readable
        import torch._inductor.config as inductor_config
        for knob, value in (("autotune_num_choices_displayed", 0), ("max_autotune_report_choices_stats", False)):
            if hasattr(inductor_config, knob):
                setattr(inductor_config, knob, value)
        _FLEX[compile_mode] = torch.compile(flex_attention, dynamic=False,
                                            mode=FLEX_COMPILE_MODES[compile_mode])
    return _FLEX[compile_mode]


def flex_kernel_options(block_size):
    """Forward tiles that divide the sparse block: flex's default 128x64 tile needs blocks of 128."""
    if block_size >= 128:
        return None
    return {"fwd_BLOCK_M": block_size, "fwd_BLOCK_N": min(64, block_size)}


def flex_op(block_mask, compile_mode="default"):
    flex = compiled_flex(compile_mode)
    options = flex_kernel_options(block_mask.BLOCK_SIZE[0])

    def op(q, k, v):
        out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                   kernel_options=options)
        return out.transpose(1, 2)
    return op


def timed_fn(op, mode):
    """fn(q, k, v, g) for one mode: forward under no_grad, or forward + backward (grads returned)."""
    if mode == "fwd":
        def fn(q, k, v, g):
            with torch.no_grad():
                return op(q, k, v)
    else:
        def fn(q, k, v, g):
            out = op(q, k, v)
            return torch.autograd.grad(out, (q, k, v), g)
    return fn


def make_inputs(n, args, device="cuda"):
    dtype = DTYPES[args.dtype]
    sets = []
    for s in range(args.sets):
        gen = torch.Generator(device=device).manual_seed(args.seed + s)
        shape = (1, n, args.heads, args.head_dim)
        q, k, v, g = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(4))
        sets.append((q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), g))
    return sets


def max_abs_diff(a, b):
    return float((a.float() - b.float()).abs().max())


# ---- the run -------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default=None, help="sequence lengths, comma separated (default 8k,32k,128k)")
    p.add_argument("--layouts", default=None, help=f"comma separated, or all (default): {', '.join(LAYOUTS)}")
    p.add_argument("--modes", default="fwd,fwdbwd", help="fwd, fwdbwd or both (default both)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="starshard, flex, sdpa (default all)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sets", type=int, default=3, help="random input sets to rotate through (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up (default 25 ms)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time (default 100 ms)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness spot check")
    p.add_argument("--flex-compile", choices=sorted(FLEX_COMPILE_MODES), default="default",
                   help="FlexAttention's first torch.compile mode; on a compile error the other one is "
                        "tried (max-autotune searches more tile configs: slower to compile)")
    p.add_argument("--merge", action="store_true",
                   help="keep the records of an earlier run in --out (same GPU and shapes) that this run "
                        "does not redo: split a long run into several commands")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: N={QUICK['n']}, layouts {QUICK['layouts']}, short timing "
                        "(explicit --n/--layouts still win); results go to *_quick.json")
    p.add_argument("--list", action="store_true", help="print the cases and densities and exit (CPU only)")
    p.add_argument("--out", default=None, help=f"results JSON (default benchmarks/results/{NAME}.json)")
    return p


def _split(text, allowed, what):
    items = list(allowed) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.n = args.n or QUICK["n"]
        args.layouts = args.layouts or QUICK["layouts"]
        args.sets = min(args.sets, QUICK["sets"])
        args.warmup_ms, args.rep_ms = QUICK["warmup_ms"], QUICK["rep_ms"]
    args.n = args.n or "8k,32k,128k"
    args.layouts = args.layouts or "all"
    try:
        args.sizes = sorted(parse_sizes(args.n))
        args.layout_names = _split(args.layouts, LAYOUTS, "layout")
        args.mode_names = _split(args.modes, MODES, "mode")
        args.variant_names = _split(args.variants, VARIANTS, "variant")
    except ValueError as exc:
        parser.error(str(exc))
    if args.sets < 1 or args.heads < 1 or args.head_dim < 1:
        parser.error("--sets, --heads and --head-dim must be >= 1")
    if args.out is None:
        args.out = str(RESULTS / (f"{NAME}_quick.json" if args.quick else f"{NAME}.json"))
    return args


def plan(args):
    """(layout name, N, pairs, density) for every case; pairs are exact (layout.pairs)."""
    cases = []
    for name in args.layout_names:
        layout = make_layout(name, args.heads)
        for n in args.sizes:
            pairs = layout.pairs(n, n, True)
            cases.append((name, n, pairs, pairs / dense_causal_pairs(args.heads, n)))
    return cases


def record_key(r):
    return (r.get("variant"), r.get("layout"), r.get("n"), r.get("mode"))


def run(args):
    info = env_info()
    config = {"batch": 1, "heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype, "causal": True,
              "input_sets": args.sets, "flex_compile": args.flex_compile,
              "do_bench": {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "return_mode": "median"}}
    payload = {"benchmark": NAME, **info, "config": config, "checks": [], "records": []}
    old = load_for_merge(args.out, payload) if args.merge else None
    print(f"{NAME}: {info['gpu']}, torch {info['torch']}, triton {info['triton']}, "
          f"starshard {info['starshard']}", flush=True)
    pairs_of = {(name, n): pairs for name, n, pairs, _ in plan(args)}
    checked = set()

    def record(rec):
        payload["records"].append(rec)
        t = fmt(rec["time_ms"], ".3f")
        extra = f" {rec['status']}: {rec['error'][:200]}" if rec["status"] != "ok" else ""
        print(f"  {rec['variant']:<9} {rec['layout']:<14} N={size_label(rec['n']):<5} {rec['mode']:<6} "
              f"{t:>9} ms {fmt(rec['tflops'], '.1f'):>7} TFLOP/s  peak {fmt(rec['peak_mib'], '.0f')} MiB"
              f"{extra}", flush=True)

    def time_variant(variant, layout_name, n, mode, candidates, pairs, inputs, **extra):
        """Time the first candidate (label, op) that runs; earlier failures are kept in the record."""
        failed = []
        for label, op in candidates:
            rec = measure(rotating(timed_fn(op, mode), inputs), warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
            if rec["status"] != "error":
                break
            failed.append({"config": label, "error": rec["error"]})
        rec.update(variant=variant, layout=layout_name, n=n, mode=mode, config=label, failed_configs=failed,
                   pairs=pairs, tflops=tflops(pairs, args.head_dim, mode, rec["time_ms"]), **extra)
        record(rec)

    for n in args.sizes:
        inputs, err = try_call(lambda: make_inputs(n, args))
        if err:
            print(f"N={n}: could not allocate the inputs: {err['error']}", flush=True)
            payload["records"].append({"variant": "inputs", "n": n, **err})
            continue
        sdpa_pairs = dense_causal_pairs(args.heads, n)
        if "sdpa" in args.variant_names:
            for mode in args.mode_names:
                time_variant("sdpa", "dense_causal", n, mode, [("flash", sdpa_op())], sdpa_pairs, inputs,
                             density=1.0)
        for name in args.layout_names:
            layout = make_layout(name, args.heads)
            pairs = pairs_of[(name, n)]
            density = pairs / sdpa_pairs
            variants = {}  # variant -> (candidates [(label, op)], extra record fields)
            if "starshard" in args.variant_names:
                variants["starshard"] = ([("triton", starshard_op(layout))], {})
            bm = None
            if "flex" in args.variant_names:
                bm, err = try_call(lambda: flex_block_mask(layout, n, device="cuda"))
                if err:
                    for mode in args.mode_names:
                        record({"variant": "flex", "layout": name, "n": n, "mode": mode, "pairs": pairs,
                                "density": density, "time_ms": None, "peak_mib": None, "tflops": None,
                                "stage": "block_mask", **err})
                else:
                    modes = [args.flex_compile] + [m for m in FLEX_COMPILE_MODES if m != args.flex_compile]
                    variants["flex"] = ([(m, flex_op(bm, m)) for m in modes],
                                        {"block_mask_mib": block_mask_bytes(bm) / 2**20,
                                         "kernel_options": flex_kernel_options(layout.block_size)})
            if not args.no_check and name not in checked:
                checked.add(name)
                payload["checks"].append(spot_check(name, n, density, variants, inputs[0]))
            for variant, (candidates, extra) in variants.items():
                for mode in args.mode_names:
                    time_variant(variant, name, n, mode, candidates, pairs, inputs, density=density, **extra)
            del variants, bm
            free_memory()
        del inputs
        free_memory()
        save(args.out, payload, old)
    path = save(args.out, payload, old)
    print(f"\nwrote {path}\n")
    print(summary_table(load_json(path)))
    return payload


def load_json(path):
    import json

    return json.loads(Path(path).read_text())


def load_for_merge(path, payload):
    """The records of an earlier run to keep (--merge), if it ran on the same GPU and config."""
    if not Path(path).exists():
        return None
    old = load_json(path)
    same = (old.get("gpu") == payload["gpu"] and old.get("config", {}).get("heads") == payload["config"]["heads"]
            and old.get("config", {}).get("head_dim") == payload["config"]["head_dim"]
            and old.get("config", {}).get("dtype") == payload["config"]["dtype"])
    if not same:
        raise SystemExit(f"--merge: {path} holds another GPU or shape config; choose another --out")
    return old


def merge_payload(payload, old):
    """This run's records and checks over an earlier run's (same case key: this run wins)."""
    if not old:
        return payload
    new_keys = {record_key(r) for r in payload["records"]}
    new_checks = {c["layout"] for c in payload["checks"]}
    merged = dict(payload)
    merged["records"] = [r for r in old.get("records", []) if record_key(r) not in new_keys] + payload["records"]
    merged["checks"] = [c for c in old.get("checks", []) if c["layout"] not in new_checks] + payload["checks"]
    merged["merged_runs"] = old.get("merged_runs", [old.get("date")]) + [payload["date"]]
    return merged


def save(path, payload, old):
    out = merge_payload(payload, old)
    add_speedups(out["records"])
    return write_json(path, out)


def spot_check(name, n, density, variants, inputs):
    """starshard vs flex (and SDPA for the dense layout) forward outputs on one input set."""
    q, k, v, _ = inputs
    check = {"layout": name, "n": n, "dtype": str(q.dtype).replace("torch.", "")}
    others = {variant: cands for variant, (cands, _) in variants.items() if variant != "starshard"}
    if density == 1.0:
        others["sdpa"] = [("flash", sdpa_op())]
    if "starshard" not in variants:
        return check
    with torch.no_grad():
        ref, err = try_call(lambda: variants["starshard"][0][0][1](q, k, v))
        if err:
            check["starshard"] = err
            print(f"  check {name} N={size_label(n)}: starshard failed: {err['error'][:300]}", flush=True)
            return check
        check["max_abs_out"] = float(ref.float().abs().max())
        check["starshard_finite"] = bool(torch.isfinite(ref).all())
        for variant, cands in others.items():
            for label, op in cands:
                out, err = try_call(lambda: op(q, k, v))
                if not err:
                    break
            res = err or {"max_abs_diff": max_abs_diff(ref, out)}
            check[f"vs_{variant}"] = {"config": label, **res}
            print(f"  check {name} N={size_label(n)}: starshard vs {variant} ({label}): "
                  f"{err['error'][:300] if err else format(res['max_abs_diff'], '.3e')}", flush=True)
    return check


def add_speedups(records):
    sdpa = {(r["n"], r["mode"]): r["time_ms"] for r in records
            if r.get("variant") == "sdpa" and r.get("time_ms")}
    for r in records:
        base = sdpa.get((r.get("n"), r.get("mode")))
        r["speedup_vs_sdpa"] = base / r["time_ms"] if base and r.get("time_ms") else None


def summary_table(payload):
    recs = payload["records"]
    by = {(r.get("variant"), r.get("layout"), r.get("n"), r.get("mode")): r for r in recs}
    sdpa = {(r["n"], r["mode"]): r for r in recs if r.get("variant") == "sdpa"}
    rows = []
    keys = sorted({(r["layout"], r["n"], r["mode"]) for r in recs if r.get("variant") in ("starshard", "flex")},
                  key=lambda x: (x[1], list(LAYOUTS).index(x[0]) if x[0] in LAYOUTS else 99, x[2]))

    def cell(r, field, spec):
        if r is None:
            return "-"
        if r.get("status") not in (None, "ok"):
            return r["status"].upper()
        return fmt(r.get(field), spec)

    autotuned = False
    for layout, n, mode in keys:
        s = by.get(("starshard", layout, n, mode))
        f = by.get(("flex", layout, n, mode))
        d = sdpa.get((n, mode))
        density = (s or f or {}).get("density")
        vs_flex = (f["time_ms"] / s["time_ms"] if s and f and s.get("time_ms") and f.get("time_ms") else None)
        flex_time = cell(f, "time_ms", ".3f")
        if f and f.get("time_ms") and f.get("config") == "max-autotune":
            flex_time += " (a)"
            autotuned = True
        rows.append([layout, size_label(n), fmt(density, ".3f"), mode,
                     cell(s, "time_ms", ".3f"), cell(s, "tflops", ".1f"), flex_time,
                     cell(f, "tflops", ".1f"), cell(d, "time_ms", ".3f"), cell(d, "tflops", ".1f"),
                     cell(s, "speedup_vs_sdpa", ".2f"), fmt(vs_flex, ".2f"),
                     cell(s, "peak_mib", ".0f"), cell(f, "peak_mib", ".0f")])
    cfg = payload["config"]
    title = (f"S2 sparse attention, {payload.get('gpu')}, B=1 H={cfg['heads']} D={cfg['head_dim']} "
             f"{cfg['dtype']} causal; times in ms (do_bench median), TFLOP/s over attended pairs")
    headers = ["layout", "N", "density", "mode", "starshard ms", "TFLOP/s", "flex ms", "flex TFLOP/s",
               "SDPA ms", "SDPA TFLOP/s", "x SDPA", "x flex", "starshard MiB", "flex MiB"]
    notes = "\n\n(a) FlexAttention compiled with mode=max-autotune-no-cudagraphs" if autotuned else ""
    errors = sorted({f"{r['variant']} {r['layout']} N={size_label(r['n'])} {r['mode']}: {r['error'][:160]}"
                     for r in recs if r.get("status") not in (None, "ok") and r.get("layout")})
    if errors:
        notes += "\n\nFailures (full text in the JSON):\n" + "\n".join(f"- {e}" for e in errors)
    return title + "\n\n" + markdown_table(headers, rows) + notes


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        rows = [[name, size_label(n), f"{pairs:,}", f"{density:.4f}"] for name, n, pairs, density in plan(args)]
        print(markdown_table(["layout", "N", "pairs", "density"], rows))
        return 0
    if not torch.cuda.is_available():
        print(f"{NAME}: needs a CUDA GPU (use --list to see the plan on a CPU)", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
