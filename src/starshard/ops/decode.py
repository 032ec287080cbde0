"""Attention over a preallocated KV cache whose lengths live on the device (inference only).

A serving loop keeps K/V in fixed buffers (``[B, capacity, Hkv, D]``, or pages
``[pages, page size, Hkv, D]`` with a block table, or pages of one KV head each with a table
per head: ``starshard.kvcache``) and each sequence's length in a device
tensor, so that one CUDA graph can replay every decode step: nothing the launch reads on the
host depends on the lengths (the layout table spans the whole capacity and is built once). The
new keys/values can be written into the cache by the same call.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..layouts import is_capturing, layout_from_handle
from .sparse_attn import _check_qkv, _direct, _resolve_backend, _scale

__all__ = ["sparse_attention_kvcache"]


def _check_cache_args(q, k_cache, v_cache, layout, cache_seqlens, k, v, block_table):
    _check_qkv(q, k_cache, v_cache, layout, 4, same_batch=block_table is None)
    b, nq = q.shape[0], q.shape[1]
    for name, t, dtypes, dims in (("cache_seqlens", cache_seqlens, (torch.int32, torch.int64), (1,)),
                                  ("block_table", block_table, (torch.int32,), (2, 3))):
        if t is None and name == "block_table":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            want = " or ".join(str(x)[6:] for x in dtypes)
            raise TypeError(f"{name} must be {want}, got {t.dtype}")
        if t.dim() not in dims or t.shape[0] != b:
            want = "[B]" if dims == (1,) else "[B, pages a sequence] or [B, Hkv, pages a sequence]"
            raise ValueError(f"{name} must have shape {want} with B = {b}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {t.device}")
    hkv = k_cache.shape[2]
    if block_table is not None:
        if k_cache.stride() != v_cache.stride():
            raise ValueError(f"paged k_cache and v_cache must have the same strides, got "
                             f"{k_cache.stride()} and {v_cache.stride()}")
        if block_table.dim() == 3:   # pages of one KV head each
            hkv = block_table.shape[1]
            if k_cache.shape[2] != 1:
                raise ValueError(f"with a block table per KV head [B, Hkv, pages] the cache holds "
                                 f"one head a page: [pages, page size, 1, D], got "
                                 f"{tuple(k_cache.shape)}")
            if hkv == 0 or q.shape[2] % hkv:
                raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of the block "
                                 f"table's KV heads ({hkv})")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new keys/values to append) or neither")
    if k is not None:
        want = (b, nq, hkv, k_cache.shape[3])
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape [B, Nq, Hkv, D] = {list(want)}, got "
                                 f"{list(t.shape)}")
            if t.dtype != k_cache.dtype or t.device != k_cache.device:
                raise ValueError(f"{name} must match the cache's dtype and device ({k_cache.dtype}, "
                                 f"{k_cache.device}), got {t.dtype}, {t.device}")


def _check_lengths(cache_seqlens, lens, capacity, block_table, num_pages, page):
    """cache_seqlens >= 0, the lengths attended within the capacity and (paged) the pages they
    use within the cache: checked on the host for CPU tensors; on a GPU (the torch backend's
    path; the Triton launch checks in its append kernel) without a host sync (a failure stops
    the device with the message). Not called while a CUDA graph is being captured."""
    msg = f"cache_seqlens must be >= 0 and the cache lengths (with the appended keys) <= {capacity}"
    ok = (cache_seqlens >= 0) & (lens <= capacity)
    pages_ok = None
    if block_table is not None:
        used = torch.arange(block_table.shape[-1], device=lens.device) < \
            ((lens.clamp(min=0) + page - 1) // page).unsqueeze(1)            # [B, P]
        if block_table.dim() == 3:
            used = used.unsqueeze(1).expand_as(block_table)
        valid = (block_table >= 0) & (block_table < num_pages)
        pages_ok = (~used | valid).flatten(1).all(1)
        page_msg = f"block_table entries of the pages in use must lie in 0..{num_pages - 1}"
    if lens.device.type == "cuda":
        torch._assert_async(ok.all(), msg)
        if pages_ok is not None:
            torch._assert_async(pages_ok.all(), page_msg)
        return
    if not ok.all():
        i = int((~ok).nonzero()[0])
        raise ValueError(f"{msg}; sequence {i}: cache_seqlens {int(cache_seqlens[i])}, length "
                         f"{int(lens[i])}")
    if pages_ok is not None and not pages_ok.all():
        i = int((~pages_ok).nonzero()[0])
        raise ValueError(f"{page_msg}; sequence {i} uses {block_table[i].tolist()}")


def _append(k_cache, v_cache, cache_seqlens, k, v, block_table, page):
    """Write the Nq new keys/values of each sequence at its slots cache_seqlens[b] ..."""
    b, nq = k.shape[0], k.shape[1]
    pos = cache_seqlens.long().unsqueeze(1) + torch.arange(nq, device=cache_seqlens.device)
    if block_table is None:
        idx = (torch.arange(b, device=pos.device).unsqueeze(1).expand(b, nq), pos)
    elif block_table.dim() == 2:
        idx = (block_table.long().gather(1, pos // page), pos % page)
    else:   # [B, Hkv, P]: head h of token t goes to its own page
        hkv = block_table.shape[1]
        pages = block_table.long().gather(2, (pos // page).unsqueeze(1).expand(b, hkv, nq))
        idx = (pages.transpose(1, 2), (pos % page).unsqueeze(2), 0)
    k_cache[idx] = k
    v_cache[idx] = v


def _sequence_kv(k_cache, v_cache, i, n, block_table, page):
    """K/V of sequence i's first n keys: [1, n, Hkv, D] each."""
    if block_table is None:
        return k_cache[i:i + 1, :n], v_cache[i:i + 1, :n]
    pages = block_table[i, ..., :-(-n // page)].long()
    h, d = k_cache.shape[2:]
    if block_table.dim() == 2:
        return (c[pages].reshape(1, -1, h, d)[:, :n] for c in (k_cache, v_cache))
    hkv = pages.shape[0]   # [Hkv, P] pages of one head each
    return (c[pages].reshape(hkv, -1, d)[:, :n].transpose(0, 1).unsqueeze(0)
            for c in (k_cache, v_cache))


def _blockwise_cache(q, k_cache, v_cache, layout, lens, sm_scale, block_table, page):
    """The CPU path: each sequence over its own keys (host-side lengths)."""
    from .torch_blockwise import blockwise_attention
    b, nq, hq, d = q.shape
    out = q.new_empty(q.shape)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    for i, n in enumerate(lens.tolist()):
        kk, vv = _sequence_kv(k_cache, v_cache, i, n, block_table, page)
        o, l = blockwise_attention(q[i:i + 1], kk, vv, layout, causal=True, sm_scale=sm_scale,
                                   q_start=n - nq, k_start=0)
        out[i] = o[0]
        lse[i] = l[0].float()
    return out, lse


def _run_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, block_table, layout_id, sm_scale,
                 backend):
    layout = layout_from_handle(layout_id)
    nq = q.shape[1]
    page = k_cache.shape[1] if block_table is not None else 0
    capacity = block_table.shape[-1] * page if page else k_cache.shape[1]
    on_gpu = q.device.type == "cuda"
    capturing = on_gpu and is_capturing(q.device)
    if backend == "torch" or not on_gpu:   # on a GPU the Triton launch checks (append_kv)
        lens = cache_seqlens + nq if k is not None else cache_seqlens
        if not capturing:
            _check_lengths(cache_seqlens, lens, capacity, block_table, k_cache.shape[0], page)
    if backend == "torch":
        if k is not None:
            _append(k_cache, v_cache, cache_seqlens, k, v, block_table, page)
        return _blockwise_cache(q, k_cache, v_cache, layout, lens.cpu(), sm_scale, block_table,
                                page)
    from . import triton_launch
    from .triton_cache import append_kv
    # one launch writes K and V (if given), checks the lengths and pages on a GPU and returns
    # the lengths the step attends
    lens = append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table, page, capacity,
                     check=on_gpu, check_pages=on_gpu and not capturing)
    return triton_launch.forward(q, k_cache, v_cache, layout, True, sm_scale, 0, 0,
                                 cache_lens=lens, block_table=block_table)


