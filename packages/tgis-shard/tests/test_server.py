"""The shard's gRPC servicer: a health ping never waits for the batch lock; a forward pass does."""

from __future__ import annotations

import threading

import grpc
import pytest

from tests.support.engines import cpu_engine
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_proto import shard_pb2 as pb
from tgis_shard.server import ShardServicer


class AbortingContext:
    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")


@pytest.fixture(scope="module")
def servicer(tmp_path_factory):
    return ShardServicer(cpu_engine(build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2")))


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
