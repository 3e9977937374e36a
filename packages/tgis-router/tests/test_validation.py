"""Parameter validation: TGIS defaults and its INVALID_ARGUMENT messages word for word."""

import math

import pytest

from tgis_proto import generation_pb2 as fmaas
from tgis_router.errors import ValidationError
from tgis_router.validation import Limits, validate_input, validate_params

LIMITS = Limits(max_new_tokens=100, max_sequence_length=64, default_include_stop_seqs=True)


def params(**kwargs) -> fmaas.Parameters:
    return fmaas.Parameters(**kwargs)


def test_defaults():
    p = validate_params(params(), LIMITS)
    assert not p.sample
    assert p.max_new_tokens == 20
    assert p.include_stop_sequence is True


def test_sample_with_zero_temperature_means_one_and_zero_top_p_means_off():
    p = validate_params(params(method=fmaas.SAMPLE), LIMITS)
    assert p.sampling.temperature == 1.0
    assert p.sampling.top_p == 1.0
    assert p.sampling.seed is None


def test_greedy_ignores_sampling_parameters():
    p = validate_params(params(sampling=fmaas.SamplingParameters(temperature=0.01, top_p=7)), LIMITS)
    assert not p.sample


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"method": fmaas.SAMPLE, "sampling": fmaas.SamplingParameters(temperature=0.01)},
            "temperature must be >= 0.05",
        ),
        ({"method": fmaas.SAMPLE, "sampling": fmaas.SamplingParameters(top_p=1.5)}, "top_p must be > 0.0 and <= 1.0"),
        ({"method": fmaas.SAMPLE, "sampling": fmaas.SamplingParameters(typical_p=1.5)}, "typical_p must be <= 1.0"),
        ({"stopping": fmaas.StoppingCriteria(max_new_tokens=101)}, "max_new_tokens must be <= 100"),
        (
            {"stopping": fmaas.StoppingCriteria(max_new_tokens=5, min_new_tokens=6)},
            "min_new_tokens must be <= max_new_tokens",
        ),
        ({"decoding": fmaas.DecodingParameters(repetition_penalty=-1)}, "repetition_penalty must be > 0.0"),
        (
            {
                "decoding": fmaas.DecodingParameters(
                    length_penalty=fmaas.DecodingParameters.LengthPenalty(start_index=1, decay_factor=0.5)
                )
            },
            "length_penalty must be >= 1.0 and <= 10.0",
        ),
        (
            {"stopping": fmaas.StoppingCriteria(stop_sequences=["a"] * 7)},
            "can specify at most 6 non-empty stop sequences, each not more than 240 UTF8 bytes",
        ),
        (
            {"stopping": fmaas.StoppingCriteria(stop_sequences=["é" * 121])},
            "can specify at most 6 non-empty stop sequences, each not more than 240 UTF8 bytes",
        ),
        (
            {"response": fmaas.ResponseOptions(token_logprobs=True)},
            "must request input and/or generated tokens to request extra token detail",
        ),
        (
            {"stopping": fmaas.StoppingCriteria(stop_sequences=["stop", ""])},
            "can specify at most 6 non-empty stop sequences, each not more than 240 UTF8 bytes",
        ),
        (
            {"method": fmaas.SAMPLE, "sampling": fmaas.SamplingParameters(top_k=2**31)},
            "top_k must be strictly positive",
        ),
        # TGIS checks the stop-sequence count, then the token-detail rule, then each sequence.
        (
            {
                "stopping": fmaas.StoppingCriteria(stop_sequences=["a"] * 7),
                "response": fmaas.ResponseOptions(token_logprobs=True),
            },
            "can specify at most 6 non-empty stop sequences, each not more than 240 UTF8 bytes",
        ),
        (
            {
                "stopping": fmaas.StoppingCriteria(stop_sequences=[""]),
                "response": fmaas.ResponseOptions(token_ranks=True),
            },
            "must request input and/or generated tokens to request extra token detail",
        ),
    ],
)
def test_invalid_parameters_have_tgis_messages(kwargs, message):
    with pytest.raises(ValidationError) as e:
        validate_params(params(**kwargs), LIMITS)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": fmaas.SAMPLE, "sampling": fmaas.SamplingParameters(temperature=math.nan)}, "temperature"),
        ({"method": fmaas.SAMPLE, "sampling": fmaas.SamplingParameters(top_p=math.nan)}, "top_p"),
        ({"method": fmaas.SAMPLE, "sampling": fmaas.SamplingParameters(typical_p=math.nan)}, "typical_p"),
        ({"decoding": fmaas.DecodingParameters(repetition_penalty=math.nan)}, "repetition_penalty"),
    ],
)
def test_nan_parameters_are_refused(kwargs, message):
    with pytest.raises(ValidationError, match=f"^{message} must be"):
        validate_params(params(**kwargs), LIMITS)


