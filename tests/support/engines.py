"""Driving a shard engine directly in tests: context, requests, and a stand-in for the router."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tgis_proto import shard_pb2 as pb
from tgis_proto.plugins import resolve
from tgis_shard.engines.base import Engine, ShardContext, UnsupportedModelError
from tgis_shard.layers.flashinfer_paged import flashinfer_available
from tgis_shard.registry import shard_registry
from tgis_shard.sampler import GeneratedToken
from tgis_shard.steps import StepRunner

# Prompts of different lengths (one a single token), shared by the engine tests.
PROMPTS = ["Hello there, general", "A", "The quick brown fox jumps over the lazy dog and then"]
NEW_TOKENS = 8
# FlashInfer's cases (half precision on a GPU) where it is installed.
NEEDS_FLASHINFER = pytest.mark.skipif(not flashinfer_available(), reason="needs flashinfer")


def cpu_context(model_dir: Path, **overrides: object) -> ShardContext:
    """One rank of one on the CPU in float32, for a model in ``model_dir``."""
    settings: dict[str, object] = {
        "model_dir": model_dir,
        "model_type": "test",
        "dtype": torch.float32,
        "device": torch.device("cpu"),
        "rank": 0,
        "world_size": 1,
        "max_sequence_length": 256,
        "registry": shard_registry(None),
    }
    return ShardContext(**{**settings, **overrides})


def cpu_engine(model_dir: Path, prefix_store_path: Path | None = None, engine: str = "hf_transformers") -> Engine:
    """A one-device engine (registered under ``engine``) on the CPU in float32, as one rank of one."""
    ctx = cpu_context(model_dir, prefix_store_path=prefix_store_path)
    return resolve(ctx.registry.engine(engine).target)(ctx)


def check_sdpa_engine_or_refusal(model_dir: Path, prompt_ids: list[list[int]], expected: list[list[int]]) -> None:
    """hf_optimum_bt runs a model with SDPA attention like transformers, and refuses one without."""
    if not type(cpu_engine(model_dir).model)._supports_sdpa:
        with pytest.raises(UnsupportedModelError, match="hf_optimum_bt needs sdpa attention"):
            cpu_engine(model_dir, engine="hf_optimum_bt")
        return
    engine = cpu_engine(model_dir, engine="hf_optimum_bt")
    assert engine.model.config._attn_implementation == "sdpa"
    assert engine.info().engine == "hf_optimum_bt"
    check_one_batch_equals_reference(engine, prompt_ids, expected)


def request(rid: int, ids: list[int], max_new_tokens: int, prefix_id: str = "", **details: object) -> pb.Request:
    return pb.Request(
        id=rid,
        input_ids=ids,
        max_new_tokens=max_new_tokens,
        prefix_id=prefix_id,
        details=pb.TokenDetailOptions(**details),
    )


class StepDriver:
    """Plays the router for one engine: requests join, each step runs every request's remaining
    prompt (at most ``chunk`` tokens of it, when given) or its next token, requests leave; a paged
    engine's blocks are handed out here. Steps go through the shard's ``StepRunner``."""

    def __init__(self, engine: Engine, chunk: int | None = None):
        self.engine = engine
        self.runner = StepRunner(engine)
        self.chunk = chunk
        info = engine.info()
        self.paged = info.HasField("kv_cache")
        self.block_size = info.kv_cache.block_size
        self.free_blocks = list(range(info.kv_cache.num_blocks, 0, -1))
        self.prompt_length: dict[int, int] = {}  # prompt prefix and input tokens
        self.computed: dict[int, int] = {}
        self.blocks: dict[int, list[int]] = {}
        self.outputs: dict[int, list[int]] = {}
        self.first: dict[int, GeneratedToken] = {}  # each request's first token, with its details
        self.failures: list[pb.RequestFailure] = []
        self._joins: list[pb.Request] = []
        self._leaves: list[int] = []

    def join(self, *requests: pb.Request) -> None:
        for r in requests:
            self.prompt_length[r.id] = self._prefix_length(r.prefix_id) + len(r.input_ids)
            self.computed[r.id], self.blocks[r.id], self.outputs[r.id] = 0, [], []
        self._joins += requests

    def _prefix_length(self, prefix_id: str) -> int:
        """As the router asks the shard (PrefixLookup); an unusable prefix fails the join later."""
        try:
            return self.engine.prompt_prefix(prefix_id).length if prefix_id else 0
        except Exception:
            return 0

    def leave(self, *request_ids: int) -> None:
        for rid in request_ids:
            self._forget(rid)
            self._leaves.append(rid)

    def _forget(self, rid: int) -> None:
        self.free_blocks += self.blocks.pop(rid, [])
        self.prompt_length.pop(rid, None)
        self.computed.pop(rid, None)

    def step(self) -> list[GeneratedToken]:
        return self.launch()()

    def launch(self) -> Callable[[], list[GeneratedToken]]:
        """Sends the next step as the router does and returns before its tokens are awaited (the
        shard's ``StepRunner.launch``); calling the result waits for them and records them."""
        ids, tokens_per_request, block_counts, blocks = [], [], [], []
        for rid, length in self.prompt_length.items():
            left = length - self.computed[rid]
            tokens = (min(left, self.chunk) if self.chunk else left) if left > 0 else 1
            new_blocks = []
            if self.paged:
                needed = -(-(self.computed[rid] + tokens) // self.block_size) - len(self.blocks[rid])
                new_blocks = [self.free_blocks.pop() for _ in range(needed)]
                self.blocks[rid] += new_blocks
            ids.append(rid)
            tokens_per_request.append(tokens)
            block_counts.append(len(new_blocks))
            blocks += new_blocks
            self.computed[rid] += tokens
        request = pb.StepRequest(
            leaves=self._leaves,
            joins=self._joins,
            request_ids=ids,
            num_tokens=tokens_per_request,
            new_block_counts=block_counts,
            new_block_ids=blocks,
        )
        self._joins, self._leaves = [], []
        finish = self.runner.launch(request)

        def tokens() -> list[GeneratedToken]:
            outcome = finish()
            for failure in outcome.failures:
                self._forget(failure.request_id)
            self.failures += outcome.failures
            for token in outcome.tokens:
                self.first.setdefault(token.request_id, token)
                self.outputs[token.request_id].append(token.token_id)
            return outcome.tokens

        return tokens

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    def run_until(self, tokens: int) -> None:
        """Steps until every request holds ``tokens`` generated tokens (the router would stop them)."""
        while any(len(self.outputs[rid]) < tokens for rid in self.prompt_length):
            self.step()


# A test engine on a GPU holds a cache for its batch (8 × 256 tokens: twice over in blocks of 16
# tokens, more in larger ones), not 85 % of the free memory: an earlier test's engine not yet
# collected would otherwise leave the next one a sliver, too little for the driver to load a
# kernel module it launches the first time.
GPU_TEST_CACHE_BLOCKS = 256


def native_engine(
    rank: int,
    world_size: int,
    port: int,
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    attention_backend: str | None = None,
    prefix_store_path: Path | None = None,
    cuda_graphs: bool = True,
    prompt_graphs: bool = True,
    pt2_compile: bool = False,
    kv_cache_blocks: int | None = None,
    engine: str = "tgis_native",
    decode_kernel: bool = ShardContext.decode_kernel,
) -> Engine:
    """The tgis_native engine (or another paged ``engine``: hf_transformers on a GPU) as one rank
    of ``world_size`` (process group on ``port``)."""
    on_gpu = device is not None and device.type == "cuda"
    ctx = ShardContext(
        model_dir=Path(model_dir),
        model_type="test",
        dtype=dtype,
        device=device or torch.device("cpu"),
        rank=rank,
        world_size=world_size,
        max_sequence_length=256,
        registry=shard_registry(None),
        max_batch_size=8,
        master_addr="127.0.0.1",
        master_port=port,
        attention_backend=attention_backend,
        prefix_store_path=prefix_store_path,
        cuda_graphs=cuda_graphs,
        prompt_graphs=prompt_graphs,
        pt2_compile=pt2_compile,
        decode_kernel=decode_kernel,
        kv_cache_blocks=kv_cache_blocks or (GPU_TEST_CACHE_BLOCKS if on_gpu else None),
    )
    return resolve(ctx.registry.engine(engine).target)(ctx)


def check_one_batch_equals_reference(
    engine: Engine, prompt_ids: list[list[int]], expected: list[list[int]], chunk: int | None = None
) -> None:
    """All prompts in one padded or ragged batch give each prompt's unbatched reference tokens."""
    driver = StepDriver(engine, chunk)
    driver.join(*(request(i, ids, NEW_TOKENS) for i, ids in enumerate(prompt_ids)))
    driver.run_until(NEW_TOKENS)
    for i, reference in enumerate(expected):
        # The reference stops at EOS; the engine keeps going until the router stops it.
        assert driver.outputs[i][: len(reference)] == reference
    driver.leave(*range(len(prompt_ids)))
    driver.step()
    assert engine.request_ids() == []


def start_then_join(engine: Engine, prompt_ids: list[list[int]], **details: object) -> StepDriver:
    """Request 0 alone for its prompt and two decode steps, then 1 and 2 join: the driver after
    the step that prefilled them beside request 0's third decode."""
    driver = StepDriver(engine)
    driver.join(request(0, prompt_ids[0], NEW_TOKENS, **details))
    driver.run(3)
    driver.join(*(request(i, prompt_ids[i], NEW_TOKENS, **details) for i in (1, 2)))
    driver.step()
    return driver
