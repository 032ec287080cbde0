"""Triton kernels (forward, dq, dk/dv) against the float64 reference.

On a CPU machine these run under ``TRITON_INTERPRET=1`` (set in tests/conftest.py), in fp16 and
fp32 only (the interpreter's bf16 is wrong). The cases form a pairwise-covering set over block
size, tile configuration (Merge-Q / gathered key units), causality, GQA, head dim, lengths and
offsets, dtype, layout kind and input strides; each stays small (interpreter: ~4 ms a step).
"""
import math
import types

import pytest
import torch

import starshard as ss
from starshard.ops import triton_launch
from starshard.ops.reference import reference_attention, reference_attention_varlen

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _layout(kind, hq, hkv, bs, causal):
    if kind == "hetero":
        return ss.local_stride(hq, bs, 2, 3, causal=causal, head_offset=1)
    if kind == "homo_dense":
        return ss.local_stride(hq, bs, 1, 2, causal=causal, homo_head=True, num_dense_heads=1)
    if kind == "gqa_shared":
        return ss.local_stride(hq, bs, 1, 2, causal=causal, num_kv_heads=hkv)
    if kind == "strided_only":  # local_blocks=0: some query rows see no key at all
        return ss.local_stride(hq, bs, 0, 3, causal=causal)
    if kind == "random":
        g = torch.Generator().manual_seed(bs + hq)
        return ss.BlockLayout.from_mask(torch.rand(hq, 24, 24, generator=g) < 0.4, bs)
    raise ValueError(kind)


def _inputs(b, nq, nk, hq, hkv, d, dtype, transposed, seed):
    g = torch.Generator().manual_seed(seed)

    def make(n, h):
        if transposed:  # a [B, H, N, D] buffer seen as [B, N, H, D]
            return torch.randn(b, h, n, d, generator=g).to(DEV, dtype).transpose(1, 2)
        return torch.randn(b, n, h, d, generator=g).to(DEV, dtype)
    return make(nq, hq), make(nk, hkv), make(nk, hkv)


def _bound(fast, ref, same):
    """DESIGN's bound, as flash-attn's tests: max|fast - ref| <= 2 max|same-dtype torch - ref| + atol."""
    atol = 2e-5 if fast.dtype == torch.float32 else 2e-3
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(fast), finite), "finite/infinite pattern differs"
    if not finite.any():
        return
    err = (fast.double() - ref)[finite].abs().max().item()
    base = (same.double() - ref)[finite].abs().max().item()
    assert err <= 2 * base + atol, f"max err {err:.3g} > 2 * {base:.3g} + {atol:.3g}"