def test_largest_signed_top_k_is_accepted_and_greedy_ignores_top_k():
    sampled = validate_params(params(method=fmaas.SAMPLE, sampling=fmaas.SamplingParameters(top_k=2**31 - 1)), LIMITS)
    assert sampled.sampling.top_k == 2**31 - 1
    assert not validate_params(params(sampling=fmaas.SamplingParameters(top_k=2**32 - 1)), LIMITS).sample


def test_an_input_without_tokens_is_refused_naming_its_index():
    p = validate_params(params(), LIMITS)
    with pytest.raises(ValidationError) as e:
        validate_input(2, "", [], p, LIMITS)
    assert str(e.value) == "input 2 is empty: it has no tokens and no prompt prefix"
    # A prompt prefix stands in for the missing tokens.
    assert validate_input(2, "", [], p, LIMITS, prefix_id="p", prefix_length=4).prefix_length == 4


def test_input_at_the_sequence_limit_is_refused():
    p = validate_params(params(), LIMITS)
    with pytest.raises(ValidationError) as e:
        validate_input(0, "x", list(range(64)), p, LIMITS)
    assert str(e.value) == "input tokens (64) plus prefix length (0) must be < 64"


def test_min_new_tokens_beyond_the_sequence_limit_is_refused():
    p = validate_params(params(stopping=fmaas.StoppingCriteria(max_new_tokens=20, min_new_tokens=10)), LIMITS)
    with pytest.raises(ValidationError) as e:
        validate_input(0, "x", list(range(60)), p, LIMITS)
    assert str(e.value) == "input tokens (60) plus prefix length (0) plus min_new_tokens (10) must be <= 64"


def test_max_new_tokens_is_reduced_to_fit_and_marked_token_limited():
    p = validate_params(params(stopping=fmaas.StoppingCriteria(max_new_tokens=20)), LIMITS)
    request = validate_input(0, "x", list(range(50)), p, LIMITS)
    assert request.max_new_tokens == 14
    assert request.token_limited
    assert not validate_input(0, "x", list(range(10)), p, LIMITS).token_limited


def test_unseeded_sampling_inputs_get_distinct_random_seeds_below_2_32():
    p = validate_params(params(method=fmaas.SAMPLE), LIMITS)
    seeds = {validate_input(0, "x", [1], p, LIMITS).seed for _ in range(20)}
    assert len(seeds) > 1
    assert all(0 <= s < 2**32 for s in seeds)


def test_a_given_seed_applies_to_every_input():
    p = validate_params(params(method=fmaas.SAMPLE, sampling=fmaas.SamplingParameters(seed=42)), LIMITS)
    assert {validate_input(0, "x", [1], p, LIMITS).seed for _ in range(3)} == {42}


def test_a_prompt_prefix_longer_than_max_prompt_prefix_length_is_refused():
    limits = Limits(
        max_new_tokens=100, max_sequence_length=64, default_include_stop_seqs=True, max_prompt_prefix_length=8
    )
    p = validate_params(params(), limits)
    assert validate_input(0, "a", [1, 2], p, limits, "short", prefix_length=8).prefix_length == 8
    with pytest.raises(
        ValidationError, match=r"prompt prefix 'long' is 9 tokens long, more than MAX_PROMPT_PREFIX_LENGTH \(8\)"
    ):
        validate_input(0, "a", [1, 2], p, limits, "long", prefix_length=9)
