"""Operation-count model of dense, Star and Ring inference (predictions beside measurements).

Phase 1 (time to encode the context) per host = linear FLOPs / linear rate + attention FLOPs /
attention rate + bytes sent / link bandwidth (no overlap assumed); the slowest host sets the
parallel time. A decode step = weight bytes + this host's KV bytes over HBM bandwidth, plus two
small collectives per layer for star and ring. Rates default to an H100 with starshard's kernels
(linear 600 TFLOP/s, attention 420 TFLOP/s over attended pairs, HBM 3 TB/s, 100 GB/s links,
10 us per collective); change them with the options.

    python benchmarks/opcount.py --n 32k,128k --hosts 4                     # predictions
    python benchmarks/opcount.py --compare benchmarks/results/bench_star_h100.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_sizes  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int = 32
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    bytes_per_value: int = 2

    @property
    def layer_params(self):
        kv = self.kv_heads * self.head_dim
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate

    @property
    def kv_bytes_per_token(self):
        return self.layers * 2 * self.kv_heads * self.head_dim * self.bytes_per_value


LLAMA3_8B = Shape()


@dataclass(frozen=True)
class Rates:
    linear: float = 600e12     # FLOP/s
    attention: float = 420e12  # FLOP/s over attended pairs
    hbm: float = 3.0e12        # bytes/s
    link: float = 100e9        # bytes/s between two hosts
    latency: float = 10e-6     # s per collective


def _cost(m, r, tokens, pairs, sent=0.0):
    lin = 2 * m.layer_params * m.layers * tokens / r.linear
    att = 4 * m.head_dim * m.heads * m.layers * pairs / r.attention
    return lin + att + sent / r.link


def causal_pairs(n):
    return n * (n + 1) / 2


def phase1_per_host(method, n, hosts, m=LLAMA3_8B, r=Rates(), block=None, anchor=None,
                    anchor_mode="once"):
    """Predicted phase-1 seconds of each host."""
    if method == "dense":
        return [_cost(m, r, n, causal_pairs(n))]
    if method == "ring":
        # zigzag: each host holds 2 chunks of n / (2 hosts); causal work balanced; every host
        # receives the other hosts' KV once
        share = n / hosts
        return [_cost(m, r, share, causal_pairs(n) / hosts, sent=(hosts - 1) * share * m.kv_bytes_per_token)
                ] * hosts
    block = block or -(-n // hosts)
    anchor = block if anchor is None else anchor
    blocks = [min(block, n - s) for s in range(0, n, block)]
    per = [len(blocks) // hosts + (1 if h < len(blocks) % hosts else 0) for h in range(hosts)]
    out, i = [], 0
    for h in range(hosts):
        mine = blocks[i:i + per[h]]
        first = i == 0
        i += per[h]
        tokens = sum(mine)
        pairs = sum(causal_pairs(b) for b in mine) + sum(b * anchor for b in mine[1 if first else 0:])
        sent = 0.0
        if not first and mine and anchor:
            if anchor_mode == "stream":   # the anchor's KV arrives from host 0
                sent = anchor * m.kv_bytes_per_token
            else:                         # the anchor is encoded here once
                tokens += anchor
                pairs += causal_pairs(anchor)
        out.append(_cost(m, r, tokens, pairs, sent) if mine else 0.0)
    return out


def decode_step(method, n, hosts, m=LLAMA3_8B, r=Rates()):
    """Predicted seconds of one generated token with n cached tokens (the query host's)."""
    weights = (m.layer_params * m.layers + m.vocab * m.hidden) * m.bytes_per_value
    kv = (n if method == "dense" else n / hosts) * m.kv_bytes_per_token
    comm = 0.0 if method == "dense" or hosts == 1 else 2 * m.layers * r.latency
    return (weights + kv) / r.hbm + comm


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="32k,128k")
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--compare", help="a bench_star JSON: print each measured record beside its prediction")
    a = ap.parse_args()
    print("| N | method | anchor | hosts | phase 1 parallel s (pred) | measured | x dense (pred) | measured | decode tok/s (pred) | measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if a.compare:
        recs = [r for r in json.loads(Path(a.compare).read_text())["records"] if "error" not in r]
    else:
        recs = [dict(n=n, method=meth, hosts=a.hosts, anchor_mode=mode)
                for n in parse_sizes(a.n) for meth, mode in
                (("dense", "once"), ("star", "once"), ("star", "stream"), ("ring", "once"))]
    dense_pred = {}
    for rec in recs:
        hosts = rec["hosts"] if rec["method"] != "dense" else 1
        p = max(phase1_per_host(rec["method"], rec["n"], hosts, block=rec.get("block_size") if rec["method"] == "star" else None,
                                anchor_mode=rec["anchor_mode"]))
        if rec["method"] == "dense":
            dense_pred[rec["n"]] = p
        d = decode_step(rec["method"], rec["n"], hosts)
        meas = rec.get("phase1_parallel_s")
        dm = next((x.get("phase1_parallel_s") for x in recs if x["n"] == rec["n"] and x["method"] == "dense"), None)
        ratio = f"{p / dense_pred[rec['n']]:.2f}" if rec["n"] in dense_pred else "-"
        mratio = f"{meas / dm:.2f}" if meas and dm else "-"
        mtok = rec.get("decode_tokens_per_s")
        print(f"| {rec['n']} | {rec['method']} | {rec['anchor_mode'] if rec['method'] == 'star' else '-'} | {hosts} | "
              f"{p:.2f} | {f'{meas:.2f}' if meas else '-'} | {ratio} | {mratio} | {1 / d:.0f} | "
              f"{f'{mtok:.1f}' if mtok else '-'} |")


if __name__ == "__main__":
    main()
