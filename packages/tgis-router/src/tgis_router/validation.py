"""Client parameters → GenerationParams, with TGIS's defaults and error messages word for word."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from tgis_proto import generation_pb2 as fmaas
from tgis_router.errors import ValidationError
from tgis_router.requests import GenerationParams, LengthPenalty, ResponseOptions, SamplingParams, ValidatedRequest

DEFAULT_MAX_NEW_TOKENS = 20
MAX_STOP_SEQUENCES = 6
MAX_STOP_SEQUENCE_BYTES = 240
MIN_TEMPERATURE = 0.05
MAX_TOP_K = 2**31 - 1
STOP_SEQUENCES_MESSAGE = (
    f"can specify at most {MAX_STOP_SEQUENCES} non-empty stop sequences, "
    f"each not more than {MAX_STOP_SEQUENCE_BYTES} UTF8 bytes"
)


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int
    max_sequence_length: int
    default_include_stop_seqs: bool
    max_prompt_prefix_length: int | None = None  # MAX_PROMPT_PREFIX_LENGTH; None: the sequence bounds it


def validate_params(params: fmaas.Parameters, limits: Limits) -> GenerationParams:
    """Checks the parameters shared by every input of a call. Comparisons are written so that
    NaN fails them: TGIS's messages, and no NaN reaches the sampler."""
    sample = params.method == fmaas.SAMPLE
    sampling = SamplingParams()
    if sample:
        s = params.sampling
        if s.temperature != 0 and not s.temperature >= MIN_TEMPERATURE:
            raise ValidationError(f"temperature must be >= {MIN_TEMPERATURE}")
        if not 0.0 <= s.top_p <= 1.0:
            raise ValidationError("top_p must be > 0.0 and <= 1.0")
        if not s.typical_p <= 1.0:
            raise ValidationError("typical_p must be <= 1.0")
        if s.top_k > MAX_TOP_K:
            # TGIS reads top_k as a signed 32-bit number: larger values are negative there.
            raise ValidationError("top_k must be strictly positive")
        sampling = SamplingParams(
            temperature=s.temperature or 1.0,
            top_k=s.top_k,
            top_p=s.top_p or 1.0,
            typical_p=s.typical_p or 1.0,
            seed=s.seed if s.HasField("seed") else None,
        )
    stopping = params.stopping
    max_new_tokens = stopping.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens > limits.max_new_tokens:
        raise ValidationError(f"max_new_tokens must be <= {limits.max_new_tokens}")
    if stopping.min_new_tokens > max_new_tokens:
        raise ValidationError("min_new_tokens must be <= max_new_tokens")
    decoding = params.decoding
    if not decoding.repetition_penalty >= 0.0:
        raise ValidationError("repetition_penalty must be > 0.0")
    length_penalty = None
    if decoding.HasField("length_penalty"):
        lp = decoding.length_penalty
        if not 1.0 <= lp.decay_factor <= 10.0:
            raise ValidationError("length_penalty must be >= 1.0 and <= 10.0")
        length_penalty = LengthPenalty(lp.start_index, lp.decay_factor)
    # TGIS's order: the count, then the token-detail rule, then each sequence's content.
    stop_sequences = tuple(stopping.stop_sequences)
    if len(stop_sequences) > MAX_STOP_SEQUENCES:
        raise ValidationError(STOP_SEQUENCES_MESSAGE)
    r = params.response
    if (r.token_logprobs or r.token_ranks or r.top_n_tokens) and not (r.input_tokens or r.generated_tokens):
        raise ValidationError("must request input and/or generated tokens to request extra token detail")
    if any(not s or len(s.encode()) > MAX_STOP_SEQUENCE_BYTES for s in stop_sequences):
        raise ValidationError(STOP_SEQUENCES_MESSAGE)
    return GenerationParams(
        sample=sample,
        sampling=sampling,
        repetition_penalty=decoding.repetition_penalty,
        length_penalty=length_penalty,
        max_new_tokens=max_new_tokens,
        min_new_tokens=stopping.min_new_tokens,
        time_limit_millis=stopping.time_limit_millis,
        stop_sequences=stop_sequences,
        include_stop_sequence=(
            stopping.include_stop_sequence
            if stopping.HasField("include_stop_sequence")
            else limits.default_include_stop_seqs
        ),
        response=ResponseOptions(
            input_text=r.input_text,
            generated_tokens=r.generated_tokens,
            input_tokens=r.input_tokens,
            token_logprobs=r.token_logprobs,
            token_ranks=r.token_ranks,
            top_n_tokens=r.top_n_tokens,
        ),
        truncate_input_tokens=params.truncate_input_tokens,
    )


def validate_input(
    index: int,
    text: str,
    input_ids: list[int],
    params: GenerationParams,
    limits: Limits,
    prefix_id: str = "",
    prefix_length: int = 0,
) -> ValidatedRequest:
    """Checks input ``index`` of a call, tokenized, against the sequence-length limit and fixes
    its seed."""
    n = len(input_ids)
    if limits.max_prompt_prefix_length is not None and prefix_length > limits.max_prompt_prefix_length:
        raise ValidationError(
            f"prompt prefix '{prefix_id}' is {prefix_length} tokens long, more than MAX_PROMPT_PREFIX_LENGTH "
            f"({limits.max_prompt_prefix_length})"
        )
    if n + prefix_length == 0:
        # Nothing to condition the first token on (a tokenizer that adds no BOS, an empty text).
        raise ValidationError(f"input {index} is empty: it has no tokens and no prompt prefix")
    if n + prefix_length >= limits.max_sequence_length:
        raise ValidationError(
            f"input tokens ({n}) plus prefix length ({prefix_length}) must be < {limits.max_sequence_length}"
        )
    if n + prefix_length + params.min_new_tokens > limits.max_sequence_length:
        raise ValidationError(
            f"input tokens ({n}) plus prefix length ({prefix_length}) plus min_new_tokens "
            f"({params.min_new_tokens}) must be <= {limits.max_sequence_length}"
        )
    room = limits.max_sequence_length - n - prefix_length
    max_new_tokens = min(params.max_new_tokens, room)
    seed = 0
    if params.sample:
        # Each input without a seed gets its own, returned to the client for reproduction.
        seed = params.sampling.seed if params.sampling.seed is not None else secrets.randbelow(2**32)
    return ValidatedRequest(
        text=text,
        input_ids=tuple(input_ids),
        params=params,
        max_new_tokens=max_new_tokens,
        token_limited=max_new_tokens < params.max_new_tokens,
        seed=seed,
        prefix_id=prefix_id,
        prefix_length=prefix_length,
    )
