"""Dynamic batch sizing: which waiting requests may join the running batch now.

Memory is modelled as a weight per token (the shard's measured or synthesised memory model).
A request may join only if the batch's projected peak weight over the remaining life of all its
requests stays under the limit, so a batch never grows into an out-of-memory later, however its
requests' outputs unfold; the prefill pass itself must fit beside the running batch too.

Every request runs to at most its max_new_tokens, so the weight of a set of requests peaks just
before one of them finishes: checking those instants is exact for the worst case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tgis_proto import shard_pb2 as shard_pb


@dataclass(frozen=True)
class MemoryModel:
    """How much memory batches take, in bytes, as the shard reported it."""

    limit: float  # bytes available to batches (KV cache and transient prefill memory)
    bytes_per_token: float  # cache memory per token a running request holds
    prefill_bytes_per_token: float  # transient memory per (padded) prompt token during prefill
    padded: bool  # the batch pads every request to the longest one (hf_transformers)
    block_size: int = 1  # paged caches hold whole blocks: each request may waste up to one
    max_prefill_tokens: int = 0  # cap on (padded) prompt tokens per prefill; 0: none
    prefill_quadratic_bytes: float = 0.0  # per squared (padded) prompt length, per request
    cache_room: int = 0  # padded: positions each row's cache may hold beyond the batch's length

    def tokens_fit(self) -> int:
        return int(self.limit // self.bytes_per_token) if self.bytes_per_token else 0


@dataclass(frozen=True)
class Running:
    """A request in the running batch: tokens it holds and tokens it may still generate."""

    length: int
    remaining: int


@dataclass(frozen=True)
class Candidate:
    """A waiting request."""

    input_length: int
    max_new_tokens: int
    arrival: float  # seconds, on the router's monotonic clock


@dataclass(frozen=True)
class AdmissionConfig:
    max_batch_size: int
    max_prefill_padding: float = 0.2
    max_waiting_tokens: int = 24
    # A request that does not fit may be passed only by requests that arrived this soon after it.
    queue_jump_window_s: float = 1.0


@dataclass(frozen=True)
class Decision:
    """Queue positions to prefill now, and why others were not taken."""

    admit: list[int] = field(default_factory=list)
    weight_limited: bool = False  # the projected peak or prefill weight blocked a candidate
    prefill_limited: bool = False  # the prefill pass alone would be too large
    padding_limited: bool = False  # the candidate would pad the prefill batch too much
    queue_jumps: int = 0  # admitted candidates that passed a blocked earlier one
    waiting: bool = False  # a small add-on waits for more steps (MAX_WAITING_TOKENS)


def projected_peak(model: MemoryModel, requests: Sequence[Running]) -> float:
    """The largest weight the requests will reach together before all of them finish."""
    if not requests:
        return 0.0
    # Sorted by remaining life, longest first: when request j is about to finish (step r_j),
    # exactly the requests before it in this order (and it) are still running.
    ordered = sorted(requests, key=lambda r: r.remaining, reverse=True)
    peak = 0.0
    if model.padded:
        longest = max(r.length for r in requests) + model.cache_room
        for count, request in enumerate(ordered, start=1):
            peak = max(peak, count * (longest + request.remaining))
    else:
        held = 0  # sum of (length + one block of slack) over the requests still running
        for count, request in enumerate(ordered, start=1):
            held += request.length + model.block_size
            peak = max(peak, held + count * request.remaining)
    return peak * model.bytes_per_token


def current_weight(model: MemoryModel, requests: Sequence[Running]) -> float:
    if not requests:
        return 0.0
    if model.padded:
        return len(requests) * (max(r.length for r in requests) + model.cache_room) * model.bytes_per_token
    blocks = sum(math.ceil(r.length / model.block_size) for r in requests)
    return blocks * model.block_size * model.bytes_per_token


def prefill_tokens(model: MemoryModel, lengths: Sequence[int]) -> int:
    """Prompt tokens the prefill pass processes (padded engines pad to the longest)."""
    if not lengths:
        return 0
    return len(lengths) * max(lengths) if model.padded else sum(lengths)


def prefill_quadratic(model: MemoryModel, lengths: Sequence[int]) -> float:
    """Attention-score memory of a prefill: each request's (padded) length squared."""
    if not lengths or not model.prefill_quadratic_bytes:
        return 0.0
    squares = len(lengths) * max(lengths) ** 2 if model.padded else sum(n * n for n in lengths)
    return squares * model.prefill_quadratic_bytes


