"""The attention function registered with transformers, and the per-call state it reads.

The engine runs the model with ``use_cache=False`` and sets a :class:`Step` describing what the
current forward does; the registered function (``attn_implementation="starshard_star"``) gets
each layer's rotated query/key/value for the current tokens only and

- ``causal``: plain causal attention over the current tokens (dense prefill, the anchor, block 0);
- ``encode``: a context block behind its anchor: the anchor's stored KV is fully visible, the
  block is causal over itself (Star phase 1);
- ``ring``: exact causal attention over the whole context, KV passed around the hosts' ring;
- ``query``: every context cache (all earlier tokens) plus, on the query host, its own cache,
  to which the current tokens' KV is added first; partials (out, lse) from all hosts are
  gathered and merged exactly (Star phase 2).

Each mode stores the current KV where the step says. Attention inside a host is starshard's op
with a dense layout, which returns the log-sum-exp the merge needs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ..layouts import local_stride
from ..ops.sparse_attn import sparse_attention

__all__ = ["Step", "use_step", "star_attention", "register", "IMPLEMENTATION"]

IMPLEMENTATION = "starshard_star"
_local = threading.local()
_DENSE = {}


@dataclass
class Step:
    """What the current forward pass does (see the module docstring)."""
    mode: str                                  # causal | encode | ring | query | probe
    start: int = 0                             # global position of the first current token
    save: object = None                        # PositionedKV receiving the current KV, or None
    prefix: object = None                      # encode: the anchor's PositionedKV
    caches: list = field(default_factory=list)  # query: context caches (all before the queries)
    own: object = None                         # query: the query host's cache; the current KV joins it
    comm: object = None                        # query / ring: Comm
    pieces: tuple = ()                         # ring: (start, n) of the current tokens' pieces
    ring_pieces: tuple = ()                    # ring: per rank, its pieces
    send_anchor: int = 0                       # causal on rank 0: broadcast the first n tokens' KV
    recv_anchor: int = 0                       # encode: receive n anchor tokens' KV into prefix


class use_step:
    """Context manager: run the model under ``step``."""

    def __init__(self, step):
        self.step = step

    def __enter__(self):
        self.prev = getattr(_local, "step", None)
        _local.step = self.step
        return self.step

    def __exit__(self, *exc):
        _local.step = self.prev


def _dense_layout(hq):
    lay = _DENSE.get(hq)
    if lay is None:
        lay = _DENSE[hq] = local_stride(hq, 128, 0, 1, causal=False)
    return lay


# Below this many scores per call, a CPU partial is one plain softmax: the blockwise op's
# per-call overhead would dominate a decode step. Above it, the op bounds the memory.
_DIRECT_SCORES = 1 << 24


def _partial(q, k, v, scale, *, causal, q_start, k_start):
    """(out [B, Nq, H, D], lse [B, H, Nq] fp32) of q over k/v at the given positions."""
    if causal and q_start >= k_start + k.shape[1] - 1:
        causal = False  # every key is at or before every query
    if (q.device.type == "cpu" and _CPU_FLASH is not None and k.shape[1] > 0
            and (not causal or q_start == k_start)):
        return _cpu_flash_partial(q, k, v, scale, causal)
    if q.device.type == "cpu" and q.shape[1] * k.shape[1] * q.shape[2] <= _DIRECT_SCORES:
        return _direct_partial(q, k, v, scale, causal, q_start, k_start)
    # the op: for a decode step over a long segment its forward splits the keys over several
    # programs (faster on an H200 than cutting them into chunks here: benchmarks/NOTES.md)
    return sparse_attention(q, k, v, _dense_layout(q.shape[2]), causal=causal, sm_scale=scale,
                            return_lse=True, q_start=q_start, k_start=k_start)


# PyTorch's fused CPU attention (flash-style, O(N) memory) returns the log-sum-exp too: several
# times faster than the einsum softmax or the blockwise op for prefill-sized calls. Its causal
# mask is top-left aligned, which is ours exactly when queries and keys start at one position.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _cpu_flash_partial(q, k, v, scale, causal):
    b, nq, h, d = q.shape
    hkv = k.shape[2]
    qt, kt, vt = (t.float().transpose(1, 2) for t in (q, k, v))
    if h != hkv and not causal:
        # GQA without copying K/V: a key head's query heads become more rows of one head
        g = h // hkv
        qg = qt.reshape(b, hkv, g * nq, d)
        out, lse = _CPU_FLASH(qg, kt, vt, 0.0, False, scale=scale)
        out = out.reshape(b, h, nq, vt.shape[-1])
        return out.transpose(1, 2).to(q.dtype), lse.reshape(b, h, nq).float()
    if h != hkv:
        kt, vt = kt.repeat_interleave(h // hkv, 1), vt.repeat_interleave(h // hkv, 1)
    out, lse = _CPU_FLASH(qt, kt, vt, 0.0, bool(causal), scale=scale)
    return out.transpose(1, 2).to(q.dtype), lse.float()


def _direct_partial(q, k, v, scale, causal, q_start, k_start):
    b, nq, h, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    qf = q.float().reshape(b, nq, hkv, h // hkv, d)
    s = torch.einsum("bqkgd,bskd->bkgqs", qf, k.float()) * scale
    if causal:
        later = (torch.arange(nk) + k_start)[None, :] > (torch.arange(nq) + q_start)[:, None]
        s = s.masked_fill(later, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bkgqs,bskd->bqkgd", p, v.float()).reshape(b, nq, h, v.shape[-1])
    return out.to(q.dtype), lse.reshape(b, h, nq)


def _empty_partial(q):
    b, n, h, _ = q.shape
    return torch.zeros_like(q), torch.full((b, h, n), float("-inf"), dtype=torch.float32,
                                           device=q.device)


def _merge(parts, q):
    """One (out, lse) from partials over disjoint keys: out in q's dtype, lse fp32."""
    if not parts:
        return _empty_partial(q)
    if len(parts) == 1:
        return parts[0]
    out, lse = _merge_stacked(torch.stack([p[0] for p in parts]).float(),
                              torch.stack([p[1] for p in parts]).float())
    return out.to(q.dtype), lse


