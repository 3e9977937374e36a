"""ALiBi head slopes (Press et al., "Train Short, Test Long"), as BLOOM and Falcon-RW use them.

The attention kernels add ``slope * (key_pos - query_pos)`` themselves (``paged_attention``'s
``alibi_slopes``); what a model must get right is which slope belongs to which of its heads.
"""

from __future__ import annotations

import math

import torch

from tgis_shard.layers.distributed import TensorParallel


def alibi_slopes(num_heads: int, tp: TensorParallel, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 slopes of this rank's heads, ``[num_heads / world_size]``.

    A head's slope depends on the model's total head count, not on how many heads a rank holds:
    all are computed and the rank keeps its contiguous block, the heads ``Weights.get_heads`` gives it.
    """
    if num_heads % tp.world_size:
        raise ValueError(f"{num_heads} ALiBi heads do not divide over {tp.world_size} ranks")
    # The largest power of two n <= num_heads gets the geometric sequence 2^(-8/n), 2^(-16/n), ...;
    # the remaining heads take the odd terms of the sequence for 2n, which fall between those.
    n = 2 ** math.floor(math.log2(num_heads))
    exponents = [8 * (i + 1) / n for i in range(n)] + [4 * (2 * j + 1) / n for j in range(num_heads - n)]
    per_rank = num_heads // tp.world_size
    mine = exponents[tp.rank * per_rank : (tp.rank + 1) * per_rank]
    return torch.tensor([2.0**-e for e in mine], dtype=torch.float32, device=device)
