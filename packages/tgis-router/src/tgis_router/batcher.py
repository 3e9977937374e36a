"""Continuous batching as one step pipeline: the scheduler plans a step, the batcher sends it to
the shards and, while they compute it, hands out the previous step's tokens (detokenization,
stopping, streaming). A finish by EOS or length is known from the token id before the next step
is planned; a stop sequence, a time limit or a cancellation is seen while handing out, so it
takes effect one step later and the token the step in flight made for that request is discarded,
never sent.

Every accepted request ends with exactly one answer: its last token, or one error. A failure
fails the requests it concerns and no more: one request's bad data fails that request (the
shard reports it, or its token handling raises here), a failed step fails the running requests
(and the shards are reset); the loop always goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence

import grpc

from tgis_proto import shard_pb2 as pb
from tgis_router import metrics
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


class Batcher:
    def __init__(self, shards: ShardClient, queue: RequestQueue, scheduler: Scheduler, health: GenerationHealth):
        self._shards = shards
        self._queue = queue
        self.scheduler = scheduler
        self._health = health
        self._in_flight: asyncio.Future[pb.StepResponse] | None = None

    async def run(self) -> None:
        """Runs until cancelled; a failure ends the requests it concerns, never the loop."""
        handed_out: StepOutcome | None = None  # the last step's tokens, handed out during the next
        while True:
            try:
                step = self.scheduler.schedule()
                if step is None:
                    if handed_out is not None:
                        handed_out, outcome = None, handed_out
                        self._hand_out(outcome)
                    elif self.scheduler.has_work():
                        await asyncio.sleep(IDLE_PAUSE_S)  # waiting requests the scheduler cannot take yet
                    else:
                        await self._queue.wait()
                    continue
                self._in_flight = self._send(step)
                if handed_out is not None:
                    await asyncio.sleep(0)  # the step's calls go out before the tokens are handed out
                    handed_out, outcome = None, handed_out
                    self._hand_out(outcome)
                try:
                    response = await self._in_flight
                except grpc.aio.AioRpcError as e:
                    self._health.step_failed()
                    await self._abandon_running(shard_error(e, "generation"))
                    continue
                finally:
                    self._in_flight = None
                self._health.step_succeeded()
                handed_out = self.scheduler.update(step, response)
                for entry, error in handed_out.failed:
                    _fail([entry], error)
            except Exception as e:
                # Each step handles its own failures; this is a bug in the loop's bookkeeping.
                log.exception("batching step failed")
                handed_out = None
                await self._abandon_running(GenerationFailedError(f"internal error in the batching loop: {e!r}"))
                # A failure that recurs must not spin the event loop: RPCs and probes go on.
                await asyncio.sleep(LOOP_FAILURE_PAUSE_S)

    def _send(self, step: Step) -> asyncio.Future[pb.StepResponse]:
        call = self._shards.step(step.to_proto())
        if step.work:  # a step that only lets requests leave runs no model
            call = self._timed(step.method, len(step.work), call)
        return asyncio.ensure_future(call)

    async def _timed(self, method: str, size: int, call: Awaitable[pb.StepResponse]) -> pb.StepResponse:
        started = time.monotonic()
        response = await call
        metrics.batch_inference_duration.labels(method=method).observe(time.monotonic() - started)
        metrics.batch_inference_batch_size.labels(method=method).observe(size)
        metrics.batch_inference_count.labels(method=method).inc()
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
        """Fails every running request and resets the shards, which then hold none."""
        if self._in_flight is not None:
            # The reset goes after it on the shards anyway; its outcome no longer matters.
            await asyncio.gather(self._in_flight, return_exceptions=True)
            self._in_flight = None
        _fail(self.scheduler.abandon(), error)
        try:
            await self._shards.reset()
        except grpc.aio.AioRpcError as e:
            log.error("resetting the shards failed: %s", e.details())


def _fail(entries: Sequence[ActiveRequest], error: RouterError) -> None:
    if entries:
        log.error("%d request(s) failed: %s", len(entries), error)
    for entry in entries:
        entry.finish(StopReason.ERROR, error)
