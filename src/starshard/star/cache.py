"""Per-host KV storage that knows global positions.

A :class:`PositionedKV` holds, per layer, a list of contiguous segments ``(start, k, v)``: keys
of global positions ``start .. start + n - 1``. A host's context cache is one of these (its
blocks, the anchor dropped). On the query host the query and generated tokens are appended to
the same cache (right after the context's last segment when that host holds the end of the
context, so one attention call covers both) and cut off again after each answer
(:meth:`PositionedKV.truncate`).
"""
from __future__ import annotations

import torch

__all__ = ["PositionedKV"]

# Room added when a segment grows: decode steps append one token a layer, and copying the whole
# segment each step would cost as much as reading it.
_MIN_SPARE = 256


class PositionedKV:
    """Per-layer segments of keys/values ``[B, n, Hkv, D]`` with their first global position.

    A segment is stored as given until something is appended to it; it then moves into a buffer
    with spare room, so later appends write in place (amortised O(appended tokens)). Views from
    :meth:`segments` stay valid until the next append or truncate.
    """

    def __init__(self):
        # layer -> [[start, k, v, used, owned], ...]; only owned buffers are written in place
        self._layers: dict[int, list] = {}

    def append(self, layer, start, k, v):
        """Add keys/values of positions start..start+n-1; joins the last segment when adjacent."""
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        segs = self._layers.setdefault(layer, [])
        n = k.shape[1]
        if not segs or segs[-1][0] + segs[-1][3] != start:
            segs.append([start, k, v, n, False])
            return
        seg = segs[-1]
        _, kb, vb, used, owned = seg
        if not owned or kb.shape[1] < used + n:   # a tensor as given, or a full buffer: move it
            cap = used + n + max(_MIN_SPARE, (used + n) // 16)
            shape = (kb.shape[0], cap) + tuple(kb.shape[2:])
            nk, nv = kb.new_empty(shape), vb.new_empty(shape)
            nk[:, :used] = kb[:, :used]
            nv[:, :used] = vb[:, :used]
            seg[1], seg[2] = kb, vb = nk, nv
            seg[4] = True
        kb[:, used:used + n] = k
        vb[:, used:used + n] = v
        seg[3] = used + n

    def segments(self, layer):
        """[(start, k, v)] of ``layer`` in the order they were added."""
        return [(s, kb[:, :n], vb[:, :n]) for s, kb, vb, n, _ in self._layers.get(layer, [])]

    def truncate(self, end):
        """Drop every key at a global position >= ``end`` (buffers keep their room for reuse)."""
        for layer in list(self._layers):
            kept = []
            for seg in self._layers[layer]:
                if seg[0] < end:
                    seg[3] = min(seg[3], end - seg[0])
                    kept.append(seg)
            if kept:
                self._layers[layer] = kept
            else:
                del self._layers[layer]

    def num_tokens(self, layer=0):
        return sum(seg[3] for seg in self._layers.get(layer, []))

    def positions(self, layer=0):
        """Sorted global positions held for ``layer`` (for tests and reports)."""
        out = [torch.arange(seg[0], seg[0] + seg[3]) for seg in self._layers.get(layer, [])]
        return torch.cat(out).sort().values if out else torch.zeros(0, dtype=torch.long)

    def nbytes(self):
        """Bytes of the keys and values held (not counting spare room)."""
        return sum(seg[1][:, :seg[3]].numel() * seg[1].element_size() * 2
                   for segs in self._layers.values() for seg in segs)

    def clear(self):
        self._layers.clear()

    def __len__(self):
        return len(self._layers)
