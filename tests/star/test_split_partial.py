"""The decode path's split-KV partial (keys cut into batched chunks, then merged) against the
plain softmax partial: same output and log-sum-exp."""
import pytest
import torch

from starshard.star import attention


@pytest.mark.parametrize("n,chunk", [(300, 64), (256, 64), (130, 64)])
def test_split_partial_equals_plain_softmax(monkeypatch, n, chunk):
    monkeypatch.setattr(attention, "_SPLIT_CHUNK", chunk)
    g = torch.Generator().manual_seed(n)
    q = torch.randn(2, 3, 4, 16, generator=g)
    # keys as the engine stores them: a [B, H, N, D] buffer seen as [B, N, H, D]
    k = torch.randn(2, 2, n, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 2, n, 16, generator=g).transpose(1, 2)
    out, lse = attention._split_partial(q, k, v, 0.25)
    ref_out, ref_lse = attention._direct_partial(q.double(), k.double(), v.double(), 0.25,
                                                 False, 0, 0)
    assert out.shape == q.shape and lse.shape == (2, 4, 3)
    torch.testing.assert_close(out.double(), ref_out.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=0)


def _softmax_partial(q, k, v, scale, causal):
    """float64 reference: out [B, Nq, H, D] and lse [B, H, Nq], K/V heads repeated for GQA."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        nq, nk = q.shape[1], k.shape[1]
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v), lse


@pytest.mark.skipif(attention._CPU_FLASH is None, reason="this torch has no fused CPU attention")
@pytest.mark.parametrize("nq,nk,h,hkv,causal", [(1, 200, 6, 2, False), (5, 77, 6, 3, False),
                                                 (9, 9, 6, 2, True), (40, 40, 4, 4, True),
                                                 (3, 50, 4, 4, False)])
def test_cpu_flash_partial_matches_softmax(nq, nk, h, hkv, causal):
    g = torch.Generator().manual_seed(nq * 1000 + nk)
    q = torch.randn(2, nq, h, 32, generator=g)
    k = torch.randn(2, hkv, nk, 32, generator=g).transpose(1, 2)
    v = torch.randn(2, hkv, nk, 32, generator=g).transpose(1, 2)
    out, lse = attention._cpu_flash_partial(q, k, v, 0.2, causal)
    ref_out, ref_lse = _softmax_partial(q, k, v, 0.2, causal)
    assert out.shape == q.shape and lse.shape == (2, h, nq)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)
