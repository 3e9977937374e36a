"""Property tests through the real launcher: any Parameters and hostile text (empty, NUL bytes,
neighbours of the surrogate range, huge, emoji-heavy) get OK or INVALID_ARGUMENT /
RESOURCE_EXHAUSTED with a message: never INTERNAL or UNKNOWN, never a hang; and the server
serves afterwards."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.support.server import launcher
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_proto import generation_pb2 as fmaas

MAX_NEW_TOKENS = 8
MAX_SEQUENCE_LENGTH = 128
CALL_TIMEOUT_S = 60.0  # a call still running then is a hang
ANSWERS_WITH_A_REASON = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
EXAMPLES = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=6)
    with launcher(
        model_dir,
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--max-sequence-length",
        str(MAX_SEQUENCE_LENGTH),
        "--max-concurrent-requests",
        "8",
    ) as running:
        yield running


uint32 = st.integers(0, 2**32 - 1)
any_float = st.floats(allow_nan=True, allow_infinity=True, width=32)


def mostly(valid: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` nine times in ten, else ``wild``: most calls get deep enough to generate."""
    return st.integers(0, 9).flatmap(lambda i: wild if i == 0 else valid)


def unit_interval() -> st.SearchStrategy:
    return mostly(st.floats(0.0, 1.0), any_float)


# Text that must not break the tokenizer, the detokenizer or the wire.
hostile_text = st.one_of(
    st.just(""),
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from(["\x00", "a", " ", "\n"]), max_size=40),
    st.text(alphabet=st.sampled_from(["\ud7ff", "\ue000", "\uffff", "\U00010000", "\U0010ffff"]), max_size=20),
    st.lists(st.sampled_from(["😀", "👩‍👩‍👧", "🇫🇷", "\u200d", "é", " "]), max_size=30).map("".join),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "ab ", "😀"]), st.integers(1_000, 30_000)),
)


@st.composite
def parameters(draw: st.DrawFn) -> fmaas.Parameters:
    sampling = fmaas.SamplingParameters(
        temperature=draw(mostly(st.sampled_from([0.0, 0.05, 0.7, 1.0, 5.0]), any_float)),
        top_k=draw(mostly(st.integers(0, 50), uint32)),
        top_p=draw(unit_interval()),
        typical_p=draw(unit_interval()),
    )
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    stopping = fmaas.StoppingCriteria(
        max_new_tokens=draw(mostly(st.integers(1, MAX_NEW_TOKENS), uint32)),  # 0: the default, 20
        min_new_tokens=draw(mostly(st.integers(0, 1), uint32)),
        time_limit_millis=draw(st.sampled_from([0, 0, 1, 50, 2**32 - 1])),
        stop_sequences=draw(
            mostly(st.lists(st.text(min_size=1, max_size=4), max_size=3), st.lists(st.text(max_size=250), max_size=8))
        ),
    )
    if draw(st.booleans()):
        stopping.include_stop_sequence = draw(st.booleans())
    decoding = fmaas.DecodingParameters(repetition_penalty=draw(mostly(st.floats(0.0, 3.0), any_float)))
    if draw(st.booleans()):
        decoding.length_penalty.CopyFrom(
            fmaas.DecodingParameters.LengthPenalty(
                start_index=draw(mostly(st.integers(0, 8), uint32)),
                decay_factor=draw(mostly(st.floats(1.0, 10.0), any_float)),
            )
        )
    details = draw(st.booleans())
    response = fmaas.ResponseOptions(
        input_text=draw(st.booleans()),
        generated_tokens=draw(st.booleans()) or details,
        input_tokens=draw(st.booleans()),
        token_logprobs=details and draw(st.booleans()),
        token_ranks=details and draw(st.booleans()),
        top_n_tokens=draw(mostly(st.integers(0, 5), uint32)) if details else 0,
    )
    return fmaas.Parameters(
        method=draw(st.sampled_from([fmaas.GREEDY, fmaas.SAMPLE])),
        sampling=sampling,
        stopping=stopping,
        response=response,
        decoding=decoding,
        truncate_input_tokens=draw(mostly(st.integers(0, 200), uint32)),
    )


def _check(call) -> None:
    """The call answers, or refuses with a reason a client can act on."""
    try:
        call()
    except grpc.RpcError as e:
        refusal = e
    else:
        event("OK")
        return
    assert refusal.code() in ANSWERS_WITH_A_REASON, f"{refusal.code().name}: {refusal.details()}"
    assert refusal.details()
    event(refusal.details().split(":")[0][:40])


texts_to_generate_from = st.one_of(
    st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=30), min_size=1, max_size=3),
    st.lists(hostile_text, min_size=1, max_size=3),
)


@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(texts=texts_to_generate_from, params=parameters(), stream=st.booleans())
def test_any_parameters_and_text_get_an_answer_or_a_clear_refusal(server, texts, params, stream):
    if stream:
        request = fmaas.SingleGenerationRequest(request=fmaas.GenerationRequest(text=texts[0]), params=params)
        _check(lambda: list(server.stub.GenerateStream(request, timeout=CALL_TIMEOUT_S)))
    else:
        batch = fmaas.BatchedGenerationRequest(requests=[fmaas.GenerationRequest(text=t) for t in texts], params=params)
        _check(lambda: server.stub.Generate(batch, timeout=CALL_TIMEOUT_S))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(texts=st.lists(hostile_text, max_size=3), truncate=st.one_of(st.integers(0, 10), uint32))
def test_tokenize_takes_any_text(server, texts, truncate):
    request = fmaas.BatchedTokenizeRequest(
        requests=[fmaas.TokenizeRequest(text=t) for t in texts],
        return_tokens=True,
        return_offsets=True,
        truncate_input_tokens=truncate,
    )
    assert len(server.stub.Tokenize(request, timeout=CALL_TIMEOUT_S).responses) == len(texts)


def test_the_server_serves_after_the_hostile_calls(server):
    request = fmaas.BatchedGenerationRequest(
        requests=[fmaas.GenerationRequest(text="The lighthouse keeper")],
        params=fmaas.Parameters(stopping=fmaas.StoppingCriteria(max_new_tokens=4, min_new_tokens=4)),
    )
    assert server.stub.Generate(request, timeout=CALL_TIMEOUT_S).responses[0].generated_token_count == 4