# (bs, cfg, causal, hq, hkv, d, nq, nk, q_start, k_start, dtype, kind, transposed)
# cfg: None = the production tile sizes; a dict forces other tiles (Merge-Q / gathered units).
CASES = [
    (16, None, True, 4, 2, 32, 200, 200, None, 0, torch.float32, "hetero", False),
    (16, dict(fwd_m=64, fwd_n=32, bwd_m=32, bwd_n=64), False, 2, 1, 40, 150, 170, 10, 0, torch.float16, "random", True),
    (32, None, False, 4, 4, 64, 180, 180, None, 0, torch.float16, "homo_dense", False),
    (32, dict(fwd_m=32, fwd_n=64, bwd_m=64, bwd_n=32), True, 4, 1, 80, 100, 230, None, 0, torch.float32, "gqa_shared", True),
    (64, None, True, 2, 2, 24, 97, 300, None, 0, torch.float16, "strided_only", False),
    (64, dict(fwd_m=32, fwd_n=32, bwd_m=32, bwd_n=32), False, 2, 2, 64, 130, 130, None, 0, torch.float32, "hetero", False),
    (128, None, True, 2, 1, 64, 260, 260, None, 0, torch.float32, "random", False),
    (128, dict(fwd_m=64, fwd_n=64, bwd_m=64, bwd_n=64), True, 4, 2, 32, 70, 200, 140, 50, torch.float16, "hetero", True),
    (16, dict(fwd_m=128, fwd_n=128, bwd_m=128, bwd_n=64), True, 2, 2, 16, 140, 140, None, 0, torch.float16, "gqa_shared", False),
    (32, None, True, 6, 3, 48, 120, 90, None, 20, torch.float32, "strided_only", False),
    (64, None, True, 4, 2, 80, 64, 64, None, 0, torch.float16, "random", False),
    (32, dict(int64=True), True, 2, 1, 32, 110, 150, None, 0, torch.float32, "hetero", True),
    # the dk/dv kernel's other loop structures: one loop with a branch; a pipelined masked loop
    (16, dict(dkdv_split=False), True, 4, 2, 32, 200, 200, None, 0, torch.float32, "hetero", False),
    (64, dict(dkdv_split=False, bwd_m=32, bwd_n=32), False, 2, 2, 64, 130, 150, 10, 0, torch.float16, "random", True),
    (32, dict(dkdv_masked_stages=2), True, 6, 3, 48, 120, 90, None, 20, torch.float32, "strided_only", False),
    # merged key tiles (dk/dv tiles of small blocks grouped by attendance, the default where a
    # GQA group shares one pattern) forced on and off: q/k offsets, GQA
    (16, dict(merge_k=True), True, 4, 2, 32, 200, 260, None, 40, torch.float32, "gqa_shared", False),
    (16, dict(merge_k=False, bwd_m=32, bwd_n=64), False, 2, 2, 64, 150, 170, 10, 0, torch.float16, "random", True),
    (32, dict(merge_k=True, dkdv=(32, 128, 4, 2)), True, 4, 4, 32, 300, 300, None, 0, torch.float16, "hetero", False),
    (16, dict(merge_k=True), True, 4, 2, 32, 100, 230, 150, 30, torch.float32, "hetero", False),
    # programs in grid order, or heaviest first (the forward's too)
    (64, dict(schedule="natural"), True, 4, 2, 80, 64, 64, None, 0, torch.float16, "random", False),
    (16, dict(schedule="lpt"), False, 2, 2, 64, 150, 170, 10, 0, torch.float16, "random", True),
    (32, dict(schedule="lpt"), True, 4, 1, 32, 100, 230, None, 0, torch.float32, "hetero", False),
    # the forward's unmasked loop without the folded scale and without TMA loads (the production
    # cases above use both where the shapes allow), and TMA with query/key offsets
    (128, dict(fwd_fused=False, fwd_tma=False), True, 2, 1, 64, 260, 260, None, 0, torch.float16, "hetero", False),
    (64, dict(fwd_fused=True, fwd_tma=False, fwd=(64, 64, 4, 2)), True, 4, 2, 32, 130, 200, None, 70, torch.float32, "random", False),
    (64, dict(fwd_tma=True, fwd=(64, 64, 4, 2)), True, 4, 2, 64, 100, 250, 120, 20, torch.float16, "hetero", False),
    # the forward tile as two half tiles sharing each K/V step (the default for fixed lengths):
    # TMA steps, gathered units with a padded head dim, and the whole tile at once
    (64, dict(fwd_halves=True, fwd=(128, 64, 4, 2)), True, 4, 2, 64, 100, 250, 120, 20, torch.float16, "hetero", False),
    (16, dict(fwd_halves=True, fwd=(64, 64, 4, 2)), False, 2, 1, 80, 96, 160, None, 0, torch.float32, "random", False),
    (32, dict(fwd_halves=False), True, 4, 2, 64, 130, 200, 40, 0, torch.float16, "hetero", True),
]


