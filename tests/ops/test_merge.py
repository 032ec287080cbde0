"""merge_attention: partials over disjoint key sets merge into the full attention, stably."""
import pytest
import torch

from starshard.layouts import BlockLayout, local_stride
from starshard.ops.merge import merge_attention
from starshard.ops.reference import reference_attention
from starshard.ops.torch_blockwise import blockwise_attention


def rand_qkv(B, nq, nk, hq, hkv, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, nq, hq, d, generator=g, dtype=dtype),
            torch.randn(B, nk, hkv, d, generator=g, dtype=dtype),
            torch.randn(B, nk, hkv, d, generator=g, dtype=dtype))


def naive_merge(outs, lses):
    """float64 logsumexp merge (the textbook formula; fine for finite, moderate lses)."""
    lse = torch.logsumexp(torch.stack([l.double() for l in lses]), 0)
    out = sum(torch.exp(l.double() - lse).transpose(-1, -2).unsqueeze(-1) * o.double()
              for o, l in zip(outs, lses))
    return out, lse


@pytest.mark.parametrize("cuts", [[37], [16, 50], [1, 2, 64, 65], [0, 80]])
@pytest.mark.parametrize("causal", [True, False])
def test_split_keys_by_k_start(cuts, causal):
    """Attention over keys [0, N) == merge of attention over key slices placed with k_start."""
    layout = local_stride(4, 16, 2, 3, num_kv_heads=2, causal=causal)
    nq, nk = 30, 80
    q, k, v = rand_qkv(2, nq, nk, 4, 2, 8, seed=len(cuts))
    q_start = nk - nq
    full, full_lse = reference_attention(q, k, v, layout, causal=causal)
    bounds = [0] + cuts + [nk]
    outs, lses = [], []
    for a, b in zip(bounds, bounds[1:]):
        o, l = reference_attention(q, k[:, a:b], v[:, a:b], layout, causal=causal, q_start=q_start, k_start=a)
        outs.append(o)
        lses.append(l)
    out, lse = merge_attention(outs, lses)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(full_lse))
    torch.testing.assert_close(lse, full_lse, rtol=1e-12, atol=1e-12)


def test_split_by_complementary_masks():
    """Disjoint per-head block patterns A, B: merge(attn_A, attn_B) == attn_{A or B}."""
    bs, nb, H = 16, 6, 3
    g = torch.Generator().manual_seed(1)
    union = torch.rand(H, nb, nb, generator=g) < 0.7
    part = torch.rand(H, nb, nb, generator=g) < 0.5
    la, lb, lu = (BlockLayout.from_mask(m, bs) for m in (union & part, union & ~part, union))
    q, k, v = rand_qkv(1, 90, 90, H, 1, 8, dtype=torch.float32, seed=2)
    oa, la_ = blockwise_attention(q, k, v, la)
    ob, lb_ = blockwise_attention(q, k, v, lb)
    ref, ref_lse = reference_attention(q, k, v, lu)
    out, lse = merge_attention([oa, ob], [la_, lb_])
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert torch.isneginf(la_).any() and torch.isneginf(lb_).any()     # both sides have empty rows
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], rtol=2e-5, atol=2e-5)
    # a merge that ignored the weights would be wrong: check the test can fail
    assert (0.5 * (oa + ob) - ref.float()).abs().max() > 1e-2


def test_varlen_shapes():
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(13, 4, 8, generator=g) for _ in range(3)]
    lses = [torch.randn(4, 13, generator=g) for _ in range(3)]
    out, lse = merge_attention(outs, lses)
    want, want_lse = naive_merge(outs, lses)
    assert out.shape == (13, 4, 8) and lse.shape == (4, 13)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
def test_extreme_lse(scale):
    g = torch.Generator().manual_seed(3)
    outs = [torch.randn(2, 5, 3, 4, generator=g) for _ in range(3)]
    lses = [torch.randn(2, 3, 5, generator=g) * scale for _ in range(3)]
    lses[1][0, 0, 0] = lses[0][0, 0, 0]          # a tie
    lses[2][1] = 1e4
    lses[0][1] = -1e4
    out, lse = merge_attention(outs, lses)
    want, want_lse = naive_merge(outs, lses)     # float64 logsumexp is exact enough here
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6 * scale)


