"""Which hosts' KV makes Star lose a needle? (CPU, the embedded model; a diagnostic)

python benchmarks/star_kv_swap.py --task passkey --length 4k --seeds 3,11 --out FILE.json

For each sample: dense's answer, star's (4 simulated hosts, anchor = block), and star's again
with the KV of chosen hosts replaced by the KV dense computed for the same positions (what that
block would hold had it seen the whole prefix). Phase 2 is exact in both, so the host whose
swap restores dense's answer is the one whose blockwise encoding misled the model.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from starshard.evals.runner import _prepare, parse_length  # noqa: E402
from starshard.models import load_model  # noqa: E402
from starshard.star.cache import PositionedKV  # noqa: E402
from starshard.star.engine import StarEngine, _num_layers  # noqa: E402

SWAPS = ([], [3], [2], [1, 2], [2, 3])


def _with_dense_kv(star, dense, hosts, layers):
    for r in hosts:
        new = PositionedKV()
        for layer in range(layers):
            _, dk, dv = dense.caches[0].segments(layer)[0]
            for start, k, _ in star.caches[r].segments(layer):
                n = k.shape[1]
                new.append(layer, start, dk[:, start:start + n].clone(), dv[:, start:start + n].clone())
        star.caches[r] = new


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--length", default="4k")
    ap.add_argument("--seeds", default="3,11")
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model, tok = load_model("default")
    layers = _num_layers(model)
    length = parse_length(a.length)
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        prep = _prepare(a.task, length, seed, tok, 8192, None)
        ctx, q = torch.tensor(prep.context_ids), torch.tensor(prep.query_ids)
        dense = StarEngine(model, method="dense")
        dense.encode(ctx)
        row = dict(task=a.task, length=length, seed=seed, depth=prep.sample.depth,
                   expected=prep.sample.answers,
                   dense=tok.decode(dense.generate(q, max_new_tokens=a.max_new_tokens).tokens))
        for swap in SWAPS:
            star = StarEngine(model, method="star", simulate=4)
            plan = star.encode(ctx)
            _with_dense_kv(star, dense, swap, layers)
            text = tok.decode(star.generate(q, max_new_tokens=a.max_new_tokens).tokens)
            row["star" + ("" if not swap else " dense KV on hosts " + ",".join(map(str, swap)))] = text
        row["blocks"] = [[p.start, p.end] for ps in plan.pieces for p in ps]   # the same each time
        for key in [k for k in row if k == "dense" or k.startswith("star")]:
            row[key + " correct"] = all(x in row[key] for x in row["expected"])
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