def _ids(case):
    bs, cfg, causal, hq, hkv, d, nq, nk, qs, ks, dt, kind, tr = case
    return f"bs{bs}-{'cfg' if cfg else 'def'}-{'c' if causal else 'nc'}-h{hq}x{hkv}-d{d}-{nq}x{nk}-{str(dt)[6:]}-{kind}{'-T' if tr else ''}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_forward_backward_against_reference(case):
    bs, cfg, causal, hq, hkv, d, nq, nk, qs, ks, dtype, kind, transposed = case
    layout = _layout(kind, hq, hkv, bs, causal)
    q, k, v = _inputs(2, nq, nk, hq, hkv, d, dtype, transposed, seed=bs * 7 + d)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    kw = dict(causal=causal, q_start=qs, k_start=ks)
    with triton_launch.kernel_config(poison=True, **(cfg or {})):
        out, lse = ss.sparse_attention(q, k, v, layout, return_lse=True, backend="triton", **kw)
        ref_out, ref_lse = reference_attention(q, k, v, layout, **kw)
        same_out, same_lse = reference_attention(q, k, v, layout, dtype=dtype, **kw)
        _bound(out, ref_out, same_out)
        _bound(lse, ref_lse, same_lse.double())
        # gradients of q, k, v, with a gradient flowing into lse too
        g = torch.Generator().manual_seed(1)
        w_out = torch.randn(out.shape, generator=g).to(DEV)
        w_lse = torch.randn(lse.shape, generator=g).to(DEV)

        def loss(o, l):
            l = torch.where(torch.isfinite(l), l, torch.zeros_like(l))
            return (o.double() * w_out).sum() + (l.double() * w_lse).sum()

        grads = torch.autograd.grad(loss(out, lse), (q, k, v))
        refs = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
        sames = torch.autograd.grad(loss(same_out, same_lse), (q, k, v))
    for name, fast, ref, same in zip("qkv", grads, refs, sames):
        assert not torch.isnan(fast).any(), f"NaN in d{name}"
        scale = ref.abs().max().item() + 1e-6
        _bound(fast / scale, ref / scale, same / scale)


@pytest.mark.parametrize("sm_scale", [-0.3, 0.0, 0.7])
@pytest.mark.parametrize("fused", [True, False])
def test_forward_any_scale_sign(sm_scale, fused):
    """The folded-scale loop takes the row minimum for a negative scale; a zero scale is uniform."""
    layout = ss.local_stride(2, 32, 2, 2)
    q, k, v = _inputs(2, 128, 128, 2, 2, 32, torch.float32, False, seed=9)
    with triton_launch.kernel_config(poison=True, fwd_fused=fused, fwd=(32, 32, 4, 2)):
        out, lse = ss.sparse_attention(q, k, v, layout, sm_scale=sm_scale, return_lse=True,
                                       backend="triton")
    ref_out, ref_lse = reference_attention(q, k, v, layout, sm_scale=sm_scale)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("trend", ["growing", "shrinking"])
def test_forward_running_max_moves(fused, trend):
    """Scores that grow along the keys (the running max moves past what p can hold in fp16: every
    step must rescale what it has) or shrink (the first step holds the max)."""
    layout = ss.local_stride(2, 32, 8, 1)
    # fp16: p is rounded to the value dtype, so a missed rescale overflows (2^16) and shows
    q, k, v = _inputs(1, 256, 256, 2, 2, 32, torch.float16, False, seed=5)
    grow = 1 + torch.arange(256, dtype=torch.float32, device=DEV) / 8
    k = (k.float() * (grow if trend == "growing" else grow.flip(0))[None, :, None, None]).half()
    with triton_launch.kernel_config(poison=True, fwd_fused=fused, fwd=(32, 32, 4, 2)):
        out, lse = ss.sparse_attention(q, k, v, layout, sm_scale=1.0, return_lse=True,
                                       backend="triton")
    ref_out, ref_lse = reference_attention(q, k, v, layout, sm_scale=1.0)
    s = torch.einsum("qhd,khd->hqk", q[0].double(), k[0].double())   # the last rows see every key
    first, whole = s[:, -32:, :32].amax(-1), s[:, -32:, :].amax(-1)
    assert ((whole - first) > 16 * math.log(2)).all() == (trend == "growing")
    torch.testing.assert_close(out.double(), ref_out, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-5)


