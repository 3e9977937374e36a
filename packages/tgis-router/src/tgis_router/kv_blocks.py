"""The paged KV cache's blocks, owned by the router: the scheduler hands them to requests and the
shards write where they are told.

One owner keeps the accounting exact at the moment it matters: the scheduler decides admission
and preemption with the true free count, before the step that needs the blocks runs, and every
tensor-parallel rank receives the same block ids.
"""

from __future__ import annotations

from collections.abc import Iterable

from tgis_router import metrics


class BlockAccountingError(Exception):
    """A block was freed twice or never handed out: a bookkeeping bug."""


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold ``tokens`` tokens."""
    return -(-tokens // block_size)


class BlockPool:
    """Block ids ``1..num_blocks`` (the shard keeps block 0 for itself); last freed, first reused."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs blocks and tokens per block, got {num_blocks} × {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks, 0, -1))  # popped from the end: block 1 goes out first
        self._in_use: set[int] = set()
        metrics.kv_cache_blocks.set(num_blocks)
        self.observe()

    def observe(self) -> None:
        """Publishes the blocks in use (once a step, not at every change)."""
        metrics.kv_cache_blocks_used.set(len(self._in_use))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return len(self._in_use)

    def take(self, n: int) -> tuple[int, ...]:
        """``n`` blocks; the caller checked ``free`` first."""
        if not 0 <= n <= len(self._free):
            raise BlockAccountingError(f"asked for {n} blocks with {len(self._free)} free")
        blocks = tuple(self._free.pop() for _ in range(n))
        self._in_use.update(blocks)
        return blocks

    def give_back(self, blocks: Iterable[int]) -> None:
        blocks = list(blocks)
        stray = [b for b in blocks if b not in self._in_use]
        if stray or len(set(blocks)) != len(blocks):
            raise BlockAccountingError(f"blocks {sorted(stray) or blocks} freed but not in use")
        self._in_use.difference_update(blocks)
        self._free.extend(reversed(blocks))
