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
from tgis_router.admission import Admission, Candidate, Decision, Running, projected_peak
from tgis_router.queue import RequestQueue
from tgis_router.requests import StopReason
from tgis_router.shard_client import ShardClient

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, shards: ShardClient, queue: RequestQueue, admission: Admission):
        self._shards = shards
        self._queue = queue
        self._admission = admission
        self._batch_ids = itertools.count(1)
        self._running: dict[int, ActiveRequest] = {}
        self._running_batch_id: int | None = None
        self._waited_steps = 0  # decode steps since waiting requests were last considered in vain

    async def run(self) -> None:
        """Runs until cancelled; a failed step fails its requests, never the loop."""
        while True:
            try:
                if self._running_batch_id is None:
                    await self._queue.wait()
                    self._running_batch_id = await self._prefill(self._admit())
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

    def _admit(self) -> list[ActiveRequest]:
        """The waiting requests that join now (dynamic batch sizing), taken off the queue."""
        waiting = self._queue.live()
        if not waiting:
            return []
        running = [e for e in self._running.values() if not e.finished]
        states = [Running(e.length, e.remaining) for e in running]
        candidates = [Candidate(e.length, e.request.max_new_tokens, e.arrival) for e in waiting]
        decision = self._admission.select(states, candidates, self._waited_steps)
        _count(decision)
        if not decision.admit:
            self._waited_steps += 1
            if not running:
                # Nothing runs, so nothing will free memory: the head can never fit.
                head = waiting[0]
                self._queue.remove([head])
                head.finish(StopReason.ERROR, error="the request does not fit in the memory available to batches")
            return []
        self._waited_steps = 0
        admitted = [waiting[i] for i in decision.admit]
        self._queue.remove(admitted)
        joining = [Running(candidates[i].input_length, candidates[i].max_new_tokens) for i in decision.admit]
        metrics.batch_weight.set(projected_peak(self._admission.model, [*states, *joining]))
        return admitted

    async def _prefill(self, entries: list[ActiveRequest]) -> int | None:
        """Prefills the admitted requests as a new batch; returns its id."""
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
        if len(self._queue):
            new_batch_id = await self._prefill(self._admit())
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


def _count(decision: Decision) -> None:
    if decision.weight_limited:
        metrics.prefill_weight_limit_exceeded.inc()
    if decision.padding_limited:
        metrics.prefill_padding_limit_exceeded.inc()
    if decision.prefill_limited:
        metrics.prefill_tokens_limit_exceeded.inc()
    if decision.waiting:
        metrics.add_on_waits.inc()
    metrics.queue_jumps.inc(decision.queue_jumps)
