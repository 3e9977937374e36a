"""Decode steps replayed from CUDA graphs: one launch per step instead of one per kernel.

Eagerly, a decode step of a 32-layer model issues over a thousand kernel launches, each with
Python and dispatcher work in front of it; at small batches the GPU waits on that host work. A
decode step is the same sequence of kernels every time for a given number of rows, over inputs
that live in persistent buffers (``DecodeInputs``), so it is captured once per batch-size bucket
and replayed: a step pads up to the smallest bucket that holds it.

A graph holds the attention backend's per-step preparation (FlexAttention's block mask), every
layer, the final norm and the LM head. Sampling stays outside, on the rows that are real:
its work depends on each request's parameters. Prompt chunks and steps mixing them with
decodes run eagerly (their shapes vary with every prompt).

The graphs share one memory pool, captured largest first, so their activations reuse the same
memory; each writes its logits into the first rows of one buffer the largest fills. Were each
graph's own logits kept, they would stay allocated side by side: the rows of every bucket, 4.0
GiB of bf16 logits over a 128k vocabulary at MAX_BATCH_SIZE 512 (15.8 GiB at 1,024), against the
largest bucket's 0.12 GiB in one buffer, for a copy of the rows replayed (~25 µs at 128 rows on
an H100).
Sharing is safe because one step's logits are sampled, in the device's order, before the next
replay.
They are captured after the KV cache is allocated, from the memory it leaves; the memory model
measures what is free after the capture, so the graphs are counted in the prefill cap.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence

import torch

from tgis_shard.progress import progress

log = logging.getLogger(__name__)

# Eager runs of each bucket before its capture: compiled kernels are built and the allocator
# warmed outside the graph, as capture allows neither.
WARM_RUNS = 2


def smallest_bucket(buckets: Sequence[int], size: int) -> int | None:
    """The smallest of the sorted ``buckets`` holding ``size``; None when none does."""
    index = bisect.bisect_left(buckets, size)
    return buckets[index] if index < len(buckets) else None


def graph_buckets(max_rows: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, every multiple of 8 up to 256, then steps of a sixteenth of
    the power of two below (16 from 256, 32 from 512, ...), and ``max_rows`` itself. A step pads by
    at most 7 rows up to 256 rows and by less than 1/16 of its rows past that, while the number of
    graphs grows with the logarithm of MAX_BATCH_SIZE: each costs ~0.2 s of capture and FlashInfer's
    8 MiB of plan buffers (at 4,096 rows, multiples of 8 made 515 graphs: 101 s and 9.4 GiB)."""
    buckets = {b for b in (1, 2, 4) if b < max_rows}
    size = 8
    while size < max_rows:
        buckets.add(size)
        size += max(8, (1 << (size.bit_length() - 1)) // 16)
    buckets.add(max_rows)
    return sorted(buckets)


class DecodeGraphs:
    """One captured decode step per bucket; ``replay`` returns the bucket's logits buffer."""

    def __init__(self, graphs: dict[int, torch.cuda.CUDAGraph], logits: torch.Tensor):
        self._graphs = graphs
        self._logits = logits  # [largest bucket, vocab]: a graph of n rows writes the first n
        self.buckets = sorted(graphs)

    @classmethod
    def capture(
        cls,
        step: Callable[[int], torch.Tensor],
        buckets: Sequence[int],
        device: torch.device,
        plan: Callable[[int], None] = lambda rows: None,
    ) -> DecodeGraphs:
        """``step(rows)`` runs a decode step of that many rows over the persistent buffers and
        returns its logits ``[rows, vocab]``; ``plan(rows)`` does the host work a step of that
        many rows needs first (outside the graph: the caller repeats it before every replay)."""
        started = time.monotonic()
        reserved = torch.cuda.memory_reserved(device)
        graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        shared: torch.Tensor | None = None
        for rows in progress(len(buckets), "capturing decode graphs", "graphs", iterable=sorted(buckets, reverse=True)):
            plan(rows)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARM_RUNS):
                    warm = step(rows)
            torch.cuda.current_stream(device).wait_stream(side)
            if shared is None:  # outside the graphs' pool: it outlives every capture
                shared = torch.empty_like(warm)
            del warm
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                shared[:rows].copy_(step(rows))
            pool = graph.pool()
            graphs[rows] = graph
        torch.cuda.synchronize(device)
        log.info(
            "captured %d decode graphs (batch sizes %d-%d) in %.1f s, holding %.0f MiB",
            len(graphs),
            min(graphs),
            max(graphs),
            time.monotonic() - started,
            (torch.cuda.memory_reserved(device) - reserved) / 2**20,
        )
        return cls(graphs, shared)

    def bucket_for(self, rows: int) -> int | None:
        """The smallest captured batch size holding ``rows``; None when none does."""
        return smallest_bucket(self.buckets, rows)

    def replay(self, bucket: int) -> torch.Tensor:
        """Runs the graph of ``bucket`` rows; its logits ``[bucket, vocab]``, valid until the next replay."""
        self._graphs[bucket].replay()
        return self._logits[:bucket]
