"""Async client of every shard rank; each operation goes to all ranks, rank 0 answers.

Operations that run under a shard's batch lock (a step, a reset, a forward-pass health check)
go out one at a time, in the order they were asked for: each rank serves its calls from a
thread pool, so two calls in flight together could run in different orders on different ranks,
and the collectives inside the model would pair up wrongly. The others (info, a health ping,
prefix lookups) go out at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from tgis_proto import shard_pb2 as pb
from tgis_proto import shard_pb2_grpc as pb_grpc

T = TypeVar("T")

_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


async def _rank0(results: Awaitable[list[T]]) -> T:
    return (await results)[0]


async def _after(previous: asyncio.Future, start: Callable[[], Awaitable[T]]) -> T:
    await asyncio.gather(previous, return_exceptions=True)  # its outcome is its caller's
    return await start()


class ShardClient:
    def __init__(self, uds_paths: Sequence[str]):
        self._channels = [grpc.aio.insecure_channel(f"unix://{p}", options=_CHANNEL_OPTIONS) for p in uds_paths]
        self._stubs = [pb_grpc.ShardServiceStub(c) for c in self._channels]
        self._last_batch_op: asyncio.Future | None = None

    def _all(self, call: Callable[[pb_grpc.ShardServiceStub], Awaitable[T]]) -> Awaitable[T]:
        # Ranks run in lock step (collectives inside the model), so every rank gets every op.
        # The calls are made here, not when awaited.
        return _rank0(asyncio.gather(*(call(stub) for stub in self._stubs)))

    def _in_order(self, call: Callable[[pb_grpc.ShardServiceStub], Awaitable[T]]) -> asyncio.Future[T]:
        """A batch operation: sent now when none is in flight (so a caller can do other work
        while the shards compute), else right after the last one asked for."""
        previous = self._last_batch_op
        if previous is None or previous.done():
            op = asyncio.ensure_future(self._all(call))
        else:
            op = asyncio.ensure_future(_after(previous, lambda: self._all(call)))
        self._last_batch_op = op
        return op

    async def info(self, timeout: float | None = None) -> pb.InfoResponse:
        return await self._all(lambda s: s.Info(pb.InfoRequest(), timeout=timeout, wait_for_ready=True))

    async def health(self, forward: bool, timeout: float | None = None) -> None:
        """A ping; with ``forward``, a real one-token forward pass after the running step."""
        request = pb.HealthRequest(forward=forward)
        if forward:
            await self._in_order(lambda s: s.Health(request, timeout=timeout))
        else:
            await self._all(lambda s: s.Health(request, timeout=timeout))

    def step(self, request: pb.StepRequest) -> Awaitable[pb.StepResponse]:
        return self._in_order(lambda s: s.Step(request))

    async def reset(self) -> None:
        """Drops every request the shards hold."""
        await self._in_order(lambda s: s.Reset(pb.ResetRequest()))

    async def prefix_lookup(self, prefix_id: str) -> int:
        """Length of a prompt prefix; every rank loads it, so a later prefill finds it cached."""
        request = pb.PrefixLookupRequest(prefix_id=prefix_id)
        response = await self._all(lambda s: s.PrefixLookup(request))
        return response.prefix_length

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))
