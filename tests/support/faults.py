"""A fault-injecting wrapper around a real shard engine, for failure-isolation tests."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from tgis_proto import shard_pb2 as pb
from tgis_shard.engines.base import BatchState, Engine, GeneratedToken


def out_of_memory() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class FaultyEngine(Engine):
    """Delegates to a real engine; raises where a test arms it. Decode faults go off inside the
    model's second layer, after the first one wrote this step's keys and values."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.ctx = inner.ctx
        self.bad_requests: set[int] = set()  # a prefill that contains one of these raises
        self.prefill_error: Exception | None = None  # raised by the next prefill
        self.decode_error: Exception | None = None  # raised inside the next decode of > 1 row ...
        self.decode_rows: int = 0  # ... of exactly this many rows (0: any)

    def info(self) -> pb.InfoResponse:
        return self.inner.info()

    def prefill(self, batch: pb.Batch) -> tuple[list[GeneratedToken], BatchState]:
        bad = self.bad_requests & {r.id for r in batch.requests}
        if bad:
            raise ValueError(f"request {min(bad)} has a bad parameter")
        if self.prefill_error is not None:
            error, self.prefill_error = self.prefill_error, None
            raise error
        return self.inner.prefill(batch)

    def concatenate(self, states: Sequence[BatchState]) -> BatchState:
        return self.inner.concatenate(states)

    def decode(self, state: BatchState) -> list[GeneratedToken]:
        error = self.decode_error
        if error is None or (self.decode_rows and len(state.request_ids) != self.decode_rows):
            return self.inner.decode(state)
        self.decode_error = None
        with _raising_in_second_layer(self.inner, error):
            return self.inner.decode(state)

    def health_check(self) -> None:
        self.inner.health_check()

    def memory_model(self) -> pb.MemoryModel | None:
        return self.inner.memory_model()


@contextmanager
def _raising_in_second_layer(engine: Engine, error: Exception) -> Iterator[None]:
    model = engine.model  # type: ignore[attr-defined]
    # The decoder layers: the first list of two or more modules (LLaMA's layers, GPT-2's h).
    layers = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) >= 2)

    def explode(*_: object) -> None:
        raise error

    handle = layers[1].register_forward_pre_hook(explode)
    try:
        yield
    finally:
        handle.remove()
