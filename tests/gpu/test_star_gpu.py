"""Star engine on a CUDA GPU (``pytest -m gpu``): bf16 through the Triton kernels."""
import pytest
import torch

from starshard.star import StarEngine
from starshard.star.testing import tiny_llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _logits(eng, ctx, q):
    eng.encode(ctx)
    return eng.generate(q, 2, return_logits=True).logits[0]


def test_ring_and_one_block_star_equal_dense_in_bf16():
    model = tiny_llama(0, layers=2, hidden=256, heads=4, kv_heads=2).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 97, (1500,), generator=g)
    q = torch.randint(0, 97, (9,), generator=g)
    dense = _logits(StarEngine(model, method="dense"), ctx, q)
    # DESIGN's bf16 "exact": within twice the gap between two dense runs chunked differently
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        stock = model(torch.cat([ctx, q])[None].cuda(), use_cache=False).logits[0, -1].float().cpu()
    gap = (dense - stock).abs().max().item()
    ring = _logits(StarEngine(model, method="ring", simulate=3), ctx, q)
    star1 = _logits(StarEngine(model, method="star", block_size=1500), ctx, q)
    assert (ring - dense).abs().max().item() <= 2 * gap + 1e-3
    assert (star1 - dense).abs().max().item() <= 2 * gap + 1e-3
    star4 = _logits(StarEngine(model, method="star", block_size=375, simulate=4), ctx, q)
    assert torch.isfinite(star4).all()
