"""A scripted stand-in for the shards (ShardClient's interface), for the router's glue tests.

Tokens are a function of (request id, position), so every answer can be checked; faults are
injected per call by ``on_prefill`` / ``on_next_token`` hooks, which may raise (an RPC error)
or return request ids to report failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tokenizers import Tokenizer, models, pre_tokenizers

from tgis_proto import shard_pb2 as pb

EOS_ID = 1
WORDS = [f"w{i}" for i in range(64)]
FIRST_WORD_ID = 4  # after <pad>, </s>, <s>, <unk>


def save_word_tokenizer(path: Path) -> Path:
    """A whitespace word-level tokenizer over ``WORDS`` (ids from 4) that adds no special tokens."""
    vocab = {"<pad>": 0, "</s>": EOS_ID, "<s>": 2, "<unk>": 3}
    vocab.update({w: FIRST_WORD_ID + i for i, w in enumerate(WORDS)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<pad>", "</s>", "<s>", "<unk>"])
    tokenizer.save(str(path))
    return path


def token_at(request_id: int, position: int) -> int:
    """The fake model's choice for the ``position``-th generated token (0-based) of a request."""
    return FIRST_WORD_ID + (request_id * 7 + position) % len(WORDS)


def expected_text(request_id: int, tokens: int) -> str:
    """The text of a request's first ``tokens`` tokens, decoded after a prompt of words."""
    return "".join(f" {WORDS[token_at(request_id, i) - FIRST_WORD_ID]}" for i in range(tokens))


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


Hook = Callable[[list[int]], Sequence[int] | None]


@dataclass
class FakeShards:
    """Holds batches as lists of request ids; ``step_delay`` simulates the device's time."""

    step_delay: float = 0.0
    on_prefill: Hook | None = None  # gets the batch's request ids
    on_next_token: Hook | None = None  # gets the merged batch's request ids
    batches: dict[int, list[int]] = field(default_factory=dict)
    generated: dict[int, int] = field(default_factory=dict)
    prefilled: list[int] = field(default_factory=list)  # request ids, in the order prefilled
    cleared: list[int | None] = field(default_factory=list)
    health_calls: list[bool] = field(default_factory=list)
    health_error: grpc.aio.AioRpcError | None = None

    def _generations(self, request_ids: Sequence[int]) -> list[pb.Generation]:
        generations = []
        for rid in request_ids:
            position = self.generated.get(rid, 0)
            self.generated[rid] = position + 1
            generations.append(pb.Generation(request_id=rid, token=pb.Token(id=token_at(rid, position))))
        return generations

    @staticmethod
    def _failures(failed: Sequence[int] | None) -> list[pb.RequestFailure]:
        return [pb.RequestFailure(request_id=r, kind=pb.FAILURE_OUT_OF_MEMORY, message="oom") for r in failed or ()]

    def __post_init__(self) -> None:
        self._lock = asyncio.Lock()  # a shard runs one batch operation at a time

    async def prefill(self, batch: pb.Batch) -> pb.StepResponse:
        async with self._lock:
            return await self._prefill(batch)

    async def next_token(
        self, batch_id: int, merge_batch_ids: Sequence[int], drop_request_ids: Sequence[int]
    ) -> pb.StepResponse:
        async with self._lock:
            return await self._next_token(batch_id, merge_batch_ids, drop_request_ids)

    async def _prefill(self, batch: pb.Batch) -> pb.StepResponse:
        await asyncio.sleep(self.step_delay)
        ids = [r.id for r in batch.requests]
        failed = set(self.on_prefill(ids) or ()) if self.on_prefill else set()
        kept = [r for r in ids if r not in failed]
        self.prefilled += kept
        if kept:
            self.batches[batch.id] = kept
        return pb.StepResponse(
            generations=self._generations(kept), batch_id=batch.id if kept else 0, failures=self._failures(failed)
        )

    async def _next_token(
        self, batch_id: int, merge_batch_ids: Sequence[int], drop_request_ids: Sequence[int]
    ) -> pb.StepResponse:
        await asyncio.sleep(self.step_delay)
        missing = [b for b in [batch_id, *merge_batch_ids] if b not in self.batches]
        if missing:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"unknown batch ids {missing}")
        ids = [r for b in [batch_id, *merge_batch_ids] for r in self.batches.pop(b)]
        ids = [r for r in ids if r not in set(drop_request_ids)]
        failed = set(self.on_next_token(ids) or ()) if self.on_next_token else set()
        ids = [r for r in ids if r not in failed]
        if ids:
            self.batches[batch_id] = ids
        return pb.StepResponse(
            generations=self._generations(ids), batch_id=batch_id if ids else 0, failures=self._failures(failed)
        )

    async def clear_cache(self, batch_id: int | None = None) -> None:
        async with self._lock:
            self._clear(batch_id)

    def _clear(self, batch_id: int | None) -> None:
        self.cleared.append(batch_id)
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

    async def health(self, forward: bool, timeout: float | None = None) -> None:
        self.health_calls.append(forward)
        if self.health_error is not None:
            raise self.health_error

    def held_request_ids(self) -> set[int]:
        return {r for ids in self.batches.values() for r in ids}
