"""S2 attention as a Megatron-core model's core attention, against the float64 dense-masked
reference of each layout: the core-attention module alone (causal, no_mask, decoding, packed
sequences, tensor-parallel shards) and a whole GPTModel on the CPU (logits and gradients)."""
import types

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

import starshard as ss
from starshard.integrations.megatron import S2DotProductAttention, layout_for_layer, s2_layer_spec
from starshard.ops.reference import reference_attention, reference_attention_varlen

SPARSE = ss.local_stride(8, 16, 2, 3, num_kv_heads=4)


class _Group:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def _module(layouts=SPARSE, *, rank=0, tp=1, mask=AttnMaskType.causal, layer=1, **cfg):
    kw = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
              attention_dropout=0.0)
    kw.update(cfg)
    config = TransformerConfig(**kw)
    return S2DotProductAttention(config, layer, mask, "self",
                                 pg_collection=types.SimpleNamespace(tp=_Group(rank, tp)),
                                 layouts=layouts)


def _qkv(sq, sk, b=2, hq=8, hkv=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, b, hq, d, generator=g), torch.randn(sk, b, hkv, d, generator=g),
            torch.randn(sk, b, hkv, d, generator=g))


def _ref(q, k, v, layout, causal=True):
    """Reference in Megatron's layout: [s, b, h, d] in, [sq, b, h * d] out."""
    out, _ = reference_attention(*(t.transpose(0, 1) for t in (q, k, v)), layout, causal=causal)
    return out.transpose(0, 1).reshape(q.shape[0], q.shape[1], -1).float()


@pytest.mark.parametrize("layout", [SPARSE, ss.local_stride(8, 32, 1, 2, head_offset=1), None])
def test_causal_core_attention_matches_the_reference(layout):
    q, k, v = _qkv(150, 150)
    out = _module(layout)(q, k, v, None)
    assert out.shape == (150, 2, 8 * 16)
    want = _ref(q, k, v, layout or ss.local_stride(8, 64, 1, 1))
    torch.testing.assert_close(out, want, atol=2e-5, rtol=0)
    if layout is not None:  # the layout really is sparse here: dense attention differs
        assert (out - _ref(q, k, v, ss.local_stride(8, 64, 1, 1))).abs().max() > 1e-2


def test_no_mask_is_bidirectional():
    layout = ss.local_stride(8, 16, 1, 3, causal=False, num_kv_heads=4)
    q, k, v = _qkv(90, 90, seed=1)
    out = _module(layout, mask=AttnMaskType.no_mask)(q, k, v, None)
    torch.testing.assert_close(out, _ref(q, k, v, layout, causal=False), atol=2e-5, rtol=0)
    assert (out - _ref(q, k, v, layout, causal=True)).abs().max() > 1e-2


@pytest.mark.parametrize("sq", [90, 5])
def test_no_mask_keeps_a_causal_layout_causal(sq):
    """Megatron's static KV-cache decoding switches to no_mask after the prompt: a layer whose
    layout is causal still attends causally (a dense layer, like Megatron's, does not)."""
    q, k, v = _qkv(sq, 90, seed=6)
    out = _module(SPARSE, mask=AttnMaskType.no_mask)(q, k, v, None)
    torch.testing.assert_close(out, _ref(q, k, v, SPARSE), atol=2e-5, rtol=0)
    dense = ss.local_stride(8, 64, 1, 1)
    out = _module(None, mask=AttnMaskType.no_mask)(q, k, v, None)
    torch.testing.assert_close(out, _ref(q, k, v, dense, causal=False), atol=2e-5, rtol=0)


def test_decoding_queries_are_the_newest_keys():
    """Megatron's static KV-cache inference passes the whole cache as keys and the new tokens as
    queries: they sit at the end of the keys."""
    q, k, v = _qkv(3, 133, seed=2)
    out = _module(SPARSE)(q, k, v, None)
    torch.testing.assert_close(out, _ref(q, k, v, SPARSE), atol=2e-5, rtol=0)


def test_tensor_parallel_ranks_attend_their_heads():
    """Each of 2 ranks holds 4 query heads and 2 KV heads; their outputs side by side are the
    whole layer's (the layout is written for the 8 global heads)."""
    q, k, v = _qkv(100, 100, seed=3)
    parts = []
    for r in range(2):
        mod = _module(SPARSE, rank=r, tp=2)
        assert mod.layout.num_heads == 4
        parts.append(mod(q[:, :, 4 * r:4 * r + 4], k[:, :, 2 * r:2 * r + 2],
                         v[:, :, 2 * r:2 * r + 2], None).view(100, 2, 4, 16))
    torch.testing.assert_close(torch.cat(parts, 2).reshape(100, 2, -1), _ref(q, k, v, SPARSE),
                               atol=2e-5, rtol=0)


