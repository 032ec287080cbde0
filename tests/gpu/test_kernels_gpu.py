"""GPU-only checks of the Triton kernels (run with ``pytest -m gpu`` on a CUDA machine).

bf16 (wrong under the CPU interpreter), the production tile configurations at realistic sizes,
fp32 as IEEE on the GPU, tensors past 2**31 elements (int64 offsets) and a second device index.
The truth is the same dense-masked reference, in float32 on the GPU.
"""
import pytest
import torch

import starshard as ss
from starshard.ops import triton_launch
from starshard.ops.reference import reference_attention, reference_attention_varlen

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _bound(fast, ref, same, atol):
    """flash-attn's bound: max|fast - ref| <= 2 max|same-dtype torch - ref| + atol."""
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(fast), finite)
    err = (fast.float() - ref)[finite].abs().max().item()
    base = (same.float() - ref)[finite].abs().max().item()
    assert err <= 2 * base + atol, f"max err {err:.3g} > 2 * {base:.3g} + {atol:.3g}"


LAYOUTS = [
    ("bs16-l8-s4", dict(block_size=16, local_blocks=8, vert_stride=4)),
    ("bs32-l4-s8", dict(block_size=32, local_blocks=4, vert_stride=8)),
    ("bs64-l3-s4-dense1", dict(block_size=64, local_blocks=3, vert_stride=4, num_dense_heads=1)),
    ("bs128-l2-s3-off1", dict(block_size=128, local_blocks=2, vert_stride=3, head_offset=1)),
]


@pytest.mark.parametrize("name,kw", LAYOUTS, ids=[n for n, _ in LAYOUTS])
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (80, torch.bfloat16),
                                     (192, torch.bfloat16), (128, torch.float16)])
def test_bf16_fp16_forward_backward(name, kw, d, dtype):
    _check_forward_backward(kw, d, dtype, {})


# the dk/dv kernel's other loop structures (the default splits them, masked loop unpipelined)
# and merged key tiles (the default when a GQA group shares one pattern: with 4 KV heads here,
# for bs < 64)
# and every kernel's programs in grid order, or heaviest tiles first; the forward's plain loop
# (no folded scale, no TMA, no half tiles: the default uses them where it can), its whole
# tile at once (no half tiles), and its K/V seen through a [B, H, N, D] buffer (no TMA there)
STRATEGIES = [dict(dkdv_split=False), dict(dkdv_masked_stages=2), dict(merge_k=True),
              dict(schedule="natural"), dict(schedule="lpt"), dict(fwd_fused=False, fwd_tma=False),
              dict(fwd_halves=False), dict(transposed=True)]


@pytest.mark.parametrize("name,kw", LAYOUTS, ids=[n for n, _ in LAYOUTS])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=["one-loop", "masked-pipelined", "merge-k",
                                                         "natural-order", "lpt-order",
                                                         "plain-forward", "whole-tile-forward",
                                                         "heads-apart"])
def test_backward_strategies(name, kw, strategy):
    _check_forward_backward(kw, 128, torch.bfloat16, strategy, hkv=4 if "merge_k" in strategy else 2)


def _check_forward_backward(kw, d, dtype, strategy, hkv=2):
    torch.manual_seed(d)
    kw = dict(kw)
    hq, nq, nk = 4, 1500, 2100
    layout = ss.local_stride(hq, kw.pop("block_size"), kw.pop("local_blocks"), kw.pop("vert_stride"), **kw)
    strategy = dict(strategy)
    if strategy.pop("transposed", False):
        def make(n, h):
            return torch.randn(2, h, n, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    else:
        def make(n, h):
            return torch.randn(2, n, h, d, device="cuda", dtype=dtype, requires_grad=True)
    q, k, v = make(nq, hq), make(nk, hkv), make(nk, hkv)
    with triton_launch.kernel_config(poison=True, **strategy):
        out, lse = ss.sparse_attention(q, k, v, layout, return_lse=True)
        ref, ref_lse = reference_attention(q, k, v, layout, dtype=torch.float32)
        same, _ = reference_attention(q, k, v, layout, dtype=dtype)
        _bound(out, ref, same, 2e-3)
        torch.testing.assert_close(lse[torch.isfinite(ref_lse)], ref_lse[torch.isfinite(ref_lse)],
                                   atol=1e-3, rtol=0)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    refs = torch.autograd.grad(ref, (q, k, v), do.float())
    sames = torch.autograd.grad(same, (q, k, v), do)
    for g, r, s in zip(grads, refs, sames):
        assert not g.isnan().any()
        _bound(g, r, s, 2e-3 * r.abs().max().item())


@pytest.mark.parametrize("causal", [True, False])
def test_fp32_on_gpu_is_ieee(causal):
    torch.manual_seed(0)
    layout = ss.local_stride(4, 64, 3, 4, causal=causal)
    q, k, v = (torch.randn(1, 1000, 4, 96, device="cuda", requires_grad=True) for _ in range(3))
    out = ss.sparse_attention(q, k, v, layout, causal=causal)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), layout, causal=causal)
    assert (out.double() - ref).abs().max().item() < 1e-5  # TF32 would give ~1e-3
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), do)
    r = torch.autograd.grad(ref, (q, k, v), do.double())
    for a, b in zip(g, r):
        assert (a.double() - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item())


