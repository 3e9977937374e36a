"""Which requests run in the next step and how many tokens each: the router's half of the step
pipeline (the shard's half is ``tgis_shard.steps``).

A step lists, per request, the tokens to process: the next chunk of its prompt, or its last
generated token. Requests join and leave the shard's persistent batch as diffs the step carries.
Two policies, by what the engine reports (``InfoResponse``):

- **Paged** engines (tgis_native): the router owns the KV-cache blocks. Each step decodes every
  running request first, then continues the running prompts, then admits waiting requests in
  arrival order while blocks, ``MAX_BATCH_SIZE`` and the step's token budget last; a prompt longer
  than the budget is prefilled over several steps (chunked prefill). When a running request needs
  a block and none is free, the most recently admitted request is preempted: its blocks come
  back, it waits at the head of the queue, and it resumes by recomputing its prompt and the
  tokens it had generated. The client never sees the difference.
- **Padded** engines (hf_transformers, seq2seq): a request joins when dynamic batch sizing says
  it fits (``tgis_router.admission``), its whole prompt in the step it joins; every running
  request decodes each step; nothing is ever preempted.

A step is planned before the outputs of the steps still on the shards are known, so that the
shards always have the next step at hand (``tgis_router.batcher``): what a request will have
computed and how many tokens it will have generated count from the steps sent, not the steps
answered. A request whose tokens are all scheduled leaves with the next step; one that ends by
EOS does when the token is known, and the token the shards made for it meanwhile is discarded.

The scheduler is synchronous and owns no I/O: the batcher sends its steps and feeds back the
shards' answers (``update``), so it can be driven with hand-made outputs.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from tgis_proto import shard_pb2 as pb
from tgis_router import metrics
from tgis_router.active import ActiveRequest
from tgis_router.admission import Admission, Candidate, Decision, Running, projected_peak
from tgis_router.errors import GenerationFailedError, OutOfMemoryError, RouterError
from tgis_router.kv_blocks import BlockPool, blocks_for
from tgis_router.queue import RequestQueue
from tgis_router.requests import StopReason

log = logging.getLogger(__name__)

NEVER_FITS = "the request does not fit in the memory available to batches"
# Blocks a new request must leave free beside a running batch (vLLM's watermark): without them,
# a batch admitted to the last block preempts at its very next decode.
WATERMARK_FRACTION = 0.01


@dataclass(eq=False, slots=True)
class ScheduledRequest:
    """How far a request has come on the shards, from admission to its end, counting the steps
    sent (not only the steps answered)."""

    entry: ActiveRequest
    admitted: int  # admission order: the latest admitted is preempted first
    # Tokens the shard prefills: prompt prefix, input and (after a preemption) the resumed output.
    prompt_length: int
    computed: int = 0  # tokens in the shards' KV cache once the steps sent have run
    blocks: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)  # every token generated so far
    pending: int = 0  # tokens the steps sent will still bring
    resumed: int = 0  # output tokens recomputed as part of the prompt after a preemption
    ended: bool = False  # a token it got was EOS

    @classmethod
    def admit(cls, entry: ActiveRequest, admitted: int) -> ScheduledRequest:
        return cls(entry, admitted, entry.request.prefix_length + len(entry.request.input_ids))

    @property
    def id(self) -> int:
        return self.entry.id

    @property
    def fully_scheduled(self) -> bool:
        """Every token it may generate is in a step sent."""
        return len(self.output_ids) + self.pending >= self.entry.request.max_new_tokens

    @property
    def leaving(self) -> bool:
        return self.ended or self.entry.finished or self.fully_scheduled

    def resume(self) -> None:
        """Before it rejoins after a preemption: its prompt now ends with every token it generated."""
        if self.pending:
            raise RuntimeError(f"request {self.id} rejoins with {self.pending} tokens still on the way")
        self.prompt_length += len(self.output_ids) - self.resumed
        self.resumed = len(self.output_ids)

    def shard_request(self) -> pb.Request:
        """What the shard needs to take the request in; a resumed request recomputes its output."""
        request = self.entry.to_shard_request()
        if self.resumed:
            request.input_ids.extend(self.output_ids[: self.resumed])
            request.resumed_tokens = self.resumed
            request.details.input_tokens = False  # sent with its first token already
        return request


@dataclass(slots=True)
class Work:
    """One request's share of a step."""

    request: ScheduledRequest
    tokens: int
    new_blocks: tuple[int, ...]
    prompt: bool  # prompt tokens (else its last generated token)
    samples: bool  # the step brings it a token: its prompt is complete after it


