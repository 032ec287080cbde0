"""S2 block-sparse attention inside a stock Hugging Face transformers model.

``use_s2_attention(model, layouts)`` registers the ``starshard_s2`` attention implementation and
switches the model to it: each decoder layer whose layout is given attends through
``starshard.sparse_attention`` with that layout, the others densely (the same op with a dense
layout; a one-token decode step through torch's SDPA, which is exact there and cheaper to
launch), so a hybrid model mixes dense and sparse layers. Prefill, chunked prefill and decoding
with transformers' own KV cache work (the queries are the newest positions of the keys the
layer sees); batches must be unpadded (a padding mask raises), and training with attention
dropout is refused. ``S2Cache(model, batch=, capacity=)`` is a transformers cache that keeps
each layer's K/V in a :class:`starshard.KVCache`: head-sharded for sparse layers (per KV head
only the blocks it will read again), so long generations take a fraction of the memory.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..kvcache import KVCache
from ..layouts import BlockLayout
from ..ops.sparse_attn import sparse_attention
from . import dense_layout

__all__ = ["use_s2_attention", "s2_attention", "S2Cache", "IMPLEMENTATION"]

IMPLEMENTATION = "starshard_s2"
_registered = False


def s2_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                 **kwargs):
    """transformers attention interface: query ``[B, Hq, Nq, D]``, key/value ``[B, Hkv, Nk, D]``
    (the layer's whole cache when decoding); returns ``(out [B, Nq, Hq, D], None)``."""
    if dropout and module.training:
        raise NotImplementedError("starshard_s2 attention has no dropout; set the model's "
                                  "attention dropout to 0 to train with it")
    if not getattr(module, "is_causal", True):
        raise ValueError(f"starshard_s2 attention is causal; {type(module).__name__} (layer "
                         f"{getattr(module, 'layer_idx', '?')}) is not")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    cache_layer = getattr(module, "starshard_pending", None)
    if cache_layer is not None:   # an S2Cache layer took this call's new K/V: attend there
        module.starshard_pending = None
        return cache_layer.attend(q, k, v, scaling), None
    layout = getattr(module, "starshard_layout", None)
    if layout is None and q.shape[1] == 1:
        return _dense_step(q, k, v, scaling), None
    if layout is None:
        layout = dense_layout(q.shape[2])
    out = sparse_attention(q, k, v, layout, sm_scale=scaling)
    return out, None


def _dense_step(q, k, v, scaling):
    """A dense layer's one-query step, ``[B, 1, H, D]`` over every key: SDPA computes it
    exactly for a fraction of the host time of a launch of the sparse kernel."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


def _no_padding_mask(*args, attention_mask=None, **kwargs):
    """The mask hook: starshard applies causality itself; a padded batch cannot be honoured."""
    if attention_mask is not None and not bool((attention_mask != 0).all()):
        raise ValueError("starshard_s2 attention takes unpadded batches only (the attention mask "
                         "has padding); run sequences of one length together")
    return None


def register():
    """Register ``starshard_s2`` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface, AttentionMaskInterface
        AttentionInterface.register(IMPLEMENTATION, s2_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, _no_padding_mask)
        _registered = True
    return IMPLEMENTATION


def _attention_modules(model):
    """{layer index: attention module} of the decoder layers (modules with a ``layer_idx`` and
    the q/k/v projections)."""
    found = {}
    for mod in model.modules():
        idx = getattr(mod, "layer_idx", None)
        if isinstance(idx, int) and hasattr(mod, "q_proj") and hasattr(mod, "k_proj"):
            found[idx] = mod
    return found


def use_s2_attention(model, layouts):
    """Switch a transformers model to S2 attention, in place; returns the model.

    ``layouts``: one :class:`~starshard.BlockLayout` for every layer, a list with one entry per
    layer (``None``: dense), or a callable ``layer index -> BlockLayout or None``. Each layout
    must have the model's query-head count (or be shared by all heads)."""
    mods = _attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__}: no attention modules with a layer_idx and "
                         f"q/k/v projections found")
    n = max(mods) + 1
    if isinstance(layouts, BlockLayout) or layouts is None:
        per_layer = [layouts] * n
    elif callable(layouts):
        per_layer = [layouts(i) for i in range(n)]
    else:
        per_layer = list(layouts)
        if len(per_layer) != n:
            raise ValueError(f"layouts has {len(per_layer)} entries, the model has {n} layers")
    heads = model.config.num_attention_heads
    for i, lay in enumerate(per_layer):
        if lay is not None and not isinstance(lay, BlockLayout):
            raise TypeError(f"layout of layer {i} must be a starshard.BlockLayout or None, got "
                            f"{type(lay).__name__}")
        if lay is not None and lay.num_heads is not None and lay.num_heads != heads:
            raise ValueError(f"layout of layer {i} has {lay.num_heads} query heads, the model "
                             f"has {heads}")
    register()
    try:
        model.set_attn_implementation(IMPLEMENTATION)
    except Exception as e:  # noqa: BLE001 - the model refuses custom attention
        raise ValueError(f"{type(model).__name__}: its attention cannot be hooked through the "
                         f"transformers attention interface ({e})") from e
    for i, mod in mods.items():
        mod.starshard_layout = per_layer[i]
    return model


