"""Engines whose batches pad every request to the longest one (hf_transformers causal and
seq2seq), under the step protocol.

Such a batch cannot take a prompt in chunks or decode only some of its rows, so a step
prefills the requests that joined as a batch of their own and decodes every row of the running
batch; the new batch is merged into the running one at the start of the next step (a merge
that fails then has decoded nothing, and a step that fails leaves the batch as it was).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from tgis_proto import shard_pb2 as pb
from tgis_shard import pt2
from tgis_shard.engines import kv_cache
from tgis_shard.engines.base import BatchLost, Engine, ScheduledWork, ShardContext
from tgis_shard.progress import progress
from tgis_shard.sampler import Choice, GeneratedToken, Sampler

log = logging.getLogger(__name__)


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


def kept_columns(used: int, width: int) -> int:
    """Columns a batch keeps of ``width`` when rows leave: the ``used`` ones that real tokens of the
    remaining rows occupy, and never fewer than two where there were two: a compiled pass
    (PT2_COMPILE) specialises sizes of 1, and a padding column costs next to nothing."""
    return min(width, max(used, 2))


class PaddedEngine(Engine):
    """The step protocol over a padded engine's batch mechanics: ``prefill``, ``concatenate``,
    ``decode``. Every request has a slot in ``sampler`` from its join to its leave."""

    chunked_prefill = False
    pt2_compile = True
    ctx: ShardContext
    sampler: Sampler
    # Positions each row's (self-attention) cache holds beyond its length, so that decode steps
    # append in place (kv_cache.RoomyLayer); the memory model reports them to the router.
    cache_room_tokens = kv_cache.CACHE_ROOM_TOKENS

    def __init__(self) -> None:
        self._joining: dict[int, pb.Request] = {}  # joined, not prefilled yet
        self._running: BatchState | None = None
        self._prefilled: BatchState | None = None  # prefilled by the last step, merged by the next

    @property
    def compiles(self) -> bool:
        """The model's forward pass runs through torch.compile (PT2_COMPILE, where the engine can)."""
        return self.ctx.pt2_compile and self.pt2_compile

    def compiled(self, forward: Callable[..., Any]) -> Callable[..., Any] | None:
        """``forward`` compiled when the engine compiles (``warm_up`` then compiles every kind of
        step); None otherwise."""
        return pt2.compile_model_forward(forward) if self.compiles else None

    @property
    def min_width(self) -> int:
        """The fewest columns a new batch's rows have: compiled, a one-token row would be a kind of
        step of its own (torch specialises sizes of 1), so it gets a padding column instead."""
        return 2 if self.compiles else 1

    def warm_up(self) -> None:
        """PT2_COMPILE: compiles the forward pass for every kind of step before requests wait for
        it: a prefill and a decode of one row and of several (torch specialises sizes of 1). A
        decode's cache has its room made before the pass (``kv_cache.reserve``), so growing it or
        rebuilding it after requests joined or left is no kind of step of its own, nor are
        one-token rows (``min_width``) or input-token details (a tensor of logits' positions)."""
        if not self.compiles:
            return
        started = time.monotonic()
        batches = progress(2, "PT2_COMPILE warm-up, kinds of step compiled", "batches", iterable=([3], [3, 5]))
        for lengths in batches:
            self.run_synthetic(lengths, decode_steps=2)
        log.info("PT2_COMPILE: the forward pass compiled for each kind of step in %.1f s", time.monotonic() - started)

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
