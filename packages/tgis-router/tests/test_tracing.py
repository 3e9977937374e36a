"""OpenTelemetry traces through the real gRPC service and batching loop (fake shards), caught by
the SDK's in-memory exporter: each input's ``tgis.request`` span holds its validation, queue,
inference and response phases in order; each model step is a span linked to the requests it ran;
a failed input's span says so; with tracing off nothing is recorded and OTLP_ENDPOINT without the
SDK is refused clearly."""

from __future__ import annotations

import asyncio
import builtins
import itertools

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tests.support.fake_shard import FakeShards, rpc_error, save_word_tokenizer
from tests.support.router_in_process import RouterInProcess
from tgis_proto import generation_pb2 as fmaas
from tgis_router import tracing

PHASES = ["tgis.validation", "tgis.queue", "tgis.inference", "tgis.response"]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return save_word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture
def exporter():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)


def _params(max_new_tokens: int) -> fmaas.Parameters:
    return fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=max_new_tokens))


def _run(tokenizer_file, scenario, shards: FakeShards | None = None) -> None:
    async def main() -> None:
        async with RouterInProcess(tokenizer_file, shards or FakeShards(), 8) as router:
            await asyncio.wait_for(scenario(router), 30)

    asyncio.run(main())


def test_each_input_is_a_trace_of_its_phases_and_steps_link_to_the_requests_they_ran(tokenizer_file, exporter):
    async def scenario(router: RouterInProcess) -> None:
        batch = fmaas.BatchedGenerationRequest(
            requests=[fmaas.GenerationRequest(text="w1 w2"), fmaas.GenerationRequest(text="w3")], params=_params(3)
        )
        await router.stub.Generate(batch, metadata=(("x-correlation-id", "abc-1"),))
        stream = fmaas.SingleGenerationRequest(request=fmaas.GenerationRequest(text="w4"), params=_params(2))
        _ = [m async for m in router.stub.GenerateStream(stream)]

    _run(tokenizer_file, scenario)
    spans = exporter.get_finished_spans()
    requests = [s for s in spans if s.name == "tgis.request"]
    assert sorted(s.attributes["tgis.kind"] for s in requests) == ["batch", "batch", "stream"]
    for request in requests:
        phases = sorted(
            (s for s in spans if s.parent is not None and s.parent.span_id == request.context.span_id),
            key=lambda s: s.start_time,
        )
        assert [p.name for p in phases] == PHASES
        assert all(p.context.trace_id == request.context.trace_id for p in phases)
        # Back to back, from the call's arrival to the response written.
        assert phases[0].start_time == request.start_time
        assert phases[-1].end_time == request.end_time
        for earlier, later in itertools.pairwise(phases):
            assert earlier.end_time == later.start_time
            assert earlier.start_time <= earlier.end_time
        expected_tokens = 3 if request.attributes["tgis.kind"] == "batch" else 2
        assert request.attributes["tgis.generated_tokens"] == expected_tokens
        assert request.attributes["tgis.stop_reason"] == "MAX_TOKENS"
    batch_spans = [r for r in requests if r.attributes["tgis.kind"] == "batch"]
    assert {r.attributes["tgis.correlation_id"] for r in batch_spans} == {"abc-1"}
    steps = [s for s in spans if s.name == "tgis.step"]
    assert {s.attributes["tgis.method"] for s in steps} == {"prefill", "next_token"}
    linked = {link.context.span_id for step in steps for link in step.links}
    assert linked == {r.context.span_id for r in requests}  # every request ran in some step
    for step in steps:
        assert step.attributes["tgis.batch_size"] == len(step.links)
        assert step.attributes["tgis.forward_seconds"] >= 0


def test_a_failed_step_marks_its_spans_and_its_requests(tokenizer_file, exporter):
    steps = []

    def second_step_fails(ids: list[int]) -> None:
        steps.append(ids)
        if len(steps) == 2:
            raise rpc_error(grpc.StatusCode.INTERNAL, "step failed: boom")

    shards = FakeShards(on_step=second_step_fails)

    async def scenario(router: RouterInProcess) -> None:
        with pytest.raises(grpc.aio.AioRpcError):
            await router.stub.Generate(
                fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text="w1")], params=_params(5))
            )

    _run(tokenizer_file, scenario, shards)
    spans = exporter.get_finished_spans()
    (request,) = (s for s in spans if s.name == "tgis.request")
    assert request.status.status_code == StatusCode.ERROR
    assert request.attributes["tgis.stop_reason"] == "ERROR"
    assert any(s.name == "tgis.step" and s.status.status_code == StatusCode.ERROR for s in spans)


def test_with_tracing_off_nothing_is_recorded_even_where_the_process_has_a_tracer_provider(tokenizer_file):
    """Only OTLP_ENDPOINT turns tracing on: a provider some other library installed globally
    gets no span of ours."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert not tracing.enabled()

    async def scenario(router: RouterInProcess) -> None:
        await router.stub.Generate(
            fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text="w1")], params=_params(2))
        )

    _run(tokenizer_file, scenario)
    assert exporter.get_finished_spans() == ()


def test_an_endpoint_without_the_sdk_is_refused_with_the_install_command(monkeypatch):
    real_import = builtins.__import__

    def no_sdk(name, *args, **kwargs):
        if name.startswith("opentelemetry.sdk") or name.startswith("opentelemetry.exporter"):
            raise ImportError(f"No module named '{name}'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sdk)
    with pytest.raises(tracing.TracingUnavailableError, match=r"pip install 'tgis-router\[otlp\]'"):
        tracing.configure("http://collector:4317", "tgis")
    assert not tracing.enabled()
    tracing.configure(None, "tgis")  # unset: nothing to import, tracing stays off
    assert not tracing.enabled()