@dataclass(frozen=True)
class Step:
    """What the shards do next: drop ``leaves``, take in ``joins``, run ``work``."""

    leaves: list[int]
    joins: list[ScheduledRequest]
    work: list[Work]

    @property
    def method(self) -> str:
        """TGIS's metric label: a step that processes prompt tokens is a prefill."""
        return "prefill" if any(w.prompt for w in self.work) else "next_token"

    def to_proto(self) -> pb.StepRequest:
        return pb.StepRequest(
            leaves=self.leaves,
            joins=[r.shard_request() for r in self.joins],
            request_ids=[w.request.id for w in self.work],
            num_tokens=[w.tokens for w in self.work],
            new_block_counts=[len(w.new_blocks) for w in self.work],
            new_block_ids=[b for w in self.work for b in w.new_blocks],
        )


@dataclass(slots=True)
class NewToken:
    """A request's token from a step, with the details the shard computed for it (if asked)."""

    entry: ActiveRequest
    token_id: int
    details: pb.Generation | None


@dataclass(frozen=True)
class StepOutcome:
    """A step's answer, applied: tokens to hand out and requests the shards dropped."""

    tokens: list[NewToken]
    failed: list[tuple[ActiveRequest, RouterError]]


class Scheduler:
    """What both policies share: the running requests, their leaving, the shards' answers."""

    def __init__(self, queue: RequestQueue, max_batch_size: int):
        self._queue = queue
        self._max_batch_size = max_batch_size
        self.running: list[ScheduledRequest] = []  # in admission order
        self._admissions = itertools.count()
        self._dropped: list[int] = []  # requests the shards dropped on a failure; acknowledged next step

    def has_work(self) -> bool:
        return bool(self.running) or len(self._queue) > 0

    def schedule(self) -> Step | None:
        """The next step; None when there is nothing to do."""
        leaves, self._dropped = self._dropped, []
        leaves += self._release_leaving()
        joins: list[ScheduledRequest] = []
        work = self._plan(leaves, joins)
        if not work and not leaves:
            return None
        for item in work:
            item.request.computed += item.tokens
            if item.samples:
                item.request.pending += 1
        self._observe()
        return Step(leaves, joins, work)

    def _work(self, request: ScheduledRequest, tokens: int, new_blocks: tuple[int, ...] = ()) -> Work:
        prompt = request.computed < request.prompt_length
        return Work(request, tokens, new_blocks, prompt, request.computed + tokens >= request.prompt_length)

    def _observe(self) -> None:
        """Publishes the batch's gauges, once a step."""
        input_tokens = max_remaining = 0
        for r in self.running:  # one walk over the batch
            input_tokens += r.prompt_length
            max_remaining = max(max_remaining, r.entry.request.max_new_tokens - len(r.output_ids) - r.pending)
        metrics.batch_current_size.set(len(self.running))
        metrics.batch_input_tokens.set(input_tokens)
        metrics.batch_max_remaining_tokens.set(max_remaining)

    def _plan(self, leaves: list[int], joins: list[ScheduledRequest]) -> list[Work]:
        """The step's work; new requests go to ``joins``, preempted ones to ``leaves``."""
        raise NotImplementedError

    def _release_leaving(self) -> list[int]:
        """Running requests that leave the batch: every token scheduled, an EOS seen, or finished
        by the client, a time limit or a stop sequence seen while the last steps ran."""
        leaving = [r for r in self.running if r.leaving]
        if not leaving:
            return []
        self.running = [r for r in self.running if not r.leaving]
        for request in leaving:
            self._release(request)
        return [r.id for r in leaving]

    def _release(self, request: ScheduledRequest) -> None:
        """Gives back what the request holds on the shards (nothing, for padded engines)."""

    def _admit(self, entry: ActiveRequest, joins: list[ScheduledRequest]) -> ScheduledRequest:
        request = ScheduledRequest.admit(entry, next(self._admissions))
        entry.started()
        self.running.append(request)
        joins.append(request)
        return request

    def update(self, step: Step, response: pb.StepResponse) -> StepOutcome:
        """Applies the shards' answer to ``step``."""
        by_id = {w.request.id: w.request for w in step.work}
        failed: list[tuple[ActiveRequest, RouterError]] = []
        if response.failures:
            gone = {f.request_id for f in response.failures}
            for request in [r for r in self.running if r.id in gone]:
                self._release(request)
            self.running = [r for r in self.running if r.id not in gone]
            for failure in response.failures:
                self._dropped.append(failure.request_id)
                request = by_id.get(failure.request_id)
                if request is not None:
                    request.pending = 0
                    kind = OutOfMemoryError if failure.kind == pb.FAILURE_OUT_OF_MEMORY else GenerationFailedError
                    failed.append((request.entry, kind(failure.message)))
        details = {g.request_id: g for g in response.details} if response.details else {}
        tokens: list[NewToken] = []
        for request_id, token_id in zip(response.request_ids, response.token_ids, strict=True):
            request = by_id.get(request_id)
            if request is None:
                log.error("shard returned a token for request %d, which the step did not run", request_id)
                continue
            request.pending -= 1
            request.output_ids.append(token_id)
            if request.entry.ends_with(token_id, len(request.output_ids)):
                request.ended = True
            tokens.append(NewToken(request.entry, token_id, details.get(request_id)))
        return StepOutcome(tokens, failed)

    def abandon(self) -> list[ActiveRequest]:
        """Forgets every running request (after a failed step, the shards hold none) and returns them."""
        abandoned, self.running = self.running, []
        for request in abandoned:
            self._release(request)
            request.pending = 0
        self._dropped = []
        self._observe()
        return [r.entry for r in abandoned]


