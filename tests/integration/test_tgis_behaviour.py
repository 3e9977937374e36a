"""TGIS semantics end to end on a tiny LLaMA: sampling, token details, stopping, time limits,
cancellation, concurrency and metric counts."""

from __future__ import annotations

import math
import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.server import launcher
from tests.support.tiny_models import build_tiny_causal_lm, reference_greedy
from tgis_proto import generation_pb2 as fmaas

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog", "Numbers: 1, 2, 3"]
MAX_NEW_TOKENS_LIMIT = 200
MAX_BATCH_SIZE = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=1)


@pytest.fixture(scope="module")
def server(model_dir):
    with launcher(
        model_dir,
        "--max-concurrent-requests",
        "100",
        "--max-batch-size",
        str(MAX_BATCH_SIZE),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS_LIMIT),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _generate(server, prompts, **params) -> list[fmaas.GenerationResponse]:
    request = fmaas.BatchedGenerationRequest(
        requests=[fmaas.GenerationRequest(text=p) for p in prompts], params=fmaas.Parameters(**params)
    )
    return list(server.stub.Generate(request).responses)


def _stream(server, prompt, **params) -> list[fmaas.GenerationResponse]:
    request = fmaas.SingleGenerationRequest(
        request=fmaas.GenerationRequest(text=prompt), params=fmaas.Parameters(**params)
    )
    return list(server.stub.GenerateStream(request))


def _sampling(seed: int | None = None, **kwargs) -> dict:
    sampling = fmaas.SamplingParameters(**kwargs)
    if seed is not None:
        sampling.seed = seed
    return {"method": fmaas.SAMPLE, "sampling": sampling}


def _stopping(**kwargs) -> dict:
    return {"stopping": fmaas.StoppingCriteria(**kwargs)}


def _tokens(**kwargs) -> fmaas.ResponseOptions:
    return fmaas.ResponseOptions(**kwargs)


# Validation -----------------------------------------------------------------------------------

LENGTH_PENALTY = fmaas.DecodingParameters.LengthPenalty


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (_sampling(temperature=0.01), "temperature must be >= 0.05"),
        (_sampling(top_p=1.5), "top_p must be > 0.0 and <= 1.0"),
        (_sampling(typical_p=2.0), "typical_p must be <= 1.0"),
        (_stopping(max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1), f"max_new_tokens must be <= {MAX_NEW_TOKENS_LIMIT}"),
        (_stopping(max_new_tokens=5, min_new_tokens=6), "min_new_tokens must be <= max_new_tokens"),
        ({"decoding": fmaas.DecodingParameters(repetition_penalty=-0.5)}, "repetition_penalty must be > 0.0"),
        (
            {"decoding": fmaas.DecodingParameters(length_penalty=LENGTH_PENALTY(start_index=2, decay_factor=11))},
            "length_penalty must be >= 1.0 and <= 10.0",
        ),
        (
            _stopping(stop_sequences=["a", "b", "c", "d", "e", "f", "g"]),
            "can specify at most 6 non-empty stop sequences, each not more than 240 UTF8 bytes",
        ),
        (
            {"response": fmaas.ResponseOptions(token_ranks=True)},
            "must request input and/or generated tokens to request extra token detail",
        ),
    ],
)
def test_invalid_argument_messages_over_grpc(server, params, message):
    with pytest.raises(grpc.RpcError) as e:
        _generate(server, PROMPTS, **params)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == message


def test_sequence_length_messages_over_grpc(server, tokenizer):
    long = " ".join(["word"] * 300)
    n = len(tokenizer(long).input_ids)
    with pytest.raises(grpc.RpcError) as e:
        _generate(server, [PROMPTS[0], long])
    assert e.value.details() == f"input tokens ({n}) plus prefix length (0) must be < 256"
    # An input that fits, but not with 100 more tokens after it.
    fits = next(t for k in range(1, 300) if len(tokenizer(t := " ".join(["word"] * k)).input_ids) > 160)
    m = len(tokenizer(fits).input_ids)
    assert m < 256
    with pytest.raises(grpc.RpcError) as e:
        _generate(server, [fits], **_stopping(max_new_tokens=100, min_new_tokens=100))
    assert e.value.details() == f"input tokens ({m}) plus prefix length (0) plus min_new_tokens (100) must be <= 256"


# Sampling --------------------------------------------------------------------------------------


