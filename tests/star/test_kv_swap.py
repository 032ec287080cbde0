"""benchmarks/star_kv_swap.py's swap: star with every non-anchor host's KV replaced by dense's is
dense again (exact logits); with none replaced it is star's own approximation."""
import sys
from pathlib import Path

import pytest
import torch

from starshard.star import StarEngine
from starshard.star.engine import _num_layers
from starshard.star.testing import tiny_llama

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import star_kv_swap  # noqa: E402

G = torch.Generator().manual_seed(5)
CONTEXT = torch.randint(0, 97, (150,), generator=G)
QUERY = torch.randint(0, 97, (4,), generator=G)


def _logits(eng):
    return eng.generate(QUERY, 1, return_logits=True).logits[0]


def test_swapping_every_later_host_gives_dense_logits():
    model = tiny_llama(0)
    dense = StarEngine(model, method="dense")
    dense.encode(CONTEXT)
    ref = _logits(dense)
    tol = 1e-4 * ref.abs().max().item()
    layers = _num_layers(model)

    star = StarEngine(model, method="star", block_size=40, simulate=4)
    star.encode(CONTEXT)
    assert (_logits(star) - ref).abs().max().item() > 100 * tol   # blockwise encoding differs

    for swap, exact in (([2, 3], True), ([3], False)):
        star = StarEngine(model, method="star", block_size=40, simulate=4)
        star.encode(CONTEXT)
        star_kv_swap._with_dense_kv(star, dense, swap, layers)
        diff = (_logits(star) - ref).abs().max().item()
        assert (diff <= tol) == exact, (swap, diff)
