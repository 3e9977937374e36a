"""Shard steps fail only the requests they must: a fault-injecting engine wrapper around the
real CPU engines (hf_transformers, tgis_native) and the reference tokens of each prompt."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from tests.support.engines import NEW_TOKENS, cpu_context, native_engine
from tests.support.engines import request as shard_request
from tests.support.faults import FaultyEngine, out_of_memory
from tests.support.ports import free_port
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_proto import shard_pb2 as pb
from tgis_proto.plugins import resolve
from tgis_shard.engines.base import GeneratedToken
from tgis_shard.steps import Batches, StepFailed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=3)


ENGINES = ("hf_transformers", "tgis_native")
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(params=[*ENGINES, *(pytest.param(f"{e}-cuda", marks=NEEDS_CUDA) for e in ENGINES)])
def engine(request, model_dir) -> FaultyEngine:
    name, _, device_type = request.param.partition("-")
    device = torch.device(device_type, 0) if device_type else torch.device("cpu")
    if name == "hf_transformers":
        ctx = cpu_context(model_dir, device=device)
        return FaultyEngine(resolve(ctx.registry.engine(name).target)(ctx))
    # The torch attention backend on CUDA too: these steps test bookkeeping, not kernels.
    return FaultyEngine(native_engine(0, 1, free_port(), model_dir, device=device, attention_backend="torch"))


def _batch(batch_id: int, prompt_ids: list[list[int]], rows: Sequence[int]) -> pb.Batch:
    return pb.Batch(id=batch_id, requests=[shard_request(i, prompt_ids[i], NEW_TOKENS) for i in rows])


def _collect(outputs: dict[int, list[int]], tokens: list[GeneratedToken]) -> None:
    for token in tokens:
        outputs.setdefault(token.request_id, []).append(token.token_id)


def _run_to_end(batches: Batches, batch_id: int, outputs: dict[int, list[int]]) -> None:
    while any(len(tokens) < NEW_TOKENS for tokens in outputs.values()):
        _collect(outputs, batches.next_token(batch_id, [], []).tokens)


def _free_blocks(engine: FaultyEngine) -> int | None:
    allocator = getattr(engine.inner, "allocator", None)
    return allocator.free_blocks if allocator is not None else None


def test_a_request_whose_prefill_fails_alone_fails_and_the_others_form_the_batch(engine, prompt_ids, expected):
    batches = Batches(engine)
    engine.bad_requests = {1}
    result = batches.prefill(_batch(1, prompt_ids, [0, 1, 2]))
    assert [(f.request_id, f.kind) for f in result.failures] == [(1, pb.FAILURE_INTERNAL)]
    assert "request 1 has a bad parameter" in result.failures[0].message
    assert result.state is not None
    assert result.state.request_ids == [0, 2]
    outputs: dict[int, list[int]] = {}
    _collect(outputs, result.tokens)
    _run_to_end(batches, 1, outputs)
    for i in (0, 2):
        assert outputs[i][: len(expected[i])] == expected[i]


def test_out_of_memory_in_a_prefill_fails_the_new_batch_and_the_running_one_goes_on(engine, prompt_ids, expected):
    batches = Batches(engine)
    outputs: dict[int, list[int]] = {}
    _collect(outputs, batches.prefill(_batch(1, prompt_ids, [0])).tokens)
    engine.prefill_error = out_of_memory()
    result = batches.prefill(_batch(2, prompt_ids, [1, 2]))
    assert result.state is None
    assert result.tokens == []
    assert {(f.request_id, f.kind) for f in result.failures} == {
        (1, pb.FAILURE_OUT_OF_MEMORY),
        (2, pb.FAILURE_OUT_OF_MEMORY),
    }
    _run_to_end(batches, 1, outputs)
    assert outputs[0][: len(expected[0])] == expected[0]


def test_out_of_memory_after_a_join_fails_the_joiners_and_the_running_batch_goes_on(engine, prompt_ids, expected):
    batches = Batches(engine)
    free_at_start = _free_blocks(engine)
    outputs: dict[int, list[int]] = {}
    _collect(outputs, batches.prefill(_batch(1, prompt_ids, [0])).tokens)
    for _ in range(2):
        _collect(outputs, batches.next_token(1, [], []).tokens)
    batches.prefill(_batch(2, prompt_ids, [1, 2]))
    engine.decode_error, engine.decode_rows = out_of_memory(), 3
    result = batches.next_token(1, [2], [])
    assert {(f.request_id, f.kind) for f in result.failures} == {
        (1, pb.FAILURE_OUT_OF_MEMORY),
        (2, pb.FAILURE_OUT_OF_MEMORY),
    }
    assert [t.request_id for t in result.tokens] == [0]
    _collect(outputs, result.tokens)
    _run_to_end(batches, 1, outputs)
    # The layer that had taken the failed step's keys gave them back: the tokens are unchanged.
    assert outputs[0][: len(expected[0])] == expected[0]
    batches.clear(None)
    assert _free_blocks(engine) == free_at_start


def test_a_failed_step_after_a_merge_drops_every_batch_and_frees_each_block_once(engine, prompt_ids):
    batches = Batches(engine)
    free_at_start = _free_blocks(engine)
    batches.prefill(_batch(1, prompt_ids, [0]))
    batches.prefill(_batch(2, prompt_ids, [1, 2]))
    engine.decode_error = RuntimeError("a kernel failed")
    with pytest.raises(StepFailed, match="a kernel failed") as failed:
        batches.next_token(1, [2], [])
    assert not failed.value.out_of_memory
    assert len(batches) == 0
    assert _free_blocks(engine) == free_at_start


def test_out_of_memory_with_nobody_joining_fails_the_step_as_out_of_memory(engine, prompt_ids):
    batches = Batches(engine)
    batches.prefill(_batch(1, prompt_ids, [0, 1]))
    engine.decode_error = out_of_memory()
    with pytest.raises(StepFailed) as failed:
        batches.next_token(1, [], [])
    assert failed.value.out_of_memory
    assert len(batches) == 0
