"""fmaas.GenerationService in process, over real gRPC, on a batcher over scripted shards: call
shapes, refusals, client cancellation and deadlines release what they held, failures counted once."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from prometheus_client import REGISTRY

from tests.support.fake_shard import FakeShards, expected_text, rpc_error, save_word_tokenizer
from tests.support.router_in_process import RouterInProcess
from tgis_proto import generation_pb2 as fmaas
from tgis_proto.logs import JsonFormatter

MAX_CONCURRENT = 4


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return save_word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def run_service(
    tokenizer_file, scenario: Callable[[RouterInProcess], Awaitable[None]], shards: FakeShards | None = None
):
    async def main() -> None:
        async with RouterInProcess(tokenizer_file, shards or FakeShards(), MAX_CONCURRENT) as service:
            await asyncio.wait_for(scenario(service), 30)

    asyncio.run(main())


def _params(max_new_tokens: int = 4, **kwargs) -> fmaas.Parameters:
    return fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=max_new_tokens), **kwargs)


def _batch(texts: list[str], params: fmaas.Parameters) -> fmaas.BatchedGenerationRequest:
    return fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text=t) for t in texts], params=params)


def _stream_request(text: str, params: fmaas.Parameters) -> fmaas.SingleGenerationRequest:
    return fmaas.SingleGenerationRequest(request=fmaas.GenerationRequest(text=text), params=params)


def _failures(err: str | None = None) -> float:
    """tgi_request_failure_total for one err label, or over all of them."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == "tgi_request_failure_total" and err in (None, sample.labels["err"])
    )


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.001)


def test_unary_batch_and_stream_answers_agree(tokenizer_file):
    async def scenario(s: RouterInProcess) -> None:
        unary = await s.stub.Generate(_batch(["w1 w2", "w3"], _params()))
        messages = [m async for m in s.stub.GenerateStream(_stream_request("w1 w2", _params()))]
        assert [r.text for r in unary.responses] == [expected_text(1, 4), expected_text(2, 4)]
        assert [r.stop_reason for r in unary.responses] == [fmaas.MAX_TOKENS] * 2
        assert messages[0].input_token_count == 2
        assert "".join(m.text for m in messages[1:]) == expected_text(3, 4)
        assert messages[-1].stop_reason == fmaas.MAX_TOKENS
        assert s.in_flight == 0

    run_service(tokenizer_file, scenario)


def test_refusals_have_their_status_and_message_and_are_counted_once(tokenizer_file):
    async def scenario(s: RouterInProcess) -> None:
        cases = [
            (s.stub.Generate(_batch(["w1"] * (MAX_CONCURRENT + 1), _params())), "Model is overloaded"),
            (s.stub.Generate(_batch(["w1", ""], _params())), "input 1 is empty: it has no tokens and no prompt prefix"),
            (
                s.stub.Generate(
                    fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text="w1")], prefix_id="p")
                ),
                "can't retrieve prompt prefix with id 'p': prefix id \"p\" not found",
            ),
        ]
        before = _failures("validation"), _failures("conc_limit"), _failures()
        for call, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            assert e.value.details() == message
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await anext(aiter(s.stub.GenerateStream(fmaas.SingleGenerationRequest(params=_params()))))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "missing request"
        assert (_failures("validation"), _failures("conc_limit"), _failures()) == (
            before[0] + 3,
            before[1] + 1,
            before[2] + 4,
        )
        assert s.in_flight == 0
        assert s.shards.prefilled == []

    run_service(tokenizer_file, scenario)


def test_a_failed_generation_is_internal_and_counted_once(tokenizer_file):
    def boom(ids: list[int]) -> None:
        raise rpc_error(grpc.StatusCode.INTERNAL, "step failed: boom")

    async def scenario(s: RouterInProcess) -> None:
        before = _failures("generate"), _failures()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.stub.Generate(_batch(["w1"], _params()))
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert e.value.details() == "generation failed: step failed: boom"
        assert (_failures("generate"), _failures()) == (before[0] + 1, before[1] + 1)

    run_service(tokenizer_file, scenario, FakeShards(on_step=boom))


