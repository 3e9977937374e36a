"""Continuous batching as one step pipeline: the scheduler plans a step, the batcher sends it to
the shards, and the shards always have the next step at hand: ``PIPELINE_DEPTH`` steps are on
the shards at a time, and the router handles one step's answer (its tokens: detokenization,
stopping, streaming) while the shards compute the next. The step planned after an answer is
handled sees what that answer ended: a finish by EOS, a stop sequence, a time limit or a
cancellation takes effect one step later, and the token the step in between made for that
request is discarded, never sent; a finish by length is known ahead and costs nothing.

Every accepted request ends with exactly one answer: its last token, or one error. A failure
fails the requests it concerns and no more: one request's bad data fails that request (the
shard reports it, or its token handling raises here), a failed step fails the running requests
(and the shards are reset); the loop always goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Sequence

import grpc

from tgis_proto import shard_pb2 as pb
from tgis_router import metrics, tracing
from tgis_router.active import ActiveRequest
from tgis_router.errors import GenerationFailedError, RouterError, shard_error
from tgis_router.health import GenerationHealth
from tgis_router.queue import RequestQueue
from tgis_router.requests import StopReason
from tgis_router.scheduler import Scheduler, Step, StepOutcome
from tgis_router.shard_client import ShardClient

log = logging.getLogger(__name__)

LOOP_FAILURE_PAUSE_S = 0.05
IDLE_PAUSE_S = 0.001
# Steps on the shards at a time: the one running and the next, so the shards never wait for the
# router while it handles an answer (the router's work per step must fit in a step's time).
PIPELINE_DEPTH = 2
# tgi_batch_inference_failure's reason, by the shard call's status.
_FAILURE_REASONS = {grpc.StatusCode.RESOURCE_EXHAUSTED: "oom", grpc.StatusCode.UNAVAILABLE: "connection"}


class Batcher:
    def __init__(self, shards: ShardClient, queue: RequestQueue, scheduler: Scheduler, health: GenerationHealth):
        self._shards = shards
        self._queue = queue
        self.scheduler = scheduler
        self._health = health
        self._in_flight: deque[tuple[Step, asyncio.Future[pb.StepResponse]]] = deque()

    async def run(self) -> None:
        """Runs until cancelled; a failure ends the requests it concerns, never the loop."""
        while True:
            try:
                await self._turn()
            except Exception as e:
                # Each step handles its own failures; this is a bug in the loop's bookkeeping.
                log.exception("batching step failed")
                await self._abandon_running(GenerationFailedError(f"internal error in the batching loop: {e!r}"))
                # A failure that recurs must not spin the event loop: RPCs and probes go on.
                await asyncio.sleep(LOOP_FAILURE_PAUSE_S)

    async def _turn(self) -> None:
        """Fills the pipeline, then handles the oldest step's answer."""
        while len(self._in_flight) < PIPELINE_DEPTH:
            step = self.scheduler.schedule()
            if step is None:
                break
            self._in_flight.append((step, self._send(step)))
        if not self._in_flight:
            if self.scheduler.has_work():
                await asyncio.sleep(IDLE_PAUSE_S)  # waiting requests the scheduler cannot take yet
            else:
                await self._queue.wait()
            return
        step, call = self._in_flight[0]
        try:
            response = await call
        except grpc.aio.AioRpcError as e:
            self._health.step_failed()
            await self._abandon_running(shard_error(e, "generation"))
            return
        self._in_flight.popleft()
        self._health.step_succeeded()
        outcome = self.scheduler.update(step, response)
        for entry, error in outcome.failed:
            _fail([entry], error)
        started = time.monotonic()
        self._hand_out(outcome)
        if step.work:
            metrics.STEP_SERIES[step.method].tokproc_duration.observe(time.monotonic() - started)

    def _send(self, step: Step) -> asyncio.Future[pb.StepResponse]:
        call = self._shards.step(step.to_proto())
        if step.work:  # a step that only lets requests leave runs no model
            call = self._timed(step, call)
        return asyncio.ensure_future(call)

    async def _timed(self, step: Step, call: Awaitable[pb.StepResponse]) -> pb.StepResponse:
        series = metrics.STEP_SERIES[step.method]
        series.count.inc()
        series.batch_size.observe(len(step.work))
        prompt_tokens = sum(w.tokens for w in step.work if w.prompt)
        if prompt_tokens:  # a prefill step
            metrics.batch_next_tokens.observe(prompt_tokens)
        if step.joins and len(step.joins) < len(step.work):  # new requests beside running ones
            metrics.batch_concatenation_count.inc()
        span = None
        if tracing.enabled():
            span = tracing.start_step(step.method, len(step.work), prompt_tokens, [w.request.entry for w in step.work])
        started = time.monotonic()
        try:
            response = await call
        except grpc.aio.AioRpcError as e:
            series.failed(_FAILURE_REASONS.get(e.code(), "error"))
            tracing.end_step(span, None, error=e.details())
            raise
        tracing.end_step(span, response.forward_seconds)
        series.duration.observe(time.monotonic() - started)
        series.forward_duration.observe(response.forward_seconds)
        series.success.inc()
        return response

    def _hand_out(self, outcome: StepOutcome) -> None:
        """Gives each request its token: text, stopping, events."""
        for token in outcome.tokens:
            entry, details = token.entry, token.details
            try:
                if entry.generated == 0 and entry.request.params.response.input_tokens:
                    entry.add_input_tokens(details.input_tokens if details is not None else ())
                entry.add_token(token.token_id, details.token if details is not None else None)
            except Exception as e:
                # One request's text handling must not cost the others their tokens.
                log.exception("handling a token of request %d failed", entry.id)
                _fail([entry], GenerationFailedError(f"internal error handling a token: {e!r}"))

    async def _abandon_running(self, error: RouterError) -> None:
        """Fails every request on the shards and resets them, which then hold none."""
        steps, self._in_flight = list(self._in_flight), deque()
        # The reset goes after them on the shards anyway; their outcomes no longer matter.
        await asyncio.gather(*(call for _, call in steps), return_exceptions=True)
        in_steps = [w.request.entry for step, _ in steps for w in step.work]
        _fail(list({id(e): e for e in [*self.scheduler.abandon(), *in_steps]}.values()), error)
        try:
            await self._shards.reset()
        except grpc.aio.AioRpcError as e:
            log.error("resetting the shards failed: %s", e.details())


def _fail(entries: Sequence[ActiveRequest], error: RouterError) -> None:
    if entries:
        log.error("%d request(s) failed: %s", len(entries), error)
    for entry in entries:
        entry.finish(StopReason.ERROR, error)