def test_neg_inf_rows_forward_and_backward():
    g = torch.Generator().manual_seed(4)
    o1 = torch.randn(1, 6, 2, 3, generator=g, dtype=torch.float64)
    o2 = torch.randn(1, 6, 2, 3, generator=g, dtype=torch.float64)
    l1 = torch.randn(1, 2, 6, generator=g, dtype=torch.float64)
    l2 = torch.randn(1, 2, 6, generator=g, dtype=torch.float64)
    ninf = float("-inf")
    l1[0, :, 0] = ninf                               # only the second partial has keys
    l2[0, :, 1] = ninf                               # only the first
    l1[0, :, 2] = ninf
    l2[0, :, 2] = ninf                               # neither: out 0, lse -inf
    o1[0, 0] = 0.0
    o2[0, 1] = 0.0
    o1[0, 2] = 0.0
    o2[0, 2] = 0.0
    leaves = [t.clone().requires_grad_(True) for t in (o1, o2, l1, l2)]
    out, lse = merge_attention(leaves[:2], leaves[2:])
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out[0, 0], o2[0, 0], rtol=0, atol=0)
    torch.testing.assert_close(lse[0, :, 0], l2[0, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[0, 1], o1[0, 1], rtol=0, atol=0)
    torch.testing.assert_close(lse[0, :, 1], l1[0, :, 1], rtol=0, atol=0)
    assert (out[0, 2] == 0).all() and torch.isneginf(lse[0, :, 2]).all()
    fin = torch.isfinite(lse)
    w = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() + \
        (torch.where(fin, lse, 0.0) * w).sum()
    loss.backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    # an upstream gradient on a -inf lse must not turn into NaN either
    leaves2 = [t.detach().clone().requires_grad_(True) for t in (o1, o2, l1, l2)]
    out, lse = merge_attention(leaves2[:2], leaves2[2:])
    (out.sum() + lse.sum()).backward()
    for t in leaves2:
        assert not t.grad.isnan().any()
    # through three partials where the first two are both empty on a row
    l3 = torch.randn(1, 2, 6, generator=g, dtype=torch.float64)
    out, lse = merge_attention([o1, o2, o2], [l1, l2, l3])
    torch.testing.assert_close(out[0, 2], o2[0, 2], rtol=0, atol=0)
    torch.testing.assert_close(lse[0, :, 2], l3[0, :, 2], rtol=0, atol=0)


def test_gradients_match_float64_reference():
    g = torch.Generator().manual_seed(5)
    outs = [torch.randn(2, 7, 3, 4, generator=g) for _ in range(3)]
    lses = [torch.randn(2, 3, 7, generator=g) * 3 for _ in range(3)]
    lses[1][0, 1, 2] = lses[0][0, 1, 2]          # tie: the gradient must split evenly
    wo = torch.randn(2, 7, 3, 4, generator=g, dtype=torch.float64)
    wl = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    grads = []
    for fn, dt in ((merge_attention, torch.float32), (naive_merge, torch.float64)):
        leaves = [t.detach().to(dt).clone().requires_grad_(True) for t in outs + lses]
        out, lse = fn(leaves[:3], leaves[3:])
        ((out.double() * wo).sum() + (lse.double() * wl).sum()).backward()
        grads.append([t.grad.double() for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert b.abs().max() > 1e-2


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(6)
    args = [torch.randn(1, 4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)] + \
        [torch.randn(1, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    fn = lambda a, b, c, d: merge_attention([a, b], [c, d])   # noqa: E731
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs(dtype):
    g = torch.Generator().manual_seed(7)
    outs = [torch.randn(1, 9, 2, 16, generator=g).to(dtype) for _ in range(2)]
    lses = [torch.randn(1, 2, 9, generator=g) for _ in range(2)]
    out, lse = merge_attention(outs, lses)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want, want_lse = naive_merge(outs, lses)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)


def test_single_partial_is_identity():
    o = torch.randn(1, 3, 2, 4)
    l = torch.randn(1, 2, 3)
    out, lse = merge_attention([o], [l])
    assert torch.equal(out, o) and torch.equal(lse, l)


def test_errors():
    o = torch.randn(1, 3, 2, 4)
    l = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="empty"):
        merge_attention([], [])
    with pytest.raises(ValueError, match="same length"):
        merge_attention([o, o], [l])
    with pytest.raises(TypeError, match="list"):
        merge_attention(o, l)
    with pytest.raises(ValueError, match="lses\\[0\\]"):
        merge_attention([o], [l.transpose(-1, -2)])
    with pytest.raises(ValueError, match="outs\\[1\\]"):
        merge_attention([o, torch.randn(1, 3, 2, 5)], [l, l])
    with pytest.raises(TypeError, match="dtype"):
        merge_attention([o, o.double()], [l, l])
    with pytest.raises(TypeError, match="dtype"):
        merge_attention([o, o], [l, l.double()])
    with pytest.raises(TypeError, match="floating"):
        merge_attention([o, o], [l, l.long()])
    with pytest.raises(TypeError, match="Tensor"):
        merge_attention([o, None], [l, l])
