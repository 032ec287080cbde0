"""Small helpers for tests and smoke runs: a tiny random-weight Llama and a host entry point.

They live in the package (not in tests/) so spawned host processes can import them.
"""
from __future__ import annotations

import torch

__all__ = ["tiny_llama", "host_generate", "host_sum", "tiny_tokenizer", "save_tiny_model"]


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
    temperature, top_p, sample_seed, model_kwargs, device, fail_rank, fail_at); ``device="cuda"``
    puts rank r's model on GPU r. ``fail_at``: "encode"
    (SystemExit(3) before phase 1), "generate" (os._exit(7) after it), "raise" (RuntimeError),
    "hang" (sleeps while the others wait), "exit0" (exits 0 with no result). Returns per query
    (tokens, logits of the first step, stopped_by) and the phase-1 cache positions.
    """
    from .comm import Comm
    from .engine import StarEngine
    model = tiny_llama(spec.get("seed", 0), **spec.get("model_kwargs", {}))
    if spec.get("device") == "cuda":  # one GPU per rank (NCCL)
        model = model.to(f"cuda:{rank}")
    eng = StarEngine(model, method=spec["method"], block_size=spec.get("block_size"),
                     anchor_size=spec.get("anchor_size"), comm=Comm(),
                     anchor_mode=spec.get("anchor_mode", "once"))
    if spec.get("fail_rank") == rank and spec.get("fail_at") == "encode":
        raise SystemExit(3)
    eng.encode(torch.tensor(spec["context"]))
    if spec.get("fail_rank") == rank and spec.get("fail_at") == "generate":
        import os
        os._exit(7)  # a host that dies without a word
    if spec.get("fail_rank") == rank and spec.get("fail_at") == "raise":
        raise RuntimeError(f"injected failure on rank {rank}")
    if spec.get("fail_rank") == rank and spec.get("fail_at") == "hang":
        import time
        time.sleep(3600)  # a host that stops answering (the others wait in a collective)
    if spec.get("fail_rank") == rank and spec.get("fail_at") == "exit0":
        import os
        os._exit(0)  # a host that leaves quietly, with status 0 and no result
    out = []
    for q in spec["queries"]:
        r = eng.generate(torch.tensor(q), spec.get("max_new_tokens", 4),
                         temperature=spec.get("temperature", 0.0), top_p=spec.get("top_p", 1.0),
                         seed=spec.get("sample_seed"), return_logits=True)
        out.append((r.tokens, r.logits[0], r.stopped_by))
    cache = eng.caches[rank]
    return dict(answers=out, positions=cache.positions(0).tolist(), query_host=eng.plan.query_host,
                timings=eng.timings)


def host_sum(rank, world, spec):
    """A cheap host (no model): all-reduce ``rank + 1`` over the world; ``spec`` may inject the
    failures of :func:`host_generate` ("raise", "hang", "exit0", "generate") on ``fail_rank``."""
    import os
    import time

    import torch.distributed as dist
    if spec.get("fail_rank") == rank:
        how = spec.get("fail_at")
        if how == "raise":
            raise RuntimeError(f"injected failure on rank {rank}")
        if how == "hang":
            time.sleep(3600)
        if how == "exit0":
            os._exit(0)
        if how == "generate":
            os._exit(7)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return dict(rank=rank, world=world, total=float(t))


# ---- a tiny model directory with a tokenizer (offline), for CLI and loader tests ---------------

TINY_SPECIALS = ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TINY_WORDS = tuple("""
0 1 2 3 4 5 6 7 8 9 . , : ? ! the pass key is what remember it grass sky blue green sun day night
yellow here there go come back and of to in a an number secret find answer question tree river
stone bird red white black one two three four five six seven eight nine ten hidden text say
read this that which was be you i me my your we our they some all more
""".split())
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tiny_tokenizer():
    """A word-level tokenizer over a fixed vocabulary (built offline) with a simple chat template.

    Word ids are stable: specials first (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the chat markers),
    then the words of :data:`TINY_WORDS`; any other word maps to ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(TINY_SPECIALS + TINY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(TINY_SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def save_tiny_model(path, seed=0, **model_kwargs):
    """Save :func:`tiny_llama` (vocabulary of :func:`tiny_tokenizer`) with that tokenizer to ``path``:
    a Hugging Face model directory that ``starshard.models.load_model`` and the CLI read."""
    tok = tiny_tokenizer()
    model_kwargs.setdefault("vocab", len(tok))
    model = tiny_llama(seed, **model_kwargs)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