class PagedScheduler(Scheduler):
    """Block-paged KV cache owned here; chunked prefill; preemption when the cache is full."""

    def __init__(
        self,
        queue: RequestQueue,
        max_batch_size: int,
        blocks: BlockPool,
        step_tokens: int,
        prompt_tokens_while_decoding: int | None = None,
    ):
        """``step_tokens``: a step's budget; ``prompt_tokens_while_decoding``: the prompt tokens a
        step in which requests decode takes beside them (None: what the step's budget leaves)."""
        super().__init__(queue, max_batch_size)
        self.blocks = blocks
        # Every running request must be able to decode in one step, and a prompt must move on.
        self.step_tokens = max(step_tokens, max_batch_size + 1)
        self.prompt_tokens_while_decoding = prompt_tokens_while_decoding or self.step_tokens
        self._watermark = int(blocks.num_blocks * WATERMARK_FRACTION)
        self._preempted: dict[int, ScheduledRequest] = {}  # requeued requests, by id

    def _release(self, request: ScheduledRequest) -> None:
        self.blocks.give_back(request.blocks)
        request.blocks = []

    def _observe(self) -> None:
        super()._observe()
        self.blocks.observe()

    def _blocks_needed(self, request: ScheduledRequest, tokens: int) -> int:
        return max(0, blocks_for(request.computed + tokens, self.blocks.block_size) - len(request.blocks))

    def _step_budget(self, decodes: int) -> int:
        """Tokens a step may process. Beside decodes, prompt chunks stay small: the step's time is
        how long every decoding request waits for its next token, and a long mixed step is the
        inter-token latency's tail. The decodes do not count against the prompts' share: when
        they did (a budget of 512 for both), prompts joined a large batch by a block a step and
        the batch settled at half the budget's rows, or, with a smaller budget, lost throughput
        (the router model, bench/RESULTS.md 2026-12-07 (7)). A prompt moves on by a block at least."""
        if not decodes:
            return self.step_tokens
        return min(self.step_tokens, decodes + max(self.prompt_tokens_while_decoding, self.blocks.block_size))

    def _plan(self, leaves: list[int], joins: list[ScheduledRequest]) -> list[Work]:
        work: dict[int, Work] = {}
        preempted: set[int] = set()
        block_size = self.blocks.block_size
        decoding = [r for r in self.running if r.computed >= r.prompt_length]
        prompting = [r for r in self.running if r.computed < r.prompt_length]
        budget = self._step_budget(len(decoding))
        # Decodes first (each needs at most one block), then prompts in admission order.
        for request in decoding:
            if request.id in preempted:
                continue
            new_blocks: tuple[int, ...] = ()
            if request.computed >= len(request.blocks) * block_size:  # its next token starts a block
                if not self._room_for(request, 1, work, leaves, preempted):
                    continue
                new_blocks = self.blocks.take(1)
                request.blocks.extend(new_blocks)
            work[request.entry.id] = self._work(request, 1, new_blocks)
            budget -= 1
        for request in prompting:
            if request.id in preempted or budget <= 0:
                continue
            tokens = min(request.prompt_length - request.computed, budget)
            # A chunk shrinks to the blocks there are before anything is preempted for it.
            room = (self.blocks.free + len(request.blocks)) * block_size - request.computed
            tokens = min(tokens, room) if room > 0 else tokens
            if not self._room_for(request, tokens, work, leaves, preempted):
                continue
            new_blocks = self.blocks.take(self._blocks_needed(request, tokens))
            request.blocks.extend(new_blocks)
            work[request.id] = self._work(request, tokens, new_blocks)
            budget -= tokens
        # After a preemption the cache is full: admitting now would only preempt again.
        if not preempted:
            self._admit_waiting(budget, joins, work)
        return list(work.values())

    def _room_for(
        self, request: ScheduledRequest, tokens: int, work: dict[int, Work], leaves: list[int], preempted: set[int]
    ) -> bool:
        """Preempts the latest admitted requests until ``tokens`` more fit for ``request``; False
        when it was preempted itself."""
        while self._blocks_needed(request, tokens) > self.blocks.free:
            victim = self.running[-1]
            self._preempt(victim, work, leaves)
            preempted.add(victim.id)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, budget: int, joins: list[ScheduledRequest], work: dict[int, Work]) -> None:
        self._preempted = {rid: r for rid, r in self._preempted.items() if not r.entry.finished}
        for entry in self._queue.live():
            if budget <= 0 or len(self.running) >= self._max_batch_size:
                break
            resumed = self._preempted.get(entry.id)
            if resumed is not None and resumed.pending:
                break  # its last tokens are still on the way: it resumes once they are here
            prompt = entry.request.prefix_length + len(entry.request.input_ids)
            if resumed is not None:
                prompt += len(resumed.output_ids)
            tokens = min(prompt, budget)
            if not self.running:
                # Alone in the batch, a prompt starts with what the cache holds.
                tokens = min(tokens, self.blocks.free * self.blocks.block_size)
            needed = blocks_for(tokens, self.blocks.block_size)
            reserve = self._watermark if self.running else 0
            if needed + reserve > self.blocks.free:
                break  # first come, first served: later arrivals wait behind it
            self._queue.remove([entry])
            if resumed is not None:
                del self._preempted[entry.id]
                resumed.resume()
                # Back in its admission place: the oldest requests are the last to be preempted again.
                bisect.insort(self.running, resumed, key=lambda r: r.admitted)
                joins.append(resumed)
                request = resumed
            else:
                request = self._admit(entry, joins)
            new_blocks = self.blocks.take(needed)
            request.blocks = list(new_blocks)
            work[request.id] = self._work(request, tokens, new_blocks)
            budget -= tokens

    def _preempt(self, request: ScheduledRequest, work: dict[int, Work], leaves: list[int]) -> None:
        """Takes the request off the shards and requeues it at the head of the queue."""
        log.info("KV cache full: request %d is preempted after %d tokens", request.id, len(request.output_ids))
        metrics.request_preemptions.inc()
        self.running.remove(request)
        # Its work in this step, if it got some already, is undone: the budget it took stays
        # spent, which only makes the step a little smaller.
        undone = work.pop(request.id, None)
        if undone is not None:
            del request.blocks[len(request.blocks) - len(undone.new_blocks) :]
            self.blocks.give_back(undone.new_blocks)
        self._release(request)
        leaves.append(request.id)  # it joined the shards in an earlier step
        request.computed = 0
        self._preempted[request.id] = request
        self._queue.put_front(request.entry)