def test_varlen_forward_negative_scale():
    layout = ss.local_stride(2, 16, 2, 3)
    lq = [40, 0, 23]
    cu = torch.tensor([0, 40, 40, 63], dtype=torch.int32, device=DEV)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(sum(lq), 2, 32, generator=g).to(DEV) for _ in range(3))
    with triton_launch.kernel_config(poison=True, fwd_fused=True):
        out, lse = ss.sparse_attention_varlen(q, k, v, layout, cu, cu, 40, 40, sm_scale=-0.25,
                                              return_lse=True, backend="triton")
    ref_out, ref_lse = reference_attention_varlen(q, k, v, layout, cu, cu, sm_scale=-0.25)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)


def test_tma_descriptors_only_where_the_strides_allow():
    """TMA takes whole-unit steps of K/V seen as [B * N, H * D]; anything else falls back."""
    b, n, h, d = 2, 64, 2, 32
    k = torch.zeros(b, n, h, d, dtype=torch.float16)
    tr = torch.zeros(b, h, n, d, dtype=torch.float16).transpose(1, 2)
    with triton_launch.kernel_config(fwd_tma=True):
        descs = triton_launch._tma_descriptors(k, k, 32, 32, d, 32, False)
        assert descs is not None and [list(x.shape) for x in descs] == [[b * n, h * d]] * 2
        assert triton_launch._tma_descriptors(tr, tr, 32, 32, d, 32, False) is None  # heads apart
        assert triton_launch._tma_descriptors(k, k, 32, 32, d, 16, False) is None    # 2 units a step
        assert triton_launch._tma_descriptors(k, k, 32, 32, d, 32, True) is None     # varlen
        assert triton_launch._tma_descriptors(k[..., :24], k[..., :24], 32, 32, 24, 32, False) is None
    with triton_launch.kernel_config(fwd_tma=False):
        assert triton_launch._tma_descriptors(k, k, 32, 32, d, 32, False) is None


def test_decode_launches_skip_tma_unless_forced(monkeypatch):
    """A one-query call (16-row decode tiles) builds no TMA descriptors (no faster there, and
    costly on the host) unless kernel_config(fwd_tma=True) asks; the result is the same."""
    built = []
    real = triton_launch._tma_descriptors
    monkeypatch.setattr(triton_launch, "_tma_descriptors", lambda *a: built.append(1) or real(*a))
    layout = ss.local_stride(4, 32, 2, 3, num_kv_heads=2)
    q, k, v = _inputs(1, 1, 150, 4, 2, 32, torch.float32, False, seed=6)
    ref, _ = reference_attention(q, k, v, layout)
    out = ss.sparse_attention(q, k, v, layout, backend="triton")
    assert built == []
    with triton_launch.kernel_config(fwd_tma=True):
        forced = ss.sparse_attention(q, k, v, layout, backend="triton")
    assert built == [1]
    for o in (out, forced):
        torch.testing.assert_close(o.double(), ref, atol=2e-5, rtol=0)


def test_empty_rows_give_zero_and_minus_inf():
    layout = ss.local_stride(2, 16, 0, 4)  # strided blocks only: many queries see nothing
    q, k, v = _inputs(1, 90, 90, 2, 2, 32, torch.float32, False, seed=3)
    with triton_launch.kernel_config(poison=True):
        out, lse = ss.sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    ref_out, ref_lse = reference_attention(q, k, v, layout)
    empty = torch.isinf(ref_lse)
    assert empty.any() and (~empty).any()
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    assert torch.equal(out.transpose(1, 2)[empty], torch.zeros_like(out.transpose(1, 2)[empty]))
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)


