"""Per-head block-sparse attention patterns.

A :class:`BlockLayout` says, for every query head ``h``, query block ``i`` and key block ``j``
(absolute block indices, ``block_size`` tokens each), whether head ``h`` may attend that block
pair. :func:`local_stride` builds the S2-attention pattern; :meth:`BlockLayout.from_mask` takes
any per-head pattern. Layouts are immutable and hashable by value.

Nothing here materialises a token-level N x N mask; the block-level work is done in chunks so
memory stays O(heads x blocks x attended blocks).
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

__all__ = ["BlockLayout", "local_stride", "TileTable"]

_SUPPORTED_BLOCKS = (16, 32, 64, 128)
_ids = itertools.count()
# Every layout gets a small int handle at construction, so ops (and torch.compile graphs) can
# carry it as a plain int: equal keys share one handle and one registered layout.
_HANDLES: dict = {}
_REGISTRY: dict = {}
_REGISTRY_LOCK = threading.Lock()


def layout_from_handle(handle):
    """The layout registered under ``handle`` (see ``BlockLayout.handle``)."""
    return _REGISTRY[handle]


def _check_int(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class BlockLayout:
    """A per-head block pattern over absolute block indices.

    Build one with :func:`local_stride` or :meth:`from_mask`. ``num_heads`` is the number of
    query heads; ``num_pattern_heads`` is how many distinct patterns are stored (the KV-head
    count when query heads of a GQA group share their KV head's pattern).
    """

    def __init__(self, *, block_size, num_heads, num_pattern_heads, key, num_blocks=None,
                 rule=None, block_mask=None, causal_rule=False):
        self.block_size = block_size
        self.num_heads = num_heads
        self.num_pattern_heads = num_pattern_heads
        self.num_blocks = num_blocks  # None: the pattern extends to any length
        self._key = key
        self._rule = rule
        self._block_mask = block_mask
        self.causal_rule = causal_rule
        with _REGISTRY_LOCK:
            self.handle = _HANDLES.setdefault(key, len(_HANDLES))
            _REGISTRY.setdefault(self.handle, self)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_mask(cls, mask, block_size):
        """Layout from a bool block mask ``[Hq, nb, nb]`` (or ``[nb, nb]`` for every head).

        Under causal attention, entries above the diagonal are ignored. Sequences longer than
        ``nb * block_size`` tokens raise ``ValueError`` at call time.
        """
        _check_block_size(block_size)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
            shared = True
        elif mask.dim() == 3:
            shared = False
        else:
            raise ValueError(f"mask must be [Hq, nb, nb] or [nb, nb], got shape {tuple(mask.shape)}")
        if mask.shape[-1] != mask.shape[-2] or mask.shape[-1] == 0 or mask.shape[0] == 0:
            raise ValueError(f"mask must be square and non-empty over blocks, got shape {tuple(mask.shape)}")
        mask = mask.detach().to("cpu").contiguous().clone()
        heads = None if shared else mask.shape[0]
        return cls(block_size=block_size, num_heads=heads, num_pattern_heads=mask.shape[0],
                   key=("mask", next(_ids)), num_blocks=mask.shape[-1], block_mask=mask)

    def for_heads(self, lo, hi):
        """The layout of query heads ``lo..hi-1`` alone, renumbered from 0 (a tensor-parallel
        shard of the heads). Under GQA the range holds whole groups, or lies inside one group
        (tensor parallelism over more ranks than KV heads, each rank with a copy of its KV
        head). A layout shared by all heads is returned as is."""
        if self.num_heads is None:
            return self
        _check_int("lo", lo, 0)
        _check_int("hi", hi, 1)
        if not lo < hi <= self.num_heads:
            raise ValueError(f"head range ({lo}, {hi}) must satisfy 0 <= lo < hi <= "
                             f"{self.num_heads} (the layout's query heads)")
        group = self.num_heads // self.num_pattern_heads
        inside = lo // group == (hi - 1) // group
        if (lo % group or hi % group) and not inside:
            raise ValueError(f"head range ({lo}, {hi}) must align to GQA groups of {group} "
                             f"query heads or lie inside one")
        if (lo, hi) == (0, self.num_heads):
            return self
        p_lo = lo // group
        p_hi = p_lo + 1 if inside else hi // group
        rule, mask = self._rule, None
        if rule is not None:
            def rule(ph, i, j, _parent=self._rule):
                return _parent(ph + p_lo, i, j)
        else:
            mask = self._block_mask[p_lo:p_hi].clone()
        return BlockLayout(block_size=self.block_size, num_heads=hi - lo,
                           num_pattern_heads=p_hi - p_lo, key=("heads", self._key, lo, hi),
                           num_blocks=self.num_blocks, rule=rule, block_mask=mask,
                           causal_rule=self.causal_rule)

    # ---- the pattern ----------------------------------------------------------------------
    def pattern_index(self, heads):
        """Pattern row of each query head (GQA layouts share one row per KV head)."""
        heads = torch.as_tensor(heads)
        hq = self.num_heads
        if hq is None:
            return torch.zeros_like(heads)
        return heads // (hq // self.num_pattern_heads)

    def allowed(self, pattern_heads, q_blocks, k_blocks):
        """Bool ``[P, R, C]``: may pattern head p attend block pair (q_blocks[r], k_blocks[c])?

        Indices are absolute block indices (int64 tensors, one device). No causality from the
        attention call is applied here; a causal ``local_stride`` layout excludes j > i itself.
        """
        qb = q_blocks.view(1, -1, 1)
        # k_blocks [C], or [P, C]: columns of their own for each pattern head
        kb = k_blocks.view(1, 1, -1) if k_blocks.dim() == 1 else k_blocks.unsqueeze(1)
        if self._rule is not None:
            return self._rule(pattern_heads.view(-1, 1, 1), qb, kb)
        nb = self.num_blocks
        m = self._block_mask.to(q_blocks.device)
        ph = pattern_heads.view(-1, 1, 1)
        inside = (qb >= 0) & (qb < nb) & (kb >= 0) & (kb < nb)
        return m[ph, qb.clamp(0, nb - 1), kb.clamp(0, nb - 1)] & inside

    def _heads_for(self, hq):
        if self.num_heads is None:
            return hq
        if hq is not None and hq != self.num_heads:
            raise ValueError(f"layout has {self.num_heads} query heads but the input has {hq}")
        return self.num_heads

    def mask(self, nbq, nbk, q_block_start=None, *, num_heads=None, device="cpu"):
        """Bool ``[Hq, nbq, nbk]``: rows are absolute query blocks q_block_start.. (default nbk - nbq)."""
        _check_int("nbq", nbq, 0)
        _check_int("nbk", nbk, 0)
        if q_block_start is None:
            q_block_start = nbk - nbq
        _check_int("q_block_start", q_block_start)
        hq = self._heads_for(num_heads)
        if hq is None:
            hq = 1
        self._check_extent(q_block_start + nbq, nbk)
        heads = self.pattern_index(torch.arange(hq, device=device))
        rows = torch.arange(q_block_start, q_block_start + nbq, device=device)
        cols = torch.arange(nbk, device=device)
        return self.allowed(heads, rows, cols)

    def _check_extent(self, q_blocks_end, k_blocks_end):
        if self.num_blocks is not None:
            top = max(q_blocks_end, k_blocks_end)
            if top > self.num_blocks:
                raise ValueError(
                    f"sequence needs {top} blocks of {self.block_size} tokens but the layout's mask "
                    f"covers only {self.num_blocks} blocks ({self.num_blocks * self.block_size} tokens)")

    def check_positions(self, q_pos_end, k_pos_end):
        """Raise ValueError if positions up to these (exclusive) ends are past the layout's mask."""
        bs = self.block_size
        self._check_extent(-(-q_pos_end // bs), -(-k_pos_end // bs))

    # ---- counts ---------------------------------------------------------------------------
    def pairs(self, q_len, k_len, causal=True, *, q_start=None, k_start=0, num_heads=None):
        """Exact number of allowed (head, query, key) pairs, by the position rule of DESIGN.md."""
        _check_int("q_len", q_len, 0)
        _check_int("k_len", k_len, 0)
        _check_int("k_start", k_start, 0)
        if q_start is None:
            q_start = k_start + k_len - q_len
        _check_int("q_start", q_start)
        hq = self._heads_for(num_heads) or 1
        if q_len == 0 or k_len == 0:
            return 0
        bs = self.block_size
        q_lo, q_hi = max(q_start, 0), q_start + q_len
        if q_hi <= q_lo:
            return 0
        k_lo, k_hi = k_start, k_start + k_len
        self.check_positions(q_hi, k_hi)
        # tokens per block inside the position ranges
        qb = torch.arange(q_lo // bs, (q_hi - 1) // bs + 1)
        kb = torch.arange(k_lo // bs, (k_hi - 1) // bs + 1)
        q_cnt = (torch.minimum((qb + 1) * bs, torch.tensor(q_hi)) - torch.maximum(qb * bs, torch.tensor(q_lo)))
        heads = self.pattern_index(torch.arange(hq))
        total = 0
        chunk = max(1, (1 << 24) // max(1, len(kb) * hq))
        for r0 in range(0, len(qb), chunk):
            rows = qb[r0:r0 + chunk]
            allowed = self.allowed(heads, rows, kb)  # [H, r, c]
            if causal:
                # pairs with p_k <= p inside block pair (i, j), for every query in the block
                # count = sum over queries p of #keys k in block j with k_lo<=k<k_hi and k<=p
                qs = torch.maximum(rows * bs, torch.tensor(q_lo))
                qe = torch.minimum((rows + 1) * bs, torch.tensor(q_hi))  # exclusive
                ks = torch.maximum(kb * bs, torch.tensor(k_lo))
                ke = torch.minimum((kb + 1) * bs, torch.tensor(k_hi))
                per = _causal_pair_count(qs.view(-1, 1), qe.view(-1, 1), ks.view(1, -1), ke.view(1, -1))
            else:
                k_cnt = torch.minimum((kb + 1) * bs, torch.tensor(k_hi)) - torch.maximum(kb * bs, torch.tensor(k_lo))
                per = q_cnt[r0:r0 + chunk].view(-1, 1) * k_cnt.view(1, -1)
            total += int((allowed.to(torch.int64) * per.unsqueeze(0)).sum())
        return total

    def density(self, n, *, num_heads=None):
        """pairs(n, n) / (Hq * n * (n + 1) / 2): the share of causal pairs the layout keeps."""
        _check_int("n", n, 1)
        hq = self._heads_for(num_heads) or 1
        return self.pairs(n, n, True, num_heads=num_heads) / (hq * n * (n + 1) / 2)

    def is_kv_efficient(self, num_blocks=None):
        """True if, per head, once a query block skips a key block every later one skips it too.

        Checked over ``num_blocks`` blocks (default: the mask's size, or 64 local-stride periods).
        A decode cache may then drop, per head, the blocks no later query reads.
        """
        if num_blocks is None:
            num_blocks = self.num_blocks or 256
        nb = num_blocks
        heads = torch.arange(self.num_pattern_heads)
        idx = torch.arange(nb)
        m = self.allowed(heads, idx, idx)  # [P, i, j]
        lower = idx.view(-1, 1) >= idx.view(1, -1)
        m = m & lower
        # along i (for i >= j) the column must be True...True False...False
        mi = m.to(torch.int8)
        rises = (mi[:, 1:, :] > mi[:, :-1, :]) & lower[1:, :].unsqueeze(0) & lower[:-1, :].unsqueeze(0)
        return not bool(rises.any())

    # ---- identity -------------------------------------------------------------------------
    @property
    def key(self):
        return self._key

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, BlockLayout) and other._key == self._key

    def __repr__(self):
        if self._key[0] == "local_stride":
            return f"BlockLayout.local_stride{self._key[1:]}"
        if self._key[0] == "heads":
            parent = _REGISTRY[_HANDLES[self._key[1]]]
            return f"{parent!r}.for_heads({self._key[2]}, {self._key[3]})"
        return (f"BlockLayout.from_mask(heads={self.num_pattern_heads}, blocks={self.num_blocks}, "
                f"block_size={self.block_size})")


def _causal_pair_count(qs, qe, ks, ke):
    """Pairs (p, k) with qs<=p<qe, ks<=k<ke, k<=p (all int64 tensors, broadcast)."""
    # for each p: max(0, min(p, ke-1) - ks + 1); sum over p in [qs, qe)
    # split p into p < ke (count p-ks+1 when p>=ks) and p >= ke (count ke-ks)
    zero = torch.zeros((), dtype=torch.int64)
    a = torch.maximum(qs, ks)               # first p with a positive count
    b = torch.minimum(qe, ke)               # p in [a, b): count p - ks + 1
    n1 = torch.clamp(b - a, min=0)
    first = a - ks + 1
    s1 = n1 * first + n1 * (n1 - 1) // 2
    c = torch.maximum(qs, ke)               # p in [c, qe): count ke - ks
    n2 = torch.clamp(qe - c, min=0)
    s2 = n2 * torch.clamp(ke - ks, min=0)
    return torch.where(ke > ks, s1 + s2, zero)


def _check_block_size(block_size):
    _check_int("block_size", block_size)
    if block_size not in _SUPPORTED_BLOCKS:
        raise ValueError(f"block_size must be one of {_SUPPORTED_BLOCKS}, got {block_size}")


def local_stride(num_heads, block_size, local_blocks, vert_stride, *, causal=True, homo_head=False,
                 num_dense_heads=0, head_offset=0, head_step=None, num_kv_heads=None, head_range=None):
    """The S2-attention pattern: a local window plus head-offset vertical strides.

    Query block i of head h attends key block j iff (causal: j <= i) and (i - j < local_blocks,
    or |i - j| < local_blocks when not causal, or (j + h*head_step + head_offset) % vert_stride
    == 0). With ``num_kv_heads`` the pattern index h is the KV head and a GQA group shares it.
    The last ``num_dense_heads`` pattern heads are dense. ``head_range=(a, b)`` keeps query heads
    a..b-1 of the ``num_heads`` global heads (tensor parallel; group-aligned under GQA).
    """
    _check_int("num_heads", num_heads, 1)
    _check_block_size(block_size)
    _check_int("local_blocks", local_blocks, 0)
    _check_int("vert_stride", vert_stride, 1)
    _check_int("num_dense_heads", num_dense_heads, 0)
    _check_int("head_offset", head_offset)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if num_kv_heads is not None:
        _check_int("num_kv_heads", num_kv_heads, 1)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    pattern_heads = num_kv_heads if num_kv_heads is not None else num_heads
    if num_dense_heads > pattern_heads:
        raise ValueError(f"num_dense_heads ({num_dense_heads}) exceeds the {pattern_heads} pattern heads")
    if homo_head:
        if head_step not in (None, 0):
            raise ValueError(f"homo_head=True means head_step=0, got head_step={head_step}")
        head_step = 0
    elif head_step is None:
        head_step = max(1, vert_stride // pattern_heads)
    else:
        _check_int("head_step", head_step, 0)
    if local_blocks == 0 and vert_stride > 1 and num_dense_heads < pattern_heads:
        pass  # legal: strided-only heads (a query may then see no key: output 0, lse -inf)
    group = num_heads // pattern_heads
    lo, hi = 0, num_heads
    if head_range is not None:
        if (not isinstance(head_range, (tuple, list)) or len(head_range) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in head_range)):
            raise TypeError(f"head_range must be a pair of ints (a, b), got {head_range!r}")
        lo, hi = head_range
        if not 0 <= lo < hi <= num_heads:
            raise ValueError(f"head_range must satisfy 0 <= a < b <= num_heads ({num_heads}), got {head_range}")
        if lo % group or hi % group:
            raise ValueError(f"head_range {head_range} must align to GQA groups of {group} query heads")
    p_lo, p_hi = lo // group, hi // group
    dense_from = pattern_heads - num_dense_heads

    def rule(ph, i, j):
        g = ph + p_lo  # global pattern head index
        if causal:
            near = (i - j < local_blocks) & (j <= i)
        else:
            near = (i - j).abs() < local_blocks
        strided = ((j + g * head_step + head_offset) % vert_stride) == 0
        out = near | strided | (g >= dense_from)
        if causal:
            out = out & (j <= i)
        return out & (i >= 0) & (j >= 0)

    key = ("local_stride", num_heads, block_size, local_blocks, vert_stride, causal, head_step,
           num_dense_heads, head_offset, num_kv_heads, (lo, hi))
    return BlockLayout(block_size=block_size, num_heads=hi - lo, num_pattern_heads=p_hi - p_lo,
                       key=key, rule=rule, causal_rule=causal)


# ---- kernel lookup tables --------------------------------------------------------------------

@dataclass
class TileTable:
    """Per (pattern head, tile) list of units to visit, for the Triton kernels.

    The tile runs along one axis (queries for forward/dq, keys for dk/dv) in position space:
    tile t covers positions [(t0 + t) * tile, (t0 + t + 1) * tile). Units run along the other axis,
    ``unit`` tokens each: unit u covers positions [u * unit, (u + 1) * unit). For row (p, t):
    ``units[p, t, :ntot]`` lists units, the first ``nfull`` need no mask (whole tile attends the
    whole unit and it is inside the bounds), the rest carry ``bits``: bit r set iff tile
    sub-block r (``sub`` tokens) may attend the unit. ``nfull`` and ``ntot`` are multiples of
    ``group``; padding entries have unit -1 and bits 0.

    ``subs`` (merged key tiles, transposed tables only; else None): int32 [P, T, tile // sub], the
    block index of each sub-block of tile (p, t), -1 for padding. Key blocks are then grouped
    into tiles by how many query units attend them (Merge-K), not by position, so a tile of
    small strided key blocks is not mostly masked.
    """
    units: torch.Tensor   # int32 [P, T, L]
    bits: torch.Tensor    # int32 [P, T, L]
    nfull: torch.Tensor   # int32 [P, T]
    ntot: torch.Tensor    # int32 [P, T]
    t0: int
    tile: int
    unit: int
    sub: int
    group: int
    subs: torch.Tensor | None = None
    # launch orders derived from this table, cached by the kernels' host code
    orders: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)

    @property
    def num_tiles(self):
        return self.units.shape[1]


_TABLE_CACHE: "OrderedDict[tuple, TileTable]" = OrderedDict()
_TABLE_CACHE_SIZE = 64
_TABLE_LOCK = threading.Lock()
# tables read by captured CUDA graphs, per cache: a graph holds no reference to the tensors its
# kernels read, so these stay for the life of the process instead of leaving with the LRU
_CAPTURED_TABLES: "dict[int, dict]" = {}


def is_capturing(device):
    """Whether ``device`` is a CUDA device and the current stream is capturing a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def cached_table(cache, limit, key, device, build):
    """``cache[key]``, made by ``build()`` on a miss and kept in an LRU of ``limit`` entries.
    While a CUDA graph is being captured on ``device`` a hit is also kept for good (the graph
    reads it at every replay), and a miss raises: a table cannot be built during capture."""
    capturing = is_capturing(torch.device(device))
    with _TABLE_LOCK:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
        else:
            hit = _CAPTURED_TABLES.get(id(cache), {}).get(key)
        if hit is not None:
            if capturing:
                _CAPTURED_TABLES.setdefault(id(cache), {})[key] = hit
            return hit
    if capturing:
        raise RuntimeError(
            "starshard: a CUDA graph is being captured but the lookup table this call needs "
            "(for its shapes, q_start and k_start) was never built; run the same call once "
            "outside the graph first (a warm-up), then capture it")
    table = build()
    with _TABLE_LOCK:
        cache[key] = table
        while len(cache) > limit:
            cache.popitem(last=False)
    return table


def _canonical_ranges(transpose, tile, unit, q_range, k_range):
    """The one (q_range, k_range) standing for every pair of ranges that gives the same table
    rows: the tile axis counts only which spans of max(tile, unit) positions it touches (a table
    with a few more tiles than launched serves the launched ones unchanged), the unit axis which
    units it touches and which of them lie wholly inside. A decode step, one key and one query
    further each call, then reuses the table until it crosses a unit boundary instead of
    building one per length or per query tile."""
    t_rng, u_rng = (k_range, q_range) if transpose else (q_range, k_range)
    t_lo, t_hi = t_rng
    if t_hi > t_lo:
        span = max(tile, unit)   # both powers of two: a multiple of each
        t_rng = (t_lo // span * span, ((t_hi - 1) // span + 1) * span)
    u_lo, u_hi = u_rng
    if u_hi > u_lo:
        if u_lo % unit:   # inside the first unit: it sticks out whatever the exact start
            u_lo = u_lo // unit * unit + 1
        if u_hi % unit:
            u_hi = (u_hi // unit + 1) * unit - 1
        u_rng = (u_lo, u_hi)
    return (u_rng, t_rng) if transpose else (t_rng, u_rng)


def tile_table(layout, *, transpose, tile, unit, group, q_range, k_range, causal, exact_bounds,
               device, merge=False):
    """Cached :class:`TileTable` for ``layout`` (see :func:`build_tile_table`); ranges that give
    the same table share one entry. During CUDA-graph capture only tables built before are
    served (see :func:`cached_table`)."""
    device = torch.device(device)
    if not merge:   # merged key tiles depend on the exact key range
        q_range, k_range = _canonical_ranges(transpose, tile, unit, tuple(q_range), tuple(k_range))
    key = (layout.key, transpose, tile, unit, group, q_range, k_range, causal, exact_bounds,
           str(device), merge)
    return cached_table(_TABLE_CACHE, _TABLE_CACHE_SIZE, key, device, lambda: build_tile_table(
        layout, transpose=transpose, tile=tile, unit=unit, group=group, q_range=q_range,
        k_range=k_range, causal=causal, exact_bounds=exact_bounds, device=device, merge=merge))


def build_tile_table(layout, *, transpose, tile, unit, group, q_range, k_range, causal,
                     exact_bounds, device, merge=False):
    """Build the lookup table of the tiles that cover a position range.

    ``q_range``/``k_range`` are [lo, hi) position ranges of queries and keys (lo >= 0).
    ``transpose=False``: tiles along queries, units along keys (forward, dq).
    ``transpose=True``: tiles along keys, units along queries (dk, dv).
    ``exact_bounds``: a unit that sticks out of its position range is not "full".
    ``merge`` (transposed, block size < tile): group key blocks into tiles by attendance
    (``TileTable.subs``) instead of by position.
    """
    bs = layout.block_size
    sub = min(bs, tile)
    nsub = tile // sub
    if unit > bs and unit % bs == 0:
        raise ValueError("unit may not span several layout blocks")
    if bs % unit and unit % bs:
        raise ValueError(f"unit {unit} and block size {bs} must divide one another")
    (q_lo, q_hi), (k_lo, k_hi) = q_range, k_range
    t_lo, t_hi = (k_lo, k_hi) if transpose else (q_lo, q_hi)
    u_lo, u_hi = (q_lo, q_hi) if transpose else (k_lo, k_hi)
    P = layout.num_pattern_heads
    heads = torch.arange(P, device=device)
    # the tiles cover the tile axis range even when there is no unit to visit (rows with
    # ntot == 0: the kernel still writes out = 0 / lse = -inf there)
    t_empty, u_empty = t_hi <= t_lo, u_hi <= u_lo
    t0 = t_lo // tile if not t_empty else 0
    n_tiles = 0 if t_empty else (t_hi - 1) // tile + 1 - t0
    u0 = u_lo // unit if not u_empty else 0
    n_units = 0 if u_empty else (u_hi - 1) // unit + 1 - u0
    if n_tiles == 0 or n_units == 0:
        z = torch.zeros(P, max(n_tiles, 0), group, dtype=torch.int32, device=device)
        zc = torch.zeros(P, max(n_tiles, 0), dtype=torch.int32, device=device)
        return TileTable(z - 1, z, zc, zc, t0, tile, unit, sub, group)
    uidx = torch.arange(u0, u0 + n_units, device=device)
    u_start = uidx * unit
    u_end = u_start + unit - 1          # inclusive
    u_block = u_start // bs
    u_inside = (u_start >= u_lo) & (u_end < u_hi)
    r = torch.arange(nsub, device=device)
    weights = (1 << r).to(torch.int64).view(1, 1, -1, 1)
    full_bits = (1 << nsub) - 1
    budget = 1 << 25
    subs = None
    if merge and transpose and nsub > 1:
        subs = _merged_key_tiles(layout, heads, t_lo, t_hi, nsub, u_start, u_end, u_block, causal,
                                 budget, device)
        t0, n_tiles = 0, subs.shape[1]
    chunk = max(1, budget // max(1, P * nsub * n_units))
    parts = []
    for c0 in range(0, n_tiles, chunk):
        tiles = torch.arange(t0 + c0, t0 + min(n_tiles, c0 + chunk), device=device)
        if subs is None:   # tiles of consecutive positions, shared by every pattern head
            s_start = tiles.view(1, -1, 1) * tile + r.view(1, 1, -1) * sub              # [1, C, R]
            s_block = (s_start // bs).reshape(-1)
        else:              # merged key tiles (sub == bs): blocks of each head's own choosing
            blk = subs[:, tiles].long()                                               # [P, C, R]
            s_start = blk.clamp(min=0) * bs
            s_block = blk.reshape(P, -1)
        s_end = s_start + sub - 1
        if transpose:
            allowed = layout.allowed(heads, u_block, s_block)                         # [P, U, C*R]
            allowed = allowed.view(P, n_units, len(tiles), nsub).permute(0, 2, 3, 1)
        else:
            allowed = layout.allowed(heads, s_block, u_block).view(P, len(tiles), nsub, n_units)
        if subs is not None:
            allowed = allowed & (blk >= 0).unsqueeze(-1)
        # sub-block / unit pairs with at least one causal (q, k) pair, and fully causal ones
        if transpose:   # sub-block = keys, unit = queries
            poss = u_end.view(1, 1, 1, -1) >= s_start.unsqueeze(-1)
            fullc = u_start.view(1, 1, 1, -1) >= s_end.unsqueeze(-1)
        else:           # sub-block = queries, unit = keys
            poss = u_start.view(1, 1, 1, -1) <= s_end.unsqueeze(-1)
            fullc = u_end.view(1, 1, 1, -1) <= s_start.unsqueeze(-1)
        if causal:
            allowed = allowed & poss
            allfull = (allowed & fullc).all(dim=2)                              # [P, C, U]
        else:
            allfull = allowed.all(dim=2)
        bits = (allowed.to(torch.int64) * weights).sum(dim=2)                 # [P, C, U]
        if exact_bounds:
            allfull = allfull & u_inside.view(1, 1, -1)
        full = allfull & (bits == full_bits)
        present = bits != 0
        nfull = full.sum(-1)
        nfull_g = (nfull // group) * group
        # full units past the last whole group join the masked part, so that both parts list
        # their units in increasing order
        full = full & (full.cumsum(-1) <= nfull_g.unsqueeze(-1))
        order_key = torch.where(full, 0, 1) * (n_units + 1) + torch.arange(n_units, device=device)
        order_key = torch.where(present, order_key, 2 * (n_units + 1) + 1)
        npres = present.sum(-1)
        width = int(npres.max()) if npres.numel() else 0
        width = max(group, -(-width // group) * group)
        width = min(width, -(-n_units // group) * group)
        sorted_key, perm = torch.sort(order_key, dim=-1, stable=True)
        perm = perm[..., :width]
        if perm.shape[-1] < width:
            pad = width - perm.shape[-1]
            perm = torch.cat([perm, perm.new_zeros(perm.shape[:-1] + (pad,))], -1)
            valid = torch.cat([sorted_key[..., :width] <= 2 * (n_units + 1),
                               torch.zeros(perm.shape[:-1] + (pad,), dtype=torch.bool, device=device)], -1)
        else:
            valid = sorted_key[..., :width] <= 2 * (n_units + 1)
        sel_units = torch.where(valid, uidx[perm], -1)
        sel_bits = torch.where(valid, torch.gather(bits, -1, perm), 0)
        ntot = -(-npres // group) * group
        parts.append((sel_units.to(torch.int32), sel_bits.to(torch.int32), nfull_g.to(torch.int32),
                      ntot.to(torch.int32)))
    L = max(p[0].shape[-1] for p in parts)

    def padw(x, fill):
        if x.shape[-1] == L:
            return x
        return torch.cat([x, x.new_full(x.shape[:-1] + (L - x.shape[-1],), fill)], -1)

    units = torch.cat([padw(p[0], -1) for p in parts], 1).contiguous()
    bitsT = torch.cat([padw(p[1], 0) for p in parts], 1).contiguous()
    nfull = torch.cat([p[2] for p in parts], 1).contiguous()
    ntot = torch.cat([p[3] for p in parts], 1).contiguous()
    return TileTable(units, bitsT, nfull, ntot, t0, tile, unit, sub, group, subs)


def _merged_key_tiles(layout, heads, k_lo, k_hi, nsub, u_start, u_end, u_block, causal, budget,
                      device):
    """int32 [P, T, nsub]: key blocks grouped into tiles of ``nsub``, ordered by the log2 of how
    many query units attend each block, then by position (strided columns, attended by every
    later query, share tiles; blocks only the local window reads share others)."""
    bs = layout.block_size
    P = heads.numel()
    kb = torch.arange(k_lo // bs, (k_hi - 1) // bs + 1, device=device)
    counts = []
    step = max(1, budget // max(1, P * u_block.numel()))
    for c0 in range(0, kb.numel(), step):
        cols = kb[c0:c0 + step]
        a = layout.allowed(heads, u_block, cols)                                     # [P, U, C]
        if causal:
            a = a & (u_end.view(1, -1, 1) >= (cols * bs).view(1, 1, -1))
        counts.append(a.sum(1))
    count = torch.cat(counts, 1)                                                     # [P, NKB]
    bucket = torch.floor(torch.log2(count.double() + 1)).long()
    order = torch.argsort(bucket * (kb.numel() + 1) + torch.arange(kb.numel(), device=device), -1)
    blocks = kb[order]
    n_tiles = -(-kb.numel() // nsub)
    pad = n_tiles * nsub - kb.numel()
    if pad:
        blocks = torch.cat([blocks, blocks.new_full((P, pad), -1)], 1)
    return blocks.view(P, n_tiles, nsub).to(torch.int32).contiguous()


def kv_block_table(layout, nbq, nbk, q_block_start=None, *, causal=True, num_heads=None, device="cpu",
                   k_block_start=0):
    """Per (query head, query block) key-block lists at the layout's block size.

    Returns ``(counts int32 [Hq, nbq], indices int32 [Hq, nbq, max_count])`` (padding 0), the
    form FlexAttention's ``BlockMask.from_kv_blocks`` takes. Key blocks are ``k_block_start..``
    ``k_block_start + nbk - 1`` (absolute), indices relative to ``k_block_start``; query blocks
    start at ``q_block_start`` (default: they end where the keys end). Causal: blocks above the
    diagonal are dropped.
    """
    if q_block_start is None:
        q_block_start = k_block_start + nbk - nbq
    hq = layout._heads_for(num_heads) or 1
    layout._check_extent(q_block_start + nbq, k_block_start + nbk)
    heads = layout.pattern_index(torch.arange(hq, device=device))
    cols = torch.arange(nbk, device=device)
    kcols = cols + k_block_start
    counts, idx = [], []
    chunk = max(1, (1 << 24) // max(1, hq * nbk))
    for r0 in range(0, nbq, chunk):
        rows = torch.arange(q_block_start + r0, q_block_start + min(nbq, r0 + chunk), device=device)
        m = layout.allowed(heads, rows, kcols)
        if causal:
            m = m & (kcols.view(1, 1, -1) <= rows.view(1, -1, 1))
        counts.append(m.sum(-1).to(torch.int32))
        key = torch.where(m, cols.view(1, 1, -1), nbk + cols.view(1, 1, -1))
        idx.append(torch.sort(key, -1).values)
    if not counts:  # nbq == 0
        return (torch.zeros(hq, 0, dtype=torch.int32, device=device),
                torch.zeros(hq, 0, 1, dtype=torch.int32, device=device))
    counts = torch.cat(counts, 1)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    idx = torch.cat([i[..., :width] for i in idx], 1)
    idx = torch.where(idx >= nbk, 0, idx).to(torch.int32)
    return counts.contiguous(), idx.contiguous()
