"""The float64 reference is the truth: check it against a per-element Python loop and torch SDPA."""
import math

import pytest
import torch
import torch.nn.functional as F

from starshard.layouts import BlockLayout, local_stride
from starshard.ops.reference import (dense_token_mask, reference_attention,
                                     reference_attention_varlen)


# ---- an independent statement of DESIGN.md's rules ----------------------------------------------

def ls_rule(num_heads, local_blocks, vert_stride, *, causal=True, homo_head=False, num_dense_heads=0,
            head_offset=0, num_kv_heads=None, head_range=None):
    """Python predicate (h, i, j) -> bool for local_stride, written from DESIGN.md's text."""
    pattern_heads = num_kv_heads or num_heads
    group = num_heads // pattern_heads
    step = 0 if homo_head else max(1, vert_stride // pattern_heads)
    lo = head_range[0] if head_range else 0

    def rule(h, i, j):
        if i < 0 or j < 0 or (causal and j > i):
            return False
        g = (lo + h) // group
        if g >= pattern_heads - num_dense_heads:
            return True
        near = (i - j < local_blocks) if causal else (abs(i - j) < local_blocks)
        return near or (j + g * step + head_offset) % vert_stride == 0

    return rule


def mask_rule(mask):
    def rule(h, i, j):
        m = mask if mask.dim() == 2 else mask[h]
        return 0 <= i < m.shape[0] and 0 <= j < m.shape[1] and bool(m[i, j])
    return rule


def naive_attention(q, k, v, rule, bs, *, causal, q_start, k_start, scale):
    """Per-element Python loops over (b, h, t, s) in float64: out [B,Nq,Hq,D], lse [B,Hq,Nq]."""
    B, nq, hq, d = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    out = torch.zeros(B, nq, hq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, hq, nq), float("-inf"), dtype=torch.float64)
    ql, kl, vl = q.double().tolist(), k.double().tolist(), v.double().tolist()
    for b in range(B):
        for h in range(hq):
            for t in range(nq):
                p = q_start + t
                keys = []
                for s in range(nk):
                    pk = k_start + s
                    if p < 0 or (causal and pk > p) or not rule(h, p // bs, pk // bs):
                        continue
                    dot = sum(a * c for a, c in zip(ql[b][t][h], kl[b][s][h // group]))
                    keys.append((s, dot * scale))
                if not keys:
                    continue
                m = max(x for _, x in keys)
                z = sum(math.exp(x - m) for _, x in keys)
                lse[b, h, t] = m + math.log(z)
                for s, x in keys:
                    w = math.exp(x - m) / z
                    for e in range(v.shape[-1]):
                        out[b, t, h, e] += w * vl[b][s][h // group][e]
    return out, lse


def rand_qkv(B, nq, nk, hq, hkv, d, dtype=torch.float64, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nq, hq, d, generator=g, dtype=dtype)
    k = torch.randn(B, nk, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(B, nk, hkv, dv or d, generator=g, dtype=dtype)
    return q, k, v


LS_CASES = [
    # (layout kwargs, B, nq, nk, hq, hkv, q_start, k_start, causal)
    (dict(num_heads=2, local_blocks=1, vert_stride=2), 1, 40, 40, 2, 2, None, 0, True),
    (dict(num_heads=4, local_blocks=1, vert_stride=3, head_offset=1), 1, 37, 37, 4, 2, None, 0, True),
    (dict(num_heads=4, local_blocks=0, vert_stride=3), 1, 20, 45, 4, 4, None, 0, True),     # empty rows
    (dict(num_heads=4, local_blocks=2, vert_stride=2, num_kv_heads=2), 2, 23, 50, 4, 2, None, 3, True),
    (dict(num_heads=4, local_blocks=1, vert_stride=2, homo_head=True), 1, 30, 30, 4, 1, None, 0, False),
    (dict(num_heads=4, local_blocks=1, vert_stride=4, num_dense_heads=1), 1, 33, 33, 4, 4, 5, 2, True),
    (dict(num_heads=8, local_blocks=1, vert_stride=3, head_range=(2, 6)), 1, 35, 35, 4, 4, None, 0, True),
    (dict(num_heads=8, local_blocks=1, vert_stride=4, num_kv_heads=4, head_range=(4, 8)), 1, 33, 33, 4, 2,
     None, 0, True),
    (dict(num_heads=2, local_blocks=2, vert_stride=3, causal=False), 1, 34, 34, 2, 2, None, 0, False),
    (dict(num_heads=2, local_blocks=1, vert_stride=2), 1, 30, 12, 2, 1, None, 0, True),       # q_start < 0
    (dict(num_heads=2, local_blocks=1, vert_stride=2), 1, 20, 30, 2, 2, -7, 4, True),        # explicit q_start
]


@pytest.mark.parametrize("case", LS_CASES, ids=[str(i) for i in range(len(LS_CASES))])
def test_reference_matches_python_loops_local_stride(case):
    kw, B, nq, nk, hq, hkv, q_start, k_start, causal = case
    bs = 16
    kw = dict(kw)
    n, lb, vs = kw.pop("num_heads"), kw.pop("local_blocks"), kw.pop("vert_stride")
    layout = local_stride(n, bs, lb, vs, **kw)
    rule = ls_rule(n, lb, vs, **kw)
    q, k, v = rand_qkv(B, nq, nk, hq, hkv, 3, seed=nq)
    scale = 0.9
    out, lse = reference_attention(q, k, v, layout, causal=causal, sm_scale=scale, q_start=q_start,
                                   k_start=k_start)
    qs = k_start + nk - nq if q_start is None else q_start
    n_out, n_lse = naive_attention(q, k, v, rule, bs, causal=causal, q_start=qs, k_start=k_start, scale=scale)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert out.shape == (B, nq, hq, 3) and lse.shape == (B, hq, nq)
    torch.testing.assert_close(out, n_out, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(n_lse))
    torch.testing.assert_close(lse, n_lse, rtol=1e-12, atol=1e-12)
    assert not out.isnan().any()


def test_reference_rule_cases_are_not_trivial():
    # the cases above must exercise empty rows, negative positions and partially masked rows
    kw, B, nq, nk, hq, hkv, q_start, k_start, causal = LS_CASES[2]
    layout = local_stride(kw["num_heads"], 16, kw["local_blocks"], kw["vert_stride"])
    m = dense_token_mask(layout, nq, nk, hq, causal=True, q_start=None, k_start=0)
    assert (~m.any(-1)).any() and m.any(-1).any()
    kw, B, nq, nk, hq, hkv, q_start, k_start, causal = next(c for c in LS_CASES if c[2] == 30 and c[3] == 12)
    layout = local_stride(kw["num_heads"], 16, kw["local_blocks"], kw["vert_stride"])
    m = dense_token_mask(layout, nq, nk, hq, causal=True, q_start=None, k_start=0)
    assert not m[:, :18].any() and m[:, 18:].any(-1).all()


@pytest.mark.parametrize("shared", [False, True])
def test_reference_matches_python_loops_from_mask(shared):
    bs, nb, hq = 16, 3, 3
    g = torch.Generator().manual_seed(3)
    mask = torch.rand((nb, nb) if shared else (hq, nb, nb), generator=g) < 0.5
    layout = BlockLayout.from_mask(mask, bs)
    q, k, v = rand_qkv(2, 21, 44, hq, 1, 4, seed=5, dv=2)
    for causal in (True, False):
        out, lse = reference_attention(q, k, v, layout, causal=causal, k_start=2)
        n_out, n_lse = naive_attention(q, k, v, mask_rule(mask), bs, causal=causal, q_start=2 + 44 - 21,
                                       k_start=2, scale=1 / math.sqrt(4))
        torch.testing.assert_close(out, n_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, n_lse, rtol=1e-12, atol=1e-12)


def test_reference_from_mask_ignores_upper_triangle_when_causal():
    bs = 16
    full = torch.ones(3, 3, dtype=torch.bool)
    lower = torch.tril(full)
    q, k, v = rand_qkv(1, 40, 40, 2, 2, 8, seed=1)
    a = reference_attention(q, k, v, BlockLayout.from_mask(full, bs))
    b = reference_attention(q, k, v, BlockLayout.from_mask(lower, bs))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = reference_attention(q, k, v, BlockLayout.from_mask(full, bs), causal=False)
    assert not torch.allclose(a[0], c[0])


@pytest.mark.parametrize("nq,nk,q_start,hq,hkv", [(48, 48, None, 4, 4), (17, 50, None, 4, 2),
                                                  (30, 30, 10, 2, 1), (25, 40, None, 6, 3)])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_dense_layout_matches_sdpa(nq, nk, q_start, hq, hkv, causal):
    bs = 16
    layout = local_stride(hq, bs, 1, 1, causal=causal)      # vert_stride 1: every block, i.e. dense
    q, k, v = rand_qkv(2, nq, nk, hq, hkv, 8, seed=nq + nk)
    out, lse = reference_attention(q, k, v, layout, causal=causal, q_start=q_start)
    qs = nk - nq if q_start is None else q_start
    qpos = qs + torch.arange(nq)
    kpos = torch.arange(nk)
    allowed = (qpos.view(-1, 1) >= 0) & torch.ones(nq, nk, dtype=torch.bool)
    if causal:
        allowed &= kpos.view(1, -1) <= qpos.view(-1, 1)
    group = hq // hkv
    kk = k.repeat_interleave(group, 2).transpose(1, 2)
    vv = v.repeat_interleave(group, 2).transpose(1, 2)
    rows = allowed.any(-1)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=allowed | ~rows.view(-1, 1))
    want = want.transpose(1, 2) * rows.view(1, -1, 1, 1)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    scores = q.transpose(1, 2) @ kk.transpose(-1, -2) / math.sqrt(8)
    want_lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


def test_reference_dtype_and_scale():
    layout = local_stride(2, 16, 2, 2)
    q, k, v = rand_qkv(1, 20, 20, 2, 2, 8, dtype=torch.float32, seed=2)
    o32, l32 = reference_attention(q, k, v, layout, dtype=torch.float32)
    o64, l64 = reference_attention(q, k, v, layout)
    assert o32.dtype == torch.float32 and l32.dtype == torch.float32 and o64.dtype == torch.float64
    torch.testing.assert_close(o32.double(), o64, rtol=1e-5, atol=1e-5)
    o2, _ = reference_attention(q, k, v, layout, sm_scale=0.01)
    assert (o2 - o64).abs().max() > 1e-3


def test_reference_empty_rows_and_gradients_finite():
    layout = local_stride(2, 16, 0, 4)       # strided-only: many queries see no key
    q, k, v = rand_qkv(1, 50, 50, 2, 2, 4, seed=4)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    out, lse = reference_attention(q, k, v, layout)
    empty = torch.isneginf(lse)
    assert empty.any() and (~empty).any()
    assert (out.transpose(1, 2)[empty] == 0).all()
    w = torch.randn_like(lse)
    loss = out.square().sum() + (torch.where(empty, 0.0, lse) * w).sum() + lse[~empty].sum()
    loss.backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad.transpose(1, 2)[empty] == 0).all()


def test_dense_token_mask_positions():
    layout = local_stride(3, 16, 1, 2)
    m = dense_token_mask(layout, 10, 40, 3, causal=True, q_start=-4, k_start=0)
    assert m.shape == (3, 10, 40) and m.dtype == torch.bool
    assert not m[:, :4].any()                              # negative positions attend nothing
    assert m[:, 4:, 0].all()                               # position 0..5 see key 0 (same block)
    for t in range(4, 10):
        assert not m[:, t, t - 4 + 1:].any()               # causal
    m2 = dense_token_mask(layout, 10, 40, 3, causal=True, q_start=36, k_start=5)
    assert m2[:, 0, :32].any() and not m2[:, 0, 32:].any()  # query pos 36 sees keys at pos <= 36
    with pytest.raises(ValueError):
        dense_token_mask(BlockLayout.from_mask(torch.ones(2, 2, dtype=torch.bool), 16), 40, 40, 1,
                         causal=True, q_start=None, k_start=0)


def test_reference_varlen_matches_per_sequence():
    layout = local_stride(4, 16, 1, 3, num_kv_heads=2)
    lens_q = [5, 0, 37, 1, 20]
    lens_k = [9, 3, 37, 0, 50]
    cq = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lens_k), 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lens_k), 2, 8, generator=g, dtype=torch.float64)
    out, lse = reference_attention_varlen(q, k, v, layout, cq, ck)
    assert out.shape == (sum(lens_q), 4, 8) and lse.shape == (4, sum(lens_q))
    for b in range(len(lens_q)):
        qs, qe, ks, ke = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        o, l = reference_attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], layout)
        torch.testing.assert_close(out[qs:qe], o[0], rtol=0, atol=0)
        torch.testing.assert_close(lse[:, qs:qe], l[0], rtol=0, atol=0)
    assert torch.isneginf(lse[:, 42]).all()     # the sequence with no keys


