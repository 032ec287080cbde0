"""The public op: argument checks, backend dispatch, the CPU path through autograd, merge."""
import pytest
import torch

import starshard as ss
from starshard.ops.reference import reference_attention


def _qkv(b=1, nq=70, nk=70, hq=4, hkv=2, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, nq, hq, d, generator=g, dtype=dtype),
            torch.randn(b, nk, hkv, d, generator=g, dtype=dtype),
            torch.randn(b, nk, hkv, d, generator=g, dtype=dtype))


LAYOUT = ss.local_stride(4, 16, 2, 3)


@pytest.mark.parametrize("call,exc,words", [
    (lambda q, k, v: ss.sparse_attention(q[0], k, v, LAYOUT), ValueError, "q must be 4-D"),
    (lambda q, k, v: ss.sparse_attention(q.int(), k, v, LAYOUT), TypeError, "q must be float"),
    (lambda q, k, v: ss.sparse_attention(q, k.half(), v, LAYOUT), TypeError, "share a dtype"),
    (lambda q, k, v: ss.sparse_attention(q, k, v[:, :5], LAYOUT), ValueError, "same shape"),
    (lambda q, k, v: ss.sparse_attention(q, k[..., :8], v[..., :8], LAYOUT), ValueError, "head dim"),
    (lambda q, k, v: ss.sparse_attention(q[:, :, :3], k, v, ss.local_stride(3, 16, 2, 3)), ValueError,
     "multiple of key/value heads"),
    (lambda q, k, v: ss.sparse_attention(q, k, v, ss.local_stride(8, 16, 2, 3)), ValueError,
     "layout has 8 query heads"),
    (lambda q, k, v: ss.sparse_attention(q, k, v, "layout"), TypeError, "layout must be"),
    (lambda q, k, v: ss.sparse_attention(q, k, v, LAYOUT, backend="cuda"), ValueError, "backend"),
    (lambda q, k, v: ss.sparse_attention(q, k, v, LAYOUT, q_start=-1), ValueError, "q_start"),
    (lambda q, k, v: ss.sparse_attention(q, k, v, LAYOUT, k_start=-3), ValueError, "k_start"),
    (lambda q, k, v: ss.sparse_attention(q, k, v, LAYOUT, q_start=1.5), TypeError, "q_start"),
    (lambda q, k, v: ss.sparse_attention(q, k, v, LAYOUT, causal=1), TypeError, "causal"),
    (lambda q, k, v: ss.sparse_attention(q, k, v, LAYOUT, sm_scale="x"), TypeError, "sm_scale"),
    (lambda q, k, v: ss.sparse_attention(q, k, v, LAYOUT, sm_scale=float("nan")), ValueError,
     "sm_scale must be finite"),
    (lambda q, k, v: ss.sparse_attention(q, k, v, LAYOUT, sm_scale=float("inf")), ValueError,
     "sm_scale must be finite"),
    (lambda q, k, v: ss.sparse_attention(q, k[:, :20], v[:, :20], LAYOUT, causal=False), ValueError,
     "pass q_start"),
    (lambda q, k, v: ss.sparse_attention(q, k, v, ss.BlockLayout.from_mask(torch.ones(2, 2, dtype=torch.bool), 16)),
     ValueError, "covers only 2 blocks"),
    (lambda q, k, v: ss.sparse_attention(q.double(), k.double(), v.double(), LAYOUT, backend="triton"),
     TypeError, "float64"),
])
def test_bad_input_names_the_problem(call, exc, words):
    q, k, v = _qkv()
    with pytest.raises(exc, match=words):
        call(q, k, v)


def test_varlen_bad_input():
    q, k, v = (t[0] for t in _qkv())
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        ss.sparse_attention_varlen(q, k, v, LAYOUT, cu.long(), cu, 40, 40)
    with pytest.raises(ValueError, match="same length"):
        ss.sparse_attention_varlen(q, k, v, LAYOUT, cu, cu[:2], 40, 40)
    with pytest.raises(ValueError, match=r"\[total, H, D\]"):
        ss.sparse_attention_varlen(q[None], k, v, LAYOUT, cu, cu, 40, 40)


def test_default_backend_on_cpu_is_torch_blockwise_and_differentiable():
    q, k, v = _qkv(dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(True)
    out, lse = ss.sparse_attention(q, k, v, LAYOUT, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, LAYOUT)
    torch.testing.assert_close(out, ref)
    assert lse.dtype == torch.float32  # lse is fp32 by contract, whatever the input dtype
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-6, rtol=1e-6)
    w = torch.randn_like(out)
    fin = torch.isfinite(ref_lse)
    g1 = torch.autograd.grad((out * w).sum() + lse[fin].sum(), (q, k, v))
    g2 = torch.autograd.grad((ref * w).sum() + ref_lse[fin].sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_merge_of_two_key_halves_equals_the_whole():
    q, k, v = _qkv(nq=90, nk=90, dtype=torch.float64)
    h = 45
    o1, l1 = ss.sparse_attention(q, k[:, :h], v[:, :h], LAYOUT, return_lse=True, q_start=0)
    o2, l2 = ss.sparse_attention(q, k[:, h:], v[:, h:], LAYOUT, return_lse=True, q_start=0, k_start=h)
    out, lse = ss.merge_attention([o1, o2], [l1, l2])
    full, full_lse = ss.sparse_attention(q, k, v, LAYOUT, return_lse=True)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse, atol=1e-6, rtol=1e-6)


