"""sparse_attention_kvcache: attention over a preallocated KV cache with per-sequence lengths on
the device, against the float64 reference over each sequence's own keys.

The Triton cases run under ``TRITON_INTERPRET=1`` on a CPU machine (fp32/fp16, small shapes);
the torch backend runs everywhere.
"""
import os

import pytest
import torch

import starshard as ss
from starshard.ops import triton_launch
from starshard.ops.reference import reference_attention

HAS_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])


def _layout(kind, hq, hkv, bs):
    if kind == "gqa_shared":
        return ss.local_stride(hq, bs, 2, 3, num_kv_heads=hkv)
    if kind == "hetero":
        return ss.local_stride(hq, bs, 1, 2, head_offset=1)
    if kind == "dense":
        return ss.local_stride(hq, bs, 1, 1)
    if kind == "random":
        g = torch.Generator().manual_seed(bs)
        return ss.BlockLayout.from_mask(torch.rand(40, 40, generator=g) < 0.4, bs)
    raise ValueError(kind)


def _cache(b, cap, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, cap, hkv, d, generator=g).to(DEV, dtype)
    v = torch.randn(b, cap, hkv, d, generator=g).to(DEV, dtype)
    return k, v


def _reference(q, k_cache, v_cache, layout, lens, dtype=torch.float64):
    """Each sequence over its first lens[b] keys, the queries being the last Nq positions."""
    outs, lses = [], []
    nq = q.shape[1]
    for i, n in enumerate(lens):
        o, l = reference_attention(q[i:i + 1], k_cache[i:i + 1, :n], v_cache[i:i + 1, :n], layout,
                                   q_start=n - nq, dtype=dtype)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def _paged(k_cache, v_cache, page, seed, per_head=False):
    """The same caches as pages of ``page`` slots in a shuffled pool with spare pages (NaN):
    (k_pages, v_pages, block_table int32 [B, pages a sequence]); ``per_head``: pages of one KV
    head each, [pool, page, 1, D], block table [B, Hkv, pages a sequence]."""
    b, cap, h, d = k_cache.shape
    per = -(-cap // page)
    heads = h if per_head else 1
    pool = b * heads * per + 3
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(pool, generator=g)[:b * heads * per].view(b, heads, per)
    kp = torch.full((pool, page, h // heads, d), float("nan"), dtype=k_cache.dtype, device=DEV)
    vp = kp.clone()
    pad = per * page - cap
    for src, dst in ((k_cache, kp), (v_cache, vp)):
        full = torch.nn.functional.pad(src, (0, 0, 0, 0, 0, pad), value=float("nan"))
        full = full.view(b, per, page, heads, h // heads, d).permute(0, 3, 1, 2, 4, 5)
        dst[table.view(-1)] = full.reshape(-1, page, h // heads, d)
    table = table if per_head else table[:, 0]
    return kp, vp, table.to(DEV, torch.int32)


def _unpage(kp, table, cap):
    """[B, cap, Hkv, D] back from the pages."""
    if table.dim() == 2:
        return kp[table.long()].flatten(1, 2)[:, :cap]
    x = kp[table.long()]                     # [B, Hkv, P, page, 1, D]
    return x.flatten(2, 3)[:, :, :cap, 0].transpose(1, 2)


def _close(out, lse, ref, ref_lse, atol):
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=atol, rtol=0)


# (kind, bs, hq, hkv, d, nq, lens, capacity, dtype, cfg)
CASES = [
    ("gqa_shared", 64, 8, 2, 32, 1, [1, 130, 200, 77], 256, torch.float32, {}),   # packed x4
    ("hetero", 16, 4, 2, 24, 3, [5, 64, 161], 180, torch.float16, {}),             # not packed
    ("dense", 32, 4, 1, 32, 2, [1, 90, 255], 260, torch.float32, dict(fwd_splits=3)),
    ("random", 16, 2, 2, 40, 16, [16, 100, 231], 250, torch.float32, {}),
    ("gqa_shared", 128, 4, 4, 32, 20, [20, 140, 300], 300, torch.float16, {}),     # 64-row tiles
    ("gqa_shared", 32, 8, 1, 32, 4, [0, 2, 37], 64, torch.float32, {}),            # Nq > length
]


def _ids(c):
    return f"{c[0]}-bs{c[1]}-h{c[2]}x{c[3]}-q{c[5]}-{str(c[8])[6:]}{'-cfg' if c[9] else ''}"


@pytest.mark.parametrize("page", [None, 16, 24, "16 per head"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_kvcache_matches_the_reference(case, backend, page):
    """Ragged lengths in one cache, contiguous or paged (pages of 16 or 24 slots, shuffled; or
    pages of one KV head each), with and without appending the new keys; the slots past each length and the spare pages
    hold NaN, which any read would spread."""
    kind, bs, hq, hkv, d, nq, lens, cap, dtype, cfg = case
    layout = _layout(kind, hq, hkv, bs)
    b = len(lens)
    k_cache, v_cache = _cache(b, cap, hkv, d, dtype, seed=bs + nq)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, nq, hq, d, generator=g).to(DEV, dtype)
    for i, n in enumerate(lens):   # beyond each length: NaN, which any read would spread
        k_cache[i, n:] = float("nan")
        v_cache[i, n:] = float("nan")
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    ref, ref_lse = _reference(q, k_cache, v_cache, layout, lens)
    atol = 2e-5 if dtype == torch.float32 else 4e-3

    def call(q, kc, vc, seqlens, **kw):
        table = None
        if page:
            kc, vc, table = _paged(kc, vc, int(str(page).split()[0]), seed=len(lens),
                                   per_head=isinstance(page, str))
        with triton_launch.kernel_config(poison=True, **cfg):
            res = ss.sparse_attention_kvcache(q, kc, vc, layout, seqlens, block_table=table,
                                              return_lse=True, backend=backend, **kw)
        if page:   # the caches as the caller sees them, appended keys included
            kc, vc = _unpage(kc, table, cap), _unpage(vc, table, cap)
        return res, kc, vc

    (out, lse), _, _ = call(q, k_cache, v_cache, seqlens)
    _close(out, lse, ref, ref_lse, atol)
    # append mode: the last Nq keys come in as k/v and are written at slots lens - Nq ...
    app = [n for n in lens if n >= nq]
    keep = [i for i, n in enumerate(lens) if n >= nq]
    kc, vc = k_cache[keep].clone(), v_cache[keep].clone()
    rows = torch.arange(len(keep)).unsqueeze(1)
    pos = torch.tensor(app).unsqueeze(1) - nq + torch.arange(nq)
    k_new, v_new = kc[rows, pos].clone(), vc[rows, pos].clone()
    kc[rows, pos] = float("nan")
    vc[rows, pos] = float("nan")
    before = torch.tensor(app, dtype=torch.int32, device=DEV) - nq
    (out2, lse2), kc, vc = call(q[keep], kc, vc, before, k=k_new, v=v_new)
    assert torch.equal(before, torch.tensor(app, dtype=torch.int32, device=DEV) - nq)
    assert torch.equal(kc[rows, pos], k_new) and torch.equal(vc[rows, pos], v_new)
    _close(out2, lse2, ref[keep], ref_lse[keep], atol)


@pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
def test_one_table_serves_every_length(monkeypatch):
    """Decode steps over one cache as the lengths grow build a single layout table (nothing on
    the host depends on the lengths) and each step matches the reference."""
    hq, hkv, d, cap = 4, 2, 32, 200
    layout = ss.local_stride(hq, 32, 1, 2, num_kv_heads=hkv)
    k_cache, v_cache = _cache(2, cap, hkv, d, torch.float32, seed=5)
    g = torch.Generator().manual_seed(9)
    built = []
    real = triton_launch._tables
    monkeypatch.setattr(triton_launch, "_tables",
                        lambda *a, **kw: built.append(a[2:8]) or real(*a, **kw))
    for lens in ([1, 31], [32, 33], [64, 150], [199, 200]):
        q = torch.randn(2, 1, hq, d, generator=g).to(DEV)
        seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        out, lse = ss.sparse_attention_kvcache(q, k_cache, v_cache, layout, seqlens,
                                               return_lse=True, backend="triton")
        ref, ref_lse = _reference(q, k_cache, v_cache, layout, lens)
        _close(out, lse, ref, ref_lse, 2e-5)
    assert len(set(built)) == 1, built


def test_kvcache_bad_input():
    layout = ss.local_stride(4, 16, 1, 2)
    q = torch.randn(2, 1, 4, 8)
    kc = torch.randn(2, 40, 2, 8)
    vc = torch.randn(2, 40, 2, 8)
    ok = torch.tensor([3, 5], dtype=torch.int32)
    call = ss.sparse_attention_kvcache
    with pytest.raises(TypeError, match="cache_seqlens must be a torch.Tensor"):
        call(q, kc, vc, layout, [3, 5])
    with pytest.raises(TypeError, match="int32 or int64"):
        call(q, kc, vc, layout, ok.float())
    with pytest.raises(ValueError, match=r"shape \[B\] with B = 2"):
        call(q, kc, vc, layout, ok[:1])
    with pytest.raises(ValueError, match="both k and v"):
        call(q, kc, vc, layout, ok, k=torch.randn(2, 1, 2, 8))
    with pytest.raises(ValueError, match=r"k must have shape \[B, Nq, Hkv, D\]"):
        call(q, kc, vc, layout, ok, k=torch.randn(2, 2, 2, 8), v=torch.randn(2, 2, 2, 8))
    with pytest.raises(ValueError, match="sequence 1: cache_seqlens 40, length 41"):
        call(q, kc, vc, layout, torch.tensor([3, 40]), k=torch.randn(2, 1, 2, 8),
             v=torch.randn(2, 1, 2, 8))
    with pytest.raises(ValueError, match="sequence 0: cache_seqlens -1"):
        call(q, kc, vc, layout, torch.tensor([-1, 4]))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        call(torch.randn(2, 1, 3, 8), kc, vc, ss.local_stride(3, 16, 1, 2), ok)
    pages = torch.randn(6, 16, 2, 8)
    with pytest.raises(TypeError, match="block_table must be int32"):
        call(q, pages, pages.clone(), layout, ok, block_table=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"block_table must have shape \[B, pages a sequence\]"):
        call(q, pages, pages.clone(), layout, ok, block_table=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="same strides"):
        call(q, pages, pages.transpose(1, 2).contiguous().transpose(1, 2), layout, ok,
             block_table=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"pages in use must lie in 0..5; sequence 1"):
        call(q, pages, pages.clone(), layout, torch.tensor([3, 17]),
             block_table=torch.tensor([[0, 1, 9], [2, 6, 9]], dtype=torch.int32))
    with pytest.raises(ValueError, match="length 49"):   # 3 pages of 16 slots
        call(q, pages, pages.clone(), layout, torch.tensor([3, 48]), k=torch.randn(2, 1, 2, 8),
             v=torch.randn(2, 1, 2, 8), block_table=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="no backward"):
        call(q.requires_grad_(), kc, vc, layout, ok)
    # nothing was written by the calls that failed their checks
    assert torch.equal(kc, kc.clone()) and not torch.isnan(kc).any()


@pytest.fixture
def interpreter_asserts(monkeypatch):
    """Compile tl.device_assert into interpreted kernels, as debug=True does on a GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("checks the interpreted kernel; on a GPU see tests/gpu")
    import dataclasses
    from triton.runtime import interpreter
    opts = interpreter.interpreter_builder.options
    monkeypatch.setattr(interpreter.interpreter_builder, "options",
                        dataclasses.replace(opts, debug=True, sanitize_overflow=False))


@pytest.mark.parametrize("page", [0, 16])
def test_append_kernel_checks_lengths_and_pages(interpreter_asserts, page):
    """On a GPU the lengths and pages are checked inside the append launch (device-side
    assertions, no extra launches, in a captured graph too): the conditions, interpreted."""
    from starshard.ops.triton_cache import append_kv
    cap = 48
    if page:
        kc = torch.zeros(6, page, 2, 8)
        table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    else:
        kc, table = torch.zeros(2, cap, 2, 8), None
    vc = kc.clone()
    kn, vn = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)

    def call(lens, tab=table, kv=True, check_pages=False):
        return append_kv(kc, vc, torch.tensor(lens, dtype=torch.int32), *((kn, vn) if kv else
                         (None, None)), tab, page, cap, check=True, check_pages=check_pages)

    assert call([3, 47]).tolist() == [4, 48]
    assert call([0, 48], kv=False).tolist() == [0, 48]
    assert torch.equal(kc[5, 47 % page] if page else kc[1, 47], kn[1, 0])   # slot 47 of seq 1
    for lens, kv in (([3, 48], True), ([-1, 4], True), ([-1, 4], False), ([3, 49], False)):
        with pytest.raises(Exception, match="cache_seqlens must be >= 0"):
            call(lens, kv=kv)
    if page:
        bad = torch.tensor([[0, 1, 2], [3, 9, 5]], dtype=torch.int32)   # page 9 of 6
        assert call([3, 10], bad).tolist() == [4, 11]                    # page 9 unused
        assert call([3, 10], bad, check_pages=True).tolist() == [4, 11]
        with pytest.raises(Exception, match="pages in use must lie in"):
            call([3, 16], bad)                                           # writes into page 9
        with pytest.raises(Exception, match="pages in use must lie in"):
            call([3, 17], bad, kv=False, check_pages=True)               # reads page 9
        per_head = torch.tensor([[[0, 1, 2], [3, 4, 5]], [[0, 1, 2], [3, 4, -1]]],
                                dtype=torch.int32)                       # [B, Hkv, P]
        pool = torch.zeros(6, page, 1, 8)
        assert append_kv(pool, pool.clone(), torch.tensor([3, 31], dtype=torch.int32), kn, vn,
                         per_head, page, cap, check=True, check_pages=True).tolist() == [4, 32]
        with pytest.raises(Exception, match="pages in use must lie in"):   # head 1's 3rd page
            append_kv(pool, pool.clone(), torch.tensor([3, 33], dtype=torch.int32), None, None,
                      per_head, page, cap, check=True, check_pages=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_traces_the_cache_op(backend):
    """The op is a custom op that mutates the caches: a compiled step (append, attend, advance
    the lengths) gives the eager step's output and leaves the same caches and lengths."""
    layout = ss.local_stride(4, 16, 1, 2, num_kv_heads=2)
    k_cache, v_cache = _cache(2, 80, 2, 16, torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 1, 4, 16, generator=g).to(DEV)
    kn, vn = (torch.randn(2, 1, 2, 16, generator=g).to(DEV) for _ in range(2))

    def step(q, kc, vc, lens, kn, vn):
        out = ss.sparse_attention_kvcache(q, kc, vc, layout, lens, k=kn, v=vn, backend=backend)
        lens += 1
        return out

    state = [(k_cache.clone(), v_cache.clone(), torch.tensor([5, 70], dtype=torch.int32,
                                                              device=DEV)) for _ in range(2)]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, *state[0], kn, vn)
    want = step(q, *state[1], kn, vn)
    torch.testing.assert_close(got, want)
    for a, b in zip(state[0], state[1]):
        assert torch.equal(a, b)
    assert state[0][2].tolist() == [6, 71]