@pytest.mark.parametrize("causal,strategy", [(True, {}), (False, {}), (True, dict(dkdv_split=False)),
                                             (True, dict(merge_k=True)), (False, dict(merge_k=False))])
def test_varlen_forward_backward(causal, strategy):
    hq, hkv, d, bs = 4, 2, 32, 16
    # merged key tiles need one pattern per GQA group
    shared = dict(num_kv_heads=hkv) if strategy.get("merge_k") else {}
    layout = ss.local_stride(hq, bs, 2, 3, causal=causal, **shared)
    lq, lk = [40, 0, 70, 5, 33], [60, 10, 70, 3, 33]   # empty, q longer than k, ragged
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(sum(lq), hq, d, generator=g).to(DEV).requires_grad_()
    k = torch.randn(sum(lk), hkv, d, generator=g).to(DEV).requires_grad_()
    v = torch.randn(sum(lk), hkv, d, generator=g).to(DEV).requires_grad_()
    with triton_launch.kernel_config(poison=True):
        out, lse = ss.sparse_attention_varlen(q, k, v, layout, cu_q, cu_k, max(lq), max(lk),
                                              causal=causal, return_lse=True, backend="triton")
    ref_out, ref_lse = reference_attention_varlen(q, k, v, layout, cu_q, cu_k, causal=causal)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=2e-5, rtol=0)
    w = torch.randn(out.shape, generator=g).to(DEV)
    wl = torch.randn(lse.shape, generator=g).to(DEV)

    def loss(o, l):
        return (o.double() * w).sum() + (torch.where(torch.isfinite(l), l, 0).double() * wl).sum()

    with triton_launch.kernel_config(poison=True, **strategy):
        grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    refs = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    for name, a, b in zip("qkv", grads, refs):
        err = (a.double() - b).abs()
        assert err.max() <= 5e-5 + 1e-4 * b.abs().max(), (name, err.max().item(), err.amax(dim=(1, 2)).nonzero().flatten().tolist()[:20])


def test_fp32_is_ieee_unless_tf32_requested():
    assert triton_launch._dot_precision(torch.float32) in ("ieee", "tf32")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert triton_launch._dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert triton_launch._dot_precision(torch.float32) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_torch_compile_fullgraph_traces_the_op():
    layout = ss.local_stride(2, 16, 1, 2)
    q, k, v = _inputs(1, 48, 48, 2, 1, 16, torch.float32, False, seed=9)
    q.requires_grad_(True)

    def f(q, k, v):
        out, lse = ss.sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
        return out.sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    want = f(q, k, v)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got, q)
    (g2,) = torch.autograd.grad(want, q)
    torch.testing.assert_close(g1, g2)


from hypothesis import given, settings, strategies as st  # noqa: E402

from starshard.ops.torch_blockwise import blockwise_attention  # noqa: E402


