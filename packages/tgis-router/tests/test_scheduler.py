"""The scheduler alone, driven with hand-made shard outputs (no shard, no event loop): admission,
chunked prefill, preemption order and resumption, and block accounting that never goes negative
and never frees a block twice."""

from __future__ import annotations

import random

import pytest
from prometheus_client import REGISTRY

from tests.support.fake_shard import EOS_ID
from tests.support.word_requests import word_request
from tgis_proto import generation_pb2 as fmaas
from tgis_proto import shard_pb2 as pb
from tgis_router.active import ActiveRequest
from tgis_router.admission import Admission, AdmissionConfig, MemoryModel
from tgis_router.kv_blocks import BlockAccountingError, BlockPool
from tgis_router.queue import RequestQueue
from tgis_router.requests import StopReason
from tgis_router.scheduler import PaddedScheduler, PagedScheduler, Scheduler, Step
from tgis_router.tokenization import TokenizerPool

BLOCK = 4


class Requests:
    """Makes queued requests as the service does."""

    def __init__(self, tokenizer: TokenizerPool, queue: RequestQueue):
        self.tokenizer, self.queue = tokenizer, queue
        self._ids = iter(range(1, 10**6))

    def add(self, words: int, max_new_tokens: int = 10) -> ActiveRequest:
        stopping = fmaas.StoppingCriteria(max_new_tokens=max_new_tokens)
        entry = word_request(next(self._ids), self.tokenizer, words, fmaas.Parameters(stopping=stopping))
        self.queue.put(entry)
        return entry


def paged(
    tokenizer,
    num_blocks: int,
    max_batch_size: int = 8,
    step_tokens: int = 64,
    prompt_tokens_while_decoding: int | None = None,
):
    queue = RequestQueue()
    scheduler = PagedScheduler(
        queue, max_batch_size, BlockPool(num_blocks, BLOCK), step_tokens, prompt_tokens_while_decoding
    )
    return scheduler, Requests(tokenizer, queue)


def answer(step: Step, token: int = 9, failed: tuple[int, ...] = ()) -> pb.StepResponse:
    """The shard's answer: a token for each request whose prompt is complete after the step."""
    done = [w.request.id for w in step.work if w.samples and w.request.id not in failed]
    failures = [pb.RequestFailure(request_id=rid, message="bad") for rid in failed]
    return pb.StepResponse(request_ids=done, token_ids=[token] * len(done), failures=failures)


def run_step(scheduler: Scheduler, **answer_options) -> Step:
    step = scheduler.schedule()
    assert step is not None
    scheduler.update(step, answer(step, **answer_options))
    return step


def work_of(step: Step) -> dict[int, int]:
    return {w.request.id: w.tokens for w in step.work}


def check_blocks(scheduler: PagedScheduler) -> None:
    """Every block is free or held by exactly one running request, which holds enough for its tokens."""
    held = [b for r in scheduler.running for b in r.blocks]
    assert len(held) == len(set(held))
    assert scheduler.blocks.used == len(held)
    assert scheduler.blocks.free + scheduler.blocks.used == scheduler.blocks.num_blocks
    for request in scheduler.running:
        assert len(request.blocks) * BLOCK >= request.computed


def test_requests_are_admitted_in_arrival_order_with_the_blocks_their_prompts_need(tokenizer):
    scheduler, requests = paged(tokenizer, num_blocks=64, max_batch_size=2)
    first, second, third = requests.add(5), requests.add(9), requests.add(1)
    step = run_step(scheduler)
    assert [r.id for r in step.joins] == [first.id, second.id]
    assert work_of(step) == {first.id: 5, second.id: 9}
    assert [len(r.blocks) for r in scheduler.running] == [2, 3]
    assert step.to_proto().joins[1].input_ids == list(second.request.input_ids)
    # Both decode now; the third waits for a free place in the batch.
    step = run_step(scheduler)
    assert step.joins == []
    assert work_of(step) == {first.id: 1, second.id: 1}
    first.cancel()
    step = run_step(scheduler)
    assert step.leaves == [first.id]
    assert work_of(step) == {second.id: 1, third.id: 1}
    check_blocks(scheduler)


def test_a_prompt_longer_than_the_step_budget_is_prefilled_in_chunks_after_the_decodes(tokenizer):
    scheduler, requests = paged(tokenizer, num_blocks=64, max_batch_size=4, step_tokens=10)
    short = requests.add(3)
    run_step(scheduler)
    long = requests.add(25)
    chunks = []
    while len(chunks) < 4:
        step = run_step(scheduler)
        assert work_of(step)[short.id] == 1  # the running request decodes every step
        assert sum(work_of(step).values()) <= 10
        chunks.append(work_of(step)[long.id])
    assert chunks == [9, 9, 7, 1]  # the last one is its first decode
    assert [r.id for r in scheduler.running] == [short.id, long.id]
    check_blocks(scheduler)


