"""starshard.kvcache: decode caches, contiguous and head-sharded, against attention over the
whole K/V (the float64 reference, and the blockwise path for longer loops)."""
import os

import pytest
import torch

import starshard as ss
from starshard.kvcache import KVCache, head_page_plan
from starshard.ops.reference import reference_attention

HAS_TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _live_intervals_overlap(layout, capacity, hq, hkv, max_query_len, pages):
    """Brute force over the dense block mask: two blocks of one KV head on one page must not be
    live at once (live: from the first call that may write the block to the last that may
    read it, calls spanning ceil((max_query_len - 1) / bs) + 1 blocks)."""
    bs = layout.block_size
    nb = -(-capacity // bs)
    extra = -(-(max_query_len - 1) // bs)
    mask = layout.mask(nb, nb, 0, num_heads=hq).tril()        # [Hq, nb, nb]
    need = mask.view(hkv, hq // hkv, nb, nb).any(1)            # [Hkv, i, j]
    for h in range(hkv):
        readers = [need[h, :, j].nonzero().flatten().tolist() for j in range(nb)]
        for j in range(nb):
            if not readers[j]:
                assert pages[h, j] == -1
                continue
            assert pages[h, j] >= 0
            for j2 in range(j + 1, nb):
                if pages[h, j2] == pages[h, j] and readers[j2]:
                    # block j2 is first written by a call reaching block j2, whose queries start
                    # extra blocks before; block j must not be read by that call or later
                    assert max(readers[j]) < j2 - extra, (h, j, j2)


@pytest.mark.parametrize("max_query_len", [1, 20])
@pytest.mark.parametrize("kind", ["gqa", "hetero", "strided_only", "random"])
def test_head_page_plan_never_overwrites_a_block_still_read(kind, max_query_len):
    hq, hkv, bs, cap = 4, 2, 16, 700
    layout = {
        "gqa": lambda: ss.local_stride(hq, bs, 3, 4, num_kv_heads=hkv),
        "hetero": lambda: ss.local_stride(hq, bs, 2, 3, head_offset=1),   # a group's union
        "strided_only": lambda: ss.local_stride(hq, bs, 0, 3),           # unread blocks
        "random": lambda: ss.BlockLayout.from_mask(
            torch.rand(hq, 44, 44, generator=torch.Generator().manual_seed(2)) < 0.3, bs),
    }[kind]()
    pages, counts = head_page_plan(layout, cap, hq, hkv, max_query_len)
    _live_intervals_overlap(layout, cap, hq, hkv, max_query_len, pages)
    assert torch.equal(counts, pages.max(1).values + 1)


@pytest.mark.parametrize("kind", ["gqa", "hetero", "strided_only", "random", "shared"])
def test_last_reader_is_the_last_row_of_the_group_mask(kind):
    from starshard.kvcache import _last_reader
    hq, hkv, bs, nb = 8, 2, 16, 37
    layout = {
        "gqa": lambda: ss.local_stride(hq, bs, 3, 4, num_kv_heads=hkv),
        "hetero": lambda: ss.local_stride(hq, bs, 2, 3, head_offset=1),
        "strided_only": lambda: ss.local_stride(hq, bs, 0, 3),
        "random": lambda: ss.BlockLayout.from_mask(
            torch.rand(hq, nb, nb, generator=torch.Generator().manual_seed(7)) < 0.2, bs),
        "shared": lambda: ss.local_stride(hq, bs, 2, 5, homo_head=True),
    }[kind]()
    need = layout.mask(nb, nb, 0, num_heads=hq).tril().view(hkv, hq // hkv, nb, nb).any(1)
    want = torch.full((hkv, nb), -1, dtype=torch.int64)
    for h in range(hkv):
        for j in range(nb):
            rows = need[h, :, j].nonzero().flatten()
            if len(rows):
                want[h, j] = rows.max()
    assert torch.equal(_last_reader(layout, hq, hkv, nb), want)


def test_head_sharded_cache_keeps_local_plus_strided_blocks():
    """local 4, stride 4 over 125 blocks: a KV head keeps its ~31 strided blocks plus the
    window, far less than every block."""
    layout = ss.local_stride(8, 16, 4, 4, num_kv_heads=2)
    cache = KVCache(layout, batch=2, capacity=2000, num_heads=8, num_kv_heads=2, head_dim=8)
    _, counts = head_page_plan(layout, 2000, 8, 2)
    nb = 125
    for h in range(2):   # strided columns of head h below block nb, plus the local window
        strided = sum(1 for j in range(nb - 4) if (j + h * 2) % 4 == 0)
        assert strided + 3 <= counts[h] <= strided + 4
    assert cache.nbytes() == 2 * (2 * int(counts.sum()) + 1) * 16 * 8 * 2
    assert cache.nbytes() < 0.33 * cache.dense_nbytes()


def _decode(cache, layout, q_all, k_all, v_all, chunks, backend):
    """Feed the tokens through cache.attend in chunks; compare each chunk to the reference."""
    pos = 0
    for c in chunks:
        q, k, v = (t[:, pos:pos + c] for t in (q_all, k_all, v_all))
        out, lse = cache.attend(q, k, v, return_lse=True, backend=backend)
        ref, ref_lse = reference_attention(q, k_all[:, :pos + c], v_all[:, :pos + c], layout)
        torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=0)
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), fin)
        torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=3e-5, rtol=0)
        pos += c
    assert cache.seqlens.tolist() == [pos] * q_all.shape[0]


