"""``starshard demo``: the project's main job on a CPU, in a few minutes.

1. Star attention: the embedded model answers one retrieval task at two lengths, a few samples
   each, with dense attention, Star (4 blocks behind a full-block anchor) and Ring (4 hosts
   simulated in this process), all on the same token ids; it prints the accuracy table with
   95% intervals, where the report and plots went, and one example answer per method.
2. S2 attention: :func:`starshard.sparse_attention` on the CPU at 8k tokens for one
   local-stride layout against dense causal SDPA: time, speed-up and the sparse op's max error
   against the float64 reference (on sampled query rows: the reference is dense).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

__all__ = ["add_demo_parser", "run_demo", "s2_cpu_speed", "format_s2"]


def add_demo_parser(sub, common):
    from .cli_eval import _ListArg, _length, _positive
    p = sub.add_parser(
        "demo", help="the main job: a small dense/star/ring evaluation and the S2 op's CPU speed",
        description="Load the embedded model, answer one retrieval task at two lengths with dense "
                    "attention, Star attention (4 blocks) and Ring attention (hosts simulated in "
                    "this process), print the accuracy table with 95% intervals, the plots' "
                    "location and an example answer per method; then time starshard's S2 sparse op "
                    "on the CPU against dense SDPA. About 2-3 minutes on 2 CPU cores once the model is cached.")
    common(p)
    p.set_defaults(out=None)
    p.add_argument("--task", default="passkey", help="the retrieval task (default passkey)")
    p.add_argument("--lengths", type=_ListArg(_length, "lengths such as 2k,4k"), default=[2048, 4096],
                   help="prompt lengths (default 2k,4k)")
    p.add_argument("--samples", type=_positive, default=4, help="samples per length (default 4)")
    p.add_argument("--s2-n", type=_positive, default=8192, help="tokens for the S2 timing (default 8192)")
    p.add_argument("--s2-repeat", type=_positive, default=3, help="timed S2 runs, median shown (default 3)")
    p.add_argument("--no-s2", action="store_true", help="skip the S2 section")
    p.set_defaults(func=run_demo, subparser=p)
    return p


def run_demo(args, parser):
    """Entry point of ``starshard demo``; returns the exit status."""
    from .cli_eval import _tasks, guarded
    task = _tasks(args.task, parser)
    if len(task) != 1:
        parser.error("--task: the demo runs one task")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} exists and is not a folder")
    return guarded("demo", lambda: _demo(args, task[0]))


def _demo(args, task):
    import torch

    from .cli_eval import finish_report
    from .evals.runner import EvalConfig, Variant, length_label, run_eval
    from .models import load_model
    from .star.cli_generate import _quiet_transformers

    t_start = time.perf_counter()
    out = args.out or tempfile.mkdtemp(prefix="starshard-demo-")
    name = "SmolLM2-135M-Instruct (embedded default)" if args.model == "default" else args.model
    lengths = ", ".join(length_label(n) for n in args.lengths)
    print(f"starshard demo: {name}; torch {torch.__version__} on the CPU, {torch.get_num_threads()} threads")
    print(f"Star attention: task {task} at {lengths} tokens, {args.samples} samples each; dense (one "
          f"host) vs star (4 blocks, anchor = block) vs ring, {args.hosts} hosts simulated in this "
          "process; greedy decoding", flush=True)
    _quiet_transformers()
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    variants = [Variant("dense", "dense"), Variant("star", "star", blocks=4), Variant("ring", "ring")]
    cfg = EvalConfig(model=args.model, tasks=[task], lengths=args.lengths, samples=args.samples,
                     variants=variants, out=out, seed=args.seed, hosts=args.hosts, dtype=args.dtype,
                     device=args.device, progress=not args.no_progress)
    records = run_eval(cfg, model=model, tokenizer=tokenizer)
    _, report, plots = finish_report(cfg, records, title="starshard demo: dense vs star vs ring")
    print()
    print(report)
    print(f"report: {os.path.join(out, 'report.md')}; answers: {os.path.join(out, 'results.jsonl')}")
    print("plots:  " + ", ".join(str(p) for p in plots))
    print()
    print(_example(records, cfg))
    if not args.no_s2:
        print()
        print("S2 attention: the sparse op on the CPU against dense SDPA", flush=True)
        print(format_s2(s2_cpu_speed(n=args.s2_n, repeat=args.s2_repeat, seed=args.seed)))
    print(f"\ndemo done in {time.perf_counter() - t_start:.0f} s")
    return 0


def _example(records, cfg):
    """One example answer per method: sample 0 at the longest length."""
    from .evals.runner import length_label
    n = max(cfg.lengths)
    rows = [r for r in records if r["length"] == n and r["sample"] == 0]
    if not rows:
        return "(no example)"
    lines = [f"Example answers ({rows[0]['task']}, {length_label(n)}, sample 0; prompt "
             f"{rows[0]['context_tokens'] + rows[0]['query_tokens']} tokens; expected "
             f"{', '.join(rows[0]['expected'])}; the answer follows the prefill "
             f"{rows[0]['prefill']!r}):"]
    width = max(len(r["method"]) for r in rows)
    for r in rows:
        mark = "right" if r["correct"] else "wrong"
        lines.append(f"  {r['method']:<{width}}  {r['answer']!r}  ({mark}, {r['timings']['wall_s']:.1f} s)")
    return "\n".join(lines)


# ---- S2 -----------------------------------------------------------------------------------------

def s2_cpu_speed(n=8192, *, heads=8, head_dim=64, block=64, local=4, stride=16, repeat=3, seed=0,
                 check_rows=64):
    """Time ``sparse_attention`` (CPU path) against dense causal SDPA at ``n`` tokens, fp32, for
    ``local_stride(heads, block, local, stride)``; the error is the sparse op's max |out - ref|
    against the float64 reference on ``check_rows`` query rows at the start, middle and end."""
    import torch
    import torch.nn.functional as F

    from . import local_stride, sparse_attention
    from .ops.reference import reference_attention

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, heads, head_dim, generator=g) for _ in range(3))
    layout = local_stride(heads, block, local, stride)

    def timed(fn):
        fn()  # warm-up (builds the lookup tables)
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            res = fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts), res

    sparse_s, out = timed(lambda: sparse_attention(q, k, v, layout))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    dense_s, _ = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    err, rows = 0.0, set()
    m = min(check_rows, n)
    for start in sorted({0, max(0, n // 2 - m // 2), n - m}):
        ref, _ = reference_attention(q[:, start:start + m], k, v, layout, q_start=start)
        err = max(err, float((out[:, start:start + m].double() - ref).abs().max()))
        rows.update(range(start, start + m))
    return dict(n=n, heads=heads, head_dim=head_dim, layout=f"local_stride(heads={heads}, block={block}, "
                f"local={local}, stride={stride})", density=layout.density(n), sparse_s=sparse_s,
                sdpa_s=dense_s, speedup=dense_s / sparse_s if sparse_s > 0 else float("inf"),
                max_err=err, check_rows=len(rows), threads=torch.get_num_threads())


def format_s2(r):
    return "\n".join([
        f"  N={r['n']}, B=1, H={r['heads']}, D={r['head_dim']}, float32, causal; {r['layout']}: "
        f"density {r['density']:.3f}",
        f"  sparse_attention (CPU blockwise path): {r['sparse_s'] * 1e3:8.1f} ms",
        f"  dense SDPA (causal):                   {r['sdpa_s'] * 1e3:8.1f} ms",
        f"  speed-up {r['speedup']:.2f}x; max error against the float64 reference "
        f"{r['max_err']:.1e} (on {r['check_rows']} sampled query rows)"])


if __name__ == "__main__":  # pragma: no cover
    from .cli import main
    sys.exit(main(["demo", *sys.argv[1:]]))