def test_beside_decodes_prompts_take_their_own_budget_and_alone_the_whole_step(tokenizer):
    scheduler, requests = paged(
        tokenizer, num_blocks=64, max_batch_size=8, step_tokens=40, prompt_tokens_while_decoding=11
    )
    first = requests.add(30)
    assert work_of(run_step(scheduler)) == {first.id: 30}  # nothing decodes: the whole budget
    second = requests.add(30)
    chunks = []
    while second.id not in work_of(step := run_step(scheduler)) or work_of(step)[second.id] > 1:
        assert sum(work_of(step).values()) <= 12
        chunks.append(work_of(step).get(second.id))
    assert chunks == [11, 11, 8]  # beside one decode
    # The decodes do not count against the prompts' share: beside six of them a prompt still
    # takes its 20 tokens a step (a budget counting them would leave it a block).
    scheduler, requests = paged(
        tokenizer, num_blocks=64, max_batch_size=8, step_tokens=40, prompt_tokens_while_decoding=20
    )
    running = [requests.add(2) for _ in range(6)]
    run_step(scheduler)
    late = requests.add(50)
    assert work_of(run_step(scheduler)) == {**{r.id: 1 for r in running}, late.id: 20}
    # A share under a block: the prompt still moves on by a block a step.
    scheduler, requests = paged(
        tokenizer, num_blocks=64, max_batch_size=4, step_tokens=40, prompt_tokens_while_decoding=1
    )
    running = [requests.add(2) for _ in range(3)]
    run_step(scheduler)
    late = requests.add(20)
    step = run_step(scheduler)
    assert work_of(step) == {**{r.id: 1 for r in running}, late.id: BLOCK}
    check_blocks(scheduler)


def test_a_new_request_waits_while_it_would_leave_less_than_the_watermark_free(tokenizer):
    scheduler, requests = paged(tokenizer, num_blocks=200, max_batch_size=8, step_tokens=1000)
    big = requests.add(4 * 196)  # 196 blocks: the watermark (2 of 200) is left
    run_step(scheduler)
    small = requests.add(8)  # 2 more blocks would leave none
    step = run_step(scheduler)
    assert step.joins == []
    assert small.id not in work_of(step)
    big.cancel()
    step = run_step(scheduler)
    assert [r.id for r in step.joins] == [small.id]


def test_the_latest_admitted_request_is_preempted_first_and_resumes_first_with_its_tokens(tokenizer):
    # 8 blocks of 4 tokens: three requests of 8-token prompts fill 6; decoding takes the rest.
    scheduler, requests = paged(tokenizer, num_blocks=8, max_batch_size=8)
    old, middle, latest = requests.add(8, max_new_tokens=40), requests.add(8), requests.add(8)
    run_step(scheduler)
    later = requests.add(2)
    outputs = {r.id: [9] for r in (old, middle, latest)}
    preempted_step = None
    for token in range(10, 40):
        step = scheduler.schedule()
        scheduler.update(step, answer(step, token=token))
        for w in step.work:
            if w.samples:
                outputs[w.request.id].append(token)
        if step.leaves:
            preempted_step = step
            break
    assert preempted_step is not None
    assert preempted_step.leaves == [latest.id]  # the latest admitted gives its blocks back first
    assert latest.id not in work_of(preempted_step)
    assert scheduler.blocks.free == 2  # its 2 blocks came back; the two others took a third each
    check_blocks(scheduler)
    # It waits at the head of the queue, ahead of ``later``, and comes back with its output.
    middle.cancel()
    step = scheduler.schedule()
    assert step.leaves == [middle.id]
    assert [r.id for r in step.joins] == [latest.id, later.id]
    resumed = step.to_proto().joins[0]
    assert resumed.resumed_tokens == len(outputs[latest.id])
    assert list(resumed.input_ids) == [*latest.request.input_ids, *outputs[latest.id]]
    assert not resumed.details.input_tokens
    assert work_of(step)[latest.id] == len(resumed.input_ids)  # recomputed whole
    check_blocks(scheduler)


def test_a_request_that_alone_needs_more_blocks_than_are_free_preempts_itself_last(tokenizer):
    scheduler, requests = paged(tokenizer, num_blocks=4, max_batch_size=8)
    alone = requests.add(12, max_new_tokens=20)
    run_step(scheduler)  # 3 blocks
    for _ in range(4):  # tokens 13..16 fill the 4th block
        run_step(scheduler)
    step = run_step(scheduler)  # token 17 needs a 5th block: nobody else to preempt
    assert step.leaves == [alone.id]
    assert step.work == []
    assert scheduler.blocks.free == 4


