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


def _prefill(servicer: ShardServicer, batch_id: int, request_ids: list[int]) -> pb.StepResponse:
    requests = [pb.Request(id=r, input_ids=[5, 6, 7], max_new_tokens=4) for r in request_ids]
    return servicer.Prefill(pb.PrefillRequest(batch=pb.Batch(id=batch_id, requests=requests)), AbortingContext())


def _health_in_thread(servicer: ShardServicer, forward: bool) -> threading.Thread:
    thread = threading.Thread(target=servicer.Health, args=(pb.HealthRequest(forward=forward), AbortingContext()))
    thread.start()
    return thread


def test_a_ping_answers_while_a_step_holds_the_lock_and_a_forward_pass_waits_for_it(servicer):
    with servicer._lock:  # a long step is running
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
    response = _prefill(servicer, 1, [11, 12])
    assert [g.request_id for g in response.generations] == [11]
    assert [(f.request_id, f.kind) for f in response.failures] == [(12, pb.FAILURE_INTERNAL)]
    assert response.batch_id == 1
    with pytest.raises(RuntimeError, match="ALREADY_EXISTS"):
        _prefill(servicer, 1, [13])
    with pytest.raises(RuntimeError, match="NOT_FOUND: unknown batch ids \\[7\\]"):
        servicer.NextToken(pb.NextTokenRequest(batch_id=1, merge_batch_ids=[7]), AbortingContext())
    engine.decode_error = out_of_memory()
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED: next token step failed: CUDA out of memory"):
        servicer.NextToken(pb.NextTokenRequest(batch_id=1), AbortingContext())
    assert len(servicer.batches) == 0
    _prefill(servicer, 2, [14])
    engine.decode_error = RuntimeError("a kernel failed")
    with pytest.raises(RuntimeError, match="INTERNAL: next token step failed: a kernel failed"):
        servicer.NextToken(pb.NextTokenRequest(batch_id=2), AbortingContext())
    engine.bad_requests = set()
