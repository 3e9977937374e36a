"""The stages of a generation request inside the router, as immutable values."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class StopReason(IntEnum):
    """Mirrors fmaas.StopReason."""

    NOT_FINISHED = 0
    MAX_TOKENS = 1
    EOS_TOKEN = 2
    CANCELLED = 3
    TIME_LIMIT = 4
    STOP_SEQUENCE = 5
    TOKEN_LIMIT = 6
    ERROR = 7


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class LengthPenalty:
    start_index: int
    decay_factor: float


@dataclass(frozen=True)
class ResponseOptions:
    input_text: bool = False
    generated_tokens: bool = False
    input_tokens: bool = False
    token_logprobs: bool = False
    token_ranks: bool = False
    top_n_tokens: int = 0


@dataclass(frozen=True)
class GenerationParams:
    """Client parameters after defaults and validation; shared by every input of a call."""

    sample: bool = False
    sampling: SamplingParams = SamplingParams()
    repetition_penalty: float = 0.0
    length_penalty: LengthPenalty | None = None
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    time_limit_millis: int = 0
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = True
    response: ResponseOptions = ResponseOptions()
    truncate_input_tokens: int = 0


@dataclass(frozen=True)
class ValidatedRequest:
    """One input, tokenized and checked against the model's limits."""

    text: str
    input_ids: tuple[int, ...]
    params: GenerationParams
    # max_new_tokens after the sequence-length limit; smaller than asked means TOKEN_LIMIT.
    max_new_tokens: int
    token_limited: bool
    seed: int
    prefix_id: str = ""  # a prompt prefix the shard puts in front of input_ids
    prefix_length: int = 0
