"""Events of one input → fmaas GenerationResponse messages, streamed or as one unary answer.

Both shapes are built from the same event sequence, which is what makes streaming and unary
outputs identical.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

from tgis_proto import generation_pb2 as fmaas
from tgis_router.active import ActiveRequest
from tgis_router.errors import GenerationFailedError
from tgis_router.events import Finish, InputTokens, TokenDetail
from tgis_router.requests import ResponseOptions, StopReason


def token_info(detail: TokenDetail, options: ResponseOptions) -> fmaas.TokenInfo:
    info = fmaas.TokenInfo(text=detail.text)
    if options.token_logprobs:
        info.logprob = detail.logprob
    if options.token_ranks and not math.isnan(detail.logprob):
        info.rank = detail.rank
    if options.top_n_tokens:
        info.top_tokens.extend(fmaas.TokenInfo.TopToken(text=t, logprob=lp) for t, lp in detail.top_tokens)
    return info


def _raise_if_error(finish: Finish) -> None:
    if finish.reason == StopReason.ERROR:
        raise finish.error or GenerationFailedError("generation failed")


def _seed(entry: ActiveRequest) -> int:
    return entry.request.seed if entry.request.params.sample else 0


async def stream_responses(entry: ActiveRequest) -> AsyncIterator[fmaas.GenerationResponse]:
    """The stream of one input: header, input tokens, one message per token, a closing message.

    The header waits for the first event, so an input that ends before its first token (its
    time limit expired in the queue) gets a single message.
    """
    request = entry.request
    options = request.params.response
    header = fmaas.GenerationResponse(
        input_token_count=len(request.input_ids),
        seed=_seed(entry),
        text=request.text if options.input_text else "",
    )
    event = await entry.events.get()
    if isinstance(event, Finish):
        _raise_if_error(event)
        header.stop_reason = int(event.reason)
        yield header
        return
    yield header
    pending = ""  # text of tokens whose message was not sent yet
    while True:
        if isinstance(event, InputTokens):
            yield fmaas.GenerationResponse(input_tokens=[token_info(t, options) for t in event.tokens])
        elif isinstance(event, Finish):
            _raise_if_error(event)
            yield fmaas.GenerationResponse(
                text=pending + event.text,
                generated_token_count=entry.generated,
                stop_reason=int(event.reason),
                stop_sequence=event.stop_sequence,
                seed=_seed(entry),
            )
            return
        else:
            text = pending + event.text
            tokens = [token_info(event.token, options)] if options.generated_tokens else []
            if event.finish is not None:
                yield fmaas.GenerationResponse(
                    text=text,
                    generated_token_count=event.generated_token_count,
                    tokens=tokens,
                    stop_reason=int(event.finish.reason),
                    stop_sequence=event.finish.stop_sequence,
                    seed=_seed(entry),
                )
                return
            pending = text
            if text or tokens:
                pending = ""
                yield fmaas.GenerationResponse(
                    text=text, generated_token_count=event.generated_token_count, tokens=tokens
                )
        event = await entry.events.get()


async def unary_response(entry: ActiveRequest, separator: str = "") -> fmaas.GenerationResponse:
    """The whole answer of one input, assembled from the same events as a stream."""
    request = entry.request
    options = request.params.response
    response = fmaas.GenerationResponse(input_token_count=len(request.input_ids), seed=_seed(entry))
    parts = [request.text + separator] if options.input_text else []
    while True:
        event = await entry.events.get()
        if isinstance(event, InputTokens):
            response.input_tokens.extend(token_info(t, options) for t in event.tokens)
            continue
        finish = event if isinstance(event, Finish) else event.finish
        if isinstance(event, Finish):
            parts.append(event.text)
        else:
            parts.append(event.text)
            response.generated_token_count = event.generated_token_count
            if options.generated_tokens:
                response.tokens.append(token_info(event.token, options))
        if finish is not None:
            _raise_if_error(finish)
            response.text = "".join(parts)
            response.stop_reason = int(finish.reason)
            response.stop_sequence = finish.stop_sequence
            return response
