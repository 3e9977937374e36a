"""Shard steps fail only the requests they must: a fault-injecting engine wrapper around the
real CPU engines (hf_transformers, tgis_native) and the reference tokens of each prompt."""

from __future__ import annotations

import pytest
import torch

from tests.support.engines import NEW_TOKENS, StepDriver, cpu_context, native_engine, request
from tests.support.faults import FaultyEngine, out_of_memory
from tests.support.ports import free_port
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_proto import shard_pb2 as pb
from tgis_proto.plugins import resolve
from tgis_shard.steps import StepFailed


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
        ctx = cpu_context(model_dir, device=device, hf_paged=False)  # the padded engine on CUDA too
        return FaultyEngine(resolve(ctx.registry.engine(name).target)(ctx))
    # The torch attention backend on CUDA too: these steps test bookkeeping, not kernels.
    return FaultyEngine(native_engine(0, 1, free_port(), model_dir, device=device, attention_backend="torch"))


def _join(driver: StepDriver, prompt_ids: list[list[int]], *rows: int) -> None:
    driver.join(*(request(i, prompt_ids[i], NEW_TOKENS) for i in rows))


def _failed(driver: StepDriver) -> set[tuple[int, int]]:
    return {(f.request_id, f.kind) for f in driver.failures}


def test_a_request_whose_prompt_fails_alone_fails_and_the_others_go_on(engine, prompt_ids, expected):
    driver = StepDriver(engine)
    engine.bad_requests = {1}
    _join(driver, prompt_ids, 0, 1, 2)
    driver.step()
    assert _failed(driver) == {(1, pb.FAILURE_INTERNAL)}
    assert "request 1 has a bad parameter" in driver.failures[0].message
    assert sorted(engine.request_ids()) == [0, 2]
    driver.run_until(NEW_TOKENS)
    for i in (0, 2):
        assert driver.outputs[i][: len(expected[i])] == expected[i]


def test_out_of_memory_in_a_prompt_fails_the_joining_requests_and_the_running_one_goes_on(engine, prompt_ids, expected):
    driver = StepDriver(engine)
    _join(driver, prompt_ids, 0)
    driver.step()
    _join(driver, prompt_ids, 1, 2)
    engine.step_error = out_of_memory()
    tokens = driver.step()
    assert [t.request_id for t in tokens] == [0]
    assert _failed(driver) == {(1, pb.FAILURE_OUT_OF_MEMORY), (2, pb.FAILURE_OUT_OF_MEMORY)}
    assert engine.request_ids() == [0]
    driver.run_until(NEW_TOKENS)
    # The layer that had taken the failed step's keys gave them back: the tokens are unchanged.
    assert driver.outputs[0][: len(expected[0])] == expected[0]


def test_out_of_memory_in_the_first_step_after_a_join_fails_the_joiners_and_the_rest_goes_on(
    engine, prompt_ids, expected
):
    driver = StepDriver(engine)
    _join(driver, prompt_ids, 0)
    driver.run(3)
    _join(driver, prompt_ids, 1, 2)
    driver.step()
    engine.step_error, engine.step_size = out_of_memory(), 3
    tokens = driver.step()
    assert _failed(driver) == {(1, pb.FAILURE_OUT_OF_MEMORY), (2, pb.FAILURE_OUT_OF_MEMORY)}
    assert [t.request_id for t in tokens] == [0]
    driver.run_until(NEW_TOKENS)
    assert driver.outputs[0][: len(expected[0])] == expected[0]


def test_a_failed_step_of_running_requests_fails_the_step_and_drops_every_request(engine, prompt_ids):
    driver = StepDriver(engine)
    _join(driver, prompt_ids, 0)
    driver.step()
    _join(driver, prompt_ids, 1, 2)
    driver.step()
    engine.step_error = RuntimeError("a kernel failed")
    with pytest.raises(StepFailed, match="a kernel failed") as failed:
        driver.step()
    assert not failed.value.out_of_memory
    assert engine.request_ids() == []


def test_out_of_memory_with_nobody_joining_fails_the_step_as_out_of_memory(engine, prompt_ids):
    driver = StepDriver(engine)
    _join(driver, prompt_ids, 0, 1)
    driver.step()
    engine.step_error = out_of_memory()
    with pytest.raises(StepFailed) as failed:
        driver.step()
    assert failed.value.out_of_memory
    assert engine.request_ids() == []


def test_a_request_that_cannot_join_fails_alone(engine, prompt_ids, expected):
    driver = StepDriver(engine)
    driver.join(request(0, prompt_ids[0], NEW_TOKENS), request(5, prompt_ids[1], NEW_TOKENS, prefix_id="nowhere"))
    driver.step()
    assert [(f.request_id, f.kind) for f in driver.failures] == [(5, pb.FAILURE_INTERNAL)]
    driver.run_until(NEW_TOKENS)
    assert driver.outputs[0][: len(expected[0])] == expected[0]