class PaddedScheduler(Scheduler):
    """Dynamic batch sizing by the memory model; whole prompts; every running request decodes."""

    def __init__(self, queue: RequestQueue, admission: Admission):
        super().__init__(queue, admission.config.max_batch_size)
        self.admission = admission
        self._waited_steps = 0  # steps since waiting requests were last considered in vain

    def _plan(self, leaves: list[int], joins: list[ScheduledRequest]) -> list[Work]:
        work = [self._work(r, 1) for r in self.running]
        for entry in self._admitted():
            request = self._admit(entry, joins)
            work.append(self._work(request, request.prompt_length))
        return work

    def _admitted(self) -> list[ActiveRequest]:
        """The waiting requests that join now, taken off the queue."""
        waiting = self._queue.live()
        if not waiting:
            return []
        states = [Running(r.entry.length, r.entry.remaining) for r in self.running]
        try:
            decision = self.admission.select(states, _candidates(waiting), self._waited_steps)
        except Exception:
            log.exception("admission failed; judging the %d waiting requests one by one", len(waiting))
            waiting = self._judgeable(states, waiting)
            decision = self.admission.select(states, _candidates(waiting), self._waited_steps)
        _count(decision)
        if not decision.admit:
            self._waited_steps += 1
            if not self.running and waiting:
                # Nothing runs, so nothing will free memory: the head can never fit.
                head = waiting[0]
                self._queue.remove([head])
                head.finish(StopReason.ERROR, OutOfMemoryError(NEVER_FITS))
            return []
        self._waited_steps = 0
        admitted = [waiting[i] for i in decision.admit]
        self._queue.remove(admitted)
        joining = [Running(e.length, e.request.max_new_tokens) for e in admitted]
        metrics.batch_weight.set(projected_peak(self.admission.model, [*states, *joining]))
        return admitted

    def _judgeable(self, states: list[Running], waiting: list[ActiveRequest]) -> list[ActiveRequest]:
        """The waiting requests admission can judge alone; the others fail and leave the queue."""
        judgeable = []
        for entry in waiting:
            try:
                self.admission.select(states, _candidates([entry]), self._waited_steps)
                judgeable.append(entry)
            except Exception as e:
                self._queue.remove([entry])
                entry.finish(StopReason.ERROR, GenerationFailedError(f"internal error in admission: {e!r}"))
        return judgeable


def _candidates(entries: Sequence[ActiveRequest]) -> list[Candidate]:
    return [Candidate(e.length, e.request.max_new_tokens, e.arrival) for e in entries]


def _count(decision: Decision) -> None:
    if decision.weight_limited:
        metrics.prefill_weight_limit_exceeded.inc()
    if decision.padding_limited:
        metrics.prefill_padding_limit_exceeded.inc()
    if decision.prefill_limited:
        metrics.prefill_tokens_limit_exceeded.inc()
    if decision.waiting:
        metrics.add_on_waits.inc()
    metrics.queue_jumps.inc(decision.queue_jumps)
