"""transformers' dynamic KV caches for padded batches: layers that append in place, and batch
surgery (select rows, concatenate padded).

Caches hold keys and values as [batch, heads, seq, head_dim] per layer. Self-attention caches are
left-padded so that the newest position of every row is the last column; encoder-decoder
cross-attention caches cover the encoder's right-padded positions and use the ``*_right_padded``
variants.

transformers' own ``DynamicLayer`` concatenates every step: the whole cache is copied for each
token. ``RoomyLayer`` keeps its keys and values as views of buffers with room to spare and
copies only when they are full (or after surgery replaced its tensors); the memory model counts
that room for every row (``MemoryModel.cache_room_tokens``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tgis_shard import pt2

# Positions a layer's buffers hold beyond its length by default: a copy every this many decode
# steps instead of every step, for this much more memory per row.
CACHE_ROOM_TOKENS = 64


class RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` and ``values`` are the used prefix of larger buffers, so
    that a step appends in place. Row surgery hands it new tensors (``adopt``) and the next append
    starts new buffers; ``keep`` (a failed step's undo) shortens the prefix of the same buffers.

    Written for torch.compile too (PT2_COMPILE): the length is a Python int, not read from
    ``keys``, and while there are buffers nothing reads ``keys``, a view of them (a compiled graph
    cannot take a buffer and its view as inputs when it writes to the buffer)."""

    def __init__(self, room: int, max_length: int | None = None) -> None:
        super().__init__()
        self.room = room  # positions a new buffer holds beyond the length that needs it
        self.max_length = max_length  # no buffer grows past this many positions
        self._length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def get_seq_length(self) -> int:
        return self._length

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self._length
        length = used + key_states.shape[-2]
        key_buffer, value_buffer = self._key_buffer, self._value_buffer
        if key_buffer is None or value_buffer is None or length >= key_buffer.shape[-2]:
            key_buffer, value_buffer = self._reallocate(key_states, value_states, length)
        key_buffer[:, :, used:length] = key_states
        value_buffer[:, :, used:length] = value_states
        self._length = length
        self.keys, self.values = key_buffer[:, :, :length], value_buffer[:, :, :length]
        return self.keys, self.values

    def reserve(self, length: int) -> None:
        """Makes room for ``length`` positions now, before a forward pass: a compiled one then
        never grows the cache itself (one kind of step instead of three). An empty layer is sized
        by its first append."""
        if not self._length:
            return
        buffer = self._key_buffer
        if buffer is None or self._value_buffer is None or length >= buffer.shape[-2]:
            self._reallocate(self.keys, self.values, length)

    def _reallocate(
        self, like_keys: torch.Tensor, like_values: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """New buffers for ``length`` positions and the room, shaped as ``like_*`` but for their
        length, holding the positions used so far. At least one position stays free: a view of a
        whole buffer would be another kind of compiled step (PT2_COMPILE) than a view of part of it."""
        used = self._length
        capacity = max(length + 1, length + self.room)
        if self.max_length is not None:
            capacity = max(length + 1, min(capacity, self.max_length))
        keys = like_keys.new_empty((*like_keys.shape[:2], capacity, like_keys.shape[-1]))
        values = like_values.new_empty((*like_values.shape[:2], capacity, like_values.shape[-1]))
        if used:
            # From the full buffers, else from what surgery handed over.
            if self._key_buffer is not None and self._value_buffer is not None:
                old_keys, old_values = self._key_buffer[:, :, :used], self._value_buffer[:, :, :used]
            else:
                old_keys, old_values = self.keys, self.values
            keys[:, :, :used] = old_keys
            values[:, :, :used] = old_values
        # The old tensors go as the new ones take over: one layer holds both at once, briefly.
        self._key_buffer, self._value_buffer = keys, values
        self.keys, self.values = keys[:, :, :used], values[:, :, :used]
        return keys, values

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Holds ``keys`` and ``values`` (row surgery's result) and lets the old buffers go now, not
        at the next append: the memory model counts one cache per batch."""
        self.keys, self.values = keys, values
        self._length = keys.shape[-2] if keys.dim() == 4 else 0
        self._key_buffer = self._value_buffer = None

    def keep(self, length: int) -> None:
        """Keeps the first ``length`` positions (the buffers stay; later appends overwrite the rest)."""
        if self._length > length:
            self._length = length
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]

    def reset(self) -> None:
        self._length = 0
        self._key_buffer = self._value_buffer = None
        super().reset()


def roomy_cache(config: object, room: int, max_length: int | None = None) -> DynamicCache:
    """``DynamicCache(config=config)`` with ``RoomyLayer`` for its plain dynamic layers (none
    when ``room`` is 0)."""
    cache = DynamicCache(config=config)
    if room:
        cache.layers = [
            RoomyLayer(room, max_length) if type(layer) is DynamicLayer else layer for layer in cache.layers
        ]
    return cache


def reserve(cache: DynamicCache, length: int) -> None:
    """Room for ``length`` positions in every layer that appends in place (``RoomyLayer.reserve``)."""
    for layer in cache.layers:
        if isinstance(layer, RoomyLayer):
            layer.reserve(length)


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = cache.layers
    for layer in layers:
        # Sliding-window and quantized layers keep extra state that plain row surgery would break.
        if type(layer) not in (DynamicLayer, RoomyLayer):
            raise NotImplementedError(f"hf_transformers batching does not support {type(layer).__name__} caches")
    return layers


def _replace(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    if isinstance(layer, RoomyLayer):
        layer.adopt(keys, values)
    else:
        layer.keys, layer.values = keys, values


def make_dense(cache: DynamicCache) -> None:
    """Every layer's keys and values laid out as new tensors are (``pt2.dense``): a compiled pass
    (PT2_COMPILE) meets one layout whether the cache came from a projection, an index or a
    concatenation, not a kind of step for each."""
    for layer in _layers(cache):
        keys, values = pt2.dense(layer.keys), pt2.dense(layer.values)
        if keys is not layer.keys or values is not layer.values:
            _replace(layer, keys, values)


def select_rows(cache: DynamicCache, rows: torch.Tensor, keep_last: int) -> None:
    """Keeps ``rows`` and the last ``keep_last`` positions of every layer, in place."""
    for layer in _layers(cache):
        _replace(layer, layer.keys[rows, :, -keep_last:, :], layer.values[rows, :, -keep_last:, :])


def select_rows_right_padded(cache: DynamicCache, rows: torch.Tensor, keep_first: int) -> None:
    """Keeps ``rows`` and the first ``keep_first`` positions of every layer, in place."""
    for layer in _layers(cache):
        _replace(layer, layer.keys[rows, :, :keep_first, :], layer.values[rows, :, :keep_first, :])


def truncate(cache: DynamicCache, length: int) -> None:
    """Keeps the first ``length`` positions of every layer: undoes a step that appended to some
    layers before it failed (views, no copy)."""
    for layer in _layers(cache):
        if isinstance(layer, RoomyLayer):
            layer.keep(length)
        elif layer.keys.shape[-2] > length:
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
        keys = torch.cat([pad(layer.keys, length) for layer in layers])
        values = torch.cat([pad(layer.values, length) for layer in layers])
        _replace(target, keys, values)
        # Each source layer goes as soon as it is copied: otherwise the joining batches' whole
        # caches outlive the merge (the caller still holds their batches through the next
        # decode), memory the batch-sizing model does not count.
        for consumed in layers[1:]:
            _replace(consumed, consumed.keys.new_empty(0), consumed.values.new_empty(0))
    return merged


def _left_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - states.shape[-2]
    return F.pad(states, (0, 0, missing, 0)) if missing else states


def _right_pad(states: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - states.shape[-2]
    return F.pad(states, (0, 0, 0, missing)) if missing else states
