"""Per-host KV storage that knows global positions.

A :class:`PositionedKV` holds, per layer, a list of contiguous segments ``(start, k, v)``: keys
of global positions ``start .. start + n - 1``. A host's context cache is one of these (its
blocks, the anchor dropped); the query host keeps a second one for the query and generated
tokens, cleared after each answer.
"""
from __future__ import annotations

import torch

__all__ = ["PositionedKV"]


class PositionedKV:
    """Per-layer segments of keys/values ``[B, n, Hkv, D]`` with their first global position."""

    def __init__(self):
        self._layers: dict[int, list] = {}

    def append(self, layer, start, k, v):
        """Add keys/values of positions start..start+n-1; joins the last segment when adjacent."""
        segs = self._layers.setdefault(layer, [])
        if segs and segs[-1][0] + segs[-1][1].shape[1] == start:
            s0, k0, v0 = segs[-1]
            segs[-1] = (s0, torch.cat([k0, k], 1), torch.cat([v0, v], 1))
        else:
            segs.append((start, k, v))

    def segments(self, layer):
        return self._layers.get(layer, [])

    def num_tokens(self, layer=0):
        return sum(k.shape[1] for _, k, _ in self.segments(layer))

    def positions(self, layer=0):
        """Sorted global positions held for ``layer`` (for tests and reports)."""
        out = [torch.arange(s, s + k.shape[1]) for s, k, _ in self.segments(layer)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def nbytes(self):
        return sum(k.numel() * k.element_size() * 2 for segs in self._layers.values() for _, k, _ in segs)

    def clear(self):
        self._layers.clear()

    def __len__(self):
        return len(self._layers)
