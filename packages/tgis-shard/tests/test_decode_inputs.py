"""The persistent decode buffers describe a decode step exactly as metadata built for it does."""

from __future__ import annotations

import random

import numpy as np
import torch

from tgis_shard.engines.decode_inputs import DecodeInputs
from tgis_shard.layers.paged_attention import AttentionMetadata, blocks_for

BLOCK = 4
FIELDS = ("cu_seqlens_q", "context_lens", "block_tables", "slots", "positions", "query_rows", "cu_seqlens_k")


def test_decode_buffers_equal_metadata_built_for_the_step_and_feed_each_rows_last_token():
    rng = random.Random(5)
    capacity, max_blocks = 8, 10
    inputs = DecodeInputs(capacity, max_blocks, BLOCK, torch.device("cpu"))
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
