"""PT2_COMPILE on tgis_native and hf_transformers (on the paged cache; and padded: causal, and
encoder-decoder with relative and with absolute decoder positions): the compiled forward pass
gives the eager engine's tokens and logprobs through a random serving mix (requests joining and
leaving, prompt chunks beside decodes on the paged cache, one-row and many-row steps, one-token
prompts, contexts within one block and over several, caches outgrowing their room on padded
hf_transformers, input-token details), and once the warm-up ran, that mix compiles nothing new."""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.utils import counters

from tests.support.engines import StepDriver, cpu_context, native_engine, request
from tests.support.ports import free_port
from tests.support.tiny_models import build_tiny_causal_lm, build_tiny_seq2seq_lm
from tgis_proto.plugins import resolve
from tgis_shard.engines.base import Engine
from tgis_shard.engines.tgis_native import NativeEngine

STEPS = 60
# The compiled pass fuses and reorders arithmetic: sums round differently, far below this in
# float32, at bfloat16's resolution on a GPU.
LOGPROB_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
DEVICES = [
    pytest.param("cpu", torch.float32, id="cpu"),
    # On a GPU: the default attention backend (FlashInfer where installed) and CUDA graphs too.
    pytest.param(
        "cuda", torch.bfloat16, id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # Heads of 128, which FlashInfer is built for on a GPU.
    shape = {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1}
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama-pt2"), arch="llama", seed=6, **shape)


@pytest.fixture(autouse=True)
def one_model_per_process():
    """As in a shard, which compiles one model: what earlier tests compiled for other models
    counts against torch's recompile limit of code they share (transformers' decorators)."""
    torch._dynamo.reset()


def _compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _serve_mix(
    engine: Engine, seed: int, chunk: int | None = 24, longest_output: int = 10
) -> list[tuple[int, int, float]]:
    """Every token of a random mix of requests, as (request, token, logprob)."""
    rng = random.Random(seed)
    driver = StepDriver(engine, chunk=chunk)
    left: dict[int, int] = {}  # tokens each running request still makes
    tokens = []
    for rid in range(STEPS):
        if not left or (len(left) < 6 and rng.random() < 0.4):
            length = rng.choice([1, rng.randint(2, 20), rng.randint(30, 90)])
            left[rid] = rng.randint(1, 10)
            prompt = [rng.randint(3, 120) for _ in range(length)]
            details = {"input_tokens": True} if rng.random() < 0.2 else {}
            driver.join(request(rid, prompt, left[rid], logprobs=True, **details))
        for token in driver.step():
            tokens.append((token.request_id, token.token_id, token.logprob))
            left[token.request_id] -= 1
            if not left[token.request_id]:
                del left[token.request_id]
                driver.leave(token.request_id)
    return tokens


# hf_transformers on the paged cache (engines.hf_paged): the whole of transformers' decoder
# compiled, around our attention function. On the CPU it takes that path with a backend asked for.
@pytest.mark.parametrize("engine_name", ["tgis_native", "hf_transformers"])
@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_compiled_forward_equals_eager_and_compiles_nothing_after_the_warm_up(model_dir, device, dtype, engine_name):
    device = torch.device(device, 0) if device == "cuda" else torch.device(device)
    backend = "torch" if device.type == "cpu" else None

    def paged_engine(pt2_compile: bool) -> Engine:
        engine = native_engine(
            0, 1, free_port(), model_dir, dtype, device, backend, pt2_compile=pt2_compile, engine=engine_name
        )
        assert isinstance(engine, NativeEngine)
        return engine

    compiled = paged_engine(pt2_compile=True)
    before = _compiled_graphs()
    compiled.warm_up()
    after_warm_up = _compiled_graphs()
    assert after_warm_up > before
    tokens = _serve_mix(compiled, seed=3)
    assert _compiled_graphs() == after_warm_up
    eager = paged_engine(pt2_compile=False)
    eager.warm_up()
    expected = _serve_mix(eager, seed=3)
    assert len(tokens) > STEPS / 2
    assert [t[:2] for t in tokens] == [t[:2] for t in expected]
    assert [t[2] for t in tokens] == pytest.approx([t[2] for t in expected], abs=LOGPROB_TOLERANCE[dtype])


def _transformers_engine(model_dir, pt2_compile: bool) -> Engine:
    ctx = cpu_context(model_dir, pt2_compile=pt2_compile, max_batch_size=8, hf_paged=False)
    engine = resolve(ctx.registry.engine("hf_transformers").target)(ctx)
    # Little room in the caches (kv_cache.RoomyLayer): the mix outgrows it again and again.
    engine.cache_room_tokens = 3
    return engine


# T5's decoder derives positions from cache columns; BART's embeds each row's own (hooks).
@pytest.mark.parametrize("arch", ["llama", "t5", "bart"])
def test_hf_transformers_compiled_forward_equals_eager_and_compiles_nothing_after_the_warm_up(
    arch, model_dir, tmp_path
):
    if arch != "llama":
        model_dir = build_tiny_seq2seq_lm(tmp_path / arch, arch=arch, seed=6)
    compiled = _transformers_engine(model_dir, pt2_compile=True)
    before = _compiled_graphs()
    compiled.warm_up()
    after_warm_up = _compiled_graphs()
    assert after_warm_up > before
    tokens = _serve_mix(compiled, seed=5, chunk=None)
    assert _compiled_graphs() == after_warm_up
    eager = _transformers_engine(model_dir, pt2_compile=False)
    eager.warm_up()  # eager: nothing to compile
    assert _compiled_graphs() == after_warm_up
    expected = _serve_mix(eager, seed=5, chunk=None)
    assert len(tokens) > STEPS / 2
    assert [t[:2] for t in tokens] == [t[:2] for t in expected]
    assert [t[2] for t in tokens] == pytest.approx([t[2] for t in expected], abs=LOGPROB_TOLERANCE[torch.float32])
