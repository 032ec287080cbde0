"""Exact merge of partial attention results computed over disjoint key sets.

Given partials ``(o_i, lse_i)`` where ``o_i`` is softmax attention over key set ``K_i`` and
``lse_i`` its log-sum-exp, attention over the union is
``lse = log(sum_i exp(lse_i))`` and ``out = sum_i exp(lse_i - lse) * o_i``. Pairs are folded
left to right in the sigmoid / log-sigmoid form, which never exponentiates a raw difference:

    w1 = sigmoid(l1 - l2),  w2 = sigmoid(l2 - l1),  out = w1 * o1 + w2 * o2
    lse = l1 - logsigmoid(l1 - l2)   (taken from the larger of l1, l2, so it stays finite)

A row whose partials are all ``-inf`` (no key anywhere) gets ``out = 0`` and ``lse = -inf``, with
finite gradients (forward and backward never produce NaN for it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["merge_attention"]


def _merge2(o1, l1, o2, l2):
    """Merge two partials; ``o`` is ``[..., N, H, D]`` and ``l`` ``[..., N, H, 1]`` (compute dtype)."""
    none1, none2 = torch.isneginf(l1), torch.isneginf(l2)
    both = none1 & none2
    d = torch.where(both, 0.0, l1 - l2)          # -inf - -inf would be NaN: never used, never differentiated
    out = o1 * torch.sigmoid(d) + o2 * torch.sigmoid(-d)
    out = torch.where(both, 0.0, out)
    first = l1 >= l2
    # from the larger side the log-sigmoid argument is >= 0, so both terms are finite
    lse = torch.where(first, l1 - F.logsigmoid(torch.where(first, d, 0.0)),
                      l2 - F.logsigmoid(torch.where(first, 0.0, -d)))
    lse = torch.where(both, float("-inf"), lse)
    return out, lse


def merge_attention(outs, lses):
    """Merge partial attention outputs over disjoint key sets: ``(out, lse)``.

    ``outs``: list of ``[..., N, H, D]`` tensors (dense ``[B, N, H, D]`` or varlen ``[T, H, D]``), one
    dtype. ``lses``: list of ``[..., H, N]`` log-sum-exps (``lse.transpose(-1, -2)`` matches
    ``out.shape[:-1]``). Computed in fp32 (float64 if any input is float64); returns out in the
    outs' dtype and lse in fp32 (float64 when the lses are float64). Differentiable.
    """
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise TypeError(f"outs and lses must be lists of tensors, got {type(outs).__name__} and "
                        f"{type(lses).__name__}")
    if len(outs) == 0:
        raise ValueError("outs must hold at least one partial result, got an empty list")
    if len(outs) != len(lses):
        raise ValueError(f"outs and lses must have the same length, got {len(outs)} and {len(lses)}")
    for i, (o, l) in enumerate(zip(outs, lses)):
        for name, t in ((f"outs[{i}]", o), (f"lses[{i}]", l)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be floating point, got dtype {t.dtype}")
        if o.dim() < 3:
            raise ValueError(f"outs[{i}] must be [..., N, H, D], got shape {tuple(o.shape)}")
        if l.dim() != o.dim() - 1 or l.transpose(-1, -2).shape != o.shape[:-1]:
            raise ValueError(f"lses[{i}] must have shape {tuple(o.shape[:-3]) + (o.shape[-2], o.shape[-3])} "
                             f"([..., H, N]) for outs[{i}] of shape {tuple(o.shape)}, got {tuple(l.shape)}")
        if o.shape != outs[0].shape:
            raise ValueError(f"outs[{i}] has shape {tuple(o.shape)} but outs[0] has {tuple(outs[0].shape)}")
        if o.dtype != outs[0].dtype:
            raise TypeError(f"outs[{i}] has dtype {o.dtype} but outs[0] has {outs[0].dtype}")
        if l.dtype != lses[0].dtype:
            raise TypeError(f"lses[{i}] has dtype {l.dtype} but lses[0] has {lses[0].dtype}")
        if o.device != outs[0].device or l.device != outs[0].device:
            raise ValueError(f"outs[{i}]/lses[{i}] are on {o.device}/{l.device}, outs[0] on {outs[0].device}")
    out_dtype = outs[0].dtype
    cdt = torch.float64 if torch.float64 in (out_dtype, lses[0].dtype) else torch.float32
    lse_dtype = torch.float64 if lses[0].dtype == torch.float64 else torch.float32
    out = outs[0].to(cdt)
    lse = lses[0].to(cdt).transpose(-1, -2).unsqueeze(-1)          # [..., N, H, 1]
    for o, l in zip(outs[1:], lses[1:]):
        out, lse = _merge2(out, lse, o.to(cdt), l.to(cdt).transpose(-1, -2).unsqueeze(-1))
    return out.to(out_dtype), lse.squeeze(-1).transpose(-1, -2).to(lse_dtype).contiguous()
