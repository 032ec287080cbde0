"""Generation with a transformers model: time to the first token and time per new token for
dense attention against S2 attention, on a Llama-shaped model with random weights (Llama-3.2-1B
shape by default: 16 layers, hidden 2048, 32 query / 8 KV heads of 64; a 32000-token vocabulary).

PYTHONPATH=src python benchmarks/bench_hf_generate.py [--n 32k,128k] [--new 64] [--batch 1]
    [--layout bs64_l16_s16] [--dense-every 4] [--out F]
PYTHONPATH=src python benchmarks/bench_hf_generate.py --device cpu --n 300 --new 4 \\
    --layers 2 --hidden 128 --heads 4 --kv-heads 2 --layout-block 16   # smoke

Variants, each ``model.generate`` (greedy, eager, ``--new`` tokens) over the same prompt:
"dense": transformers' SDPA and its own cache; "s2": ``use_s2_attention`` (every
``--dense-every``-th layer dense, 0: none) with transformers' cache (prefill by the sparse op,
each step by the op on the cache's keys); "s2 + S2Cache": the same layouts with
``S2Cache`` (head-sharded storage, each step by ``sparse_attention_kvcache``). "first token s":
a ``max_new_tokens=1`` call (prefill + one step); "ms / new token": the rest of a ``--new``
call, (t_new - t_first) / (new - 1). Peak GPU memory of the ``--new`` call; cache bytes; and
whether S2Cache produced the same tokens as the S2 run with transformers' cache.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import _common  # noqa: E402
import starshard as ss  # noqa: E402
from bench_decode_step import _sync  # noqa: E402
from starshard.integrations import hf  # noqa: E402


def build_model(a, max_positions, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, max_position_embeddings=max_positions,
                      head_dim=a.hidden // a.heads, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def layouts(a):
    lay = ss.local_stride(a.heads, a.layout_block, a.local_blocks, a.vert_stride,
                          num_kv_heads=a.kv_heads)
    return [None if a.dense_every and i % a.dense_every == 0 else lay for i in range(a.layers)]


def generate(model, ids, new, cache_fn, device):
    """(seconds, output ids, peak bytes or None, cache) of one greedy generate call."""
    cache = cache_fn()
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    if cache is not None:
        kw["past_key_values"] = cache
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, **kw)
    _sync(device)
    sec = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return sec, out, peak, cache


def run_variant(name, model, ids, a, device):
    batch, n = ids.shape
    if name == "dense":
        model.set_attn_implementation("sdpa")
        cache_fn = lambda: None  # noqa: E731
    else:
        hf.use_s2_attention(model, layouts(a))
        if name == "s2":
            cache_fn = lambda: None  # noqa: E731
        else:
            cache_fn = lambda: hf.S2Cache(model, batch=batch, capacity=n + a.new)  # noqa: E731
    generate(model, ids, 2, cache_fn, device)   # warm-up: kernels compiled, tables built
    first = min(generate(model, ids, 1, cache_fn, device)[0] for _ in range(a.repeat))
    runs = [generate(model, ids, a.new, cache_fn, device) for _ in range(a.repeat)]
    sec, out, peak, cache = min(runs, key=lambda r: r[0])
    row = dict(variant=name, n=n, batch=batch, new=a.new, first_token_s=first,
               ms_per_new_token=(sec - first) / (a.new - 1) * 1e3, total_s=sec,
               peak_bytes=peak, tokens=out[:, n:].tolist())
    if cache is not None:
        row.update(cache_bytes=cache.nbytes(), dense_cache_bytes=cache.dense_nbytes())
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="32k,128k", help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="tokens generated (>= 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", default="dense,s2,s2 + S2Cache")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layout-block", type=int, default=64)
    p.add_argument("--local-blocks", type=int, default=16)
    p.add_argument("--vert-stride", type=int, default=16)
    p.add_argument("--dense-every", type=int, default=4, help="every k-th layer dense (0: none)")
    p.add_argument("--repeat", type=int, default=2, help="timed calls, the fastest kept")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.new < 2:
        p.error("--new must be >= 2")
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = _common.parse_sizes(a.n)
    model = build_model(a, max(sizes) + a.new, device, dtype)
    variants = [v.strip() for v in a.variants.split(",")]
    bad = set(variants) - {"dense", "s2", "s2 + S2Cache"}
    if bad:
        p.error(f"unknown variants {sorted(bad)}")
    rows = []
    for n in sizes:
        g = torch.Generator(device=device).manual_seed(n)
        ids = torch.randint(3, a.vocab, (a.batch, n), device=device, generator=g)
        got = {}
        for v in variants:
            row, err = _common.try_call(lambda: run_variant(v, model, ids, a, device))
            got[v] = row if err is None else dict(variant=v, n=n, batch=a.batch, **err)
            rows.append(got[v])
            print({k: x for k, x in got[v].items() if k != "tokens"}, flush=True)
        if "tokens" in got.get("s2", {}) and "tokens" in got.get("s2 + S2Cache", {}):
            got["s2 + S2Cache"]["same_tokens_as_s2"] = \
                got["s2 + S2Cache"]["tokens"] == got["s2"]["tokens"]
            print("S2Cache tokens equal the s2 run's:", got["s2 + S2Cache"]["same_tokens_as_s2"])
    res = dict(env=_common.env_info(), args=vars(a), rows=rows)
    _common.write_json(a.out or os.path.join(_common.RESULTS, "bench_hf_generate.json"), res)
    gb = lambda x: x and x / 1e9  # noqa: E731
    print(_common.markdown_table(
        ["N", "batch", "variant", "first token s", "ms / new token", "peak GB", "cache GB"],
        [[_common.size_label(r["n"]), r["batch"], r["variant"],
          _common.fmt(r.get("first_token_s"), ".3f"), _common.fmt(r.get("ms_per_new_token")),
          _common.fmt(gb(r.get("peak_bytes"))), _common.fmt(gb(r.get("cache_bytes")), ".3f")]
         for r in rows]))
    return res

if __name__ == "__main__":
    main()