def test_a_seed_gives_the_same_sample_alone_and_inside_any_batch(server):
    params = {**_sampling(seed=77, temperature=1.5, top_k=50), **_stopping(max_new_tokens=16)}
    alone = _generate(server, [PROMPTS[0]], **params)[0]
    batched = _generate(server, [PROMPTS[1], PROMPTS[0], PROMPTS[2]], **params)[1]
    assert alone.seed == batched.seed == 77
    assert alone.text == batched.text
    greedy = _generate(server, [PROMPTS[0]], **_stopping(max_new_tokens=16))[0]
    assert alone.text != greedy.text  # it really samples


def test_unseeded_inputs_get_their_own_random_seed_which_reproduces_them(server):
    params = {**_sampling(top_p=0.9), **_stopping(max_new_tokens=12)}
    first, second = _generate(server, [PROMPTS[2], PROMPTS[2]], **params)
    assert first.seed != second.seed
    assert 0 < first.seed < 2**32
    replay = _generate(
        server, [PROMPTS[2]], **{**_sampling(seed=first.seed, top_p=0.9), **_stopping(max_new_tokens=12)}
    )
    assert replay[0].text == first.text


def test_greedy_responses_carry_no_seed(server):
    assert _generate(server, [PROMPTS[0]], **_stopping(max_new_tokens=2))[0].seed == 0


# Token details --------------------------------------------------------------------------------


def test_generated_token_details_equal_log_softmax_of_the_reference_scores(server, model, tokenizer):
    n, top_n = 6, 3
    options = _tokens(generated_tokens=True, token_logprobs=True, token_ranks=True, top_n_tokens=top_n)
    response = _generate(server, [PROMPTS[1]], **_stopping(max_new_tokens=n), response=options)[0]
    ids = tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for info, logits in zip(response.tokens, out.logits, strict=False):
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        token_id = tokenizer.convert_tokens_to_ids(info.text)
        assert info.logprob == pytest.approx(float(logprobs[token_id]), abs=1e-3)
        assert info.rank == 1
        best = logprobs.topk(top_n)
        assert [t.text for t in info.top_tokens] == tokenizer.convert_ids_to_tokens(best.indices.tolist())
        assert [t.logprob for t in info.top_tokens] == pytest.approx(best.values.tolist(), abs=1e-3)


def test_input_token_details_first_is_nan_rest_from_the_reference(server, model, tokenizer):
    options = _tokens(input_tokens=True, token_logprobs=True, token_ranks=True, top_n_tokens=2)
    response = _generate(server, [PROMPTS[1]], **_stopping(max_new_tokens=1), response=options)[0]
    ids = tokenizer(PROMPTS[1]).input_ids
    assert [t.text for t in response.input_tokens] == tokenizer.convert_ids_to_tokens(ids)
    first, rest = response.input_tokens[0], response.input_tokens[1:]
    assert math.isnan(first.logprob)
    assert first.rank == 0
    assert not first.top_tokens
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for position, info in enumerate(rest):
        expected = logprobs[position]
        assert info.logprob == pytest.approx(float(expected[ids[position + 1]]), abs=1e-3)
        assert info.rank == 1 + int((expected > expected[ids[position + 1]]).sum())
        assert len(info.top_tokens) == 2


def test_sampled_token_details_never_show_tokens_a_warper_removed(server):
    options = _tokens(generated_tokens=True, token_logprobs=True, top_n_tokens=5)
    params = {**_sampling(seed=3, top_k=2), **_stopping(max_new_tokens=8)}
    response = _generate(server, [PROMPTS[0]], **params, response=options)[0]
    for info in response.tokens:
        assert 1 <= len(info.top_tokens) <= 2
        assert all(math.isfinite(t.logprob) for t in info.top_tokens)
        assert sum(math.exp(t.logprob) for t in info.top_tokens) == pytest.approx(1.0, abs=1e-3)


# Stopping -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_text(server):
    response = _generate(server, [PROMPTS[0]], **_stopping(max_new_tokens=30))[0]
    assert len(response.text) > 12
    return response.text


def _a_stop_sequence(text: str) -> tuple[str, int]:
    start = len(text) // 2
    stop = text[start : start + 3]
    return stop, text.index(stop)


