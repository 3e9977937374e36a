"""The persistent decode buffers describe a decode step exactly as metadata built for it does."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tgis_shard.engines.decode_inputs import DecodeInputs
from tgis_shard.layers.paged_attention import AttentionMetadata, PagedKVCache, blocks_for, paged_attention

BLOCK = 4
FIELDS = ("cu_seqlens_q", "context_lens", "block_tables", "slots", "positions", "query_rows", "cu_seqlens_k")


def test_decode_buffers_equal_metadata_built_for_the_step_and_feed_each_rows_last_token():
    rng = random.Random(5)
    capacity, max_blocks = 8, 10
    inputs = DecodeInputs(capacity, max_blocks, BLOCK, torch.device("cpu"), scratch_block=0)
    next_ids = torch.arange(100, 100 + capacity)
    free = list(range(1, 60))
    rng.shuffle(free)
    tables: dict[int, list[int]] = {}
    lengths: dict[int, int] = {}
    for slot in range(capacity):  # requests that have 1..30 tokens cached
        lengths[slot] = rng.randint(1, 30)
        tables[slot] = [free.pop() for _ in range(blocks_for(lengths[slot], BLOCK))]
        inputs.commit(slot, 0, tuple(tables[slot]), lengths[slot])
    for step in range(3):
        slots = rng.sample(range(capacity), 5)
        for slot in slots:  # this step's token may start a block
            if lengths[slot] % BLOCK == 0:
                new = (free.pop(),)
                inputs.commit(slot, len(tables[slot]), new, lengths[slot])
                tables[slot] += new
        meta, sampler_slots = inputs.prepare(np.array(slots), next_ids)
        expected = AttentionMetadata.build(
            [1] * len(slots), [lengths[s] + 1 for s in slots], [tables[s] for s in slots], BLOCK, "cpu"
        )
        for name in (
            "cu_seqlens_q",
            "context_lens",
            "block_tables",
            "slots",
            "positions",
            "query_rows",
            "cu_seqlens_k",
        ):
            assert torch.equal(getattr(meta, name), getattr(expected, name)), (step, name)
        assert (meta.max_q, meta.max_context) == (expected.max_q, expected.max_context)
        assert sampler_slots.tolist() == slots
        assert inputs.input_ids[: len(slots)].tolist() == [100 + s for s in slots]
        for slot in slots:
            lengths[slot] += 1
            inputs.commit(slot, len(tables[slot]), (), lengths[slot])


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_a_step_padded_to_a_graph_size_attends_as_the_step_alone_and_pads_into_the_scratch_block(backend):
    capacity, max_blocks, kv_heads, heads, head_dim = 8, 6, 2, 4, 8
    inputs = DecodeInputs(capacity, max_blocks, BLOCK, torch.device("cpu"), scratch_block=0)
    cache = PagedKVCache(1, 20, BLOCK, kv_heads, head_dim, torch.float32, "cpu", backend)
    generator = torch.Generator().manual_seed(1)
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=generator))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator))
    for slot, (blocks, length) in enumerate([((3, 4), 5), ((7,), 2), ((9, 10, 11), 11)]):
        inputs.commit(slot, 0, blocks, length)
    slots = np.array([2, 0, 1])
    query = torch.randn(5, heads, head_dim, generator=generator)
    alone, _ = inputs.prepare(slots, torch.zeros(capacity, dtype=torch.long))
    expected = paged_attention(query[:3], cache, 0, alone, scale=0.5)
    padded, sampler_slots = inputs.prepare(slots, torch.zeros(capacity, dtype=torch.long), padded_to=5)
    assert padded.block_tables.shape == (5, max_blocks)
    assert sampler_slots.tolist() == [2, 0, 1]
    assert padded.context_lens[3:].tolist() == [1, 1]
    assert padded.positions[3:].tolist() == [0, 0]
    assert padded.slots[3:].tolist() == [0, 0]
    assert not padded.block_tables[3:].any()
    assert padded.cu_seqlens_k.tolist() == [0, 12, 18, 21, 22, 23]
    out = paged_attention(query, cache, 0, padded, scale=0.5)
    torch.testing.assert_close(out[:3], expected)
    assert torch.isfinite(out).all()  # padding rows too: nothing NaN reaches a shared buffer
