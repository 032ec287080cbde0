"""A/B of the Star engine's decode between two source trees, on one GPU.

    git archive OLD_COMMIT src | tar -x -C /tmp/old
    python benchmarks/ab_engine_decode.py /tmp/old/src 32768    # then: ... src 32768, and repeat

A Llama-3-8B-shaped model (random bf16 weights), a 32k context: dense, then star with 4 simulated
hosts; each generates 33 tokens twice after a warm-up. Prints one JSON line and appends it to
$OUT/ab_{old,new}_N.jsonl (a tree whose path holds "old" is the old one).
"""
import json
import os
import sys

src = sys.argv[1]
sys.path.insert(0, src)
import torch
import starshard
from starshard.star import StarEngine
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_star import build_model
assert starshard.__file__.startswith(os.path.abspath(src)), starshard.__file__
n = int(sys.argv[2])
dev = torch.device("cuda")
model = build_model(0, dev)
g = torch.Generator().manual_seed(0)
ctx = torch.randint(0, model.config.vocab_size, (n,), generator=g)
q = torch.randint(0, model.config.vocab_size, (32,), generator=g)
res = dict(src=src, n=n)
for method, sim in (("dense", None), ("star", 4)):
    eng = StarEngine(model, method=method, simulate=sim)
    eng.encode(ctx)
    eng.generate(q, 4)
    rates = []
    for _ in range(2):
        r = eng.generate(q, 33, return_logits=True)
        rates.append(r.timings["decode_tokens_per_s"])
    res[method] = dict(tok_s=rates, first_token_s=r.timings["first_token_s"], tokens=r.tokens[:8],
                       logit0_max=float(r.logits[0].abs().max()))
    del eng; torch.cuda.empty_cache()
print(json.dumps(res))
with open(os.path.join(os.environ.get("OUT", "."), "ab_" + ("old" if "old" in src else "new") + f"_{n}.jsonl"), "a") as f:
    f.write(json.dumps(res) + "\n")
