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
