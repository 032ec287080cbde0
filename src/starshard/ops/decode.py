"""Attention over a preallocated KV cache whose lengths live on the device (inference only).

A serving loop keeps K/V in fixed buffers ``[B, capacity, Hkv, D]`` and each sequence's length
in a device tensor, so that one CUDA graph can replay every decode step: nothing the launch
reads on the host depends on the lengths (the layout table spans the whole capacity and is
built once). The new keys/values can be written into the cache by the same call.
"""
from __future__ import annotations

import torch

from ..layouts import is_capturing
from .sparse_attn import _check_qkv, _resolve_backend, _scale

__all__ = ["sparse_attention_kvcache"]


def _check_cache_args(q, k_cache, v_cache, layout, cache_seqlens, k, v):
    _check_qkv(q, k_cache, v_cache, layout, 4)
    b, nq = q.shape[0], q.shape[1]
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (b,):
        raise ValueError(f"cache_seqlens must have shape [B] = [{b}], got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens must be on {q.device}, got {cache_seqlens.device}")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new keys/values to append) or neither")
    if k is not None:
        want = (b, nq) + tuple(k_cache.shape[2:])
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape [B, Nq, Hkv, D] = {list(want)}, got "
                                 f"{list(t.shape)}")
            if t.dtype != k_cache.dtype or t.device != k_cache.device:
                raise ValueError(f"{name} must match the cache's dtype and device ({k_cache.dtype}, "
                                 f"{k_cache.device}), got {t.dtype}, {t.device}")
    layout.check_positions(k_cache.shape[1], k_cache.shape[1])


def _check_lengths(cache_seqlens, lens, capacity):
    """cache_seqlens >= 0 and the lengths attended within the capacity: checked on the host for
    CPU tensors; on a GPU without a host sync (a failure stops the device with the message),
    and not at all while a CUDA graph is being captured (the kernel clamps to the capacity)."""
    msg = f"cache_seqlens must be >= 0 and the cache lengths (with the appended keys) <= {capacity}"
    if lens.device.type == "cuda":
        if not is_capturing(lens.device):
            torch._assert_async(((cache_seqlens >= 0) & (lens <= capacity)).all(), msg)
        return
    bad = (cache_seqlens < 0) | (lens > capacity)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{msg}; sequence {i}: cache_seqlens {int(cache_seqlens[i])}, length "
                         f"{int(lens[i])}")


def _append(k_cache, v_cache, cache_seqlens, k, v):
    """Write the Nq new keys/values of sequence b at slots cache_seqlens[b] ... (in bounds:
    _check_lengths)."""
    b, nq = k.shape[0], k.shape[1]
    pos = cache_seqlens.long().unsqueeze(1) + torch.arange(nq, device=k.device)
    rows = torch.arange(b, device=k.device).unsqueeze(1).expand(b, nq)
    k_cache[rows, pos] = k
    v_cache[rows, pos] = v


def _blockwise_cache(q, k_cache, v_cache, layout, lens, sm_scale):
    """The CPU path: each sequence over its own keys (host-side lengths)."""
    from .torch_blockwise import blockwise_attention
    b, nq, hq, d = q.shape
    out = q.new_empty(q.shape)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    for i, n in enumerate(lens.tolist()):
        o, l = blockwise_attention(q[i:i + 1], k_cache[i:i + 1, :n], v_cache[i:i + 1, :n], layout,
                                   causal=True, sm_scale=sm_scale, q_start=n - nq, k_start=0)
        out[i] = o[0]
        lse[i] = l[0].float()
    return out, lse


def sparse_attention_kvcache(q, k_cache, v_cache, layout, cache_seqlens, *, k=None, v=None,
                             sm_scale=None, return_lse=False, backend=None):
    """Causal block-sparse attention of new queries over a KV cache with per-sequence lengths.

    q ``[B, Nq, Hq, D]``; k_cache/v_cache ``[B, capacity, Hkv, D]``; ``cache_seqlens`` int32 (or
    int64) ``[B]`` on q's device: keys sequence b already holds. With ``k``/``v``
    ``[B, Nq, Hkv, D]`` the new keys/values are first written into the caches at slots
    ``cache_seqlens[b] ...`` (in place; ``cache_seqlens`` itself is not changed) and the queries
    attend ``cache_seqlens[b] + Nq`` keys; without them, ``cache_seqlens[b]`` keys. Either way
    the queries are the last Nq positions of their sequence (a negative position attends
    nothing: out 0, lse -inf), as in ``sparse_attention``. Returns out ``[B, Nq, Hq, D]`` (and
    lse ``[B, Hq, Nq]`` fp32). On CUDA no host sync: the call can be captured in a CUDA graph
    and replayed for every step as the lengths change (run it once eagerly first to build the
    layout table). Lengths outside 0..capacity raise a ValueError on the CPU and stop a GPU with
    a device-side assertion (no check inside a graph capture; the kernel never reads past the
    capacity). Inference only: no gradients.
    """
    _check_cache_args(q, k_cache, v_cache, layout, cache_seqlens, k, v)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k_cache, v_cache, k, v)):
        raise RuntimeError("sparse_attention_kvcache has no backward; use sparse_attention for "
                           "training, or call this under torch.no_grad()")
    backend = _resolve_backend(backend, q.device, q.dtype)
    sm_scale = _scale(sm_scale, q.shape[-1])
    nq, capacity = q.shape[1], k_cache.shape[1]
    lens = cache_seqlens + nq if k is not None else cache_seqlens
    _check_lengths(cache_seqlens, lens, capacity)
    if k is not None:
        _append(k_cache, v_cache, cache_seqlens, k, v)
    if backend == "torch":
        out, lse = _blockwise_cache(q, k_cache, v_cache, layout, lens.cpu(), sm_scale)
    else:
        from . import triton_launch
        out, lse = triton_launch.forward(q, k_cache, v_cache, layout, True, sm_scale, 0, 0,
                                         cache_lens=lens.to(torch.int32))
    return (out, lse) if return_lse else out