@pytest.mark.parametrize("include", [True, False])
def test_stop_sequence_in_unary_and_streaming(server, greedy_text, include):
    stop, at = _a_stop_sequence(greedy_text)
    params = {
        "stopping": fmaas.StoppingCriteria(max_new_tokens=30, stop_sequences=[stop], include_stop_sequence=include),
    }
    unary = _generate(server, [PROMPTS[0]], **params)[0]
    expected = greedy_text[: at + len(stop)] if include else greedy_text[:at]
    assert unary.text == expected
    assert unary.stop_reason == fmaas.STOP_SEQUENCE
    assert unary.stop_sequence == stop
    messages = _stream(server, PROMPTS[0], **params)
    assert "".join(m.text for m in messages) == expected
    assert messages[-1].stop_reason == fmaas.STOP_SEQUENCE
    assert messages[-1].stop_sequence == stop
    assert messages[-1].generated_token_count == unary.generated_token_count


def test_token_limit_when_input_plus_max_new_tokens_exceeds_the_sequence_length(server, tokenizer):
    prompt = " ".join(["word"] * 400)
    assert len(tokenizer(prompt).input_ids) > 240
    # min_new_tokens keeps EOS away, so only the sequence length can end the request.
    response = _generate(
        server, [prompt], **_stopping(max_new_tokens=50, min_new_tokens=16), truncate_input_tokens=240
    )[0]
    assert response.input_token_count == 240
    assert response.generated_token_count == 256 - 240
    assert response.stop_reason == fmaas.TOKEN_LIMIT


def test_input_text_echo_is_the_untruncated_input(server):
    prompt = PROMPTS[1]
    response = _generate(
        server, [prompt], **_stopping(max_new_tokens=3), truncate_input_tokens=2, response=_tokens(input_text=True)
    )[0]
    assert response.input_token_count == 2
    assert response.text.startswith(prompt)


def test_min_new_tokens_masks_eos_until_reached(server):
    # A strong length penalty makes EOS the best token from the second token on.
    decoding = fmaas.DecodingParameters(
        length_penalty=fmaas.DecodingParameters.LengthPenalty(start_index=0, decay_factor=10.0)
    )
    options = _tokens(generated_tokens=True)
    eager = _generate(server, [PROMPTS[2]], **_stopping(max_new_tokens=20), decoding=decoding, response=options)[0]
    assert eager.stop_reason == fmaas.EOS_TOKEN
    assert eager.generated_token_count <= 3
    held = _generate(
        server, [PROMPTS[2]], **_stopping(max_new_tokens=20, min_new_tokens=6), decoding=decoding, response=options
    )[0]
    assert held.stop_reason == fmaas.EOS_TOKEN
    assert held.generated_token_count == 7
    # The EOS that ends a request counts, shows in tokens, and never in text.
    assert held.tokens[-1].text == "</s>"
    assert all(t.text != "</s>" for t in held.tokens[:-1])
    assert "</s>" not in held.text


def test_time_limit_in_unary_and_streaming(server):
    params = _stopping(max_new_tokens=MAX_NEW_TOKENS_LIMIT, time_limit_millis=30)
    response = _generate(server, [PROMPTS[0]], **params)[0]
    assert response.stop_reason == fmaas.TIME_LIMIT
    assert response.generated_token_count < MAX_NEW_TOKENS_LIMIT
    messages = _stream(server, PROMPTS[0], **params)
    assert messages[-1].stop_reason == fmaas.TIME_LIMIT


def test_a_stream_that_expires_in_the_queue_gets_one_time_limit_message(server):
    long = {**_stopping(max_new_tokens=MAX_NEW_TOKENS_LIMIT)}
    started = threading.Barrier(MAX_BATCH_SIZE + 1)

    def occupy():
        stream = server.stub.GenerateStream(
            fmaas.SingleGenerationRequest(
                request=fmaas.GenerationRequest(text=PROMPTS[1]), params=fmaas.Parameters(**long)
            )
        )
        next(stream)
        started.wait()
        for _ in stream:
            pass

    with ThreadPoolExecutor(MAX_BATCH_SIZE) as pool:
        futures = [pool.submit(occupy) for _ in range(MAX_BATCH_SIZE)]
        started.wait()  # the batch is full: the next request queues
        messages = _stream(server, PROMPTS[0], **_stopping(max_new_tokens=5, time_limit_millis=1))
        for future in futures:
            future.result()
    assert len(messages) == 1
    assert messages[0].stop_reason == fmaas.TIME_LIMIT
    assert messages[0].generated_token_count == 0
    assert messages[0].input_token_count > 0


