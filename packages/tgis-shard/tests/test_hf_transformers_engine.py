"""The hf_transformers engine against plain transformers generate() on the same weights."""

from __future__ import annotations

import pytest
import torch

from tests.support.engines import (
    NEW_TOKENS,
    StepDriver,
    check_one_batch_equals_reference,
    check_sdpa_engine_or_refusal,
    cpu_engine,
    request,
    start_then_join,
)
from tests.support.prefixes import check_prefix_outputs, run_prefix_scenario, save_prefixes
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_proto import shard_pb2 as pb
from tgis_shard.engines.base import UnsupportedModelError


@pytest.fixture(scope="module", params=["llama", "gpt2", "bloom"])
def model_dir(request, tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch=request.param)


@pytest.fixture(scope="module")
def engine(model_dir):
    return cpu_engine(model_dir)


def test_left_padded_batch_equals_unpadded_reference(engine, prompt_ids, expected):
    check_one_batch_equals_reference(engine, prompt_ids, expected)


def test_joining_and_pruning_mid_generation_changes_no_output(engine, prompt_ids, expected):
    driver = start_then_join(engine, prompt_ids)
    joining = engine.prefilled_batch
    assert joining is not None
    assert joining.request_ids == [1, 2]
    driver.step()  # merges the joiners, then decodes all three
    assert engine.batch.request_ids == [0, 1, 2]
    # The joining batch's cache was copied into the merged one and let go, layer by layer.
    assert all(layer.keys.numel() == layer.values.numel() == 0 for layer in joining.cache.layers)
    driver.run(1)
    # Request 2 (the longest prompt) leaves: its padding columns go with it.
    width_before = engine.batch.attention_mask.shape[1]
    driver.leave(2)
    driver.step()
    assert engine.batch.attention_mask.shape[1] < width_before + 1  # the step's decode added one
    assert engine.batch.request_ids == [0, 1]
    driver.run(NEW_TOKENS)
    for i in (0, 1):
        assert driver.outputs[i][: len(expected[i])] == expected[i]
    assert driver.outputs[2] == expected[2][:3]
    driver.leave(0, 1)
    driver.step()
    assert engine.batch is None
    assert engine.request_ids() == []


def test_decode_steps_append_to_the_cache_in_place(engine, prompt_ids):
    driver = StepDriver(engine)
    driver.join(request(0, prompt_ids[0], NEW_TOKENS))
    driver.run(2)  # the prefill, then the first decode (which merges the prefilled batch)
    layer = engine.batch.cache.layers[0]
    storage, length = layer.keys.data_ptr(), layer.keys.shape[-2]
    for appended in (1, 2):
        driver.step()
        assert layer.keys.shape[-2] == length + appended
        assert layer.keys.data_ptr() == storage  # no copy of the cache per token
    driver.leave(0)
    driver.step()


def test_token_details_are_log_softmax_of_the_reference_scores(engine, model_dir, prompt_ids):
    driver = StepDriver(engine)
    driver.join(request(0, prompt_ids[2], NEW_TOKENS, logprobs=True, ranks=True, top_n=3))
    (token,) = driver.step()
    driver.leave(0)
    driver.step()
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt_ids[2]])).logits[0, -1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    assert token.token_id == int(logprobs.argmax())
    assert token.logprob == pytest.approx(float(logprobs.max()), abs=1e-4)
    assert token.rank == 1
    top = logprobs.topk(3)
    assert [t[0] for t in token.top_tokens] == top.indices.tolist()
    assert [t[1] for t in token.top_tokens] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_health_check_runs_a_forward_pass(engine):
    engine.health_check()
    info = engine.info()
    assert info.model_kind == pb.DECODER_ONLY
    assert info.eos_token_ids == [1]


def test_decode_measurement_counts_from_after_the_prefill_of_the_asked_batch(engine, monkeypatch):
    calls = []
    decode = engine.decode

    def recording_decode(state):
        calls.append(("decode", len(state.ids), state.attention_mask.shape[1]))
        return decode(state)

    monkeypatch.setattr(engine, "decode", recording_decode)
    engine.measure_decode(3, 5, lambda: calls.append(("start counting",)))
    assert calls == [("start counting",), ("decode", 3, 5)]


def test_prompt_prefixes_equal_transformers_on_prefix_then_prompt_embeddings(model_dir, prompt_ids, tmp_path):
    prefixes = save_prefixes(model_dir, tmp_path)
    engine = cpu_engine(model_dir, prefix_store_path=tmp_path)
    assert engine.prompt_prefix("team/long").length == 7
    check_prefix_outputs(model_dir, prompt_ids, prefixes, run_prefix_scenario(engine, prompt_ids))


def test_hf_optimum_bt_runs_the_fused_sdpa_attention_and_equals_transformers(model_dir, prompt_ids, expected):
    # BLOOM has no SDPA attention in transformers 5: refused, not silently run eagerly.
    check_sdpa_engine_or_refusal(model_dir, prompt_ids, expected)


def test_hf_optimum_bt_refuses_a_model_without_sdpa_attention(model_dir, monkeypatch):
    model_class = type(cpu_engine(model_dir).model)
    monkeypatch.setattr(model_class, "_supports_sdpa", False)
    with pytest.raises(UnsupportedModelError, match="hf_optimum_bt needs sdpa attention"):
        cpu_engine(model_dir, engine="hf_optimum_bt")
    assert cpu_engine(model_dir).model.config._attn_implementation == "eager"  # hf_transformers falls back
