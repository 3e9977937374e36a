"""The shard's batches and their steps, with failures kept to the requests they concern.

- A prefill that fails for a multi-request batch is retried request by request: a request that
  fails alone (its prompt prefix, its parameters) is reported failed, the others form the batch.
  Out of memory fails the whole new batch at once: retrying would only run out again.
- A decode that runs out of memory right after batches joined drops the joiners (reported
  failed) and decodes the running requests again: engines leave a batch as it was when a
  decode raises (``Engine.decode``).
- Any other failure of a step fails the step (``StepFailed``) and drops every batch it named.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tgis_proto import shard_pb2 as pb
from tgis_shard.engines.base import BatchState, Engine, GeneratedToken

log = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """A device (CUDA) or host allocator out of memory."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def _kind(error: BaseException) -> int:
    return pb.FAILURE_OUT_OF_MEMORY if is_out_of_memory(error) else pb.FAILURE_INTERNAL


class StepFailed(Exception):
    """The whole step failed; every batch it named was dropped."""

    def __init__(self, message: str, out_of_memory: bool):
        super().__init__(message)
        self.out_of_memory = out_of_memory


class UnknownBatchError(Exception):
    """The router named a batch the shard does not hold."""


class BatchExistsError(Exception):
    """The router prefilled a batch under an id the shard already holds."""


@dataclass(frozen=True)
class StepResult:
    tokens: list[GeneratedToken]
    state: BatchState | None  # None: no request survived
    failures: list[pb.RequestFailure]


def _failures(request_ids: Sequence[int], error: BaseException, what: str) -> list[pb.RequestFailure]:
    message = f"{what} failed: {error}"
    return [pb.RequestFailure(request_id=rid, kind=_kind(error), message=message) for rid in request_ids]


class Batches:
    """The batch states by id, and the steps that change them; one step at a time (the caller locks)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._states: dict[int, BatchState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def prefill(self, batch: pb.Batch) -> StepResult:
        if batch.id in self._states:
            raise BatchExistsError(f"batch {batch.id} already exists")
        try:
            tokens, state = self.engine.prefill(batch)
        except Exception as e:
            log.exception("prefill of batch %d (%d requests) failed", batch.id, len(batch.requests))
            if len(batch.requests) == 1 or is_out_of_memory(e):
                return StepResult([], None, _failures([r.id for r in batch.requests], e, "prefill"))
            return self._prefill_one_by_one(batch)
        self._states[batch.id] = state
        return StepResult(tokens, state, [])

    def _prefill_one_by_one(self, batch: pb.Batch) -> StepResult:
        tokens: list[GeneratedToken] = []
        states: list[BatchState] = []
        failures: list[pb.RequestFailure] = []
        for request in batch.requests:
            try:
                first, state = self.engine.prefill(pb.Batch(id=batch.id, requests=[request]))
            except Exception as e:
                log.warning("request %d fails its prefill alone: %s", request.id, e)
                failures += _failures([request.id], e, "prefill")
                continue
            tokens += first
            states.append(state)
        if not states:
            return StepResult([], None, failures)
        try:
            merged = self.engine.concatenate(states)
        except Exception as e:
            for state in states:
                state.release()
            return StepResult([], None, _failures([r.id for r in batch.requests], e, "prefill"))
        merged.batch_id = batch.id
        self._states[batch.id] = merged
        return StepResult(tokens, merged, failures)

    def next_token(self, batch_id: int, merge_batch_ids: Sequence[int], drop_request_ids: Sequence[int]) -> StepResult:
        """Merges, prunes and decodes; the result's state keeps ``batch_id``."""
        batch_ids = [batch_id, *merge_batch_ids]
        missing = [b for b in batch_ids if b not in self._states]
        if missing:
            raise UnknownBatchError(f"unknown batch ids {missing}")
        states = [self._states.pop(b) for b in batch_ids]
        drop = set(drop_request_ids)
        try:
            kept = [s.filter([r for r in s.request_ids if r not in drop]) for s in states]
            running = kept[0].request_ids if kept[0] is not None else []
            alive = [s for s in kept if s is not None]
            if not alive:
                return StepResult([], None, [])
            state = self.engine.concatenate(alive)
        except Exception as e:
            # Concatenation hands blocks to the merged batch only once it succeeded: the parts
            # still own theirs here.
            for part in states:
                part.release()
            log.exception("merging into batch %d failed", batch_id)
            raise StepFailed(f"next token step failed: {e}", is_out_of_memory(e)) from e
        state.batch_id = batch_id
        still_running = set(running)
        joining = [rid for rid in state.request_ids if rid not in still_running]
        try:
            tokens = self.engine.decode(state)
            failures: list[pb.RequestFailure] = []
        except Exception as e:
            if not (is_out_of_memory(e) and running and joining):
                state.release()
                log.exception("next token step of batch %d failed", batch_id)
                raise StepFailed(f"next token step failed: {e}", is_out_of_memory(e)) from e
            log.warning("batch %d ran out of memory with %d joining requests; they fail", batch_id, len(joining))
            tokens, failures = self._decode_without(state, joining, e)
        self._states[batch_id] = state
        return StepResult(tokens, state, failures)

    def _decode_without(
        self, state: BatchState, joining: list[int], error: BaseException
    ) -> tuple[list[GeneratedToken], list[pb.RequestFailure]]:
        joining_set = set(joining)
        try:
            state.filter([rid for rid in state.request_ids if rid not in joining_set])
            tokens = self.engine.decode(state)
        except Exception as e:
            state.release()
            raise StepFailed(f"next token step failed: {e}", is_out_of_memory(e)) from e
        return tokens, _failures(joining, error, "joining the batch")

    def clear(self, batch_id: int | None) -> None:
        """Drops one batch (if held), or all when ``batch_id`` is None."""
        if batch_id is None:
            dropped, self._states = list(self._states.values()), {}
        else:
            dropped = [self._states.pop(batch_id)] if batch_id in self._states else []
        for state in dropped:
            state.release()
