"""The real launcher, router and shard on a tiny random-weight LLaMA, driven by a gRPC client."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from transformers import AutoTokenizer

from tests.support.prefixes import reference_greedy_with_prefix, save_peft_prefix
from tests.support.server import launcher
from tests.support.tiny_models import EOS_ID, build_tiny_causal_lm, reference_greedy
from tgis_proto import generation_pb2 as fmaas

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog, and then it",
    "A",
    "Numbers: 1, 2, 3, 4, 5, 6, 7",
]
MAX_NEW_TOKENS = 12
MAX_CONCURRENT = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="module")
def prefix_store(model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("prefixes")
    return store, save_peft_prefix(model_dir, store, "tuned/task-1", length=6, seed=3)


@pytest.fixture(scope="module")
def server(model_dir, prefix_store):
    store, _ = prefix_store
    with launcher(
        model_dir,
        "--max-concurrent-requests",
        str(MAX_CONCURRENT),
        "--max-batch-size",
        "6",
        "--max-new-tokens",
        "64",
        env={"PREFIX_STORE_PATH": str(store)},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference_greedy(model_dir, PROMPTS, MAX_NEW_TOKENS)


def _params(**response) -> fmaas.Parameters:
    return fmaas.Parameters(
        stopping=fmaas.StoppingCriteria(max_new_tokens=MAX_NEW_TOKENS),
        response=fmaas.ResponseOptions(**response),
    )


def _batch(prompts, params) -> fmaas.BatchedGenerationRequest:
    return fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text=p) for p in prompts], params=params)


def _expected_text(reference, tokenizer) -> str:
    # Random weights emit stray byte tokens; an incomplete UTF-8 sequence at the end is dropped.
    return tokenizer.decode(reference, skip_special_tokens=True).rstrip("\ufffd")


def _check_matches_reference(response, prompt_ids, reference, tokenizer):
    assert response.input_token_count == len(prompt_ids)
    assert response.generated_token_count == len(reference)
    assert [t.text for t in response.tokens] == tokenizer.convert_ids_to_tokens(reference)
    assert response.text == _expected_text(reference, tokenizer)
    ended_by_eos = reference[-1] == EOS_ID
    assert response.stop_reason == (fmaas.EOS_TOKEN if ended_by_eos else fmaas.MAX_TOKENS)


def test_greedy_batch_of_different_lengths_equals_transformers_generate(server, tokenizer, expected):
    response = server.stub.Generate(_batch(PROMPTS, _params(generated_tokens=True)))
    assert len(response.responses) == len(PROMPTS)
    for prompt, reference, r in zip(PROMPTS, expected, response.responses, strict=True):
        _check_matches_reference(r, tokenizer(prompt).input_ids, reference, tokenizer)


def test_streaming_equals_unary(server):
    params = _params(generated_tokens=True, input_text=True)
    for prompt in PROMPTS[:2]:
        unary = server.stub.Generate(_batch([prompt], params)).responses[0]
        messages = list(
            server.stub.GenerateStream(
                fmaas.SingleGenerationRequest(request=fmaas.GenerationRequest(text=prompt), params=params)
            )
        )
        first, rest = messages[0], messages[1:]
        assert first.input_token_count == unary.input_token_count
        assert first.text == prompt
        assert unary.text == prompt + "".join(m.text for m in rest)
        assert [t.text for m in rest for t in m.tokens] == [t.text for t in unary.tokens]
        assert [m.generated_token_count for m in rest] == list(range(1, unary.generated_token_count + 1))
        assert rest[-1].stop_reason == unary.stop_reason != fmaas.NOT_FINISHED
        assert all(m.stop_reason == fmaas.NOT_FINISHED for m in rest[:-1])


def test_sixteen_concurrent_clients_all_get_their_own_answer(server, tokenizer, expected):
    jobs = [(i % len(PROMPTS), i % 2 == 0) for i in range(MAX_CONCURRENT)]

    def call(job):
        index, stream = job
        request = fmaas.SingleGenerationRequest(request=fmaas.GenerationRequest(text=PROMPTS[index]), params=_params())
        if stream:
            return index, "".join(m.text for m in server.stub.GenerateStream(request))
        return index, server.stub.Generate(_batch([PROMPTS[index]], _params())).responses[0].text

    with ThreadPoolExecutor(MAX_CONCURRENT) as pool:
        results = list(pool.map(call, jobs))
    for index, text in results:
        assert text == _expected_text(expected[index], tokenizer)


def test_calls_beyond_max_concurrent_requests_are_refused_at_once(server):
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Generate(_batch(["x"] * (MAX_CONCURRENT + 1), _params()))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.details() == "Model is overloaded"


def test_empty_batch_returns_empty_response(server):
    assert len(server.stub.Generate(fmaas.BatchedGenerationRequest()).responses) == 0


def test_one_bad_parameter_fails_the_whole_call_with_its_message(server):
    params = fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=65))
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Generate(_batch(PROMPTS, params))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "max_new_tokens must be <= 64"


def test_an_input_without_tokens_is_invalid_argument_naming_its_index(server):
    # The tiny tokenizer adds no BOS, so an empty text has no tokens: nothing to generate from.
    # A deadline, so that a request that is never answered fails instead of hanging.
    calls = [
        lambda: server.stub.Generate(_batch([""], _params()), timeout=30),
        lambda: server.stub.Generate(_batch(["Hello", "", "there"], _params()), timeout=30),
        lambda: list(
            server.stub.GenerateStream(
                fmaas.SingleGenerationRequest(request=fmaas.GenerationRequest(text=""), params=_params()), timeout=30
            )
        ),
    ]
    for call, index in zip(calls, [0, 1, 0], strict=True):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == f"input {index} is empty: it has no tokens and no prompt prefix"
    # A prompt prefix stands in for the tokens; the server still serves.
    prefixed = fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text="")], params=_params())
    prefixed.prefix_id = "tuned/task-1"
    assert server.stub.Generate(prefixed, timeout=30).responses[0].generated_token_count > 0


def test_a_stream_without_its_request_is_invalid_argument(server):
    with pytest.raises(grpc.RpcError) as e:
        list(server.stub.GenerateStream(fmaas.SingleGenerationRequest(params=_params())))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "missing request"


def test_prompt_prefix_output_equals_transformers_on_prefixed_embeddings(server, model_dir, tokenizer, prefix_store):
    _, prefix = prefix_store
    prompts = PROMPTS[:2]
    request = _batch(prompts, _params(generated_tokens=True))
    request.prefix_id = "tuned/task-1"
    response = server.stub.Generate(request)
    for prompt, r in zip(prompts, response.responses, strict=True):
        ids = tokenizer(prompt).input_ids
        reference = reference_greedy_with_prefix(model_dir, prefix, ids, MAX_NEW_TOKENS)
        _check_matches_reference(r, ids, reference, tokenizer)
    stream = fmaas.SingleGenerationRequest(
        request=fmaas.GenerationRequest(text=prompts[0]), params=_params(), prefix_id="tuned/task-1"
    )
    streamed = "".join(message.text for message in server.stub.GenerateStream(stream))
    assert streamed == response.responses[0].text


@pytest.mark.parametrize(
    ("prefix_id", "reason"),
    [
        ("my-prefix", 'prefix id "my-prefix" not found'),
        ("../outside", "invalid prefix id '../outside': use letters, digits, '_', '-' and '/' between names"),
    ],
)
def test_unknown_or_malformed_prefix_is_invalid_argument(server, prefix_id, reason):
    request = _batch(PROMPTS[:1], _params())
    request.prefix_id = prefix_id
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Generate(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == f"can't retrieve prompt prefix with id '{prefix_id}': {reason}"


def test_prefix_length_counts_against_the_sequence_limit(server):
    limit = server.stub.ModelInfo(fmaas.ModelInfoRequest()).max_sequence_length
    # Truncated to limit - 3 tokens the input fits alone, not after the prefix's 6.
    n = limit - 3
    params = _params()
    params.truncate_input_tokens = n
    request = _batch(["many words " * limit], params)
    request.prefix_id = "tuned/task-1"
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Generate(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == f"input tokens ({n}) plus prefix length (6) must be < {limit}"


def test_default_max_new_tokens_is_20(server):
    # min_new_tokens 20 keeps EOS away: only the default max_new_tokens can end the request.
    request = _batch(["Hello there"], fmaas.Parameters(stopping=fmaas.StoppingCriteria(min_new_tokens=20)))
    response = server.stub.Generate(request).responses[0]
    assert response.generated_token_count == 20
    assert response.stop_reason == fmaas.MAX_TOKENS


def test_tokenize_adds_special_tokens_and_truncates_from_the_left(server, tokenizer):
    text = PROMPTS[1]
    request = fmaas.BatchedTokenizeRequest(
        requests=[fmaas.TokenizeRequest(text=text)], return_tokens=True, return_offsets=True
    )
    response = server.stub.Tokenize(request).responses[0]
    encoding = tokenizer(text, return_offsets_mapping=True)
    assert response.token_count == len(encoding.input_ids)
    assert list(response.tokens) == tokenizer.convert_ids_to_tokens(encoding.input_ids)
    assert [(o.start, o.end) for o in response.offsets] == [tuple(o) for o in encoding.offset_mapping]
    request.truncate_input_tokens = 3
    truncated = server.stub.Tokenize(request).responses[0]
    assert truncated.token_count == 3
    assert list(truncated.tokens) == list(response.tokens)[-3:]


def test_model_info(server):
    info = server.stub.ModelInfo(fmaas.ModelInfoRequest(model_id="ignored"))
    assert info.model_kind == fmaas.ModelInfoResponse.DECODER_ONLY
    assert info.max_sequence_length == 256
    assert info.max_new_tokens == 64


def test_without_deployment_framework_a_cpu_runs_hf_transformers_and_the_launcher_says_why(server):
    assert "engine hf_transformers: no GPU (tgis_native with the llama plugin is for GPUs)" in server.log()
    assert "1 shard(s) ready: hf_transformers" in server.log()


def test_health_and_metrics_over_http(server):
    for _ in range(2):  # a forward pass before any generation was seen, then a ping
        with urllib.request.urlopen(f"http://localhost:{server.http_port}/health", timeout=60) as response:
            assert response.status == 200
            assert response.read() == b""
    with urllib.request.urlopen(f"http://localhost:{server.http_port}/metrics", timeout=10) as response:
        body = response.read().decode()
    assert "tgi_request_count_total" in body
    assert 'tgi_request_success_total{kind="batch",stop_reason="MAX_TOKENS"}' in body
    assert "tgi_request_time_to_first_token_bucket" in body
    assert "tgi_batch_inference_batch_size_bucket" in body


def test_grpc_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(server.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="fmaas.GenerationService")).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "fmaas.GenerationService" in services


def test_load_generator_measures_a_streaming_load(server):
    from bench.load import run

    result = run(f"localhost:{server.grpc_port}", concurrency=4, requests=8, prompt_words=8, max_new_tokens=6, seed=1)
    assert result["errors"] == []
    assert result["tokens"] == 8 * 6  # min_new_tokens = max_new_tokens: every request runs to the end
    assert len(result["ttft"]) == 8
    assert len(result["itl"]) == 8 * 5
    assert all(t > 0 for t in result["ttft"] + result["itl"])