def test_reference_errors():
    layout = local_stride(4, 16, 1, 2)
    q, k, v = rand_qkv(1, 8, 8, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        reference_attention(q, k, v, layout)
    q, k, v = rand_qkv(1, 8, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="heads"):
        reference_attention(q, k, v, layout)
    with pytest.raises(TypeError, match="dtype"):
        reference_attention(q.float(), k, v, local_stride(2, 16, 1, 2))
    with pytest.raises(ValueError):
        reference_attention(q[0], k, v, local_stride(2, 16, 1, 2))
    with pytest.raises(ValueError, match="k_start"):
        reference_attention(q, k, v, local_stride(2, 16, 1, 2), k_start=-1)
    with pytest.raises(TypeError, match="int32"):
        reference_attention_varlen(q[0], k[0], v[0], local_stride(2, 16, 1, 2),
                                   torch.tensor([0, 8]), torch.tensor([0, 8], dtype=torch.int32))


def test_naive_loop_checker_can_fail():
    # the loop check itself must notice a wrong rule (here: a wrong head offset)
    layout = local_stride(2, 16, 1, 3, head_offset=1)
    q, k, v = rand_qkv(1, 40, 40, 2, 2, 3, seed=9)
    out, _ = reference_attention(q, k, v, layout, sm_scale=1.0)
    wrong, _ = naive_attention(q, k, v, ls_rule(2, 1, 3, head_offset=0), 16, causal=True, q_start=0,
                               k_start=0, scale=1.0)
    assert (out - wrong).abs().max() > 1e-3
