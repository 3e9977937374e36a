"""Batch surgery on transformers' dynamic KV caches: select rows, concatenate padded.

Caches hold keys and values as [batch, heads, seq, head_dim] per layer. Self-attention caches are
left-padded so that the newest position of every row is the last column; encoder-decoder
cross-attention caches cover the encoder's right-padded positions and use the ``*_right_padded``
variants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def select_rows_right_padded(cache: DynamicCache, rows: torch.Tensor, keep_first: int) -> None:
    """Keeps ``rows`` and the first ``keep_first`` positions of every layer, in place."""
    for layer in _layers(cache):
        layer.keys = layer.keys[rows, :, :keep_first, :]
        layer.values = layer.values[rows, :, :keep_first, :]


def truncate(cache: DynamicCache, length: int) -> None:
    """Keeps the first ``length`` positions of every layer: undoes a step that appended to some
    layers before it failed (views, no copy)."""
    for layer in _layers(cache):
        if layer.keys.shape[-2] > length:
            layer.keys = layer.keys[:, :, :length, :]
            layer.values = layer.values[:, :, :length, :]


def concatenate(caches: Sequence[DynamicCache], length: int) -> DynamicCache:
    """Stacks caches along the batch, left-padding each to ``length`` positions; reuses the first
    and empties the others."""
    return _concatenate(caches, length, _left_pad)


def concatenate_right_padded(caches: Sequence[DynamicCache], length: int) -> DynamicCache:
    """Stacks caches along the batch, right-padding each to ``length`` positions; reuses the first
    and empties the others."""
    return _concatenate(caches, length, _right_pad)


def _concatenate(
    caches: Sequence[DynamicCache], length: int, pad: Callable[[torch.Tensor, int], torch.Tensor]
) -> DynamicCache:
    merged = caches[0]
    per_layer = zip(*(_layers(c) for c in caches), strict=True)
    for target, layers in zip(merged.layers, per_layer, strict=True):
        target.keys = torch.cat([pad(layer.keys, length) for layer in layers])
        target.values = torch.cat([pad(layer.values, length) for layer in layers])
        # Each source layer goes as soon as it is copied: otherwise the joining batches' whole
        # caches outlive the merge (the caller still holds their batches through the next
        # decode), memory the batch-sizing model does not count.
        for consumed in layers[1:]:
            consumed.keys = consumed.keys.new_empty(0)
            consumed.values = consumed.values.new_empty(0)
    return merged


def _left_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - states.shape[-2]
    return F.pad(states, (0, 0, missing, 0)) if missing else states


def _right_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - states.shape[-2]
    return F.pad(states, (0, 0, 0, missing)) if missing else states
