"""hf_transformers on the paged KV cache (engines.hf_paged): transformers' own decoders, with
our attention function, run by tgis_native's engine, against transformers generate() on the
same weights. On the CPU the path is taken when an attention backend is asked for (a GPU takes
it by default)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from tests.support.engines import (
    NEW_TOKENS,
    PROMPTS,
    StepDriver,
    check_one_batch_equals_reference,
    cpu_context,
    request,
    start_then_join,
)
from tests.support.native_checks import GPU_BACKENDS, GPU_LLAMA_SHAPE, check_gpus_match_transformers
from tests.support.prefixes import check_prefix_outputs, run_prefix_scenario, save_prefixes
from tests.support.tiny_models import build_tiny_causal_lm, reference_greedy
from tgis_proto.plugins import resolve
from tgis_shard.engines.hf_paged import ATTENTION, hides_keys, unsupported
from tgis_shard.engines.tgis_native import NativeEngine
from tgis_shard.layers.attention_heads import AttentionHeads

# Rotary (llama, gpt_neox) and learned positions (gpt2, opt): each reads the positions given.
ARCHS = ["llama", "gpt2", "gpt_neox", "opt"]


def paged_engine(model_dir, backend="torch", **settings):
    ctx = cpu_context(model_dir, attention_backend=backend, max_batch_size=4, **settings)
    return resolve(ctx.registry.engine("hf_transformers").target)(ctx)


@pytest.fixture(scope="module", params=ARCHS)
def model_dir(request, tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch=request.param)


@pytest.fixture(scope="module")
def engine(model_dir):
    return paged_engine(model_dir)


def test_runs_on_the_paged_engine_and_says_hf_transformers(engine):
    assert isinstance(engine, NativeEngine)
    assert engine.model.model.config._attn_implementation == ATTENTION
    info = engine.info()
    assert info.engine == "hf_transformers"
    assert info.HasField("kv_cache")
    assert not info.batch_padding


def test_a_ragged_batch_equals_the_unbatched_reference(engine, prompt_ids, expected):
    check_one_batch_equals_reference(engine, prompt_ids, expected)


def test_prompts_in_chunks_beside_decodes_equal_the_reference(engine, prompt_ids, expected):
    check_one_batch_equals_reference(engine, prompt_ids, expected, chunk=3)


def test_requests_joining_and_leaving_keep_their_outputs(engine, prompt_ids, expected):
    driver = start_then_join(engine, prompt_ids)
    driver.run(1)
    driver.leave(2)
    driver.run(NEW_TOKENS)
    for i in (0, 1):
        assert driver.outputs[i][: len(expected[i])] == expected[i]
    driver.leave(0, 1)
    driver.step()
    assert engine.request_ids() == []


def test_first_token_logprobs_are_the_reference_log_softmax(engine, model_dir, prompt_ids):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    driver = StepDriver(engine)
    driver.join(*(request(i, ids, 2, logprobs=True) for i, ids in enumerate(prompt_ids)))
    driver.step()
    for i, ids in enumerate(prompt_ids):
        with torch.inference_mode():
            scores = torch.log_softmax(reference(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        token = driver.first[i]
        assert token.logprob == pytest.approx(float(scores[token.token_id]), abs=1e-4)
    driver.leave(*range(len(prompt_ids)))
    driver.step()


def test_prompt_prefixes_equal_transformers_on_prefix_then_prompt_embeddings(model_dir, prompt_ids, tmp_path):
    prefixes = save_prefixes(model_dir, tmp_path)
    outputs = run_prefix_scenario(paged_engine(model_dir, prefix_store_path=tmp_path), prompt_ids)
    check_prefix_outputs(model_dir, prompt_ids, prefixes, outputs)


@pytest.mark.parametrize(
    ("arch", "why"),
    [
        ("bloom", "does not take transformers' attention functions"),
        ("gemma2", "soft-caps"),
        ("cohere", "scales its logits"),
    ],
)
def test_models_it_cannot_serve_say_why(arch, why):
    assert why in unsupported(AutoConfig.for_model(arch), 8192)


# Windows of 5 tokens: the prompts (up to 14 tokens) and their 8 new tokens outgrow them.
WINDOWED = {
    "mistral": {"sliding_window": 5},
    "qwen2": {"use_sliding_window": True, "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]},
}


@pytest.mark.parametrize("backend", ["torch", "flex"])
@pytest.mark.parametrize("arch", list(WINDOWED))
def test_sliding_windows_equal_transformers(arch, backend, tmp_path):
    model_dir = build_tiny_causal_lm(tmp_path, arch=arch, **WINDOWED[arch])
    assert unsupported(AutoConfig.from_pretrained(model_dir), 64) is None
    engine = paged_engine(model_dir, backend)
    assert engine.model.uses_sliding_window
    windows = {heads.sliding_window for heads in _layers_heads(engine, model_dir)}
    assert windows == ({5} if arch == "mistral" else {5, None})
    prompt_ids = [AutoTokenizer.from_pretrained(model_dir)(p).input_ids for p in PROMPTS]
    expected = reference_greedy(model_dir, PROMPTS, NEW_TOKENS)
    check_one_batch_equals_reference(engine, prompt_ids, expected, chunk=3)


def _layers_heads(engine, model_dir) -> list[AttentionHeads]:
    """Each layer's heads, made by a step of one token."""
    driver = StepDriver(engine)
    driver.join(request(99, [5], 1))
    driver.step()
    driver.leave(99)
    driver.step()
    return list(engine.model._heads.values())


