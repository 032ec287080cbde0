"""Small helpers for tests and smoke runs: a tiny random-weight Llama and a host entry point.

They live in the package (not in tests/) so spawned host processes can import them.
"""
from __future__ import annotations

import torch

__all__ = ["tiny_llama", "host_generate"]


def tiny_llama(seed=0, *, layers=2, hidden=64, heads=4, kv_heads=2, vocab=97, max_positions=4096):
    """A random-weight Llama (fp32, eval mode); the same seed gives the same weights anywhere."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=max_positions)
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


def host_generate(rank, world, spec):
    """One host of a distributed run: build the tiny model, encode, answer every query.

    ``spec``: dict(seed, method, block_size, anchor_size, context, queries, max_new_tokens,
    temperature, top_p, sample_seed, model_kwargs, fail_rank, fail_at). Returns per query
    (tokens, logits of the first step, stopped_by) and the phase-1 cache positions.
    """
    from .comm import Comm
    from .engine import StarEngine
    model = tiny_llama(spec.get("seed", 0), **spec.get("model_kwargs", {}))
    eng = StarEngine(model, method=spec["method"], block_size=spec.get("block_size"),
                     anchor_size=spec.get("anchor_size"), comm=Comm(),
                     anchor_mode=spec.get("anchor_mode", "once"))
    if spec.get("fail_rank") == rank and spec.get("fail_at") == "encode":
        raise SystemExit(3)
    eng.encode(torch.tensor(spec["context"]))
    if spec.get("fail_rank") == rank and spec.get("fail_at") == "generate":
        import os
        os._exit(7)  # a host that dies without a word
    out = []
    for q in spec["queries"]:
        r = eng.generate(torch.tensor(q), spec.get("max_new_tokens", 4),
                         temperature=spec.get("temperature", 0.0), top_p=spec.get("top_p", 1.0),
                         seed=spec.get("sample_seed"), return_logits=True)
        out.append((r.tokens, r.logits[0], r.stopped_by))
    cache = eng.caches[rank]
    return dict(answers=out, positions=cache.positions(0).tolist(), query_host=eng.plan.query_host,
                timings=eng.timings)