@settings(max_examples=10, deadline=None, derandomize=True)
@given(bs=st.sampled_from([16, 32, 64, 128]), hkv=st.integers(1, 2), group=st.integers(1, 3),
       nq=st.integers(1, 160), extra_k=st.integers(0, 100), local=st.integers(0, 3),
       stride=st.integers(1, 5), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_property_triton_matches_torch_blockwise(bs, hkv, group, nq, extra_k, local, stride, causal, seed):
    hq = hkv * group
    nk = nq + extra_k
    layout = ss.local_stride(hq, bs, local, stride, causal=causal)
    q, k, v = _inputs(1, nq, nk, hq, hkv, 32, torch.float32, False, seed)
    for t in (q, k, v):
        t.requires_grad_(True)
    with triton_launch.kernel_config(poison=True):
        out, lse = ss.sparse_attention(q, k, v, layout, causal=causal, return_lse=True, backend="triton")
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        g_fast = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref, ref_lse = blockwise_attention(q, k, v, layout, causal=causal)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse.float()[fin], atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("nq,causal", [(1, True), (5, False), (16, True)])
def test_short_query_tiles(nq, causal):
    """At most 16 queries (decode steps) run on 16-row tiles; exact as any other tile."""
    hq, hkv, d, nk = 4, 2, 64, 300
    layout = ss.local_stride(hq, 32, 2, 3, causal=causal)
    assert triton_launch.fwd_config(32, d, torch.float32, nq)[0] == 16
    q, k, v = _inputs(2, nq, nk, hq, hkv, d, torch.float32, False, seed=nq)
    q.requires_grad_(True)
    with triton_launch.kernel_config(poison=True):
        out, lse = ss.sparse_attention(q, k, v, layout, causal=causal, return_lse=True,
                                       backend="triton")
    ref_out, ref_lse = reference_attention(q, k, v, layout, causal=causal)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=2e-5, rtol=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(DEV)
    dq = torch.autograd.grad(out, q, g)[0]
    ref_dq = torch.autograd.grad(ref_out, q, g.to(ref_out.dtype))[0].double()
    torch.testing.assert_close(dq.double(), ref_dq, atol=1e-4, rtol=0)


@pytest.mark.parametrize("nq,causal,splits,kind,offsets", [
    (1, True, 3, "hetero", (None, 0)), (4, False, 2, "gqa_shared", (None, 0)),
    (16, True, 5, "strided_only", (None, 0)), (1, True, 40, "random", (None, 0)),
    (7, True, 4, "hetero", (230, 20))])
def test_split_k_forward_backward(nq, causal, splits, kind, offsets):
    """Split-K (each tile's key entries over several programs, partials merged by lse) is exact:
    rows with no key (0, -inf), more splits than entries, query/key offsets, GQA, gradients."""
    hq, hkv, d, nk = 4, 2, 32, 330
    layout = _layout(kind, hq, hkv, 16, causal)
    q, k, v = _inputs(2, nq, nk, hq, hkv, d, torch.float32, False, seed=nq + splits)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    kw = dict(causal=causal, q_start=offsets[0], k_start=offsets[1])
    with triton_launch.kernel_config(poison=True, fwd_splits=splits):
        out, lse = ss.sparse_attention(q, k, v, layout, return_lse=True, backend="triton", **kw)
    ref_out, ref_lse = reference_attention(q, k, v, layout, **kw)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin) and (lse[~fin] < 0).all()
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=2e-5, rtol=0)
    g = torch.Generator().manual_seed(2)
    w, wl = torch.randn(out.shape, generator=g).to(DEV), torch.randn(lse.shape, generator=g).to(DEV)

    def loss(o, l):
        return (o.double() * w).sum() + (torch.where(torch.isfinite(l), l, 0).double() * wl).sum()

    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    refs = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    for name, a, b in zip("qkv", grads, refs):
        assert (a.double() - b).abs().max() <= 5e-5 + 1e-4 * b.abs().max(), name


def test_decode_steps_on_shared_tables():
    """Decode steps one key further each call, on block-64 units: steps in several query tiles
    share one table (its extra tiles are not launched) and each matches the reference."""
    hq, hkv, d = 4, 2, 32
    layout = ss.local_stride(hq, 64, 1, 2, num_kv_heads=hkv)
    q_all, k, v = _inputs(1, 70, 270, hq, hkv, d, torch.float32, False, seed=11)
    with triton_launch.kernel_config(poison=True):
        for m in (193, 200, 209, 240, 255, 256, 257, 270):
            q = q_all[:, m - 201:m - 200] if m > 200 else q_all[:, :1]
            out, lse = ss.sparse_attention(q, k[:, :m], v[:, :m], layout, return_lse=True,
                                           backend="triton")
            ref, ref_lse = reference_attention(q, k[:, :m], v[:, :m], layout)
            torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
            torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)