def _merge_stacked(outs, lses):
    """Merge S partials in one pass: outs ``[S, B, N, H, D]`` and lses ``[S, B, H, N]`` (fp32) to
    (out ``[B, N, H, D]``, lse ``[B, H, N]``). Each weight is exp(lse_i - max lse) <= 1; rows no
    partial has a key for get out 0 and lse -inf. (Inference only: ``merge_attention`` is the
    differentiable, pairwise form.)"""
    lt = lses.transpose(-1, -2)                          # [S, B, N, H]
    m = lt.amax(0)
    m = torch.where(torch.isneginf(m), 0.0, m)
    w = torch.exp(lt - m)
    tot = w.sum(0)
    empty = tot == 0
    out = (outs * w[..., None]).sum(0) / torch.where(empty, 1.0, tot)[..., None]
    lse = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, tot)))
    return out, lse.transpose(-1, -2)


def _over_segments(q, kv, layer, scale, q_start, parts):
    for start, k, v in kv.segments(layer):
        parts.append(_partial(q, k, v, scale, causal=False, q_start=q_start, k_start=start))


def star_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kw):
    """transformers attention interface: returns (out [B, N, H, D], None)."""
    step = getattr(_local, "step", None)
    if step is None:
        raise RuntimeError("the starshard_star attention runs only inside a starshard.star engine step")
    layer = module.layer_idx
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if step.mode == "probe":
        step.save.append(layer)
        return torch.zeros_like(query.transpose(1, 2)), None
    p0 = step.start
    if step.recv_anchor:
        receive_anchor(step.comm, step.prefix, layer, step.recv_anchor, k)
    if step.mode == "causal":
        out, _ = _partial(q, k, v, scale, causal=True, q_start=p0, k_start=p0)
    elif step.mode == "encode":
        parts = [_partial(q, k, v, scale, causal=True, q_start=p0, k_start=p0)]
        _over_segments(q, step.prefix, layer, scale, p0, parts)
        out, _ = _merge(parts, q)
    elif step.mode == "ring":
        out = _ring(step, q, k, v, scale)
    elif step.mode == "query":
        parts = []
        for cache in step.caches:
            _over_segments(q, cache, layer, scale, p0, parts)
        if step.own is not None:  # the current tokens join the query host's own KV first
            step.own.append(layer, p0, k, v)
            for start, kk, vv in step.own.segments(layer):
                parts.append(_partial(q, kk, vv, scale, causal=True, q_start=p0, k_start=start))
        o, lse = _merge(parts, q)
        if step.comm is not None and step.comm.distributed:
            o = _gather_merge(step.comm, o, lse)
        out = o
    else:
        raise ValueError(f"unknown step mode {step.mode!r}")
    if step.save is not None:
        _save(step, layer, k, v)
    if step.send_anchor:
        n = step.send_anchor
        step.comm.broadcast(k[:, :n].contiguous(), 0)
        step.comm.broadcast(v[:, :n].contiguous(), 0)
    return out, None


