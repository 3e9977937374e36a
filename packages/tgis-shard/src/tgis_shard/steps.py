"""The shard's half of the step pipeline: applies the router's steps to the engine's persistent
batch, with failures kept to the requests they concern.

- A request that cannot join (its prompt prefix, its parameters) fails alone.
- A step that runs out of memory drops the requests whose prompts it processed, or else those
  in their first decode (the first step over a batch they grew), and runs again without them.
  Engines leave the batch as it was when a step raises (``Engine.step``).
- A step that fails otherwise while prompts are being processed runs again without them, then
  each prompt alone: a request whose prompt fails alone fails, the others go on.
- Any other failure, or one that loses the batch (``BatchLost``), fails the step (``StepFailed``):
  the engine drops every request. So does a failure while a launched step's tokens are awaited
  (the device failed under a batch that had moved on already).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

from tgis_proto import shard_pb2 as pb
from tgis_shard.engines.base import BatchLost, Engine, PendingStep, ScheduledWork
from tgis_shard.sampler import GeneratedToken

log = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """A device (CUDA) or host allocator out of memory."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


class StepFailed(Exception):
    """The whole step failed; the shard holds no request any more."""

    def __init__(self, message: str, out_of_memory: bool):
        super().__init__(message)
        self.out_of_memory = out_of_memory


@dataclass(frozen=True)
class StepOutcome:
    tokens: list[GeneratedToken]
    failures: list[pb.RequestFailure]


def _failures(request_ids: Sequence[int], error: BaseException, what: str) -> list[pb.RequestFailure]:
    kind = pb.FAILURE_OUT_OF_MEMORY if is_out_of_memory(error) else pb.FAILURE_INTERNAL
    message = f"{what} failed: {error}"
    return [pb.RequestFailure(request_id=rid, kind=kind, message=message) for rid in request_ids]


def scheduled_work(request: pb.StepRequest) -> list[ScheduledWork]:
    """The step's work, from the request's parallel arrays."""
    blocks = list(request.new_block_ids)
    work, start = [], 0
    for rid, tokens, count in zip(request.request_ids, request.num_tokens, request.new_block_counts, strict=True):
        work.append(ScheduledWork(rid, tokens, tuple(blocks[start : start + count])))
        start += count
    return work


class StepRunner:
    """Runs the router's steps on one engine, one at a time: ``launch`` a step (under ``lock``,
    in the router's order), then its returned ``finish`` waits for the tokens, while the next
    step may launch already (``Engine.launch``)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        # Held while the batch changes: a launch, a reset, a health check's forward pass.
        self.lock = threading.RLock()
        self._tokens_out: dict[int, int] = {}  # tokens each request has been sent or has on the way
        # Requests a failure dropped: steps the router sent before it knew still name them, and
        # their work is skipped until the router lets them leave.
        self._dropped: set[int] = set()

    def __len__(self) -> int:
        return len(self.engine.request_ids())

    def step(self, request: pb.StepRequest) -> StepOutcome:
        return self.launch(request)()

    def launch(self, request: pb.StepRequest) -> Callable[[], StepOutcome]:
        """Applies the step to the batch and queues its work; the result waits for its tokens."""
        with self.lock:
            return self._launch(request)

    def _launch(self, request: pb.StepRequest) -> Callable[[], StepOutcome]:
        self.engine.leave(request.leaves)
        for rid in request.leaves:
            self._tokens_out.pop(rid, None)
            self._dropped.discard(rid)
        failures: list[pb.RequestFailure] = []
        for joining in request.joins:
            try:
                self.engine.join(joining)
            except Exception as e:
                log.warning("request %d cannot join the batch: %s", joining.id, e)
                failures += _failures([joining.id], e, "prefill")
                continue
            self._tokens_out[joining.id] = 0
        failed = {f.request_id for f in failures}
        work = [w for w in scheduled_work(request) if w.request_id not in failed and w.request_id not in self._dropped]
        unknown = [w.request_id for w in work if w.request_id not in self._tokens_out]
        if unknown:
            self._fail_step(ValueError(f"requests {unknown} are not in the batch"))
        try:
            pending = self.engine.launch(work)
        except Exception as e:
            log.exception("a step of %d requests failed", len(work))
            tokens, isolated = self._isolate(work, e)
            failures += isolated
            pending = PendingStep.done(tokens)
        # Counted at launch: the next step's failure isolation tells prompts from decodes by it.
        for rid in pending.request_ids:
            self._tokens_out[rid] = self._tokens_out.get(rid, 0) + 1
        self._dropped.update(f.request_id for f in failures)

        def finish() -> StepOutcome:
            try:
                tokens = pending.wait()
            except Exception as e:
                log.exception("a step of %d requests failed on the device", len(work))
                self._fail_step(e)
            return StepOutcome(tokens, failures)

        return finish

    def reset(self) -> None:
        with self.lock:  # re-entrant: a failing launch resets under it already
            self.engine.reset()
            self._tokens_out.clear()
            self._dropped.clear()

    def _isolate(
        self, work: list[ScheduledWork], error: BaseException
    ) -> tuple[list[GeneratedToken], list[pb.RequestFailure]]:
        """Runs what can still run after a failed step; the requests to blame fail."""
        if isinstance(error, BatchLost):
            self._fail_step(error)
        out_of_memory = is_out_of_memory(error)
        received = {w.request_id: self._tokens_out.get(w.request_id, 0) for w in work}
        # A prompt is to blame first; out of memory, also the first step over a grown batch.
        suspects = [w for w in work if received[w.request_id] == 0]
        if out_of_memory and not suspects:
            suspects = [w for w in work if received[w.request_id] == 1]
            if len(suspects) == len(work):
                suspects = []  # the batch as a whole does not fit
        if not suspects:
            self._fail_step(error)
        rest = [w for w in work if w not in suspects]
        tokens: list[GeneratedToken] = []
        failures: list[pb.RequestFailure] = []
        if out_of_memory:
            # Retrying them would only run out again.
            self.engine.leave([w.request_id for w in suspects])
            failures += _failures([w.request_id for w in suspects], error, "joining the batch")
            suspects = []
        if rest:
            try:
                tokens += self.engine.step(rest)
            except Exception as e:
                log.exception("the step failed again without %d joining requests", len(work) - len(rest))
                self._fail_step(e)
        for alone in suspects:
            try:
                tokens += self.engine.step([alone])
            except Exception as e:
                log.warning("request %d fails its prompt alone: %s", alone.request_id, e)
                self.engine.leave([alone.request_id])
                failures += _failures([alone.request_id], e, "prefill")
        for failure in failures:
            self._tokens_out.pop(failure.request_id, None)
        return tokens, failures

    def _fail_step(self, error: BaseException) -> NoReturn:
        self.reset()
        raise StepFailed(f"step failed: {error}", is_out_of_memory(error)) from error