# Load, cancellation, metrics -------------------------------------------------------------------


def test_sixty_four_concurrent_clients_mixing_unary_and_streaming(server, model_dir, tokenizer):
    expected = reference_greedy(model_dir, PROMPTS, 10)
    texts = [tokenizer.decode(e, skip_special_tokens=True).rstrip("\ufffd") for e in expected]

    def call(i: int) -> tuple[int, str]:
        index = i % len(PROMPTS)
        if i % 2:
            return index, "".join(m.text for m in _stream(server, PROMPTS[index], **_stopping(max_new_tokens=10)))
        return index, _generate(server, [PROMPTS[index]], **_stopping(max_new_tokens=10))[0].text

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(call, range(64)))
    assert [text for _, text in results] == [texts[index] for index, _ in results]


def _metric(server, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"http://localhost:{server.http_port}/metrics", timeout=10) as response:
        body = response.read().decode()
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(\{[^}]*\})?") + r" (\S+)"
    return sum(float(m.group(m.lastindex)) for m in re.finditer("^" + pattern + "$", body, re.MULTILINE))


def test_eight_cancelled_streams_free_their_slots_and_count_as_cancelled(server, tokenizer):
    before_cancelled = _metric(server, "tgi_request_success_total", 'kind="stream",stop_reason="CANCELLED"')
    before_tokens = _metric(server, "tgi_request_generated_tokens_sum")
    calls = []
    for _ in range(MAX_BATCH_SIZE):  # all of them decode together
        call = server.stub.GenerateStream(
            fmaas.SingleGenerationRequest(
                request=fmaas.GenerationRequest(text=PROMPTS[1]),
                params=fmaas.Parameters(**_stopping(max_new_tokens=MAX_NEW_TOKENS_LIMIT)),
            )
        )
        next(call)
        calls.append(call)
    for call in calls:
        call.cancel()
    # The next request runs to completion and every cancelled stream is accounted for.
    response = _generate(server, [PROMPTS[0]], **_stopping(max_new_tokens=4))[0]
    assert response.generated_token_count == 4 or response.stop_reason == fmaas.EOS_TOKEN
    deadline_cancelled = before_cancelled + MAX_BATCH_SIZE
    for _ in range(100):
        if _metric(server, "tgi_request_success_total", 'kind="stream",stop_reason="CANCELLED"') >= deadline_cancelled:
            break
        threading.Event().wait(0.1)
    assert _metric(server, "tgi_request_success_total", 'kind="stream",stop_reason="CANCELLED"') == deadline_cancelled
    cancelled_tokens = (
        _metric(server, "tgi_request_generated_tokens_sum") - before_tokens - response.generated_token_count
    )
    assert cancelled_tokens < MAX_BATCH_SIZE * MAX_NEW_TOKENS_LIMIT / 2


def test_metric_counts(server):
    count = _metric(server, "tgi_request_count_total", 'kind="batch"')
    singles = _metric(server, "tgi_request_count", 'kind="single"')
    inputs = _metric(server, "tgi_request_input_count")
    success = _metric(server, "tgi_request_success_total", 'kind="batch",stop_reason="MAX_TOKENS"')
    failures = _metric(server, "tgi_request_failure_total", 'err="validation"')
    responses = _generate(server, PROMPTS, **_stopping(max_new_tokens=2))
    with pytest.raises(grpc.RpcError):
        _generate(server, PROMPTS[:1], **_stopping(max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1))
    # Per call, as TGIS counts them: a call of one input is "single"; inputs are counted apart.
    assert _metric(server, "tgi_request_count_total", 'kind="batch"') == count + 1
    assert _metric(server, "tgi_request_count", 'kind="single"') == singles + 1
    assert _metric(server, "tgi_request_input_count_total") == inputs + len(PROMPTS) + 1
    finished = sum(r.stop_reason == fmaas.MAX_TOKENS for r in responses)
    assert _metric(server, "tgi_request_success_total", 'kind="batch",stop_reason="MAX_TOKENS"') == success + finished
    assert _metric(server, "tgi_request_failure_total", 'err="validation"') == failures + 1
    assert _metric(server, "tgi_queue_size") == 0


