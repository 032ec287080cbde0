"""S2 block-sparse attention inside a stock Hugging Face transformers model.

``use_s2_attention(model, layouts)`` registers the ``starshard_s2`` attention implementation and
switches the model to it: each decoder layer whose layout is given attends through
``starshard.sparse_attention`` with that layout, the others densely (the same op with a dense
layout), so a hybrid model mixes dense and sparse layers. Prefill, chunked prefill and decoding
with transformers' own KV cache work (the queries are the newest positions of the keys the
layer sees); batches must be unpadded (a padding mask raises), and training with attention
dropout is refused.
"""
from __future__ import annotations

from ..layouts import BlockLayout
from ..ops.sparse_attn import sparse_attention
from . import dense_layout

__all__ = ["use_s2_attention", "s2_attention", "IMPLEMENTATION"]

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
    layout = getattr(module, "starshard_layout", None)
    if layout is None:
        layout = dense_layout(q.shape[2])
    out = sparse_attention(q, k, v, layout, sm_scale=scaling)
    return out, None


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