@torch.library.custom_op("starshard::sparse_attn_kvcache", mutates_args=("k_cache", "v_cache"))
def _sparse_attn_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                         k: Optional[Tensor], v: Optional[Tensor], block_table: Optional[Tensor],
                         layout_id: int, sm_scale: float, backend: str) -> tuple[Tensor, Tensor]:
    return _run_kvcache(q, k_cache, v_cache, cache_seqlens, k, v, block_table, layout_id,
                        sm_scale, backend)


@_sparse_attn_kvcache.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k, v, block_table, layout_id, sm_scale, backend):
    b, nq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, nq), dtype=torch.float32)


def sparse_attention_kvcache(q, k_cache, v_cache, layout, cache_seqlens, *, k=None, v=None,
                             block_table=None, sm_scale=None, return_lse=False, backend=None):
    """Causal block-sparse attention of new queries over a KV cache with per-sequence lengths.

    q ``[B, Nq, Hq, D]``; k_cache/v_cache ``[B, capacity, Hkv, D]``, or with ``block_table``
    (int32 ``[B, pages a sequence]``) a paged cache ``[pages, page size, Hkv, D]`` whose slot s
    of sequence b is row ``s % page size`` of page ``block_table[b, s // page size]``, or with
    a block table per KV head (``[B, Hkv, pages a sequence]``) pages of one head each,
    ``[pages, page size, 1, D]`` (a head-sharded cache: see ``starshard.kvcache``);
    ``cache_seqlens`` int32 (or int64) ``[B]`` on q's device: keys sequence b already holds.
    With ``k``/``v`` ``[B, Nq, Hkv, D]`` the new keys/values are first written into the cache
    at slots ``cache_seqlens[b] ...`` (in place; ``cache_seqlens`` itself is not changed) and
    the queries attend ``cache_seqlens[b] + Nq`` keys; without them, ``cache_seqlens[b]`` keys.
    Either way the queries are the last Nq positions of their sequence (a negative position
    attends nothing: out 0, lse -inf), as in ``sparse_attention``. Returns out
    ``[B, Nq, Hq, D]`` (and lse ``[B, Hq, Nq]`` fp32). On CUDA no host sync: the call can be
    captured in a CUDA graph and replayed for every step as the lengths change (run it once
    eagerly first to build the layout table). Lengths outside 0..capacity, or pages outside the
    cache, raise a ValueError on the CPU and stop a GPU with a device-side assertion; inside a
    CUDA graph too, where the Triton launch checks the lengths and the pages it writes (not
    every page read; the kernels never read past the capacity). Inference only.
    """
    _check_cache_args(q, k_cache, v_cache, layout, cache_seqlens, k, v, block_table)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k_cache, v_cache, k, v)):
        raise RuntimeError("sparse_attention_kvcache has no backward; use sparse_attention for "
                           "training, or call this under torch.no_grad()")
    backend = _resolve_backend(backend, q.device, q.dtype)
    sm_scale = _scale(sm_scale, q.shape[-1])
    page = k_cache.shape[1] if block_table is not None else 0
    capacity = block_table.shape[-1] * page if page else k_cache.shape[1]
    layout.check_positions(capacity, capacity)
    op = _run_kvcache if _direct(q, k_cache, v_cache, cache_seqlens) else _sparse_attn_kvcache
    out, lse = op(q, k_cache, v_cache, cache_seqlens, k, v, block_table, layout.handle, sm_scale,
                  backend)
    return (out, lse) if return_lse else out
