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


def test_decode_over_a_long_segment_splits_the_keys(monkeypatch):
    """17000 context tokens: the query step's partial over the context runs the forward with its
    keys split over several programs (split-K); its logits match the unsplit kernel's within
    bf16 noise."""
    from starshard.ops import triton_launch
    model = tiny_llama(1, layers=2, hidden=256, heads=4, kv_heads=2, max_positions=32768)
    model = model.to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(0, 97, (17000,), generator=g)
    q = torch.randint(0, 97, (5,), generator=g)
    splits = []
    pick = triton_launch._fwd_splits
    monkeypatch.setattr(triton_launch, "_fwd_splits", lambda *a: splits.append(pick(*a)) or splits[-1])
    fast = _logits(StarEngine(model, method="dense"), ctx, q)
    assert max(splits) > 1, "no forward call split its keys"
    with triton_launch.kernel_config(fwd_splits=1):
        plain = _logits(StarEngine(model, method="dense"), ctx, q)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        stock = model(torch.cat([ctx, q])[None].cuda(), use_cache=False).logits[0, -1].float().cpu()
    gap = (plain - stock).abs().max().item()
    assert (fast - plain).abs().max().item() <= 2 * gap + 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_ring_and_star_on_two_gpus():
    """One process per GPU over NCCL: ring's logits and tokens equal dense's (fp32); star runs
    and both ranks agree."""
    from starshard.star.launch import run_local
    from starshard.star.testing import host_generate
    g = torch.Generator().manual_seed(3)
    spec = dict(seed=3, context=torch.randint(0, 97, (701,), generator=g).tolist(),
                queries=[torch.randint(0, 97, (7,), generator=g).tolist()], max_new_tokens=4,
                device="cuda")
    dense = run_local(host_generate, 1, (dict(spec, method="dense"),), backend="nccl")[0]
    ring = run_local(host_generate, 2, (dict(spec, method="ring"),), backend="nccl")
    star = run_local(host_generate, 2, (dict(spec, method="star", block_size=256),), backend="nccl")
    d_tokens, d_logits, _ = dense["answers"][0]
    for r in ring:
        tokens, logits, _ = r["answers"][0]
        assert tokens == d_tokens
        assert (logits.cpu() - d_logits.cpu()).abs().max().item() < 1e-3
    assert star[0]["answers"][0][0] == star[1]["answers"][0][0]
    assert len(star[0]["answers"][0][0]) == 4
