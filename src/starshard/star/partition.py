"""Cutting a context into blocks and assigning them to hosts.

Blocks go to hosts in contiguous runs (host 0 gets the first blocks). The host holding the last
context token is the *query host*. Ring attention instead splits the context into 2 * hosts
chunks and gives host r chunks r and 2 * hosts - 1 - r (zigzag), so causal work is balanced.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

__all__ = ["Piece", "Plan", "plan_blocks", "plan_zigzag", "default_block_size"]


@dataclass(frozen=True)
class Piece:
    """Context tokens [start, end) (global positions)."""
    start: int
    end: int

    @property
    def size(self):
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    """Which context pieces each host holds, and which host is the query host."""
    hosts: int
    pieces: tuple  # per host: tuple of Piece, in increasing position
    query_host: int

    def host_tokens(self, rank):
        return sum(p.size for p in self.pieces[rank])


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def plan_blocks(context_len, block_size, hosts):
    """Star/dense plan: blocks of ``block_size`` tokens, contiguous runs of blocks per host.

    Hosts beyond the number of blocks stay idle (with a warning).
    """
    _check_positive("context_len", context_len)
    _check_positive("block_size", block_size)
    _check_positive("hosts", hosts)
    blocks = [Piece(s, min(s + block_size, context_len)) for s in range(0, context_len, block_size)]
    nb = len(blocks)
    if hosts > nb:
        warnings.warn(f"{hosts} hosts but only {nb} context blocks: hosts {nb}..{hosts - 1} stay idle",
                      stacklevel=2)
    per = [nb // hosts + (1 if r < nb % hosts else 0) for r in range(hosts)]
    pieces, i = [], 0
    for r in range(hosts):
        pieces.append(tuple(blocks[i:i + per[r]]))
        i += per[r]
    query_host = max(r for r in range(hosts) if pieces[r])
    return Plan(hosts, tuple(pieces), query_host)


def plan_zigzag(context_len, hosts):
    """Ring plan: 2 * hosts nearly equal chunks, host r holds chunks r and 2*hosts-1-r."""
    _check_positive("context_len", context_len)
    _check_positive("hosts", hosts)
    n = 2 * hosts
    bounds = [round(i * context_len / n) for i in range(n + 1)]
    chunks = [Piece(bounds[i], bounds[i + 1]) for i in range(n)]
    pieces = []
    for r in range(hosts):
        mine = [c for c in (chunks[r], chunks[n - 1 - r]) if c.size > 0]
        pieces.append(tuple(mine))
    query_host = next(r for r in range(hosts) if any(p.end == context_len for p in pieces[r]))
    return Plan(hosts, tuple(pieces), query_host)


def default_block_size(context_len, num_params=None):
    """The Star paper's sizing: 4 blocks, capped at 32k tokens once the context passes 128k
    (16k for models of 30B parameters and more)."""
    _check_positive("context_len", context_len)
    block = math.ceil(context_len / 4)
    if context_len > 128 * 1024:
        cap = 16 * 1024 if (num_params or 0) >= 30e9 else 32 * 1024
        block = min(block, cap)
    return block
