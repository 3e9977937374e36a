"""Normalisation layers (replicated on every rank)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgis_shard.weights import Weights


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as LLaMA's reference does."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    @classmethod
    def load(cls, weights: Weights, prefix: str, eps: float) -> RMSNorm:
        return cls(weights.get(f"{prefix}.weight"), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.eps = eps

    @classmethod
    def load(cls, weights: Weights, prefix: str, eps: float, bias: bool = True) -> LayerNorm:
        return cls(weights.get(f"{prefix}.weight"), weights.get(f"{prefix}.bias") if bias else None, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
