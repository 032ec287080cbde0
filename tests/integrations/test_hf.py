"""S2 attention inside a transformers model (a tiny random Llama on the CPU), against the same
model running a float64 dense-masked reference of each layer's layout, and against itself
decoding with transformers' KV cache."""
import pytest
import torch

import starshard as ss
from starshard.integrations import hf
from starshard.ops.reference import reference_attention
from starshard.star.testing import tiny_llama

REF = "starshard_s2_reference"


def _reference_attention(module, query, key, value, attention_mask=None, scaling=None,
                         dropout=0.0, **kw):
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    layout = getattr(module, "starshard_layout", None) or hf.dense_layout(q.shape[2])
    out, _ = reference_attention(q, k, v, layout, sm_scale=scaling)
    return out.to(q.dtype), None


def _models(layouts, seed=0):
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(REF, _reference_attention)
    AttentionMaskInterface.register(REF, lambda *a, **k: None)
    fast = hf.use_s2_attention(tiny_llama(seed, layers=3, heads=4, kv_heads=2), layouts)
    ref = hf.use_s2_attention(tiny_llama(seed, layers=3, heads=4, kv_heads=2), layouts)
    ref.set_attn_implementation(REF)
    return fast, ref


LAYOUTS = [ss.local_stride(4, 16, 2, 3, num_kv_heads=2), None,
           ss.local_stride(4, 32, 1, 2, head_offset=1)]   # sparse, dense, sparse


def test_prefill_logits_match_the_reference_per_layer_layouts():
    fast, ref = _models(LAYOUTS)
    ids = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = fast(ids).logits
        b = ref(ids).logits
    torch.testing.assert_close(a, b, atol=2e-4, rtol=0)
    # the sparse layers really are sparse: dense attention everywhere gives other logits
    dense = hf.use_s2_attention(tiny_llama(0, layers=3, heads=4, kv_heads=2), None)
    with torch.no_grad():
        c = dense(ids).logits
    assert (a - c).abs().max() > 1e-3


def test_decoding_with_the_kv_cache_matches_full_recompute():
    """Greedy generation with transformers' cache (prefill, then one token a step over the
    cached keys) gives the logits of running the whole sequence again at each step."""
    fast, _ = _models(LAYOUTS)
    ids = torch.randint(0, 97, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                            do_sample=False, output_logits=True, return_dict_in_generate=True,
                            pad_token_id=0)
        seq = out.sequences
        for i, step_logits in enumerate(out.logits):
            full = fast(seq[:, :70 + i]).logits[:, -1]
            torch.testing.assert_close(step_logits, full, atol=2e-4, rtol=0)


@pytest.mark.parametrize("head_sharded", [True, False])
def test_s2_cache_generates_what_the_transformers_cache_does(head_sharded):
    """generate with an S2Cache (each layer's K/V in a starshard.KVCache: prompt loaded by fill,
    then one token a step appended and attended there) gives the tokens and logits of generate
    with transformers' own cache; head-sharded, the sparse layers keep fewer bytes."""
    fast, _ = _models(LAYOUTS)
    ids = torch.randint(0, 97, (2, 300), generator=torch.Generator().manual_seed(3))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    cache = hf.S2Cache(fast, batch=2, capacity=310, head_sharded=head_sharded)
    with torch.no_grad():
        base = fast.generate(ids, **kw)
        got = fast.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(got.sequences, base.sequences)
    for a, b in zip(got.logits, base.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 309
    for layer in cache.layers:   # the K/V really went through the KVCaches
        assert layer.kv.seqlens.tolist() == [309, 309]
    sharded = [layer.kv.block_table is not None for layer in cache.layers]
    assert sharded == ([True, False, True] if head_sharded else [False] * 3)
    if head_sharded:
        assert cache.nbytes() < 0.85 * cache.dense_nbytes()
    cache.reset()
    assert cache.get_seq_length() == 0


def test_s2_cache_takes_several_tokens_a_step():
    """With max_query_len=4 a step may bring up to 4 tokens (speculative or chunked decoding):
    the logits of prompt + a 3-token step + a 1-token step equal one forward over all."""
    fast, _ = _models(LAYOUTS)
    ids = torch.randint(0, 97, (2, 204), generator=torch.Generator().manual_seed(4))
    cache = hf.S2Cache(fast, batch=2, capacity=204, max_query_len=4)
    with torch.no_grad():
        full = fast(ids).logits
        parts = [fast(ids[:, :200], past_key_values=cache).logits,
                 fast(ids[:, 200:203], past_key_values=cache).logits,
                 fast(ids[:, 203:], past_key_values=cache).logits]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=0)
    assert cache.get_seq_length() == 204


def test_s2_cache_bad_use():
    fast, _ = _models(LAYOUTS)
    with pytest.raises(ValueError, match="use_s2_attention"):
        hf.S2Cache(tiny_llama(0, layers=2, heads=4, kv_heads=2), batch=1, capacity=64)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        with pytest.raises(ValueError, match="made for batch 1, the model got 2"):
            fast(ids, past_key_values=hf.S2Cache(fast, batch=1, capacity=64))
        with pytest.raises(ValueError, match="holds 32 tokens a sequence; 0 held"):
            fast(ids, past_key_values=hf.S2Cache(fast, batch=2, capacity=32))
        cache = hf.S2Cache(fast, batch=2, capacity=64)
        fast(ids, past_key_values=cache)
        with pytest.raises(ValueError, match="then at most 1 tokens a step"):
            fast(ids[:, :3], past_key_values=cache)
        with pytest.raises(NotImplementedError, match="beam search"):
            cache.reorder_cache(torch.tensor([1, 0]))


def test_bad_use():
    model = tiny_llama(0, layers=2, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="layouts has 3 entries, the model has 2 layers"):
        hf.use_s2_attention(model, [None] * 3)
    with pytest.raises(ValueError, match="layer 1 has 8 query heads, the model has 4"):
        hf.use_s2_attention(model, [None, ss.local_stride(8, 16, 1, 2)])
    with pytest.raises(TypeError, match="layer 0 must be a starshard.BlockLayout or None"):
        hf.use_s2_attention(model, lambda i: "dense")
    with pytest.raises(ValueError, match="no attention modules"):
        hf.use_s2_attention(torch.nn.Linear(2, 2), None)
    hf.use_s2_attention(model, ss.local_stride(4, 16, 1, 2))
    ids = torch.randint(0, 97, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    with pytest.raises(ValueError, match="unpadded batches only"):
        with torch.no_grad():
            model(ids, attention_mask=mask)
    with torch.no_grad():   # a mask without padding is fine
        model(ids, attention_mask=torch.ones_like(mask))
    model.model.layers[1].self_attn.is_causal = False
    with pytest.raises(ValueError, match=r"is causal; LlamaAttention \(layer 1\) is not"):
        with torch.no_grad():
            model(ids)
