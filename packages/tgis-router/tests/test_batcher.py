"""The batching loop against a scripted shard: order, cancellation, time limits, failure
isolation, preemption and chunked prefill, and the invariant that every accepted request ends
exactly once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import grpc
import pytest
from prometheus_client import REGISTRY

from tests.support.fake_shard import EOS_ID, FakeShards, expected_text, rpc_error, token_at
from tests.support.word_requests import word_request
from tgis_proto import generation_pb2 as fmaas
from tgis_proto import shard_pb2 as pb
from tgis_router.active import ActiveRequest
from tgis_router.admission import Admission, AdmissionConfig, MemoryModel
from tgis_router.batcher import PIPELINE_DEPTH, Batcher
from tgis_router.errors import GenerationFailedError, OutOfMemoryError, RouterError, ShardUnavailableError
from tgis_router.events import Finish, NewToken
from tgis_router.health import GenerationHealth
from tgis_router.kv_blocks import BlockPool
from tgis_router.queue import RequestQueue
from tgis_router.requests import StopReason
from tgis_router.responses import unary_response
from tgis_router.scheduler import NEVER_FITS, PaddedScheduler, PagedScheduler
from tgis_router.shard_client import ShardClient
from tgis_router.tokenization import TokenizerPool

ROOMY = MemoryModel(limit=1e12, bytes_per_token=1.0, prefill_bytes_per_token=0.0, padded=False)


class Harness:
    """A queue, a batcher on fake shards, and a way to submit requests as the service does. A
    fake with a KV cache gets the paged scheduler (``step_tokens`` per step), else the padded one."""

    def __init__(
        self,
        tokenizer: TokenizerPool,
        shards: FakeShards,
        config: AdmissionConfig,
        model: MemoryModel,
        step_tokens: int,
    ):
        self.tokenizer = tokenizer
        self.shards = shards
        self.queue = RequestQueue()
        self.health = GenerationHealth(shards)  # type: ignore[arg-type]
        if shards.kv_cache is not None:
            blocks = BlockPool(shards.kv_cache.num_blocks, shards.kv_cache.block_size)
            scheduler = PagedScheduler(self.queue, config.max_batch_size, blocks, step_tokens)
        else:
            scheduler = PaddedScheduler(self.queue, Admission(model, config))
        self.scheduler = scheduler
        self.batcher = Batcher(shards, self.queue, scheduler, self.health)  # type: ignore[arg-type]
        self._ids = iter(range(1, 10**6))

    def submit(
        self, words: int = 3, max_new_tokens: int = 5, time_limit_ms: int = 0, stopping_sequence: str = "", **params
    ) -> ActiveRequest:
        stopping = fmaas.StoppingCriteria(
            max_new_tokens=max_new_tokens,
            time_limit_millis=time_limit_ms,
            stop_sequences=[stopping_sequence] if stopping_sequence else [],
        )
        entry = word_request(next(self._ids), self.tokenizer, words, fmaas.Parameters(stopping=stopping, **params))
        self.queue.put(entry)
        return entry


def run_with_batcher(
    tokenizer: TokenizerPool,
    scenario: Callable[[Harness], Awaitable[None]],
    shards: FakeShards | None = None,
    max_batch_size: int = 8,
    model: MemoryModel = ROOMY,
    queue_jump_window_s: float = 1.0,
    step_tokens: int = 2048,
) -> Harness:
    config = AdmissionConfig(max_batch_size=max_batch_size, queue_jump_window_s=queue_jump_window_s)

    async def main() -> Harness:
        harness = Harness(tokenizer, shards or FakeShards(), config, model, step_tokens)
        task = asyncio.create_task(harness.batcher.run())
        try:
            await asyncio.wait_for(scenario(harness), 20)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return harness

    harness = asyncio.run(main())
    assert harness.shards.violations == []
    return harness


async def outcome(entry: ActiveRequest) -> fmaas.GenerationResponse | RouterError:
    try:
        return await unary_response(entry)
    except RouterError as e:
        return e


def terminal_events(entry: ActiveRequest) -> int:
    """Events that end the request, left in its queue after it was answered (must be 0)."""
    count = 0
    while not entry.events.empty():
        event = entry.events.get_nowait()
        count += isinstance(event, Finish) or (isinstance(event, NewToken) and event.finish is not None)
    return count


def test_requests_are_answered_in_arrival_order_when_one_fits_at_a_time(tokenizer):
    async def scenario(h: Harness) -> None:
        entries = [h.submit(max_new_tokens=3) for _ in range(5)]
        answers = await asyncio.gather(*(outcome(e) for e in entries))
        for entry, answer in zip(entries, answers, strict=True):
            assert answer.text == expected_text(entry.id, 3)
            assert answer.stop_reason == fmaas.MAX_TOKENS
        assert h.shards.prefilled == [e.id for e in entries]

    run_with_batcher(tokenizer, scenario, max_batch_size=1)


def test_waiting_requests_join_the_running_batch(tokenizer):
    async def scenario(h: Harness) -> None:
        first = h.submit(max_new_tokens=20)
        await asyncio.sleep(0.01)
        later = [h.submit(max_new_tokens=2) for _ in range(3)]
        answers = await asyncio.gather(*(outcome(e) for e in [first, *later]))
        assert [a.generated_token_count for a in answers] == [20, 2, 2, 2]
        assert answers[0].text == expected_text(first.id, 20)

    run_with_batcher(tokenizer, scenario, shards=FakeShards(step_delay=0.001))


def test_a_request_cancelled_in_the_queue_never_reaches_the_shards(tokenizer):
    async def scenario(h: Harness) -> None:
        running = h.submit(max_new_tokens=30)
        await asyncio.sleep(0.01)
        waiting = h.submit()
        waiting.cancel()
        await outcome(running)
        assert waiting.id not in h.shards.prefilled

    run_with_batcher(tokenizer, scenario, shards=FakeShards(step_delay=0.001), max_batch_size=1)


def test_a_request_that_does_not_fit_yet_is_passed_only_by_requests_that_arrived_soon_after_it(tokenizer):
    # Room for four small requests (3 + 20 tokens) or the big one (70 + 20) alone.
    model = MemoryModel(limit=100.0, bytes_per_token=1.0, prefill_bytes_per_token=0.0, padded=False)
    window = 0.03

    async def scenario(h: Harness) -> None:
        smalls = [h.submit(words=3, max_new_tokens=20)]
        await asyncio.sleep(0.005)
        big = h.submit(words=70, max_new_tokens=20)
        for _ in range(60):  # a steady stream of small requests that would always fit
            await asyncio.sleep(0.002)
            smalls.append(h.submit(words=3, max_new_tokens=20))
        answers = await asyncio.gather(*(outcome(e) for e in [big, *smalls]))
        assert all(a.generated_token_count == 20 for a in answers)
        later = [e for e in smalls if e.arrival - big.arrival > window]
        assert later
        order = h.shards.prefilled
        assert all(order.index(e.id) > order.index(big.id) for e in later)

    shards = FakeShards(step_delay=0.001)
    run_with_batcher(tokenizer, scenario, shards=shards, model=model, queue_jump_window_s=window)


def test_a_bug_in_the_loop_fails_the_running_batch_clears_the_shards_and_the_loop_goes_on(tokenizer, monkeypatch):
    async def scenario(h: Harness) -> None:
        hand_out = h.batcher._hand_out
        calls = {"n": 0}

        def buggy(outcome):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyError("bookkeeping bug")
            return hand_out(outcome)

        monkeypatch.setattr(h.batcher, "_hand_out", buggy)
        first = await outcome(h.submit(max_new_tokens=10))
        assert isinstance(first, GenerationFailedError)
        assert "internal error in the batching loop" in str(first)
        assert h.shards.resets == 1  # every request dropped from the shards
        assert h.shards.requests == {}
        after = h.submit(max_new_tokens=3)
        assert (await outcome(after)).text == expected_text(after.id, 3)

    run_with_batcher(tokenizer, scenario)


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_a_cancelled_request_leaves_the_shard_batch_with_the_next_step_planned(tokenizer, stage):
    async def scenario(h: Harness) -> None:
        other = h.submit(max_new_tokens=40)
        entry = h.submit(max_new_tokens=40)
        while h.shards.generated.get(entry.id, 0) < (1 if stage == "prefill" else 5):
            await asyncio.sleep(0.0005)
        entry.cancel()
        steps_at_cancel = h.shards.generated[other.id]
        while entry.id in h.shards.held_request_ids():
            await asyncio.sleep(0.0005)
        # The steps already sent run first (the pipeline), then the one that lets it leave.
        assert h.shards.generated[other.id] - steps_at_cancel <= PIPELINE_DEPTH + 1
        assert (await outcome(other)).generated_token_count == 40

    run_with_batcher(tokenizer, scenario, shards=FakeShards(step_delay=0.002))


def test_time_limits_end_requests_in_the_queue_and_while_running(tokenizer):
    async def scenario(h: Harness) -> None:
        running = h.submit(max_new_tokens=100, time_limit_ms=60)
        queued = h.submit(max_new_tokens=5, time_limit_ms=10)  # waits behind ``running``
        answers = await asyncio.gather(outcome(running), outcome(queued))
        assert answers[0].stop_reason == fmaas.TIME_LIMIT
        assert 0 < answers[0].generated_token_count < 100
        assert answers[1].stop_reason == fmaas.TIME_LIMIT
        assert answers[1].generated_token_count == 0
        assert queued.id not in h.shards.prefilled

    run_with_batcher(tokenizer, scenario, shards=FakeShards(step_delay=0.005), max_batch_size=1)


def test_joining_requests_the_shard_reports_failed_fail_alone_and_the_running_go_on(tokenizer):
    async def scenario(h: Harness) -> None:
        running = h.submit(max_new_tokens=20)
        await asyncio.sleep(0.01)
        joining = h.submit()
        answer = await outcome(joining)
        assert isinstance(answer, OutOfMemoryError)
        assert (await outcome(running)).generated_token_count == 20
        after = h.submit(max_new_tokens=2)
        assert (await outcome(after)).text == expected_text(after.id, 2)

    h = run_with_batcher(tokenizer, scenario, shards=FakeShards(step_delay=0.001, on_join=lambda ids: [2]))
    assert h.shards.resets == 0


def test_a_failed_step_fails_the_running_batch_clears_it_and_the_loop_goes_on(tokenizer):
    steps = {"n": 0}

    def on_step(ids: list[int]) -> None:
        steps["n"] += 1
        if steps["n"] == 3:  # both requests are decoding
            raise rpc_error(grpc.StatusCode.INTERNAL, "step failed: boom")

    async def scenario(h: Harness) -> None:
        entries = [h.submit(max_new_tokens=10) for _ in range(2)]
        answers = await asyncio.gather(*(outcome(e) for e in entries))
        assert all(isinstance(a, GenerationFailedError) for a in answers)
        assert all("boom" in str(a) for a in answers)
        assert h.shards.requests == {}
        assert h.shards.resets == 1
        after = h.submit(max_new_tokens=3)
        assert (await outcome(after)).text == expected_text(after.id, 3)

    run_with_batcher(tokenizer, scenario, shards=FakeShards(on_step=on_step))


def test_requests_the_shard_reports_failed_get_resource_exhausted_and_the_rest_go_on(tokenizer):
    async def scenario(h: Harness) -> None:
        entries = [h.submit(max_new_tokens=6) for _ in range(4)]
        answers = await asyncio.gather(*(outcome(e) for e in entries))
        assert isinstance(answers[1], OutOfMemoryError)
        assert answers[1].status == grpc.StatusCode.RESOURCE_EXHAUSTED
        for i in (0, 2, 3):
            assert answers[i].text == expected_text(entries[i].id, 6)

    shards = FakeShards(on_step=lambda ids: [2] if 2 in ids else None)
    run_with_batcher(tokenizer, scenario, shards=shards)


def test_a_lost_shard_reads_unavailable(tokenizer):
    def gone(ids: list[int]) -> None:
        raise rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")

    async def scenario(h: Harness) -> None:
        answer = await outcome(h.submit())
        assert isinstance(answer, ShardUnavailableError)
        assert answer.status == grpc.StatusCode.UNAVAILABLE
        assert "failed to connect" in str(answer)

    run_with_batcher(tokenizer, scenario, shards=FakeShards(on_step=gone))


def test_one_requests_token_handling_failure_fails_only_that_request(tokenizer, monkeypatch):
    async def scenario(h: Harness) -> None:
        entries = [h.submit(max_new_tokens=4) for _ in range(3)]
        broken = entries[1]

        def add_token(token_id, details=None):
            raise UnicodeError("detokenizer bug")

        monkeypatch.setattr(broken, "add_token", add_token)
        answers = await asyncio.gather(*(outcome(e) for e in entries))
        assert isinstance(answers[1], GenerationFailedError)
        assert "detokenizer bug" in str(answers[1])
        assert answers[0].generated_token_count == answers[2].generated_token_count == 4

    run_with_batcher(tokenizer, scenario)


def test_a_request_admission_cannot_judge_fails_alone(tokenizer, monkeypatch):
    async def scenario(h: Harness) -> None:
        select = h.scheduler.admission.select

        def picky(running, queue, waited_steps=0):
            if any(c.input_length == 7 for c in queue):
                raise ZeroDivisionError("admission bug")
            return select(running, queue, waited_steps)

        monkeypatch.setattr(h.scheduler.admission, "select", picky)
        good, bad = h.submit(words=3), h.submit(words=7)
        answers = await asyncio.gather(outcome(good), outcome(bad))
        assert answers[0].generated_token_count == 5
        assert isinstance(answers[1], GenerationFailedError)
        assert "admission bug" in str(answers[1])

    run_with_batcher(tokenizer, scenario)


def test_a_request_that_can_never_fit_gets_resource_exhausted(tokenizer):
    tiny = MemoryModel(limit=4.0, bytes_per_token=1.0, prefill_bytes_per_token=0.0, padded=False)

    async def scenario(h: Harness) -> None:
        answer = await outcome(h.submit(words=8))
        assert isinstance(answer, OutOfMemoryError)
        assert str(answer) == NEVER_FITS

    run_with_batcher(tokenizer, scenario, model=tiny)


def test_health_pings_while_steps_succeed_and_runs_a_forward_pass_after_a_failure(tokenizer):
    failing = {"on": False}

    def on_step(ids: list[int]) -> None:
        if failing["on"]:
            raise rpc_error(grpc.StatusCode.INTERNAL, "boom")

    async def scenario(h: Harness) -> None:
        assert await h.health.check() is None  # before any step: a real forward pass
        await outcome(h.submit(max_new_tokens=2))
        assert await h.health.check() is None
        failing["on"] = True
        await outcome(h.submit(max_new_tokens=3))
        h.shards.health_error = rpc_error(grpc.StatusCode.UNAVAILABLE, "forward pass failed: x")
        assert "forward pass failed" in await h.health.check()
        h.shards.health_error = None
        assert await h.health.check() is None  # the forward pass works again: healthy
        assert await h.health.check() is None

    h = run_with_batcher(tokenizer, scenario, shards=FakeShards(on_step=on_step))
    assert h.shards.health_calls == [True, False, True, True, False]


def test_every_request_ends_exactly_once_under_random_faults_and_cancellations(tokenizer):
    rng = random.Random(7)

    def maybe_fail(ids: list[int]) -> list[int] | None:
        roll = rng.random()
        if roll < 0.03:
            raise rpc_error(rng.choice([grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED]), "fault")
        return [rng.choice(ids)] if roll < 0.08 else None

    async def scenario(h: Harness) -> None:
        entries: list[ActiveRequest] = []
        cancelled: set[int] = set()
        for _ in range(300):
            entries.append(h.submit(words=rng.randint(1, 8), max_new_tokens=rng.randint(1, 12)))
            if rng.random() < 0.1:
                victim = rng.choice(entries)
                victim.cancel()
                cancelled.add(victim.id)
            await asyncio.sleep(rng.random() * 0.002)
        live = [e for e in entries if e.id not in cancelled]
        answers = await asyncio.gather(*(outcome(e) for e in live))
        for entry, answer in zip(live, answers, strict=True):
            assert terminal_events(entry) == 0, "a second answer was queued"
            if isinstance(answer, RouterError):
                assert answer.status in (grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED)
            else:
                assert answer.text == expected_text(entry.id, answer.generated_token_count)
                assert answer.generated_token_count == entry.request.max_new_tokens
        assert all(e.finished for e in entries)
        while h.shards.requests:  # the last finished requests leave with one more step
            await asyncio.sleep(0.001)
        assert not h.scheduler.running

    shards = FakeShards(on_join=maybe_fail, on_step=maybe_fail)
    run_with_batcher(tokenizer, scenario, shards=shards)


def test_eos_from_the_shard_ends_the_request_without_its_text(tokenizer):
    # EOS from the shard ends the request with EOS_TOKEN; the EOS text never shows.
    async def scenario(h: Harness) -> None:
        entry = h.submit(max_new_tokens=10)
        h.shards.tokens = lambda rid, position: EOS_ID if position == 2 else token_at(rid, position)
        answer = await outcome(entry)
        assert answer.stop_reason == fmaas.EOS_TOKEN
        assert answer.generated_token_count == 3
        assert answer.text == expected_text(entry.id, 2)

    run_with_batcher(tokenizer, scenario)


def test_finish_is_idempotent_and_later_tokens_are_ignored(tokenizer):
    async def scenario(h: Harness) -> None:
        entry = h.submit(max_new_tokens=50)
        while h.shards.generated.get(entry.id, 0) < 2:
            await asyncio.sleep(0.0005)
        entry.finish(StopReason.ERROR, GenerationFailedError("first"))
        entry.finish(StopReason.ERROR, GenerationFailedError("second"))
        answer = await outcome(entry)
        assert str(answer) == "first"
        await asyncio.sleep(0.02)
        assert terminal_events(entry) == 0

    run_with_batcher(tokenizer, scenario, shards=FakeShards(step_delay=0.001))


def test_health_reports_shards_that_cannot_be_reached(tmp_path):
    async def probe() -> str | None:
        shards = ShardClient([str(tmp_path / "no-such-shard")])
        try:
            return await GenerationHealth(shards).check()
        finally:
            await shards.close()

    reason = asyncio.run(probe())
    assert reason is not None
    assert reason.startswith("forward pass failed")


def test_a_finish_by_length_or_eos_leaves_the_batch_with_the_next_step_and_costs_no_extra_token(tokenizer):
    async def scenario(h: Harness) -> None:
        entries = [h.submit(max_new_tokens=n) for n in (3, 5, 8)]
        answers = await asyncio.gather(*(outcome(e) for e in entries))
        assert [a.generated_token_count for a in answers] == [3, 5, 8]
        # The step after the last token was sent already without these requests.
        assert [h.shards.generated[e.id] for e in entries] == [3, 5, 8]

    run_with_batcher(tokenizer, scenario, shards=FakeShards(step_delay=0.001))


def test_a_stop_sequence_ends_the_request_a_step_later_and_that_token_is_never_sent(tokenizer):
    async def scenario(h: Harness) -> None:
        entry = h.submit(max_new_tokens=20, stopping_sequence=expected_text(1, 3).split()[-1])
        answer = await outcome(entry)
        assert answer.stop_reason == fmaas.STOP_SEQUENCE
        assert answer.generated_token_count == 3
        assert answer.text == expected_text(1, 3)
        await asyncio.sleep(0.02)
        assert h.shards.generated[entry.id] == 4  # the step in flight made one more, discarded
        assert terminal_events(entry) == 0

    run_with_batcher(tokenizer, scenario, shards=FakeShards(step_delay=0.001))


def _preemptions() -> float:
    return REGISTRY.get_sample_value("tgi_request_preemptions_total") or 0.0


def test_a_full_cache_preempts_the_latest_request_which_resumes_with_every_token_unchanged(tokenizer):
    # 12 blocks of 4 tokens; each request needs 5 (6 prompt + 12 new tokens): 6 cannot all fit.
    shards = FakeShards(step_delay=0.0005, kv_cache=pb.KVCacheLayout(num_blocks=12, block_size=4))
    before = _preemptions()

    async def scenario(h: Harness) -> None:
        entries = [h.submit(words=6, max_new_tokens=12) for _ in range(6)]
        answers = await asyncio.gather(*(outcome(e) for e in entries))
        for entry, answer in zip(entries, answers, strict=True):
            assert answer.text == expected_text(entry.id, 12)
            assert answer.generated_token_count == 12
            assert terminal_events(entry) == 0
        while h.scheduler.running:
            await asyncio.sleep(0.001)
        assert h.scheduler.blocks.free == 12

    h = run_with_batcher(tokenizer, scenario, shards=shards)
    assert _preemptions() > before
    resumed = [r for step in h.shards.steps for r in step.joins if r.resumed_tokens]
    assert resumed  # ... and came back with the tokens they had generated in their prompt
    assert all(list(r.input_ids[6:]) == [token_at(r.id, i) for i in range(r.resumed_tokens)] for r in resumed)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_request_keeps_decoding(tokenizer):
    shards = FakeShards(step_delay=0.0005, kv_cache=pb.KVCacheLayout(num_blocks=64, block_size=4))

    async def scenario(h: Harness) -> None:
        running = h.submit(words=2, max_new_tokens=30)
        while h.shards.generated.get(running.id, 0) < 2:
            await asyncio.sleep(0.0005)
        long = h.submit(words=40, max_new_tokens=3)
        answers = await asyncio.gather(outcome(running), outcome(long))
        assert answers[0].text == expected_text(running.id, 30)
        assert answers[1].text == expected_text(long.id, 3)
        chunks = [
            step
            for step in h.shards.steps
            for rid, tokens in zip(step.request_ids, step.num_tokens, strict=True)
            if rid == long.id and tokens > 1
        ]
        assert len(chunks) == 6  # 40 prompt tokens, 7 a step beside one decode: 5 × 7 + 5
        for step in chunks:
            assert sum(step.num_tokens) <= 8
            assert running.id in step.request_ids  # the decode never waits

    run_with_batcher(tokenizer, scenario, shards=shards, max_batch_size=4, step_tokens=8)