def _gather_merge(comm, o, lse):
    """Every host's partial (o ``[B, N, H, D]``, lse ``[B, H, N]``) merged into this one's output:
    one collective (o and lse packed in fp32) and one merge over the stacked partials, whatever
    the number of hosts (a decode step is bound by host-side launches, not by these few bytes)."""
    b, n, h, d = o.shape
    packed = comm.all_gather_stacked(torch.cat([o.float().reshape(-1), lse.float().reshape(-1)]))
    out, _ = _merge_stacked(packed[:, :o.numel()].view(-1, b, n, h, d),
                            packed[:, o.numel():].view(-1, b, h, n))
    return out.to(o.dtype)


def receive_anchor(comm, prefix, layer, n, like):
    """Take rank 0's anchor KV for ``layer`` (its layer-by-layer broadcast) into ``prefix``."""
    shape = (like.shape[0], n) + tuple(like.shape[2:])
    kb = comm.broadcast(like.new_empty(shape), 0)
    vb = comm.broadcast(like.new_empty(shape), 0)
    prefix.append(layer, 0, kb, vb)


def _save(step, layer, k, v):
    if step.mode == "ring":
        i = 0
        for start, n in step.pieces:
            step.save.append(layer, start, k[:, i:i + n], v[:, i:i + n])
            i += n
    else:
        step.save.append(layer, step.start, k, v)


def _ring(step, q, k, v, scale):
    """Exact causal attention of this host's pieces over every host's pieces, passing KV round."""
    comm = step.comm
    world, rank = comm.world, comm.rank
    qs, i = [], 0
    for start, n in step.pieces:
        qs.append((start, q[:, i:i + n]))
        i += n
    parts = [[] for _ in qs]
    kk, vv = k, v
    for s in range(world):
        src = (rank - s) % world
        j = 0
        for kstart, n in step.ring_pieces[src]:
            ks, vs = kk[:, j:j + n], vv[:, j:j + n]
            j += n
            for idx, (qstart, qq) in enumerate(qs):
                if kstart > qstart + qq.shape[1] - 1:
                    continue  # every key after every query
                parts[idx].append(_partial(qq, ks, vs, scale, causal=True, q_start=qstart, k_start=kstart))
        if s + 1 < world:
            nxt_src = (rank - s - 1) % world
            n_in = sum(n for _, n in step.ring_pieces[nxt_src])
            like = kk.new_empty((kk.shape[0], n_in) + tuple(kk.shape[2:]))
            kk, vv = comm.ring_exchange(kk, like), comm.ring_exchange(vv, like)
    outs = [_merge(p, qq)[0] for p, (_, qq) in zip(parts, qs)]
    return torch.cat(outs, 1)


_registered = False


def register():
    """Register ``starshard_star`` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return IMPLEMENTATION
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(IMPLEMENTATION, star_attention)
    # the engine applies causality itself from global positions: no N x N mask is ever built
    AttentionMaskInterface.register(IMPLEMENTATION, lambda *a, **k: None)
    _registered = True
    return IMPLEMENTATION
