"""tgis_native's steps launched one ahead of their tokens, as the shard's server runs them (the
next step is prepared and queued before the last one's tokens reach the host), give exactly the
tokens and details of steps run one by one, while requests join and leave: on the CPU, and on
CUDA with decode graphs over each backend's persistent buffers and staging (bench/gpu_checks.sh
runs those on the device)."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.support.engines import StepDriver, native_engine, request
from tests.support.ports import free_port
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_shard.layers.flashinfer_paged import flashinfer_available
from tgis_shard.sampler import GeneratedToken

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
NEEDS_FLASHINFER = pytest.mark.skipif(
    not (torch.cuda.is_available() and flashinfer_available()), reason="needs CUDA and flashinfer"
)
PROMPTS = ([5, 9, 14, 3, 8, 21, 4], [7, 7, 30, 2], [11, 6, 19, 25, 12, 40, 3, 9, 10], [15, 2])
STEPS = 10
JOINS = {0: (0,), 2: (1, 2), 5: (3,)}  # step -> requests joining before it
LEAVES = {6: (1,), 8: (0,)}  # step -> requests leaving before it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Heads of 128: what FlashInfer is compiled for.
    shape = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama-ahead"), arch="llama", seed=7, **shape)


def _run(engine, ahead: bool) -> list[tuple]:
    """Every token of the scenario, with its details: each step awaited before the next one is
    sent, or (``ahead``) the next one launched first."""
    driver = StepDriver(engine)
    tokens: list[GeneratedToken] = []
    pending = None
    for step in range(STEPS):
        # Request 0 wants every detail; the others decode plainly.
        driver.join(
            *(
                request(
                    i, list(PROMPTS[i]), 32, **({"logprobs": True, "input_tokens": True, "top_n": 2} if i == 0 else {})
                )
                for i in JOINS.get(step, ())
            )
        )
        driver.leave(*LEAVES.get(step, ()))
        launched = driver.launch()
        if not ahead:
            tokens += launched()
            continue
        if pending is not None:
            tokens += pending()
        pending = launched
    if pending is not None:
        tokens += pending()
    driver.leave(*driver.prompt_length)
    driver.step()  # the batch empty again for the next run
    assert not driver.failures
    return [(t.request_id, t.token_id, t.logprob, t.rank, t.top_tokens, len(t.input_tokens)) for t in tokens]


@pytest.mark.parametrize(
    ("device", "backend", "dtype", "graphs"),
    [
        ("cpu", "torch", torch.float32, False),
        pytest.param("cuda", "flex", torch.float32, True, marks=NEEDS_CUDA),
        pytest.param("cuda", "flashinfer", torch.bfloat16, True, marks=NEEDS_FLASHINFER),
        pytest.param("cuda", "flashinfer", torch.bfloat16, False, marks=NEEDS_FLASHINFER),
    ],
)
def test_steps_launched_ahead_give_the_tokens_of_steps_run_one_by_one(model_dir, device, backend, dtype, graphs):
    engine = native_engine(
        0,
        1,
        free_port(),
        model_dir,
        dtype,
        device=torch.device(device, 0) if device == "cuda" else None,
        attention_backend=backend,
        cuda_graphs=graphs,
    )
    engine.warm_up()
    assert (engine._graphs is not None) == graphs
    one_by_one = _run(engine, ahead=False)
    ahead = _run(engine, ahead=True)
    assert len(one_by_one) >= 20
    assert {t[0] for t in one_by_one} == {0, 1, 2, 3}
    assert one_by_one[0][5] == len(PROMPTS[0])  # the input-token details ride on request 0's tokens
    assert ahead == one_by_one


@pytest.mark.parametrize("backend", ["flex", pytest.param("flashinfer", marks=NEEDS_FLASHINFER)])
@NEEDS_CUDA
def test_steps_launch_without_waiting_for_the_device(model_dir, backend, caplog):
    """Decode steps replayed from a graph, on either GPU backend; with FlashInfer, also a step in
    which a prompt joins the decodes (its metadata reaches the device through pinned memory)."""
    caplog.set_level(logging.WARNING, logger="tgis_shard.steps")  # a failed join, a failed launch
    dtype = torch.bfloat16 if backend == "flashinfer" else torch.float32
    engine = native_engine(
        0, 1, free_port(), model_dir, dtype, device=torch.device("cuda", 0), attention_backend=backend
    )
    engine.warm_up()
    driver = StepDriver(engine)
    driver.join(*(request(i, list(PROMPTS[i]), 32) for i in range(3)))
    driver.run(2)  # the prompts, a first decode
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # anything that waits for the device raises
    try:
        pending = [driver.launch() for _ in range(3)]
        if backend == "flashinfer":
            driver.join(request(3, list(PROMPTS[3]), 32))
            pending.append(driver.launch())
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    tokens = [t.request_id for finish in pending for t in finish()]
    # A launch that waited raised inside the step runner, which failed the step's prompt: its
    # logged traceback names the waiting operation.
    assert not driver.failures, "\n".join(r.getMessage() + "\n" + (r.exc_text or "") for r in caplog.records)
    assert tokens[:9] == [0, 1, 2] * 3
    if backend == "flashinfer":
        assert sorted(tokens[9:]) == [0, 1, 2, 3]