def test_tensor_parallel_over_more_ranks_than_kv_heads():
    """8 query heads, 2 KV heads, 4 ranks: Megatron gives each rank 2 query heads and a copy
    of their KV head; each rank's share of the layout is its heads' rows."""
    layout = ss.local_stride(8, 16, 1, 4, num_kv_heads=2)
    q, k, v = _qkv(80, 80, hkv=2, seed=5)
    parts = [_module(layout, rank=r, tp=4, num_query_groups=2)(
        q[:, :, 2 * r:2 * r + 2], k[:, :, r // 2:r // 2 + 1], v[:, :, r // 2:r // 2 + 1],
        None).view(80, 2, 2, 16) for r in range(4)]
    torch.testing.assert_close(torch.cat(parts, 2).reshape(80, 2, -1), _ref(q, k, v, layout),
                               atol=2e-5, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_packed_sequences(padded):
    lens = [37, 63, 29]
    cu = torch.tensor([0, 37, 100, 129], dtype=torch.int32)
    cu_pad = torch.tensor([0, 40, 104, 136], dtype=torch.int32)  # each sequence padded after it
    starts = (cu_pad if padded else cu)[:-1].tolist()
    total = int((cu_pad if padded else cu)[-1])
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(total, 1, h, 16, generator=g) for h in (8, 4, 4))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=cu_pad if padded else None,
                             cu_seqlens_kv_padded=cu_pad if padded else None,
                             max_seqlen_q=64, max_seqlen_kv=64)
    out = _module(SPARSE)(q, k, v, None, packed_seq_params=params)
    assert out.shape == (total, 8 * 16)
    real = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)])
    want, _ = reference_attention_varlen(q[real, 0], k[real, 0], v[real, 0], SPARSE, cu, cu)
    torch.testing.assert_close(out[real], want.reshape(len(real), -1).float(), atol=2e-5, rtol=0)


def test_layout_for_layer_forms():
    a, b = SPARSE, ss.local_stride(8, 16, 1, 2)
    assert layout_for_layer(a, 3) is a and layout_for_layer(None, 1) is None
    assert layout_for_layer([a, None, b], 3) is b and layout_for_layer([a, None, b], 2) is None
    assert layout_for_layer({2: b}, 2) is b and layout_for_layer({2: b}, 1) is None
    assert layout_for_layer(lambda n: a if n % 2 else None, 1) is a
    with pytest.raises(ValueError, match="layouts has 3 entries"):
        layout_for_layer([a, None, b], 4)
    with pytest.raises(TypeError, match="layout of layer 1 must be a starshard.BlockLayout"):
        layout_for_layer(["dense"], 1)


def test_bad_use_gives_clear_errors():
    q, k, v = _qkv(32, 32)
    with pytest.raises(NotImplementedError, match="attention_dropout=0.0"):
        _module(attention_dropout=0.1).train()(q, k, v, None)
    _module(attention_dropout=0.1).eval()(q, k, v, None)  # inference: dropout is off anyway
    with pytest.raises(ValueError, match="'padding'"):
        _module(mask=AttnMaskType.padding)(q, k, v, torch.zeros(2, 1, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="'arbitrary'"):
        _module()(q, k, v, None, attn_mask_type=AttnMaskType.arbitrary)
    with pytest.raises(NotImplementedError, match="attention bias"):
        _module()(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="has 4 query heads, the model has 8"):
        _module(ss.local_stride(4, 16, 1, 2))
    with pytest.raises(ValueError, match="window_size"):
        _module(window_size=(64, 0))
    with pytest.raises(ValueError, match="query has 4 heads"):
        _module()(q[:, :, :4], k, v, None)
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size"):
        _module(rank=0, tp=3)
    with pytest.raises(ValueError, match="core_attention"):
        s2_layer_spec(SPARSE, base_spec=types.SimpleNamespace(submodules=None))


_GPT_SCRIPT = r"""
layouts = [ss.local_stride(4, 16, 1, 3, num_kv_heads=2), None]
cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0)
def model(spec):
    torch.manual_seed(0)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=97,
                    max_sequence_length=256, position_embedding_type="learned_absolute")
fast = model(smeg.s2_layer_spec(layouts))
ref_spec = smeg.s2_layer_spec(layouts)
ref_spec.submodules.self_attention.submodules.core_attention.module = Reference
ref = model(ref_spec)
ref.load_state_dict(fast.state_dict())
dense = model(smeg.s2_layer_spec(None))
dense.load_state_dict(fast.state_dict())
ids = torch.randint(0, 97, (2, 150), generator=torch.Generator().manual_seed(1))
pos = torch.arange(150).expand(2, -1)
outs = []
for m in (fast, ref, dense):
    logits = m(ids, pos, attention_mask=None)
    logits.float().square().mean().backward()
    outs.append((logits.detach(), m.decoder.layers[0].self_attention.linear_qkv.weight.grad))
(a, ga), (b, gb), (c, _) = outs
torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)
assert (a - c).abs().max() > 1e-3, "the sparse layer made no difference"
print("OK", float((a - b).abs().max()))
"""


def test_gpt_model_matches_the_reference_core_attention(megatron_script):
    """A 2-layer GPTModel (one S2 layer, one dense) with Megatron's own local layers on the CPU:
    logits and the first layer's QKV gradients equal those of the same model running the
    float64 reference as its core attention (a fresh process: Megatron's global state)."""
    res = megatron_script(_GPT_SCRIPT)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