def padding_fraction(lengths: Sequence[int]) -> float:
    return 1.0 - sum(lengths) / (len(lengths) * max(lengths)) if lengths else 0.0


class Admission:
    """Chooses add-ons for the running batch; pure, so it can be simulated and tested."""

    def __init__(self, model: MemoryModel, config: AdmissionConfig):
        self.model = model
        self.config = config

    def fits_alone(self, input_length: int, max_new_tokens: int) -> bool:
        """Whether one request of this size fits in an empty batch."""
        alone = [Running(input_length, max_new_tokens)]
        return projected_peak(self.model, alone) <= self.model.limit and self._prefill_fits([], [input_length])

    def _prefill_fits(self, running: Sequence[Running], lengths: Sequence[int]) -> bool:
        tokens = prefill_tokens(self.model, lengths)
        if self.model.max_prefill_tokens and tokens > self.model.max_prefill_tokens:
            return False
        transient = tokens * self.model.prefill_bytes_per_token + prefill_quadratic(self.model, lengths)
        return current_weight(self.model, running) + transient <= self.model.limit

    def select(self, running: Sequence[Running], queue: Sequence[Candidate], waited_steps: int) -> Decision:
        """Queue positions (in order) to prefill into the batch now."""
        free_slots = self.config.max_batch_size - len(running)
        if free_slots <= 0 or not queue:
            return Decision()
        admitted: list[int] = []
        batch = list(running)
        lengths: list[int] = []
        blocked_arrival: float | None = None
        weight_limited = prefill_limited = padding_limited = False
        jumps = 0
        for position, candidate in enumerate(queue):
            if len(admitted) == free_slots:
                break
            if blocked_arrival is not None and candidate.arrival - blocked_arrival > self.config.queue_jump_window_s:
                break  # no starvation: later arrivals wait behind the blocked request
            trial_lengths = [*lengths, candidate.input_length]
            trial_batch = [*batch, Running(candidate.input_length, candidate.max_new_tokens)]
            refused = False
            if self.model.padded and padding_fraction(trial_lengths) > self.config.max_prefill_padding and lengths:
                padding_limited = refused = True
            elif projected_peak(self.model, trial_batch) > self.model.limit:
                weight_limited = refused = True
            elif not self._prefill_fits(running, trial_lengths):
                prefill_limited = refused = True
            if refused:
                if blocked_arrival is None:
                    blocked_arrival = candidate.arrival
                continue
            admitted.append(position)
            lengths, batch = trial_lengths, trial_batch
            if blocked_arrival is not None:
                jumps += 1
        # A small add-on interrupts the running batch's decoding for little gain: it waits up to
        # MAX_WAITING_TOKENS steps for company, unless nothing is running.
        small = len(admitted) < max(1, len(running) // 2)
        if running and admitted and small and waited_steps < self.config.max_waiting_tokens:
            return Decision(waiting=True, weight_limited=weight_limited, padding_limited=padding_limited)
        return Decision(admitted, weight_limited, prefill_limited, padding_limited, jumps)


def memory_model(info: shard_pb.InfoResponse) -> MemoryModel:
    """The shard's memory model; without one (ESTIMATE_MEMORY=off) only MAX_BATCH_SIZE limits."""
    padded = info.batch_padding
    if not info.HasField("memory"):
        return MemoryModel(limit=math.inf, bytes_per_token=0.0, prefill_bytes_per_token=0.0, padded=padded)
    m = info.memory
    return MemoryModel(
        limit=m.limit_bytes,
        bytes_per_token=m.bytes_per_token,
        prefill_bytes_per_token=m.prefill_bytes_per_token,
        padded=padded,
        block_size=max(1, m.block_size),
        max_prefill_tokens=m.max_prefill_tokens,
        prefill_quadratic_bytes=m.prefill_quadratic_bytes,
        cache_room=m.cache_room_tokens if padded else 0,
    )