def test_a_sliding_window_no_shorter_than_the_longest_sequence_hides_no_key():
    mistral = AutoConfig.for_model("mistral")  # a window of 4,096 tokens
    assert not hides_keys(mistral, 4096)
    assert hides_keys(mistral, 8192)
    assert unsupported(mistral, 8192) is None
    # Qwen2's window is off unless use_sliding_window says so.
    assert not hides_keys(AutoConfig.for_model("qwen2", sliding_window=16), 64)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
    ],
    ids=["dynamic", "longrope"],
)
def test_rope_that_follows_the_longest_position_of_the_batch_is_refused(rope):
    config = AutoConfig.for_model("llama", rope_scaling=rope, original_max_position_embeddings=64)
    assert "longest position of the batch" in unsupported(config, 256)
    linear = AutoConfig.for_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert unsupported(linear, 256) is None


def test_a_model_it_cannot_serve_stays_on_padded_batches(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tgis_shard.engines.hf_transformers")
    engine = paged_engine(build_tiny_causal_lm(tmp_path, arch="bloom"))
    assert not isinstance(engine, NativeEngine)
    assert engine.info().batch_padding
    assert "padded batches" in caplog.text
    assert "attention functions" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_on_a_gpu_with_graphs_equals_transformers(tmp_path_factory, backend, dtype):
    """Decode and prompt steps replayed from CUDA graphs over the attention function, on
    FlashInfer and FlexAttention, against transformers on the GPU."""
    model_dir = build_tiny_causal_lm(tmp_path_factory.mktemp("llama-gpu"), arch="llama", **GPU_LLAMA_SHAPE)
    check_gpus_match_transformers(model_dir, dtype, 1, backend=backend, engine="hf_transformers")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sliding_windows_on_a_gpu_with_graphs_equal_transformers(tmp_path):
    """The windowed layers' FlexAttention masks inside the decode graphs, beside full-attention layers."""
    # Windowed and full layers alternate over the GPU shape's layers.
    layer_types = ["sliding_attention", "full_attention"] * (GPU_LLAMA_SHAPE["num_hidden_layers"] // 2)
    windowed = {**WINDOWED["qwen2"], "layer_types": layer_types}
    model_dir = build_tiny_causal_lm(tmp_path, arch="qwen2", **GPU_LLAMA_SHAPE, **windowed)
    check_gpus_match_transformers(model_dir, torch.bfloat16, 1, backend="flex", engine="hf_transformers")
