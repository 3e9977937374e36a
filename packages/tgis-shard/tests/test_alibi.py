"""ALiBi slopes: the paper's values, and every rank's slice of the full model's slopes."""

from __future__ import annotations

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from tgis_shard.layers.alibi import alibi_slopes
from tgis_shard.layers.distributed import SINGLE, TensorParallel


def _reference_slopes(num_heads: int) -> torch.Tensor:
    """transformers' BLOOM biases of the key at position 1 (of 2) are the slopes themselves."""
    return build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1]


def test_eight_heads_get_halving_slopes() -> None:
    expected = torch.tensor([2.0 ** -(i + 1) for i in range(8)])
    assert torch.equal(alibi_slopes(8, SINGLE), expected)


@pytest.mark.parametrize(("num_heads", "world_size"), [(4, 2), (6, 2), (12, 4), (112, 8)])
def test_ranks_slices_concatenate_to_the_reference_slopes(num_heads: int, world_size: int) -> None:
    # Non-powers of two (6, 12, BLOOM-176B's 112) take the interleaved extra slopes.
    ranks = [alibi_slopes(num_heads, TensorParallel(rank, world_size, None)) for rank in range(world_size)]
    assert all(len(slopes) == num_heads // world_size for slopes in ranks)
    torch.testing.assert_close(torch.cat(ranks), _reference_slopes(num_heads))


def test_heads_that_do_not_divide_over_the_ranks_are_refused() -> None:
    with pytest.raises(ValueError, match="6 ALiBi heads do not divide over 4 ranks"):
        alibi_slopes(6, TensorParallel(0, 4, None))
