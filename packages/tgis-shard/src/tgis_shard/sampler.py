"""Choosing each request's next token from the model's logits, for a persistent batch.

Every request of the batch has a slot: its decoding parameters and state (tokens generated,
tokens seen for the repetition penalty) live in per-slot device tensors, written once when it
joins. A step gathers the slots of the rows it samples. What the chain must run (any sampling,
the largest top_k, any penalty, any details) is decided from the parameters on the host, so a
step never waits for the device to find out, and it copies its results to the host once.

Sampling draws one uniform number per row from a counter-based generator: splitmix64 of the
request's seed at its generated-token count. The same seed and output position give the same
draw inside any batch, on any rank, after a rerun of a failed step and after a preemption
(which recomputes the prompt and resumes at the same count), with no generator state to keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tgis_proto import shard_pb2 as pb
from tgis_shard.logits import (
    TokenDetails,
    length_penalty,
    mask_eos,
    repetition_penalty,
    row_argmax,
    temperature,
    token_details,
    top_k,
    top_p,
    top_tokens,
    typical_p,
)
from tgis_shard.staging import ids_to_device, to_device

_U64 = 1 << 64
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# Logits a step processes in float32 at once (a chunk of rows): 256 rows of a 128k vocabulary,
# ~0.8 GB of work with every processor on; the whole batch at once held ~12 GB at 4,096 rows.
CHUNK_LOGITS = 1 << 25


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return value - _U64 if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """The ``counters``-th draw (0-based) of splitmix64 seeded with ``seeds``, as float64 in (0, 1].

    int64 arithmetic wraps on overflow, which is the unsigned arithmetic splitmix64 is written in.
    """
    z = seeds + (counters + 1) * _signed(_GOLDEN)
    z = (z ^ _shift_right(z, 30)) * _signed(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
    z = z ^ _shift_right(z, 31)
    return (_shift_right(z, 11).double() + 1.0) * 2.0**-53


@dataclass(frozen=True)
class GeneratedToken:
    """One new token of one request, with the details it asked for."""

    request_id: int
    token_id: int
    logprob: float = float("nan")
    rank: int = 0
    top_tokens: tuple[tuple[int, float], ...] = ()
    input_tokens: tuple[pb.Token, ...] = ()


@dataclass(frozen=True)
class _Params:
    """A request's decoding parameters after TGIS's defaults, as the host sees them."""

    sample: bool
    temperature: float
    top_k: int
    top_p: float
    typical_p: float
    repetition_penalty: float
    length_penalty: bool
    length_start: int
    length_decay: float
    min_new_tokens: int
    seed: int
    logprobs: bool
    ranks: bool
    top_n: int

    @classmethod
    def of(cls, request: pb.Request) -> _Params:
        c, d = request.chooser, request.details
        sample = c.sample  # greedy requests ignore the sampling warpers: they are set to "off"
        return cls(
            sample=sample,
            temperature=c.temperature if sample and c.temperature > 0 else 1.0,
            top_k=c.top_k if sample else 0,
            top_p=c.top_p if sample and 0 < c.top_p < 1 else 1.0,
            typical_p=c.typical_p if sample and 0 < c.typical_p < 1 else 1.0,
            repetition_penalty=c.repetition_penalty if c.repetition_penalty > 0 else 1.0,
            length_penalty=c.length_penalty,
            length_start=c.length_penalty_start,
            length_decay=c.length_penalty_decay or 1.0,
            min_new_tokens=c.min_new_tokens,
            seed=_signed(c.seed % _U64),
            logprobs=d.logprobs,
            ranks=d.ranks,
            top_n=d.top_n,
        )

    @property
    def wants_details(self) -> bool:
        return self.logprobs or self.ranks or self.top_n > 0


@dataclass(frozen=True)
class _Chain:
    """What a step's processor chain runs, decided for all its rows on the host."""

    masks_eos: bool
    masks_every_eos: bool  # every row is below its min_new_tokens: no per-row test on the device
    penalises_length: bool
    penalises_repetition: bool
    samples: bool
    temperature: bool
    top_k: int  # the largest top_k of the rows; 0: none
    top_p: bool
    typical_p: bool
    top_n: int | None  # the widest top_n asked for; None: no row wants details

    @classmethod
    def of(cls, host: dict[str, np.ndarray], penalises_repetition: bool) -> _Chain | None:
        """None when the step is plain greedy: nothing to adjust, no details."""
        samples = bool(host["sample"].any())
        below_minimum = host["generated"] < host["min_new_tokens"]
        chain = cls(
            masks_eos=bool(below_minimum.any()),
            masks_every_eos=bool(below_minimum.all()),
            penalises_length=bool(host["length_penalty"].any()),
            penalises_repetition=penalises_repetition,
            samples=samples,
            temperature=samples and bool(host["temperature"].any()),
            top_k=int(host["top_k"].max()) if samples else 0,
            top_p=samples and bool(host["top_p"].any()),
            typical_p=samples and bool(host["typical_p"].any()),
            top_n=int(host["top_n"].max()) if host["details"].any() else None,
        )
        plain = not (chain.masks_eos or chain.penalises_length or penalises_repetition or samples)
        return None if plain and chain.top_n is None else chain

    @property
    def keeps_precision(self) -> bool:
        """Greedy rows that only mask EOS, without details: masking and the argmax give the same
        tokens on the logits' own dtype (upcasting is exact), on a copy half the size of float32's."""
        adjusts = self.penalises_length or self.penalises_repetition or self.samples
        return self.masks_eos and not adjusts and self.top_n is None


