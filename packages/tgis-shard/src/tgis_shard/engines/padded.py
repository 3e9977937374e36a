"""Engines whose batches pad every request to the longest one (hf_transformers causal and
seq2seq), under the step protocol.

Such a batch cannot take a prompt in chunks or decode only some of its rows, so a step
prefills the requests that joined as a batch of their own and decodes every row of the running
batch; the new batch is merged into the running one at the start of the next step (a merge
that fails then has decoded nothing, and a step that fails leaves the batch as it was).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence

import torch

from tgis_proto import shard_pb2 as pb
from tgis_shard.engines import kv_cache
from tgis_shard.engines.base import BatchLost, Engine, ScheduledWork
from tgis_shard.sampler import Choice, GeneratedToken, Sampler


class BatchState(ABC):
    """The tensors of requests decoding together, row by row."""

    ids: list[int]  # the batch's request ids, in row order

    @property
    def request_ids(self) -> list[int]:
        return list(self.ids)

    def filter(self, keep_request_ids: Collection[int]) -> BatchState | None:
        """Keeps the listed requests (in this batch's order); None when none remain."""
        keep = set(keep_request_ids)
        rows = [row for row, rid in enumerate(self.ids) if rid in keep]
        if len(rows) == len(self.ids):
            return self
        if not rows:
            return None
        self._keep_rows(rows)
        return self

    @abstractmethod
    def _keep_rows(self, rows: list[int]) -> None:
        """Drops every row but ``rows`` (a non-empty, proper subset, in batch order), in place."""


class PaddedEngine(Engine):
    """The step protocol over a padded engine's batch mechanics: ``prefill``, ``concatenate``,
    ``decode``. Every request has a slot in ``sampler`` from its join to its leave."""

    chunked_prefill = False
    sampler: Sampler
    # Positions each row's (self-attention) cache holds beyond its length, so that decode steps
    # append in place (kv_cache.RoomyLayer); the memory model reports them to the router.
    cache_room_tokens = kv_cache.CACHE_ROOM_TOKENS

    def __init__(self) -> None:
        self._joining: dict[int, pb.Request] = {}  # joined, not prefilled yet
        self._running: BatchState | None = None
        self._prefilled: BatchState | None = None  # prefilled by the last step, merged by the next

    @property
    def batch(self) -> BatchState | None:
        """The running batch: every request that has its first token, as of the last step."""
        return self._running

    @property
    def prefilled_batch(self) -> BatchState | None:
        """The requests the last step prefilled; the next step merges them into ``batch``."""
        return self._prefilled

    @abstractmethod
    def prefill(self, requests: Sequence[pb.Request]) -> tuple[list[GeneratedToken], BatchState, Choice]:
        """Runs the prompts of new requests as a batch of their own; the first tokens are chosen
        but not committed (the step commits them once it succeeded)."""

    @abstractmethod
    def concatenate(self, states: Sequence[BatchState]) -> BatchState:
        """Merges batches into one (reusing the first)."""

    @abstractmethod
    def decode(self, state: BatchState) -> list[GeneratedToken]:
        """Decodes one more token for every row, in place; when it raises, the batch is as it was."""

    @abstractmethod
    def history(self, request: pb.Request) -> Sequence[int]:
        """The tokens a request's repetition penalty covers from the start."""

    def join(self, request: pb.Request) -> None:
        if request.prefix_id:
            self.prompt_prefix(request.prefix_id)  # an unusable prefix fails the request here
        self.sampler.add(request, self.history(request))
        self._joining[request.id] = request

    # Steps and leaves run under inference mode as a whole: the batch's tensors are all made there
    # (a compiled forward pass, PT2_COMPILE, would otherwise meet two kinds of input tensor).
    @torch.inference_mode()
    def leave(self, request_ids: Collection[int]) -> None:
        gone = set(request_ids)
        for rid in gone:
            self._joining.pop(rid, None)
            self.sampler.remove(rid)
        keep = [rid for rid in self.request_ids() if rid not in gone]
        self._running = self._running.filter(keep) if self._running is not None else None
        self._prefilled = self._prefilled.filter(keep) if self._prefilled is not None else None

    def request_ids(self) -> list[int]:
        batches = [b for b in (self._running, self._prefilled) if b is not None]
        return [*self._joining, *(rid for b in batches for rid in b.ids)]

    @torch.inference_mode()
    def step(self, work: Sequence[ScheduledWork]) -> list[GeneratedToken]:
        if self._prefilled is not None:
            try:
                merged = (
                    self._prefilled if self._running is None else self.concatenate([self._running, self._prefilled])
                )
            except Exception as e:
                # Concatenation grows the running batch's cache layer by layer: half-merged, it is lost.
                self.reset()
                raise BatchLost(f"merging new requests into the batch failed: {e}") from e
            self._running, self._prefilled = merged, None
        scheduled = [w.request_id for w in work]
        new = [self._joining[rid] for rid in scheduled if rid in self._joining]
        decoding = {rid for rid in scheduled if rid not in self._joining}
        running = set(self._running.ids) if self._running is not None else set()
        if decoding and decoding != running:
            raise ValueError(
                f"a padded batch decodes all of its requests or none: {sorted(decoding)} scheduled, "
                f"{sorted(running)} held"
            )
        tokens: list[GeneratedToken] = []
        prefilled = choice = None
        if new:
            tokens, prefilled, choice = self.prefill(new)
        if decoding:
            tokens = tokens + self.decode(self._running)  # type: ignore[arg-type]
        if choice is not None:
            choice.commit()
        for request in new:
            del self._joining[request.id]
        self._prefilled = prefilled
        return tokens
