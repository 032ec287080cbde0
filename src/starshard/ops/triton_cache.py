"""Triton kernel that writes a decode step's new keys/values into a KV cache (contiguous, paged,
or paged per KV head) and the lengths the step attends, in one launch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["append_kv"]


@triton.jit
def _append_kv_kernel(KC, VC, K, V, SEQLENS, LENS, PAGE_T, NQ, CAPACITY,
                      s_kc0, s_kc1, s_kc2, s_kcd, s_vc0, s_vc1, s_vc2, s_vcd,
                      s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd, s_ptb, s_pth,
                      HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                      PER_HEAD: tl.constexpr):
    # program (b * NQ + t, h): token t of sequence b, KV head h
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = (pid // NQ).to(tl.int64)
    t = pid % NQ
    held = tl.load(SEQLENS + b).to(tl.int64)
    pos = held + t
    if (t == 0) & (h == 0):
        tl.store(LENS + b, (held + NQ).to(tl.int32))
    if (pos >= 0) & (pos < CAPACITY):   # lengths out of range: checked outside a capture
        if PAGE > 0:
            row = PAGE_T + b * s_ptb
            if PER_HEAD:
                row += h * s_pth
            page = tl.load(row + pos // PAGE).to(tl.int64)
            slot = pos % PAGE
            kc = KC + page * s_kc0 + slot * s_kc1
            vc = VC + page * s_vc0 + slot * s_vc1
            if not PER_HEAD:
                kc += h * s_kc2
                vc += h * s_vc2
        else:
            kc = KC + b * s_kc0 + pos * s_kc1 + h * s_kc2
            vc = VC + b * s_vc0 + pos * s_vc1 + h * s_vc2
        d = tl.arange(0, BLOCK_D)
        ok = d < HEAD_D
        k = tl.load(K + b * s_kb + t * s_kn + h * s_kh + d * s_kd, mask=ok)
        v = tl.load(V + b * s_vb + t * s_vn + h * s_vh + d * s_vd, mask=ok)
        tl.store(kc + d * s_kcd, k, mask=ok)
        tl.store(vc + d * s_vcd, v, mask=ok)


def append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table, page, capacity):
    """Write k/v ``[B, Nq, Hkv, D]`` at slots ``cache_seqlens[b] ...`` of the cache (layouts as
    in ``sparse_attention_kvcache``; slots at or past ``capacity`` are not written) and return
    the lengths after them, int32 ``[B]`` (``cache_seqlens + Nq``)."""
    b, nq, hkv, d = k.shape
    lens = torch.empty(b, dtype=torch.int32, device=k.device)
    per_head = block_table is not None and block_table.dim() == 3
    pt = block_table if block_table is not None else cache_seqlens
    s_pth = block_table.stride(1) if per_head else 0
    _append_kv_kernel[(b * nq, hkv)](
        k_cache, v_cache, k, v, cache_seqlens, lens, pt, nq, capacity,
        *k_cache.stride(), *v_cache.stride(), *k.stride(), *v.stride(),
        pt.stride(0), s_pth, HEAD_D=d, BLOCK_D=triton.next_power_of_2(d), PAGE=page,
        PER_HEAD=per_head, num_warps=1)
    return lens
