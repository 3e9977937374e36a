"""Continuous batching: prefill waiting requests into a new shard batch, merge it into the
running one, prune finished requests on the next step. Each decode step is sent before the
previous one's tokens are handed out (see ``Batcher._next_token``).

Every accepted request ends with exactly one answer: its last token, or one error. A failure
fails the requests it concerns and no more: one request's bad data fails that request, a
shard's failed prefill fails the joining requests, a failed step fails the running batch (and
its shard batches are cleared); the loop always goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass

import grpc

from tgis_proto import shard_pb2 as pb
from tgis_router import metrics
from tgis_router.active import ActiveRequest
from tgis_router.admission import Admission, Candidate, Decision, Running, projected_peak
from tgis_router.errors import GenerationFailedError, OutOfMemoryError, RouterError, shard_error
from tgis_router.health import GenerationHealth
from tgis_router.queue import RequestQueue
from tgis_router.requests import StopReason
from tgis_router.shard_client import ShardClient

log = logging.getLogger(__name__)

NEVER_FITS = "the request does not fit in the memory available to batches"
LOOP_FAILURE_PAUSE_S = 0.05


@dataclass(frozen=True)
class _Step:
    """A decode step sent to the shards."""

    response: asyncio.Future[pb.StepResponse]
    batch_ids: list[int]  # the shard batches it names: cleared if it fails
    drop: list[int]  # the requests it prunes: they leave the running set once it answered


class Batcher:
    def __init__(self, shards: ShardClient, queue: RequestQueue, admission: Admission, health: GenerationHealth):
        self._shards = shards
        self._queue = queue
        self._admission = admission
        self._health = health
        self._batch_ids = itertools.count(1)
        self._running: dict[int, ActiveRequest] = {}
        self._running_batch_id: int | None = None
        self._step: _Step | None = None  # the decode step on the shards, not handled yet
        self._joining: list[int] = []  # prefilled batches the next step merges
        self._waited_steps = 0  # decode steps since waiting requests were last considered in vain

    async def run(self) -> None:
        """Runs until cancelled; a failure ends the requests it concerns, never the loop."""
        while True:
            try:
                if self._running_batch_id is None:
                    await self._queue.wait()
                    self._running_batch_id = await self._prefill(self._admit())
                else:
                    await self._next_token()
            except Exception as e:
                # Each step handles its own failures; this is a bug in the loop's bookkeeping.
                log.exception("batching step failed")
                await self._abandon_running(GenerationFailedError(f"internal error in the batching loop: {e!r}"))
                # A failure that recurs must not spin the event loop: RPCs and probes go on.
                await asyncio.sleep(LOOP_FAILURE_PAUSE_S)

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
        try:
            decision = self._admission.select(states, _candidates(waiting), self._waited_steps)
        except Exception:
            log.exception("admission failed; judging the %d waiting requests one by one", len(waiting))
            waiting = self._judgeable(states, waiting)
            decision = self._admission.select(states, _candidates(waiting), self._waited_steps)
        _count(decision)
        if not decision.admit:
            self._waited_steps += 1
            if not running and waiting:
                # Nothing runs, so nothing will free memory: the head can never fit.
                head = waiting[0]
                self._queue.remove([head])
                head.finish(StopReason.ERROR, OutOfMemoryError(NEVER_FITS))
            return []
        self._waited_steps = 0
        admitted = [waiting[i] for i in decision.admit]
        self._queue.remove(admitted)
        joining = [Running(e.length, e.request.max_new_tokens) for e in admitted]
        metrics.batch_weight.set(projected_peak(self._admission.model, [*states, *joining]))
        return admitted

    def _judgeable(self, states: list[Running], waiting: list[ActiveRequest]) -> list[ActiveRequest]:
        """The waiting requests admission can judge alone; the others are failed and dequeued."""
        judgeable = []
        for entry in waiting:
            try:
                self._admission.select(states, _candidates([entry]), self._waited_steps)
                judgeable.append(entry)
            except Exception as e:
                self._queue.remove([entry])
                _fail([entry], GenerationFailedError(f"internal error in admission: {e!r}"))
        return judgeable

    async def _prefill(self, entries: list[ActiveRequest]) -> int | None:
        """Prefills the admitted requests as a new batch; returns its id (None: no batch)."""
        requests: list[pb.Request] = []
        sent: list[ActiveRequest] = []
        for entry in entries:
            try:
                requests.append(entry.to_shard_request())
                sent.append(entry)
            except Exception as e:
                log.exception("request %d cannot be sent to the shards", entry.id)
                _fail([entry], GenerationFailedError(f"internal error preparing the request: {e!r}"))
        entries = sent
        if not entries:
            return None
        batch = pb.Batch(id=next(self._batch_ids), requests=requests)
        for entry in entries:
            entry.started()
            self._running[entry.id] = entry
        try:
            response = await self._timed("prefill", len(entries), self._shards.prefill(batch))
        except grpc.aio.AioRpcError as e:
            self._health.step_failed()
            self._fail_running([entry.id for entry in entries], shard_error(e, "prefill"))
            await self._clear(batch.id)
            return None
        self._health.step_succeeded()
        self._apply(response)
        return response.batch_id or None

    async def _next_token(self) -> None:
        """Handles one decode step. The step after it goes to the shards before its tokens are
        handed out, so the shards compute while the router detokenizes: a finish by EOS or length
        is known from the token id; a stop sequence, a time limit or a cancellation takes effect
        one step later, and the token that step made for the request is discarded, never sent.
        Waiting requests are prefilled meanwhile (the shards run it right after the step) and
        join with the step after."""
        assert self._running_batch_id is not None
        if self._step is None:
            self._send_step()
        step = self._step
        assert step is not None
        if len(self._queue):
            new_batch_id = await self._prefill(self._admit())
            if new_batch_id is not None:
                self._joining.append(new_batch_id)
        try:
            response = await step.response
        except grpc.aio.AioRpcError as e:
            self._step = None
            self._health.step_failed()
            await self._abandon_running(shard_error(e, "generation"), [*step.batch_ids, *self._joining])
            return
        self._step = None
        self._health.step_succeeded()
        for rid in step.drop:
            self._running.pop(rid, None)
        metrics.batch_current_size.set(len(self._running))
        # A batch prefilled during the step carries on when none of the running requests did.
        self._running_batch_id = response.batch_id or (self._joining.pop(0) if self._joining else None)
        if self._running_batch_id is not None:
            self._send_step(also_drop=self._ending(response))
            await asyncio.sleep(0)  # the step's calls go out before the tokens are handed out
        self._apply(response)

    def _send_step(self, also_drop: Iterable[int] = ()) -> None:
        """Sends the next decode step: it merges the prefilled batches and prunes the requests
        that finished (and ``also_drop``, which finish with the tokens about to be handed out)."""
        assert self._running_batch_id is not None
        drop = sorted({rid for rid, entry in self._running.items() if entry.finished}.union(also_drop))
        merge, self._joining = self._joining, []
        call = self._shards.next_token(self._running_batch_id, merge, drop)
        response = asyncio.ensure_future(self._timed("next_token", len(self._running) - len(drop), call))
        self._step = _Step(response, [self._running_batch_id, *merge], drop)

    def _ending(self, response: pb.StepResponse) -> list[int]:
        """Requests whose token in this response ends them by EOS or length."""
        ending = []
        for generation in response.generations:
            entry = self._running.get(generation.request_id)
            if entry is not None and not entry.finished and entry.ends_with(generation.token.id):
                ending.append(generation.request_id)
        return ending

    def _apply(self, response: pb.StepResponse) -> None:
        """Fails the requests the step dropped, hands out the new tokens."""
        for failure in response.failures:
            error_type = OutOfMemoryError if failure.kind == pb.FAILURE_OUT_OF_MEMORY else GenerationFailedError
            self._fail_running([failure.request_id], error_type(failure.message))
        for generation in response.generations:
            entry = self._running.get(generation.request_id)
            if entry is None:
                log.error("shard returned a token for unknown request %d", generation.request_id)
                continue
            try:
                if generation.input_tokens or (entry.generated == 0 and entry.request.params.response.input_tokens):
                    entry.add_input_tokens(generation.input_tokens)
                entry.add_token(generation.token)
            except Exception as e:
                # One request's text handling must not cost the others their tokens.
                log.exception("handling a token of request %d failed", entry.id)
                _fail([entry], GenerationFailedError(f"internal error handling a token: {e!r}"))

    def _fail_running(self, request_ids: Iterable[int], error: RouterError) -> None:
        """Fails requests the shards no longer hold; they leave the running set."""
        entries = [self._running.pop(rid) for rid in request_ids if rid in self._running]
        _fail(entries, error)

    async def _abandon_running(self, error: RouterError, batch_ids: Sequence[int] | None = None) -> None:
        """Fails every running request and drops their shard batches (all of them if unknown)."""
        if self._step is not None:
            # Clearing goes after it on the shards anyway; its outcome no longer matters.
            await asyncio.gather(self._step.response, return_exceptions=True)
            self._step = None
        self._joining = []
        self._fail_running(list(self._running), error)
        self._running_batch_id = None
        metrics.batch_current_size.set(0)
        for batch_id in batch_ids if batch_ids is not None else [None]:
            await self._clear(batch_id)

    async def _clear(self, batch_id: int | None) -> None:
        try:
            await self._shards.clear_cache(batch_id)
        except grpc.aio.AioRpcError as e:
            log.error("clearing batch %s failed: %s", batch_id, e.details())


def _candidates(entries: Sequence[ActiveRequest]) -> list[Candidate]:
    return [Candidate(e.length, e.request.max_new_tokens, e.arrival) for e in entries]


def _fail(entries: Sequence[ActiveRequest], error: RouterError) -> None:
    if entries:
        log.error("%d request(s) failed: %s", len(entries), error)
    for entry in entries:
        entry.finish(StopReason.ERROR, error)


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
