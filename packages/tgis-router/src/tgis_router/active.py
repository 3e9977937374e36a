"""A request between its arrival and its last token: detokenizes, checks stopping, emits events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tgis_proto import shard_pb2 as pb
from tgis_router import metrics
from tgis_router.detokenize import IncrementalDetokenizer
from tgis_router.errors import RouterError
from tgis_router.events import Event, Finish, InputTokens, NewToken, TokenDetail
from tgis_router.requests import StopReason, ValidatedRequest
from tgis_router.stopping import StopSequenceFilter, token_stop_reason
from tgis_router.tokenization import TokenizerPool

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)
# Characters of the output a request's log line quotes, and its level by how it ended, as TGIS's.
LOGGED_OUTPUT_CHARS = 32
_LOG_LEVELS = {
    StopReason.ERROR: logging.ERROR,
    StopReason.CANCELLED: logging.WARNING,
    StopReason.TOKEN_LIMIT: logging.WARNING,
}


@dataclass(frozen=True)
class CallContext:
    """Where a request came from, for its log line: TGIS's wording of the call ("Request",
    "Sub-request 2 from batch of 3", "Streaming response") and the client's x-correlation-id."""

    label: str = "Request"
    correlation_id: str = "<none>"


class ActiveRequest:
    def __init__(
        self,
        request_id: int,
        request: ValidatedRequest,
        tokenizer: TokenizerPool,
        eos_token_ids: Collection[int],
        skip_special_tokens: bool,
        kind: str,
        arrival: float,
        continues_prompt: bool,
        call: CallContext = CallContext(),
    ):
        """``arrival``: time.monotonic() when the call arrived; time limits count from it.
        ``continues_prompt``: the output continues the input text (decoder-only models), so it is
        decoded in the input's context; a seq2seq output is a text of its own."""
        self.id = request_id
        self.request = request
        self.kind = kind
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.arrival = arrival
        self.queued_at = time.monotonic()  # validation ends as the request is made
        self.call = call
        self.generated = 0
        self._output_head = ""  # the output's first characters and its length, for the log line
        self._output_bytes = 0
        self.finished = False
        self._tokenizer = tokenizer
        self._eos_token_ids = eos_token_ids
        context = request.input_ids if continues_prompt else ()
        self._detokenizer = IncrementalDetokenizer(tokenizer.tokenizer, context, skip_special_tokens)
        self._stop_sequences = StopSequenceFilter(request.params.stop_sequences, request.params.include_stop_sequence)
        self._prefill_at: float | None = None
        self.finished_at: float | None = None
        self.stop_reason: StopReason | None = None
        self.span: Span | None = None  # its trace, where tracing is on (tgis_router.tracing)
        self._last_token_at: float | None = None
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        if request.params.time_limit_millis:
            self._deadline = arrival + request.params.time_limit_millis / 1000
            # Fires while queued or between steps; a token arriving late is checked in add_token.
            delay = max(0.0, self._deadline - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self.finish, StopReason.TIME_LIMIT)

    @property
    def length(self) -> int:
        """Tokens the request holds in the shard's cache (prefix, input and generated)."""
        return self.request.prefix_length + len(self.request.input_ids) + self.generated

    @property
    def remaining(self) -> int:
        """Tokens it may still generate."""
        return self.request.max_new_tokens - self.generated

    def to_shard_request(self) -> pb.Request:
        params = self.request.params
        sampling = params.sampling
        response = params.response
        lp = params.length_penalty
        return pb.Request(
            id=self.id,
            input_ids=self.request.input_ids,
            prefix_id=self.request.prefix_id,
            max_new_tokens=self.request.max_new_tokens,
            chooser=pb.NextTokenChooser(
                sample=params.sample,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                typical_p=sampling.typical_p,
                seed=self.request.seed,
                repetition_penalty=params.repetition_penalty,
                length_penalty=lp is not None,
                length_penalty_start=lp.start_index if lp else 0,
                length_penalty_decay=lp.decay_factor if lp else 0.0,
                min_new_tokens=params.min_new_tokens,
            ),
            details=pb.TokenDetailOptions(
                logprobs=response.token_logprobs,
                ranks=response.token_ranks,
                top_n=response.top_n_tokens,
                input_tokens=response.input_tokens,
            ),
        )

    @property
    def prefill_at(self) -> float | None:
        """When it first joined a step; None while queued."""
        return self._prefill_at

    def started(self) -> None:
        """Called when the request first joins a step (not again when it resumes after a preemption)."""
        if self._prefill_at is None:
            self._prefill_at = time.monotonic()
            metrics.request_queue_duration.observe(self._prefill_at - self.arrival)

    def _detail(self, token_id: int, details: pb.Token | None) -> TokenDetail:
        text = self._tokenizer.id_to_token(token_id)
        if details is None:
            return TokenDetail(text)
        return TokenDetail(
            text=text,
            logprob=details.logprob,
            rank=details.rank,
            top_tokens=tuple((self._tokenizer.id_to_token(t.id), t.logprob) for t in details.top_tokens),
        )

    def add_input_tokens(self, details: Sequence[pb.Token]) -> None:
        """Emits the input tokens; details (logprobs) are present when the shard computed them."""
        tokens = tuple(
            self._detail(token_id, details[i] if i < len(details) else None)
            for i, token_id in enumerate(self.request.input_ids)
        )
        self.events.put_nowait(InputTokens(tokens))

    def ends_with(self, token_id: int, generated: int) -> bool:
        """Whether the ``generated``-th token ends the request by EOS or length: known from the id alone."""
        return token_stop_reason(self.request, token_id, generated, self._eos_token_ids) is not None

    def add_token(self, token_id: int, details: pb.Token | None = None) -> bool:
        """Records one generated token (with its details, when the shard computed them); True
        when the request is now finished."""
        if self.finished:
            return True
        now = time.monotonic()
        if self._last_token_at is None:
            metrics.request_time_to_first_token.observe(now - self.arrival)
        else:
            metrics.request_inter_token_latency.observe(now - self._last_token_at)
        self._last_token_at = now
        self.generated += 1
        delta = self._detokenizer.add(token_id)
        if self._deadline is not None and now >= self._deadline:
            reason: StopReason | None = StopReason.TIME_LIMIT
        else:
            reason = token_stop_reason(self.request, token_id, self.generated, self._eos_token_ids)
        stop_sequence = ""
        if reason is None:
            step = self._stop_sequences.add(delta, active=self.generated >= self.request.params.min_new_tokens)
            text = step.emit
            if step.stop_sequence is not None:
                reason, stop_sequence = StopReason.STOP_SEQUENCE, step.stop_sequence
        else:
            text = self._stop_sequences.flush() + delta
        finish = Finish(reason, stop_sequence) if reason is not None else None
        self._note_output(text)
        self.events.put_nowait(NewToken(text, self.generated, self._detail(token_id, details), finish))
        if finish is not None:
            self._finished(finish)
        return self.finished

    def finish(self, reason: StopReason, error: RouterError | None = None) -> None:
        """Ends the request without a token (error, time limit, shutdown)."""
        if not self.finished:
            finish = Finish(reason, error=error, text=self._stop_sequences.flush())
            self._note_output(finish.text)
            self.events.put_nowait(finish)
            self._finished(finish)

    def cancel(self) -> None:
        """The client left: stop generating; nobody reads events any more."""
        if not self.finished:
            self._finished(Finish(StopReason.CANCELLED))

    def _finished(self, finish: Finish) -> None:
        self.finished = True
        if self._timer is not None:
            self._timer.cancel()
        now = time.monotonic()
        self.finished_at, self.stop_reason = now, finish.reason
        if finish.reason == StopReason.ERROR:
            metrics.request_failure.labels(err=finish.error.metric_label if finish.error else "generate").inc()
        else:
            metrics.request_success.labels(stop_reason=finish.reason.name, kind=self.kind).inc()
        metrics.request_generated_tokens.observe(self.generated)
        metrics.request_total_tokens.observe(len(self.request.input_ids) + self.generated)
        metrics.request_duration.observe(now - self.arrival)
        if self._prefill_at is not None:
            metrics.request_inference_duration.observe(now - self._prefill_at)
            if self.generated:
                metrics.request_mean_time_per_token_duration.observe((now - self._prefill_at) / self.generated)
        self._log_finish(finish, now)

    def _note_output(self, text: str) -> None:
        if len(self._output_head) <= LOGGED_OUTPUT_CHARS:
            self._output_head += text[: LOGGED_OUTPUT_CHARS + 1 - len(self._output_head)]
        self._output_bytes += len(text.encode())

    def _log_finish(self, finish: Finish, now: float) -> None:
        """One line per request, with TGIS's wording, timings and fields (structured in JSON logs)."""
        started = self._prefill_at if self._prefill_at is not None else now
        fields = {
            "validation_time": self.queued_at - self.arrival,
            "queue_time": started - self.queued_at,
            "inference_time": now - started,
            "time_per_token": (now - started) / self.generated if self.generated else 0.0,
            "total_time": now - self.arrival,
            "input_toks": len(self.request.input_ids),
            "request_id": self.id,
            "correlation_id": self.call.correlation_id,
        }
        output = self._output_head
        if len(output) > LOGGED_OUTPUT_CHARS:
            output = output[:LOGGED_OUTPUT_CHARS] + "..."
        level = _LOG_LEVELS.get(finish.reason, logging.INFO)
        timings = " ".join(f"{k}={v:.6f}s" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        log.log(
            level,
            "%s generated %d tokens before %s, output %d bytes: %r (%s)",
            self.call.label,
            self.generated,
            finish.reason.name,
            self._output_bytes,
            output,
            timings,
            extra={"fields": fields},
        )