@pytest.mark.parametrize("hq,hkv,kind,bs,nq,causal,offsets,splits", [
    (8, 2, "gqa_shared", 64, 1, True, (None, 0), None),       # 4 heads a tile, 4 rows each
    (8, 1, "gqa_shared", 32, 3, True, (None, 40), None),      # 8 heads, 2 rows: 2 tiles
    (4, 1, "random_shared", 16, 5, False, (70, 0), None),     # one pattern, non-causal, offset
    (16, 1, "gqa_shared", 64, 2, True, (None, 0), 3),         # 16 heads, 1 row each; split-K
    (8, 2, "hetero", 64, 1, True, (None, 0), None),           # patterns differ: not packed
    (6, 2, "gqa_shared", 32, 1, True, (None, 0), None),       # 3 heads do not divide 16 rows
])
def test_decode_packs_the_heads_of_a_gqa_group(hq, hkv, kind, bs, nq, causal, offsets, splits):
    """A decode tile holding every query head of a KV head (their K/V read once) gives the
    reference's out and lse, with query and key offsets, split-K, and tiles of one row."""
    d, nk = 32, 300
    if kind == "random_shared":
        g = torch.Generator().manual_seed(hq)
        layout = ss.BlockLayout.from_mask(torch.rand(24, 24, generator=g) < 0.5, bs)
    else:
        layout = _layout(kind, hq, hkv, bs, causal)
    tab_group = hq // layout.num_pattern_heads if layout.num_heads else hq
    with triton_launch.kernel_config(fwd_pack=True):
        pack = triton_launch._fwd_pack(16, False, hq, hkv, tab_group)
    assert pack == (1 if kind == "hetero" or 16 % (hq // hkv) else hq // hkv)
    q, k, v = _inputs(2, nq, nk, hq, hkv, d, torch.float32, False, seed=hq + nq)
    kw = dict(causal=causal, q_start=offsets[0], k_start=offsets[1])
    force = {} if splits is None else dict(fwd_splits=splits)
    with triton_launch.kernel_config(poison=True, fwd_pack=True, **force):
        out, lse = ss.sparse_attention(q, k, v, layout, return_lse=True, backend="triton", **kw)
    ref, ref_lse = reference_attention(q, k, v, layout, **kw)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=2e-5, rtol=0)


def test_decode_packs_a_gqa_group_split_or_not(monkeypatch):
    """A decode launch packs its GQA group whether it splits its keys or not (eager and captured
    launches then share one table); ``fwd_pack=False`` turns packing off, and heads of one group
    with different patterns are not packed. (The split decision is GPU-only: stubbed here.)"""
    hq, hkv, d, nk = 8, 2, 32, 300
    q, k, v = _inputs(1, 1, nk, hq, hkv, d, torch.float32, False, seed=21)
    tiles = []   # query positions per tile of each table the forward asks for: 16 // heads
    build = triton_launch._tables
    monkeypatch.setattr(triton_launch, "_tables",
                        lambda *a, **kw: tiles.append(a[2]) or build(*a, **kw))
    cases = [(ss.local_stride(hq, 64, 2, 2, num_kv_heads=hkv), splits, cfg, want)
             for splits in (3, 1) for cfg, want in (({}, 4), (dict(fwd_pack=False), 1))]
    cases.append((ss.local_stride(hq, 64, 2, 2), 3, {}, 1))   # per-query-head patterns
    for layout, splits, cfg, want in cases:
        ref, ref_lse = reference_attention(q, k, v, layout)
        monkeypatch.setattr(triton_launch, "_fwd_splits", lambda *a, n=splits, **kw: n)
        tiles.clear()
        with triton_launch.kernel_config(poison=True, **cfg):
            out, lse = ss.sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
        assert tiles == [16 // want], (splits, cfg, tiles)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=0)


def test_split_k_varlen_decode_batch():
    """A packed decode batch (one query per sequence, ragged and empty KV) split over keys."""
    hq, hkv, d = 4, 2, 32
    layout = ss.local_stride(hq, 16, 2, 3, num_kv_heads=hkv)
    lq, lk = [1, 0, 1, 1, 1], [200, 0, 1, 330, 17]
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(sum(lq), hq, d, generator=g).to(DEV)
    k = torch.randn(sum(lk), hkv, d, generator=g).to(DEV)
    v = torch.randn(sum(lk), hkv, d, generator=g).to(DEV)
    with triton_launch.kernel_config(poison=True, fwd_splits=3):
        out, lse = ss.sparse_attention_varlen(q, k, v, layout, cu_q, cu_k, max(lq), max(lk),
                                              return_lse=True, backend="triton")
    ref_out, ref_lse = reference_attention_varlen(q, k, v, layout, cu_q, cu_k)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=2e-5, rtol=0)


def test_split_k_policy():
    """Only decode-sized (16-row tile) launches over long rows (>= 256 key steps) that leave
    SMs idle split, within 1..64, each split keeping at least 32 steps, or, captured in a CUDA
    graph, rows of any length, 2 steps a split; prefill and CPU launches never split."""
    gpu = torch.device("cuda", 0)
    old = dict(triton_launch._PROPS)
    triton_launch._PROPS[0] = types.SimpleNamespace(multi_processor_count=132, major=9)
    try:
        f = triton_launch._fwd_splits
        assert f(16, 32, 512, gpu) == 9            # 32 heads of one sequence, 32k keys: 2 waves
        assert f(16, 32, 256, gpu) == 8            # at least 32 steps a split
        assert f(16, 32, 255, gpu) == 1            # short rows: host-bound, not split
        assert f(16, 1, 10**6, gpu) == 64          # capped
        assert f(16, 132, 10**6, gpu) == 1         # the SMs are busy already
        assert f(128, 32, 512, gpu) == 1           # prefill tiles
        assert f(16, 32, 512, torch.device("cpu")) == 1
        # captured in a CUDA graph: short rows split too, 2 steps or more a split
        assert f(16, 8, 2048, gpu, True) == 33     # a packed GQA 32/8 step over 128k keys
        assert f(16, 8, 48, gpu, True) == 24
        assert f(16, 8, 3, gpu, True) == 1
        assert f(16, 132, 10**6, gpu, True) == 1
        assert f(128, 8, 512, gpu, True) == 1
        with triton_launch.kernel_config(fwd_splits=6):
            assert f(128, 10**4, 1, torch.device("cpu")) == 6
    finally:
        triton_launch._PROPS.clear()
        triton_launch._PROPS.update(old)


def test_program_order_is_a_permutation_heaviest_first():
    lay = ss.local_stride(4, 16, 1, 3, causal=True, head_offset=1)
    tab = triton_launch._tables(lay, True, 32, 16, 16, (0, 300), (0, 300), True, False, "cpu")
    rows, n = 2, tab.num_tiles + 3        # two kv heads of two query heads; 3 tiles past the table
    order = triton_launch._program_order(tab, rows, 2, 1, tab.t0, n, "dkdv")
    assert order.dtype == torch.int32 and sorted(order.tolist()) == list(range(rows * n))
    classes = []
    for w in order.tolist():
        r, i = divmod(w, n)
        work = sum(int(tab.ntot[h, i]) if i < tab.num_tiles else 0 for h in (2 * r, 2 * r + 1))
        classes.append((-int(math.log2(work + 1)), w))
    # heaviest class (entry counts in powers of two) first, grid order within a class
    assert classes == sorted(classes) and classes[0][0] < classes[-1][0] == 0
    assert triton_launch._program_order(tab, rows, 2, 1, tab.t0, n, "dkdv") is order   # cached
    with triton_launch.kernel_config(schedule="natural"):
        assert triton_launch._program_order(tab, rows, 2, 1, tab.t0, n, "dkdv") is None
    with triton_launch.kernel_config(schedule_dkdv="fifo"), pytest.raises(ValueError, match="schedule"):
        triton_launch._program_order(tab, rows, 2, 1, tab.t0, n, "dkdv")
