"""``starshard eval`` and ``starshard demo``: long-context accuracy of dense, star and ring.

``eval`` runs tasks x lengths x samples through every method on the same token ids, appends one
JSONL line per answer to ``OUT/results.jsonl`` (a rerun skips the answers already there) and
writes ``OUT/report.md`` (accuracy with 95% intervals, star's share of dense with a paired
bootstrap interval) and ``OUT/accuracy.png``, ``OUT/time.png``. ``demo`` is a small fixed run of
it plus a CPU timing of the S2 sparse op (see :mod:`starshard.demo`).
"""
from __future__ import annotations

import argparse
import os
import sys

from .star.cli_generate import _nonneg_int as _nonneg, _positive_int as _positive

__all__ = ["add_parsers", "run_eval_cmd", "finish_report"]


class _ListArg:
    """argparse type: a comma-separated list, each item checked by ``item``."""

    def __init__(self, item, what):
        self.item, self.what = item, what

    def __call__(self, text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected {self.what}, got {text!r}")
        out = []
        for x in items:
            try:
                out.append(self.item(x))
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise argparse.ArgumentTypeError(f"expected {self.what}: {e}") from None
        if len(set(out)) != len(out):
            raise argparse.ArgumentTypeError(f"{text!r} names an item twice")
        return out


def _length(text):
    from .evals.runner import parse_length
    try:
        return parse_length(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _choice(options):
    def parse(text):
        if text not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return text
    return parse


def _common(p):
    p.add_argument("--model", default="default",
                   help="'default' (the embedded SmolLM2-135M-Instruct), a local Hugging Face model "
                        "directory or a .gguf file (default: default)")
    p.add_argument("--hosts", type=_positive, default=4,
                   help="hosts for star and ring, simulated one after another in this process "
                        "(default 4)")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i uses seed SEED + i (default 0)")
    p.add_argument("--out", default=None, help="output folder (results.jsonl, report.md, PNG plots)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dtype", default=None,
                   help="model dtype (default float32 on the CPU, the checkpoint's on a GPU)")
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (default) or cuda (one GPU; the hosts are "
                        "simulated on it)")


def add_parsers(sub):
    """Add the ``eval`` and ``demo`` subcommands."""
    from .evals.runner import ANCHORS, METHODS
    p = sub.add_parser(
        "eval", help="long-context accuracy of dense, star and ring on RULER-style tasks",
        description="Run tasks x lengths x samples through each method on the same token ids, "
                    "greedily; append one JSONL line per answer to OUT/results.jsonl (a rerun skips "
                    "finished answers) and write OUT/report.md, OUT/accuracy.png and OUT/time.png.")
    _common(p)
    p.add_argument("--methods", type=_ListArg(_choice(METHODS), "methods among dense,star,ring"),
                   default=list(METHODS), help="comma-separated (default dense,star,ring)")
    p.add_argument("--tasks", default="passkey",
                   help="comma-separated task names, or 'all' (default passkey)")
    p.add_argument("--lengths", type=_ListArg(_length, "lengths such as 2k,4k"), default=[2048, 4096],
                   help="prompt lengths in tokens, chat template included; k = 1024 (default 2k,4k)")
    p.add_argument("--samples", type=_positive, default=5, help="samples per task and length (default 5)")
    p.add_argument("--block-size", type=_positive, default=None,
                   help="star: tokens per block (default: a quarter of the context)")
    p.add_argument("--anchor-size", type=_nonneg, default=None,
                   help="star: anchor tokens, at most the block (default: the whole block)")
    p.add_argument("--blocks", type=_ListArg(_positive, "block counts such as 2,4,8"), default=None,
                   help="ablation: star with the context cut into each of these block counts")
    p.add_argument("--anchor", type=_ListArg(_choice(ANCHORS), "anchors among none,quarter,full"),
                   default=None, help="ablation: star with each anchor: none, quarter (block), full")
    p.add_argument("--max-new-tokens", type=_positive, default=None,
                   help="tokens generated per answer (default: the answer's tokens + 8)")
    p.add_argument("--processes", action="store_true",
                   help="star and ring on --hosts real local processes (gloo) instead of simulated "
                        "hosts; slower to start, same answers")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="with --processes: seconds before a silent host fails the run (default 600)")
    p.add_argument("--bootstrap", type=_positive, default=2000,
                   help="paired bootstrap resamples (default 2000)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the model directory's own code (off by default)")
    p.set_defaults(func=run_eval_cmd, subparser=p)

    from .demo import add_demo_parser
    add_demo_parser(sub, _common)
    return p


def _tasks(text, parser):
    from .evals import SCORERS, TASKS
    names = sorted(TASKS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        parser.error("--tasks: expected task names, got nothing")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(sorted(TASKS))}")
    unscored = [t for t in names if t not in SCORERS]
    if unscored:
        parser.error(f"--tasks: no scorer for {', '.join(unscored)}")
    if len(set(names)) != len(names):
        parser.error(f"--tasks names a task twice: {text!r}")
    return names


def _fail(cmd, msg):
    print(f"starshard {cmd}: error: {msg}", file=sys.stderr, flush=True)
    return 1


def run_eval_cmd(args, parser):
    """Entry point of ``starshard eval``; returns the exit status."""
    from .evals.runner import EvalConfig, make_variants
    if args.out is None:
        parser.error("--out is required (the folder for results.jsonl, report.md and the plots)")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} exists and is not a folder")
    if args.blocks and args.block_size:
        parser.error("--blocks and --block-size exclude each other")
    if args.anchor and args.anchor_size is not None:
        parser.error("--anchor and --anchor-size exclude each other")
    if "star" not in args.methods and (args.blocks or args.anchor or args.block_size
                                       or args.anchor_size is not None):
        parser.error("--blocks, --anchor, --block-size and --anchor-size need star in --methods")
    if args.block_size and args.anchor_size is not None and args.anchor_size > args.block_size:
        parser.error(f"--anchor-size ({args.anchor_size}) must not exceed --block-size ({args.block_size})")
    if not args.timeout > 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    tasks = _tasks(args.tasks, parser)
    variants = make_variants(args.methods, blocks=args.blocks, block_size=args.block_size,
                             anchors=args.anchor, anchor_size=args.anchor_size)
    cfg = EvalConfig(model=args.model, tasks=tasks, lengths=args.lengths, samples=args.samples,
                     variants=variants, out=args.out, seed=args.seed, hosts=args.hosts,
                     max_new_tokens=args.max_new_tokens, processes=args.processes,
                     timeout=args.timeout, dtype=args.dtype, device=args.device,
                     trust_remote_code=args.trust_remote_code, progress=not args.no_progress)
    return guarded("eval", lambda: _eval(cfg, args.bootstrap))


