"""KV caches for decoding with a block-sparse layout: contiguous, or head-sharded.

A head of an S2 layout reads a local window plus its own strided blocks, so once a block has
left every window it is read again only by the heads whose stride keeps it. A head-sharded
cache stores, per KV head, only the blocks that head will still read: each (head, block) is
live from the call that may write it until the last call that may read it, and blocks whose
lives do not overlap share a page (one layout block, one KV head). The assignment is made on
the host once, for the whole capacity, so a decode step reads a fixed block table and can be
captured in a CUDA graph like any ``sparse_attention_kvcache`` call. With local 16 and stride
16 over 128k tokens a KV head keeps 143 of its 2048 blocks (14x less memory).
"""
from __future__ import annotations

import heapq

import torch

from .layouts import BlockLayout
from .ops.decode import sparse_attention_kvcache

__all__ = ["KVCache", "head_page_plan"]

_CHUNK = 1 << 24   # elements of one [heads, query blocks, key blocks] slice of the plan


def _last_reader(layout, num_heads, num_kv_heads, nb):
    """int64 [Hkv, nb]: the last query block that reads key block j for KV head h (the union
    over the query heads of its group; a causal layout reads a block from its own on).
    Computed once per distinct pattern row, over the query blocks from each column chunk's
    first block on."""
    group = num_heads // num_kv_heads
    patterns = layout.pattern_index(torch.arange(num_heads)).view(num_kv_heads, group)
    rows_of, inv = torch.unique(patterns, return_inverse=True)      # inv [Hkv, group]
    last = torch.full((num_kv_heads, nb), -1, dtype=torch.int64)
    cols = max(1, _CHUNK // max(1, len(rows_of) * nb))
    for j0 in range(0, nb, cols):
        kb = torch.arange(j0, min(nb, j0 + cols))
        qb = torch.arange(j0, nb)
        m = layout.allowed(rows_of, qb, kb) & (qb.view(1, -1, 1) >= kb.view(1, 1, -1))
        per_row = torch.where(m, qb.int().view(1, -1, 1), -1).amax(1)    # [rows, C]
        last[:, j0:j0 + len(kb)] = per_row[inv].max(1).values             # [Hkv, C]
    return last


def head_page_plan(layout, capacity, num_heads, num_kv_heads, max_query_len=1):
    """Pages of a head-sharded cache: ``(pages [Hkv, nb] int64, pages per head [Hkv])``.

    Block j of KV head h is live from query block ``j - e`` (a call whose queries reach block
    j may write it while its earliest query is e blocks back, e = ceil((max_query_len - 1) /
    block size)) to ``last reader + e``; blocks whose lives do not overlap share a page (interval
    colouring, optimal). Blocks no query reads get no page (-1). The plan depends only on the
    arguments, so the last few are kept (a model's layers usually share one layout)."""
    key = (layout.handle, capacity, num_heads, num_kv_heads, max_query_len)
    plan = _PLANS.pop(key, None) or _plan(layout, capacity, num_heads, num_kv_heads,
                                           max_query_len)
    _PLANS[key] = plan   # most recently used last
    while len(_PLANS) > _PLANS_KEPT:
        del _PLANS[next(iter(_PLANS))]
    return plan[0].clone(), plan[1].clone()


_PLANS: dict = {}
_PLANS_KEPT = 8


def _plan(layout, capacity, num_heads, num_kv_heads, max_query_len):
    bs = layout.block_size
    nb = -(-capacity // bs)
    extra = -(-(max_query_len - 1) // bs)
    last = _last_reader(layout, num_heads, num_kv_heads, nb)
    pages = torch.full((num_kv_heads, nb), -1, dtype=torch.int64)
    counts = []
    for h in range(num_kv_heads):
        free, busy, n = [], [], 0      # free page ids; (end, page) of live blocks
        for j, lj in enumerate(last[h].tolist()):
            if lj < 0:
                continue
            start, end = j - extra, lj + extra
            while busy and busy[0][0] < start:
                heapq.heappush(free, heapq.heappop(busy)[1])
            if free:
                p = heapq.heappop(free)
            else:
                p, n = n, n + 1
            pages[h, j] = p
            heapq.heappush(busy, (end, p))
        counts.append(n)
    return pages, torch.tensor(counts, dtype=torch.int64)


class KVCache:
    """One attention layer's decode cache for a batch of sequences, for ``layout``.

    ``head_sharded=True`` stores per KV head only the blocks it will read again (see the module
    docstring; calls may bring at most ``max_query_len`` new tokens a sequence); ``False`` keeps
    every slot, ``[B, capacity, Hkv, D]``. A head-sharded capacity is rounded up to whole
    layout blocks. ``attend(q, k, v)`` appends the new keys/values at
    each sequence's length, attends (causal, the queries being the newest positions) and
    advances the lengths, all on the device: a step can be captured in a CUDA graph once the
    first call has run. ``seqlens`` (int32 [B]) may be set per sequence (``reset``)."""

    def __init__(self, layout, *, batch, capacity, num_heads, num_kv_heads, head_dim,
                 head_sharded=True, max_query_len=1, dtype=torch.float16, device="cpu"):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a starshard.BlockLayout, got {type(layout).__name__}")
        for name, x in (("batch", batch), ("capacity", capacity), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("max_query_len", max_query_len)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{name} must be a positive int, got {x!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if layout.num_heads is not None and layout.num_heads != num_heads:
            raise ValueError(f"layout has {layout.num_heads} query heads, num_heads is {num_heads}")
        if head_sharded:   # whole pages
            capacity = -(-capacity // layout.block_size) * layout.block_size
        layout.check_positions(capacity, capacity)
        self.layout, self.batch, self.capacity = layout, batch, capacity
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.head_sharded, self.max_query_len = head_sharded, max_query_len
        self.dtype, self.device = dtype, torch.device(device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        if head_sharded:
            pages, counts = head_page_plan(layout, capacity, num_heads, num_kv_heads, max_query_len)
            base = torch.cumsum(counts, 0) - counts                       # first page of head h
            per_seq = int(counts.sum())
            seq = torch.arange(batch).view(-1, 1, 1) * per_seq
            table = (pages + base.unsqueeze(1)).unsqueeze(0) + seq
            # blocks no query reads are still written: into one spare page at the end
            table = torch.where(pages.unsqueeze(0) >= 0, table, batch * per_seq)
            self.block_table = table.to(self.device, torch.int32)
            shape = (batch * per_seq + 1, layout.block_size, 1, head_dim)
        else:
            self.block_table = None
            shape = (batch, capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)

    def reset(self, seqlens=0):
        """Set every sequence's length (an int or an int tensor [B]); the slots are not cleared."""
        self.seqlens.copy_(torch.as_tensor(seqlens, dtype=torch.int32).expand(self.batch))

    def fill(self, k, v):
        """Load the K/V of a prefill, ``[B, n, Hkv, D]`` each (e.g. from ``sparse_attention``
        over the prompt), and set every length to n. Head-sharded: blocks are written in order,
        so each page ends up holding the block that is live at position n."""
        want = (self.batch, None, self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or any(w is not None and w != s for w, s in zip(want, t.shape)):
                raise ValueError(f"{name} must be [B={self.batch}, n, Hkv={self.num_kv_heads}, "
                                 f"D={self.head_dim}], got {tuple(t.shape)}")
        n = k.shape[1]
        if n > self.capacity:
            raise ValueError(f"{n} tokens do not fit the cache's capacity {self.capacity}")
        if self.block_table is None:
            self.k[:, :n] = k
            self.v[:, :n] = v
        else:
            self._fill_pages(k, v, n)
        self.reset(n)

    def _fill_pages(self, k, v, n):
        """Write blocks 0 .. ceil(n / bs) - 1 into their pages at once: of the blocks that share
        a page only the last is written, which is what writing them in order leaves there."""
        bs, spare = self.layout.block_size, self.k.shape[0] - 1
        nb, full = -(-n // bs), n // bs
        tab = self.block_table[:, :, :nb].long()                             # [B, Hkv, nb]
        j = torch.arange(nb, device=tab.device).expand_as(tab)
        last = torch.full((self.k.shape[0],), -1, dtype=torch.long, device=tab.device)
        last.scatter_reduce_(0, tab.flatten(), j.flatten(), "amax")
        keep = (last[tab] == j) & (tab != spare)     # the spare page holds unread blocks
        b, h, j = keep.nonzero(as_tuple=True)
        pages = tab[b, h, j]
        whole = j < full
        for src, dst in ((k, self.k), (v, self.v)):
            if full:
                blocks = src[:, :full * bs].view(self.batch, full, bs, self.num_kv_heads, -1)
                dst[pages[whole], :, 0] = blocks[b[whole], j[whole], :, h[whole]].to(dst.dtype)
            if n > full * bs:   # the partial last block: its first n - full * bs rows
                p = ~whole
                dst[pages[p], :n - full * bs, 0] = src[b[p], full * bs:n, h[p]].to(dst.dtype)

    def attend(self, q, k, v, *, sm_scale=None, return_lse=False, backend=None):
        """Append k/v ``[B, Nq, Hkv, D]`` at each sequence's length, attend with q
        ``[B, Nq, Hq, D]``, then advance the lengths by Nq; returns what
        ``sparse_attention_kvcache`` returns."""
        if q.dim() == 4 and q.shape[1] > self.max_query_len:
            raise ValueError(f"this cache takes at most max_query_len={self.max_query_len} new "
                             f"tokens a call, got {q.shape[1]}")
        res = sparse_attention_kvcache(q, self.k, self.v, self.layout, self.seqlens, k=k, v=v,
                                       block_table=self.block_table, sm_scale=sm_scale,
                                       return_lse=return_lse, backend=backend)
        self.seqlens += q.shape[1]
        return res

    def nbytes(self):
        """Bytes of K and V storage."""
        return 2 * self.k.numel() * self.k.element_size()

    def dense_nbytes(self):
        """Bytes the same cache takes keeping every slot of every head."""
        return 2 * self.batch * self.capacity * self.num_kv_heads * self.head_dim * \
            self.k.element_size()
