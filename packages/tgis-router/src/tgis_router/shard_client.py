"""Async client of every shard rank; each operation goes to all ranks, rank 0 answers.

Every rank must run the operations that use the model (a step, a reset, a forward-pass health
check) in the same order, or the collectives inside the model would pair up wrongly; each rank
serves its calls from a thread pool, so the order cannot be left to arrival. Steps carry a
sequence number that the ranks run them by, so the next step goes out while the last one runs
and a shard never waits for the router. A reset or a forward check is a barrier: it goes out
once every operation before it was answered, and the operations after it wait for it. The rest
(info, a health ping, prefix lookups) go out at once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from tgis_proto import shard_pb2 as pb
from tgis_proto import shard_pb2_grpc as pb_grpc

T = TypeVar("T")

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # A shard's socket appears only after its warm-up and graph capture (minutes on a GPU). gRPC
    # retries a failed connect after a backoff that grows to 2 minutes, so the launcher saw a
    # shard that had long been serving up to that late (80 s at MAX_BATCH_SIZE 4,096 on an H100);
    # a local socket is cheap to retry each second.
    ("grpc.max_reconnect_backoff_ms", 1000),
]


async def _rank0(results: Awaitable[list[T]]) -> T:
    return (await results)[0]


async def _after(previous: Sequence[asyncio.Future], start: Callable[[], Awaitable[T]]) -> T:
    await asyncio.gather(*previous, return_exceptions=True)  # their outcomes are their callers'
    return await start()


class ShardClient:
    def __init__(self, uds_paths: Sequence[str]):
        self._channels = [grpc.aio.insecure_channel(f"unix://{p}", options=_CHANNEL_OPTIONS) for p in uds_paths]
        self._stubs = [pb_grpc.ShardServiceStub(c) for c in self._channels]
        self._pending: list[asyncio.Future] = []  # model operations not answered yet
        self._barrier: asyncio.Future | None = None  # the last reset or forward check
        self._steps = itertools.count()

    def _all(self, call: Callable[[pb_grpc.ShardServiceStub], Awaitable[T]]) -> Awaitable[T]:
        # Ranks run in lock step (collectives inside the model), so every rank gets every op.
        # The calls are made here, not when awaited.
        return _rank0(asyncio.gather(*(call(stub) for stub in self._stubs)))

    def _send(self, call: Callable[[pb_grpc.ShardServiceStub], Awaitable[T]], barrier: bool) -> asyncio.Future[T]:
        """A model operation: now, or once the operations it must follow were answered (all of
        them for a barrier; the last barrier for a step)."""
        self._pending = [op for op in self._pending if not op.done()]
        after = list(self._pending) if barrier else [b for b in (self._barrier,) if b is not None and not b.done()]
        if after:
            op = asyncio.ensure_future(_after(after, lambda: self._all(call)))
        else:
            op = asyncio.ensure_future(self._all(call))
        self._pending.append(op)
        if barrier:
            self._barrier = op
        return op

    async def info(self, timeout: float | None = None) -> pb.InfoResponse:
        return await self._all(lambda s: s.Info(pb.InfoRequest(), timeout=timeout, wait_for_ready=True))

    def health(self, forward: bool, timeout: float | None = None) -> asyncio.Future[pb.HealthResponse]:
        """A ping; with ``forward``, a real one-token forward pass after the steps sent before it.
        Ordered when called, like every model operation, not when awaited."""
        request = pb.HealthRequest(forward=forward)
        if forward:
            return self._send(lambda s: s.Health(request, timeout=timeout), barrier=True)
        return asyncio.ensure_future(self._all(lambda s: s.Health(request, timeout=timeout)))

    def step(self, request: pb.StepRequest) -> asyncio.Future[pb.StepResponse]:
        """Numbers the step and sends it at once: the ranks run steps in their numbers' order."""
        request.sequence = next(self._steps)
        return self._send(lambda s: s.Step(request), barrier=False)

    def reset(self) -> asyncio.Future[pb.ResetResponse]:
        """Drops every request the shards hold, once the steps sent before it have run."""
        return self._send(lambda s: s.Reset(pb.ResetRequest()), barrier=True)

    async def prefix_lookup(self, prefix_id: str) -> int:
        """Length of a prompt prefix; every rank loads it, so a later prefill finds it cached."""
        request = pb.PrefixLookupRequest(prefix_id=prefix_id)
        response = await self._all(lambda s: s.PrefixLookup(request))
        return response.prefix_length

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))
