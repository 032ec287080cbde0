"""torch_blockwise (the CPU path) against the float64 dense reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import starshard.ops.torch_blockwise as tb
from starshard.layouts import BlockLayout, local_stride
from starshard.ops.reference import reference_attention, reference_attention_varlen
from starshard.ops.torch_blockwise import blockwise_attention, blockwise_attention_varlen


def rand_qkv(B, nq, nk, hq, hkv, d, dtype=torch.float32, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    if transposed:   # [B, H, N, D] storage viewed as [B, N, H, D]
        q = torch.randn(B, hq, nq, d, generator=g).transpose(1, 2)
        k = torch.randn(B, hkv, nk, d, generator=g).transpose(1, 2)
        v = torch.randn(B, d, nk, hkv, generator=g).permute(0, 2, 3, 1)
    else:
        q = torch.randn(B, nq, hq, d, generator=g)
        k = torch.randn(B, nk, hkv, d, generator=g)
        v = torch.randn(B, nk, hkv, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check(q, k, v, layout, *, atol=None, **kw):
    """Compare blockwise with the float64 reference; bound: 2 * |same-dtype torch - ref| + atol."""
    out, lse = blockwise_attention(q, k, v, layout, **kw)
    ref, ref_lse = reference_attention(q, k, v, layout, **kw)
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert not out.isnan().any() and not lse.isnan().any()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows with no key differ"
    assert (out.transpose(1, 2)[empty] == 0).all()
    assert torch.isfinite(lse[~empty]).all()
    if q.dtype == torch.float64:
        tol_o = tol_l = 1e-10 if atol is None else atol
    else:
        same, same_lse = reference_attention(q, k, v, layout, dtype=q.dtype, **kw)
        a = (1e-5 if q.dtype == torch.float32 else 1e-3) if atol is None else atol
        tol_o = 2 * (same.double() - ref).abs().max().item() + a
        tol_l = 2 * (same_lse.double() - ref_lse)[~empty].abs().max().item() + a if (~empty).any() else 0
    err_o = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    err_l = (lse.double() - ref_lse)[~empty].abs().max().item() if (~empty).any() else 0.0
    assert err_o <= tol_o, f"out error {err_o} > {tol_o}"
    assert err_l <= tol_l, f"lse error {err_l} > {tol_l}"
    return out, lse, ref, ref_lse


@pytest.fixture(params=["one_chunk", "tiny_chunks"])
def chunks(request, monkeypatch):
    """Run with the default chunking and with one query block per chunk (many chunks)."""
    if request.param == "tiny_chunks":
        monkeypatch.setattr(tb, "_CHUNK_ELEMS", 1)
    return request.param


LAYOUTS = {
    "ls": lambda H, bs: local_stride(H, bs, 2, 3),
    "ls_offset": lambda H, bs: local_stride(H, bs, 1, 4, head_offset=1),
    "ls_homo": lambda H, bs: local_stride(H, bs, 1, 3, homo_head=True),
    "ls_dense_heads": lambda H, bs: local_stride(H, bs, 1, 3, num_dense_heads=1),
    "ls_kv_heads": lambda H, bs: local_stride(H, bs, 1, 3, num_kv_heads=H // 2),
    "ls_head_range": lambda H, bs: local_stride(2 * H, bs, 1, 3, head_range=(H, 2 * H)),
    "ls_kv_head_range": lambda H, bs: local_stride(2 * H, bs, 1, 3, num_kv_heads=H, head_range=(H, 2 * H)),
    "ls_noncausal": lambda H, bs: local_stride(H, bs, 1, 3, causal=False),
    "ls_strided_only": lambda H, bs: local_stride(H, bs, 0, 3),
    "ls_step": lambda H, bs: local_stride(H, bs, 1, 5, head_step=2, head_offset=3),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("causal", [True, False])
def test_local_stride_layouts(name, causal, chunks):
    H, bs = 4, 16
    layout = LAYOUTS[name](H, bs)
    q, k, v = rand_qkv(2, 75, 75, H, 2, 24, seed=len(name))
    check(q, k, v, layout, causal=causal)


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_sizes_ragged(bs, dtype, chunks):
    n = 3 * bs + 7
    layout = local_stride(4, bs, 1, 2)
    q, k, v = rand_qkv(1, n, n, 4, 4, 16, dtype=dtype, seed=bs)
    check(q, k, v, layout)


@pytest.mark.parametrize("nq,nk,q_start,k_start", [
    (40, 90, None, 0), (40, 90, None, 13), (90, 40, None, 0), (90, 40, None, 5),   # default q_start
    (33, 70, 21, 9), (33, 70, -9, 40), (50, 50, 3, 17), (20, 100, 200, 60),         # explicit
    (1, 77, None, 3), (64, 64, -64, 0), (10, 10, -20, 0),                            # all/some negative
])
@pytest.mark.parametrize("causal", [True, False])
def test_positions(nq, nk, q_start, k_start, causal, chunks):
    layout = local_stride(4, 16, 2, 3)
    q, k, v = rand_qkv(2, nq, nk, 4, 2, 8, seed=nq * nk, dtype=torch.float64)
    check(q, k, v, layout, causal=causal, q_start=q_start, k_start=k_start)


@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 24), (6, 1, 80), (3, 3, 40), (4, 1, 8)])
def test_gqa_mqa_head_dims(hq, hkv, d, chunks):
    for layout in (local_stride(hq, 32, 1, 3), local_stride(hq, 32, 1, 3, num_kv_heads=hkv),
                   local_stride(hq, 32, 2, 2, homo_head=True)):
        q, k, v = rand_qkv(1, 130, 150, hq, hkv, d, seed=d)
        check(q, k, v, layout)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_from_mask_random(shared, causal, chunks):
    bs, nb, H = 16, 7, 4
    g = torch.Generator().manual_seed(int(shared) * 2 + int(causal))
    mask = torch.rand((nb, nb) if shared else (H, nb, nb), generator=g) < 0.4
    layout = BlockLayout.from_mask(mask, bs)
    q, k, v = rand_qkv(2, 70, 100, H, 2, 16, seed=3)
    check(q, k, v, layout, causal=causal)
    check(q, k, v, layout, causal=causal, q_start=0, k_start=11)
    with pytest.raises(ValueError):
        blockwise_attention(q, k, v, layout, k_start=20)      # past the mask's 112 tokens


def test_transposed_strides(chunks):
    layout = local_stride(4, 16, 1, 3)
    q, k, v = rand_qkv(2, 60, 70, 4, 2, 16, seed=1, transposed=True)
    assert not q.is_contiguous() and not v.is_contiguous()
    out, lse, _, _ = check(q, k, v, layout)
    out2, lse2 = blockwise_attention(q.contiguous(), k.contiguous(), v.contiguous(), layout)
    torch.testing.assert_close(out, out2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    layout = local_stride(4, 16, 2, 3, num_kv_heads=2)
    q, k, v = rand_qkv(1, 90, 90, 4, 2, 32, dtype=dtype, seed=7)
    check(q, k, v, layout)


def test_rows_with_no_keys(chunks):
    layout = local_stride(4, 16, 0, 4)    # strided only: block i sees nothing before its first stride
    q, k, v = rand_qkv(1, 100, 100, 4, 4, 8, seed=2)
    _, lse, _, ref_lse = check(q, k, v, layout)
    assert torch.isneginf(ref_lse).any() and torch.isfinite(ref_lse).any()
    # every query at a negative position, or no keys at all
    out, lse = blockwise_attention(q, k, v, layout, q_start=-200)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out, lse = blockwise_attention(q, k[:, :0], v[:, :0], layout)
    assert out.shape == q.shape and (out == 0).all() and torch.isneginf(lse).all()


def weighted_loss(out, lse, seed=0):
    g = torch.Generator().manual_seed(seed)
    wo = torch.randn(out.shape, generator=g, dtype=torch.float64)
    wl = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    finite = torch.isfinite(lse)
    return (out.double() * wo).sum() + (torch.where(finite, lse.double(), 0.0) * wl).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout_name,hkv,kw", [
    ("ls", 2, {}), ("ls_kv_heads", 2, {}), ("ls_strided_only", 4, {}), ("ls_noncausal", 1, {"causal": False}),
    ("ls", 4, {"q_start": 5, "k_start": 11}), ("ls_homo", 1, {}),
])
def test_gradients(dtype, layout_name, hkv, kw, chunks):
    layout = LAYOUTS[layout_name](4, 16)
    nq, nk = (40, 70) if "q_start" not in kw else (40, 40)
    q, k, v = rand_qkv(1, nq, nk, 4, hkv, 16, dtype=dtype, seed=11)
    grads = []
    for fn in (blockwise_attention, reference_attention):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out, lse = fn(qq, kk, vv, layout, **kw)
        weighted_loss(out, lse).backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for name, a, b in zip("qkv", *grads):
        assert torch.isfinite(a).all(), name
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")
        assert b.abs().max() > 1e-2      # the comparison is not between zeros


def test_gradient_through_lse_only(chunks):
    layout = local_stride(2, 16, 1, 2)
    q, k, v = rand_qkv(1, 50, 50, 2, 2, 8, dtype=torch.float64, seed=5)
    res = []
    for fn in (blockwise_attention, reference_attention):
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        _, lse = fn(qq, kk, v, layout)
        lse.sum().backward()
        res.append((qq.grad, kk.grad))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-10, atol=1e-10)
    assert res[1][0].abs().max() > 1e-2


def test_double_backward():
    layout = local_stride(2, 16, 1, 2)
    q, k, v = rand_qkv(1, 20, 20, 2, 1, 3, dtype=torch.float64, seed=6)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)

    def fn(a, b, c):     # the first two queries sit at negative positions: lse -inf there
        out, lse = blockwise_attention(a, b, c, layout, q_start=-2)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (q, k, v), fast_mode=True)


def test_varlen_with_empty_sequences(chunks):
    layout = local_stride(4, 16, 1, 3, num_kv_heads=2)
    lens_q = [5, 0, 37, 1, 20, 0]
    lens_k = [9, 3, 37, 0, 50, 0]
    cq = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    ck = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), 4, 24, generator=g).requires_grad_(True)
    k = torch.randn(sum(lens_k), 2, 24, generator=g).requires_grad_(True)
    v = torch.randn(sum(lens_k), 2, 24, generator=g).requires_grad_(True)
    out, lse = blockwise_attention_varlen(q, k, v, layout, cq, ck, max(lens_q), max(lens_k))
    ref, ref_lse = reference_attention_varlen(q, k, v, layout, cq, ck)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)) and torch.isneginf(lse[:, 42]).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], rtol=1e-5, atol=1e-5)
    gb = torch.autograd.grad(weighted_loss(out, lse), (q, k, v))
    gr = torch.autograd.grad(weighted_loss(ref, ref_lse), (q, k, v))
    for a, b in zip(gb, gr):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        blockwise_attention_varlen(q, k, v, layout, cq, ck, max(lens_q), 10)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        blockwise_attention_varlen(q, k, v, layout, cq[:-2], ck[:-2], 64, 64)


def test_never_builds_n_by_n():
    """No intermediate tensor may approach Hq x N x N elements (the dense mask / score size)."""
    n, H = 4096, 2
    layout = local_stride(H, 16, 2, 64)
    q, k, v = rand_qkv(1, n, n, H, 1, 8, seed=0)
    q.requires_grad_(True)

    class Biggest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            for r in (res if isinstance(res, (tuple, list)) else (res,)):
                if isinstance(r, torch.Tensor):
                    Biggest.most = max(Biggest.most, r.numel())
            return res

    with Biggest():
        out, lse = blockwise_attention(q, k, v, layout)
        out.sum().backward()
    assert Biggest.most < H * n * n // 16, Biggest.most
    assert Biggest.most > 0


def test_errors():
    layout = local_stride(4, 16, 1, 2)
    q, k, v = rand_qkv(1, 20, 20, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        blockwise_attention(q, k, v, layout)
    q, k, v = rand_qkv(1, 20, 20, 2, 2, 8)
    with pytest.raises(ValueError, match="heads"):
        blockwise_attention(q, k, v, layout)
    layout = local_stride(2, 16, 1, 2)
    with pytest.raises(TypeError, match="dtype"):
        blockwise_attention(q.double(), k, v, layout)
    with pytest.raises(ValueError, match="head dim"):
        blockwise_attention(q, k[..., :4], v, layout)
    with pytest.raises(TypeError, match="q_start"):
        blockwise_attention(q, k, v, layout, q_start=1.5)
    with pytest.raises(TypeError, match="sm_scale"):
        blockwise_attention(q, k, v, layout, sm_scale="x")
    with pytest.raises(ValueError, match="batch"):
        blockwise_attention(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), layout)


def test_sm_scale_and_value_head_dim():
    layout = local_stride(2, 16, 1, 2)
    q, k, v = rand_qkv(1, 40, 40, 2, 2, 8, dtype=torch.float64, seed=3)
    check(q, k, v[..., :5].contiguous(), layout, sm_scale=0.37)
    o1, _ = blockwise_attention(q, k, v, layout, sm_scale=0.37)
    o2, _ = blockwise_attention(q, k, v, layout)
    assert (o1 - o2).abs().max() > 1e-3


# ---- property test -----------------------------------------------------------------------------

@st.composite
def problems(draw):
    bs = draw(st.sampled_from([16, 32]))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    hq = hkv * group
    nk = draw(st.integers(1, 5 * bs))
    nq = draw(st.integers(1, 5 * bs))
    k_start = draw(st.integers(0, 2 * bs))
    q_start = draw(st.one_of(st.none(), st.integers(-bs, 7 * bs - nq)))
    causal = draw(st.booleans())
    kind = draw(st.sampled_from(["ls", "mask"]))
    if kind == "ls":
        layout = local_stride(hq, bs, draw(st.integers(0, 3)), draw(st.integers(1, 5)),
                              causal=draw(st.booleans()), homo_head=draw(st.booleans()),
                              head_offset=draw(st.integers(0, 4)),
                              num_kv_heads=hkv if draw(st.booleans()) else None)
    else:
        seed = draw(st.integers(0, 2 ** 16))
        g = torch.Generator().manual_seed(seed)
        layout = BlockLayout.from_mask(torch.rand(hq, 8, 8, generator=g) < draw(st.floats(0.1, 0.9)), bs)
    d = draw(st.sampled_from([4, 8, 12]))
    return layout, dict(B=draw(st.integers(1, 2)), nq=nq, nk=nk, hq=hq, hkv=hkv, d=d), \
        dict(causal=causal, q_start=q_start, k_start=k_start)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problems(), st.booleans())
def test_property_blockwise_matches_reference(problem, tiny_chunks):
    layout, shape, kw = problem
    q, k, v = rand_qkv(shape["B"], shape["nq"], shape["nk"], shape["hq"], shape["hkv"], shape["d"],
                       dtype=torch.float64, seed=shape["nq"])
    old = tb._CHUNK_ELEMS
    try:
        if tiny_chunks:
            tb._CHUNK_ELEMS = 1
        check(q, k, v, layout, **kw)
    finally:
        tb._CHUNK_ELEMS = old

