"""The Star attention partials on the CPU (out and log-sum-exp of queries over one KV segment)
against a float64 softmax."""
import pytest
import torch

from starshard.star import attention


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


@pytest.mark.parametrize("nq,nk,q_start,k_start", [(1, 64, 63, 0), (6, 30, 24, 0), (4, 4, 10, 10)])
def test_direct_partial_matches_softmax(nq, nk, q_start, k_start):
    """The einsum partial (decode-sized CPU calls): GQA, causal at any query/key offsets."""
    g = torch.Generator().manual_seed(nq + nk)
    q = torch.randn(1, nq, 6, 16, generator=g)
    k = torch.randn(1, nk, 2, 16, generator=g)
    v = torch.randn(1, nk, 2, 16, generator=g)
    out, lse = attention._direct_partial(q, k, v, 0.3, True, q_start, k_start)
    kk, vv = (t.double().repeat_interleave(3, 2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * 0.3
    later = (torch.arange(nk) + k_start)[None, :] > (torch.arange(nq) + q_start)[:, None]
    s = s.masked_fill(later, float("-inf"))
    torch.testing.assert_close(out.double(), torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vv),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), s.logsumexp(-1), atol=1e-5, rtol=0)


class _StackComm:
    """Stands in for the hosts: all_gather_stacked returns the given per-host tensors, with this
    host's own (the argument) at ``rank``."""

    def __init__(self, others, rank):
        self.others, self.rank = others, rank

    def all_gather_stacked(self, t):
        rows = list(self.others)
        rows.insert(self.rank, t)
        return torch.stack(rows)


@pytest.mark.parametrize("shift", [(0.0, 0.0, 3.0, -2.0), (0.0, 0.0, 1e4, -1e4)])
def test_gathered_partials_merge_to_one_softmax(shift):
    """Partials of 4 hosts over disjoint keys (one host with no keys, rows with no key anywhere,
    per-host logit offsets up to +-1e4) merge to the float64 softmax over all keys, whether
    gathered from the hosts or merged in one process."""
    g = torch.Generator().manual_seed(3)
    b, n, h, d = 2, 3, 4, 16
    q = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    keys = [torch.randn(b, m, h, d, generator=g, dtype=torch.float64) for m in (5, 0, 7, 4)]
    vals = [torch.randn(b, m, h, d, generator=g, dtype=torch.float64) for m in (5, 0, 7, 4)]
    parts = []
    for k, v, c in zip(keys, vals, shift):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) + c
        s[:, :, 1] = float("-inf")         # query row 1 has no key on any host
        lse = torch.logsumexp(s, -1)
        p = torch.where(torch.isneginf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))
        parts.append((torch.einsum("bhqk,bkhd->bqhd", p.nan_to_num(0.0), v), lse))
    s_all = torch.cat([torch.einsum("bqhd,bkhd->bhqk", q, k) + c for k, c in zip(keys, shift)], -1)
    s_all[:, :, 1] = float("-inf")
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s_all, -1).nan_to_num(0.0), torch.cat(vals, 1))
    for rank in range(4):
        packed = [torch.cat([o.float().reshape(-1), l.float().reshape(-1)])
                  for i, (o, l) in enumerate(parts) if i != rank]
        o, l = parts[rank]
        out = attention._gather_merge(_StackComm(packed, rank), o.float(), l.float())
        assert not torch.isnan(out).any()
        assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
        assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    # the same partials merged locally (simulated hosts, anchor + block): out and lse
    out, lse = attention._merge([(o.float(), l.float()) for o, l in parts], q.float())
    ref_lse = torch.logsumexp(s_all, -1)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1])) and torch.isneginf(lse[:, :, 1]).all()
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    ok = torch.isfinite(ref_lse)
    assert torch.allclose(lse.double()[ok], ref_lse[ok], atol=1e-3, rtol=1e-6)