# TGIS's router table (name: kind); counters are scraped as NAME and NAME_total.
TGIS_SERIES = {
    **dict.fromkeys(
        [
            "tgi_request_count",
            "tgi_request_input_count",
            "tgi_request_failure",
            "tgi_request_success",
            "tgi_batch_concatenation_count",
            "tgi_batch_inference_count",
            "tgi_batch_inference_success",
            "tgi_batch_inference_failure",
            "tgi_queue_jump",
            "tgi_granular_batch_addition",
            "tgi_prefill_weight_limit_exceeded",
            "tgi_prefill_padding_limit_exceeded",
            "tgi_prompt_load_failure",
            "tgi_tokenize_request_count",
            "tgi_tokenize_request_input_count",
        ],
        "counter",
    ),
    **dict.fromkeys(
        [
            "tgi_request_max_new_tokens",
            "tgi_request_input_length",
            "tgi_request_validation_duration",
            "tgi_request_queue_duration",
            "tgi_request_generated_tokens",
            "tgi_request_total_tokens",
            "tgi_request_duration",
            "tgi_request_inference_duration",
            "tgi_request_mean_time_per_token_duration",
            "tgi_batch_inference_batch_size",
            "tgi_batch_inference_duration",
            "tgi_batch_inference_forward_duration",
            "tgi_batch_inference_tokproc_duration",
            "tgi_prompt_load_duration",
            "tgi_tokenize_request_tokens",
            "tgi_tokenize_request_duration",
        ],
        "histogram",
    ),
    **dict.fromkeys(("tgi_request_raw_input_length", "tgi_batch_next_tokens"), "summary"),
    **dict.fromkeys(
        ("tgi_batch_current_size", "tgi_batch_input_tokens", "tgi_batch_max_remaining_tokens", "tgi_queue_size"),
        "gauge",
    ),
}


def test_every_tgis_series_is_scraped_with_its_kind_and_labels(server):
    _generate(server, PROMPTS, **_stopping(max_new_tokens=3))
    tokenize = fmaas.BatchedTokenizeRequest(requests=[fmaas.TokenizeRequest(text=p) for p in PROMPTS])
    tokens = sum(r.token_count for r in server.stub.Tokenize(tokenize).responses)
    with urllib.request.urlopen(f"http://localhost:{server.http_port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = response.read().decode()
    kinds = dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, re.MULTILINE))
    samples = {m.group(1) for m in re.finditer(r"^([a-z_]+)[{ ]", body, re.MULTILINE)}
    for name, kind in TGIS_SERIES.items():
        # prometheus_client's text format names a counter's family NAME_total.
        assert kinds.get(f"{name}_total" if kind == "counter" else name) == kind, name
        if kind == "counter":  # a labelled one has samples once a label set occurred
            assert {name, f"{name}_total"} & samples in (set(), {name, f"{name}_total"}), name
        if kind in ("histogram", "summary"):
            assert f"{name}_count" in samples, name
        assert (f"{name}_bucket" in samples) is (kind == "histogram"), name
        assert f"{name}_created" not in samples, name  # TGIS has no creation timestamps
    for name in ("tgi_request_count", "tgi_request_input_count", "tgi_tokenize_request_count", "tgi_queue_jump"):
        assert {name, f"{name}_total"} <= samples, name
    # Labels as TGIS sets them, and values that follow the calls.
    assert 'tgi_batch_inference_duration_bucket{le="+Inf",makeup="single_only",method="prefill"}' in body
    assert _metric(server, "tgi_batch_inference_forward_duration_count", 'makeup="single_only",method="prefill"') > 0
    assert _metric(server, "tgi_batch_inference_success", 'method="next_token"') > 0
    assert _metric(server, "tgi_tokenize_request_tokens_sum") >= tokens
    assert _metric(server, "tgi_request_max_new_tokens_count") >= len(PROMPTS)


def test_client_deadline_cancels_the_request_on_the_server(server):
    before = _metric(server, "tgi_request_success_total", 'kind="single",stop_reason="CANCELLED"')
    request = fmaas.BatchedGenerationRequest(
        requests=[fmaas.GenerationRequest(text=PROMPTS[1])],
        params=fmaas.Parameters(**_stopping(max_new_tokens=MAX_NEW_TOKENS_LIMIT)),
    )
    with pytest.raises(grpc.RpcError) as e:
        server.stub.Generate(request, timeout=0.05)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if _metric(server, "tgi_request_success_total", 'kind="single",stop_reason="CANCELLED"') > before:
            break
        threading.Event().wait(0.05)
    assert _metric(server, "tgi_request_success_total", 'kind="single",stop_reason="CANCELLED"') == before + 1
