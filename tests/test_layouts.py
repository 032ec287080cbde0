"""Tests for starshard.layouts against plain-Python references of DESIGN.md's rules.

Every reference below is written from the text of DESIGN.md ("Positions", "The local-stride
rule") and the TileTable docstring with loops, independently of the vectorised code under test.
"""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import starshard as ss
from starshard import layouts as L
from starshard.layouts import (BlockLayout, TileTable, build_tile_table, kv_block_table,
                               local_stride, tile_table)


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------

def ref_local_stride_mask(num_heads, local_blocks, vert_stride, nbq, nbk, q_block_start=None, *,
                          causal=True, homo_head=False, num_dense_heads=0, head_offset=0,
                          head_step=None, num_kv_heads=None, head_range=None):
    """Bool [b - a, nbq, nbk] by DESIGN.md's local-stride rule, with plain loops."""
    H = num_heads if num_kv_heads is None else num_kv_heads
    group = num_heads // H
    if homo_head:
        step = 0
    elif head_step is None:
        step = max(1, vert_stride // H)
    else:
        step = head_step
    a, b = (0, num_heads) if head_range is None else head_range
    if q_block_start is None:
        q_block_start = nbk - nbq
    out = []
    for hq in range(a, b):
        h = hq // group                       # pattern index: the KV head under GQA
        dense = h >= H - num_dense_heads      # the LAST heads of the index space are dense
        rows = []
        for r in range(nbq):
            i = q_block_start + r
            row = []
            for j in range(nbk):
                if i < 0:
                    ok = False
                elif causal and j > i:
                    ok = False
                elif dense:
                    ok = True
                else:
                    near = (i - j < local_blocks) if causal else (abs(i - j) < local_blocks)
                    ok = near or (j + h * step + head_offset) % vert_stride == 0
                row.append(ok)
            rows.append(row)
        out.append(rows)
    return torch.tensor(out, dtype=torch.bool).reshape(b - a, nbq, nbk)


def ref_pairs(block_mask, bs, q_len, k_len, causal, q_start=None, k_start=0):
    """Brute-force count over token pairs. block_mask: bool [H, NB, NB] over absolute blocks."""
    if q_start is None:
        q_start = k_start + k_len - q_len
    m = block_mask.tolist()
    nb = block_mask.shape[-1]
    # heads allowing each block pair (the token loop below is the brute force)
    cnt = [[sum(m[h][i][j] for h in range(len(m))) for j in range(nb)] for i in range(nb)]
    total = 0
    for t in range(q_len):
        p = q_start + t
        if p < 0:
            continue
        for s in range(k_len):
            pk = k_start + s
            if causal and pk > p:
                continue
            total += cnt[p // bs][pk // bs]
    return total


def blocks_needed(bs, *ends):
    return max(1, max(-(-e // bs) for e in ends))


# ---------------------------------------------------------------------------------------------
# local_stride: mask() against the rule
# ---------------------------------------------------------------------------------------------

LS_CASES = [
    # (num_heads, bs, local, vert, kwargs)
    (4, 16, 2, 4, {}),
    (4, 16, 2, 4, dict(causal=False)),
    (8, 32, 3, 8, dict(head_offset=1)),
    (8, 32, 3, 8, dict(head_offset=-5, causal=False)),
    (3, 64, 1, 5, dict(head_step=2)),
    (3, 64, 1, 5, dict(head_step=7, head_offset=3, causal=False)),
    (6, 16, 2, 3, dict(homo_head=True)),
    (6, 16, 2, 3, dict(homo_head=True, head_step=0, causal=False)),
    (5, 16, 1, 4, dict(num_dense_heads=2)),
    (5, 16, 1, 4, dict(num_dense_heads=5)),
    (4, 128, 0, 3, {}),                                  # strided only
    (4, 128, 0, 3, dict(causal=False)),
    (2, 16, 100, 7, {}),                                 # window covers everything
    (4, 16, 2, 1, {}),                                   # vert_stride 1: every column
    (8, 16, 2, 8, dict(num_kv_heads=2)),
    (8, 16, 2, 8, dict(num_kv_heads=2, num_dense_heads=1, head_offset=2)),
    (12, 32, 1, 6, dict(num_kv_heads=4, causal=False, head_step=1)),
    (8, 16, 2, 8, dict(num_kv_heads=4, head_range=(2, 6))),
    (8, 16, 2, 8, dict(num_kv_heads=4, head_range=(6, 8), num_dense_heads=1)),
    (8, 16, 2, 5, dict(head_range=(3, 7), num_dense_heads=2, head_offset=1)),
    (8, 16, 2, 5, dict(head_range=(0, 1), causal=False)),
    (32, 64, 16, 8, dict(head_offset=1)),                # Phi-3-small
]


@pytest.mark.parametrize("num_heads,bs,local,vert,kw", LS_CASES)
@pytest.mark.parametrize("nbq,nbk,qbs", [(7, 7, None), (3, 11, None), (5, 9, 0), (4, 6, 10),
                                          (6, 4, None), (2, 5, -3), (1, 40, None), (0, 3, None)])
def test_local_stride_mask_matches_rule(num_heads, bs, local, vert, kw, nbq, nbk, qbs):
    layout = local_stride(num_heads, bs, local, vert, **kw)
    got = layout.mask(nbq, nbk, qbs) if qbs is not None else layout.mask(nbq, nbk)
    ref = ref_local_stride_mask(num_heads, local, vert, nbq, nbk, qbs, **kw)
    assert got.dtype == torch.bool
    assert got.shape == ref.shape
    assert torch.equal(got, ref)
    # the default q_block_start is nbk - nbq
    if qbs is None:
        assert torch.equal(got, layout.mask(nbq, nbk, nbk - nbq))


def test_local_stride_attributes():
    lay = local_stride(8, 32, 2, 8, num_kv_heads=4, head_range=(2, 6))
    assert lay.block_size == 32
    assert lay.num_heads == 4
    assert lay.num_pattern_heads == 2
    assert lay.num_blocks is None
    assert lay.pattern_index(torch.arange(4)).tolist() == [0, 0, 1, 1]
    lay = local_stride(8, 16, 2, 8, num_kv_heads=2)
    assert (lay.num_heads, lay.num_pattern_heads) == (8, 2)
    assert lay.pattern_index(torch.arange(8)).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    lay = local_stride(5, 16, 2, 8)
    assert (lay.num_heads, lay.num_pattern_heads) == (5, 5)
    assert lay.pattern_index(torch.arange(5)).tolist() == [0, 1, 2, 3, 4]
    assert ss.local_stride is local_stride and ss.BlockLayout is BlockLayout


def _rows_as_sets(mask2d):
    return [set(torch.nonzero(r).flatten().tolist()) for r in mask2d]


def test_phi3_small_rows_by_hand():
    # Phi-3-small: 32 heads, block 64, 16 local blocks, vertical stride 8, head offset 1:
    # head h reads key block j iff j <= i and (i - j < 16 or (j + h + 1) % 8 == 0).
    lay = local_stride(32, 64, 16, 8, head_offset=1)
    m = lay.mask(1, 31, q_block_start=30)[:, 0]          # query block 30, key blocks 0..30
    window = set(range(15, 31))
    assert _rows_as_sets(m[0:1])[0] == {7} | window
    assert _rows_as_sets(m[3:4])[0] == {4, 12} | window
    assert _rows_as_sets(m[7:8])[0] == {0, 8} | window
    assert _rows_as_sets(m[8:9])[0] == {7} | window       # head_step 1, period 8
    assert _rows_as_sets(m[31:32])[0] == {0, 8} | window
    # a narrow window shows the strides better: query block 20
    lay = local_stride(32, 64, 2, 8, head_offset=1)
    m = lay.mask(1, 25, q_block_start=20)[:, 0]
    rows = _rows_as_sets(m)
    assert rows[0] == {7, 15, 19, 20}
    assert rows[1] == {6, 14, 19, 20}
    assert rows[6] == {1, 9, 17, 19, 20}
    assert rows[7] == {0, 8, 16, 19, 20}
    assert rows[8] == rows[0] and rows[31] == rows[7] and rows[17] == rows[1]
    # every key block is read by some head (the heads together cover the context)
    full = lay.mask(40, 40)
    cover = full.any(0)
    assert cover.tril().equal(torch.ones(40, 40, dtype=torch.bool).tril())


def test_head_step_defaults_by_hand():
    # 2 heads, vert_stride 8: head_step = 8 // 2 = 4
    m = local_stride(2, 16, 1, 8).mask(1, 17, 16)[:, 0]
    assert _rows_as_sets(m) == [{0, 8, 16}, {4, 12, 16}]
    # 16 heads, vert_stride 8: head_step = max(1, 0) = 1
    m = local_stride(16, 16, 1, 8).mask(1, 17, 16)[:, 0]
    assert _rows_as_sets(m)[1] == {7, 15, 16}
    assert _rows_as_sets(m)[9] == _rows_as_sets(m)[1]
    # GQA: H in the default is the KV-head count: 8 // 2 = 4, not 8 // 8 = 1
    m = local_stride(8, 16, 1, 8, num_kv_heads=2).mask(1, 17, 16)[:, 0]
    rows = _rows_as_sets(m)
    assert rows[:4] == [{0, 8, 16}] * 4
    assert rows[4:] == [{4, 12, 16}] * 4
    # explicit head_step and homo_head
    m = local_stride(3, 16, 1, 8, head_step=3).mask(1, 17, 16)[:, 0]
    assert _rows_as_sets(m) == [{0, 8, 16}, {5, 13, 16}, {2, 10, 16}]
    m = local_stride(3, 16, 1, 8, homo_head=True).mask(1, 17, 16)[:, 0]
    assert _rows_as_sets(m) == [{0, 8, 16}] * 3
    # non-causal: the window reaches forward and strides reach past the diagonal
    m = local_stride(2, 16, 2, 8, causal=False).mask(1, 20, 5)[:, 0]
    assert _rows_as_sets(m) == [{0, 4, 5, 6, 8, 16}, {4, 5, 6, 12}]


def test_dense_heads_are_the_last():
    lay = local_stride(4, 16, 1, 8, num_dense_heads=1)
    m = lay.mask(10, 10)
    tril = torch.ones(10, 10, dtype=torch.bool).tril()
    assert torch.equal(m[3], tril)
    assert not torch.equal(m[0], tril)
    # GQA: the last KV head is dense, i.e. the last group of query heads
    m = local_stride(8, 16, 1, 8, num_kv_heads=4, num_dense_heads=1).mask(10, 10)
    assert torch.equal(m[6], tril) and torch.equal(m[7], tril)
    assert not any(torch.equal(m[h], tril) for h in range(6))
    # non-causal dense heads are fully dense
    m = local_stride(2, 16, 1, 8, num_dense_heads=1, causal=False).mask(6, 6)
    assert m[1].all() and not m[0].all()


def test_gqa_groups_share_their_kv_head_pattern():
    lay = local_stride(12, 16, 1, 6, num_kv_heads=3, head_offset=2)
    m = lay.mask(20, 20)
    for h in range(12):
        assert torch.equal(m[h], m[(h // 4) * 4])
    assert not torch.equal(m[0], m[4]) and not torch.equal(m[4], m[8])


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_dense_heads=3, head_offset=1),
    dict(num_kv_heads=4),
    dict(num_kv_heads=4, num_dense_heads=1, causal=False),
    dict(num_kv_heads=2, homo_head=True),
    dict(head_step=3),
])
def test_head_range_is_a_slice_of_the_full_layout(kw):
    full = local_stride(8, 16, 2, 8, **kw)
    fm = full.mask(12, 12)
    group = 8 // kw.get("num_kv_heads", 8)
    for a, b in itertools.combinations(range(0, 9, group), 2):
        part = local_stride(8, 16, 2, 8, head_range=(a, b), **kw)
        assert part.num_heads == b - a
        assert part.num_pattern_heads == (b - a) // group
        assert torch.equal(part.mask(12, 12), fm[a:b])
        assert torch.equal(part.mask(3, 12, 4), full.mask(3, 12, 4)[a:b])
        assert part.pairs(150, 170) == sum(
            local_stride(8, 16, 2, 8, head_range=(h, h + group), **kw).pairs(150, 170)
            for h in range(a, b, group))
    # pairs of the parts add up to the whole
    parts = [local_stride(8, 16, 2, 8, head_range=(h, h + group), **kw) for h in range(0, 8, group)]
    assert sum(p.pairs(99, 123, q_start=31) for p in parts) == full.pairs(99, 123, q_start=31)


@pytest.mark.parametrize("kw", [dict(), dict(num_kv_heads=4, num_dense_heads=1),
                                dict(num_kv_heads=2, head_offset=1)])
def test_for_heads_equals_head_range(kw):
    """for_heads slices any layout like local_stride's head_range (and a mask layout by rows)."""
    full = local_stride(8, 16, 2, 8, **kw)
    group = 8 // kw.get("num_kv_heads", 8)
    for a, b in itertools.combinations(range(0, 9, group), 2):
        part = full.for_heads(a, b)
        same = local_stride(8, 16, 2, 8, head_range=(a, b), **kw)
        assert (part.num_heads, part.num_pattern_heads) == (same.num_heads, same.num_pattern_heads)
        assert torch.equal(part.mask(5, 12, 7), same.mask(5, 12, 7))
        assert part.pairs(150, 170) == same.pairs(150, 170)
        assert part == full.for_heads(a, b)
        assert (b - a == 8) or "for_heads" in repr(part)
    assert full.for_heads(0, 8) is full
    if group > 1:
        with pytest.raises(ValueError, match="GQA groups"):
            full.for_heads(1, 8)
        # inside one group: those query heads share their KV head's pattern
        part = full.for_heads(group + 1, 2 * group)
        assert (part.num_heads, part.num_pattern_heads) == (group - 1, 1)
        assert torch.equal(part.mask(5, 12, 7), full.mask(5, 12, 7)[group + 1:2 * group])
    with pytest.raises(ValueError, match="head range"):
        full.for_heads(3, 9)
    m = full.mask(6, 6)
    fm = BlockLayout.from_mask(m, 16)
    assert torch.equal(fm.for_heads(2, 6).mask(6, 6), m[2:6])
    shared = BlockLayout.from_mask(m[0], 16)
    assert shared.for_heads(0, 1) is shared


def test_layout_identity_and_hash():
    a = local_stride(8, 16, 2, 8, head_offset=1)
    b = local_stride(8, 16, 2, 8, head_offset=1)
    assert a == b and hash(a) == hash(b) and a.key == b.key
    assert a != local_stride(8, 16, 2, 8, head_offset=2)
    assert a != local_stride(8, 16, 2, 8, head_offset=1, causal=False)
    assert a != local_stride(8, 16, 3, 8, head_offset=1)
    assert a != local_stride(8, 32, 2, 8, head_offset=1)
    assert a != local_stride(8, 16, 2, 8, head_offset=1, num_dense_heads=1)
    assert a != local_stride(8, 16, 2, 8, head_offset=1, head_step=2)
    assert a != local_stride(8, 16, 2, 8, head_offset=1, head_range=(0, 4))
    assert a != local_stride(8, 16, 2, 8, head_offset=1, num_kv_heads=2)
    # homo_head is head_step 0: same pattern
    assert torch.equal(local_stride(4, 16, 2, 8, homo_head=True).mask(9, 9),
                       local_stride(4, 16, 2, 8, head_step=0).mask(9, 9))
    m = torch.ones(3, 3, dtype=torch.bool)
    f1, f2 = BlockLayout.from_mask(m, 16), BlockLayout.from_mask(~m.tril(-1), 16)
    assert f1 != f2 and f1.key != f2.key
    assert "local_stride" in repr(a) and "from_mask" in repr(f1)


# ---------------------------------------------------------------------------------------------
# from_mask
# ---------------------------------------------------------------------------------------------

def _rand_mask(shape, seed, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


@pytest.mark.parametrize("bs", [16, 32, 64, 128])
def test_from_mask_round_trip_3d(bs):
    m = _rand_mask((3, 9, 9), bs)
    lay = BlockLayout.from_mask(m, bs)
    assert (lay.num_heads, lay.num_pattern_heads, lay.num_blocks, lay.block_size) == (3, 3, 9, bs)
    assert torch.equal(lay.mask(9, 9), m)               # above-diagonal entries kept by mask()
    assert torch.equal(lay.mask(4, 9), m[:, 5:9, :9])   # default q_block_start = nbk - nbq
    assert torch.equal(lay.mask(3, 6), m[:, 3:6, :6])
    assert torch.equal(lay.mask(3, 7, 1), m[:, 1:4, :7])
    neg = lay.mask(4, 5, -2)                            # negative query blocks attend nothing
    assert not neg[:, :2].any() and torch.equal(neg[:, 2:], m[:, 0:2, :5])
    assert lay.mask(0, 4).shape == (3, 0, 4)
    # the layout owns a copy
    m2 = m.clone()
    lay2 = BlockLayout.from_mask(m2, bs)
    m2.fill_(False)
    assert torch.equal(lay2.mask(9, 9), m)


def test_from_mask_2d_shared_by_all_heads():
    m = _rand_mask((6, 6), 7)
    lay = BlockLayout.from_mask(m, 32)
    assert lay.num_pattern_heads == 1
    assert torch.equal(lay.mask(6, 6), m.unsqueeze(0))
    got = lay.mask(6, 6, num_heads=4)
    assert got.shape == (4, 6, 6) and torch.equal(got, m.expand(4, 6, 6))
    assert lay.pattern_index(torch.arange(4)).tolist() == [0, 0, 0, 0]
    assert lay.pairs(150, 170, num_heads=4) == 4 * lay.pairs(150, 170)
    assert lay.pairs(150, 170) == ref_pairs(m.unsqueeze(0), 32, 150, 170, True)
    assert lay.pairs(150, 170, False) == ref_pairs(m.unsqueeze(0), 32, 150, 170, False)
    # the 3-D layout knows its head count
    lay3 = BlockLayout.from_mask(m.expand(2, 6, 6), 32)
    with pytest.raises(ValueError, match="heads"):
        lay3.mask(2, 2, num_heads=3)
    with pytest.raises(ValueError, match="heads"):
        lay3.pairs(10, 10, num_heads=3)


def test_from_mask_accepts_views_and_other_devices_args():
    m = _rand_mask((8, 8), 3)
    lay = BlockLayout.from_mask(m.t(), 16)              # non-contiguous view
    assert torch.equal(lay.mask(8, 8), m.t().unsqueeze(0))
    m3 = _rand_mask((4, 8, 8), 4)[::2]                  # strided over heads
    lay = BlockLayout.from_mask(m3, 16)
    assert torch.equal(lay.mask(8, 8), m3)


def test_from_mask_extent_errors():
    bs, nb = 16, 4
    lay = BlockLayout.from_mask(torch.ones(2, nb, nb, dtype=torch.bool), bs)
    lay.mask(nb, nb)
    lay.mask(2, nb, 2)
    with pytest.raises(ValueError, match="blocks"):
        lay.mask(1, nb + 1)
    with pytest.raises(ValueError, match="blocks"):
        lay.mask(2, 3, 3)                                # query blocks 3, 4
    lay.check_positions(nb * bs, nb * bs)
    lay.check_positions(1, 1)
    with pytest.raises(ValueError, match="blocks"):
        lay.check_positions(nb * bs + 1, 10)
    with pytest.raises(ValueError, match="blocks"):
        lay.check_positions(10, nb * bs + 1)
    assert lay.pairs(nb * bs, nb * bs) == 2 * nb * bs * (nb * bs + 1) // 2
    assert lay.pairs(10, 10, k_start=nb * bs - 10) == 2 * 55
    with pytest.raises(ValueError, match="blocks"):
        lay.pairs(10, nb * bs + 1)
    with pytest.raises(ValueError, match="blocks"):
        lay.pairs(10, 10, k_start=nb * bs - 9)
    with pytest.raises(ValueError, match="blocks"):
        lay.pairs(10, 10, q_start=nb * bs - 9)
    with pytest.raises(ValueError, match="blocks"):
        kv_block_table(lay, 1, nb + 1)
    # local_stride layouts extend to any length
    local_stride(2, 16, 1, 4).check_positions(10 ** 6, 10 ** 6)


# ---------------------------------------------------------------------------------------------
# pairs / density
# ---------------------------------------------------------------------------------------------

PAIR_LENGTHS = [
    # (q_len, k_len, q_start, k_start)
    (100, 100, None, 0), (37, 211, None, 0), (1, 333, None, 0), (70, 70, 0, 0),
    (50, 120, 3, 0), (40, 90, None, 17), (60, 30, None, 0),       # default q_start < 0
    (20, 50, -7, 0), (20, 50, -40, 5), (33, 97, 150, 11), (64, 64, 64, 64), (5, 0, None, 0),
    (0, 9, None, 0), (129, 1, None, 300),
]


@pytest.mark.parametrize("num_heads,bs,local,vert,kw", LS_CASES[::2] + [LS_CASES[-5]])
@pytest.mark.parametrize("causal", [True, False])
def test_pairs_local_stride_brute_force(num_heads, bs, local, vert, kw, causal):
    lay = local_stride(num_heads, bs, local, vert, **kw)
    for q_len, k_len, q_start, k_start in PAIR_LENGTHS:
        qs = k_start + k_len - q_len if q_start is None else q_start
        nb = blocks_needed(bs, qs + q_len, k_start + k_len)
        ref_m = ref_local_stride_mask(num_heads, local, vert, nb, nb, 0, **kw)
        want = ref_pairs(ref_m, bs, q_len, k_len, causal, q_start, k_start)
        if q_start is None:
            got = lay.pairs(q_len, k_len, causal, k_start=k_start)
        else:
            got = lay.pairs(q_len, k_len, causal, q_start=q_start, k_start=k_start)
        assert got == want, (q_len, k_len, q_start, k_start)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("causal", [True, False])
def test_pairs_from_mask_brute_force(seed, causal):
    bs = (16, 32, 64, 128)[seed]
    nb = 7
    m = _rand_mask((3, nb, nb), 100 + seed, p=0.4)
    lay = BlockLayout.from_mask(m, bs)
    n = nb * bs
    cases = [(n, n, None, 0), (n - 5, n, None, 0), (13, n - 3, None, 0), (bs + 3, 2 * bs, 1, bs - 1),
             (bs, n - bs, -3, bs), (2 * bs + 1, 3 * bs, n - 2 * bs - 1, 0), (7, 0, None, 0)]
    for q_len, k_len, q_start, k_start in cases:
        want = ref_pairs(m, bs, q_len, k_len, causal, q_start, k_start)
        kw = {} if q_start is None else dict(q_start=q_start)
        assert lay.pairs(q_len, k_len, causal, k_start=k_start, **kw) == want


def test_pairs_small_cases_by_hand():
    # one head, block 16, local window of one block, no strides reach (vert_stride huge)
    lay = local_stride(1, 16, 1, 1000, head_offset=1)
    # 16 tokens in one block: causal pairs = 16*17/2
    assert lay.pairs(16, 16) == 136
    assert lay.pairs(16, 16, False) == 256
    # 32 tokens: only the two diagonal blocks
    assert lay.pairs(32, 32) == 2 * 136
    # a single query at position 31 (default q_start): keys 16..31
    assert lay.pairs(1, 32) == 16
    assert lay.pairs(1, 32, q_start=15) == 16
    assert lay.pairs(1, 32, q_start=15, causal=False) == 16
    assert lay.pairs(1, 32, q_start=-1) == 0
    # dense heads: every causal pair
    dense = local_stride(3, 16, 0, 7, num_dense_heads=3)
    assert dense.pairs(50, 50) == 3 * 50 * 51 // 2
    # a causal layout drops the blocks above the diagonal, even for a non-causal call
    assert dense.pairs(50, 50, False) == 3 * (50 * 50 - (50 * 50 - (16 * 16 * 3 + 2 * 2)) // 2)
    assert local_stride(3, 16, 0, 7, num_dense_heads=3, causal=False).pairs(50, 50, False) == 3 * 2500
    assert dense.pairs(10, 50) == 3 * sum(range(41, 51))


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100, 257])
def test_density(n):
    for lay in (local_stride(4, 16, 0, 5, num_dense_heads=4),
                local_stride(8, 32, 0, 5, num_kv_heads=2, num_dense_heads=2),
                local_stride(4, 16, 2, 1),
                local_stride(2, 64, 10 ** 6, 9)):
        assert lay.density(n) == 1.0
    lay = local_stride(6, 16, 2, 4, head_offset=1)
    nb = blocks_needed(16, n)
    want = ref_pairs(ref_local_stride_mask(6, 2, 4, nb, nb, 0, head_offset=1), 16, n, n, True)
    assert math.isclose(lay.density(n), want / (6 * n * (n + 1) / 2), rel_tol=1e-12)
    m = _rand_mask((2, nb, nb), n)
    fm = BlockLayout.from_mask(m, 16)
    assert math.isclose(fm.density(n), ref_pairs(m, 16, n, n, True) / (2 * n * (n + 1) / 2),
                        rel_tol=1e-12)


def test_density_is_sparse_for_long_sequences():
    lay = local_stride(32, 64, 16, 8, head_offset=1)
    d = lay.density(64 * 1024)
    # window 16 blocks + 1/8 of the older ones, of 1024 blocks
    assert 0.12 < d < 0.16


# ---------------------------------------------------------------------------------------------
# is_kv_efficient
# ---------------------------------------------------------------------------------------------

def ref_kv_efficient(m):
    P, nb, _ = m.shape
    ml = m.tolist()
    for h in range(P):
        for j in range(nb):
            for i in range(j, nb - 1):
                if not ml[h][i][j] and ml[h][i + 1][j]:
                    return False
    return True


@pytest.mark.parametrize("kw", [dict(), dict(head_offset=3), dict(num_kv_heads=2, num_dense_heads=1),
                                dict(homo_head=True), dict(causal=False), dict(head_range=(2, 4))])
def test_local_stride_is_kv_efficient(kw):
    lay = local_stride(4, 16, 3, 5, **kw)
    assert lay.is_kv_efficient()
    assert lay.is_kv_efficient(40)
    assert local_stride(4, 16, 0, 3, **kw).is_kv_efficient()


def test_from_mask_kv_efficiency():
    tril = torch.ones(6, 6, dtype=torch.bool).tril()
    band = tril & ~torch.ones(6, 6, dtype=torch.bool).tril(-2)
    mono = band.clone()
    mono[:, 0] = tril[:, 0]          # a column read by every later block
    assert BlockLayout.from_mask(mono, 16).is_kv_efficient()
    assert BlockLayout.from_mask(band, 16).is_kv_efficient()
    # query block 4 re-reads key block 0 that query blocks 2 and 3 skipped
    bad = band.clone()
    bad[4, 0] = True
    assert not BlockLayout.from_mask(bad, 16).is_kv_efficient()
    # only one of three heads breaks it
    assert not BlockLayout.from_mask(torch.stack([mono, bad, band]), 16).is_kv_efficient()
    assert BlockLayout.from_mask(torch.stack([mono, band, mono]), 16).is_kv_efficient()
    # entries above the diagonal are ignored
    upper = mono.clone()
    upper[0, 3] = True               # above the diagonal, "skipped" at row 1, read at row 3
    assert BlockLayout.from_mask(upper, 16).is_kv_efficient()
    # diagonal skipped, then read later
    late = band.clone()
    late[2, 2] = False
    assert not BlockLayout.from_mask(late, 16).is_kv_efficient()


@pytest.mark.parametrize("seed", range(12))
def test_kv_efficiency_random_masks(seed):
    g = torch.Generator().manual_seed(seed)
    P, nb = 2, 8
    # monotone columns: block j is read by query blocks j .. end[h, j] - 1, then a random flip
    end = torch.randint(0, nb + 1, (P, 1, nb), generator=g)
    i = torch.arange(nb).view(1, -1, 1)
    m = (i < end) | (torch.rand(P, nb, nb, generator=g) < 0.3).triu(1)
    if seed % 2:
        h, a, b = (torch.randint(0, n, (1,), generator=g).item() for n in (P, nb, nb))
        m[h, a, b] = ~m[h, a, b]
    assert BlockLayout.from_mask(m, 32).is_kv_efficient() == ref_kv_efficient(m)


# ---------------------------------------------------------------------------------------------
# kv_block_table
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: local_stride(4, 16, 2, 3, head_offset=1),
    lambda: local_stride(4, 16, 2, 3, causal=False),
    lambda: local_stride(8, 32, 1, 4, num_kv_heads=2, num_dense_heads=1),
    lambda: BlockLayout.from_mask(_rand_mask((3, 12, 12), 5), 64),   # entries above the diagonal
    lambda: BlockLayout.from_mask(_rand_mask((12, 12), 6), 16),
])
@pytest.mark.parametrize("causal", [True, False])
def test_kv_block_table_matches_mask_rows(make, causal):
    lay = make()
    for nbq, nbk, qbs, kbs in [(12, 12, None, 0), (3, 12, None, 0), (5, 9, 2, 0), (4, 8, -2, 0),
                               (1, 1, None, 0), (6, 10, 0, 0), (4, 7, None, 5), (3, 5, 6, 4)]:
        counts, idx = kv_block_table(lay, nbq, nbk, qbs, causal=causal, k_block_start=kbs)
        start = kbs + nbk - nbq if qbs is None else qbs
        m = lay.mask(nbq, kbs + nbk, start)[:, :, kbs:]   # key blocks kbs.., relative indices
        H = m.shape[0]
        assert counts.dtype == torch.int32 and idx.dtype == torch.int32
        assert counts.shape == (H, nbq)
        want_width = 1
        for h in range(H):
            for r in range(nbq):
                cols = [j for j in range(nbk) if m[h, r, j] and (not causal or kbs + j <= start + r)]
                want_width = max(want_width, len(cols))
                assert counts[h, r].item() == len(cols)
                assert idx[h, r, :len(cols)].tolist() == cols
                assert (idx[h, r, len(cols):] == 0).all()
        assert idx.shape == (H, nbq, want_width)


def test_kv_block_table_num_heads_and_empty():
    lay = BlockLayout.from_mask(_rand_mask((5, 5), 9), 16)
    c, i = kv_block_table(lay, 5, 5, num_heads=3)
    c1, i1 = kv_block_table(lay, 5, 5)
    assert c.shape == (3, 5) and torch.equal(c, c1.expand(3, 5)) and torch.equal(i, i1.expand_as(i))
    c, i = kv_block_table(local_stride(2, 16, 1, 2), 0, 5)
    assert c.shape == (2, 0) and i.shape[:2] == (2, 0)


# ---------------------------------------------------------------------------------------------
# build_tile_table
# ---------------------------------------------------------------------------------------------

def check_tile_table(tt, M, bs, *, transpose, tile, unit, group, q_range, k_range, causal,
                     exact_bounds):
    """Check ``tt`` against the TileTable contract. M: bool [P, NB, NB] pattern-head block mask
    over absolute blocks (anything outside reads False)."""
    P, NB, _ = M.shape
    ml = M.tolist()

    def allowed(p, i, j):
        return 0 <= i < NB and 0 <= j < NB and ml[p][i][j]

    (q_lo, q_hi), (k_lo, k_hi) = q_range, k_range
    t_lo, t_hi = (k_lo, k_hi) if transpose else (q_lo, q_hi)
    u_lo, u_hi = (q_lo, q_hi) if transpose else (k_lo, k_hi)
    sub = min(bs, tile)
    nsub = tile // sub
    full_bits = (1 << nsub) - 1
    assert isinstance(tt, TileTable)
    assert (tt.tile, tt.unit, tt.sub, tt.group) == (tile, unit, sub, group)
    subs = None
    if tt.subs is not None:  # merged key tiles: every key block in range once per pattern head
        assert transpose and nsub > 1 and tt.t0 == 0 and tt.subs.dtype == torch.int32
        subs = tt.subs.tolist()
        T = len(subs[0])
        blocks = list(range(t_lo // bs, (t_hi - 1) // bs + 1))
        for p in range(P):
            flat = [b for row in subs[p] for b in row]
            assert sorted(b for b in flat if b >= 0) == blocks
            assert len(flat) == T * nsub and T == -(-len(blocks) // nsub)
    elif t_hi > t_lo:
        assert tt.t0 == t_lo // tile
        T = (t_hi - 1) // tile + 1 - tt.t0
    else:
        T = 0
    assert tt.num_tiles == T
    for name in ("units", "bits", "nfull", "ntot"):
        x = getattr(tt, name)
        assert x.dtype == torch.int32, name
        assert x.device.type == "cpu"
    L = tt.units.shape[-1]
    assert tt.units.shape == (P, T, L) and tt.bits.shape == (P, T, L)
    assert tt.nfull.shape == (P, T) and tt.ntot.shape == (P, T)
    units_l, bits_l = tt.units.tolist(), tt.bits.tolist()
    nfull_l, ntot_l = tt.nfull.tolist(), tt.ntot.tolist()
    unit_ids = range(u_lo // unit, (u_hi - 1) // unit + 1) if u_hi > u_lo else range(0)
    n_checked = 0
    for p in range(P):
        for t in range(T):
            tile_start = (tt.t0 + t) * tile
            starts = [tile_start + r * sub for r in range(nsub)] if subs is None else \
                [b * bs if b >= 0 else None for b in subs[p][t]]
            tile_end = max(x for x in starts if x is not None) + sub - 1 if any(
                x is not None for x in starts) else tile_start + tile - 1
            want, want_full = {}, set()
            for u in unit_ids:
                us, ue = u * unit, u * unit + unit - 1
                b = 0
                for r in range(nsub):
                    if starts[r] is None:
                        continue
                    ss_, se = starts[r], starts[r] + sub - 1
                    if transpose:   # tile axis = keys, units = queries
                        ok = allowed(p, us // bs, ss_ // bs) and (not causal or ue >= ss_)
                    else:           # tile axis = queries, units = keys
                        ok = allowed(p, ss_ // bs, us // bs) and (not causal or us <= se)
                    if ok:
                        b |= 1 << r
                if b:
                    want[u] = b
                    full = b == full_bits
                    if causal:      # every key <= every query of the pair
                        full = full and (us >= tile_end if transpose else ue <= tile_start)
                    if exact_bounds:
                        full = full and us >= u_lo and ue < u_hi
                    if full:
                        want_full.add(u)
            nf, nt = nfull_l[p][t], ntot_l[p][t]
            row_u, row_b = units_l[p][t], bits_l[p][t]
            ctx = (p, t, nf, nt, row_u, row_b, want, sorted(want_full))
            assert nf % group == 0 and nt % group == 0, ctx
            assert 0 <= nf <= nt <= L, ctx
            assert nf == (len(want_full) // group) * group, ctx
            assert nt == -(-len(want) // group) * group, ctx
            n = len(want)
            listed = row_u[:n]
            # every unit with a nonzero bit appears exactly once, with its bits
            assert -1 not in listed and len(set(listed)) == n, ctx
            assert {u: b for u, b in zip(listed, row_b[:n])} == want, ctx
            # the unmasked part: full units, increasing
            assert all(u in want_full and b == full_bits
                       for u, b in zip(row_u[:nf], row_b[:nf])), ctx
            assert row_u[:nf] == sorted(row_u[:nf]), ctx
            # the masked part: increasing
            assert row_u[nf:n] == sorted(row_u[nf:n]), ctx
            # padding within ntot and past it
            assert all(u == -1 for u in row_u[n:]) and all(b == 0 for b in row_b[n:]), ctx
            n_checked += n
    return n_checked


def pattern_mask_local_stride(num_heads, local, vert, nb, **kw):
    """Reference [P, nb, nb] pattern-head mask of a local_stride layout."""
    H = kw.get("num_kv_heads") or num_heads
    group = num_heads // H
    m = ref_local_stride_mask(num_heads, local, vert, nb, nb, 0, **kw)
    return m[::group]


TT_SHAPES = [(tile, unit, bs) for tile in (32, 64, 128) for bs in (16, 32, 64, 128)
             for unit in (16, 32, 64) if unit <= bs]


def _tt_settings(bs, idx, causal):
    """Ranges not aligned to tiles, groups 1/2/4 and exact_bounds on/off, varied by case."""
    ranges = [
        ((bs + 5, 5 * bs + 3), (3, 5 * bs + 3)),          # prefill: queries end where keys end
        ((2 * bs + 7, 3 * bs + 1), (0, 4 * bs - 9)),       # a chunk of queries, longer keys
        ((0, 3 * bs - 1), (bs // 2 + 1, 6 * bs - 2)),      # keys past the queries
        ((4 * bs + 9, 4 * bs + 10), (0, 4 * bs + 10)),     # one query (decode)
        ((bs + 3, 4 * bs - 1), (1, 4 * bs - 1)),           # ends one short of a unit boundary
    ]
    return [dict(group=(1, 2, 4)[(r + idx) % 3], exact_bounds=bool((r + idx // 2) % 2),
                 q_range=qr, k_range=kr) for r, (qr, kr) in enumerate(ranges)]


# (tile, unit, bs, transpose, merge): merged key tiles exist for blocks smaller than the tile
TT_CASES = [c + (tr, False) for c in TT_SHAPES for tr in (False, True)] + \
    [c + (True, True) for c in TT_SHAPES if c[2] < c[0]]


@pytest.mark.parametrize("tile,unit,bs,transpose,merge", TT_CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_tile_table_contract(tile, unit, bs, transpose, merge, causal):
    idx = TT_SHAPES.index((tile, unit, bs)) + 2 * transpose + causal
    nb = 8 + (tile // bs if tile > bs else 1)
    layouts = [
        # GQA, hetero heads, a dense head, head offset: P = num_kv_heads = 4
        (local_stride(8, bs, 2, 3, num_kv_heads=4, head_offset=1, num_dense_heads=1,
                      causal=causal),
         pattern_mask_local_stride(8, 2, 3, nb, num_kv_heads=4, head_offset=1, num_dense_heads=1,
                                   causal=causal)),
        # tensor-parallel slice of a GQA layout
        (local_stride(8, bs, 1, 4, num_kv_heads=4, head_range=(2, 6), causal=not causal),
         pattern_mask_local_stride(8, 1, 4, nb, num_kv_heads=4, head_range=(2, 6),
                                   causal=not causal)),
    ]
    m = _rand_mask((3, nb, nb), idx, p=0.45)
    layouts.append((BlockLayout.from_mask(m, bs), m))
    checked = 0
    for li, (lay, M) in enumerate(layouts):
        for s in _tt_settings(bs, idx + li, causal):
            tt = build_tile_table(lay, transpose=transpose, tile=tile, unit=unit, device="cpu",
                                  causal=causal, merge=merge, **s)
            assert (tt.subs is not None) == merge
            checked += check_tile_table(tt, M, bs, transpose=transpose, tile=tile, unit=unit,
                                        causal=causal, **s)
    assert checked > 0


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("transpose", [False, True])
def test_tile_table_group_rounding_keeps_order(group, transpose):
    # many full units (strided columns) mixed with partial ones (the window's edge): with a
    # group the full units past the last whole group move to the masked part, in order
    lay = local_stride(4, 16, 3, 4, head_offset=1)
    M = pattern_mask_local_stride(4, 3, 4, 40, head_offset=1)
    for q_range, k_range in [((0, 400), (0, 400)), ((37, 290), (5, 290))]:
        kw = dict(transpose=transpose, tile=128, unit=16, group=group, q_range=q_range,
                  k_range=k_range, causal=True, exact_bounds=True)
        tt = build_tile_table(lay, device="cpu", **kw)
        assert check_tile_table(tt, M, 16, **kw) > 0


def test_merged_key_tiles_group_strided_columns():
    # block 16, window 2, stride 8, tiles of 4 blocks: strided columns (attended by every later
    # query block) share tiles, so far fewer (unit, tile) entries than tiles by position
    lay = local_stride(2, 16, 2, 8, head_offset=3)
    kw = dict(transpose=True, tile=64, unit=16, group=1, q_range=(0, 1024), k_range=(0, 1024),
              causal=True, exact_bounds=True)
    plain = build_tile_table(lay, device="cpu", **kw)
    merged = build_tile_table(lay, device="cpu", merge=True, **kw)
    check_tile_table(merged, pattern_mask_local_stride(2, 2, 8, 64, head_offset=3), 16, **kw)
    assert merged.ntot.sum() < 0.6 * plain.ntot.sum()


def test_tile_table_by_hand():
    # one head, block 16, window of 1 block, strides never hit: the block diagonal
    lay = local_stride(1, 16, 1, 1000, head_offset=1)
    tt = build_tile_table(lay, transpose=False, tile=32, unit=16, group=1, q_range=(0, 64),
                          k_range=(0, 64), causal=True, exact_bounds=True, device="cpu")
    assert tt.t0 == 0 and tt.num_tiles == 2 and tt.sub == 16
    # tile 0: queries 0..31 = sub-blocks 0 (block 0) and 1 (block 1); units 0, 1 (keys 0..31)
    assert tt.ntot[0].tolist() == [2, 2] and tt.nfull[0].tolist() == [0, 0]
    assert tt.units[0, 0, :2].tolist() == [0, 1] and tt.bits[0, 0, :2].tolist() == [1, 2]
    assert tt.units[0, 1, :2].tolist() == [2, 3] and tt.bits[0, 1, :2].tolist() == [1, 2]
    # dense causal, tile 64, unit 16, queries 64..127: units 0..3 full, 4..7 partial
    dense = local_stride(1, 16, 0, 3, num_dense_heads=1)
    tt = build_tile_table(dense, transpose=False, tile=64, unit=16, group=1, q_range=(64, 128),
                          k_range=(0, 128), causal=True, exact_bounds=False, device="cpu")
    assert tt.t0 == 1 and tt.num_tiles == 1 and tt.sub == 16
    assert tt.nfull.tolist() == [[4]] and tt.ntot.tolist() == [[8]]
    assert tt.units[0, 0].tolist() == list(range(8))
    assert tt.bits[0, 0].tolist() == [15, 15, 15, 15, 15, 14, 12, 8]
    # the same, transposed: keys 0..63 in one tile, query units 0..7
    tt = build_tile_table(dense, transpose=True, tile=64, unit=16, group=1, q_range=(0, 128),
                          k_range=(0, 64), causal=True, exact_bounds=False, device="cpu")
    assert tt.nfull.tolist() == [[4]] and tt.ntot.tolist() == [[8]]
    assert tt.units[0, 0].tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert tt.bits[0, 0].tolist() == [15, 15, 15, 15, 1, 3, 7, 15]
    # exact bounds: keys 0..99, unit 6 (keys 96..111) sticks out; no causality
    for exact, nfull in ((True, 6), (False, 7)):
        tt = build_tile_table(dense, transpose=False, tile=32, unit=16, group=1,
                              q_range=(96, 100), k_range=(0, 100), causal=False,
                              exact_bounds=exact, device="cpu")
        assert tt.t0 == 3 and tt.num_tiles == 1
        assert tt.units[0, 0, :7].tolist() == list(range(7)) and tt.ntot.tolist() == [[7]]
        assert tt.bits[0, 0, :7].tolist() == [3] * 7 and tt.nfull.tolist() == [[nfull]]


def test_tile_table_empty_ranges():
    lay = local_stride(4, 32, 2, 4, num_kv_heads=2)
    # no keys: the tiles still cover the queries, with nothing to visit
    for transpose in (False, True):
        qr, kr = ((40, 200), (0, 0)) if not transpose else ((0, 0), (40, 200))
        tt = build_tile_table(lay, transpose=transpose, tile=64, unit=32, group=2, q_range=qr,
                              k_range=kr, causal=True, exact_bounds=True, device="cpu")
        assert tt.t0 == 0 and tt.num_tiles == 4
        assert tt.units.shape[:2] == (2, 4)
        assert (tt.ntot == 0).all() and (tt.nfull == 0).all()
        assert (tt.units == -1).all() and (tt.bits == 0).all()
    # no tiles
    tt = build_tile_table(lay, transpose=False, tile=64, unit=32, group=2, q_range=(50, 50),
                          k_range=(0, 100), causal=True, exact_bounds=True, device="cpu")
    assert tt.num_tiles == 0 and tt.units.shape[:2] == (2, 0)
    # every pair beyond causality: queries before all keys
    tt = build_tile_table(lay, transpose=False, tile=32, unit=32, group=1, q_range=(0, 64),
                          k_range=(64, 128), causal=True, exact_bounds=True, device="cpu")
    assert tt.num_tiles == 2 and (tt.ntot == 0).all() and (tt.units == -1).all()


def test_tile_table_unit_errors_and_cache():
    lay = local_stride(2, 16, 1, 4)
    with pytest.raises(ValueError, match="unit"):
        build_tile_table(lay, transpose=False, tile=64, unit=32, group=1, q_range=(0, 64),
                         k_range=(0, 64), causal=True, exact_bounds=True, device="cpu")
    with pytest.raises(ValueError, match="unit"):
        build_tile_table(local_stride(2, 64, 1, 4), transpose=False, tile=64, unit=48, group=1,
                         q_range=(0, 64), k_range=(0, 64), causal=True, exact_bounds=True,
                         device="cpu")
    kw = dict(transpose=False, tile=64, unit=16, group=2, q_range=(5, 300), k_range=(0, 300),
              causal=True, exact_bounds=True, device="cpu")
    a = tile_table(lay, **kw)
    assert tile_table(local_stride(2, 16, 1, 4), **kw) is a         # equal layouts share it
    b = tile_table(local_stride(2, 16, 1, 4, head_offset=1), **kw)
    assert b is not a and not torch.equal(a.bits, b.bits)
    ref = build_tile_table(lay, **kw)
    assert torch.equal(a.units, ref.units) and torch.equal(a.bits, ref.bits)
    # ranges touching the same tiles and units (none newly whole) share the table ...
    for q_range, k_range in [((6, 300), (0, 300)), ((0, 320), (0, 301)), ((63, 257), (0, 289))]:
        assert tile_table(lay, **{**kw, "q_range": q_range, "k_range": k_range}) is a
    # ... a range that makes the last unit whole, or reaches a new tile, does not
    for q_range, k_range in [((5, 300), (0, 304)), ((5, 321), (0, 300)), ((64, 300), (0, 300))]:
        assert tile_table(lay, **{**kw, "q_range": q_range, "k_range": k_range}) is not a


def test_decode_steps_share_a_table_until_the_keys_cross_a_unit():
    """A decode step (one query on a 16-row tile, keys up to it) reuses the table of the steps
    before it across query tiles, as long as its keys stay in one unit."""
    lay = local_stride(2, 64, 2, 4)
    kw = dict(transpose=False, tile=16, unit=64, group=1, causal=True, exact_bounds=True,
              device="cpu")

    def step(p):
        return tile_table(lay, q_range=(p, p + 1), k_range=(0, p + 1), **kw)

    first = step(200)            # query tile 12; keys end inside unit 3 (192..255)
    assert all(step(p) is first for p in (201, 208, 230, 254))   # tiles 12..15, same unit
    assert step(255) is not first   # keys 0..255: unit 3 now whole
    assert step(256) is not first and step(256) is not step(255)   # a new unit


def test_tables_read_by_a_captured_graph_outlive_the_lru(monkeypatch):
    """While a CUDA graph is captured (simulated here), a cached table is served and kept for
    good, since the graph reads it at every replay; a table never built raises a clear error
    instead of a cryptic failure inside the capture; after capture, eviction spares it."""
    lay = local_stride(2, 16, 1, 4)
    kw = dict(transpose=False, tile=16, unit=16, group=1, causal=True, exact_bounds=True,
              device="cpu")
    monkeypatch.setattr(L, "_CAPTURED_TABLES", {})
    warm = tile_table(lay, q_range=(40, 41), k_range=(0, 41), **kw)
    unused = tile_table(lay, q_range=(56, 57), k_range=(0, 57), **kw)   # built, not captured
    monkeypatch.setattr(L, "is_capturing", lambda device: True)
    assert tile_table(lay, q_range=(40, 41), k_range=(0, 41), **kw) is warm
    with pytest.raises(RuntimeError, match="outside the graph first"):
        tile_table(lay, q_range=(4000, 4001), k_range=(0, 4001), **kw)
    monkeypatch.setattr(L, "is_capturing", lambda device: False)
    for p in range(L._TABLE_CACHE_SIZE + 1):   # push every entry out of the LRU
        tile_table(lay, q_range=(1000 + 16 * p, 1001 + 16 * p), k_range=(0, 1001 + 16 * p), **kw)
    assert all(t is not warm for t in L._TABLE_CACHE.values())
    assert tile_table(lay, q_range=(40, 41), k_range=(0, 41), **kw) is warm
    assert tile_table(lay, q_range=(56, 57), k_range=(0, 57), **kw) is not unused   # rebuilt


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([(64, 16, 16), (64, 32, 64), (32, 16, 32), (16, 16, 16), (128, 64, 128)]),
       st.booleans(), st.booleans(), st.booleans(), st.integers(0, 200), st.integers(0, 130),
       st.integers(0, 200), st.integers(0, 130), st.integers(0, 10**6))
def test_tile_table_cache_shares_only_identical_tables(shape, transpose, causal, exact, q_lo, q_n,
                                                        k_lo, k_n, seed):
    """Whatever ranges the cache maps to one entry, the table's rows for the tiles of the exact
    ranges asked for equal a fresh build's (decode steps reuse tables across lengths; a cached
    table may hold a few more tiles, which the kernels then do not launch)."""
    tile, unit, bs = shape
    lay = BlockLayout.from_mask(_rand_mask((2, 12, 12), seed % 1000, p=0.5), bs)
    kw = dict(transpose=transpose, tile=tile, unit=unit, group=1 + seed % 2, causal=causal,
              exact_bounds=exact, device="cpu", q_range=(q_lo, q_lo + q_n),
              k_range=(k_lo, k_lo + k_n))
    got, ref = tile_table(lay, **kw), build_tile_table(lay, **kw)
    assert (got.tile, got.unit, got.sub, got.group) == (ref.tile, ref.unit, ref.sub, ref.group)
    if ref.num_tiles == 0:
        return
    lo = ref.t0 - got.t0
    assert 0 <= lo and lo + ref.num_tiles <= got.num_tiles
    assert got.num_tiles * tile <= ref.num_tiles * tile + 2 * max(tile, unit)
    rows = slice(lo, lo + ref.num_tiles)
    for name in ("nfull", "ntot"):
        assert torch.equal(getattr(got, name)[:, rows], getattr(ref, name)), name
    width = ref.units.shape[-1]
    assert torch.all(got.units[:, rows, width:] == -1) and torch.all(got.bits[:, rows, width:] == 0)
    for name in ("units", "bits"):
        assert torch.equal(getattr(got, name)[:, rows, :width], getattr(ref, name)), name


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

BAD_CALLS = [
    (lambda: local_stride(4, 48, 1, 4), ValueError, "block_size"),
    (lambda: local_stride(4, 256, 1, 4), ValueError, "block_size"),
    (lambda: local_stride(4, 16.0, 1, 4), TypeError, "block_size"),
    (lambda: local_stride(4, 16, -1, 4), ValueError, "local_blocks"),
    (lambda: local_stride(4, 16, 1.5, 4), TypeError, "local_blocks"),
    (lambda: local_stride(4, 16, 1, 0), ValueError, "vert_stride"),
    (lambda: local_stride(4, 16, 1, -2), ValueError, "vert_stride"),
    (lambda: local_stride(0, 16, 1, 4), ValueError, "num_heads"),
    (lambda: local_stride("4", 16, 1, 4), TypeError, "num_heads"),
    (lambda: local_stride(6, 16, 1, 4, num_kv_heads=4), ValueError, "num_kv_heads"),
    (lambda: local_stride(6, 16, 1, 4, num_kv_heads=0), ValueError, "num_kv_heads"),
    (lambda: local_stride(8, 16, 1, 4, head_range=(2, 2)), ValueError, "head_range"),
    (lambda: local_stride(8, 16, 1, 4, head_range=(-1, 2)), ValueError, "head_range"),
    (lambda: local_stride(8, 16, 1, 4, head_range=(0, 9)), ValueError, "head_range"),
    (lambda: local_stride(8, 16, 1, 4, head_range=(5, 3)), ValueError, "head_range"),
    (lambda: local_stride(8, 16, 1, 4, num_kv_heads=4, head_range=(1, 4)), ValueError, "head_range"),
    (lambda: local_stride(8, 16, 1, 4, num_kv_heads=4, head_range=(2, 5)), ValueError, "head_range"),
    (lambda: local_stride(8, 16, 1, 4, head_range=(0,)), TypeError, "head_range"),
    (lambda: local_stride(8, 16, 1, 4, head_range=(0.0, 2)), TypeError, "head_range"),
    (lambda: local_stride(8, 16, 1, 4, num_dense_heads=9), ValueError, "num_dense_heads"),
    (lambda: local_stride(8, 16, 1, 4, num_kv_heads=2, num_dense_heads=3), ValueError,
     "num_dense_heads"),
    (lambda: local_stride(8, 16, 1, 4, num_dense_heads=-1), ValueError, "num_dense_heads"),
    (lambda: local_stride(8, 16, 1, 4, homo_head=True, head_step=2), ValueError, "head_step"),
    (lambda: local_stride(8, 16, 1, 4, head_step=-1), ValueError, "head_step"),
    (lambda: local_stride(8, 16, 1, 4, head_offset=1.0), TypeError, "head_offset"),
    (lambda: local_stride(8, 16, 1, 4, causal=1), TypeError, "causal"),
    (lambda: BlockLayout.from_mask(torch.ones(4, 4), 16), TypeError, "mask"),
    (lambda: BlockLayout.from_mask(torch.ones(4, 4, dtype=torch.int64), 16), TypeError, "mask"),
    (lambda: BlockLayout.from_mask([[True]], 16), TypeError, "mask"),
    (lambda: BlockLayout.from_mask(torch.ones(4, dtype=torch.bool), 16), ValueError, "mask"),
    (lambda: BlockLayout.from_mask(torch.ones(1, 2, 4, 4, dtype=torch.bool), 16), ValueError, "mask"),
    (lambda: BlockLayout.from_mask(torch.ones(3, 4, dtype=torch.bool), 16), ValueError, "mask"),
    (lambda: BlockLayout.from_mask(torch.ones(2, 3, 4, dtype=torch.bool), 16), ValueError, "mask"),
    (lambda: BlockLayout.from_mask(torch.ones(0, 0, dtype=torch.bool), 16), ValueError, "mask"),
    (lambda: BlockLayout.from_mask(torch.ones(0, 3, 3, dtype=torch.bool), 16), ValueError, "mask"),
    (lambda: BlockLayout.from_mask(torch.ones(3, 3, dtype=torch.bool), 24), ValueError, "block_size"),
    (lambda: local_stride(2, 16, 1, 4).mask(-1, 3), ValueError, "nbq"),
    (lambda: local_stride(2, 16, 1, 4).mask(1, -3), ValueError, "nbk"),
    (lambda: local_stride(2, 16, 1, 4).mask(1.0, 3), TypeError, "nbq"),
    (lambda: local_stride(2, 16, 1, 4).mask(1, 3, 0.5), TypeError, "q_block_start"),
    (lambda: local_stride(2, 16, 1, 4).mask(1, 3, num_heads=3), ValueError, "heads"),
    (lambda: local_stride(2, 16, 1, 4).pairs(-1, 3), ValueError, "q_len"),
    (lambda: local_stride(2, 16, 1, 4).pairs(1, -3), ValueError, "k_len"),
    (lambda: local_stride(2, 16, 1, 4).pairs(1, 3, k_start=-1), ValueError, "k_start"),
    (lambda: local_stride(2, 16, 1, 4).pairs(1, 3, q_start=1.5), TypeError, "q_start"),
    (lambda: local_stride(2, 16, 1, 4).density(0), ValueError, "n"),
]


@pytest.mark.parametrize("call,exc,name", BAD_CALLS,
                         ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_CALLS)])
def test_bad_arguments_raise_naming_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()


# ---------------------------------------------------------------------------------------------
# property test
# ---------------------------------------------------------------------------------------------

@st.composite
def ls_params(draw):
    hkv = draw(st.integers(1, 4))
    group = draw(st.integers(1, 3))
    gqa = draw(st.booleans())
    num_heads = hkv * group if gqa else hkv
    if not gqa:
        group = 1
    kw = dict(causal=draw(st.booleans()), head_offset=draw(st.integers(-3, 12)))
    if gqa:
        kw["num_kv_heads"] = hkv
    if draw(st.booleans()):
        kw["homo_head"] = True
    elif draw(st.booleans()):
        kw["head_step"] = draw(st.integers(0, 6))
    kw["num_dense_heads"] = draw(st.integers(0, hkv))
    if draw(st.booleans()):
        a = draw(st.integers(0, hkv - 1))
        b = draw(st.integers(a + 1, hkv))
        kw["head_range"] = (a * group, b * group)
    bs = draw(st.sampled_from([16, 32, 64, 128]))
    local = draw(st.integers(0, 4))
    vert = draw(st.integers(1, 9))
    return num_heads, bs, local, vert, kw


@settings(max_examples=30, deadline=None)
@given(params=ls_params(), nbk=st.integers(0, 12), nbq=st.integers(0, 12),
       qbs=st.one_of(st.none(), st.integers(-4, 10)), q_len=st.integers(0, 90),
       k_len=st.integers(0, 90), k_start=st.integers(0, 70),
       q_start=st.one_of(st.none(), st.integers(-40, 120)), causal=st.booleans())
def test_property_local_stride_matches_reference(params, nbk, nbq, qbs, q_len, k_len, k_start,
                                                 q_start, causal):
    num_heads, bs, local, vert, kw = params
    lay = local_stride(num_heads, bs, local, vert, **kw)
    got = lay.mask(nbq, nbk, qbs)
    assert torch.equal(got, ref_local_stride_mask(num_heads, local, vert, nbq, nbk, qbs, **kw))
    qs = k_start + k_len - q_len if q_start is None else q_start
    nb = blocks_needed(bs, qs + q_len, k_start + k_len)
    ref_m = ref_local_stride_mask(num_heads, local, vert, nb, nb, 0, **kw)
    want = ref_pairs(ref_m, bs, q_len, k_len, causal, q_start, k_start)
    pkw = {} if q_start is None else dict(q_start=q_start)
    assert lay.pairs(q_len, k_len, causal, k_start=k_start, **pkw) == want
