"""Continuous batching: prefill waiting requests into a new shard batch, merge it into the
running one, prune finished requests on the next step."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable

import grpc

from tgis_proto import shard_pb2 as pb
from tgis_router import metrics
from tgis_router.active import ActiveRequest
from tgis_router.queue import RequestQueue
from tgis_router.requests import StopReason
from tgis_router.shard_client import ShardClient

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, shards: ShardClient, queue: RequestQueue, max_batch_size: int):
        self._shards = shards
        self._queue = queue
        self._max_batch_size = max_batch_size
        self._batch_ids = itertools.count(1)
        self._running: dict[int, ActiveRequest] = {}
        self._running_batch_id: int | None = None

    async def run(self) -> None:
        """Runs until cancelled; a failed step fails its requests, never the loop."""
        while True:
            try:
                if self._running_batch_id is None:
                    await self._queue.wait()
                    self._running_batch_id = await self._prefill(self._max_batch_size)
                else:
                    await self._next_token()
            except Exception:
                # A bug must not silently stall every future request: fail what is running, go on.
                log.exception("batching step failed")
                await self._abandon_running("internal error in the batching loop")

    async def _timed(self, method: str, size: int, call: Awaitable[pb.StepResponse]) -> pb.StepResponse:
        started = time.monotonic()
        response = await call
        metrics.batch_inference_duration.labels(method=method).observe(time.monotonic() - started)
        metrics.batch_inference_batch_size.labels(method=method).observe(size)
        metrics.batch_inference_count.labels(method=method).inc()
        return response

    async def _prefill(self, room: int) -> int | None:
        """Prefills up to ``room`` waiting requests as a new batch; returns its id."""
        entries = self._queue.take(room)
        if not entries:
            return None
        batch = pb.Batch(id=next(self._batch_ids), requests=[e.to_shard_request() for e in entries])
        for entry in entries:
            entry.started()
            self._running[entry.id] = entry
        try:
            response = await self._timed("prefill", len(entries), self._shards.prefill(batch))
        except grpc.aio.AioRpcError as e:
            self._fail(entries, f"prefill failed: {e.details()}")
            for entry in entries:
                del self._running[entry.id]
            await self._clear(batch.id)
            return None
        self._dispatch(response)
        return batch.id

    async def _next_token(self) -> None:
        assert self._running_batch_id is not None
        merge: list[int] = []
        room = self._max_batch_size - sum(1 for e in self._running.values() if not e.finished)
        if room > 0 and len(self._queue):
            new_batch_id = await self._prefill(room)
            if new_batch_id is not None:
                merge.append(new_batch_id)
        drop = [rid for rid, entry in self._running.items() if entry.finished]
        for rid in drop:
            del self._running[rid]
        batch_ids = [self._running_batch_id, *merge]
        try:
            call = self._shards.next_token(self._running_batch_id, merge, drop)
            response = await self._timed("next_token", len(self._running), call)
        except grpc.aio.AioRpcError as e:
            await self._abandon_running(f"generation failed: {e.details()}", batch_ids)
            return
        metrics.batch_current_size.set(len(self._running))
        if response.batch_id == 0:
            self._running_batch_id = None
            return
        self._dispatch(response)

    def _dispatch(self, response: pb.StepResponse) -> None:
        for generation in response.generations:
            entry = self._running.get(generation.request_id)
            if entry is None:
                log.error("shard returned a token for unknown request %d", generation.request_id)
                continue
            if generation.input_tokens or (entry.generated == 0 and entry.request.params.response.input_tokens):
                entry.add_input_tokens(generation.input_tokens)
            entry.add_token(generation.token)

    async def _abandon_running(self, message: str, batch_ids: list[int] | None = None) -> None:
        """Fails every running request and drops their shard batches (all of them if unknown)."""
        self._fail(list(self._running.values()), message)
        self._running.clear()
        self._running_batch_id = None
        metrics.batch_current_size.set(0)
        if batch_ids is None:
            await self._clear(None)
        else:
            for batch_id in batch_ids:
                await self._clear(batch_id)

    def _fail(self, entries: list[ActiveRequest], message: str) -> None:
        log.error(message)
        for entry in entries:
            entry.finish(StopReason.ERROR, error=message)

    async def _clear(self, batch_id: int | None) -> None:
        try:
            await self._shards.clear_cache(batch_id)
        except grpc.aio.AioRpcError as e:
            log.error("clearing batch %d failed: %s", batch_id, e.details())
