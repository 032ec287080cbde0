"""S2 attention in a transformers model on a GPU (the Triton kernels): generate with S2Cache
(head-sharded KVCache, the decode kernel's paged per-head path) against generate with
transformers' own cache, and both against the float64 reference's logits."""
import pytest
import torch

import starshard as ss
from starshard.integrations import hf
from starshard.star.testing import tiny_llama

pytestmark = pytest.mark.gpu


def test_s2_cache_generate_on_the_gpu():
    layouts = [ss.local_stride(8, 64, 4, 4, num_kv_heads=2), None,
               ss.local_stride(8, 32, 2, 8, num_kv_heads=2)]
    model = tiny_llama(0, layers=3, hidden=512, heads=8, kv_heads=2, vocab=257).cuda()
    hf.use_s2_attention(model, layouts)
    ids = torch.randint(0, 257, (2, 3000), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    cache = hf.S2Cache(model, batch=2, capacity=3024)
    with torch.no_grad():
        base = model.generate(ids, **kw)
        got = model.generate(ids, past_key_values=cache, **kw)
        # the last step's logits by a full recompute on the CPU path (float32 torch backend)
        cpu = hf.use_s2_attention(tiny_llama(0, layers=3, hidden=512, heads=8, kv_heads=2,
                                             vocab=257), layouts)
        want = cpu(got.sequences[:, :-1].cpu()).logits[:, -1]
    assert cache.nbytes() < 0.7 * cache.dense_nbytes()
    assert torch.equal(got.sequences, base.sequences)
    for a, b in zip(got.logits, base.logits):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    torch.testing.assert_close(got.logits[-1].cpu(), want, atol=1e-3, rtol=0)
