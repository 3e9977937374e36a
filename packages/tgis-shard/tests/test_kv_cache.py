"""The padded engines' cache layers that append in place (``kv_cache.RoomyLayer``): the same
keys and values as transformers' ``DynamicLayer`` through appends and batch surgery, with copies
only when the room runs out."""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaConfig

from tgis_shard.engines import kv_cache

CONFIG = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32)
ROWS, HEADS, DIM = 3, 2, 8


def _states(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(ROWS, HEADS, tokens, DIM, generator=generator) for _ in range(2))  # type: ignore[return-value]


def _append(caches: list[DynamicCache], tokens: int, seed: int) -> None:
    keys, values = _states(tokens, seed)
    for cache in caches:
        for layer in range(CONFIG.num_hidden_layers):
            cache.update(keys + layer, values - layer, layer)


def _assert_equal(roomy: DynamicCache, plain: DynamicCache) -> None:
    for ours, theirs in zip(roomy.layers, plain.layers, strict=True):
        assert torch.equal(ours.keys, theirs.keys)
        assert torch.equal(ours.values, theirs.values)


def test_appends_fill_the_room_in_place_and_copy_once_it_is_full():
    roomy, plain = kv_cache.roomy_cache(CONFIG, room=4), DynamicCache(config=CONFIG)
    assert all(type(layer) is kv_cache.RoomyLayer for layer in roomy.layers)
    _append([roomy, plain], tokens=5, seed=0)  # a prefill: buffers of 9 positions, one always free
    storage = roomy.layers[0].keys.data_ptr()
    for step in range(3):
        _append([roomy, plain], tokens=1, seed=1 + step)
        _assert_equal(roomy, plain)
        assert roomy.layers[0].keys.data_ptr() == storage  # appended where the room was
    _append([roomy, plain], tokens=1, seed=9)  # the ninth position would fill them: new buffers
    _assert_equal(roomy, plain)
    assert roomy.layers[0].keys.data_ptr() != storage
    assert roomy.get_seq_length() == plain.get_seq_length() == 9


def test_buffers_never_grow_past_the_longest_sequence():
    roomy = kv_cache.roomy_cache(CONFIG, room=64, max_length=7)
    _append([roomy], tokens=5, seed=0)
    assert roomy.layers[0]._key_buffer.shape[-2] == 7
    _append([roomy], tokens=3, seed=1)  # past it anyway: what is needed and the one free position
    assert roomy.layers[0]._key_buffer.shape[-2] == 9


def test_row_surgery_and_concatenation_start_new_buffers_with_the_same_contents():
    roomy, plain = kv_cache.roomy_cache(CONFIG, room=8), DynamicCache(config=CONFIG)
    _append([roomy, plain], tokens=4, seed=0)
    _append([roomy, plain], tokens=1, seed=1)
    rows = torch.tensor([0, 2])
    for cache in (roomy, plain):
        kv_cache.select_rows(cache, rows, keep_last=3)
    _assert_equal(roomy, plain)
    assert all(layer._key_buffer is None for layer in roomy.layers)
    keys, values = _states(1, seed=2)
    for cache in (roomy, plain):
        for layer in range(CONFIG.num_hidden_layers):
            cache.update(keys[rows], values[rows], layer)
    _assert_equal(roomy, plain)
    # Merged with a second batch (left-padded to 6 positions), then decoded on.
    other_roomy, other_plain = kv_cache.roomy_cache(CONFIG, room=8), DynamicCache(config=CONFIG)
    _append([other_roomy, other_plain], tokens=2, seed=3)
    merged_roomy = kv_cache.concatenate([roomy, other_roomy], 6)
    merged_plain = kv_cache.concatenate([plain, other_plain], 6)
    # Nothing but the merged tensors is held: the old buffers went with the surgery.
    assert all(layer._key_buffer is None and layer._value_buffer is None for layer in other_roomy.layers)
    assert all(layer._key_buffer is None for layer in merged_roomy.layers)
    keys, values = torch.randn(5, HEADS, 1, DIM), torch.randn(5, HEADS, 1, DIM)
    for cache in (merged_roomy, merged_plain):
        for layer in range(CONFIG.num_hidden_layers):
            cache.update(keys, values, layer)
    _assert_equal(merged_roomy, merged_plain)


def test_reserve_makes_the_room_before_an_append():
    roomy, plain = kv_cache.roomy_cache(CONFIG, room=2), DynamicCache(config=CONFIG)
    kv_cache.reserve(roomy, 10)  # empty: sized by its first append
    assert roomy.layers[0]._key_buffer is None
    _append([roomy, plain], tokens=4, seed=0)
    kv_cache.reserve(roomy, 10)
    storage = roomy.layers[0].keys.data_ptr()
    _assert_equal(roomy, plain)
    for step in range(6):  # up to the tenth position, in place
        _append([roomy, plain], tokens=1, seed=1 + step)
        assert roomy.layers[0].keys.data_ptr() == storage
    _assert_equal(roomy, plain)


def test_a_truncated_step_is_overwritten_in_place():
    roomy, plain = kv_cache.roomy_cache(CONFIG, room=8), DynamicCache(config=CONFIG)
    _append([roomy, plain], tokens=4, seed=0)
    storage = roomy.layers[0].keys.data_ptr()
    _append([roomy], tokens=1, seed=1)  # a step that failed after taking its keys...
    kv_cache.truncate(roomy, 4)  # ...gives them back
    _assert_equal(roomy, plain)
    _append([roomy, plain], tokens=1, seed=2)
    _assert_equal(roomy, plain)
    assert roomy.layers[0].keys.data_ptr() == storage


def test_no_room_is_a_plain_dynamic_cache():
    cache = kv_cache.roomy_cache(CONFIG, room=0)
    assert all(type(layer) is not kv_cache.RoomyLayer for layer in cache.layers)