@pytest.mark.parametrize("head_sharded", [True, False])
@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
def test_cache_decode_loop_matches_full_attention(head_sharded, backend):
    """A prefill in chunks of up to 20 tokens, then single-token decode steps, through block
    boundaries and far past the local window (pages reused many times over)."""
    hq, hkv, d, bs = 4, 2, 16, 16
    layout = ss.local_stride(hq, bs, 2, 3, head_offset=1)
    chunks = [20, 20, 7, 20, 13] + [1] * (40 if backend == "torch" else 14)
    n = sum(chunks)
    cache = KVCache(layout, batch=2, capacity=n + 3, num_heads=hq, num_kv_heads=hkv,
                    head_dim=d, head_sharded=head_sharded, max_query_len=20,
                    dtype=torch.float32, device=DEV)
    g = torch.Generator().manual_seed(4)
    q_all = torch.randn(2, n, hq, d, generator=g).to(DEV)
    k_all = torch.randn(2, n, hkv, d, generator=g).to(DEV)
    v_all = torch.randn(2, n, hkv, d, generator=g).to(DEV)
    _decode(cache, layout, q_all, k_all, v_all, chunks, backend)


@pytest.mark.parametrize("head_sharded", [True, False])
def test_fill_then_decode(head_sharded):
    """A prompt's K/V loaded with fill (through many page reuses), then decode steps."""
    hq, hkv, d, bs, n = 4, 2, 16, 16, 300
    layout = ss.local_stride(hq, bs, 2, 4, num_kv_heads=hkv)
    cache = KVCache(layout, batch=2, capacity=n + 8, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                    head_sharded=head_sharded, dtype=torch.float32, device=DEV)
    g = torch.Generator().manual_seed(8)
    q_all = torch.randn(2, n + 8, hq, d, generator=g).to(DEV)
    k_all = torch.randn(2, n + 8, hkv, d, generator=g).to(DEV)
    v_all = torch.randn(2, n + 8, hkv, d, generator=g).to(DEV)
    cache.fill(k_all[:, :n], v_all[:, :n])
    assert cache.seqlens.tolist() == [n, n]
    for i in range(n, n + 8):
        out = cache.attend(q_all[:, i:i + 1], k_all[:, i:i + 1], v_all[:, i:i + 1],
                           backend="torch")
        ref, _ = reference_attention(q_all[:, i:i + 1], k_all[:, :i + 1], v_all[:, :i + 1], layout)
        torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=0)
    with pytest.raises(ValueError, match="do not fit"):
        cache.fill(torch.cat([k_all, k_all], 1), torch.cat([v_all, v_all], 1))
    with pytest.raises(ValueError, match=r"k must be \[B=2, n, Hkv=2, D=16\]"):
        cache.fill(k_all[:1], v_all[:1])