class Choice:
    """The tokens a step chose: applied to the requests' state only by ``commit``, so a step that
    fails after choosing leaves the batch as it was."""

    def __init__(
        self,
        sampler: Sampler,
        request_ids: list[int],
        host_slots: np.ndarray,
        slots: torch.Tensor,
        token_ids: torch.Tensor,
    ):
        self._sampler = sampler
        self.request_ids = request_ids
        self._host_slots = host_slots
        self.slots = slots  # [rows]: each row's slot in the sampler, on the device
        self.token_ids = token_ids  # [rows] int64, on the device
        self.details: TokenDetails | None = None
        self.top_n: list[int] = []

    def commit(self) -> None:
        self._sampler._advance(self._host_slots, self.slots, self.token_ids)

    def generated_tokens(self) -> list[GeneratedToken]:
        """Per request, its token and the details it asked for; one copy from the device."""
        return self.to_host().result()

    def to_host(self) -> PendingTokens:
        """Starts the copy of the tokens and their details to the host, without waiting for it."""
        details = self.details
        if details is None:
            return PendingTokens(self.request_ids, self.token_ids)
        columns = [self.token_ids.double(), details.logprobs.double(), details.ranks.double()]
        if details.top_ids is not None and details.top_logprobs is not None:
            columns += [details.top_ids.double(), details.top_logprobs.double()]
        width = details.top_ids.shape[1] if details.top_ids is not None else 0
        return PendingTokens(self.request_ids, torch.column_stack(columns), width, self.top_n)


class PendingTokens:
    """A step's tokens on their way to the host. The copy is queued behind the step's kernels and
    ``result()`` waits for it alone, so the host can prepare the next step while the device
    computes this one.

    ``values``: the token ids ``[rows]``, or per row the id, logprob, rank, ``width`` top ids and
    their logprobs (``Choice.to_host``)."""

    def __init__(self, request_ids: list[int], values: torch.Tensor, width: int = 0, top_n: Sequence[int] = ()):
        self.request_ids = request_ids
        self._width = width
        self._top_n = top_n
        # A device-to-host copy that does not block lands in pinned memory, ready once the event is.
        self._host = values.to("cpu", non_blocking=True)
        self._ready: torch.cuda.Event | None = None
        if values.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(values.device))

    def result(self) -> list[GeneratedToken]:
        if self._ready is not None:
            self._ready.synchronize()
        values = self._host.tolist()
        if self._host.dim() == 1:
            return [GeneratedToken(rid, t) for rid, t in zip(self.request_ids, values, strict=True)]
        width, tokens = self._width, []
        for rid, n, row in zip(self.request_ids, self._top_n, values, strict=True):
            top = top_tokens([int(i) for i in row[3 : 3 + width]], row[3 + width :], n) if width else ()
            tokens.append(GeneratedToken(rid, int(row[0]), row[1], int(row[2]), top))
        return tokens


