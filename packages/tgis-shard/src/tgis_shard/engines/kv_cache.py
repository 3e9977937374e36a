"""Batch surgery on transformers' dynamic KV caches: select rows, concatenate left-padded.

Caches hold keys and values as [batch, heads, seq, head_dim] per layer, left-padded so that the
newest position of every row is the last column.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = cache.layers
    for layer in layers:
        # Sliding-window and quantized layers keep extra state that plain row surgery would break.
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"hf_transformers batching does not support {type(layer).__name__} caches")
    return layers


def select_rows(cache: DynamicCache, rows: torch.Tensor, keep_last: int) -> None:
    """Keeps ``rows`` and the last ``keep_last`` positions of every layer, in place."""
    for layer in _layers(cache):
        layer.keys = layer.keys[rows, :, -keep_last:, :]
        layer.values = layer.values[rows, :, -keep_last:, :]


def concatenate(caches: Sequence[DynamicCache], length: int) -> DynamicCache:
    """Stacks caches along the batch, left-padding each to ``length`` positions; reuses the first."""
    merged = caches[0]
    per_layer = zip(*(_layers(c) for c in caches), strict=True)
    for target, layers in zip(merged.layers, per_layer, strict=True):
        target.keys = torch.cat([_left_pad(layer.keys, length) for layer in layers])
        target.values = torch.cat([_left_pad(layer.values, length) for layer in layers])
    return merged


def _left_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - states.shape[-2]
    return F.pad(states, (0, 0, missing, 0)) if missing else states
