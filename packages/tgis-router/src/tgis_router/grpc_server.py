"""fmaas.GenerationService: validation, admission, and answers assembled from request events."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass

import grpc

from tgis_proto import generation_pb2 as fmaas
from tgis_proto import generation_pb2_grpc as fmaas_grpc
from tgis_router import metrics, tracing
from tgis_router.active import ActiveRequest, CallContext
from tgis_router.errors import OverloadedError, RouterError, ShuttingDownError, ValidationError
from tgis_router.prefixes import PrefixLengths
from tgis_router.queue import RequestQueue
from tgis_router.responses import stream_responses, unary_response
from tgis_router.tokenization import TokenizerPool
from tgis_router.validation import Limits, validate_input, validate_params

log = logging.getLogger(__name__)

# Calls beyond the generation calls in flight that may wait to be picked up at once (health
# checks, ModelInfo, Tokenize).
_SPARE_PENDING_CALLS = 256


def generation_server(max_concurrent_requests: int) -> grpc.aio.Server:
    """A gRPC server whose backlog lets MAX_CONCURRENT_REQUESTS calls wait to be picked up.

    gRPC's core cancels a call that arrives while more than 1,000 others wait for the
    application to pick them up (every one past 3,000): a burst of streams then ends CANCELLED,
    with no message and before the router sees it. With the backlog above the router's own
    limit, a call past MAX_CONCURRENT_REQUESTS gets the router's RESOURCE_EXHAUSTED instead.
    """
    backlog = max_concurrent_requests + _SPARE_PENDING_CALLS
    return grpc.aio.server(
        options=[
            ("grpc.server.max_pending_requests", backlog),
            ("grpc.server.max_pending_requests_hard_limit", backlog),
        ]
    )


@dataclass(frozen=True)
class ModelFacts:
    encoder_decoder: bool
    eos_token_ids: frozenset[int]
    max_sequence_length: int
    max_new_tokens: int


class GenerationService(fmaas_grpc.GenerationServiceServicer):
    def __init__(
        self,
        model: ModelFacts,
        limits: Limits,
        tokenizer: TokenizerPool,
        queue: RequestQueue,
        max_concurrent_requests: int,
        output_special_tokens: bool,
        prefixes: PrefixLengths,
    ):
        self._model = model
        self._limits = limits
        self._tokenizer = tokenizer
        self._queue = queue
        self._max_concurrent = max_concurrent_requests
        self._skip_special_tokens = not output_special_tokens
        self._prefixes = prefixes
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._refusal: str | None = None  # set once the server is shutting down
        self._request_ids = itertools.count(1)

    def refuse_new_calls(self, reason: str) -> None:
        """From now on generation calls get UNAVAILABLE with ``reason``; running ones go on."""
        self._refusal = reason

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no generation call is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _admit(self, n: int) -> None:
        if self._refusal is not None:
            raise ShuttingDownError(self._refusal)
        if self._in_flight + n > self._max_concurrent:
            raise OverloadedError()
        self._in_flight += n
        self._idle.clear()
        metrics.requests_in_flight.set(self._in_flight)

    def _release(self, n: int) -> None:
        self._in_flight -= n
        if self._in_flight == 0:
            self._idle.set()
        metrics.requests_in_flight.set(self._in_flight)

    async def _submit(
        self,
        texts: list[str],
        prefix_id: str | None,
        params: fmaas.Parameters,
        kind: str,
        context: grpc.aio.ServicerContext,
    ) -> list[ActiveRequest]:
        """Validates the call as a whole, then queues every input; nothing is queued on error."""
        arrival = time.monotonic()
        correlation_id = _correlation_id(context)
        generation_params = validate_params(params, self._limits)
        prefix_length = await self._prefixes.length(prefix_id) if prefix_id else 0
        tokenized = await self._tokenizer.encode(texts, keep_last=generation_params.truncate_input_tokens)
        for t in tokenized:
            metrics.request_raw_input_length.observe(t.raw_length)
        validated = [
            validate_input(index, text, t.ids, generation_params, self._limits, prefix_id or "", prefix_length)
            for index, (text, t) in enumerate(zip(texts, tokenized, strict=True))
        ]
        entries = [
            ActiveRequest(
                next(self._request_ids),
                request,
                self._tokenizer,
                self._model.eos_token_ids,
                self._skip_special_tokens,
                kind,
                arrival,
                continues_prompt=not self._model.encoder_decoder,
                call=CallContext(_call_label(kind, index, len(validated)), correlation_id),
            )
            for index, request in enumerate(validated)
        ]
        # Validation ends as each input is queued (ActiveRequest.queued_at, which its log line uses).
        metrics.request_validation_duration.observe(entries[-1].queued_at - arrival)
        if tracing.enabled():
            for entry in entries:
                entry.span = tracing.start_request(entry)
        for entry in entries:
            metrics.request_input_length.observe(len(entry.request.input_ids))
            metrics.request_max_new_tokens.observe(entry.request.max_new_tokens)
            self._queue.put(entry)
        return entries

    @property
    def _separator(self) -> str:
        return "\n\n" if self._model.encoder_decoder else ""

    async def Generate(
        self, request: fmaas.BatchedGenerationRequest, context: grpc.aio.ServicerContext
    ) -> fmaas.BatchedGenerationResponse:
        n = len(request.requests)
        kind = "single" if n == 1 else "batch"  # TGIS's labels
        metrics.request_count.labels(kind=kind).inc()
        if n == 0:
            return fmaas.BatchedGenerationResponse()
        metrics.request_input_count.inc(n)
        entries: list[ActiveRequest] = []
        try:
            self._admit(n)
            try:
                prefix_id = request.prefix_id if request.HasField("prefix_id") else None
                texts = [r.text for r in request.requests]
                entries = await self._submit(texts, prefix_id, request.params, kind, context)
                responses = await asyncio.gather(*(unary_response(e, self._separator) for e in entries))
                return fmaas.BatchedGenerationResponse(responses=responses)
            finally:
                _cancel_unfinished(entries)
                tracing.end_requests(entries)
                self._release(n)
        except RouterError as e:
            await _abort(context, e, counted=bool(entries))
            raise  # abort raised already; this line only satisfies the type checker

    async def GenerateStream(
        self, request: fmaas.SingleGenerationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fmaas.GenerationResponse]:
        metrics.request_count.labels(kind="stream").inc()
        metrics.request_input_count.inc()
        entries: list[ActiveRequest] = []
        try:
            self._admit(1)
            try:
                if not request.HasField("request"):
                    raise ValidationError("missing request")
                prefix_id = request.prefix_id if request.HasField("prefix_id") else None
                entries = await self._submit([request.request.text], prefix_id, request.params, "stream", context)
                async for message in stream_responses(entries[0]):
                    yield message
            finally:
                _cancel_unfinished(entries)
                tracing.end_requests(entries)
                self._release(1)
        except RouterError as e:
            await _abort(context, e, counted=bool(entries))

    async def Tokenize(
        self, request: fmaas.BatchedTokenizeRequest, context: grpc.aio.ServicerContext
    ) -> fmaas.BatchedTokenizeResponse:
        started = time.monotonic()
        texts = [r.text for r in request.requests]
        metrics.tokenize_request_count.inc()
        metrics.tokenize_request_input_count.inc(len(texts))
        if not texts:
            return fmaas.BatchedTokenizeResponse()
        encoded = await self._tokenizer.encode(texts, keep_last=request.truncate_input_tokens)
        metrics.tokenize_request_tokens.observe(sum(len(e.ids) for e in encoded))
        responses = []
        for e in encoded:
            response = fmaas.TokenizeResponse(token_count=len(e.ids))
            if request.return_tokens:
                response.tokens.extend(e.tokens)
            if request.return_offsets:
                response.offsets.extend(fmaas.TokenizeResponse.Offset(start=s, end=end) for s, end in e.offsets)
            responses.append(response)
        metrics.tokenize_request_duration.observe(time.monotonic() - started)
        return fmaas.BatchedTokenizeResponse(responses=responses)

    async def ModelInfo(
        self, request: fmaas.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> fmaas.ModelInfoResponse:
        kind = (
            fmaas.ModelInfoResponse.ENCODER_DECODER
            if self._model.encoder_decoder
            else fmaas.ModelInfoResponse.DECODER_ONLY
        )
        return fmaas.ModelInfoResponse(
            model_kind=kind,
            max_sequence_length=self._model.max_sequence_length,
            max_new_tokens=self._model.max_new_tokens,
        )


def _call_label(kind: str, index: int, inputs: int) -> str:
    """How TGIS's request log line names an input of a call."""
    if kind == "stream":
        return "Streaming response"
    return "Request" if inputs == 1 else f"Sub-request {index + 1} from batch of {inputs}"


def _correlation_id(context: grpc.aio.ServicerContext) -> str:
    """The client's x-correlation-id metadata, which TGIS logs with each request."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-correlation-id":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return "<none>"


def _cancel_unfinished(entries: Collection[ActiveRequest]) -> None:
    # Reached on normal return too, where every entry is finished and this does nothing.
    for entry in entries:
        entry.cancel()


async def _abort(context: grpc.aio.ServicerContext, error: RouterError, counted: bool) -> None:
    """Ends the call with the error. ``counted``: it ended a queued request, which counted it."""
    if not counted:
        metrics.request_failure.labels(err=error.metric_label).inc()
    await context.abort(error.status, str(error))