class Sampler:
    """Per-slot decoding parameters and state of up to ``capacity`` requests, keyed by request id."""

    def __init__(self, capacity: int, vocab_size: int, eos_token_ids: Sequence[int], device: torch.device):
        self.capacity = capacity
        self.vocab_size = vocab_size
        self.device = device
        self.eos_token_ids = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
        self._slots: dict[int, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        # What a step's flags are decided from, per slot, on the host: numpy reads a step's rows at once.
        self._host = {
            name: np.zeros(capacity, dtype=dtype)
            for name, dtype in (
                ("sample", bool),
                ("temperature", bool),
                ("top_k", np.int64),
                ("top_p", bool),
                ("typical_p", bool),
                ("repetition", bool),
                ("length_penalty", bool),
                ("min_new_tokens", np.int64),
                ("generated", np.int64),
                ("details", bool),
                ("top_n", np.int64),
            )
        }

        def zeros(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(capacity, dtype=dtype, device=device)

        self._sample = zeros(torch.bool)
        self._temperature = zeros(torch.float32)
        self._top_k = zeros(torch.long)
        self._top_p = zeros(torch.float32)
        self._typical_p = zeros(torch.float32)
        self._repetition = zeros(torch.float32)
        self._length_enabled = zeros(torch.bool)
        self._length_start = zeros(torch.long)
        self._length_decay = zeros(torch.float32)
        self._min_new_tokens = zeros(torch.long)
        self._seed = zeros(torch.long)
        self._generated = zeros(torch.long)
        self._seen: torch.Tensor | None = None  # [capacity, vocab] bool, once a request needs it

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._slots

    def slot_of(self, request_id: int) -> int:
        """The request's slot, for per-slot state the engine keeps beside the sampler's."""
        return self._slots[request_id]

    def add(self, request: pb.Request, history: Sequence[int]) -> None:
        """Takes a request in; ``history``: tokens its repetition penalty covers from the start.
        A resumed request has generated ``resumed_tokens`` already."""
        if request.id in self._slots:
            raise ValueError(f"request {request.id} is in the batch already")
        if not self._free:
            raise ValueError(f"the batch holds {self.capacity} requests already")
        params = _Params.of(request)
        slot = self._free[-1]
        values = {
            self._sample: params.sample,
            self._temperature: params.temperature,
            self._top_k: params.top_k,
            self._top_p: params.top_p,
            self._typical_p: params.typical_p,
            self._repetition: params.repetition_penalty,
            self._length_enabled: params.length_penalty,
            self._length_start: params.length_start,
            self._length_decay: params.length_decay,
            self._min_new_tokens: params.min_new_tokens,
            self._seed: params.seed,
            self._generated: request.resumed_tokens,
        }
        # fill_ takes the value as a kernel argument; ``tensor[slot] = value`` copies it from
        # pageable host memory, which waits for the step the device is still running.
        for tensor, value in values.items():
            tensor[slot].fill_(value)
        if params.repetition_penalty != 1.0:
            if self._seen is None:
                self._seen = torch.zeros((self.capacity, self.vocab_size), dtype=torch.bool, device=self.device)
            self._seen[slot].fill_(False)
            ids = [i for i in history if 0 <= i < self.vocab_size]
            if ids:
                self._seen[slot].index_fill_(0, ids_to_device(ids, self.device), True)
        host = {
            "sample": params.sample,
            "temperature": params.temperature != 1.0,
            "top_k": params.top_k,
            "top_p": params.top_p < 1.0,
            "typical_p": params.typical_p < 1.0,
            "repetition": params.repetition_penalty != 1.0,
            "length_penalty": params.length_penalty,
            "min_new_tokens": params.min_new_tokens,
            "generated": request.resumed_tokens,
            "details": params.wants_details,
            "top_n": params.top_n,
        }
        for name, value in host.items():
            self._host[name][slot] = value
        self._free.pop()
        self._slots[request.id] = slot

    def remove(self, request_id: int) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)

    def choose(
        self,
        logits: torch.Tensor,
        request_ids: Sequence[int],
        slots: torch.Tensor | None = None,
        host_slots: np.ndarray | None = None,
    ) -> Choice:
        """One token per row of ``logits`` [rows, vocab]: row i is request ``request_ids[i]``.
        ``slots`` / ``host_slots``: their slots on the device and the host, when the caller has them
        (on the device, prepared before the forward pass: a copy made after it waits for the pass)."""
        if host_slots is None:
            host_slots = np.fromiter((self._slots[r] for r in request_ids), dtype=np.int64, count=len(request_ids))
        if slots is None:
            slots = to_device(torch.from_numpy(host_slots), self.device)
        host = {name: values[host_slots] for name, values in self._host.items()}
        chain = _Chain.of(host, penalises_repetition=self._seen is not None and bool(host["repetition"].any()))
        if chain is None:
            # Greedy rows with nothing to adjust: the argmax of the model's own logits (upcasting
            # half precision is exact, so the choice is the float32 one) without a float32 copy.
            return Choice(self, list(request_ids), host_slots, slots, row_argmax(logits))
        # The chain's float32 work is ~25 bytes a logit; rows in chunks bound it at thousands of rows.
        rows = max(1, CHUNK_LOGITS // logits.shape[-1])
        parts = [
            self._choose_rows(logits[i : i + rows], slots[i : i + rows], chain) for i in range(0, len(slots), rows)
        ]
        token_ids, details = parts[0]
        if len(parts) > 1:
            token_ids = torch.cat([ids for ids, _ in parts])
            details = TokenDetails.joined([d for _, d in parts if d is not None]) if details else None
        choice = Choice(self, list(request_ids), host_slots, slots, token_ids)
        if details is not None:
            choice.details = details
            choice.top_n = host["top_n"].tolist()
        return choice

    def _choose_rows(
        self, logits: torch.Tensor, slots: torch.Tensor, chain: _Chain
    ) -> tuple[torch.Tensor, TokenDetails | None]:
        """The processors, the choice and its details for some rows of a step."""
        # A copy: the processors work in place, and the logits may be a graph's output buffer.
        scores = logits.clone() if chain.keeps_precision else logits.to(torch.float32, copy=True)
        if chain.masks_eos:
            rows = None if chain.masks_every_eos else self._generated[slots] < self._min_new_tokens[slots]
            scores = mask_eos(scores, self.eos_token_ids, rows)
        if chain.penalises_length:
            scores = length_penalty(
                scores,
                self.eos_token_ids,
                self._generated[slots],
                self._length_start[slots],
                self._length_decay[slots],
                self._length_enabled[slots],
            )
        if chain.penalises_repetition:
            assert self._seen is not None
            scores = repetition_penalty(scores, self._seen[slots], self._repetition[slots])
        if chain.samples:
            scores = self._warp(scores, slots, chain)
        token_ids = row_argmax(scores)
        if chain.samples:
            token_ids = torch.where(self._sample[slots], self._draw(scores, slots), token_ids)
        details = None
        if chain.top_n is not None:
            details = token_details(scores.log_softmax(dim=-1), token_ids, chain.top_n)
        return token_ids, details

    def _warp(self, scores: torch.Tensor, slots: torch.Tensor, chain: _Chain) -> torch.Tensor:
        if chain.temperature:
            scores = temperature(scores, self._temperature[slots])
        if chain.top_k:
            scores = top_k(scores, self._top_k[slots], chain.top_k)
        if chain.top_p:
            scores = top_p(scores, self._top_p[slots])
        if chain.typical_p:
            scores = typical_p(scores, self._typical_p[slots])
        return scores

    def _draw(self, scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF sampling: one uniform draw per row, one batched lookup."""
        cdf = scores.softmax(dim=-1).cumsum(dim=-1)
        draws = uniform(self._seed[slots], self._generated[slots]).to(cdf.dtype)
        sampled = torch.searchsorted(cdf, (draws * cdf[:, -1]).unsqueeze(1)).squeeze(1)
        return sampled.clamp(max=scores.shape[-1] - 1)

    def _advance(self, host_slots: np.ndarray, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        self._generated[slots] += 1
        if self._seen is not None:
            self._seen[slots, token_ids] = True
        self._host["generated"][host_slots] += 1


def every_path(count: int) -> list[pb.Request]:
    """``count`` requests that take every path of ``Sampler.choose`` at once: each warper of
    sampling, both penalties, min_new_tokens and token details."""
    chooser = pb.NextTokenChooser(
        sample=True,
        temperature=0.7,
        top_k=50,
        top_p=0.9,
        typical_p=0.9,
        repetition_penalty=1.2,
        length_penalty=True,
        length_penalty_decay=1.1,
        min_new_tokens=2,
    )
    details = pb.TokenDetailOptions(logprobs=True, ranks=True, top_n=10)
    return [
        pb.Request(id=i, input_ids=[1 + i % 2], max_new_tokens=4, chooser=chooser, details=details)
        for i in range(count)
    ]


def sampling_peak_bytes(rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """What a step of ``rows`` rows needs on a GPU beside the model's forward pass to sample: its
    logits, the repetition penalty's per-slot table, and the float32 work of ``choose`` with every
    path taken (measured on random logits; a top-p sort alone is 12 bytes a logit). The KV cache
    leaves it free; 0 off CUDA, where the cache is not sized from free memory."""
    if device.type != "cuda":
        return 0
    sampler = Sampler(rows, vocab_size, [0], device)
    requests = every_path(rows)
    for request in requests:
        sampler.add(request, request.input_ids)
    logits = torch.randn(rows, vocab_size, device=device).to(dtype)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    sampler.choose(logits, [r.id for r in requests]).to_host().result()
    work = torch.cuda.max_memory_allocated(device) - before
    del sampler, logits
    torch.cuda.empty_cache()
    seen = rows * vocab_size  # bool, allocated by the first request with a repetition penalty
    return work + rows * vocab_size * dtype.itemsize + seen
