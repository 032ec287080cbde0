"""CPU attention path that gathers only the attended key blocks (never an N x N tensor).

For a chunk of query blocks, the key blocks each head attends are gathered from a block table
(built from ``layout.allowed`` over the key blocks that hold keys), scores are computed against
those blocks only and the exact token-level mask is applied (causality, sequence bounds, negative
query positions, partial first/last blocks when ``q_start``/``k_start`` are not block-aligned).
Memory is O(N x attended keys). Softmax runs in fp32 (float64 for float64 inputs). Everything is
plain torch, so autograd and ``torch.func`` differentiate it (q, k, v and through lse).

Under GQA, query head h reads KV head ``h // (Hq // Hkv)``. When every query head of a group has
the same block lists (``num_kv_heads`` or ``homo_head`` layouts, MQA with a shared pattern), each
KV block is gathered once per group; otherwise once per query head (never a full K/V repeat).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..layouts import cached_table, kv_block_table
from .reference import (_check_cu_seqlens, _check_layout_heads, _check_qkv, _check_scale,
                        _positions)

__all__ = ["blockwise_attention", "blockwise_attention_varlen"]

# elements of one chunk's score tensor [B, Hq, C, bs, L * bs]; a few of these are alive at once
_CHUNK_ELEMS = 1 << 21
_NO_KEY = 1 << 62            # a key position past every query

_TABLE_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_TABLE_CACHE_SIZE = 32


def _block_table(layout, hq, qb_lo, nqb, kb_lo, nkb, causal, device):
    """Sorted attended key blocks per (query head, query block): ``(counts [Hq, nqb], idx [Hq, nqb, L])``.

    Query blocks are ``qb_lo..qb_lo+nqb-1`` and key blocks ``kb_lo..kb_lo+nkb-1`` (absolute); the
    returned indices are relative to ``kb_lo`` (int32, padding 0). Cached per arguments.
    """
    key = (layout.key, hq, qb_lo, nqb, kb_lo, nkb, bool(causal), str(device))

    def build():
        return kv_block_table(layout, nqb, nkb, qb_lo, causal=causal, num_heads=hq, device=device,
                              k_block_start=kb_lo)

    return cached_table(_TABLE_CACHE, _TABLE_CACHE_SIZE, key, device, build)


def _graph_zero(q, k, v):
    """An exact 0 connected to q, k, v's autograd graph (sums of empty slices: no NaN from inf)."""
    return q.narrow(0, 0, 0).sum() + k.narrow(0, 0, 0).sum() + v.narrow(0, 0, 0).sum()


def _pad_blocks(x, front, nblocks, bs, dtype):
    """[B, N, H, D] -> [B, H, nblocks, bs, D] in ``dtype``, with ``front`` zero tokens before x."""
    x = x.transpose(1, 2).to(dtype)
    back = nblocks * bs - front - x.shape[2]
    x = torch.nn.functional.pad(x, (0, 0, front, back))
    return x.reshape(x.shape[0], x.shape[1], nblocks, bs, x.shape[-1])


class _SoftmaxLse(torch.autograd.Function):
    """``(softmax(s), logsumexp(s))`` over the last dim with one fused backward.

    ``lse = s_a - log(p_a)`` at the row's argmax ``a`` (exact). Backward:
    ``ds = p * (gp - sum(gp * p)) + p * glse``; built from differentiable ops (double backward works).
    """

    @staticmethod
    def forward(s):
        p = torch.softmax(s, dim=-1)
        a = s.argmax(-1, keepdim=True)
        lse = s.gather(-1, a) - torch.log(p.gather(-1, a))
        return p, lse

    @staticmethod
    def setup_context(ctx, inputs, output):   # this form also runs under torch.func transforms
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[0])

    @staticmethod
    def backward(ctx, gp, glse):
        (p,) = ctx.saved_tensors
        ds = None
        if gp is not None:
            ds = torch._softmax_backward_data(gp, p, -1, p.dtype)
        if glse is not None:
            ds = p * glse if ds is None else ds + p * glse
        return ds


