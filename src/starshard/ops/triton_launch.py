"""Host side of the Triton kernels: configurations, tables and launches (no autograd here)."""
from __future__ import annotations

import contextlib
import math

import torch
import triton

from ..layouts import cached_table, is_capturing, tile_table
from .triton_bwd import s2_bwd_delta_kernel, s2_bwd_dkdv_kernel, s2_bwd_dq_kernel
from .triton_fwd import s2_fwd_kernel, s2_fwd_kernel_varying, s2_merge_splits_kernel

_OVERRIDE: dict = {}


@contextlib.contextmanager
def kernel_config(**kw):
    """Force settings for tests: fwd/dq/dkdv=(m, n, warps, stages), fwd_m, fwd_n, bwd_m, bwd_n,
    num_warps, num_stages, poison, int64 (force int64 offsets), dkdv_split (the dk/dv kernel's
    unmasked and masked entries in two loops, or one loop with a branch), dkdv_masked_stages,
    merge_k (dk/dv key tiles grouped by attendance when blocks are smaller than the tile),
    schedule ("lpt": heaviest tiles first, or "natural": grid order; schedule_fwd, schedule_dq,
    schedule_dkdv for one kernel), fwd_fused, fwd_tma, fwd_halves, fwd_pack (forward loop variants,
    see _FWD),
    fwd_splits (split-K factor of the forward, see _fwd_splits)."""
    old = dict(_OVERRIDE)
    _OVERRIDE.update(kw)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def _empty(shape, dtype, device):
    """Output buffer; under ``kernel_config(poison=True)`` filled with NaN so unwritten cells show."""
    if _OVERRIDE.get("poison"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _next_pow2(n):
    # plain Python: triton.next_power_of_2 costs ~3 us a call on the host, several per decode step
    return 1 << max(0, int(n) - 1).bit_length()


def _block_d(d):
    return max(16, _next_pow2(d))


# Tile configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, keyed by
# (kernel, padded head dim, layout block size or None for any). BLOCK_M runs along queries,
# BLOCK_N along keys. D=128 entries were picked with benchmarks/tune_kernels.py on an H100 and
# an H200 (bf16, 32k tokens); the rest are untuned defaults that are correct for every shape.
# Blocks 16 and 32 share the 128-row forward tiles (as half tiles: 10% faster than 64-row tiles
# at 32k on an H200) and, at block 64, the dk/dv tiles (5% faster than 32x64; NOTES.md).
_TUNED = {
    ("fwd", 64, None): (128, 64, 4, 3),
    ("fwd", 128, None): (128, 64, 4, 3),
    ("fwd", 256, None): (64, 32, 8, 2),
    ("dq", 64, None): (64, 64, 4, 2),
    ("dq", 128, None): (128, 64, 8, 2),
    ("dq", 128, 64): (128, 128, 8, 2),
    ("dq", 128, 128): (128, 128, 8, 2),
    ("dq", 256, None): (32, 32, 8, 1),
    ("dkdv", 64, None): (64, 64, 4, 2),
    ("dkdv", 128, None): (64, 64, 4, 3),
    ("dkdv", 256, None): (32, 32, 8, 1),
}


# The dk/dv kernel runs its unmasked and masked entries as two loops ("split": 9-11% faster on
# an H100 than one loop with a branch, benchmarks/results/tune_bwd_h100_32k.json), the masked
# loop unpipelined (1 stage) like the forward's; blocks smaller than its key tile are grouped
# into tiles by attendance ("merge_k": backward 1.7x faster at bs16, 1.25x at bs32,
# results/tune_bwd_merge_h100_32k.json).
_BWD = {"split": True, "masked_stages": 1, "merge_k": True}


# Launch order per kernel: "lpt" runs the heaviest tiles first (longest processing time first,
# by the table's entry counts in powers of two, grid order within each class so that programs
# running together still share a head's K/V in L2), "natural" the grid order. See
# benchmarks/NOTES.md for the measurements.
_SCHEDULE = {"fwd": "natural", "dq": "lpt", "dkdv": "lpt"}

# Forward loop variants: "fused" folds the softmax scale into one multiply-add per score and
# accumulates P @ V in place; "tma" loads the unmasked one-unit K/V steps through TMA
# descriptors (Hopper and later, when the strides allow it). Together -3.5% at 32k on an H200
# (bs128 2.55 -> 2.45 ms, dense 18.8 -> 18.1). "halves" runs a 128-row tile as two 64-row
# halves so that one half's P @ V overlaps the other's softmax: -6% to -10% at 32k on an H200
# at D=128 (bs128 2.32-2.34 -> 2.18 ms, dense 16.9-17.8 -> 16.1), -2% to -6% at D=64, but 2x
# slower on 64-row tiles (32-row halves), so only tiles of >= 128 rows use it (NOTES.md).
# "pack" puts the query heads of a GQA group in one decode tile, so that their K/V is read once:
# one H200 decode step over 128k dense keys 0.41 -> 0.19-0.20 ms with 4 query heads a KV head,
# 0.73 -> 0.28 with 8. Under CUDA graphs it pays on short rows too (H100, GQA 32/8, kernel time:
# dense 32k 0.105 -> 0.052 ms, sparse bs64 128k 0.031 -> 0.015, 4k 0.009 -> 0.007); eager steps,
# bound by the host, timed the same packed or not (within +-10%, spikes either way over three
# runs). So every decode launch packs, eager or captured: they share one table (NOTES.md).
_FWD = {"fused": True, "tma": True, "halves": True, "pack": True}


def _fwd_variant(name):
    return bool(_OVERRIDE.get("fwd_" + name, _FWD[name]))


def _fwd_halves(bm, fused, varlen, splits):
    """Whether the forward runs its tiles as two half tiles (fixed lengths, folded scale, no
    split-K); ``kernel_config(fwd_halves=True)`` forces it on tiles down to 32 rows (tests)."""
    forced = _OVERRIDE.get("fwd_halves")
    if not fused or varlen or splits > 1 or bm < 32 or forced is False:
        return False
    return bool(forced) or (bm >= 128 and _FWD["halves"])


def _fwd_pack(bm, varlen, hq, hkv, tab_group):
    """Query heads per program of a decode launch (16-row tiles): the whole GQA group, so that
    its K/V is read once, where its heads share one pattern and it divides the tile's rows;
    else 1. ``kernel_config(fwd_pack=False)`` turns it off."""
    g = hq // hkv
    if (bm != 16 or varlen or g < 2 or bm % g or tab_group % g
            or not _OVERRIDE.get("fwd_pack", _FWD["pack"])):
        return 1
    return g


_PROPS = {}


def _props(device):
    """The GPU's properties, asked once per device (asking costs a few us a call)."""
    p = _PROPS.get(device.index)
    if p is None:
        p = _PROPS[device.index] = torch.cuda.get_device_properties(device)
    return p


def _tma_descriptors(k, v, bn, bd, d, unit, varlen):
    """2-D TMA descriptors over K and V seen as [batch * tokens, heads * dim], or None where
    the forward cannot use them (not a GPU with TMA, varlen, several units per step, padded head
    dim, or strides TMA cannot express)."""
    if varlen or unit != bn or bd != d or not _fwd_variant("tma"):
        return None
    if k.is_cuda and _props(k.device).major < 9:
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor
    descs = []
    for t in (k, v):
        b, n, h, _ = t.shape
        sb, sn, sh, sd = t.stride()
        es = t.element_size()
        if sd != 1 or sh != d or (b > 1 and sb != n * sn) or (sn * es) % 16 or t.data_ptr() % 16:
            return None
        descs.append(TensorDescriptor(t, [b * n, h * d], [sn, 1], [bn, bd]))
    return descs


def _program_order(tab, rows, row_group, tab_group, first, n_tiles, kernel="fwd"):
    """Launch order for a grid over ``rows`` heads x ``n_tiles`` tiles (tile ``first + i``), or
    None for grid order: int32 [rows * n_tiles], entry ``row * n_tiles + i``, heaviest first.
    Row r covers query heads r * row_group ... (r + 1) * row_group - 1; query head h uses pattern
    h // tab_group. Cached on the table."""
    schedule = _OVERRIDE.get("schedule_" + kernel, _OVERRIDE.get("schedule", _SCHEDULE[kernel]))
    if schedule == "natural":
        return None
    if schedule != "lpt":
        raise ValueError(f"schedule must be 'lpt' or 'natural', got {schedule!r}")
    key = (rows, row_group, tab_group, first, n_tiles)
    # bounded: varlen batches of changing lengths; kept for good where a CUDA graph reads it
    return cached_table(tab.orders, 16, key, tab.ntot.device,
                        lambda: _lpt_order(tab, rows, row_group, tab_group, first, n_tiles))


def _lpt_order(tab, rows, row_group, tab_group, first, n_tiles):
    dev = tab.ntot.device
    idx = torch.arange(n_tiles, device=dev) + (first - tab.t0)
    inside = (idx >= 0) & (idx < tab.num_tiles)
    if tab.num_tiles:
        work_p = torch.where(inside, tab.ntot[:, idx.clamp(0, tab.num_tiles - 1)], 0)  # [P, T]
    else:
        work_p = torch.zeros(tab.ntot.shape[0], n_tiles, dtype=torch.int32, device=dev)
    heads = torch.arange(rows * row_group, device=dev)
    work = work_p[heads // tab_group].view(rows, row_group, n_tiles).sum(1)
    work_class = torch.floor(torch.log2(work.reshape(-1).double() + 1))
    return torch.argsort(-work_class, stable=True).to(torch.int32)


def _grid(order, n_tiles, rows, batch):
    """Grid for a launch over (tiles, batch x rows), ordered by ``order`` when it is given."""
    if order is None:
        return (n_tiles, batch * rows)
    return (rows * n_tiles, batch)


def _bwd_strategy():
    return (bool(_OVERRIDE.get("dkdv_split", _BWD["split"])),
            int(_OVERRIDE.get("dkdv_masked_stages", _BWD["masked_stages"])))


def _config(kernel, bs, d, dtype):
    bd = min(256, max(64, _block_d(d)))
    m, n, w, st = _TUNED.get((kernel, bd, bs)) or _TUNED[(kernel, bd, None)]
    if dtype == torch.float32:
        m, n, st = min(m, 64 if kernel == "fwd" else 32), min(n, 32), 1 if kernel != "fwd" else 2
    if kernel in _OVERRIDE:
        m, n, w, st = _OVERRIDE[kernel]
    prefix = "fwd" if kernel == "fwd" else "bwd"
    m = _OVERRIDE.get(prefix + "_m", m)
    n = _OVERRIDE.get(prefix + "_n", n)
    return m, n, _OVERRIDE.get("num_warps", w), _OVERRIDE.get("num_stages", st)


def fwd_config(bs, d, dtype, max_q=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward kernel; a call of at most 16
    queries per sequence (a decode step) gets 16-row tiles instead of wasting most of a tile."""
    m, n, w, st = _config("fwd", bs, d, dtype)
    if max_q is not None and max_q <= 16 and not {"fwd", "fwd_m"} & _OVERRIDE.keys():
        m, w = 16, 4
    return m, n, w, st


def _dot_precision(dtype):
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _needs_int64(*tensors):
    if _OVERRIDE.get("int64"):
        return True
    return any(t.numel() >= 2**31 - 1 or
               sum(abs(s) * (n - 1) for s, n in zip(t.stride(), t.shape)) >= 2**31 - 1
               for t in tensors)


def _geometry(q, k, q_start, k_start, varlen, max_q, max_k):
    """Position ranges (q_range, k_range) of the tables and the first query tile."""
    if varlen:
        return (0, max_k), (0, max_k)
    nq, nk = q.shape[1], k.shape[1]
    return (max(q_start, 0), max(q_start + nq, 0)), (k_start, k_start + nk)


def _strides4(t, varlen):
    """(batch, token, head, dim) strides; varlen tensors have no batch stride."""
    if varlen:
        return (0,) + tuple(t.stride())
    return tuple(t.stride())


def _tables(layout, transpose, tile, unit_cap, group_axis, q_range, k_range, causal, varlen, device,
            merge=False):
    bs = layout.block_size
    unit = min(bs, unit_cap)
    return tile_table(layout, transpose=transpose, tile=tile, unit=unit, group=group_axis // unit,
                      q_range=q_range, k_range=k_range, causal=causal, exact_bounds=not varlen,
                      device=device, merge=merge)


def forward(q, k, v, layout, causal, sm_scale, q_start, k_start, *, cu_q=None, cu_k=None,
            max_q=0, max_k=0, cache_lens=None, block_table=None):
    """Run the forward kernel. Returns (out, lse); out has q's shape (contiguous), lse fp32.
    ``cache_lens`` (int32 [B] on the device, causal only): k/v are caches of ``Nk`` slots a
    sequence holding ``cache_lens[b]`` keys, the queries being the last ``Nq`` of them; the
    tables cover the whole cache, so no launch argument depends on the lengths. With
    ``block_table`` (int32 [B, pages a sequence]) k/v are paged: ``[pages, page size, Hkv, D]``
    with equal strides, sequence b's slot s in page ``block_table[b, s // page size]``; with a
    block table [B, Hkv, pages a sequence] every KV head has its own pages, ``[pages, page
    size, 1, D]``."""
    varlen = cu_q is not None
    cache = cache_lens is not None
    page = k.shape[1] if block_table is not None else 0
    d = q.shape[-1]
    head_pages = block_table is not None and block_table.dim() == 3
    hq, hkv = q.shape[-2], block_table.shape[1] if head_pages else k.shape[-2]
    bm, bn, warps, stages = fwd_config(layout.block_size, d, q.dtype,
                                       max_q if varlen else q.shape[1])
    tab_group = hq // layout.num_pattern_heads if layout.num_heads else hq
    if cache:
        q_range = k_range = (0, block_table.shape[-1] * page if page else k.shape[1])
    else:
        q_range, k_range = _geometry(q, k, q_start, k_start, varlen, max_q, max_k)
    out = _empty(q.shape, q.dtype, q.device)
    if varlen:
        batch = cu_q.numel() - 1
        lse = _empty((hq, q.shape[0]), torch.float32, q.device)
        sl = (0, lse.stride(0), lse.stride(1))
        nq = nk = qs = ks = 0
    else:
        batch, nq, nk = q.shape[0], q.shape[1], k.shape[1]
        lse = _empty((batch, hq, nq), torch.float32, q.device)
        sl = tuple(lse.stride())
        qs, ks = q_start, k_start
        cu_q = cu_k = out  # unused placeholders
    pack = _fwd_pack(bm, varlen, hq, hkv, tab_group)
    tq = bm // pack   # query positions per tile
    # a cache's table spans every slot: tiles of a whole layout block where ours are smaller
    tab_div = max(1, layout.block_size // tq) if cache else 1
    tab = _tables(layout, False, tq * tab_div, bn, bn, q_range, k_range, causal, varlen, q.device)
    if varlen:
        m_first = -((max_q + bm - 1) // bm)
        n_m = -(-max_k // bm) - m_first
    elif cache:   # tiles counted from the first query's (see the kernel)
        m_first = nq // tq + 1
        # Nq consecutive positions touch at most ceil((Nq - 1) / tq) + 1 tiles (one for a
        # single query): no idle tile counts against the split-K factor
        n_m = -(-(nq - 1) // tq) + 1
        cu_k = cache_lens
    else:
        m_first = qs // tq
        n_m = -(-(qs + nq) // tq) - m_first
    busy_tiles = batch * (hq // pack) * ((-(-max_q // bm) + 1) if varlen else n_m)
    key_steps = tab.units.shape[-1] // max(1, bn // tab.unit)
    # a decode launch captured in a CUDA graph splits for kernel time alone (same tables)
    graph = bm == 16 and is_capturing(q.device)
    splits = _fwd_splits(bm, busy_tiles, key_steps, q.device, graph)
    if n_m <= 0 or batch == 0 or q.numel() == 0 or k.numel() == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    # decode steps (16-row tiles) change lengths every call: grid order, no per-length table
    order = None if bm == 16 or cache else \
        _program_order(tab, hq, 1, tab_group, m_first, n_m, "fwd")
    bd = _block_d(d)
    # decode tiles (16 rows) read no faster through TMA (H100: same graph time) and building
    # the descriptors costs ~30 us of host time a call: only kernel_config(fwd_tma=True) there
    tma = not page and (bm != 16 or _OVERRIDE.get("fwd_tma") is True)
    descs = _tma_descriptors(k, v, bn, bd, d, tab.unit, varlen) if tma else None
    k_strides, v_strides = _strides4(k, varlen), _strides4(v, varlen)
    if page:   # pages are shared by the batch (no batch stride), and per head by no head
        hs = (0,) if head_pages else None
        k_strides = (0, k_strides[1]) + (hs or k_strides[2:3]) + k_strides[3:]
        v_strides = (0, v_strides[1]) + (hs or v_strides[2:3]) + v_strides[3:]
    fused = _fwd_variant("fused") and sm_scale != 0
    grid = _grid(order, n_m, hq // pack, batch)
    halves = _fwd_halves(bm, fused, varlen or cache, splits)
    o_dst, l_dst, so, split_strides = out, lse, _strides4(out, varlen), (0, 0)
    if splits > 1:   # partials per split into fp32 buffers, rows (b, n, h) for both
        rows = out.numel() // d
        o_dst = torch.empty((splits,) + tuple(out.shape), dtype=torch.float32, device=q.device)
        l_dst = torch.empty((splits, rows), dtype=torch.float32, device=q.device)
        so = _strides4(o_dst[0], varlen)
        sl = (0, 1, hq) if varlen else (nq * hq, 1, hq)
        split_strides = (o_dst.stride(0), rows)
        grid = grid + (splits,)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        kernel = s2_fwd_kernel_varying if bm == 16 else s2_fwd_kernel
        kernel[grid](
            q, k, v, o_dst, l_dst, tab.units, tab.bits, tab.nfull, tab.ntot,
            *_strides4(q, varlen), *k_strides, *v_strides, *so,
            *sl, cu_q, cu_k, order if order is not None else tab.ntot,
            *(descs if descs is not None else (k, v)), nq,
            q_range[1] if cache else nk, qs, ks,
            hq // pack, hq // hkv, tab_group, tab.t0, tab.num_tiles, tab.units.shape[-1], m_first,
            n_m,
            sm_scale * 1.4426950408889634, splits, *split_strides,
            block_table if page else tab.ntot, block_table.stride(0) if page else 0,
            block_table.stride(1) if head_pages else 0, k.stride(0) if page else 0,
            HEAD_D=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, UNIT=tab.unit, SUB=tab.sub,
            CAUSAL=causal, VARLEN=varlen, INT64=_needs_int64(q, k, v),
            DOT_PREC=_dot_precision(q.dtype), ORDERED=order is not None,
            FUSED=fused, POS_SCALE=sm_scale > 0, TMA=descs is not None, SPLIT=splits > 1,
            HALVES=halves, PACK=pack, CACHE=cache, TAB_DIV=tab_div, PAGE=page, num_warps=warps,
            num_stages=stages)
        if splits > 1:
            s2_merge_splits_kernel[(l_dst.shape[1],)](
                o_dst, l_dst, out, lse, splits, hq, q.shape[0] if varlen else nq,
                HEAD_D=d, BLOCK_D=bd, BLOCK_S=_next_pow2(splits), num_warps=4)
    return out, lse


def _fwd_splits(bm, busy_tiles, key_steps, device, graph=False):
    """Split-K factor of a forward launch: decode-sized calls (16-row tiles) whose programs
    would leave SMs idle split each tile's entries over several programs (about two waves, at
    most 64), then merge. In eager calls only rows of >= 256 ``key_steps`` split, 32 steps or
    more a split: shorter rows are bound by the host (~0.2 ms a step on an H200) and the merge
    would add a launch. Launches captured in a CUDA graph (``graph``) split rows down to 2 steps
    a split: a row's steps run one after another. ``kernel_config(fwd_splits=N)`` forces N."""
    forced = _OVERRIDE.get("fwd_splits")
    if forced is not None:
        return max(1, int(forced))
    if bm != 16 or device.type != "cuda":
        return 1
    sms = _props(device).multi_processor_count
    if busy_tiles >= sms or (not graph and key_steps < 256):
        return 1
    return max(1, min(-(-2 * sms // busy_tiles), key_steps // (2 if graph else 32), 64))


def backward(do, dlse, q, k, v, out, lse, layout, causal, sm_scale, q_start, k_start, *,
             cu_q=None, cu_k=None, max_q=0, max_k=0):
    """Gradients (dq, dk, dv) of the sparse attention, with ``dlse`` (or None) flowing into lse."""
    varlen = cu_q is not None
    d = q.shape[-1]
    hq, hkv = q.shape[-2], k.shape[-2]
    bm, bn, warps, stages = _config("dq", layout.block_size, d, q.dtype)
    km, kn, kwarps, kstages = _config("dkdv", layout.block_size, d, q.dtype)
    q_range, k_range = _geometry(q, k, q_start, k_start, varlen, max_q, max_k)
    tab_q = _tables(layout, False, bm, bn, bn, q_range, k_range, causal, varlen, q.device)
    tab_group = hq // layout.num_pattern_heads if layout.num_heads else hq
    # merged key tiles need one pattern for every query head of a GQA group
    merge = _OVERRIDE.get("merge_k", _BWD["merge_k"]) and layout.block_size < kn and \
        tab_group % (hq // hkv) == 0
    tab_k = _tables(layout, True, kn, km, km, q_range, k_range, causal, varlen, q.device, merge)
    split, masked_stages = _bwd_strategy()
    delta = _delta(do, out, varlen)
    if dlse is not None:
        delta = delta - dlse
    lse = lse.contiguous()
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    if varlen:
        batch = cu_q.numel() - 1
        sl = (0, lse.stride(0), lse.stride(1))
        m_first = -((max_q + bm - 1) // bm)
        n_m = (max_k + bm - 1) // bm - m_first
        n_first = 0
        n_n = (max_k + kn - 1) // kn
        nq = nk = qs = ks = 0
    else:
        batch, nq, nk = q.shape[0], q.shape[1], k.shape[1]
        sl = tuple(lse.stride())
        qs, ks = q_start, k_start
        m_first = qs // bm
        n_m = -(-(qs + nq) // bm) - m_first
        n_first = ks // kn
        n_n = -(-(ks + nk) // kn) - n_first
        cu_q = cu_k = q
    if tab_k.subs is not None:
        n_first, n_n = 0, tab_k.num_tiles
    if batch == 0 or q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    int64 = _needs_int64(q, k, v, do)
    common = dict(HEAD_D=d, BLOCK_D=_block_d(d), CAUSAL=causal, VARLEN=varlen, INT64=int64,
                  DOT_PREC=_dot_precision(q.dtype))
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if n_m > 0:
            order = _program_order(tab_q, hq, 1, tab_group, m_first, n_m, "dq")
            s2_bwd_dq_kernel[_grid(order, n_m, hq, batch)](
                q, k, v, do, lse, delta, dq, tab_q.units, tab_q.bits, tab_q.nfull, tab_q.ntot,
                *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen),
                *_strides4(do, varlen), *_strides4(dq, varlen), *sl, cu_q, cu_k,
                order if order is not None else tab_q.ntot, nq, nk, qs, ks,
                hq, hq // hkv, tab_group, tab_q.t0, tab_q.num_tiles, tab_q.units.shape[-1], m_first,
                n_m, sm_scale, sm_scale * 1.4426950408889634, UNIT=tab_q.unit, SUB=tab_q.sub,
                BLOCK_M=bm, BLOCK_N=bn, ORDERED=order is not None,
                num_warps=warps, num_stages=stages, **common)
        else:
            dq.zero_()
        if n_n > 0:
            order = _program_order(tab_k, hkv, hq // hkv, tab_group, n_first, n_n, "dkdv")
            s2_bwd_dkdv_kernel[_grid(order, n_n, hkv, batch)](
                q, k, v, do, lse, delta, dk, dv, tab_k.units, tab_k.bits, tab_k.nfull, tab_k.ntot,
                tab_k.subs if tab_k.subs is not None else tab_k.units, *_strides4(q, varlen),
                *_strides4(k, varlen), *_strides4(v, varlen),
                *_strides4(do, varlen), *_strides4(dk, varlen), *_strides4(dv, varlen), *sl,
                cu_q, cu_k, order if order is not None else tab_k.ntot, nq, nk, qs, ks,
                hkv, hq // hkv, tab_group, tab_k.t0, tab_k.num_tiles, tab_k.units.shape[-1], n_first,
                n_n, sm_scale, sm_scale * 1.4426950408889634, UNIT=tab_k.unit, SUB=tab_k.sub,
                BLOCK_M=km, BLOCK_N=kn, SPLIT=split, MASKED_STAGES=masked_stages,
                GATHER_K=tab_k.subs is not None, ORDERED=order is not None,
                num_warps=kwarps, num_stages=kstages, **common)
        else:
            dk.zero_()
            dv.zero_()
    return dq, dk, dv


def _delta(do, out, varlen):
    """rowsum(dO * O) in fp32, laid out like lse: [B, H, N], or [H, T] for varlen."""
    if varlen:
        t, h, d = out.shape
        delta = torch.empty((h, t), dtype=torch.float32, device=out.device)
        b, n, sd = 1, t, (0,) + tuple(delta.stride())
    else:
        b, n, h, d = out.shape
        delta = torch.empty((b, h, n), dtype=torch.float32, device=out.device)
        sd = tuple(delta.stride())
    if delta.numel() == 0:
        return delta
    block = 64
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        s2_bwd_delta_kernel[(triton.cdiv(n, block), b * h)](
            out, do, delta, *_strides4(out, varlen), *_strides4(do, varlen), *sd, n, h,
            HEAD_D=d, BLOCK_D=_block_d(d), BLOCK=block)
    return delta