def test_a_client_that_leaves_frees_its_slot_and_its_requests_leave_the_batch(tokenizer_file):
    async def scenario(s: RouterInProcess) -> None:
        stream = s.stub.GenerateStream(_stream_request("w1", _params(max_new_tokens=90)))
        await anext(aiter(stream))
        await anext(aiter(stream))
        stream.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(s.stub.Generate(_batch(["w2", "w3"], _params(max_new_tokens=90)), timeout=0.05), 5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(lambda: s.in_flight == 0)
        await _until(lambda: not s.shards.held_request_ids())
        assert (await s.stub.Generate(_batch(["w1"], _params(max_new_tokens=2)))).responses[
            0
        ].generated_token_count == 2

    run_service(tokenizer_file, scenario, FakeShards(step_delay=0.002))


def test_a_shutting_down_service_refuses_new_calls_and_lets_running_ones_finish(tokenizer_file):
    async def scenario(s: RouterInProcess) -> None:
        stream = s.stub.GenerateStream(_stream_request("w1", _params(max_new_tokens=30)))
        await anext(aiter(stream))
        s.service.refuse_new_calls("the server is shutting down")
        assert not await s.service.wait_idle(0.001)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.stub.Generate(_batch(["w2"], _params()))
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        messages = [m async for m in stream]
        assert messages[-1].generated_token_count == 30
        assert await s.service.wait_idle(5)

    run_service(tokenizer_file, scenario, FakeShards(step_delay=0.002))


def test_each_request_logs_one_line_with_tgis_wording_timings_and_correlation_id(tokenizer_file, caplog):
    async def scenario(s: RouterInProcess) -> None:
        metadata = (("x-correlation-id", "job-42"),)
        await s.stub.Generate(_batch(["w1 w2", "w3"], _params()), metadata=metadata)
        _ = [m async for m in s.stub.GenerateStream(_stream_request("w1", _params(max_new_tokens=2)))]

    with caplog.at_level(logging.INFO, logger="tgis_router.active"):
        run_service(tokenizer_file, scenario)
    lines = [r for r in caplog.records if r.name == "tgis_router.active"]
    assert [r.getMessage().split(" generated")[0] for r in lines] == [
        "Sub-request 1 from batch of 2",
        "Sub-request 2 from batch of 2",
        "Streaming response",
    ]
    first = lines[0]
    assert first.getMessage().startswith("Sub-request 1 from batch of 2 generated 4 tokens before MAX_TOKENS, output ")
    assert "correlation_id=job-42" in first.getMessage()
    assert first.fields["correlation_id"] == "job-42"
    assert lines[2].fields["correlation_id"] == "<none>"
    assert first.fields["input_toks"] == 2
    timings = ("validation_time", "queue_time", "inference_time", "total_time")
    assert all(0 <= first.fields[t] <= first.fields["total_time"] for t in timings)
    # JSON_OUTPUT: the fields are keys of the line's object.
    entry = json.loads(JsonFormatter().format(first))
    assert entry["correlation_id"] == "job-42"
    assert entry["message"] == first.getMessage()


def test_a_burst_of_calls_past_grpcs_default_backlog_is_answered_not_cancelled(tokenizer_file):
    # gRPC's core cancels, with no message, a call arriving while 3,000 others wait for the
    # application (from 1,000 on, at random): the router's event loop is held while a burst
    # arrives, so every call of it waits.
    burst = 3_100

    async def main() -> None:
        async with RouterInProcess(tokenizer_file, FakeShards(), max_concurrent=burst, max_batch_size=256) as service:
            with grpc.insecure_channel(service.address) as channel:
                generate = channel.unary_unary(
                    "/fmaas.GenerationService/Generate",
                    request_serializer=fmaas.BatchedGenerationRequest.SerializeToString,
                    response_deserializer=fmaas.BatchedGenerationResponse.FromString,
                )
                calls = [generate.future(_batch(["hello"], _params(max_new_tokens=1))) for _ in range(burst)]
                time.sleep(2)  # holds the router's loop: the burst waits in gRPC's backlog
                answers = await asyncio.gather(*(asyncio.to_thread(_outcome, call) for call in calls))
        assert [a for a in answers if a != "OK"] == []

    asyncio.run(main())


def _outcome(call: grpc.Future) -> str:
    try:
        call.result(timeout=60)
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"
    return "OK"
