"""Dense-masked reference attention: the truth every starshard kernel is tested against.

It builds the token-level mask from ``layout.allowed`` (the only place in starshard where an
N x N tensor is allowed) and computes softmax attention in ``dtype`` (float64 by default).
Semantics (DESIGN.md, "Positions"): query ``t`` sits at position ``q_start + t`` (default
``k_start + Nk - Nq``), key ``s`` at ``k_start + s``; head ``h`` may attend the pair iff the
layout allows block ``(p // bs, p_k // bs)`` for ``h``, the query position is >= 0 and, when
causal, ``p_k <= p``. A query with no allowed key gets ``out = 0`` and ``lse = -inf``.
Keep this module simple: it is meant to be obviously correct, not fast.
"""
from __future__ import annotations

import math

import torch

__all__ = ["reference_attention", "reference_attention_varlen", "dense_token_mask"]


# ---- input checks (shared with torch_blockwise) ------------------------------------------------

def _check_layout_heads(layout, hq):
    if layout.num_heads is not None and layout.num_heads != hq:
        raise ValueError(f"layout has {layout.num_heads} query heads but q has {hq} heads")


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")


def _check_scale(sm_scale, d):
    if sm_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"sm_scale must be a float or None, got {type(sm_scale).__name__}")
    return float(sm_scale)


def _check_qkv(q, k, v, *, varlen):
    """Validate q/k/v ([B, N, H, D] or varlen [T, H, D]); returns (Hq, Hkv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    want = 3 if varlen else 4
    form = "[total, H, D]" if varlen else "[B, N, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{name} must be {form} ({want}-D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree on all but the head dim, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    return hq, hkv


def _check_cu_seqlens(name, cu, total, device):
    """Validate a cu_seqlens tensor; returns it as a python list."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D [B + 1], got shape {tuple(cu.shape)}")
    vals = [int(x) for x in cu.tolist()]
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] must equal the total length {total}, got {vals[-1]}")
    return vals


def _positions(q_len, k_len, q_start, k_start):
    _check_int("k_start", k_start)
    if k_start < 0:
        raise ValueError(f"k_start must be >= 0, got {k_start}")
    if q_start is None:
        q_start = k_start + k_len - q_len
    _check_int("q_start", q_start)
    return q_start, k_start


# ---- the truth -----------------------------------------------------------------------------------

def dense_token_mask(layout, q_len, k_len, num_heads, *, causal, q_start, k_start, device="cpu"):
    """Bool ``[Hq, Nq, Nk]``: may query head h attend (query t, key s)? (tests/reference only)."""
    q_start, k_start = _positions(q_len, k_len, q_start, k_start)
    _check_layout_heads(layout, num_heads)
    layout.check_positions(q_start + q_len, k_start + k_len)
    bs = layout.block_size
    qpos = q_start + torch.arange(q_len, device=device)
    kpos = k_start + torch.arange(k_len, device=device)
    heads = layout.pattern_index(torch.arange(num_heads, device=device))
    # block indices of negative positions are floored (negative); those rows are masked below
    m = layout.allowed(heads, torch.div(qpos, bs, rounding_mode="floor"), kpos // bs)
    m = m & (qpos >= 0).view(1, -1, 1)
    if causal:
        m = m & (kpos.view(1, 1, -1) <= qpos.view(1, -1, 1))
    return m


def reference_attention(q, k, v, layout, *, causal=True, sm_scale=None, q_start=None, k_start=0,
                        dtype=torch.float64):
    """Dense masked attention in ``dtype``: ``(out [B, Nq, Hq, D], lse [B, Hq, Nq])``, both in ``dtype``."""
    hq, hkv = _check_qkv(q, k, v, varlen=False)
    nq, nk = q.shape[1], k.shape[1]
    scale = _check_scale(sm_scale, q.shape[-1])
    mask = dense_token_mask(layout, nq, nk, hq, causal=causal, q_start=q_start, k_start=k_start,
                            device=q.device)                                   # [H, Nq, Nk]
    group = hq // hkv
    qf = q.to(dtype).transpose(1, 2)                                            # [B, H, Nq, D]
    kf = k.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)            # [B, H, Nk, D]
    vf = v.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale                          # [B, H, Nq, Nk]
    has_key = mask.any(-1, keepdim=True)                                        # [H, Nq, 1]
    s = torch.where(mask, s, float("-inf"))
    s = torch.where(has_key, s, 0.0)           # empty rows: finite dummies, so gradients stay finite
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse) * mask
    out = torch.matmul(p, vf).transpose(1, 2)                                   # [B, Nq, H, D]
    lse = torch.where(has_key, lse, float("-inf")).squeeze(-1)
    return out, lse


def reference_attention_varlen(q, k, v, layout, cu_seqlens_q, cu_seqlens_k, *, causal=True,
                               sm_scale=None, dtype=torch.float64):
    """Varlen reference: ``(out [Tq, Hq, D], lse [Hq, Tq])``; positions restart at 0 per sequence."""
    hq, _ = _check_qkv(q, k, v, varlen=True)
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], k.device)
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {len(cq)} and {len(ck)}")
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        o, l = reference_attention(q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0),
                                   layout, causal=causal, sm_scale=sm_scale, q_start=None, k_start=0,
                                   dtype=dtype)
        outs.append(o[0])
        lses.append(l[0])
    if not outs:
        return (q.new_zeros(0, hq, v.shape[-1], dtype=dtype), q.new_zeros(hq, 0, dtype=dtype))
    return torch.cat(outs, 0), torch.cat(lses, 1)