def test_layout_handles_are_shared_by_equal_layouts():
    a = ss.local_stride(4, 16, 2, 3)
    b = ss.local_stride(4, 16, 2, 3)
    c = ss.local_stride(4, 16, 2, 4)
    assert a.handle == b.handle != c.handle


def test_varlen_cpu_path_gradients():
    from starshard.ops.reference import reference_attention_varlen
    g = torch.Generator().manual_seed(4)
    lq, lk = [20, 0, 33], [25, 7, 33]
    cu_q = torch.tensor([0, 20, 20, 53], dtype=torch.int32)
    cu_k = torch.tensor([0, 25, 32, 65], dtype=torch.int32)
    q = torch.randn(53, 4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(65, 2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(65, 2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    out = ss.sparse_attention_varlen(q, k, v, LAYOUT, cu_q, cu_k, max(lq), max(lk))
    ref, _ = reference_attention_varlen(q, k, v, LAYOUT, cu_q, cu_k)
    torch.testing.assert_close(out, ref)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)),
                    torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cpu_path_compiles_forward_and_backward(backend):
    """torch.compile(fullgraph=True) of a loss through the CPU op, forward and backward (through
    lse too), equals eager and the float64 reference's gradients."""
    layout = ss.local_stride(4, 16, 2, 3, num_kv_heads=2)
    q, k, v = (t.requires_grad_(True) for t in _qkv(b=2, nq=50, nk=70, seed=3))

    def loss(q, k, v):
        out, lse = ss.sparse_attention(q, k, v, layout, return_lse=True)
        return (out * out).sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    torch._dynamo.reset()
    got = torch.compile(loss, fullgraph=True, backend=backend)(q, k, v)
    want = loss(q, k, v)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got, (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ro, rl = reference_attention(qd, kd, vd, layout)
    ref = torch.autograd.grad((ro * ro).sum() + torch.where(torch.isfinite(rl), rl, 0).sum(),
                              (qd, kd, vd))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_cpu_path_varlen_compiles_backward():
    from starshard.ops.reference import reference_attention_varlen
    cu_q = torch.tensor([0, 20, 20, 53], dtype=torch.int32)
    cu_k = torch.tensor([0, 25, 32, 65], dtype=torch.int32)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(53, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(65, 2, 16, generator=g, requires_grad=True)
    v = torch.randn(65, 2, 16, generator=g, requires_grad=True)

    def loss(q, k, v):
        return ss.sparse_attention_varlen(q, k, v, LAYOUT, cu_q, cu_k, 33, 33).square().sum()

    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v),
                              (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = torch.autograd.grad(reference_attention_varlen(qd, kd, vd, LAYOUT, cu_q, cu_k)[0]
                              .square().sum(), (qd, kd, vd))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_calls_without_autograd_skip_the_custom_op_dispatch(monkeypatch):
    """Inference calls run the implementation directly (less host time a decode step); calls
    that record gradients, fake tensors and compiled graphs go through the registered ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from starshard.ops import sparse_attn as SA
    q, k, v = _qkv(b=2, nq=30, nk=50, seed=5)
    want, want_lse = ss.sparse_attention(q, k, v, LAYOUT, return_lse=True)

    def refuse(*a, **kw):
        raise AssertionError("went through the custom op")

    monkeypatch.setattr(SA, "_sparse_attn_fwd", refuse)
    monkeypatch.setattr(SA, "_sparse_attn_varlen_fwd", refuse)
    with torch.no_grad():
        out, lse = ss.sparse_attention(q, k, v, LAYOUT, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    cu = torch.tensor([0, 30], dtype=torch.int32)
    cuk = torch.tensor([0, 50], dtype=torch.int32)
    outv = ss.sparse_attention_varlen(q[0], k[0], v[0], LAYOUT, cu, cuk, 30, 50)
    assert torch.equal(outv, want[0])
    with pytest.raises(AssertionError, match="custom op"):
        ss.sparse_attention(q.requires_grad_(True), k, v, LAYOUT)
    monkeypatch.undo()
    plain = [t.detach() for t in (q, k, v)]
    with FakeTensorMode() as mode:   # shape inference runs the op's fake implementation
        fq, fk, fv = (mode.from_tensor(t) for t in plain)
        fo, fl = ss.sparse_attention(fq, fk, fv, LAYOUT, return_lse=True)
    assert fo.shape == q.shape and fl.shape == (2, 4, 30)