def _chunk_plan(counts, nqb, per_block):
    """Split query blocks into chunks of about ``_CHUNK_ELEMS`` scores: ``[(c0, c1, L)]``."""
    width = max(1, int(counts.max())) if counts.numel() else 1
    step = max(1, _CHUNK_ELEMS // max(1, per_block * width))
    plan = []
    for c0 in range(0, nqb, step):
        c1 = min(nqb, c0 + step)
        plan.append((c0, c1, max(1, int(counts[:, c0:c1].max()))))
    return plan


def blockwise_attention(q, k, v, layout, *, causal=True, sm_scale=None, q_start=None, k_start=0):
    """Block-sparse attention in plain torch, gathering only the attended key blocks.

    q ``[B, Nq, Hq, D]``, k/v ``[B, Nk, Hkv, D]``. Returns ``(out [B, Nq, Hq, D] in q.dtype,
    lse [B, Hq, Nq])``; lse is fp32 (float64 when the inputs are float64), natural-log, ``-inf``
    for queries with no allowed key (whose out is 0).
    """
    hq, hkv = _check_qkv(q, k, v, varlen=False)
    _check_layout_heads(layout, hq)
    bsz, nq, _, d = q.shape
    nk, dv = k.shape[1], v.shape[-1]
    scale = _check_scale(sm_scale, d)
    q_start, k_start = _positions(nq, nk, q_start, k_start)
    layout.check_positions(q_start + nq, k_start + nk)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    neg_inf = float("-inf")

    t0 = min(nq, max(0, -q_start))        # queries before t0 sit at negative positions
    if t0 == nq or nk == 0 or bsz == 0:
        out = q.new_zeros(bsz, nq, hq, dv) + _graph_zero(q, k, v)
        return out, torch.full((bsz, hq, nq), neg_inf, dtype=cdt, device=dev)

    bs = layout.block_size
    group = hq // hkv
    p_lo, p_hi = q_start + t0, q_start + nq            # query positions [p_lo, p_hi), p_lo >= 0
    k_lo, k_hi = k_start, k_start + nk
    qb_lo, kb_lo = p_lo // bs, k_lo // bs
    nqb, nkb = (p_hi - 1) // bs + 1 - qb_lo, (k_hi - 1) // bs + 1 - kb_lo
    counts, idx = _block_table(layout, hq, qb_lo, nqb, kb_lo, nkb, causal, dev)

    # GQA: gather each KV block once per group when the group's query heads share block lists
    shared = group > 1 and bool(
        (counts.view(hkv, group, nqb) == counts.view(hkv, group, nqb)[:, :1]).all()
        and (idx.view(hkv, group, nqb, -1) == idx.view(hkv, group, nqb, -1)[:, :1]).all())
    if shared:
        gh, gq = hkv, group
        counts, idx = counts[::group], idx[::group]
        kv_head = torch.arange(hkv, device=dev)
    else:
        gh, gq = hq, 1
        kv_head = torch.arange(hq, device=dev) // group

    qp = _pad_blocks(q[:, t0:], p_lo - qb_lo * bs, nqb, bs, cdt) * scale     # [B, Hq, nqb, bs, D]
    qp = qp.view(bsz, gh, gq, nqb, bs, d).transpose(2, 3)                   # [B, gh, nqb, gq, bs, D]
    kflat = _pad_blocks(k, k_lo - kb_lo * bs, nkb, bs, cdt).reshape(bsz, hkv * nkb, bs * d)
    vflat = _pad_blocks(v, k_lo - kb_lo * bs, nkb, bs, cdt).reshape(bsz, hkv * nkb, bs * dv)

    tok = torch.arange(bs, device=dev)
    slot_all = torch.arange(idx.shape[-1], device=dev)
    # causal: inside the diagonal block (j == i) key c may serve query r iff c <= r
    tri = torch.zeros(bs, bs, dtype=cdt, device=dev).masked_fill_(tok.view(1, -1) > tok.view(-1, 1), neg_inf)
    plan = _chunk_plan(counts, nqb, bsz * hq * bs * bs)

    # per chunk: which key blocks sit in which slot, and which slots are in use
    tables = []
    for c0, c1, L in plan:
        C = c1 - c0
        cnt = counts[:, c0:c1]                                               # [gh, C]
        ix = idx[:, c0:c1, :L].long()                                        # [gh, C, L]
        slot = slot_all[:L]
        valid = slot < cnt.unsqueeze(-1)                                     # [gh, C, L]
        qb = qb_lo + c0 + torch.arange(C, device=dev).view(1, C)
        diag = None
        if causal:
            # the diagonal block, when listed, is the last one: move it to slot L - 1
            last = ix.gather(-1, (cnt - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
            diag = (cnt > 0) & (last + kb_lo == qb)                          # [gh, C]
            move = diag.unsqueeze(-1) & (slot == (cnt - 1).unsqueeze(-1))
            at_end = diag.unsqueeze(-1) & (slot == L - 1)
            ix = torch.where(at_end, (qb - kb_lo).unsqueeze(-1).expand_as(ix), torch.where(move, 0, ix))
            valid = (valid & ~move) | at_end
        tables.append((C, L, ix, valid, qb, diag))

    # gather the key blocks; with autograd, one gather + split keeps the backward O(total)
    flats = [((kv_head * nkb).view(-1, 1, 1) + ix).reshape(-1) for (_, _, ix, _, _, _) in tables]
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad) and len(flats) > 1:
        sizes = [f.numel() for f in flats]
        allf = torch.cat(flats)
        kparts = kflat.index_select(1, allf).split(sizes, 1)
        vparts = vflat.index_select(1, allf).split(sizes, 1)
    else:
        kparts = vparts = None
    qparts = qp.split([c1 - c0 for c0, c1, _ in plan], 2)

    outs, lses = [], []
    for n, (C, L, ix, valid, qb, diag) in enumerate(tables):
        if kparts is None:
            kc, vc = kflat.index_select(1, flats[n]), vflat.index_select(1, flats[n])
        else:
            kc, vc = kparts[n], vparts[n]
        kc = kc.reshape(bsz, gh, C, L * bs, d)
        vc = vc.reshape(bsz, gh, C, L * bs, dv)
        qc = qparts[n].reshape(bsz, gh, C, gq * bs, d)
        s = torch.matmul(qc, kc.transpose(-1, -2))                           # [B, gh, C, gq*bs, L*bs]

        # token mask (slot in use, key inside [k_lo, k_hi), causal) as a 0 / -inf bias
        kpos = ((kb_lo + ix) * bs).unsqueeze(-1) + tok                       # [gh, C, L, bs]
        kval = valid.unsqueeze(-1) & (kpos >= k_lo) & (kpos < k_hi)
        bias = torch.zeros(kval.shape, dtype=cdt, device=dev).masked_fill_(~kval, neg_inf)
        qpos = qb.view(C, 1) * bs + tok                                      # [C, bs]
        if causal:
            bias = bias.view(gh, C, 1, L, bs).repeat(1, 1, bs, 1, 1)         # [gh, C, bs, L, bs]
            bias[..., L - 1, :] += torch.where(diag.view(gh, C, 1, 1), tri, 0.0)
            first = torch.where(kval, kpos, _NO_KEY).flatten(2).amin(-1)     # [gh, C]
            has = first.unsqueeze(-1) <= qpos                                # [gh, C, bs]
        else:
            bias = bias.view(gh, C, 1, L, bs)
            has = kval.flatten(2).any(-1).unsqueeze(-1).expand(gh, C, bs)
        s = s.view(bsz, gh, C, gq, bs, L * bs) + bias.view(gh, C, 1, -1, L * bs)
        has = has.reshape(gh, C, 1, bs, 1)
        if not bool(has.all()):
            s = torch.where(has, s, 0.0)       # rows with no key: finite dummies, zeroed below
        p, lse = _SoftmaxLse.apply(s)
        o = torch.matmul(p.view(bsz, gh, C, gq * bs, L * bs), vc)            # [B, gh, C, gq*bs, Dv]
        outs.append(torch.where(has, o.view(bsz, gh, C, gq, bs, dv), 0.0))
        lses.append(torch.where(has, lse, neg_inf).squeeze(-1))              # [B, gh, C, gq, bs]

    o = torch.cat(outs, 2).transpose(2, 3).reshape(bsz, hq, nqb * bs, dv)
    l = torch.cat(lses, 2).transpose(2, 3).reshape(bsz, hq, nqb * bs)
    off = p_lo - qb_lo * bs
    o = o[:, :, off:off + (nq - t0)].transpose(1, 2)                         # [B, Nq - t0, Hq, Dv]
    l = l[:, :, off:off + (nq - t0)]
    if t0:
        o = torch.cat([o.new_zeros(bsz, t0, hq, dv), o], 1)
        l = torch.cat([l.new_full((bsz, hq, t0), neg_inf), l], 2)
    return o.to(q.dtype).contiguous(), l.contiguous()


def blockwise_attention_varlen(q, k, v, layout, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               *, causal=True, sm_scale=None):
    """Varlen form: q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]``, cu_seqlens int32 ``[B + 1]``.

    Positions restart at 0 in each sequence (queries end where their keys end). Returns
    ``(out [Tq, Hq, D], lse [Hq, Tq])``. Empty sequences are allowed.
    """
    hq, _ = _check_qkv(q, k, v, varlen=True)
    _check_layout_heads(layout, hq)
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], k.device)
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {len(cq)} and {len(ck)}")
    for name, cu, mx in (("max_seqlen_q", cq, max_seqlen_q), ("max_seqlen_k", ck, max_seqlen_k)):
        if isinstance(mx, bool) or not isinstance(mx, int):
            raise TypeError(f"{name} must be an int, got {type(mx).__name__}")
        longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
        if longest > mx:
            raise ValueError(f"{name} is {mx} but a sequence has length {longest}")
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs:
            continue
        o, l = blockwise_attention(q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0),
                                   layout, causal=causal, sm_scale=sm_scale)
        outs.append(o[0])
        lses.append(l[0])
    if not outs:
        return (q.new_zeros(q.shape[0], hq, v.shape[-1]) + _graph_zero(q, k, v),
                torch.full((hq, q.shape[0]), float("-inf"), dtype=cdt, device=q.device))
    return torch.cat(outs, 0), torch.cat(lses, 1)
