"""A scripted stand-in for the shards (ShardClient's interface), for the router's glue tests.

Tokens are a function of (request id, output position), so every answer can be checked, also
after a preemption. The fake keeps the persistent batch and checks the router's half of the step
protocol as a shard relies on it: joins of new ids only, work for held requests only, prompt
chunks within the prompt, one token per decode, and (with a KV cache) blocks that cover every
token and belong to one request at a time. Faults are injected per step by ``on_join`` /
``on_step`` hooks, which may raise (an RPC error) or return request ids to report failed.
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


class ProtocolError(AssertionError):
    """The router broke the step protocol (also kept in ``FakeShards.violations``: the batcher
    turns the exception into failed requests)."""


@dataclass
class Held:
    """A request in the fake's batch."""

    prompt_length: int
    position: int  # output position of its next token
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    input_ids: tuple[int, ...] = ()


@dataclass
class FakeShards:
    """``step_delay`` simulates the device's time; ``kv_cache`` makes it a paged engine."""

    step_delay: float = 0.0
    on_join: Hook | None = None  # gets the joining request ids
    on_step: Hook | None = None  # gets the scheduled request ids
    kv_cache: pb.KVCacheLayout | None = None
    tokens: Callable[[int, int], int] = token_at  # the token of (request id, output position)
    requests: dict[int, Held] = field(default_factory=dict)
    generated: dict[int, int] = field(default_factory=dict)  # tokens made per request, discarded ones too
    prefilled: list[int] = field(default_factory=list)  # request ids, in the order they first joined
    steps: list[pb.StepRequest] = field(default_factory=list)
    record_steps: bool = True
    check_protocol: bool = True  # a bench turns it off: the checks are not the router's cost
    resets: int = 0
    health_calls: list[bool] = field(default_factory=list)
    health_error: grpc.aio.AioRpcError | None = None
    violations: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = asyncio.Lock()  # a shard runs one batch operation at a time, in call order
        self._block_owner: dict[int, int] = {}
        self._dropped: set[int] = set()  # failed requests, until the router lets them leave
        self._failed = False  # a step failed: the shard holds nothing until the router resets it

    @staticmethod
    def _failures(failed: Sequence[int] | None) -> list[pb.RequestFailure]:
        return [pb.RequestFailure(request_id=r, kind=pb.FAILURE_OUT_OF_MEMORY, message="oom") for r in failed or ()]

    async def step(self, request: pb.StepRequest) -> pb.StepResponse:
        async with self._lock:
            return await self._run(request)

    async def _run(self, request: pb.StepRequest) -> pb.StepResponse:
        """One step, from when the shard starts it to when it answers."""
        await asyncio.sleep(self.step_delay)
        if self.record_steps:
            self.steps.append(request)
        if self._failed:
            # As a real shard that dropped every request: the steps sent before the router knew
            # name requests it no longer holds, and fail too.
            raise rpc_error(grpc.StatusCode.INTERNAL, "step failed: requests are not in the batch")
        try:
            return self._step(request)
        except ProtocolError as e:
            self.violations.append(str(e))
            raise
        except grpc.aio.AioRpcError:
            self._failed = True
            self._forget_all()
            raise

    def _drop(self, rid: int) -> None:
        held = self.requests.pop(rid, None)
        for block in held.blocks if held is not None else ():
            del self._block_owner[block]

    def _step(self, request: pb.StepRequest) -> pb.StepResponse:
        for rid in request.leaves:
            self._drop(rid)
            self._dropped.discard(rid)
        joining = [r.id for r in request.joins]
        failed = set(self.on_join(joining) or ()) if self.on_join and joining else set()
        for r in request.joins:
            if r.id in self.requests:
                raise ProtocolError(f"request {r.id} joined twice")
            if r.id not in failed:
                if r.id not in self.prefilled:
                    self.prefilled.append(r.id)
                self.requests[r.id] = Held(len(r.input_ids), r.resumed_tokens, input_ids=tuple(r.input_ids))
        scheduled = [rid for rid in request.request_ids if rid not in failed]
        failed |= set(self.on_step(scheduled) or ()) if self.on_step and scheduled else set()
        done: list[int] = []
        tokens: list[int] = []
        blocks = iter(request.new_block_ids)
        for rid, num_tokens, block_count in zip(
            request.request_ids, request.num_tokens, request.new_block_counts, strict=True
        ):
            new_blocks = [next(blocks) for _ in range(block_count)]
            if rid in failed or rid in self._dropped:
                continue
            held = self.requests.get(rid)
            if held is None:
                raise ProtocolError(f"request {rid} scheduled but not in the batch")
            if self.check_protocol:
                self._check(rid, num_tokens, new_blocks, held)
            held.computed += num_tokens
            if held.computed >= held.prompt_length:
                self.generated[rid] = self.generated.get(rid, 0) + 1
                done.append(rid)
                tokens.append(self.tokens(rid, held.position))
                held.position += 1
        for rid in failed:
            self._drop(rid)
        self._dropped |= failed
        return pb.StepResponse(request_ids=done, token_ids=tokens, failures=self._failures(sorted(failed)))

    def _check(self, rid: int, tokens: int, new_blocks: list[int], held: Held) -> None:
        left = held.prompt_length - held.computed
        if (left > 0 and not 0 < tokens <= left) or (left <= 0 and tokens != 1):
            raise ProtocolError(f"request {rid}: {tokens} tokens scheduled with {left} prompt tokens left")
        if self.kv_cache is None:
            if new_blocks:
                raise ProtocolError(f"request {rid} got blocks from a padded engine's router")
            return
        for block in new_blocks:
            if not 1 <= block <= self.kv_cache.num_blocks or block in self._block_owner:
                raise ProtocolError(f"request {rid} got block {block}, held by {self._block_owner.get(block)}")
            self._block_owner[block] = rid
        held.blocks += new_blocks
        if len(held.blocks) * self.kv_cache.block_size < held.computed + tokens:
            raise ProtocolError(f"request {rid}: {len(held.blocks)} blocks for {held.computed + tokens} tokens")

    async def reset(self) -> None:
        async with self._lock:
            self.resets += 1
            self._forget_all()
            self._failed = False

    def _forget_all(self) -> None:
        self.requests.clear()
        self._block_owner.clear()
        self._dropped.clear()

    async def health(self, forward: bool, timeout: float | None = None) -> None:
        self.health_calls.append(forward)
        if self.health_error is not None:
            raise self.health_error

    def held_request_ids(self) -> set[int]:
        return set(self.requests)