def test_varlen_bf16():
    torch.manual_seed(1)
    layout = ss.local_stride(4, 32, 4, 4)
    lq, lk = [700, 0, 1300, 9, 512], [900, 40, 1300, 5, 512]
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lq), 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lk), 1, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(sum(lk), 1, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = ss.sparse_attention_varlen(q, k, v, layout, cu_q, cu_k, max(lq), max(lk))
    ref, _ = reference_attention_varlen(q, k, v, layout, cu_q, cu_k, dtype=torch.float32)
    same, _ = reference_attention_varlen(q, k, v, layout, cu_q, cu_k, dtype=torch.bfloat16)
    _bound(out, ref, same, 2e-3)
    do = torch.randn_like(out)
    for g, r, s in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do.float()),
                       torch.autograd.grad(same, (q, k, v), do)):
        _bound(g, r, s, 2e-3 * r.abs().max().item())


def test_long_sequence_bf16_rows_against_reference():
    """32k tokens: the last query blocks and a middle slice against the dense reference."""
    torch.manual_seed(2)
    n, h = 32768, 2
    layout = ss.local_stride(h, 64, 4, 16)
    q, k, v = (torch.randn(1, n, h, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = ss.sparse_attention(q, k, v, layout)
    for lo in (n - 300, 12000):
        rows = slice(lo, lo + 300)
        ref, _ = reference_attention(q[:, rows], k, v, layout, q_start=lo, dtype=torch.float32)
        same, _ = reference_attention(q[:, rows], k, v, layout, q_start=lo, dtype=torch.bfloat16)
        _bound(out[:, rows], ref, same, 2e-3)


@pytest.mark.parametrize("name,kw", [("dense", dict(block_size=64, local_blocks=1, vert_stride=1)),
                                     ("bs64-l16-s16", dict(block_size=64, local_blocks=16, vert_stride=16))])
def test_decode_split_k_bf16(name, kw):
    """One query over 32k keys (GQA 32/8, bf16), split over keys (on its own for the dense
    layout's 512 key steps, forced to 9 splits for the sparse one's 48), as the library picks
    (too short to pack) and with the GQA group packed: exact against the dense reference; and a
    varlen batch of such steps (enough programs not to split)."""
    torch.manual_seed(4)
    n, hq, hkv = 32768, 32, 8
    layout = ss.local_stride(hq, **kw, num_kv_heads=hkv)
    assert triton_launch._fwd_splits(16, hq, n // 64, torch.device("cuda", 0)) == 9
    q = torch.randn(1, 1, hq, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, n, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ref, ref_lse = reference_attention(q, k, v, layout, dtype=torch.float32)
    same, _ = reference_attention(q, k, v, layout, dtype=torch.bfloat16)
    for pack in (None, True):
        force = {} if name == "dense" else dict(fwd_splits=9)
        if pack is not None:
            force["fwd_pack"] = pack
        with triton_launch.kernel_config(poison=True, **force):
            out, lse = ss.sparse_attention(q, k, v, layout, return_lse=True)
        _bound(out, ref, same, 2e-3)
        assert (lse - ref_lse).abs().max().item() < 1e-3
    lk = [n, 1000, 0, 5000]
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    cu_q = torch.tensor([0, 1, 2, 2, 3], dtype=torch.int32, device="cuda")
    kk = torch.randn(sum(lk), hkv, 128, device="cuda", dtype=torch.bfloat16)
    vv = torch.randn_like(kk)
    qq = torch.randn(3, hq, 128, device="cuda", dtype=torch.bfloat16)
    with triton_launch.kernel_config(poison=True):   # 4 x 32 x 2 busy tiles: not split
        out = ss.sparse_attention_varlen(qq, kk, vv, layout, cu_q, cu_k, 1, n)
    ref, _ = reference_attention_varlen(qq, kk, vv, layout, cu_q, cu_k, dtype=torch.float32)
    same, _ = reference_attention_varlen(qq, kk, vv, layout, cu_q, cu_k, dtype=torch.bfloat16)
    _bound(out, ref, same, 2e-3)


@pytest.mark.parametrize("splits", [None, 9])
def test_decode_packed_gqa_bf16(splits):
    """One query over 32k keys (GQA 32/8, bf16) with the four query heads of each KV head in
    one decode tile (their K/V read once), whole and split over keys."""
    torch.manual_seed(5)
    n, hq, hkv = 32768, 32, 8
    layout = ss.local_stride(hq, 64, 16, 16, num_kv_heads=hkv)
    q = torch.randn(1, 1, hq, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, n, hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    force = {} if splits is None else dict(fwd_splits=splits)
    with triton_launch.kernel_config(poison=True, fwd_pack=True, **force):
        assert triton_launch._fwd_pack(16, False, hq, hkv, hq // hkv) == 4
        out, lse = ss.sparse_attention(q, k, v, layout, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, layout, dtype=torch.float32)
    same, _ = reference_attention(q, k, v, layout, dtype=torch.bfloat16)
    _bound(out, ref, same, 2e-3)
    assert (lse - ref_lse).abs().max().item() < 1e-3


def test_int64_offsets_past_2_31_elements():
    """q/k/v of 2**31+ elements each: the kernels must index with int64."""
    free = torch.cuda.mem_get_info()[0]
    n, h, d = (1 << 20) + 64, 16, 128        # 2**31 + 2**17 elements per tensor, bf16: ~4.3 GB
    if free < 40e9:
        pytest.skip(f"needs ~40 GB free GPU memory, {free / 1e9:.0f} GB free")
    assert n * h * d > 2**31
    layout = ss.local_stride(h, 128, 1, 2048)
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = ss.sparse_attention(q, k, v, layout)
    rows = slice(n - 60, n)  # all inside the last key block
    # the last rows, by a dense reference over only the key blocks some head may read
    bs = 128
    qb = torch.full((1,), (n - 1) // bs, device="cuda")
    heads = layout.pattern_index(torch.arange(h, device="cuda"))
    nb = (n + bs - 1) // bs
    read = layout.allowed(heads, qb, torch.arange(nb, device="cuda"))[:, 0].any(0).nonzero().flatten()
    idx = torch.cat([torch.arange(j * bs, min((j + 1) * bs, n), device="cuda") for j in read.tolist()])
    kk, vv = k[:, idx], v[:, idx]
    qq = q[:, rows].float()
    s = torch.einsum("bqhd,bkhd->bhqk", qq, kk.float()) * d ** -0.5
    allow = layout.allowed(heads, qb, idx // bs)[:, 0]                                   # [H, K]
    causal = idx[None, :] <= torch.arange(n - 60, n, device="cuda")[:, None]          # [Q, K]
    mask = allow[:, None, :] & causal[None]
    s = s.masked_fill(~mask[None], float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vv.float())
    assert (out[:, rows].float() - ref).abs().max().item() < 2e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_index():
    layout = ss.local_stride(2, 32, 2, 4)
    q, k, v = (torch.randn(1, 500, 2, 64, device="cuda:1", dtype=torch.bfloat16) for _ in range(3))
    out = ss.sparse_attention(q, k, v, layout)
    assert out.device == torch.device("cuda:1")
    ref, _ = reference_attention(q, k, v, layout, dtype=torch.float32)
    assert (out.float() - ref).abs().max().item() < 2e-2


def test_inductor_compiles_the_op_in_a_model_step():
    """torch.compile(fullgraph=True) with inductor around the op and the ops that feed it
    (projections, a residual): forward and gradients equal the eager run's within bf16 noise."""
    torch.manual_seed(6)
    b, n, h, hkv, d = 1, 2048, 8, 2, 128
    layout = ss.local_stride(h, 64, 4, 4, num_kv_heads=hkv)
    x = torch.randn(b, n, h * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    wq = torch.randn(h * d, h * d, device="cuda", dtype=torch.bfloat16) * (h * d) ** -0.5
    wkv = torch.randn(h * d, 2 * hkv * d, device="cuda", dtype=torch.bfloat16) * (h * d) ** -0.5

    def step(x):
        q = (x @ wq).view(b, n, h, d)
        k, v = (x @ wkv).view(b, n, 2, hkv, d).unbind(2)
        out, lse = ss.sparse_attention(q, k, v, layout, return_lse=True)
        return x + out.reshape(b, n, h * d), lse

    eager_out, eager_lse = step(x)
    (eager_g,) = torch.autograd.grad(eager_out.float().square().mean() + eager_lse.mean(), x)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out, lse = compiled(x)
    (g,) = torch.autograd.grad(out.float().square().mean() + lse.mean(), x)
    torch.testing.assert_close(out.float(), eager_out.float(), atol=2e-2, rtol=2e-2)
    assert (lse - eager_lse).abs().max().item() < 1e-2
    rel = (g.float() - eager_g.float()).norm() / eager_g.float().norm()
    assert rel.item() < 2e-2, rel.item()


@pytest.mark.parametrize("name,kw", [("dense", dict(block_size=64, local_blocks=1, vert_stride=1)),
                                     ("bs64-l16-s16", dict(block_size=64, local_blocks=16, vert_stride=16))])
def test_decode_steps_replay_in_a_cuda_graph(name, kw, monkeypatch):
    """Three decode steps (64k keys, GQA 32/8, bf16) captured in one CUDA graph after an eager
    warm-up (which builds the tables): captured, each launch splits its keys (the sparse rows'
    ~80 key steps too, which eager steps keep whole), its GQA group packed as in eager steps
    (one table for both); replayed on new q/k/v contents written into the captured buffers,
    bit-equal to eager calls forced to the same splits, and the last step within the bound of
    the dense reference."""
    torch.manual_seed(7)
    n, hq, hkv, d = 65536 + 5, 32, 8, 128
    layout = ss.local_stride(hq, **kw, num_kv_heads=hkv)
    q = torch.randn(1, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, n + 3, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = [n + 1, n + 2, n + 3]
    step = lambda m: ss.sparse_attention(q, k[:, :m], v[:, :m], layout, return_lse=True)  # noqa: E731

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager_splits = []
        pick = triton_launch._fwd_splits
        monkeypatch.setattr(triton_launch, "_fwd_splits",
                            lambda *a: eager_splits.append(pick(*a)) or eager_splits[-1])
        for m in lengths:
            step(m)
    torch.cuda.current_stream().wait_stream(side)
    assert (min(eager_splits) > 1) == (name == "dense"), eager_splits
    splits, tiles, finals = [], [], []
    build = triton_launch._tables
    monkeypatch.setattr(triton_launch, "_fwd_splits", lambda *a: splits.append(pick(*a)) or splits[-1])
    monkeypatch.setattr(triton_launch, "_tables", lambda *a, **kw: tiles.append(a[2]) or build(*a, **kw))
    graph = torch.cuda.CUDAGraph()
    captured = []
    with torch.cuda.graph(graph):
        for m in lengths:
            captured.append(step(m))
            finals.append(splits[-1])
    assert min(finals) > 1 and tiles[-1] == 16 // (hq // hkv)
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        for (out, lse), m, s in zip(captured, lengths, finals):
            with triton_launch.kernel_config(fwd_splits=s):
                eager_out, eager_lse = step(m)
            assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
    m = lengths[-1]
    ref, ref_lse = reference_attention(q, k[:, :m], v[:, :m], layout, dtype=torch.float32)
    same, _ = reference_attention(q, k[:, :m], v[:, :m], layout, dtype=torch.bfloat16)
    _bound(captured[-1][0], ref, same, 2e-3)
    assert (captured[-1][1] - ref_lse).abs().max().item() < 1e-3


def test_capture_needs_a_warm_up_and_keeps_its_tables(monkeypatch):
    """A decode call captured before any eager call raises naming the fix (its table cannot be
    built during capture). After a warm-up the captured graph still replays right once the table
    cache has dropped its table (more new lengths than the cache holds built since)."""
    torch.manual_seed(5)
    hq, hkv, d, n = 8, 2, 64, 4099
    layout = ss.local_stride(hq, 64, 2, 4, num_kv_heads=hkv)
    q = torch.randn(1, 1, hq, d, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(1, n + 80 * 64, hkv, d, device="cuda", dtype=torch.float16)
            for _ in range(2))
    step = lambda m: ss.sparse_attention(q, k[:, :m], v[:, :m], layout)  # noqa: E731
    with pytest.raises(RuntimeError, match="outside the graph first"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            step(n)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(n)
    torch.cuda.current_stream().wait_stream(side)
    splits, pick = [], triton_launch._fwd_splits
    monkeypatch.setattr(triton_launch, "_fwd_splits", lambda *a: splits.append(pick(*a)) or splits[-1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(n)
    monkeypatch.setattr(triton_launch, "_fwd_splits", pick)
    for i in range(1, 80):   # a new key unit each: new tables, reusing freed memory if any
        step(n + 64 * i)
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        with triton_launch.kernel_config(fwd_splits=splits[-1]):   # captured launches split
            assert torch.equal(out, step(n))


@pytest.mark.parametrize("name,kw", [("bs64-l16-s16", dict(block_size=64, local_blocks=16,
                                                            vert_stride=16)),
                                     ("dense", dict(block_size=64, local_blocks=1, vert_stride=1))])
@pytest.mark.parametrize("page", [None, 16])
def test_kvcache_decode_loop_is_one_cuda_graph(name, kw, page, monkeypatch):
    """One captured step of sparse_attention_kvcache (append the new K/V, attend) replayed for
    every step of a decode loop over a 40k-slot bf16 cache (batch 3, ragged lengths, GQA 32/8;
    contiguous, or pages of 16 slots in a shuffled pool): the lengths change only in a device
    tensor. Each replay equals the eager call on the same cache (bit for bit: same launch), and
    the last steps are within the bound of the reference. (Captured launches split short rows
    that eager calls keep whole: the eager call is forced to the captured split.)"""
    torch.manual_seed(11)
    cap, hq, hkv, d, b = 40000, 32, 8, 128, 3
    layout = ss.local_stride(hq, **kw, num_kv_heads=hkv)
    table = None
    if page:
        per = cap // page
        table = torch.randperm(b * per + 5, device="cuda")[:b * per].view(b, per).int()
        kc, vc = (torch.randn(b * per + 5, page, hkv, d, device="cuda", dtype=torch.bfloat16)
                  for _ in range(2))
        flat = lambda c: c[table.long()].flatten(1, 2)  # noqa: E731
    else:
        kc, vc = (torch.randn(b, cap, hkv, d, device="cuda", dtype=torch.bfloat16)
                  for _ in range(2))
        flat = lambda c: c  # noqa: E731
    start = torch.tensor([5, 17000, 39990], dtype=torch.int32, device="cuda")
    seqlens = start.clone()
    q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
    kn, vn = (torch.randn(b, 1, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    step = lambda: ss.sparse_attention_kvcache(q, kc, vc, layout, seqlens, k=kn, v=vn,  # noqa: E731
                                               block_table=table, return_lse=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()   # warm-up: builds the table (and compiles)
    torch.cuda.current_stream().wait_stream(side)
    splits = []
    pick = triton_launch._fwd_splits
    monkeypatch.setattr(triton_launch, "_fwd_splits", lambda *a: splits.append(pick(*a)) or splits[-1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    monkeypatch.setattr(triton_launch, "_fwd_splits", pick)
    for i in range(10):
        for t in (q, kn, vn):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        kc2, vc2 = kc.clone(), vc.clone()   # the replay appended; eager appends the same again
        with triton_launch.kernel_config(fwd_splits=splits[-1]):
            eager_out, eager_lse = ss.sparse_attention_kvcache(q, kc2, vc2, layout, seqlens,
                                                               k=kn, v=vn, block_table=table,
                                                               return_lse=True)
        assert torch.equal(kc2, kc) and torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
        seqlens += 1
    kf, vf = flat(kc), flat(vc)
    for j, n in enumerate(seqlens.tolist()):
        assert n == start[j].item() + 10
        ref, ref_lse = reference_attention(q[j:j + 1], kf[j:j + 1, :n], vf[j:j + 1, :n], layout,
                                           dtype=torch.float32)
        same, _ = reference_attention(q[j:j + 1], kf[j:j + 1, :n], vf[j:j + 1, :n], layout,
                                      dtype=torch.bfloat16)
        _bound(out[j:j + 1], ref, same, 2e-3)
        assert (lse[j:j + 1] - ref_lse).abs().max().item() < 1e-3


@pytest.mark.parametrize("head_sharded", [True, False])
def test_kvcache_class_decodes_in_one_graph(head_sharded):
    """ss.KVCache over 30k tokens (bf16, GQA 32/8, local 16 stride 16, batch 2): the prompt's
    K/V loaded with fill, one decode step (append, attend, advance) captured, replayed for 15
    steps with new tokens; every step within the bound of the reference over the whole K/V. The
    head-sharded cache keeps about a fourteenth of the bytes."""
    torch.manual_seed(13)
    hq, hkv, d, b, n, steps = 32, 8, 128, 2, 30000, 16
    layout = ss.local_stride(hq, 64, 16, 16, num_kv_heads=hkv)
    cache = ss.KVCache(layout, batch=b, capacity=n + steps, num_heads=hq, num_kv_heads=hkv,
                       head_dim=d, head_sharded=head_sharded, dtype=torch.bfloat16, device="cuda")
    if head_sharded:
        assert cache.nbytes() < cache.dense_nbytes() / 8
    k_all, v_all = (torch.randn(b, n + steps, hkv, d, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
    q_all = torch.randn(b, steps, hq, d, device="cuda", dtype=torch.bfloat16)
    cache.fill(k_all[:, :n], v_all[:, :n])
    q, kn, vn = q_all[:, :1].clone(), k_all[:, n:n + 1].clone(), v_all[:, n:n + 1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        first = cache.attend(q, kn, vn)   # step 0, eagerly: builds the table
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cache.attend(q, kn, vn)
    outs = [first.clone()]
    for i in range(1, steps):
        q.copy_(q_all[:, i:i + 1])
        kn.copy_(k_all[:, n + i:n + i + 1])
        vn.copy_(v_all[:, n + i:n + i + 1])
        graph.replay()
        outs.append(out.clone())
    torch.cuda.synchronize()
    assert cache.seqlens.tolist() == [n + steps] * b
    for i in (0, 7, steps - 1):
        m = n + i + 1
        qi = q_all[:, i:i + 1]
        ref, _ = reference_attention(qi, k_all[:, :m], v_all[:, :m], layout, dtype=torch.float32)
        same, _ = reference_attention(qi, k_all[:, :m], v_all[:, :m], layout, dtype=torch.bfloat16)
        _bound(outs[i], ref, same, 2e-3)


_BAD_LENGTHS = r'''
import sys, torch, starshard as ss
mode, page = sys.argv[1], int(sys.argv[2])
layout = ss.local_stride(8, 64, 4, 4, num_kv_heads=2)
cap, b = 1024, 2
table = None
if page:
    table = torch.arange(b * cap // page, device="cuda").view(b, -1).int()
    kc = torch.zeros(b * cap // page, page, 2, 64, device="cuda", dtype=torch.bfloat16)
else:
    kc = torch.zeros(b, cap, 2, 64, device="cuda", dtype=torch.bfloat16)
vc = kc.clone()
q = torch.randn(b, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
kn, vn = (torch.randn(b, 1, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
lens = torch.tensor([5, cap - 2], dtype=torch.int32, device="cuda")
step = lambda: ss.sparse_attention_kvcache(q, kc, vc, layout, lens, k=kn, v=vn, block_table=table)
step()
torch.cuda.synchronize()
if mode == "graph":
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(4):          # lengths cap - 1, cap, then past the capacity
        lens += 1
        graph.replay()
elif mode == "pages":
    table[1, 3] = 10 ** 6       # a page in use outside the cache
    step()
else:
    lens += 2                    # cap - 2 + 2 holds the capacity: one more key does not fit
    step()
torch.cuda.synchronize()
print("NO ERROR")
'''


@pytest.mark.parametrize("mode,page", [("eager", 0), ("eager", 16), ("graph", 0), ("graph", 16),
                                       ("pages", 16)])
def test_kvcache_bad_lengths_stop_the_gpu_with_the_reason(mode, page, tmp_path):
    """A step past the capacity (eager, or a captured step replayed as the lengths grow), or a
    block table naming a page outside the cache, stops the device with starshard's message
    (a device-side assertion in the append launch: no host sync, no extra launch)."""
    import subprocess
    import sys
    script = tmp_path / "bad.py"
    script.write_text(_BAD_LENGTHS)
    res = subprocess.run([sys.executable, str(script), mode, str(page)], capture_output=True,
                         text=True, timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode != 0 and "NO ERROR" not in text, text[-2000:]
    want = "block_table entries of the pages in use" if mode == "pages" else \
        "cache_seqlens must be >= 0"
    assert want in text, text[-3000:]
