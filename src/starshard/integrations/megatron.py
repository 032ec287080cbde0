"""S2 block-sparse attention as the core attention of a Megatron-core model.

:class:`S2DotProductAttention` takes the place of Megatron-core's ``DotProductAttention`` (or
``TEDotProductAttention``) in a layer spec: the layer computes Q, K and V as usual (rotary
embeddings, GQA, tensor parallelism) and hands them here, and this module attends through
``starshard.sparse_attention`` with the layer's layout. :func:`s2_layer_spec` makes such a spec
from a GPT layer spec::

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from starshard.integrations.megatron import s2_layer_spec
    spec = s2_layer_spec(lambda n: layout if n % 2 else None, get_gpt_layer_local_spec())
    model = GPTModel(config=config, transformer_layer_spec=spec, ...)

``layouts`` are written for the model's global query heads; under tensor parallelism each rank
keeps its own heads' part (``BlockLayout.for_heads``). Supported: causal and unmasked
(``no_mask``: bidirectional, except that a layer with a causal layout stays causal, as
Megatron's KV-cache decoding asks for no mask after the prompt) attention, packed sequences
(``thd``), Megatron's static-batch KV-cache inference (the queries are the newest positions of
the keys). Refused with a clear error: padding and arbitrary masks, attention bias, context
parallelism, sliding windows, non-vanilla softmax, and attention dropout while training (set
``attention_dropout=0``). With the causal mask type the ``attention_mask`` tensor is not read,
as in Megatron's fused and Transformer-Engine kernels.
"""
from __future__ import annotations

import copy
import math

import torch

from ..layouts import BlockLayout
from ..ops.sparse_attn import sparse_attention, sparse_attention_varlen
from . import dense_layout

__all__ = ["S2DotProductAttention", "s2_layer_spec", "layout_for_layer"]


def layout_for_layer(layouts, layer_number):
    """The layout of Megatron layer ``layer_number`` (1-based, global): ``layouts`` is one
    :class:`~starshard.BlockLayout` (or ``None``: dense) for every layer, a sequence indexed by
    ``layer_number - 1``, a dict ``{layer_number: layout}`` (missing layers dense), or a callable
    ``layer_number -> layout or None``."""
    if layouts is None or isinstance(layouts, BlockLayout):
        lay = layouts
    elif callable(layouts):
        lay = layouts(layer_number)
    elif isinstance(layouts, dict):
        lay = layouts.get(layer_number)
    else:
        seq = list(layouts)
        if not 1 <= layer_number <= len(seq):
            raise ValueError(f"layouts has {len(seq)} entries (layers 1..{len(seq)}); the model "
                             f"asks for layer {layer_number}")
        lay = seq[layer_number - 1]
    if lay is not None and not isinstance(lay, BlockLayout):
        raise TypeError(f"layout of layer {layer_number} must be a starshard.BlockLayout or None, "
                        f"got {type(lay).__name__}")
    return lay


def _tp_rank_size(pg_collection):
    group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
    if group is None:
        from megatron.core import parallel_state
        return (parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_world_size())
    return group.rank(), group.size()


