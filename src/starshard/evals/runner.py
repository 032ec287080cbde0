"""The evaluation runner: the same samples through every method, one JSONL line per answer.

For each task, length and sample index the sample is generated once (seeded), turned into token
ids once, and every method variant (dense, ring, star with its block and anchor sizes) answers
exactly those ids, greedily. Each answer is appended to ``results.jsonl`` and flushed at once;
a rerun into the same folder skips every answer already there (key: model, task, length,
sample, method label, prompt hash), so an interrupted run loses at most the answer in flight.

Hosts are simulated in this process by default (one after another: the same results as real
hosts, far faster on a few CPU cores); ``processes=True`` starts real local host processes for
star and ring through :func:`starshard.star.launch.run_local`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Variant", "EvalConfig", "make_variants", "parse_length", "parse_lengths",
           "length_label", "run_eval", "load_records", "record_key", "RESULTS", "ANCHORS"]

RESULTS = "results.jsonl"
ANCHORS = ("none", "quarter", "full")
METHODS = ("dense", "star", "ring")


# ---- method variants ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One method configuration; ``label`` names it in the JSONL, the table and the plots.

    star: ``blocks`` (the context cut into that many blocks) or ``block_size`` (tokens), else
    the engine's default (4 blocks); ``anchor``: "full" (the block, the default), "quarter"
    (a quarter block), "none" (no anchor) or a number of tokens (at most the block).
    """
    label: str
    method: str
    blocks: int | None = None
    block_size: int | None = None
    anchor: object = None

    def sizes(self, n_ctx, num_params):
        """(block_size, anchor_size) for a context of ``n_ctx`` tokens; (None, None) unless star."""
        if self.method != "star":
            return None, None
        if self.blocks:
            block = math.ceil(n_ctx / self.blocks)
        elif self.block_size:
            block = self.block_size
        else:
            from ..star.partition import default_block_size
            block = default_block_size(n_ctx, num_params)
        a = self.anchor
        if a is None or a == "full":
            anchor = block
        elif a == "quarter":
            anchor = max(1, block // 4)
        elif a == "none":
            anchor = 0
        else:
            anchor = int(a)
            if anchor > block:
                raise ValueError(f"{self.label}: anchor size {anchor} exceeds the block size {block}")
        return block, anchor


def make_variants(methods, *, blocks=None, block_size=None, anchors=None, anchor_size=None):
    """Variants for ``methods`` ("dense", "star", "ring"); star expands over ``blocks`` (block
    counts) x ``anchors`` ("none" | "quarter" | "full") when either list is given (labels like
    ``star[b4,a=full]``), else it is one variant, "star", with ``block_size`` / ``anchor_size``."""
    if blocks and block_size:
        raise ValueError("give block counts (blocks) or a block size (block_size), not both")
    if anchors and anchor_size is not None:
        raise ValueError("give anchor kinds (anchors) or an anchor size (anchor_size), not both")
    if block_size and anchor_size is not None and anchor_size > block_size:
        raise ValueError(f"anchor size ({anchor_size}) must not exceed the block size ({block_size})")
    for a in anchors or ():
        if a not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {a!r}")
    out = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {m!r}")
        if m != "star":
            out.append(Variant(m, m))
        elif blocks or anchors:
            for b in blocks or [None]:
                for a in anchors or [anchor_size if anchor_size is not None else "full"]:
                    parts = ([f"b{b}"] if b else [f"bs{block_size}"] if block_size else []) + [f"a={a}"]
                    out.append(Variant(f"star[{','.join(parts)}]", "star", blocks=b,
                                       block_size=block_size, anchor=a))
        else:
            out.append(Variant("star", "star", block_size=block_size, anchor=anchor_size))
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods repeat: {labels}")
    return out


# ---- lengths --------------------------------------------------------------------------------------

def parse_length(text):
    """'2k' -> 2048, '1.5k' -> 1536, '3000' -> 3000 (tokens; k = 1024, as RULER counts)."""
    t = str(text).strip().lower()
    try:
        n = float(t[:-1]) * 1024 if t.endswith("k") else float(t)
    except ValueError:
        raise ValueError(f"length: expected a token count such as 2048 or 2k, got {text!r}") from None
    if not n >= 1 or n != int(n) or math.isinf(n):
        raise ValueError(f"length: expected a positive whole number of tokens, got {text!r}")
    return int(n)


def parse_lengths(text):
    out = [parse_length(x) for x in str(text).split(",") if x.strip()]
    if not out:
        raise ValueError(f"lengths: expected a comma-separated list such as 2k,4k, got {text!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"lengths repeat: {text!r}")
    return out


def length_label(n):
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


# ---- configuration --------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """What to run: ``tasks`` x ``lengths`` x ``samples`` sample indices x ``variants``."""
    model: str
    tasks: list
    lengths: list
    samples: int
    variants: list
    out: str
    seed: int = 0
    hosts: int = 4
    max_new_tokens: int | None = None   # default: the answers' tokens + 8
    processes: bool = False             # real local host processes for star / ring
    timeout: float = 600.0
    dtype: str | None = None
    device: str = "cpu"                 # the simulated hosts' device (one GPU: "cuda")
    trust_remote_code: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)


def record_key(rec):
    return (rec["model"], rec["task"], rec["length"], rec["sample"], rec["method"], rec["prompt_sha256"])


def load_records(path):
    """The complete records of a JSONL file; a torn last line (an interrupted write) is dropped
    and the file rewritten without it, so appending goes on cleanly."""
    path = Path(path)
    if not path.exists():
        return []
    recs, bad = [], 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
            except ValueError:
                bad += 1
    if bad:
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in recs:
                fh.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    return recs


# ---- samples ----------------------------------------------------------------------------------------

@dataclass
class Prepared:
    sample: object
    context_ids: list
    query_ids: list
    max_new_tokens: int
    prompt_sha256: str


def _prepare(task, length, seed, tokenizer, max_positions, max_new_override):
    """The sample of (task, seed) whose whole prompt (chat template included) fits ``length``
    tokens and, with the answer's tokens, the model's positions."""
    from ..models import prompt_token_ids
    from . import make_sample

    target, sample = length, None
    for attempt in range(8):
        try:
            sample = make_sample(task, target, tokenizer, seed=seed)
        except ValueError as e:
            why = f" (the chat template and the prefill take {length - target} of them)" if target < length else ""
            raise ValueError(f"task {task} at length {length}: too short{why}: {e}") from None
        if max_new_override:
            max_new = max_new_override
        else:   # the answers' tokens, a margin, and room for list separators and numbering
            ans = " " + ", ".join(sample.answers)
            extra = 4 * len(sample.answers) if len(sample.answers) > 1 else 0
            max_new = len(tokenizer(ans, add_special_tokens=False)["input_ids"]) + 8 + extra
        limit = length if max_positions is None else min(length, max_positions - max_new)
        ctx, qry = prompt_token_ids(tokenizer, sample.context, sample.query, sample.prefill)
        excess = len(ctx) + len(qry) - limit
        if excess <= 0:
            break
        # the generators size in whole sentences: step past a sentence that keeps the excess
        target -= excess + (2 ** attempt if attempt else 0)
        if target < 1:
            raise ValueError(f"task {task} at length {length}: the prompt does not fit")
    else:
        raise ValueError(f"task {task} at length {length}: could not size the prompt to fit")
    digest = hashlib.sha256(json.dumps([ctx, qry]).encode()).hexdigest()
    return Prepared(sample, ctx, qry, max_new, digest)


# what may open an answer before its content: spaces, blank lines, a colon after the pre-filled
# words ("... are:\n\n1. 123"), list dashes and bullets
_ANSWER_LEAD = re.compile(r"^[\s:;,\-*]+")


def _answer_text(text, multi):
    """The answer: the generated text up to the end of its first non-empty line, or for a list
    of answers (one item per line is fine) up to its first blank line; what opens it before any
    content (spaces, a colon, blank lines) does not end it."""
    t = _ANSWER_LEAD.sub("", text)
    return t.split("\n\n" if multi else "\n", 1)[0].strip()


def _stop_at_line(tokenizer, multi):
    end = "\n\n" if multi else "\n"

    def stop(tokens):
        return end in _ANSWER_LEAD.sub("", tokenizer.decode(tokens, skip_special_tokens=True))
    return stop


def _eos_ids(model, tokenizer):
    ids = set()
    for e in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
              getattr(model.config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        ids.update([e] if isinstance(e, int) else (e or []))
    return sorted(ids)


# ---- one answer -------------------------------------------------------------------------------------

def _answer_simulated(model, tokenizer, variant, prep, hosts, block, anchor, eos):
    import torch

    from ..star.engine import StarEngine
    eng = StarEngine(model, method=variant.method, block_size=block, anchor_size=anchor,
                     simulate=1 if variant.method == "dense" else hosts)
    t0 = time.perf_counter()
    eng.encode(torch.tensor(prep.context_ids, dtype=torch.long))
    res = eng.generate(torch.tensor(prep.query_ids, dtype=torch.long), prep.max_new_tokens,
                       eos_token_id=eos or None,
                       stop=_stop_at_line(tokenizer, len(prep.sample.answers) > 1))
    wall = time.perf_counter() - t0
    phase1 = [float(eng.timings["phase1_s"].get(r, 0.0)) for r in range(eng.hosts)]
    return res.tokens, res.stopped_by, phase1, float(res.timings["phase2_s"]), wall


def _answer_processes(cfg, model_dir, variant, prep, block, anchor, eos):
    from ..star.cli_generate import host_main
    from ..star.launch import run_local
    spec = dict(model_dir=str(model_dir), dtype=cfg.dtype, device="auto", method=variant.method,
                block_size=block, anchor_size=anchor, anchor_mode=None, context=prep.context_ids,
                query=prep.query_ids, max_new_tokens=prep.max_new_tokens, temperature=0.0,
                top_p=1.0, seed=None, eos=eos, stop=None, trust_remote_code=cfg.trust_remote_code,
                simulate=None)
    t0 = time.perf_counter()
    results = run_local(host_main, cfg.hosts, (spec,), timeout=cfg.timeout)
    wall = time.perf_counter() - t0
    main = next(r for r in results if r["rank"] == results[0]["query_host"])
    phase1 = [0.0] * cfg.hosts
    for r in results:
        for rank, s in r["phase1_s"].items():
            phase1[int(rank)] = float(s)
    return main["tokens"], main["stopped_by"], phase1, float(main["phase2_s"]), wall


# ---- the run ----------------------------------------------------------------------------------------

def run_eval(cfg, *, model=None, tokenizer=None, log=None):
    """Run (or resume) ``cfg``; returns the records of this plan, old and new, in plan order."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {cfg.out!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    have = {record_key(r): r for r in load_records(path)}

    from ..models import resolve_model_path
    model_dir = resolve_model_path(cfg.model) if cfg.processes else None
    if model is None or tokenizer is None:
        from ..models import load_model
        model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device,
                                      trust_remote_code=cfg.trust_remote_code)
    text_cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    max_pos = getattr(text_cfg, "max_position_embeddings", None)
    num_params = sum(p.numel() for p in model.parameters())
    eos = _eos_ids(model, tokenizer)

    units = [(t, n, i) for t in cfg.tasks for n in cfg.lengths for i in range(cfg.samples)]
    total = len(units) * len(cfg.variants)
    bar = _progress(total, cfg.progress)
    records, capped = [], set()
    try:
        with open(path, "a", encoding="utf-8") as fh:
            for task, length, idx in units:
                seed = cfg.seed + idx
                prep = _prepare(task, length, seed, tokenizer, max_pos, cfg.max_new_tokens)
                n_prompt = len(prep.context_ids) + len(prep.query_ids)
                if max_pos is not None and length + prep.max_new_tokens > max_pos and length not in capped:
                    capped.add(length)
                    log(f"note: length {length_label(length)} plus the answer passes the model's "
                        f"{max_pos} positions; prompts there are cut to {n_prompt} tokens")
                for v in cfg.variants:
                    key = (cfg.model, task, length, idx, v.label, prep.prompt_sha256)
                    if key in have:
                        records.append(have[key])
                        bar.update(1)
                        continue
                    bar.set_postfix_str(f"{task} {length_label(length)} #{idx} {v.label}", refresh=False)
                    rec = _run_one(cfg, model, tokenizer, model_dir, v, prep, eos, num_params,
                                   task=task, length=length, idx=idx, seed=seed)
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    have[key] = rec
                    records.append(rec)
                    bar.update(1)
    finally:
        bar.close()
    return records


def _run_one(cfg, model, tokenizer, model_dir, v, prep, eos, num_params, *, task, length, idx, seed):
    from . import score
    n_ctx = len(prep.context_ids)
    block, anchor = v.sizes(n_ctx, num_params)
    # no idle hosts: star never runs on more hosts than it has blocks (phase 1 is the same)
    if v.method == "dense":
        hosts = 1
    elif v.method == "star":
        hosts = min(cfg.hosts, math.ceil(n_ctx / block))
    else:
        hosts = cfg.hosts
    if cfg.processes and v.method != "dense" and hosts > 1:
        tokens, stopped, phase1, phase2, wall = _answer_processes(cfg, model_dir, v, prep, block, anchor, eos)
        launch = "local-processes"
    else:
        tokens, stopped, phase1, phase2, wall = _answer_simulated(
            model, tokenizer, v, prep, hosts, block, anchor, eos)
        launch = "simulated" if hosts > 1 else "in-process"
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    answer = _answer_text(text, len(prep.sample.answers) > 1)
    s = float(score(prep.sample, answer))
    return {
        "model": cfg.model, "task": task, "length": length, "sample": idx, "seed": seed,
        "method": v.label, "method_base": v.method, "hosts": hosts, "launch": launch,
        "block_size": block, "anchor_size": anchor,
        "blocks": math.ceil(n_ctx / block) if block else None,
        "prompt_sha256": prep.prompt_sha256, "context_tokens": n_ctx,
        "query_tokens": len(prep.query_ids), "depth": prep.sample.depth,
        "expected": list(prep.sample.answers), "prefill": prep.sample.prefill,
        "answer": answer, "generated": text, "tokens": [int(t) for t in tokens],
        "stopped_by": stopped, "score": s, "correct": s >= 1.0,
        "timings": {"phase1_s": [round(x, 4) for x in phase1], "phase1_max_s": round(max(phase1), 4),
                    "phase2_s": round(phase2, 4), "hosts_s": round(max(phase1) + phase2, 4),
                    "wall_s": round(wall, 4)},
    }


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass

    def close(self):
        pass


def _progress(total, enabled):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="eval", unit="answer", file=sys.stderr, dynamic_ncols=True)
