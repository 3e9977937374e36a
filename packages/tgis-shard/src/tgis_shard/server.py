"""The shard's gRPC server: the router's steps on the engine's batch (``StepRunner``), one at a time."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc

from tgis_proto import shard_pb2 as pb
from tgis_proto import shard_pb2_grpc as pb_grpc
from tgis_proto.runtime import freeze_startup_heap
from tgis_shard.engines.base import Engine
from tgis_shard.prefixes import InvalidPrefixError, PrefixesUnsupportedError, PrefixNotFoundError
from tgis_shard.sampler import GeneratedToken
from tgis_shard.steps import StepFailed, StepRunner

log = logging.getLogger(__name__)

# How long a step that arrived early waits for the steps numbered before it; one that never comes
# (a call lost with its connection) must not hold the shard forever.
STEP_ORDER_TIMEOUT_S = 60.0


class StepOutOfOrderError(Exception):
    """A step's predecessors never came, or it came after its turn."""


def _step_response(tokens: Sequence[GeneratedToken], failures: Sequence[pb.RequestFailure]) -> pb.StepResponse:
    """Token ids as packed arrays; details only for the tokens that carry some."""
    return pb.StepResponse(
        request_ids=[t.request_id for t in tokens],
        token_ids=[t.token_id for t in tokens],
        details=[
            pb.Generation(
                request_id=t.request_id,
                token=pb.Token(
                    id=t.token_id,
                    logprob=t.logprob,
                    rank=t.rank,
                    top_tokens=[pb.TopToken(id=i, logprob=lp) for i, lp in t.top_tokens],
                ),
                input_tokens=t.input_tokens,
            )
            for t in tokens
            if t.rank or t.input_tokens  # a rank is 1 or more wherever details were computed
        ],
        failures=failures,
    )


class StepOrder:
    """Steps in the order of their sequence numbers: one that arrives early (the router sends the
    next step while the last one runs) waits for its turn. Every rank runs the same order."""

    def __init__(self, timeout_s: float = STEP_ORDER_TIMEOUT_S):
        self._next = 0
        self._timeout_s = timeout_s
        self._turn = threading.Condition()

    @contextmanager
    def turn(self, sequence: int) -> Iterator[None]:
        """Runs the body when every step numbered below ``sequence`` has run."""
        with self._turn:
            arrived = self._turn.wait_for(lambda: self._next >= sequence, self._timeout_s)
        try:
            if not arrived:
                raise StepOutOfOrderError(f"step {sequence} waited {self._timeout_s:.0f} s for step {self._next}")
            if self._next > sequence:
                raise StepOutOfOrderError(f"step {sequence} arrived after step {self._next - 1} ran")
            yield
        finally:
            with self._turn:
                self._next = max(self._next, sequence + 1)
                self._turn.notify_all()


class ShardServicer(pb_grpc.ShardServiceServicer):
    """Runs one batch operation at a time (a step's launch, a reset, a health check's forward pass:
    ``StepRunner.lock``); a step waits for its tokens outside it, so the next one launches meanwhile."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.steps = StepRunner(engine)
        self._order = StepOrder()
        self._info = engine.info()
        engine.warm_up()
        # Measured once, before any batch exists: it runs a prefill of its own on a GPU.
        memory_model = engine.memory_model()
        if memory_model is not None:
            self._info.memory.CopyFrom(memory_model)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        return self._info

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        # A ping answers without the lock: a long step must not fail a liveness probe.
        if request.forward:
            with self.steps.lock:
                try:
                    self.engine.health_check()
                except Exception as e:
                    log.exception("health check failed")
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"forward pass failed: {e}")
        return pb.HealthResponse()

    def Step(self, request: pb.StepRequest, context: grpc.ServicerContext) -> pb.StepResponse:
        try:
            with self._order.turn(request.sequence):
                started = time.monotonic()
                finish = self.steps.launch(request)
            # The next step launches while this one's tokens are on their way.
            outcome = finish()
            forward_seconds = time.monotonic() - started
        except StepOutOfOrderError as e:
            context.abort(grpc.StatusCode.INTERNAL, str(e))
        except StepFailed as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.out_of_memory else grpc.StatusCode.INTERNAL
            context.abort(code, str(e))
        response = _step_response(outcome.tokens, outcome.failures)
        response.forward_seconds = forward_seconds
        return response

    def PrefixLookup(self, request: pb.PrefixLookupRequest, context: grpc.ServicerContext) -> pb.PrefixLookupResponse:
        # Not under the batch lock: loading a file must not wait for (or hold up) a step.
        try:
            prefix = self.engine.prompt_prefix(request.prefix_id)
        except PrefixNotFoundError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except InvalidPrefixError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except PrefixesUnsupportedError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.PrefixLookupResponse(prefix_length=prefix.length)

    def Reset(self, request: pb.ResetRequest, context: grpc.ServicerContext) -> pb.ResetResponse:
        self.steps.reset()
        return pb.ResetResponse()


def serve(engine: Engine, uds_path: Path) -> None:
    """Serves until SIGTERM/SIGINT; removes a stale socket file first."""
    if uds_path.exists():
        os.unlink(uds_path)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    pb_grpc.add_ShardServiceServicer_to_server(ShardServicer(engine), server)
    freeze_startup_heap("shard")  # loaded, warmed up, measured: what stays from here on is the model
    server.add_insecure_port(f"unix://{uds_path}")
    stopped = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        log.info("signal %d: shard stopping", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    server.start()
    log.info("shard serving on unix://%s", uds_path)
    stopped.wait()
    server.stop(grace=2).wait()