class S2DotProductAttention(torch.nn.Module):
    """Megatron-core core attention running S2 sparse attention (a drop-in for
    ``DotProductAttention`` in a layer spec; ``layouts`` comes through the spec's params).

    forward: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` (this rank's heads; packed
    ``thd``: ``[t, np, hn]``) -> ``[sq, b, np * hn]`` (``[t, np * hn]``).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, *, layouts=None):
        super().__init__()
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if getattr(config, "context_parallel_size", 1) != 1:
            raise NotImplementedError("S2DotProductAttention does not support context parallelism "
                                      f"(context_parallel_size={config.context_parallel_size})")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"S2DotProductAttention supports softmax_type='vanilla' only, "
                                      f"got {config.softmax_type!r}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("S2DotProductAttention: the layer's sparsity comes from its layout; "
                             "unset config.window_size (sliding-window attention)")
        self.dropout_p = float(config.attention_dropout if attention_dropout is None
                               else attention_dropout)
        self.softmax_scale = softmax_scale  # None: 1 / sqrt(head dim)
        rank, size = _tp_rank_size(pg_collection)
        heads = config.num_attention_heads
        if heads % size:
            raise ValueError(f"num_attention_heads ({heads}) is not divisible by the tensor-"
                             f"parallel size ({size})")
        self.num_heads = heads // size
        lay = layout_for_layer(layouts, self.layer_number)
        if lay is not None and lay.num_heads is not None:
            if lay.num_heads != heads:
                raise ValueError(f"layout of layer {self.layer_number} has {lay.num_heads} query "
                                 f"heads, the model has {heads} (layouts are written for the "
                                 f"global heads)")
            lay = lay.for_heads(rank * self.num_heads, (rank + 1) * self.num_heads)
        self.layout = lay

    def _mask_is_causal(self, attn_mask_type):
        name = getattr(attn_mask_type or self.attn_mask_type, "name", str(attn_mask_type))
        if name in ("causal", "causal_bottom_right", "padding_causal"):
            return True
        if name == "no_mask":
            # Megatron's KV-cache decoding passes no_mask after the prompt; a causal layout
            # cannot mean bidirectional attention, so it keeps the layer causal
            return self.layout is not None and self.layout.causal_rule
        raise ValueError(f"S2DotProductAttention supports causal and no_mask attention, not "
                         f"{name!r} (padding or arbitrary masks); pack sequences (thd) instead "
                         f"of padding them")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """Attention of this rank's heads; see the class docstring for shapes."""
        if attention_bias is not None:
            raise NotImplementedError("S2DotProductAttention does not take an attention bias")
        if self.dropout_p > 0 and self.training:
            raise NotImplementedError(
                f"S2DotProductAttention has no attention dropout (layer {self.layer_number} asks "
                f"for p={self.dropout_p}); set attention_dropout=0.0 in the TransformerConfig")
        causal = self._mask_is_causal(attn_mask_type)
        np_ = query.shape[-2]
        if np_ != self.num_heads:
            raise ValueError(f"query has {np_} heads, this rank's share of the layer is "
                             f"{self.num_heads}")
        layout = self.layout if self.layout is not None else dense_layout(np_)
        thd = packed_seq_params is not None and getattr(packed_seq_params, "qkv_format",
                                                        None) == "thd"
        if thd:
            q, k, v = (t.squeeze(1) if t.dim() == 4 else t for t in (query, key, value))
            p = packed_seq_params
            # padded offsets keep each sequence's tokens in place; its pad tokens come after
            # them, so under causal attention no real token reads one
            cu_q = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
            cu_k = (p.cu_seqlens_kv_padded if p.cu_seqlens_kv_padded is not None
                    else p.cu_seqlens_kv)
            if not causal and (p.cu_seqlens_q_padded is not None
                               or p.cu_seqlens_kv_padded is not None):
                raise ValueError("S2DotProductAttention: padded packed sequences need causal "
                                 "attention (no_mask would read the pad tokens)")
            max_q = p.max_seqlen_q if p.max_seqlen_q is not None else int(cu_q.diff().max())
            max_k = p.max_seqlen_kv if p.max_seqlen_kv is not None else int(cu_k.diff().max())
            out = sparse_attention_varlen(q, k, v, layout, cu_q.to(torch.int32),
                                          cu_k.to(torch.int32), int(max_q), int(max_k),
                                          causal=causal, sm_scale=self._scale(q))
            return out.reshape(out.shape[0], -1)
        if packed_seq_params is not None:
            raise ValueError(f"S2DotProductAttention: packed sequences must use qkv_format 'thd', "
                             f"got {packed_seq_params.qkv_format!r}")
        if query.dim() != 4:
            raise ValueError(f"query must be [sq, b, heads, head_dim], got shape "
                             f"{tuple(query.shape)}")
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, h, d] views
        out = sparse_attention(q, k, v, layout, causal=causal, sm_scale=self._scale(q))
        sq, b = query.shape[0], query.shape[1]
        return out.transpose(0, 1).reshape(sq, b, -1)

    def _scale(self, q):
        # apply_query_key_layer_scaling divides the scores by the layer number and the fp32
        # softmax multiplies them back: the effective scale is this one either way
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(
            q.shape[-1])


def s2_layer_spec(layouts, base_spec=None):
    """A copy of a Megatron-core transformer layer spec (default: ``get_gpt_layer_local_spec()``)
    whose self-attention's core attention is :class:`S2DotProductAttention` with ``layouts``
    (see :func:`layout_for_layer`)."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    if base_spec is None:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        base_spec = get_gpt_layer_local_spec()
    spec = copy.deepcopy(base_spec)
    attn = getattr(getattr(spec, "submodules", None), "self_attention", None)
    sub = getattr(attn, "submodules", None)
    if sub is None or not hasattr(sub, "core_attention"):
        raise ValueError("base_spec has no self_attention.submodules.core_attention to replace")
    sub.core_attention = ModuleSpec(module=S2DotProductAttention, params={"layouts": layouts})
    return spec
