"""Triton kernel that writes a decode step's new keys/values into a KV cache (contiguous, paged,
or paged per KV head) and the lengths the step attends, in one launch. On a GPU the same launch
checks the lengths (and the pages it uses) with device-side assertions, so an eager step spends
no extra launches on its checks and a captured one keeps them."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["append_kv", "LENGTH_MSG", "PAGE_MSG"]

LENGTH_MSG = "starshard: cache_seqlens must be >= 0 and the cache lengths (with the appended " \
             "keys) within the cache's capacity"
PAGE_MSG = "starshard: block_table entries of the pages in use must lie in 0..pages - 1"


@triton.jit
def _append_kv_kernel(KC, VC, K, V, SEQLENS, LENS, PAGE_T, NQ, CAPACITY, NUM_PAGES,
                      s_kc0, s_kc1, s_kc2, s_kcd, s_vc0, s_vc1, s_vc2, s_vcd,
                      s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd, s_ptb, s_pth,
                      HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
                      PER_HEAD: tl.constexpr, HAS_KV: tl.constexpr, CHECK_PAGES: tl.constexpr,
                      BLOCK_P: tl.constexpr, LEN_MSG: tl.constexpr, PG_MSG: tl.constexpr):
    # program (b * max(NQ, 1) + t, h): token t of sequence b, KV head h (NQ = 0: no token,
    # the lengths and pages are only checked). The asserts compile only with debug=True.
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = (pid // tl.maximum(NQ, 1)).to(tl.int64)
    t = pid % tl.maximum(NQ, 1)
    held = tl.load(SEQLENS + b).to(tl.int64)
    pos = held + t
    if (t == 0) & (h == 0):
        tl.device_assert((held >= 0) & (held + NQ <= CAPACITY), LEN_MSG)
        tl.store(LENS + b, (held + NQ).to(tl.int32))
    if PAGE > 0:
        row = PAGE_T + b * s_ptb
        if PER_HEAD:
            row += h * s_pth
        if CHECK_PAGES:   # every page the step reads, one program a table row
            if (t == 0) & ((h == 0) | PER_HEAD):
                used = (tl.minimum(tl.maximum(held + NQ, 0), CAPACITY) + PAGE - 1) // PAGE
                for p0 in range(0, used, BLOCK_P):
                    p = p0 + tl.arange(0, BLOCK_P)
                    pg = tl.load(row + p, mask=p < used, other=0)
                    tl.device_assert((pg >= 0) & (pg < NUM_PAGES), PG_MSG)
    if HAS_KV & (pos >= 0) & (pos < CAPACITY):   # out-of-range lengths are never written
        if PAGE > 0:
            page = tl.load(row + pos // PAGE).to(tl.int64)
            tl.device_assert((page >= 0) & (page < NUM_PAGES), PG_MSG)
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


def append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table, page, capacity, *,
              check=False, check_pages=False):
    """Write k/v ``[B, Nq, Hkv, D]`` at slots ``cache_seqlens[b] ...`` of the cache (layouts as
    in ``sparse_attention_kvcache``; slots at or past ``capacity`` are not written) and return
    the lengths after them, int32 ``[B]`` (``cache_seqlens + Nq``). With k = v = None nothing
    is written and the lengths are ``cache_seqlens`` as int32. ``check``: device-side
    assertions that 0 <= cache_seqlens and the lengths <= capacity, and that the pages written
    lie in the cache; ``check_pages`` adds every page the step reads (a pass over the table)."""
    b = cache_seqlens.shape[0]
    nq, hkv, d = (k.shape[1], k.shape[2], k.shape[3]) if k is not None else (0, 1, 1)
    per_head = block_table is not None and block_table.dim() == 3
    if per_head:
        hkv = block_table.shape[1]
    lens = torch.empty(b, dtype=torch.int32, device=cache_seqlens.device)
    pt = block_table if block_table is not None else cache_seqlens
    s_pth = block_table.stride(1) if per_head else 0
    kv = (k, v) if k is not None else (k_cache, v_cache)
    kv_strides = (*k.stride(), *v.stride()) if k is not None else (0,) * 8
    _append_kv_kernel[(b * max(nq, 1), hkv)](
        k_cache, v_cache, *kv, cache_seqlens, lens, pt, nq, capacity, k_cache.shape[0],
        *k_cache.stride(), *v_cache.stride(), *kv_strides,
        pt.stride(0), s_pth, HEAD_D=d, BLOCK_D=triton.next_power_of_2(d), PAGE=page,
        PER_HEAD=per_head, HAS_KV=k is not None, CHECK_PAGES=check_pages and page > 0,
        BLOCK_P=256, LEN_MSG=LENGTH_MSG, PG_MSG=PAGE_MSG, num_warps=1,
        **({"debug": True, "sanitize_overflow": False} if check else {}))
    return lens
