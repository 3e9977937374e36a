"""A fault-injecting wrapper around a real shard engine, for failure-isolation tests."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from tgis_proto import shard_pb2 as pb
from tgis_shard.engines.base import Engine, PendingStep, ScheduledWork
from tgis_shard.prefixes import PromptPrefix
from tgis_shard.sampler import GeneratedToken


def out_of_memory() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class FaultyEngine(Engine):
    """Delegates to a real engine; raises where a test arms it. Step faults go off inside the
    model's second layer, after the first one wrote this step's keys and values."""

    def __init__(self, inner: Engine):
        self.inner = inner
        self.ctx = inner.ctx
        self.chunked_prefill = inner.chunked_prefill  # type: ignore[misc]
        self.bad_requests: set[int] = set()  # a step that runs one of these raises
        self.step_error: Exception | None = None  # raised inside the next step ...
        self.step_size: int = 0  # ... that runs exactly this many requests (0: any)
        self.wait_error: Exception | None = None  # raised while the next launched step's tokens are awaited
        self.hold_tokens: threading.Event | None = None  # the next launched step's tokens wait for it

    def info(self) -> pb.InfoResponse:
        return self.inner.info()

    def join(self, request: pb.Request) -> None:
        self.inner.join(request)

    def leave(self, request_ids: Collection[int]) -> None:
        self.inner.leave(request_ids)

    def request_ids(self) -> list[int]:
        return self.inner.request_ids()

    def step(self, work: Sequence[ScheduledWork]) -> list[GeneratedToken]:
        bad = self.bad_requests & {w.request_id for w in work}
        if bad:
            raise ValueError(f"request {min(bad)} has a bad parameter")
        error = self.step_error
        if error is None or (self.step_size and len(work) != self.step_size):
            return self.inner.step(work)
        self.step_error = None
        with _raising_in_second_layer(self.inner, error):
            return self.inner.step(work)

    def launch(self, work: Sequence[ScheduledWork]) -> PendingStep:
        pending = super().launch(work)
        error, self.wait_error = self.wait_error, None
        hold, self.hold_tokens = self.hold_tokens, None
        if error is None and hold is None:
            return pending

        def wait() -> list[GeneratedToken]:
            if hold is not None:
                hold.wait()
            if error is not None:
                raise error
            return pending.wait()

        return PendingStep(pending.request_ids, wait)

    def prompt_prefix(self, prefix_id: str) -> PromptPrefix:
        return self.inner.prompt_prefix(prefix_id)

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
