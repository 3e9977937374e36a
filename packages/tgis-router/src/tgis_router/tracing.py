"""OpenTelemetry traces, sent over OTLP when OTLP_ENDPOINT is set (``pip install tgis-router[otlp]``).

One trace per generation input: a ``tgis.request`` span from the call's arrival to its response,
whose children are ``tgis.validation`` (arrival to queued), ``tgis.queue`` (queued to its first
step), ``tgis.inference`` (first step to its last token) and ``tgis.response`` (last token to the
response written). Each model step is a ``tgis.step`` span of its own (method, batch size, prompt
tokens, the shard's forward time), linked to the requests it ran: a step serves many requests and
a request many steps.

The phases are recorded after the fact from the request's own timestamps, so tracing adds no work
to the request's path beyond starting and ending its span; with tracing off (no OTLP_ENDPOINT)
nothing here runs at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tgis_router.requests import StopReason

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from tgis_router.active import ActiveRequest

_tracer: Tracer | None = None  # None: tracing off
# time.monotonic() (what requests are timed with) to the epoch nanoseconds spans carry.
_EPOCH_OFFSET_NS = time.time_ns() - time.monotonic_ns()


class TracingUnavailableError(RuntimeError):
    pass


def enabled() -> bool:
    return _tracer is not None


def configure(endpoint: str | None, service_name: str) -> None:
    """Exports spans in batches to the OTLP gRPC ``endpoint``; None leaves tracing off."""
    if not endpoint:
        return
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise TracingUnavailableError(
            f"OTLP_ENDPOINT is set but OpenTelemetry's SDK is missing ({e.name}): pip install 'tgis-router[otlp]'"
        ) from e
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    use_provider(provider)


def use_provider(provider: TracerProvider | None) -> None:
    """Traces to ``provider`` (tests hand in one with an in-memory exporter); None: tracing off."""
    global _tracer
    _tracer = provider.get_tracer("tgis_router") if provider is not None else None


def _ns(monotonic_s: float) -> int:
    return int(monotonic_s * 1e9) + _EPOCH_OFFSET_NS


def start_request(entry: ActiveRequest) -> Span | None:
    """The input's ``tgis.request`` span, started at its arrival; None with tracing off."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    return _tracer.start_span(
        "tgis.request",
        kind=SpanKind.SERVER,
        start_time=_ns(entry.arrival),
        attributes={
            "tgis.request_id": entry.id,
            "tgis.call": entry.call.label,
            "tgis.correlation_id": entry.call.correlation_id,
            "tgis.kind": entry.kind,
            "tgis.input_tokens": len(entry.request.input_ids),
            "tgis.max_new_tokens": entry.request.max_new_tokens,
        },
    )


def end_requests(entries: Iterable[ActiveRequest]) -> None:
    """Records the phases of each finished input and ends its span, now that its response went."""
    if _tracer is None:
        return
    from opentelemetry.trace import StatusCode, set_span_in_context

    responded = time.monotonic()
    for entry in entries:
        span = entry.span
        if span is None:
            continue
        finished = entry.finished_at if entry.finished_at is not None else responded
        first_step = entry.prefill_at if entry.prefill_at is not None else finished
        parent = set_span_in_context(span)
        for name, start, end in (
            ("tgis.validation", entry.arrival, entry.queued_at),
            ("tgis.queue", entry.queued_at, first_step),
            ("tgis.inference", first_step, finished),
            ("tgis.response", finished, responded),
        ):
            _tracer.start_span(name, context=parent, start_time=_ns(start)).end(end_time=_ns(end))
        span.set_attribute("tgis.generated_tokens", entry.generated)
        if entry.stop_reason is not None:
            span.set_attribute("tgis.stop_reason", entry.stop_reason.name)
            if entry.stop_reason == StopReason.ERROR:
                span.set_status(StatusCode.ERROR)
        span.end(end_time=_ns(responded))
        entry.span = None


def start_step(method: str, batch_size: int, prompt_tokens: int, entries: Sequence[ActiveRequest]) -> Span | None:
    """A model step's ``tgis.step`` span, linked to its requests' spans; None with tracing off."""
    if _tracer is None:
        return None
    from opentelemetry.trace import Link

    links = [Link(e.span.get_span_context()) for e in entries if e.span is not None]
    attributes: dict[str, Any] = {
        "tgis.method": method,
        "tgis.batch_size": batch_size,
        "tgis.prompt_tokens": prompt_tokens,
    }
    return _tracer.start_span("tgis.step", links=links, attributes=attributes)


def end_step(span: Span | None, forward_seconds: float | None, error: str | None = None) -> None:
    if span is None:
        return
    if forward_seconds is not None:
        span.set_attribute("tgis.forward_seconds", forward_seconds)
    if error is not None:
        from opentelemetry.trace import StatusCode

        span.set_status(StatusCode.ERROR, error)
    span.end()
