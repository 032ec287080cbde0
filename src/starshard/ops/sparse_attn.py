"""The public sparse-attention op: input checks, backend dispatch, autograd.

Both backends sit behind ``torch.library.custom_op`` so ``torch.compile(fullgraph=True)``
traces through them. The layout travels into the op as an int handle (custom ops take tensors
and scalars only). Eager calls that build no autograd graph (inference, decode steps) skip the
custom-op dispatch, which costs more host time than the rest of a decode step's launch.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..layouts import BlockLayout, layout_from_handle

__all__ = ["sparse_attention", "sparse_attention_varlen"]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BACKENDS = (None, "triton", "torch")


# ---- checks -----------------------------------------------------------------------------------

def _check_tensor(name, t, dim):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        layout = "[B, N, H, D]" if dim == 4 else "[total, H, D]"
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_qkv(q, k, v, layout, dim, same_batch=True):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, dim)
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a starshard.BlockLayout, got {type(layout).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if dim == 4 and same_batch and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    d = q.shape[-1]
    if not 1 <= d <= 256:
        raise ValueError(f"head dim must be in 1..256, got {d}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if layout.num_heads is not None and layout.num_heads != hq:
        raise ValueError(f"layout has {layout.num_heads} query heads but q has {hq}")


def _resolve_backend(backend, device, dtype):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if backend is None:
        backend = "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
        if dtype == torch.float64:
            raise TypeError("backend='triton' does not take float64; use backend='torch'")
    return backend


def _scale(sm_scale, d):
    if sm_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"sm_scale must be a float or None, got {type(sm_scale).__name__}")
    if not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be finite, got {sm_scale}")
    return float(sm_scale)


def _int_arg(name, x):
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return x


# ---- custom ops ------------------------------------------------------------------------------

def _run_fwd(q, k, v, lid, causal, sm_scale, q_start, k_start, backend):
    layout = layout_from_handle(lid)
    if backend == "triton":
        from . import triton_launch
        return triton_launch.forward(q, k, v, layout, causal, sm_scale, q_start, k_start)
    from .torch_blockwise import blockwise_attention
    with torch.no_grad():
        out, lse = blockwise_attention(q, k, v, layout, causal=causal, sm_scale=sm_scale,
                                       q_start=q_start, k_start=k_start)
    return out.contiguous(), lse.float().contiguous()


@torch.library.custom_op("starshard::sparse_attn_fwd", mutates_args=())
def _sparse_attn_fwd(q: Tensor, k: Tensor, v: Tensor, layout_id: int, causal: bool,
                     sm_scale: float, q_start: int, k_start: int, backend: str) -> tuple[Tensor, Tensor]:
    return _run_fwd(q, k, v, layout_id, causal, sm_scale, q_start, k_start, backend)


@_sparse_attn_fwd.register_fake
def _(q, k, v, layout_id, causal, sm_scale, q_start, k_start, backend):
    b, nq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, nq), dtype=torch.float32)


def _torch_grads(fn, q, k, v, do, dlse):
    """CPU backward: the vector-Jacobian product of the blockwise forward, recomputed with
    ``torch.func.vjp`` (which works inside a custom op, where autograd is off), so that compiled
    graphs see one opaque backward op."""
    (out, lse), vjp = torch.func.vjp(fn, q, k, v)
    dl = torch.zeros_like(lse) if dlse is None else dlse.to(lse.dtype)
    return tuple(g.contiguous() for g in vjp((do.to(out.dtype), dl)))


@torch.library.custom_op("starshard::sparse_attn_bwd_torch", mutates_args=())
def _sparse_attn_bwd_torch(do: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                           layout_id: int, causal: bool, sm_scale: float, q_start: int,
                           k_start: int) -> tuple[Tensor, Tensor, Tensor]:
    from .torch_blockwise import blockwise_attention
    layout = layout_from_handle(layout_id)
    return _torch_grads(lambda a, b, c: blockwise_attention(
        a, b, c, layout, causal=causal, sm_scale=sm_scale, q_start=q_start, k_start=k_start),
        q, k, v, do, dlse)


@_sparse_attn_bwd_torch.register_fake
def _(do, dlse, q, k, v, layout_id, causal, sm_scale, q_start, k_start):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("starshard::sparse_attn_bwd", mutates_args=())
def _sparse_attn_bwd(do: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                     out: Tensor, lse: Tensor, layout_id: int, causal: bool, sm_scale: float,
                     q_start: int, k_start: int) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton_launch
    return triton_launch.backward(do.contiguous(), dlse, q, k, v, out, lse,
                                  layout_from_handle(layout_id), causal, sm_scale, q_start, k_start)


@_sparse_attn_bwd.register_fake
def _(do, dlse, q, k, v, out, lse, layout_id, causal, sm_scale, q_start, k_start):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, lid, causal, sm_scale, q_start, k_start, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (lid, causal, sm_scale, q_start, k_start, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    lid, causal, sm_scale, q_start, k_start, backend = ctx.args
    if backend == "torch":
        dq, dk, dv = _sparse_attn_bwd_torch(dout, dlse, q, k, v, lid, causal, sm_scale, q_start,
                                            k_start)
    else:
        dq, dk, dv = _sparse_attn_bwd(dout, dlse, q, k, v, out, lse, lid, causal, sm_scale,
                                      q_start, k_start)
    return dq, dk, dv, None, None, None, None, None, None


_sparse_attn_fwd.register_autograd(_backward, setup_context=_setup)


# ---- varlen custom ops ------------------------------------------------------------------------

def _run_fwd_varlen(q, k, v, cu_q, cu_k, max_q, max_k, lid, causal, sm_scale, backend):
    layout = layout_from_handle(lid)
    if backend == "triton":
        from . import triton_launch
        return triton_launch.forward(q, k, v, layout, causal, sm_scale, 0, 0, cu_q=cu_q, cu_k=cu_k,
                                     max_q=max_q, max_k=max_k)
    from .torch_blockwise import blockwise_attention_varlen
    with torch.no_grad():
        out, lse = blockwise_attention_varlen(q, k, v, layout, cu_q, cu_k, max_q, max_k,
                                              causal=causal, sm_scale=sm_scale)
    return out.contiguous(), lse.float().contiguous()


@torch.library.custom_op("starshard::sparse_attn_varlen_fwd", mutates_args=())
def _sparse_attn_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor,
                            max_q: int, max_k: int, layout_id: int, causal: bool, sm_scale: float,
                            backend: str) -> tuple[Tensor, Tensor]:
    return _run_fwd_varlen(q, k, v, cu_q, cu_k, max_q, max_k, layout_id, causal, sm_scale, backend)


@_sparse_attn_varlen_fwd.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, layout_id, causal, sm_scale, backend):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("starshard::sparse_attn_varlen_bwd_torch", mutates_args=())
def _sparse_attn_varlen_bwd_torch(do: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor,
                                  v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                                  layout_id: int, causal: bool,
                                  sm_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from .torch_blockwise import blockwise_attention_varlen
    layout = layout_from_handle(layout_id)
    return _torch_grads(lambda a, b, c: blockwise_attention_varlen(
        a, b, c, layout, cu_q, cu_k, max_q, max_k, causal=causal, sm_scale=sm_scale),
        q, k, v, do, dlse)


@_sparse_attn_varlen_bwd_torch.register_fake
def _(do, dlse, q, k, v, cu_q, cu_k, max_q, max_k, layout_id, causal, sm_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("starshard::sparse_attn_varlen_bwd", mutates_args=())
def _sparse_attn_varlen_bwd(do: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                            out: Tensor, lse: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
                            max_k: int, layout_id: int, causal: bool,
                            sm_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from . import triton_launch
    return triton_launch.backward(do.contiguous(), dlse, q, k, v, out, lse,
                                  layout_from_handle(layout_id), causal, sm_scale, 0, 0,
                                  cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k)


@_sparse_attn_varlen_bwd.register_fake
def _(do, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, layout_id, causal, sm_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, lid, causal, sm_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, lid, causal, sm_scale, backend)


def _backward_varlen(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    max_q, max_k, lid, causal, sm_scale, backend = ctx.args
    if backend == "torch":
        dq, dk, dv = _sparse_attn_varlen_bwd_torch(dout, dlse, q, k, v, cu_q, cu_k, max_q, max_k,
                                                   lid, causal, sm_scale)
    else:
        dq, dk, dv = _sparse_attn_varlen_bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q,
                                             max_k, lid, causal, sm_scale)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_sparse_attn_varlen_fwd.register_autograd(_backward_varlen, setup_context=_setup_varlen)


# ---- public functions -------------------------------------------------------------------------

_MODE_KEYS = tuple(torch._C._TorchDispatchModeKey.__members__.values())   # fake, proxy, functional


def _direct(*tensors):
    """True where the op can run its implementation without the custom-op dispatch: eager, no
    gradient to record, plain CPU/CUDA tensors and no dispatch mode (fake tensors, tracing,
    functorch transforms all go through the registered op)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or any(
            torch._C._get_dispatch_mode(key) is not None for key in _MODE_KEYS):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if (type(t) is not torch.Tensor or t.device.type not in ("cpu", "cuda")
                or (grad and t.requires_grad) or torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return False
    return True


def sparse_attention(q, k, v, layout, *, causal=True, sm_scale=None, return_lse=False,
                     q_start=None, k_start=0, backend=None):
    """Per-head block-sparse attention.

    q ``[B, Nq, Hq, D]``, k/v ``[B, Nk, Hkv, D]`` (Hq a multiple of Hkv; any strides). Query t
    sits at position ``q_start + t`` (default ``k_start + Nk - Nq``), key s at ``k_start + s``;
    head h attends the pair iff ``layout`` has the block pair for h and, when causal, the key
    is not after the query. Returns out ``[B, Nq, Hq, D]`` (and lse ``[B, Hq, Nq]`` fp32 with
    ``return_lse``); a query with no allowed key gets 0 and lse -inf. Differentiable.
    """
    _check_qkv(q, k, v, layout, 4)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    nq, nk = q.shape[1], k.shape[1]
    k_start = _int_arg("k_start", k_start)
    if k_start < 0:
        raise ValueError(f"k_start must be >= 0, got {k_start}")
    if q_start is None:
        q_start = k_start + nk - nq
        if q_start < 0 and not causal:
            raise ValueError(f"q_start defaults to k_start + Nk - Nq = {q_start} < 0 under "
                             f"causal=False; pass q_start explicitly (Nq={nq}, Nk={nk})")
    else:
        q_start = _int_arg("q_start", q_start)
        if q_start < 0:
            raise ValueError(f"q_start must be >= 0, got {q_start}")
    layout.check_positions(max(q_start + nq, 0), k_start + nk)
    backend = _resolve_backend(backend, q.device, q.dtype)
    sm_scale = _scale(sm_scale, q.shape[-1])
    op = _run_fwd if _direct(q, k, v) else _sparse_attn_fwd
    out, lse = op(q, k, v, layout.handle, causal, sm_scale, q_start, k_start, backend)
    return (out, lse) if return_lse else out


def sparse_attention_varlen(q, k, v, layout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, *, causal=True, sm_scale=None, return_lse=False,
                            backend=None):
    """Block-sparse attention over a packed batch of variable-length sequences.

    q ``[total_q, Hq, D]``, k/v ``[total_k, Hkv, D]``, ``cu_seqlens_*`` int32 ``[B + 1]``
    (cumulative, starting at 0). Positions restart at 0 in each sequence; queries end where
    their keys end (query t of a sequence sits at ``k_len - q_len + t``; a negative position
    attends nothing). ``max_seqlen_*`` must bound every sequence. lse is ``[Hq, total_q]``.
    """
    _check_qkv(q, k, v, layout, 3)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
                            ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be a 1-D tensor [B + 1]")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    max_seqlen_q = _int_arg("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _int_arg("max_seqlen_k", max_seqlen_k)
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError("max_seqlen_q and max_seqlen_k must be >= 0")
    layout.check_positions(max_seqlen_k, max_seqlen_k)
    backend = _resolve_backend(backend, q.device, q.dtype)
    sm_scale = _scale(sm_scale, q.shape[-1])
    op = _run_fwd_varlen if _direct(q, k, v, cu_seqlens_q, cu_seqlens_k) else _sparse_attn_varlen_fwd
    out, lse = op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layout.handle,
                  causal, sm_scale, backend)
    return (out, lse) if return_lse else out
