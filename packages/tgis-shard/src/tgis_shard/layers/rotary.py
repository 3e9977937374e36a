"""Rotary position embeddings, with the rope scaling of a model's config.

Inverse frequencies come from transformers' rope functions for scaled variants (linear, llama3,
yarn, ...), so a config means the same thing here as in the reference implementation.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _rope_parameters(config: PretrainedConfig) -> dict:
    parameters = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" not in parameters and hasattr(config, "rope_theta"):
        parameters = {**parameters, "rope_theta": config.rope_theta}
    return parameters


class RotaryEmbedding:
    """cos/sin tables by absolute position, for queries and keys [tokens, heads, head_dim]
    (rotated by ``tgis_shard.layers.fused.rotate``)."""

    def __init__(self, config: PretrainedConfig, head_dim: int, device: torch.device):
        parameters = _rope_parameters(config)
        rope_type = parameters.get("rope_type", "default")
        if rope_type == "default":
            base = float(parameters.get("rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
            self.scaling = 1.0
        elif rope_type == "dynamic":
            # Dynamic NTK rescales with the running length; serving uses one fixed table instead.
            raise NotImplementedError("dynamic NTK rope scaling is not supported by tgis_native")
        else:
            inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device)
        self.inv_freq = inv_freq.float()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for [tokens] positions: each [tokens, head_dim]."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)
