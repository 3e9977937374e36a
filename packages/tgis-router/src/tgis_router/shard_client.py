"""Async client of every shard rank; each operation goes to all ranks, rank 0 answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from tgis_proto import shard_pb2 as pb
from tgis_proto import shard_pb2_grpc as pb_grpc

T = TypeVar("T")

_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class ShardClient:
    def __init__(self, uds_paths: Sequence[str]):
        self._channels = [grpc.aio.insecure_channel(f"unix://{p}", options=_CHANNEL_OPTIONS) for p in uds_paths]
        self._stubs = [pb_grpc.ShardServiceStub(c) for c in self._channels]

    @property
    def world_size(self) -> int:
        return len(self._stubs)

    async def _all(self, call: Callable[[pb_grpc.ShardServiceStub], Awaitable[T]]) -> T:
        # Ranks run in lock step (collectives inside the model), so every rank gets every op.
        results = await asyncio.gather(*(call(stub) for stub in self._stubs))
        return results[0]

    async def info(self, timeout: float | None = None) -> pb.InfoResponse:
        return await self._all(lambda s: s.Info(pb.InfoRequest(), timeout=timeout, wait_for_ready=True))

    async def health(self, forward: bool, timeout: float | None = None) -> None:
        """A ping; with ``forward``, a real one-token forward pass after the running step."""
        request = pb.HealthRequest(forward=forward)
        await self._all(lambda s: s.Health(request, timeout=timeout))

    async def prefill(self, batch: pb.Batch) -> pb.StepResponse:
        return await self._all(lambda s: s.Prefill(pb.PrefillRequest(batch=batch)))

    async def next_token(
        self, batch_id: int, merge_batch_ids: Sequence[int], drop_request_ids: Sequence[int]
    ) -> pb.StepResponse:
        request = pb.NextTokenRequest(
            batch_id=batch_id, merge_batch_ids=merge_batch_ids, drop_request_ids=drop_request_ids
        )
        return await self._all(lambda s: s.NextToken(request))

    async def clear_cache(self, batch_id: int | None = None) -> None:
        request = pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(batch_id=batch_id)
        await self._all(lambda s: s.ClearCache(request))

    async def prefix_lookup(self, prefix_id: str) -> int:
        """Length of a prompt prefix; every rank loads it, so a later prefill finds it cached."""
        request = pb.PrefixLookupRequest(prefix_id=prefix_id)
        response = await self._all(lambda s: s.PrefixLookup(request))
        return response.prefix_length

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))