def test_failed_and_finished_requests_give_their_blocks_back_once(tokenizer):
    scheduler, requests = paged(tokenizer, num_blocks=32)
    a, b, c = requests.add(6, max_new_tokens=2), requests.add(6), requests.add(6)
    step = scheduler.schedule()
    outcome = scheduler.update(step, answer(step, failed=(b.id,)))
    assert [e.id for e, _ in outcome.failed] == [b.id]
    assert [r.id for r in scheduler.running] == [a.id, c.id]
    check_blocks(scheduler)
    step = run_step(scheduler)  # a's second token: its last
    step = scheduler.schedule()
    assert step.leaves == [a.id]
    check_blocks(scheduler)
    abandoned = scheduler.abandon()
    assert [e.id for e in abandoned] == [c.id]
    assert scheduler.blocks.free == 32
    with pytest.raises(BlockAccountingError):
        scheduler.blocks.give_back([1])


def test_eos_ends_a_request_with_the_next_step(tokenizer):
    scheduler, requests = paged(tokenizer, num_blocks=32)
    entry = requests.add(3)
    run_step(scheduler)
    step = scheduler.schedule()
    scheduler.update(step, answer(step, token=EOS_ID))
    step = scheduler.schedule()
    assert step.leaves == [entry.id]
    assert step.work == []


def test_random_load_keeps_the_block_accounting_exact(tokenizer):
    rng = random.Random(11)
    scheduler, requests = paged(tokenizer, num_blocks=40, max_batch_size=6, step_tokens=24)
    entries = []
    preemptions = REGISTRY.get_sample_value("tgi_request_preemptions_total")
    for _ in range(400):
        if rng.random() < 0.3:
            entries.append(requests.add(rng.randint(1, 40), max_new_tokens=rng.randint(1, 30)))
        if entries and rng.random() < 0.05:
            rng.choice(entries).cancel()
        step = scheduler.schedule()
        if step is None:
            continue
        failed = tuple(w.request.id for w in step.work if rng.random() < 0.02)
        token = EOS_ID if rng.random() < 0.05 else 9
        outcome = scheduler.update(step, answer(step, token=token, failed=failed))
        for new in outcome.tokens:
            new.entry.add_token(new.token_id)
        for entry, error in outcome.failed:
            entry.finish(StopReason.ERROR, error)
        check_blocks(scheduler)
        assert len(scheduler.running) <= 6
    assert REGISTRY.get_sample_value("tgi_request_preemptions_total") > preemptions  # the cache did run full


def test_padded_engines_decode_every_running_request_and_take_prompts_whole(tokenizer):
    queue = RequestQueue()
    model = MemoryModel(limit=1e9, bytes_per_token=1.0, prefill_bytes_per_token=0.0, padded=True)
    scheduler = PaddedScheduler(queue, Admission(model, AdmissionConfig(max_batch_size=4)))
    requests = Requests(tokenizer, queue)
    first = requests.add(30)
    step = run_step(scheduler)
    assert work_of(step) == {first.id: 30}
    assert all(w.new_blocks == () for w in step.work)
    second = requests.add(50)
    step = scheduler.schedule()
    assert work_of(step) == {first.id: 1, second.id: 50}


def test_steps_planned_ahead_of_their_answers_schedule_no_token_past_the_last(tokenizer):
    scheduler, requests = paged(tokenizer, num_blocks=64)
    short, long = requests.add(4, max_new_tokens=3), requests.add(4, max_new_tokens=10)
    ahead = [scheduler.schedule(), scheduler.schedule()]  # the second before the first is answered
    assert work_of(ahead[1]) == {short.id: 1, long.id: 1}
    scheduler.update(ahead[0], answer(ahead[0]))
    ahead.append(scheduler.schedule())  # the short request's third token
    step = scheduler.schedule()  # all three are in steps sent: it leaves, with no more work
    assert step.leaves == [short.id]
    assert work_of(step) == {long.id: 1}
    tokens = [t for s in ahead[1:] for t in scheduler.update(s, answer(s)).tokens if t.entry is short]
    assert len(tokens) == 2  # with the first: exactly its three
    check_blocks(scheduler)


def test_a_request_preempted_with_a_token_on_the_way_resumes_with_that_token(tokenizer):
    scheduler, requests = paged(tokenizer, num_blocks=8)
    first, _, latest = requests.add(8, max_new_tokens=40), requests.add(8), requests.add(8)
    prompts = scheduler.schedule()
    decodes = scheduler.schedule()  # before the prompts' tokens are known: the latest is preempted
    assert decodes.leaves == [latest.id]
    scheduler.update(prompts, answer(prompts, token=21))  # ... and its first token arrives now
    scheduler.update(decodes, answer(decodes, token=22))
    first.cancel()
    step = scheduler.schedule()
    assert [r.id for r in step.joins] == [latest.id]
    resumed = step.to_proto().joins[0]
    assert list(resumed.input_ids) == [*latest.request.input_ids, 21]
    assert resumed.resumed_tokens == 1
    check_blocks(scheduler)