def guarded(cmd, fn):
    """Run ``fn`` and turn user-facing failures into one line on stderr and exit status 1."""
    from .models import DefaultModelNotInstalled
    from .star.launch import HostFailure
    if os.environ.get("STARSHARD_DEBUG"):
        return fn()
    try:
        return fn()
    except HostFailure as e:
        cause = str(e.cause).strip().splitlines()
        return _fail(cmd, f"host {e.rank} failed: {cause[0] if cause else 'unknown cause'}")
    except (ValueError, TypeError, FileNotFoundError, DefaultModelNotInstalled, RuntimeError,
            OSError) as e:
        return _fail(cmd, str(e) or type(e).__name__)
    except KeyboardInterrupt:
        return _fail(cmd, "interrupted (finished answers are kept; rerun to resume)")


def _eval(cfg, n_boot):
    from .star.cli_generate import _quiet_transformers
    from .evals.runner import RESULTS, load_records, run_eval
    _quiet_transformers()
    records = run_eval(cfg)
    # the folder's report covers every answer in it for this model (earlier rounds, ablations)
    everything = [r for r in load_records(os.path.join(cfg.out, RESULTS)) if r.get("model") == cfg.model]
    summary, report, plots = finish_report(cfg, records, n_boot, everything=everything)
    print(report)
    print(f"results: {os.path.join(cfg.out, RESULTS)} ({len(records)} answers)")
    print(f"report:  {report_path(cfg)}")
    print("plots:   " + ", ".join(str(p) for p in plots))
    return 0


def report_path(cfg):
    return os.path.join(cfg.out, "report.md")


def finish_report(cfg, records, n_boot=2000, *, title="starshard evaluation", everything=None):
    """Summarise ``records`` (or ``everything``, a superset: all answers in the folder), write
    OUT/report.md and the plots; returns (summary, markdown, plots)."""
    from .evals.plots import write_plots
    from .evals.report import markdown_report, summarize
    from .evals.runner import length_label, record_key
    rows = records
    if everything and {record_key(r) for r in everything} > {record_key(r) for r in records}:
        rows = everything
    order = ["dense"] + [v.label for v in cfg.variants]
    summary = summarize(rows, methods=order, n_boot=n_boot, seed=cfg.seed)
    launch = "real local processes" if cfg.processes else "simulated in one process"
    notes = [f"model: {cfg.model}; tasks: {', '.join(cfg.tasks)}; lengths: "
             f"{', '.join(length_label(n) for n in cfg.lengths)}; {cfg.samples} samples each "
             f"(seeds {cfg.seed}..{cfg.seed + cfg.samples - 1}); greedy decoding",
             f"star and ring: {cfg.hosts} hosts, {launch}; dense: one host"]
    if rows is not records:
        ns = [c["n"] for c in summary["cells"]]
        notes.append(f"this report covers all {len(rows)} answers in {cfg.out} for this model, "
                     f"{len(records)} of them in this run's plan; samples per cell: "
                     f"{min(ns)} to {max(ns)}")
    report = markdown_report(summary, title=title, notes=notes)
    with open(report_path(cfg), "w", encoding="utf-8") as fh:
        fh.write(report)
    plots = write_plots(summary, cfg.out)
    return summary, report, plots
