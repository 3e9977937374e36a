"""The inputs of a decode step in persistent device buffers, updated in place.

A decode step reads, per row, the request's last token, its position, the cache slot its key
goes to, its block table and its context length. Here they live in tensors allocated once for
``capacity`` rows, at fixed addresses a captured CUDA graph can replay over; each step fills
them from host arrays with a few copies (from pinned memory, without waiting, on a GPU) and the
step's attention metadata views their first rows.

A CUDA graph replays a fixed batch size: ``prepare(..., padded_to=n)`` fills the rows past the
step's with padding (a one-token context in the engine's scratch block, whose outputs are
dropped) and gives the block tables their full width, so that every tensor the graph reads has
the shape and address it was captured with.

The host keeps, per sampler slot, the request's block table and the tokens its cache holds, as
numpy arrays the engine updates when a step commits; a step's rows are gathered from them in
vectorised operations, not a Python loop per row. The staging buffers are reused by the next
step, which the engine prepares while the device computes this one: it fills them only once the
device has taken this step's inputs (``NativeEngine._wait_for_inputs_sent``).
"""

from __future__ import annotations

import numpy as np
import torch

from tgis_shard.layers.paged_attention import AttentionMetadata, HostLayout


class DecodeInputs:
    def __init__(self, capacity: int, max_blocks: int, block_size: int, device: torch.device, scratch_block: int):
        self.capacity = capacity
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.scratch_block = scratch_block  # where padding rows write their keys and read them
        self.scratch_slot = scratch_block * block_size
        self.tables = np.zeros((capacity, max_blocks), dtype=np.int32)  # per slot, on the host
        self.lengths = np.zeros(capacity, dtype=np.int64)  # tokens in the cache per slot
        pinned = device.type == "cuda"
        # Host staging: positions, cache slots, sampler slots (int64); context lengths, their
        # running sum (int32, as the kernels take them); block tables.
        self._host_long = torch.zeros((3, capacity), dtype=torch.int64, pin_memory=pinned)
        self._host_int = torch.zeros((2, capacity + 1), dtype=torch.int32, pin_memory=pinned)
        self._host_tables = torch.zeros((capacity, max_blocks), dtype=torch.int32, pin_memory=pinned)
        self._long = torch.zeros((3, capacity), dtype=torch.int64, device=device)
        self._int = torch.zeros((2, capacity + 1), dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((capacity, max_blocks), dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(capacity, dtype=torch.int64, device=device)
        # One query token per row: these never change.
        self._cu_seqlens_q = torch.arange(capacity + 1, dtype=torch.int32, device=device)
        self._query_rows = torch.arange(capacity, dtype=torch.int64, device=device)
        self._host_cu_seqlens_q = np.arange(capacity + 1, dtype=np.int32)

    def commit(self, slot: int, first_new_block: int, new_blocks: tuple[int, ...], length: int) -> None:
        """A request's step is done: its table grew by ``new_blocks`` from index ``first_new_block``
        and its cache holds ``length`` tokens."""
        if new_blocks:
            self.tables[slot, first_new_block : first_new_block + len(new_blocks)] = new_blocks
        self.lengths[slot] = length

    def prepare(
        self, slots: np.ndarray, next_ids: torch.Tensor, padded_to: int | None = None
    ) -> tuple[AttentionMetadata, torch.Tensor]:
        """Fills the buffers for a decode step of the requests in these sampler ``slots``, each
        feeding its token from ``next_ids`` (per slot, on the device); returns the step's
        metadata and the rows' sampler slots on the device. ``padded_to``: the metadata has that
        many rows (padding after the step's) and full-width block tables, for a CUDA graph."""
        rows = len(slots)
        total = rows if padded_to is None else padded_to
        if total < rows or total > self.capacity:
            raise ValueError(f"{rows} rows cannot be padded to {total} (capacity {self.capacity})")
        positions = self.lengths[slots]  # the new token goes after the cached ones
        context = positions + 1
        needed = int((context.max() + self.block_size - 1) // self.block_size) if rows else 1
        width = needed if padded_to is None else self.max_blocks
        tables = self.tables[slots, :needed]
        cache_slots = tables[np.arange(rows), positions // self.block_size] * self.block_size
        cache_slots += positions % self.block_size
        long = self._host_long.numpy()
        long[0, :rows] = positions
        long[1, :rows] = cache_slots
        long[2, :rows] = slots
        long[:, rows:total] = 0  # position 0; sampler slot 0 feeds a token nobody reads
        long[1, rows:total] = self.scratch_slot
        ints = self._host_int.numpy()
        ints[0, :rows] = context
        ints[0, rows:total] = 1
        ints[1, 0] = 0
        np.cumsum(ints[0, :total], out=ints[1, 1 : total + 1])
        host_tables = self._host_tables.numpy()
        host_tables[:rows, :needed] = tables
        host_tables[:rows, needed:width] = 0
        host_tables[rows:total, :width] = 0
        host_tables[rows:total, 0] = self.scratch_block
        self._long[:, :total].copy_(self._host_long[:, :total], non_blocking=True)
        self._int[:, : total + 1].copy_(self._host_int[:, : total + 1], non_blocking=True)
        self.block_tables[:total, :width].copy_(self._host_tables[:total, :width], non_blocking=True)
        torch.index_select(next_ids, 0, self._long[2, :total], out=self.input_ids[:total])
        meta = AttentionMetadata(
            cu_seqlens_q=self._cu_seqlens_q[: total + 1],
            context_lens=self._int[0, :total],
            block_tables=self.block_tables[:total, :width],
            slots=self._long[1, :total],
            max_q=1,
            max_context=int(ints[0, :total].max()),
            positions=self._long[0, :total],
            query_rows=self._query_rows[:total],
            cu_seqlens_k=self._int[1, : total + 1],
            host=HostLayout(self._host_cu_seqlens_q[: total + 1], ints[0, :total], host_tables[:total, :width]),
        )
        return meta, self._long[2, :rows]