@pytest.mark.parametrize("n,heads_first", [(300, False), (304, False), (5, False), (300, True)])
def test_fill_leaves_what_writing_block_by_block_leaves(n, heads_first):
    """fill writes all blocks at once; each page must hold what writing the blocks in order
    leaves there (page reuse, a partial last block: its rows past n are not compared; K/V
    also as transformers hands them, a [B, Hkv, n, D] tensor transposed)."""
    hq, hkv, d, bs = 4, 2, 8, 16
    layout = ss.local_stride(hq, bs, 2, 3, head_offset=1)
    cache = KVCache(layout, batch=2, capacity=320, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                    dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(2, n, hkv, d, generator=g) for _ in range(2))
    if heads_first:
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    cache.fill(k, v)
    spare = cache.k.shape[0] - 1
    want_k, want_v = torch.zeros_like(cache.k), torch.zeros_like(cache.v)
    rows = torch.full(cache.k.shape[:1], bs)       # rows of each page to compare
    for j in range(-(-n // bs)):                   # block by block, in order
        e = min(n, (j + 1) * bs) - j * bs
        for b in range(2):
            for h in range(hkv):
                p = int(cache.block_table[b, h, j])
                want_k[p, :e, 0] = k[b, j * bs:j * bs + e, h]
                want_v[p, :e, 0] = v[b, j * bs:j * bs + e, h]
                rows[p] = e
    assert (cache.block_table[:, :, :-(-n // bs)] != spare).any()
    for p in range(spare):
        assert torch.equal(cache.k[p, :rows[p]], want_k[p, :rows[p]]), p
        assert torch.equal(cache.v[p, :rows[p]], want_v[p, :rows[p]]), p


def test_head_page_plan_is_kept_and_returned_as_copies():
    layout = ss.local_stride(4, 16, 2, 3, head_offset=1)
    pages, counts = head_page_plan(layout, 500, 4, 2)
    pages.fill_(7)
    again, counts2 = head_page_plan(layout, 500, 4, 2)
    assert not torch.equal(again, pages) and torch.equal(counts2, counts)
    _live_intervals_overlap(layout, 500, 4, 2, 1, again)
    other, _ = head_page_plan(layout, 500, 4, 2, max_query_len=40)
    assert not torch.equal(other, again)


def test_cache_bad_input():
    layout = ss.local_stride(4, 16, 2, 3)
    kw = dict(batch=1, capacity=100, num_heads=4, num_kv_heads=2, head_dim=8)
    with pytest.raises(TypeError, match="layout must be a starshard.BlockLayout"):
        KVCache("local", **kw)
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        KVCache(layout, **{**kw, "capacity": 0})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        KVCache(layout, **{**kw, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="layout has 4 query heads, num_heads is 8"):
        KVCache(layout, **{**kw, "num_heads": 8, "num_kv_heads": 2})
    cache = KVCache(layout, **kw, dtype=torch.float32)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match="at most max_query_len=1 new tokens a call, got 2"):
        cache.attend(q, k, k)
    assert cache.capacity == 112   # whole blocks
    cache.reset(111)
    cache.attend(q[:, :1], k[:, :1], k[:, :1])
    with pytest.raises(ValueError, match="length 113"):
        cache.attend(q[:, :1], k[:, :1], k[:, :1])
    dense = KVCache(layout, **kw, head_sharded=False, dtype=torch.float32)
    assert dense.capacity == 100 and dense.nbytes() == dense.dense_nbytes()
