"""Driving a shard engine directly in tests: context, requests, decode loops."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tgis_proto import shard_pb2 as pb
from tgis_proto.plugins import resolve
from tgis_shard.engines.base import BatchState, Engine, GeneratedToken, ShardContext, UnsupportedModelError
from tgis_shard.registry import shard_registry

# Prompts of different lengths (one a single token), shared by the engine tests.
PROMPTS = ["Hello there, general", "A", "The quick brown fox jumps over the lazy dog and then"]
NEW_TOKENS = 8


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


def decode_steps(engine: Engine, state: object, outputs: dict[int, list[int]], steps: int) -> None:
    """Runs ``steps`` decode steps, appending each request's tokens to ``outputs``."""
    for _ in range(steps):
        for token in engine.decode(state):
            outputs[token.request_id].append(token.token_id)


def native_engine(
    rank: int,
    world_size: int,
    port: int,
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    attention_backend: str | None = None,
    prefix_store_path: Path | None = None,
) -> Engine:
    """The tgis_native engine as one rank of ``world_size`` (process group on ``port``)."""
    from tgis_shard.engines.tgis_native import create_engine as create_native_engine

    ctx = ShardContext(
        model_dir=Path(model_dir),
        model_type="test",
        dtype=dtype,
        device=device or torch.device("cpu"),
        rank=rank,
        world_size=world_size,
        max_sequence_length=256,
        registry=shard_registry(None),
        max_batch_size=4,
        master_addr="127.0.0.1",
        master_port=port,
        attention_backend=attention_backend,
        prefix_store_path=prefix_store_path,
    )
    return create_native_engine(ctx)


def check_one_batch_equals_reference(engine: Engine, prompt_ids: list[list[int]], expected: list[list[int]]) -> None:
    """All prompts in one padded or ragged batch give each prompt's unbatched reference tokens."""
    tokens, state = engine.prefill(
        pb.Batch(id=1, requests=[request(i, ids, NEW_TOKENS) for i, ids in enumerate(prompt_ids)])
    )
    outputs = {t.request_id: [t.token_id] for t in tokens}
    decode_steps(engine, state, outputs, NEW_TOKENS - 1)
    for i, reference in enumerate(expected):
        # The reference stops at EOS; the engine keeps going until the router prunes it.
        assert outputs[i][: len(reference)] == reference


@dataclass
class Joined:
    """Request 0 ran alone for two steps; requests 1 and 2 were then prefilled and merged in."""

    running: BatchState  # the merged batch, rows 0, 1, 2
    joining: BatchState  # what the merge consumed
    outputs: dict[int, list[int]]  # every request's tokens so far
    first: dict[int, GeneratedToken]  # each request's first token, with its details


def start_then_join(engine: Engine, prompt_ids: list[list[int]], **details: object) -> Joined:
    """Request 0 alone for two decode steps, then 1 and 2 prefilled and concatenated to it."""
    tokens, running = engine.prefill(pb.Batch(id=1, requests=[request(0, prompt_ids[0], NEW_TOKENS, **details)]))
    first = {t.request_id: t for t in tokens}
    outputs = {t.request_id: [t.token_id] for t in tokens}
    decode_steps(engine, running, outputs, 2)
    tokens, joining = engine.prefill(
        pb.Batch(id=2, requests=[request(i, prompt_ids[i], NEW_TOKENS, **details) for i in (1, 2)])
    )
    first.update({t.request_id: t for t in tokens})
    outputs.update({t.request_id: [t.token_id] for t in tokens})
    return Joined(engine.concatenate([running, joining]), joining, outputs, first)