class _S2CacheLayer(CacheLayerMixin):
    """One decoder layer's part of an :class:`S2Cache` (a transformers cache layer)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, module, kv):
        super().__init__()
        self.module, self.kv = module, kv
        self.batch_size = kv.batch
        self.length = 0           # tokens held (every sequence of the batch has this many)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states):
        pass   # the storage exists from the start

    def update(self, key_states, value_states, *args, **kwargs):
        """Take the new K/V ``[B, Hkv, n, D]`` for this call's attention (which appends them to
        the cache and attends there): returned as they are."""
        b, n = key_states.shape[0], key_states.shape[2]
        if b != self.kv.batch:
            raise ValueError(f"S2Cache was made for batch {self.kv.batch}, the model got {b}")
        if self.length + n > self.kv.capacity:
            raise ValueError(f"S2Cache holds {self.kv.capacity} tokens a sequence; {self.length} "
                             f"held + {n} new do not fit (make it with a larger capacity)")
        if self.length and n > self.kv.max_query_len:
            raise ValueError(f"S2Cache takes the prompt in one call, then at most "
                             f"{self.kv.max_query_len} tokens a step (got {n} after {self.length})")
        self.module.starshard_pending = self
        return key_states, value_states

    def attend(self, q, k, v, scaling):
        """q ``[B, n, Hq, D]``, k/v ``[B, n, Hkv, D]``: the prompt (attended among itself, then
        loaded with ``KVCache.fill``) or new tokens (``KVCache.attend``)."""
        if self.length == 0:
            out = sparse_attention(q, k, v, self.kv.layout, sm_scale=scaling)
            self.kv.fill(k, v)
        elif self.module.starshard_layout is None and q.shape[1] == 1:   # dense: slot n, SDPA
            n = self.length
            self.kv.k[:, n:n + 1] = k
            self.kv.v[:, n:n + 1] = v
            self.kv.seqlens += 1
            out = _dense_step(q, self.kv.k[:, :n + 1], self.kv.v[:, :n + 1], scaling)
        else:
            out = self.kv.attend(q, k, v, sm_scale=scaling)
        self.length += q.shape[1]
        return out

    def get_seq_length(self):
        return self.length

    def get_mask_sizes(self, query_length):
        return self.length + query_length, 0

    def get_max_length(self):
        return self.kv.capacity

    def reset(self):
        self.kv.reset(0)
        self.length = 0

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("S2Cache keeps a fixed batch and does not crop: beam search, "
                                  "batch reordering and assisted decoding are not supported")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = offload = _unsupported

    def prefetch(self):
        pass


class S2Cache(Cache):
    """A transformers ``Cache`` for a model switched by :func:`use_s2_attention`: each decoder
    layer's K/V in a :class:`starshard.KVCache` over its layout. ``head_sharded``: layers whose
    layout lets a cache drop blocks (``BlockLayout.is_kv_efficient``) keep per KV head only the
    blocks they will read again; dense layers keep every slot. ``capacity`` tokens a sequence
    (prompt + new tokens), a fixed ``batch``; the prompt comes in one call, then at most
    ``max_query_len`` tokens a step. Pass it as ``past_key_values`` to ``generate`` or forward.
    """

    def __init__(self, model, *, batch, capacity, head_sharded=True, max_query_len=1, dtype=None,
                 device=None):
        mods = _attention_modules(model)
        if not mods or any(not hasattr(m, "starshard_layout") for m in mods.values()):
            raise ValueError("S2Cache needs a model switched to S2 attention first "
                             "(starshard.integrations.hf.use_s2_attention)")
        cfg = model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        param = next(model.parameters())
        layers = []
        for i in range(max(mods) + 1):
            if i not in mods:
                raise ValueError(f"S2Cache: layer {i} has no attention module with a layer_idx")
            lay = mods[i].starshard_layout
            sharded = bool(head_sharded and lay is not None and lay.is_kv_efficient())
            kv = KVCache(lay if lay is not None else dense_layout(heads), batch=batch,
                         capacity=capacity, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=head_dim, head_sharded=sharded, max_query_len=max_query_len,
                         dtype=dtype or param.dtype, device=device or param.device)
            layers.append(_S2CacheLayer(mods[i], kv))
        super().__init__(layers=layers)

    def nbytes(self):
        """Bytes of K/V storage over all layers."""
        return sum(layer.kv.nbytes() for layer in self.layers)

    def dense_nbytes(self):
        """Bytes a cache keeping every slot of every layer and head would take."""
        return sum(layer.kv.dense_nbytes() for layer in self.layers)
