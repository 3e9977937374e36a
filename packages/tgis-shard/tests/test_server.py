"""The shard's gRPC servicer: a health ping never waits for the batch lock; a forward pass does."""

from __future__ import annotations

import threading

import grpc
import pytest

from tests.support.engines import cpu_engine
from tests.support.faults import FaultyEngine, out_of_memory
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_proto import shard_pb2 as pb
from tgis_shard.server import ShardServicer


class AbortingContext:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")


@pytest.fixture(scope="module")
def servicer(tmp_path_factory):
    model_dir = build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2")
    return ShardServicer(FaultyEngine(cpu_engine(model_dir)))


def _step(servicer: ShardServicer, joining: list[int] = (), decoding: list[int] = ()) -> pb.StepResponse:
    sequence = servicer.steps_sent = getattr(servicer, "steps_sent", -1) + 1
    joins = [pb.Request(id=r, input_ids=[5, 6, 7], max_new_tokens=4) for r in joining]
    request = pb.StepRequest(
        sequence=sequence,
        joins=joins,
        request_ids=[*joining, *decoding],
        num_tokens=[3] * len(joining) + [1] * len(decoding),
        new_block_counts=[0] * (len(joining) + len(decoding)),
    )
    return servicer.Step(request, AbortingContext())


def _health_in_thread(servicer: ShardServicer, forward: bool) -> threading.Thread:
    thread = threading.Thread(target=servicer.Health, args=(pb.HealthRequest(forward=forward), AbortingContext()))
    thread.start()
    return thread


def test_a_ping_answers_while_a_step_holds_the_lock_and_a_forward_pass_waits_for_it(servicer):
    with servicer.steps.lock:  # a long step is launching
        ping = _health_in_thread(servicer, forward=False)
        ping.join(timeout=30)
        assert not ping.is_alive()
        forward = _health_in_thread(servicer, forward=True)
        forward.join(timeout=0.5)
        assert forward.is_alive()
    forward.join(timeout=30)
    assert not forward.is_alive()


def test_a_failing_forward_pass_is_unavailable(servicer, monkeypatch):
    def broken() -> None:
        raise RuntimeError("non-finite logits")

    monkeypatch.setattr(servicer.engine, "health_check", broken)
    with pytest.raises(RuntimeError, match="UNAVAILABLE: forward pass failed: non-finite logits"):
        servicer.Health(pb.HealthRequest(forward=True), AbortingContext())
    servicer.Health(pb.HealthRequest(forward=False), AbortingContext())  # a ping still answers


def test_step_failures_reach_the_router_as_per_request_failures_or_status_codes(servicer):
    engine = servicer.engine
    engine.bad_requests = {12}
    response = _step(servicer, joining=[11, 12])
    assert list(response.request_ids) == [11]
    assert [(f.request_id, f.kind) for f in response.failures] == [(12, pb.FAILURE_INTERNAL)]
    engine.bad_requests = set()
    response = _step(servicer, joining=[11])
    assert [(f.request_id, f.kind) for f in response.failures] == [(11, pb.FAILURE_INTERNAL)]
    assert "request 11 is in the batch already" in response.failures[0].message
    with pytest.raises(RuntimeError, match="INTERNAL: step failed: requests \\[7\\] are not in the batch"):
        _step(servicer, decoding=[11, 7])
    assert len(servicer.steps) == 0
    _step(servicer, joining=[13, 14])
    engine.step_error = out_of_memory()
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED: step failed: CUDA out of memory"):
        _step(servicer, decoding=[13, 14])
    assert len(servicer.steps) == 0
    _step(servicer, joining=[15])
    engine.step_error = RuntimeError("a kernel failed")
    with pytest.raises(RuntimeError, match="INTERNAL: step failed: a kernel failed"):
        _step(servicer, decoding=[15])
    assert len(servicer.steps) == 0


def test_the_next_step_launches_while_a_steps_tokens_are_on_their_way(servicer):
    servicer.engine.hold_tokens = held = threading.Event()
    first: list[pb.StepResponse] = []
    waiting = threading.Thread(target=lambda: first.append(_step(servicer, joining=[41])))
    waiting.start()
    try:
        # Step 1 waits its turn behind step 0's launch only, not behind step 0's tokens.
        second: list[pb.StepResponse] = []
        following = threading.Thread(target=lambda: second.append(_step(servicer, decoding=[41])))
        following.start()
        following.join(timeout=30)
        assert not following.is_alive()
        assert waiting.is_alive()
        assert [list(r.request_ids) for r in second] == [[41]]
    finally:
        held.set()
        waiting.join(timeout=30)
    assert [list(r.request_ids) for r in first] == [[41]]
    servicer.Reset(pb.ResetRequest(), AbortingContext())


def test_a_failure_while_a_steps_tokens_are_awaited_fails_the_step_and_drops_every_request(servicer):
    _step(servicer, joining=[51, 52])
    servicer.engine.wait_error = RuntimeError("an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="INTERNAL: step failed: an illegal memory access"):
        _step(servicer, decoding=[51, 52])
    assert len(servicer.steps) == 0
    assert list(_step(servicer, joining=[51]).request_ids) == [51]
    servicer.Reset(pb.ResetRequest(), AbortingContext())


def test_reset_drops_every_request(servicer):
    _step(servicer, joining=[21, 22])
    servicer.Reset(pb.ResetRequest(), AbortingContext())
    assert len(servicer.steps) == 0
    assert list(_step(servicer, joining=[21]).request_ids) == [21]
    servicer.Reset(pb.ResetRequest(), AbortingContext())
