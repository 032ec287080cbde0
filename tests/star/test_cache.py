"""PositionedKV: segments by global position, in-place growth, truncation."""
import pytest
import torch

from starshard.star.cache import PositionedKV


def _kv(n, start=0, h=2, d=4):
    base = torch.arange(start, start + n, dtype=torch.float32)[None, :, None, None]
    return base.expand(1, n, h, d).clone(), -base.expand(1, n, h, d).clone()


def _check(cache, layer, want):
    """Segments hold exactly the positions in ``want`` (list of (start, n)), values = position."""
    segs = cache.segments(layer)
    assert [(s, k.shape[1]) for s, k, _ in segs] == want
    for s, k, v in segs:
        pos = torch.arange(s, s + k.shape[1], dtype=torch.float32)[None, :, None, None]
        assert torch.equal(k, pos.expand_as(k)) and torch.equal(v, -pos.expand_as(v))


def test_adjacent_appends_join_and_write_in_place():
    c = PositionedKV()
    k0, v0 = _kv(10)
    c.append(0, 0, k0, v0)
    _check(c, 0, [(0, 10)])
    c.append(0, 10, *_kv(3, 10))
    _check(c, 0, [(0, 13)])
    buf = c.segments(0)[0][1]
    for i in range(13, 40):          # decode-like steps: one token each, no new buffer
        c.append(0, i, *_kv(1, i))
        assert c.segments(0)[0][1].data_ptr() == buf.data_ptr()
    _check(c, 0, [(0, 40)])
    assert torch.equal(k0, _kv(10)[0]) and torch.equal(v0, _kv(10)[1])   # given tensors untouched
    assert c.num_tokens(0) == 40 and c.nbytes() == 2 * 40 * 2 * 4 * 4


def test_gaps_make_new_segments_and_layers_are_apart():
    c = PositionedKV()
    c.append(0, 5, *_kv(3, 5))
    c.append(0, 20, *_kv(2, 20))
    c.append(1, 0, *_kv(4))
    _check(c, 0, [(5, 3), (20, 2)])
    _check(c, 1, [(0, 4)])
    assert c.positions(0).tolist() == [5, 6, 7, 20, 21]
    assert len(c) == 2 and c.segments(7) == []


def test_truncate_cuts_at_a_position_and_the_room_is_reused():
    c = PositionedKV()
    c.append(0, 0, *_kv(8))
    c.append(0, 30, *_kv(5, 30))
    c.append(0, 35, *_kv(4, 35))      # joins (30..38), moves into a buffer with room
    c.truncate(33)
    _check(c, 0, [(0, 8), (30, 3)])
    c.append(0, 33, *_kv(6, 33))      # written again over the cut-off tail
    _check(c, 0, [(0, 8), (30, 9)])
    c.truncate(8)
    _check(c, 0, [(0, 8)])
    c.truncate(0)
    assert c.segments(0) == [] and len(c) == 0


def test_truncate_never_writes_into_a_tensor_it_was_given():
    shared_k, shared_v = _kv(20)
    c = PositionedKV()
    c.append(0, 0, shared_k[:, :12], shared_v[:, :12])   # views of a buffer others may use
    c.truncate(6)
    c.append(0, 6, *_kv(2, 6))
    _check(c, 0, [(0, 8)])
    assert torch.equal(shared_k, _kv(20)[0]) and torch.equal(shared_v, _kv(20)[1])


def test_mismatched_k_and_v_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        PositionedKV().append(0, 0, torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 2, 4))
