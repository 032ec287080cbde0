"""Star / Ring / dense inference of a Hugging Face decoder model over a long context.

One :class:`StarEngine` per process (host). ``encode`` runs phase 1 and keeps this host's
context KV; ``generate`` runs phase 2 for one query: every query and generated token attends to
every host's cache (distributed softmax), the query host alone keeps the query's KV, and the
next token and the stop decision are made on the query host and broadcast. In ``simulate`` mode
one process plays all hosts, one after another.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import attention as A
from .cache import PositionedKV
from .comm import Comm
from .partition import default_block_size, plan_blocks, plan_zigzag

__all__ = ["StarEngine", "GenerationResult", "check_model"]

METHODS = ("star", "ring", "dense")
# "once": each host without block 0 encodes the anchor itself, once for all its blocks;
# "stream": rank 0 broadcasts the anchor's KV layer by layer while it encodes block 0.
ANCHOR_MODES = ("once", "stream")


@dataclass
class GenerationResult:
    tokens: list
    stopped_by: str                       # eos | stop | length
    timings: dict = field(default_factory=dict)
    logits: list = field(default_factory=list)  # per step fp32 [vocab], with return_logits


def check_model(model):
    """Raise ValueError naming a feature the engine does not support."""
    cfg = model.config
    text_cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    name = getattr(text_cfg, "model_type", type(model).__name__)
    if getattr(text_cfg, "attn_logit_softcapping", None):
        raise ValueError(f"{name}: attention logit softcapping is not supported by starshard.star")
    window = getattr(text_cfg, "sliding_window", None)
    uses_window = getattr(text_cfg, "use_sliding_window", window is not None)
    if window is not None and uses_window:
        raise ValueError(f"{name}: sliding-window attention layers (sliding_window={window}) are not "
                         "supported by starshard.star")
    layer_types = getattr(text_cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{name}: layer types {sorted(set(layer_types))} are not supported (only "
                         "full_attention)")
    if getattr(text_cfg, "alibi", False) or name in ("bloom", "mpt"):
        raise ValueError(f"{name}: ALiBi position biases are not supported by starshard.star")
    for mod in model.modules():
        if hasattr(mod, "sinks") or "sink" in type(mod).__name__.lower():
            raise ValueError(f"{name}: attention sinks are not supported by starshard.star")


class StarEngine:
    """Two-phase long-context inference on this host (or on ``simulate`` hosts in one process).

    ``method``: "star" (blockwise context encoding behind an anchor), "ring" (exact, KV passed
    round the hosts, zigzag balanced) or "dense" (the whole context on host 0).
    ``block_size`` (star): tokens per context block (default: 4 blocks, capped at 32k past
    128k tokens); ``anchor_size``: anchor tokens (default the whole first block, at most the block).
    """

    def __init__(self, model, *, method="star", block_size=None, anchor_size=None, comm=None,
                 simulate=None, anchor_mode="once"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if anchor_mode not in ANCHOR_MODES:
            raise ValueError(f"anchor_mode must be one of {ANCHOR_MODES}, got {anchor_mode!r}")
        self.anchor_mode = anchor_mode
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if anchor_size is not None:
            if isinstance(anchor_size, bool) or not isinstance(anchor_size, int) or anchor_size < 0:
                raise ValueError(f"anchor_size must be an int >= 0, got {anchor_size!r}")
            if block_size is not None and anchor_size > block_size:
                raise ValueError(f"anchor_size ({anchor_size}) must not exceed block_size ({block_size})")
        check_model(model)
        self.model = model.eval()
        self.method = method
        self.block_size = block_size
        self.anchor_size = anchor_size
        self.comm = comm or Comm()
        if simulate is not None and self.comm.distributed:
            raise ValueError("simulate runs every host in this one process; it needs no process group")
        self.hosts = simulate if simulate is not None else self.comm.world
        self.simulated = simulate is not None
        if isinstance(self.hosts, bool) or not isinstance(self.hosts, int) or self.hosts < 1:
            raise ValueError(f"simulate must be a positive int, got {simulate!r}")
        A.register()
        name = type(model).__name__
        try:
            model.set_attn_implementation(A.IMPLEMENTATION)
        except Exception as e:  # noqa: BLE001 - the model refuses custom attention
            raise ValueError(f"{name}: its attention cannot be hooked through the transformers "
                             f"attention interface ({e})") from e
        self.device = next(model.parameters()).device
        self._probe_hook(name)
        self.max_positions = getattr(getattr(model.config, "get_text_config", lambda: model.config)(),
                                     "max_position_embeddings", None)
        self.caches = None
        self.plan = None
        self.context_len = 0
        self.timings = {}

    def _probe_hook(self, name):
        """One token through the model: every layer's attention must reach our function."""
        seen = []
        one = torch.zeros(1, dtype=torch.long)
        self._run(A.Step("probe", save=seen), one, one)
        layers = _num_layers(self.model)
        if sorted(set(seen)) != list(range(layers)):
            raise ValueError(f"{name}: its attention cannot be hooked: {len(set(seen))} of {layers} "
                             "layers called the transformers attention interface")

    def _token_ids(self, name, ids):
        """1-D int64 CPU token ids from a sequence or a 1-D (or [1, N]) integer tensor, each
        inside the model's vocabulary."""
        t = torch.as_tensor(ids)
        if t.numel() == 0:   # torch.as_tensor([]) is float32; emptiness is the caller's error
            t = t.to(torch.long)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be integer token ids, got dtype {t.dtype}")
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D token ids (one sequence; [1, N] is taken too), "
                             f"got shape {tuple(t.shape)}")
        t = t.to(torch.long).cpu()
        if t.numel():
            vocab = getattr(self.model.get_input_embeddings(), "num_embeddings", None)
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or (vocab is not None and hi >= vocab):
                raise ValueError(f"{name} holds token ids outside the model's vocabulary "
                                 f"[0, {vocab}): min {lo}, max {hi}")
        return t

    # ---- model calls ------------------------------------------------------------------------
    def _run(self, step, ids, positions, logits=False):
        ids = ids.to(self.device).view(1, -1)
        pos = positions.to(self.device).view(1, -1)
        with A.use_step(step), torch.inference_mode():
            if logits:
                return self.model(input_ids=ids, position_ids=pos, use_cache=False,
                                  logits_to_keep=1).logits[0, -1].float()
            self.model.base_model(input_ids=ids, position_ids=pos, use_cache=False)
            return None

    def _now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _ranks(self):
        return range(self.hosts) if self.simulated else [self.comm.rank]

    @staticmethod
    def _arange(a, b):
        return torch.arange(a, b, dtype=torch.long)

    # ---- phase 1 ------------------------------------------------------------------------------
    def encode(self, context_ids):
        """Phase 1: encode the context (1-D token ids, the same on every host)."""
        ids = self._token_ids("context_ids", context_ids)
        n = ids.numel()
        if n == 0:
            raise ValueError("the context is empty")
        if self.max_positions is not None and n > self.max_positions:
            raise ValueError(f"the context has {n} tokens but the model's maximum position is "
                             f"{self.max_positions}")
        block = self.block_size or default_block_size(n, _num_params(self.model))
        anchor = block if self.anchor_size is None else self.anchor_size
        if anchor > block:
            raise ValueError(f"anchor_size ({anchor}) must not exceed block_size ({block})")
        self.context_len = n
        if self.method == "ring":
            self.plan = plan_zigzag(n, self.hosts)
        else:
            self.plan = plan_blocks(n, n if self.method == "dense" else block, self.hosts)
        self.caches = {r: PositionedKV() for r in self._ranks()}
        self.timings = {"phase1_s": {}}
        if self.method == "ring" and not self.simulated:
            self._encode_ring(ids)
        elif self.method == "ring":
            self._encode_ring_simulated(ids)
        else:
            for r in self._ranks():
                t0 = self._now()
                charged = self._encode_blocks(ids, r, min(anchor, self.plan.pieces[0][0].size))
                self.timings["phase1_s"][r] = self._now() - t0 + charged
        return self.plan

    def _encode_blocks(self, ids, rank, anchor):
        """Phase 1 of one host. Returns the seconds charged to it for work done once for all
        simulated hosts (the anchor, when it is exactly host 0's first block)."""
        cache = self.caches[rank]
        prefix = None
        charged = 0.0
        stream = (self.anchor_mode == "stream" and self.method == "star" and self.comm.distributed
                  and anchor > 0)
        pieces = self.plan.pieces[rank]
        for piece in pieces:
            if piece.start == 0:
                t0 = self._now()
                self._run(A.Step("causal", start=0, save=cache, comm=self.comm,
                                 send_anchor=anchor if stream else 0),
                          ids[:piece.end], self._arange(0, piece.end))
                self._block0_s = self._now() - t0
                continue
            recv = 0
            if prefix is None:
                if stream and rank != 0:
                    prefix, recv = PositionedKV(), anchor
                elif self.simulated and (self.anchor_mode == "stream" or (
                        anchor == self.plan.pieces[0][0].size
                        and not any(p.start == 0 for p in pieces))):
                    # host 0's anchor KV, sliced. Streamed, it costs this host nothing; otherwise
                    # host 0 ran exactly this computation (the same tokens in one causal pass),
                    # and its time is charged to this host, which would compute it
                    prefix = self._anchor(ids, 0, anchor)
                    if self.anchor_mode != "stream":
                        charged += self._block0_s
                else:
                    prefix = self._anchor(ids, rank, anchor)
            self._run(A.Step("encode", start=piece.start, save=cache, prefix=prefix, comm=self.comm,
                             recv_anchor=recv),
                      ids[piece.start:piece.end], self._arange(piece.start, piece.end))
        if stream and not pieces:  # an idle host still takes part in every layer's broadcast
            like = self._kv_like()
            for layer in range(_num_layers(self.model)):
                A.receive_anchor(self.comm, PositionedKV(), layer, anchor, like)
        return charged

    def _kv_like(self):
        cfg = getattr(self.model.config, "get_text_config", lambda: self.model.config)()
        hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dt = next(self.model.parameters()).dtype
        return torch.empty((1, 0, hkv, d), dtype=dt, device=self.device)

    def _anchor(self, ids, rank, anchor):
        """The anchor's KV, computed once per host (sliced from block 0 where this host has it)."""
        prefix = PositionedKV()
        if anchor == 0:
            return prefix
        cache = self.caches[rank]
        if any(p.start == 0 for p in self.plan.pieces[rank]):
            for layer in range(_num_layers(self.model)):
                start, k, v = cache.segments(layer)[0]
                prefix.append(layer, 0, k[:, :anchor], v[:, :anchor])
            return prefix
        self._run(A.Step("causal", start=0, save=prefix), ids[:anchor], self._arange(0, anchor))
        return prefix

    def _encode_ring(self, ids):
        rank = self.comm.rank
        mine = self.plan.pieces[rank]
        t0 = self._now()
        if mine:
            tok = torch.cat([ids[p.start:p.end] for p in mine])
            pos = torch.cat([self._arange(p.start, p.end) for p in mine])
        else:
            tok = pos = torch.zeros(0, dtype=torch.long)
        step = A.Step("ring", save=self.caches[rank], comm=self.comm,
                      pieces=tuple((p.start, p.size) for p in mine),
                      ring_pieces=tuple(tuple((p.start, p.size) for p in ps) for ps in self.plan.pieces))
        self._run(step, tok, pos)
        self.timings["phase1_s"][rank] = self._now() - t0

    def _encode_ring_simulated(self, ids):
        # one process: exact causal attention over the whole context, KV then split per host
        whole = PositionedKV()
        t0 = self._now()
        self._run(A.Step("causal", start=0, save=whole), ids, self._arange(0, ids.numel()))
        for r in self._ranks():
            for layer in range(_num_layers(self.model)):
                _, k, v = whole.segments(layer)[0]
                for p in self.plan.pieces[r]:
                    self.caches[r].append(layer, p.start, k[:, p.start:p.end], v[:, p.start:p.end])
        self.timings["phase1_s"] = {r: (self._now() - t0) / self.hosts for r in self._ranks()}

    # ---- phase 2 ------------------------------------------------------------------------------
    def generate(self, query_ids, max_new_tokens=32, *, temperature=0.0, top_p=1.0, seed=None,
                 eos_token_id=None, stop=None, return_logits=False):
        """Phase 2 for one query (1-D token ids, the same on every host).

        Greedy when ``temperature == 0``, else sampling with ``top_p`` and ``seed``. Stops at
        ``eos_token_id`` (int or list), when ``stop(tokens)`` (a callable run on the query host,
        e.g. a stop-string check) returns True, or after ``max_new_tokens``. The query's KV is
        discarded afterwards, so the encoded context can serve the next query.
        """
        if self.caches is None:
            raise RuntimeError("call encode(context_ids) before generate()")
        q = self._token_ids("query_ids", query_ids)
        if q.numel() == 0:
            raise ValueError("the query is empty")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        total = self.context_len + q.numel() + max_new_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise ValueError(f"context ({self.context_len}) + query ({q.numel()}) + max_new_tokens "
                             f"({max_new_tokens}) = {total} tokens passes the model's maximum "
                             f"position {self.max_positions}")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        qh = self.plan.query_host
        is_qh = self.simulated or self.comm.rank == qh
        # the query host's tokens join its own context cache (one attention call covers both
        # where that host holds the end of the context) and are cut off again afterwards
        own = self.caches[qh] if is_qh else None
        caches = [self.caches[r] for r in self._ranks() if not (is_qh and r == qh)]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        pos = self.context_len
        tokens, stopped, kept = [], "length", []
        t0 = self._now()
        t_first = None
        cur = q
        try:
            while True:
                step = A.Step("query", start=pos, caches=caches, own=own, comm=self.comm)
                logits = self._run(step, cur, self._arange(pos, pos + cur.numel()), logits=True)
                if return_logits:
                    kept.append(logits.cpu())
                pos += cur.numel()
                decision = torch.zeros(2, dtype=torch.long)
                if is_qh:
                    tok = _pick(logits, temperature, top_p, gen)
                    tokens_next = tokens + [tok]
                    flag = 1 if tok in eos else 2 if (stop is not None and stop(tokens_next)) else 0
                    if not flag and len(tokens_next) >= max_new_tokens:
                        flag = 3
                    decision = torch.tensor([tok, flag], dtype=torch.long)
                decision = self._broadcast(decision, qh)
                tok, flag = int(decision[0]), int(decision[1])
                if t_first is None:
                    t_first = self._now() - t0
                if flag == 1:
                    stopped = "eos"
                    break
                tokens.append(tok)
                if flag:
                    stopped = "stop" if flag == 2 else "length"
                    break
                cur = torch.tensor([tok])
        finally:
            if own is not None:
                own.truncate(self.context_len)
        elapsed = self._now() - t0
        decode_s = elapsed - (t_first or 0.0)
        timings = dict(self.timings, phase2_s=elapsed, first_token_s=t_first,
                       tokens_per_s=(len(tokens) / elapsed) if elapsed > 0 else None,
                       decode_tokens_per_s=((len(tokens) - 1) / decode_s)
                       if len(tokens) > 1 and decode_s > 0 else None)
        return GenerationResult(tokens, stopped, timings, kept)

    def _broadcast(self, t, src):
        if self.simulated or not self.comm.distributed:
            return t
        dev = self.device if self.comm.backend == "nccl" else torch.device("cpu")
        return self.comm.broadcast(t.to(dev), src).cpu()


def _pick(logits, temperature, top_p, gen):
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.cpu().double() / temperature, -1)
    if top_p < 1:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def _num_layers(model):
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    return cfg.num_hidden_layers


def _num_params(model):
    return sum(p.numel() for p in model.parameters())
