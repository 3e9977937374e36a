"""Normalisation layers (replicated on every rank)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgis_shard.layers import fused
from tgis_shard.weights import Weights


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as LLaMA's reference does (``fused.rms_norm``)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    @classmethod
    def load(cls, weights: Weights, prefix: str, eps: float) -> RMSNorm:
        return cls(weights.get(f"{prefix}.weight"), eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream's next value ``x + residual`` and its norm, ``(normed, summed)``, in
        one kernel on GPUs."""
        return fused.add_rms_norm(x, residual, self.weight, self.eps)


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
