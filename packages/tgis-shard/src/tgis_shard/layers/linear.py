"""Column- and row-parallel linear layers (Megatron-style tensor parallelism).

A column-parallel layer holds a slice of the output features, so its output stays split across
ranks; the row-parallel layer after it holds the matching slice of the input features and sums
the partial products with one all-reduce. Attention and MLP blocks each need one all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tgis_shard.layers import split_k_matmul
from tgis_shard.layers.distributed import TensorParallel
from tgis_shard.weights import Weights


class ParallelLinear(nn.Module):
    """``x @ weight.T + bias`` with this rank's slice of the weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles = split_k_matmul.tiles_for(x, self.weight)
        if tiles is None:
            return F.linear(x, self.weight, self.bias)
        out = split_k_matmul.matmul(x, self.weight, tiles)
        return out if self.bias is None else out + self.bias


class ColumnParallelLinear(ParallelLinear):
    """Output features split across ranks; no communication."""

    @classmethod
    def load(cls, weights: Weights, prefix: str, bias: bool) -> ColumnParallelLinear:
        return cls.load_fused(weights, [prefix], bias)

    @classmethod
    def load_fused(cls, weights: Weights, prefixes: Sequence[str], bias: bool) -> ColumnParallelLinear:
        """Several projections of the same input as one matmul (e.g. gate and up)."""
        weight = torch.cat([weights.get_sharded(f"{p}.weight", dim=0) for p in prefixes])
        b = torch.cat([weights.get_sharded(f"{p}.bias", dim=0) for p in prefixes]) if bias else None
        return cls(weight, b)

    @classmethod
    def load_qkv(
        cls,
        weights: Weights,
        prefixes: tuple[str, str, str],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool,
    ) -> ColumnParallelLinear:
        """Separate q, k, v projections fused, split by heads; KV heads fewer than ranks are
        replicated so that every rank holds whole heads (multi-query, grouped-query attention)."""
        q, k, v = prefixes
        parts = [
            weights.get_heads(f"{q}.weight", 0, num_heads, head_dim),
            weights.get_heads(f"{k}.weight", 0, num_kv_heads, head_dim),
            weights.get_heads(f"{v}.weight", 0, num_kv_heads, head_dim),
        ]
        biases = None
        if bias:
            biases = torch.cat(
                [
                    weights.get_heads(f"{q}.bias", 0, num_heads, head_dim),
                    weights.get_heads(f"{k}.bias", 0, num_kv_heads, head_dim),
                    weights.get_heads(f"{v}.bias", 0, num_kv_heads, head_dim),
                ]
            )
        return cls(torch.cat(parts), biases)


class RowParallelLinear(ParallelLinear):
    """Input features split across ranks; partial outputs summed with one all-reduce."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallel):
        super().__init__(weight, None)
        # The bias is added once, after the sum, not once per rank.
        self.full_bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.tp = tp

    @classmethod
    def load(cls, weights: Weights, prefix: str, bias: bool, tp: TensorParallel) -> RowParallelLinear:
        weight = weights.get_sharded(f"{prefix}.weight", dim=1)
        return cls(weight, weights.get(f"{prefix}.bias") if bias else None, tp)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output: no all-reduce, no bias. Blocks that add several
        row-parallel outputs (parallel attention and MLP) sum the shares and reduce once."""
        return super().forward(x)  # no bias on this rank: ``full_bias`` is added after the sum

    def add_bias(self, reduced: torch.Tensor) -> torch.Tensor:
        return reduced + self.full_bias if self.full_bias is not None else reduced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_bias(self.tp.all_reduce(self.partial(x)))
